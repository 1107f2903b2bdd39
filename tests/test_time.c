/* Time: the monotonic clock, sleeping from fibers and from plain code, the order in which
 * many timers fire, the sleep future as a plain task and its cancellation, and timers on an
 * executor that never made an event loop.
 *
 * Timing is asserted only as a lower bound ("not before the deadline"). Checks inside fibers
 * are FCHECKs (fixture.h). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "moor.h"

#include "fixture.h"

/* White-box: moor__part_get tells whether the reactor was made (no public call says). */
#include "fiber/executor.h"

/* ---- the clock --------------------------------------------------------------------------- */

static void test_time_now_monotonic(void **state)
{
    (void)state;
    int64_t prev = moor_now();
    assert_true(prev >= 0);
    for (int i = 0; i < 200000; i++) {
        int64_t now = moor_now();
        assert_true(now >= prev);
        prev = now;
    }
    /* Over a real pause the clock moves at least as far as the pause. */
    int64_t before = moor_now();
    struct timespec ts = {0, 20 * 1000 * 1000};
    while (nanosleep(&ts, &ts) != 0)
        ;
    assert_true(moor_now() >= before + 20);
}

static void test_time_deadline_in(void **state)
{
    (void)state;
    assert_int_equal(moor_deadline_in(-1), -1);
    assert_int_equal(moor_deadline_in(-1000), -1);
    assert_int_equal(moor_deadline_in(INT32_MIN), -1);
    int64_t before = moor_now();
    int64_t d0 = moor_deadline_in(0);
    int64_t d = moor_deadline_in(1500);
    assert_true(d0 >= before);
    assert_true(d >= before + 1500);
    assert_true(d <= moor_now() + 1500);
}

/* ---- sleeping ---------------------------------------------------------------------------- */

static intptr_t sleep_fiber(void *arg)
{
    int64_t ms = (int64_t)(intptr_t)arg;
    int64_t deadline = moor_deadline_in(ms);
    FCHECK(moor_sleep(deadline) == 0);
    FCHECK(moor_now() >= deadline);
    /* A deadline that has passed returns at once, and still 0. */
    FCHECK(moor_sleep(moor_now() - 5) == 0);
    FCHECK(moor_sleep(0) == 0);
    return 0;
}

static void test_time_sleep_from_fiber(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_fiber *f[3];
    static const int ms[3] = {60, 10, 30};
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_spawn(&f[i], sleep_fiber, (void *)(intptr_t)ms[i], NULL), 0);
    for (int i = 0; i < 3; i++) {
        intptr_t r = -1;
        assert_int_equal(moor_join(f[i], &r), 0);
        assert_int_equal(r, 0);
    }
    ex_free(ex);
}

static int ticks;

static intptr_t ticker(void *arg)
{
    int n = (int)(intptr_t)arg;
    for (int i = 0; i < n; i++) {
        int rc = moor_sleep(moor_deadline_in(2));
        if (rc == -ECANCELED)
            return rc;
        FCHECK(rc == 0);
        ticks++;
    }
    return 0;
}

static void test_time_sleep_from_plain_code(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int64_t deadline = moor_deadline_in(50);
    assert_int_equal(moor_sleep(deadline), 0);
    assert_true(moor_now() >= deadline);

    /* Other fibers run while plain code sleeps, and stay where they are when it returns. */
    ticks = 0;
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, ticker, (void *)(intptr_t)1000000, NULL), 0);
    deadline = moor_deadline_in(60);
    assert_int_equal(moor_sleep(deadline), 0);
    assert_true(moor_now() >= deadline);
    assert_true(ticks > 0);
    moor_cancel(f);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, -ECANCELED); /* the ticker saw its sleep cancelled */

    assert_int_equal(moor_sleep(moor_now() - 1), 0); /* passed: at once */
    ex_free(ex);
}

/* A fiber cancelled in its sleep gets -ECANCELED and its timer leaves the heap. */
static intptr_t long_sleeper(void *arg)
{
    int64_t *deadline = arg;
    return moor_sleep(*deadline);
}

