/* Promises: a value from a callback on any thread to an awaiter, safe in every order — before
 * and after the await, racing a cancel from another thread, after the awaiter has gone, twice,
 * and around the executor's end. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "fixture.h"

/* The values nobody received, counted by the promises' drop function. Atomic: a resolver on
 * another thread may be the one that drops. */
static long dropped;
static intptr_t last_dropped;

static void count_drop(intptr_t value)
{
    __atomic_fetch_add(&dropped, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&last_dropped, value, __ATOMIC_SEQ_CST);
}

static long dropped_now(void) { return __atomic_load_n(&dropped, __ATOMIC_SEQ_CST); }

static moor_promise *new_promise(void)
{
    moor_promise *p;
    assert_int_equal(moor_promise_new(&p, count_drop), 0);
    return p;
}

typedef struct awaiter {
    moor_promise *p;
    int64_t deadline;
    intptr_t got;
    int done;
} awaiter;

static intptr_t await_fn(void *arg)
{
    awaiter *a = arg;
    a->got = moor_promise_await(a->p, a->deadline);
    a->done = 1;
    return 0;
}

/* ---- orders on one thread ---------------------------------------------------------------- */

static void test_promise_resolved_before_await(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    moor_promise *p = new_promise();
    assert_int_equal(moor_promise_resolve(p, 42), 0);
    awaiter a = {.p = p, .deadline = -1};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, await_fn, &a, NULL), 0);
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(a.got, 42);
    assert_int_equal(dropped_now(), 0); /* received: the awaiter's, not dropped */
    /* And from plain code. */
    p = new_promise();
    assert_int_equal(moor_promise_resolve(p, 7), 0);
    assert_int_equal(moor_promise_await(p, -1), 7);
    ex_free(ex);
}

typedef struct resolver {
    moor_promise *p;
    intptr_t value;
    int delay_ms;
} resolver;

static intptr_t resolve_fn(void *arg)
{
    resolver *r = arg;
    if (r->delay_ms)
        moor_sleep(moor_deadline_in(r->delay_ms));
    return moor_promise_resolve(r->p, r->value);
}

static void test_promise_awaited_then_resolved(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    awaiter a = {.p = new_promise(), .deadline = -1};
    resolver r = {.p = a.p, .value = -EIO, .delay_ms = 10};
    moor_fiber *fa, *fr;
    assert_int_equal(moor_spawn(&fa, await_fn, &a, NULL), 0);
    assert_int_equal(moor_spawn(&fr, resolve_fn, &r, NULL), 0);
    intptr_t rc;
    assert_int_equal(moor_join(fr, &rc), 0);
    assert_int_equal(rc, 0);
    assert_int_equal(moor_join(fa, NULL), 0);
    assert_int_equal(a.got, -EIO); /* an error travels as a negative value */
    assert_int_equal(dropped_now(), 0);
    ex_free(ex);
}

/* A second resolve is refused while the awaiter holds the promise: the first value stands,
 * and the refused one is neither delivered nor dropped. */
static void test_promise_resolved_twice(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    moor_promise *p = new_promise();
    assert_int_equal(moor_promise_resolve(p, 1), 0);
    assert_int_equal(moor_promise_resolve(p, 2), -EALREADY);
    assert_int_equal(moor_promise_await(p, -1), 1);
    assert_int_equal(dropped_now(), 0);
    ex_free(ex);
}

/* The deadline passes: -ETIMEDOUT no earlier than it; the value that comes later has nobody to
 * go to and is dropped exactly once by the resolve, which frees the promise. */
