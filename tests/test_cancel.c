/* Cancelling a fiber: a waiting fiber's wait fails with -ECANCELED (and so does every wait
 * after it), a value its wait had already received is kept, a fiber cancelled before it ran
 * or after it returned, moor_join_deadline cancelling at its deadline, and a cancelled fiber
 * awaiting one that has returned.
 *
 * Fibers record what they see (FCHECK, fixture.h); the test function asserts once they are
 * joined. Timing is asserted only as a lower bound. */
#include <errno.h>
#include <string.h>

#include "moor.h"

#include "fixture.h"

/* ---- cancellation ------------------------------------------------------------------------ */

/* PENDING until cancelled; counts polls and cancels. With `completed` set, its cancel op
 * reports that it had in fact completed (a value handed over just before the cancel). */
typedef struct stuck {
    moor_future fut;
    int polls, cancels, completed;
} stuck;

static moor_poll stuck_poll(moor_future *self, moor_cx *cx)
{
    (void)cx;
    moor_container_of(self, stuck, fut)->polls++;
    return MOOR_PENDING;
}

static moor_poll stuck_cancel(moor_future *self)
{
    stuck *s = moor_container_of(self, stuck, fut);
    s->cancels++;
    if (s->completed) {
        self->result = 99;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static const moor_future_ops stuck_ops = {"stuck", stuck_poll, stuck_cancel};

static void stuck_init(stuck *s, int completed)
{
    memset(s, 0, sizeof *s);
    moor_future_init(&s->fut, &stuck_ops, 0);
    s->completed = completed;
}

struct victim {
    stuck first, second;
    intptr_t first_out, second_out;
    int cancelled_seen;
    intptr_t child_result;
    int child_rc;
};

static intptr_t victim_fn(void *arg)
{
    struct victim *v = arg;
    v->first_out = moor_await(&v->first.fut);
    v->cancelled_seen = moor_cancelled();
    v->second_out = moor_await(&v->second.fut); /* a wait after the cancel */
    /* Reaping a child still works in a cancelled fiber. */
    moor_fiber *child;
    if (moor_spawn(&child, yield_n, (void *)10, NULL) == 0)
        v->child_rc = moor_join(child, &v->child_result);
    return 7;
}

struct canceller {
    moor_fiber *target;
    const stuck *wait_for; /* cancel once this has been polled */
};

static intptr_t canceller_fn(void *arg)
{
    struct canceller *c = arg;
    for (int i = 0; i < 100 && c->wait_for->polls == 0; i++)
        moor_yield();
    moor_cancel(c->target);
    moor_cancel(c->target); /* idempotent */
    return moor_cancelled();
}

static void test_cancel_waiting_fiber(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    assert_int_equal(moor_cancelled(), 0); /* plain code */
    struct victim v;
    memset(&v, 0, sizeof v);
    stuck_init(&v.first, 0);
    stuck_init(&v.second, 0);
    v.child_rc = -1;
    moor_fiber *victim, *canceller;
    assert_int_equal(moor_spawn(&victim, victim_fn, &v, NULL), 0);
    struct canceller c = {victim, &v.first};
    assert_int_equal(moor_spawn(&canceller, canceller_fn, &c, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(victim, &r), -ECANCELED);
    assert_int_equal(r, 7); /* its return value is still there */
    assert_int_equal(moor_join(canceller, &r), 0);
    assert_int_equal(r, 0); /* the canceller was not cancelled itself */

    assert_int_equal(v.first_out, -ECANCELED);
    assert_int_equal(v.first.cancels, 1);
    assert_false(moor_future_done(&v.first.fut));
    assert_int_equal(v.cancelled_seen, 1);
    assert_int_equal(v.second_out, -ECANCELED);
    /* A wait after the cancel is polled once (a result there without waiting would be
     * returned), then cancelled rather than waited for. */
    assert_int_equal(v.second.polls, 1);
    assert_int_equal(v.second.cancels, 1);
    assert_int_equal(v.child_rc, 0);
    assert_int_equal(v.child_result, 10);
    ex_free(ex);
}

static intptr_t await_stuck_fn(void *arg) { return moor_await(arg); }

static void test_cancel_keeps_completed_result(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    stuck s;
    stuck_init(&s, 1);
    moor_fiber *f, *canceller;
    assert_int_equal(moor_spawn(&f, await_stuck_fn, &s.fut, NULL), 0);
    struct canceller c = {f, &s};
    assert_int_equal(moor_spawn(&canceller, canceller_fn, &c, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, 99); /* the wait had completed: its value is not lost */
    assert_int_equal(s.cancels, 1);
    assert_true(moor_future_done(&s.fut));
    assert_int_equal(moor_join(canceller, NULL), 0);
    ex_free(ex);
}

static void test_cancel_before_start_and_after_return(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();

    /* Cancelled before it ever ran: it still runs (to clean up); its first wait fails. */
    stuck s;
    stuck_init(&s, 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, await_stuck_fn, &s.fut, NULL), 0);
    moor_cancel(f);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, -ECANCELED);
    assert_int_equal(s.polls, 1); /* looked at once: it was not ready, so not waited for */

    /* Cancelling a fiber that has returned changes nothing. */
    assert_int_equal(moor_spawn(&f, return_arg, (void *)5, NULL), 0);
    moor_future *done = moor_fiber_future(f);
    assert_int_equal(moor_block_on(done), 5);
    moor_cancel(f);
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 5);
    ex_free(ex);
}

/* ---- bounding a fiber's run ------------------------------------------------------------------
 * A timeout or select over a fiber's future abandons the join, not the fiber;
 * moor_join_deadline cancels the fiber when the deadline passes and reaps it. */

static intptr_t sleep_forever_then(void *arg)
{
    int rc = moor_sleep(-1); /* only a cancel ends it */
    return rc == -ECANCELED ? (intptr_t)arg : -1;
}

static intptr_t join_deadline_in_fiber(void *arg)
{
    moor_fiber *child;
    if (moor_spawn(&child, sleep_forever_then, (void *)8, NULL) != 0)
        return -1;
    /* This fiber is cancelled meanwhile: the child is cancelled with it. */
    (void)arg;
    intptr_t r = 0;
    FCHECK(moor_join_deadline(child, &r, moor_deadline_in(SAFETY_MS)) == -ECANCELED);
    FCHECK(r == 8);
    return 0;
}

static void test_cancel_join_deadline(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();

    /* Returns in time: 0 and its value. */
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, yield_n, (void *)4, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join_deadline(f, &r, moor_deadline_in(30000)), 0);
    assert_int_equal(r, 4);

    /* Out of time: cancelled at the deadline, reaped, its value stored. */
    assert_int_equal(moor_spawn(&f, sleep_forever_then, (void *)6, NULL), 0);
    int64_t start = moor_now();
    r = 0;
    assert_int_equal(moor_join_deadline(f, &r, moor_deadline_in(30)), -ETIMEDOUT);
    assert_true(moor_now() - start >= 30);
    assert_int_equal(r, 6);

    /* A timeout over the fiber's future lets go of the join only: the fiber keeps running. */
    assert_int_equal(moor_spawn(&f, sleep_forever_then, (void *)7, NULL), 0);
    assert_int_equal(moor_await_deadline(moor_fiber_future(f), moor_deadline_in(10)), -ETIMEDOUT);
    assert_int_equal(ex_stats(ex).tasks, 1);
    moor_cancel(f);
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, 7);

    /* A caller cancelled while it waits takes the child down with it. */
    moor_fiber *parent;
    assert_int_equal(moor_spawn(&parent, join_deadline_in_fiber, NULL, NULL), 0);
    assert_int_equal(moor_sleep(moor_deadline_in(5)), 0);
    moor_cancel(parent);
    assert_int_equal(moor_join(parent, &r), -ECANCELED);
    assert_int_equal(r, 0);
    assert_int_equal(ex_stats(ex).tasks, 0);
    ex_free(ex);
}

/* In a cancelled fiber, awaiting a fiber that has already returned gives its value. */
static intptr_t await_returned_child(void *arg)
{
    moor_fiber *child = arg;
    while (!moor_cancelled())
        moor_yield();
    FCHECK(moor_await(moor_fiber_future(child)) == 21);
    intptr_t r = -1;
    FCHECK(moor_join(child, &r) == 0);
    FCHECK(r == 21);
    return 0;
}

static void test_cancel_await_returned_fiber(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_fiber *child, *f;
    assert_int_equal(moor_spawn(&child, return_arg, (void *)21, NULL), 0);
    assert_int_equal(moor_spawn(&f, await_returned_child, child, NULL), 0);
    moor_cancel(f);
    intptr_t r = -1;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, 0);
    ex_free(ex);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_cancel_waiting_fiber),
        TEST(test_cancel_keeps_completed_result),
        TEST(test_cancel_before_start_and_after_return),
        TEST(test_cancel_join_deadline),
        TEST(test_cancel_await_returned_fiber),
    };
    return RUN_TESTS(tests);
}