static void test_time_sleep_cancelled(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int64_t deadline = moor_deadline_in(60 * 1000);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, long_sleeper, &deadline, NULL), 0);
    assert_int_equal(moor_sleep(moor_now()), 0); /* runs what is queued: f starts sleeping */
    assert_int_equal(ex_stats(ex).timers, 1);
    moor_cancel(f);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, -ECANCELED);
    assert_int_equal(ex_stats(ex).timers, 0);
    assert_true(moor_now() < deadline);
    ex_free(ex);
}

/* ---- many timers: they fire in deadline order, ties first-come first-served -------------- */

#define ORDER_N FIBER_COUNT(10000, 2000) /* all alive at once */
#define ORDER_SPREAD_MS 200 /* deadlines within this much of the base */
/* From opening the gate to the base: the time the woken sleepers have for their first polls.
 * Under valgrind those take tens of times longer. */
#define ORDER_MARGIN_MS (UNDER_VALGRIND ? 2000 : 100)

/* Each fiber waits at a gate until every fiber has been spawned and has parked, so that the
 * base of the deadlines can be taken after the slow part (mapping 10,000 stacks). */
typedef struct gate_future {
    moor_future base;
    size_t i;
} gate_future;

typedef struct order_state {
    int open;
    int64_t base;
    int delay[ORDER_N];
    moor_waker gate[ORDER_N];
    int queued[ORDER_N];  /* its sleep went into the timer heap (white-box: node.seq set) */
    int order[ORDER_N];   /* fiber indexes in the order they woke */
    size_t nwoken;
} order_state;

static order_state *os;

static moor_poll gate_poll(moor_future *fut, moor_cx *cx)
{
    gate_future *g = moor_container_of(fut, gate_future, base);
    if (os->open) {
        fut->result = 0;
        return MOOR_READY;
    }
    os->gate[g->i] = cx->waker;
    return MOOR_PENDING;
}

static const moor_future_ops gate_ops = {"gate", gate_poll, NULL};

static intptr_t order_sleeper(void *arg)
{
    size_t i = (size_t)(uintptr_t)arg;
    gate_future g;
    moor_future_init(&g.base, &gate_ops, 0);
    g.i = i;
    FCHECK(moor_await(&g.base) == 0);

    int64_t deadline = os->base + os->delay[i];
    moor_sleep_future sf;
    moor_sleep_init(&sf, deadline);
    sf.deadline.seq = UINT64_MAX; /* the heap gives every node it takes a real sequence number */
    FCHECK(moor_await(&sf.base) == 0);
    FCHECK(moor_now() >= deadline);
    os->queued[i] = sf.deadline.seq != UINT64_MAX;
    os->order[os->nwoken++] = (int)i;
    return 0;
}

static intptr_t order_opener(void *arg)
{
    (void)arg;
    os->base = moor_now() + ORDER_MARGIN_MS;
    os->open = 1;
    for (size_t i = 0; i < ORDER_N; i++) /* in spawn order: that is their arrival order */
        moor_waker_wake(&os->gate[i]);
    return 0;
}

static int key_before(int a, int b)
{
    return os->delay[a] < os->delay[b] || (os->delay[a] == os->delay[b] && a < b);
}