static void test_promise_deadline_then_late_resolve(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    moor_promise *p = new_promise();
    int64_t deadline = moor_deadline_in(WAIT_MS);
    assert_int_equal(moor_promise_await(p, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_int_equal(ex_stats(ex).timers, 0);
    assert_int_equal(dropped_now(), 0);
    assert_int_equal(moor_promise_resolve(p, 99), 0); /* the library's callback, late */
    assert_int_equal(dropped_now(), 1);
    assert_int_equal(last_dropped, 99);
    ex_free(ex);
}

/* ---- the awaiter cancelled and gone, its stack reused, then the callback ----------------- */

static intptr_t scribble(void *arg)
{
    (void)arg;
    volatile char junk[16384];
    memset((char *)junk, 0xa5, sizeof junk); /* over whatever the last fiber left here */
    moor_yield();
    return junk[100];
}

static void test_promise_late_callback_after_awaiter_gone(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    awaiter a = {.p = new_promise(), .deadline = -1};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, await_fn, &a, NULL), 0);
    settle(); /* it waits */
    moor_cancel(f);
    assert_int_equal(moor_join(f, NULL), -ECANCELED);
    assert_int_equal(a.got, -ECANCELED);
    /* Its stack goes back to the pool and is written over by other fibers. */
    for (int i = 0; i < 4; i++) {
        moor_fiber *g;
        assert_int_equal(moor_spawn(&g, scribble, NULL, NULL), 0);
        assert_int_equal(moor_join(g, NULL), 0);
    }
    assert_int_equal(moor_promise_resolve(a.p, 5), 0); /* touches only the promise */
    assert_int_equal(dropped_now(), 1);
    assert_int_equal(last_dropped, 5);
    ex_free(ex);
}

/* ---- other threads ----------------------------------------------------------------------- */

static void *resolve_thread(void *arg)
{
    resolver *r = arg;
    if (r->delay_ms)
        sleep_ms(r->delay_ms);
    r->value = moor_promise_resolve(r->p, r->value);
    return NULL;
}

static void test_promise_resolved_from_another_thread(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    awaiter a = {.p = new_promise(), .deadline = moor_deadline_in(SAFETY_MS)};
    resolver r = {.p = a.p, .value = 123, .delay_ms = 20};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, await_fn, &a, NULL), 0);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, resolve_thread, &r), 0);
    assert_int_equal(moor_join(f, NULL), 0); /* woken by the thread-safe wake */
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(r.value, 0);
    assert_int_equal(a.got, 123);
    assert_int_equal(dropped_now(), 0);
    ex_free(ex);
}

/* A resolve from another thread that lands while the awaiter's first poll is between
 * looking (not resolved yet) and registering its waker must still wake it (found by
 * test_stress as a rare hang: the resolve found no waker, the registration came after it
 * and nothing looked again). Many rounds, the resolver released as the awaiter starts its
 * await; each await has a deadline, so a lost wake shows as an await that lasted until it
 * (the resolver resolves within microseconds) instead of a hang. */
typedef struct race_await {
    moor_promise *p;   /* atomic: published for the resolver */
    int round;         /* atomic: the round the resolver may resolve */
    int stop;          /* atomic */
} race_await;

static void *race_await_resolver(void *arg)
{
    race_await *ra = arg;
    for (int done = 0;;) {
        int r;
        while ((r = __atomic_load_n(&ra->round, __ATOMIC_ACQUIRE)) == done)
            if (__atomic_load_n(&ra->stop, __ATOMIC_ACQUIRE))
                return NULL;
        moor_promise *p = __atomic_load_n(&ra->p, __ATOMIC_ACQUIRE);
        /* A delay that varies from round to round, so that some resolves land inside the
         * awaiter's first poll, whatever its speed. */
        for (volatile int spin = 0; spin < (r * 7) % 400; spin++)
            ;
        FCHECK(moor_promise_resolve(p, r) == 0);
        done = r;
    }
}

static void test_promise_resolve_races_first_poll(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    race_await ra = {0};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, race_await_resolver, &ra), 0);
    int rounds = UNDER_VALGRIND ? 500 : 20000, lost = 0;
    for (int i = 1; i <= rounds && !lost; i++) {
        moor_promise *p = new_promise();
        __atomic_store_n(&ra.p, p, __ATOMIC_RELEASE);
        __atomic_store_n(&ra.round, i, __ATOMIC_RELEASE); /* go */
        /* A lost wake is found by the deadline: the next poll then takes the value, late. */
        int64_t deadline = moor_deadline_in(3000);
        intptr_t r = moor_promise_await(p, deadline);
        if (r != i || moor_now() >= deadline)
            lost = i;
    }
    __atomic_store_n(&ra.stop, 1, __ATOMIC_RELEASE);
    assert_int_equal(pthread_join(t, NULL), 0);
    if (lost)
        fail_msg("round %d: the await returned without the value (a lost wake)", lost);
    assert_int_equal(dropped_now(), 0);
    ex_free(ex);
}