static void test_time_many_sleepers_wake_in_deadline_order(void **state)
{
    (void)state;
    os = calloc(1, sizeof *os);
    assert_non_null(os);
    /* Every delay ORDER_N / ORDER_SPREAD_MS times (ties), shuffled with a fixed seed. */
    for (int i = 0; i < ORDER_N; i++)
        os->delay[i] = i % ORDER_SPREAD_MS;
    uint64_t x = 0x9e3779b97f4a7c15u;
    for (int i = ORDER_N - 1; i > 0; i--) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        int j = (int)(x % (uint64_t)(i + 1));
        int t = os->delay[i];
        os->delay[i] = os->delay[j];
        os->delay[j] = t;
    }

    moor_executor *ex;
    moor_executor_attr attr = {.stack_size = 64 * 1024};
    ex = ex_new_attr(&attr);
    static moor_fiber *f[ORDER_N];
    for (size_t i = 0; i < ORDER_N; i++)
        assert_int_equal(moor_spawn(&f[i], order_sleeper, (void *)(uintptr_t)i, NULL), 0);
    moor_fiber *opener;
    assert_int_equal(moor_spawn(&opener, order_opener, NULL, NULL), 0);
    assert_int_equal(moor_join(opener, NULL), 0);
    for (size_t i = 0; i < ORDER_N; i++) {
        intptr_t r = -1;
        assert_int_equal(moor_join(f[i], &r), 0);
        assert_int_equal(r, 0);
    }
    assert_int_equal(os->nwoken, ORDER_N);
    ex_free(ex);

    /* A sleeper that found its deadline already passed on its first poll returns at once,
     * whatever the heap holds; the order is a promise about the timers that were queued. On
     * any ordinary machine all of them are (10,000 first polls take far less than the
     * margin); at least most of them must be, or the test proves little. */
    size_t nqueued = 0;
    int prev = -1;
    for (size_t k = 0; k < ORDER_N; k++) {
        int i = os->order[k];
        if (!os->queued[i])
            continue;
        nqueued++;
        if (prev >= 0 && !key_before(prev, i))
            fail_msg("fiber %d (delay %d ms) woke after fiber %d (delay %d ms)", i,
                     os->delay[i], prev, os->delay[prev]);
        prev = i;
    }
    if (nqueued < ORDER_N)
        print_message("note: %zu of %d sleepers found their deadline passed at first poll\n",
                      ORDER_N - nqueued, ORDER_N);
    assert_true(nqueued >= ORDER_N / 2);
    free(os);
    os = NULL;
}

/* ---- the sleep future as a plain task ---------------------------------------------------- */