/* A resolve from another thread races the awaiter's cancel, many times, with the two sides
 * released together. Whatever the order, the value is received exactly once or dropped
 * exactly once, never both, never neither, and nothing freed is touched (ASan, TSan). */
typedef struct race {
    moor_promise *p;
    int ready;          /* atomic: the resolver spins, waiting for go */
    int go;             /* atomic: released together */
    intptr_t value;
} race;

static void *race_resolver(void *arg)
{
    race *r = arg;
    __atomic_store_n(&r->ready, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&r->go, __ATOMIC_ACQUIRE))
        ;
    moor_promise_resolve(r->p, r->value);
    return NULL;
}

static void test_promise_resolve_races_cancel(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    int rounds = UNDER_VALGRIND ? 50 : FIBER_COUNT(2000, 300);
    int received = 0, cancelled = 0;
    for (int i = 0; i < rounds; i++) {
        awaiter a = {.p = new_promise(), .deadline = -1};
        race r = {.p = a.p, .value = i + 1};
        moor_fiber *f;
        assert_int_equal(moor_spawn(&f, await_fn, &a, NULL), 0);
        settle(); /* it waits, its waker registered */
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, race_resolver, &r), 0);
        while (!__atomic_load_n(&r.ready, __ATOMIC_ACQUIRE))
            ;
        __atomic_store_n(&r.go, 1, __ATOMIC_RELEASE);
        moor_cancel(f);
        moor_join(f, NULL);
        assert_int_equal(pthread_join(t, NULL), 0);
        if (a.got == i + 1) {
            received++;
        } else {
            assert_int_equal(a.got, -ECANCELED);
            cancelled++;
        }
        assert_int_equal(dropped_now(), cancelled); /* each value lost to a cancel: dropped */
    }
    assert_int_equal(received + cancelled, rounds);
    print_message("%d rounds: %d values received, %d dropped after a cancel\n", rounds, received,
                  cancelled);
    ex_free(ex);
}

/* ---- the future form, in a select -------------------------------------------------------- */

static void test_promise_future_in_select(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    /* The sleep wins: the promise future is cancelled, the awaiter's half dropped, and the
     * value that comes later is dropped with the promise. */
    moor_promise *p = new_promise();
    moor_promise_future pf;
    moor_promise_future_init(&pf, p);
    moor_sleep_future sf;
    moor_sleep_init(&sf, moor_deadline_in(10));
    moor_future *futs[] = {&pf.base, &sf.base};
    assert_int_equal(moor_select(futs, 2, -1), 1);
    assert_false(moor_future_done(&pf.base));
    moor_promise_drop(p);
    assert_int_equal(moor_promise_resolve(p, 8), 0);
    assert_int_equal(dropped_now(), 1);
    /* The promise wins with what was resolved before the select. */
    p = new_promise();
    moor_promise_future_init(&pf, p);
    moor_sleep_init(&sf, moor_deadline_in(SAFETY_MS));
    assert_int_equal(moor_promise_resolve(p, 9), 0);
    assert_int_equal(moor_select(futs, 2, -1), 0);
    assert_int_equal(pf.base.result, 9);
    moor_promise_drop(p); /* received: not dropped */
    assert_int_equal(dropped_now(), 1);
    ex_free(ex);
}

/* Two promise futures of one select, both resolved in one turn while it waits (found by
 * test_stress): the first wins, and the cancel of the other must not take its value too (two
 * completions of one select, the loser's value neither handed back nor dropped). The loser
 * stays pending and its value is dropped with the promise. */
static intptr_t resolve_both(void *arg)
{
    moor_promise **ps = arg;
    moor_yield(); /* the selector has polled both and waits */
    FCHECK(moor_promise_resolve(ps[1], 11) == 0);
    FCHECK(moor_promise_resolve(ps[0], 10) == 0);
    return 0;
}

static intptr_t select_two(void *arg)
{
    moor_promise **ps = arg;
    moor_promise_future pf[2];
    moor_promise_future_init(&pf[0], ps[0]);
    moor_promise_future_init(&pf[1], ps[1]);
    moor_future *futs[] = {&pf[0].base, &pf[1].base};
    intptr_t won = moor_select(futs, 2, -1);
    FCHECK(moor_future_done(&pf[won].base));
    FCHECK(!moor_future_done(&pf[!won].base)); /* exactly one completion */
    intptr_t value = pf[won].base.result;
    moor_promise_drop(ps[0]);
    moor_promise_drop(ps[1]);
    return won * 100 + value;
}

static void test_promise_select_loser_keeps_no_value(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    moor_promise *ps[2] = {new_promise(), new_promise()};
    moor_fiber *selector, *both;
    assert_int_equal(moor_spawn(&selector, select_two, ps, NULL), 0);
    assert_int_equal(moor_spawn(&both, resolve_both, ps, NULL), 0);
    intptr_t r = -1;
    assert_int_equal(moor_join(selector, &r), 0);
    assert_int_equal(moor_join(both, NULL), 0);
    /* Both were resolved before the selector ran again: slot 0 is polled first and wins. */
    assert_int_equal(r, 10);
    assert_int_equal(dropped_now(), 1);
    assert_int_equal(last_dropped, 11);
    ex_free(ex);
}

/* ---- the executor's end ------------------------------------------------------------------- */

/* A library may keep the resolver's half past the executor: its resolve then only frees. */
static void test_promise_resolver_outlives_executor(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dropped = 0;
    moor_promise *p = new_promise();
    assert_int_equal(moor_promise_await(p, moor_deadline_in(1)), -ETIMEDOUT);
    ex_free(ex);
    resolver r = {.p = p, .value = 77};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, resolve_thread, &r), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(r.value, 0);
    assert_int_equal(dropped_now(), 1);
    assert_int_equal(last_dropped, 77);
}

/* The awaiter's half must not outlive the executor: freeing the executor while one is held
 * fails an assertion that says so. */
static void free_with_held_promise(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_promise *p;
    CHILD_REQUIRE(moor_promise_new(&p, NULL) == 0);
    moor_executor_free(ex);
}

static void test_promise_executor_freed_with_awaiter_half(void **state)
{
    (void)state;
    child_report r;
    child_run(free_with_held_promise, NULL, &r);
    expect_child_signal(&r, SIGABRT, "promise(s) still held by their awaiter");
}

/* Awaiting from a thread that is not the promise's executor's is misuse. */
static void *await_elsewhere(void *arg)
{
    moor_executor *ex;
    if (moor_executor_new(&ex, NULL) != 0)
        return NULL;
    moor_promise_await(arg, -1);
    return NULL;
}

static void await_from_other_thread(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_promise *p;
    CHILD_REQUIRE(moor_promise_new(&p, NULL) == 0);
    pthread_t t;
    CHILD_REQUIRE(pthread_create(&t, NULL, await_elsewhere, p) == 0);
    pthread_join(t, NULL);
}

static void test_promise_awaited_from_another_thread(void **state)
{
    (void)state;
    child_report r;
    child_run(await_from_other_thread, NULL, &r);
    expect_child_signal(&r, SIGABRT, "promise awaited from another thread");
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_promise_resolved_before_await),
        TEST(test_promise_awaited_then_resolved),
        TEST(test_promise_resolved_twice),
        TEST(test_promise_deadline_then_late_resolve),
        TEST(test_promise_late_callback_after_awaiter_gone),
        TEST(test_promise_resolved_from_another_thread),
        TEST(test_promise_resolve_races_cancel),
        TEST(test_promise_future_in_select),
        TEST(test_promise_select_loser_keeps_no_value),
        TEST(test_promise_resolver_outlives_executor),
        TEST(test_promise_executor_freed_with_awaiter_half),
        TEST(test_promise_awaited_from_another_thread),
        TEST(test_promise_resolve_races_first_poll),
    };
    return RUN_TESTS(tests);
}