static void test_time_sleep_future_as_task(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_sleep_future sf;
    int64_t deadline = moor_deadline_in(40);
    moor_sleep_init(&sf, deadline);
    assert_false(moor_future_done(&sf.base));
    assert_int_equal(moor_spawn_future(&sf.base), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_true(moor_future_done(&sf.base));
    assert_int_equal(sf.base.result, 0);
    assert_true(moor_now() >= deadline);

    /* And awaited by moor_block_on. */
    moor_sleep_future sf2;
    deadline = moor_deadline_in(30);
    moor_sleep_init(&sf2, deadline);
    assert_int_equal(moor_block_on(&sf2.base), 0);
    assert_true(moor_now() >= deadline);
    ex_free(ex);
}

/* A sleep inside a task of its own that counts how often it is polled. */
typedef struct counted_sleep {
    moor_future base;
    moor_sleep_future inner;
    int polls;
    int dropped;       /* the inner sleep was cancelled: finish without it */
    moor_waker waker;  /* the task's, from its last poll */
} counted_sleep;

static moor_poll counted_poll(moor_future *fut, moor_cx *cx)
{
    counted_sleep *c = moor_container_of(fut, counted_sleep, base);
    c->polls++;
    c->waker = cx->waker;
    if (c->dropped) {
        fut->result = -ECANCELED;
        return MOOR_READY;
    }
    if (moor_future_poll(&c->inner.base, cx) == MOOR_READY) {
        fut->result = c->inner.base.result;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static moor_poll counted_cancel(moor_future *fut)
{
    counted_sleep *c = moor_container_of(fut, counted_sleep, base);
    if (moor_future_cancel(&c->inner.base) == MOOR_READY) {
        fut->result = c->inner.base.result;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static const moor_future_ops counted_ops = {"counted sleep", counted_poll, counted_cancel};

static void test_time_sleep_future_polled_twice(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    counted_sleep c;
    memset(&c, 0, sizeof c);
    moor_future_init(&c.base, &counted_ops, 0);
    int64_t deadline = moor_deadline_in(40);
    moor_sleep_init(&c.inner, deadline);
    assert_int_equal(moor_spawn_future(&c.base), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_true(moor_future_done(&c.base));
    assert_int_equal(c.base.result, 0);
    assert_true(moor_now() >= deadline);
    /* Once pending, once ready: the timer woke it exactly once. */
    assert_int_equal(c.polls, 2);
    ex_free(ex);
}

static void test_time_sleep_future_cancel(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    counted_sleep c;
    memset(&c, 0, sizeof c);
    moor_future_init(&c.base, &counted_ops, 0);
    int64_t deadline = moor_deadline_in(80);
    moor_sleep_init(&c.inner, deadline);
    assert_int_equal(moor_spawn_future(&c.base), 0);

    assert_int_equal(moor_sleep(moor_deadline_in(5)), 0); /* the task polls once: pending */
    assert_int_equal(c.polls, 1);
    assert_false(moor_future_done(&c.inner.base));
    assert_int_equal(ex_stats(ex).timers, 1);

    assert_int_equal(moor_future_cancel(&c.inner.base), MOOR_PENDING);
    assert_int_equal(ex_stats(ex).timers, 0);
    assert_int_equal(moor_future_cancel(&c.inner.base), MOOR_PENDING); /* idempotent */

    /* Well past its deadline: nothing wakes the task, the sleep never completes. */
    int64_t after = deadline + 60;
    assert_int_equal(moor_sleep(after), 0);
    assert_true(moor_now() >= after);
    assert_int_equal(c.polls, 1);
    assert_false(moor_future_done(&c.inner.base));

    /* A spawned task cannot be dropped from outside: finish it through its own waker. */
    c.dropped = 1;
    moor_waker_wake(&c.waker);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(c.polls, 2);
    assert_int_equal(c.base.result, -ECANCELED);
    ex_free(ex);
}

/* A sleep polled once (pending, its timer queued) whose deadline then passes with nothing
 * run: no timer has fired, nobody polled it, so it has not completed. Cancelled now, it is
 * as if freshly initialised (moor_future_cancel's contract): the cancel says MOOR_PENDING,
 * it is not done, its timer is gone; and awaited afterwards it completes at once with 0. */
static void test_time_sleep_cancel_past_deadline(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    counted_sleep c;
    memset(&c, 0, sizeof c);
    moor_future_init(&c.base, &counted_ops, 0);
    int64_t deadline = moor_deadline_in(WAIT_MS);
    moor_sleep_init(&c.inner, deadline);
    assert_int_equal(moor_spawn_future(&c.base), 0);
    settle(); /* the task polls once: pending */
    assert_int_equal(c.polls, 1);
    assert_false(moor_future_done(&c.inner.base));
    assert_int_equal(ex_stats(ex).timers, 1);

    while (moor_now() < deadline)
        ; /* plain code runs nothing: the timer is due, but does not fire */
    assert_int_equal(moor_future_cancel(&c.inner.base), MOOR_PENDING);
    assert_false(moor_future_done(&c.inner.base));
    assert_int_equal(ex_stats(ex).timers, 0);
    assert_int_equal(c.polls, 1);

    /* Fresh: it may be awaited again, and its time has come. */
    assert_int_equal(moor_block_on(&c.inner.base), 0);
    assert_true(moor_future_done(&c.inner.base));

    /* Finish the task, which let go of its sleep, through its own waker. */
    c.dropped = 1;
    moor_waker_wake(&c.waker);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(c.polls, 2);
    assert_int_equal(c.base.result, -ECANCELED);
    ex_free(ex);
}

/* ---- timers without an event loop -------------------------------------------------------- */

static void test_time_plain_driver_has_no_loop(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int64_t deadline = moor_deadline_in(20);
    assert_int_equal(moor_sleep(deadline), 0);
    assert_true(moor_now() >= deadline);

    moor_fiber *f[4];
    static const int ms[4] = {25, 5, 15, 1};
    for (int i = 0; i < 4; i++)
        assert_int_equal(moor_spawn(&f[i], sleep_fiber, (void *)(intptr_t)ms[i], NULL), 0);
    for (int i = 0; i < 4; i++) {
        intptr_t r = -1;
        assert_int_equal(moor_join(f[i], &r), 0);
        assert_int_equal(r, 0);
    }
    moor_sleep_future sf;
    moor_sleep_init(&sf, moor_deadline_in(10));
    assert_int_equal(moor_spawn_future(&sf.base), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(sf.base.result, 0);

    /* White-box: nothing above needed libev; timers ran on the condition-variable driver. */
    assert_null(moor__part_get(ex, MOOR__PART_REACTOR));
    ex_free(ex);
}

/* ---- deadlines near INT64_MAX ---------------------------------------------------------- */

static void test_time_deadline_in_saturates(void **state)
{
    (void)state;
    assert_int_equal(moor_deadline_in(INT64_MAX), INT64_MAX);
    assert_int_equal(moor_deadline_in(INT64_MAX - 1), INT64_MAX);
    assert_int_equal(moor_deadline_in(INT64_MAX - moor_now() / 2), INT64_MAX);
    assert_true(moor_deadline_in(0) >= 0);
    assert_int_equal(moor_deadline_in(-5), -1);
}

/* A sleep until (nearly) the end of time waits like a sleep with no deadline, and is
 * cancelled like one; a past deadline is done at once, even in a cancelled fiber. */
static intptr_t far_sleeper(void *arg)
{
    return moor_sleep(*(const int64_t *)arg); /* only the cancel ends it */
}

typedef struct past_sleep {
    int rc_past, rc_zero, rc_far;
} past_sleep;

static intptr_t sleep_in_cancelled(void *arg)
{
    past_sleep *p = arg;
    while (!moor_cancelled())
        moor_yield();
    p->rc_past = moor_sleep(moor_now() - 1000);
    p->rc_zero = moor_sleep(0);
    p->rc_far = moor_sleep(INT64_MAX);
    return 0;
}

static void test_time_extreme_deadlines(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    const int64_t far[] = {INT64_MAX, INT64_MAX - 1, moor_deadline_in(INT64_MAX)};
    for (size_t i = 0; i < sizeof far / sizeof far[0]; i++) {
        moor_fiber *f;
        assert_int_equal(moor_spawn(&f, far_sleeper, (void *)&far[i], NULL), 0);
        /* Let it start sleeping; its timer must not have fired. */
        assert_int_equal(moor_sleep(moor_deadline_in(5)), 0);
        assert_int_equal(ex_stats(ex).timers, 1);
        moor_cancel(f);
        intptr_t r = -1;
        assert_int_equal(moor_join(f, &r), -ECANCELED);
        assert_int_equal(r, -ECANCELED);
        assert_int_equal(ex_stats(ex).timers, 0);
    }
    past_sleep p = {1, 1, 1};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, sleep_in_cancelled, &p, NULL), 0);
    moor_cancel(f);
    assert_int_equal(moor_join(f, NULL), -ECANCELED);
    assert_int_equal(p.rc_past, 0);
    assert_int_equal(p.rc_zero, 0);
    assert_int_equal(p.rc_far, -ECANCELED);
    ex_free(ex);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        TEST(test_time_now_monotonic),
        TEST(test_time_deadline_in),
        TEST(test_time_sleep_from_fiber),
        TEST(test_time_sleep_from_plain_code),
        TEST(test_time_sleep_cancelled),
        TEST(test_time_many_sleepers_wake_in_deadline_order),
        TEST(test_time_sleep_future_as_task),
        TEST(test_time_sleep_future_polled_twice),
        TEST(test_time_sleep_future_cancel),
        TEST(test_time_sleep_cancel_past_deadline),
        TEST(test_time_plain_driver_has_no_loop),
        TEST(test_time_deadline_in_saturates),
        TEST(test_time_extreme_deadlines),
    };
    return RUN_TESTS(tests);
}
