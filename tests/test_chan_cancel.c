/* Cancelling a fiber blocked on a channel: its call reports -ECANCELED and leaves no waiter
 * behind; a fiber cancelled before it calls does not wait at all; a value already handed
 * over (or taken) is never lost, whichever of the cancel and the hand-over comes first.
 *
 * Checks inside fibers are FCHECKs (fixture.h). */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "moor.h"

#include "fixture.h"

/* ---- cancellation ------------------------------------------------------------------------- */

/* Cancel every fiber of `calls` (all waiting), join them: each reports -ECANCELED. */
static void cancel_and_join_all(chan_call *calls, moor_fiber **f, int n)
{
    for (int i = 0; i < n; i++) {
        assert_false(calls[i].returned); /* it is waiting */
        moor_cancel(f[i]);
        moor_cancel(f[i]); /* idempotent */
    }
    for (int i = 0; i < n; i++) {
        intptr_t r = 0;
        assert_int_equal(moor_join(f[i], &r), -ECANCELED);
        assert_int_equal(r, -ECANCELED);
        assert_int_equal(calls[i].rc, -ECANCELED);
        assert_int_equal(calls[i].got, -1);
    }
}

static void test_chan_cancel_blocked(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *rv = chan_new(sizeof(int), 0);
    moor_chan *full = chan_new(sizeof(int), 2);
    for (int i = 0; i < 2; i++)
        assert_int_equal(moor_chan_try_send(full, &i), 0);
    enum { N = 4 };
    chan_call calls[N];
    moor_fiber *f[N];
    int v;

    /* Receivers on the rendezvous channel: by call and by future, with and without a
     * deadline. Cancelled, they leave no receiver behind: a send finds nobody. */
    for (int i = 0; i < N; i++) {
        calls[i] = (chan_call){.ch = rv, .use_future = i % 2,
                               .deadline = i < 2 ? -1 : moor_deadline_in(SAFETY_MS), .got = -1};
        assert_int_equal(moor_spawn(&f[i], chan_call_fn, &calls[i], NULL), 0);
    }
    settle();
    cancel_and_join_all(calls, f, N);
    v = 1;
    assert_int_equal(moor_chan_try_send(rv, &v), -EAGAIN);

    /* Senders on the rendezvous channel: no sender left behind, a receive finds nobody. */
    for (int i = 0; i < N; i++) {
        calls[i] = (chan_call){.ch = rv, .send = 1, .use_future = i % 2,
                               .deadline = i < 2 ? -1 : moor_deadline_in(SAFETY_MS),
                               .value = 500 + i, .got = -1};
        assert_int_equal(moor_spawn(&f[i], chan_call_fn, &calls[i], NULL), 0);
    }
    settle();
    cancel_and_join_all(calls, f, N);
    assert_int_equal(moor_chan_try_recv(rv, &v), -EAGAIN);

    /* Senders on a full buffered channel: draining it does not pull in their values. */
    for (int i = 0; i < N; i++) {
        calls[i] = (chan_call){.ch = full, .send = 1, .use_future = i % 2,
                               .deadline = i < 2 ? -1 : moor_deadline_in(SAFETY_MS),
                               .value = 600 + i, .got = -1};
        assert_int_equal(moor_spawn(&f[i], chan_call_fn, &calls[i], NULL), 0);
    }
    settle();
    cancel_and_join_all(calls, f, N);
    assert_int_equal(moor_chan_len(full), 2);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(moor_chan_try_recv(full, &v), 0);
        assert_int_equal(v, i);
    }
    assert_int_equal(moor_chan_try_recv(full, &v), -EAGAIN);
    assert_int_equal(moor_chan_len(full), 0);

    /* A later waiter on the same channel is served normally. */
    chan_call later = {.ch = rv, .deadline = -1, .got = -1};
    moor_fiber *lf;
    assert_int_equal(moor_spawn(&lf, chan_call_fn, &later, NULL), 0);
    settle();
    v = 808;
    assert_int_equal(moor_chan_try_send(rv, &v), 0);
    assert_int_equal(moor_join(lf, NULL), 0);
    assert_int_equal(later.got, 808);

    moor_chan_free(rv);
    moor_chan_free(full);
    ex_free(ex);
}

/* A fiber cancelled before it gets to a call that has to wait does not wait at all. */
static intptr_t cancelled_early_fn(void *arg)
{
    chan_call *c = arg;
    FCHECK(moor_cancelled());
    return chan_call_fn(c);
}

static void test_chan_cancel_before_waiting(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch = chan_new(sizeof(int), 0);
    for (int fut = 0; fut < 2; fut++) {
        for (int send = 0; send < 2; send++) {
            chan_call c = {.ch = ch, .send = send, .use_future = fut, .deadline = -1, .got = -1};
            moor_fiber *f;
            assert_int_equal(moor_spawn(&f, cancelled_early_fn, &c, NULL), 0);
            moor_cancel(f); /* before it has run */
            intptr_t r = 0;
            assert_int_equal(moor_join(f, &r), -ECANCELED);
            assert_int_equal(r, -ECANCELED);
        }
    }
    int v = 0;
    assert_int_equal(moor_chan_try_send(ch, &v), -EAGAIN);
    assert_int_equal(moor_chan_try_recv(ch, &v), -EAGAIN);
    moor_chan_free(ch);
    ex_free(ex);
}

/* A waiter that has been handed its value (or whose value has been taken) and is cancelled
 * before it runs again still reports success: the value moved and is not lost. */
static void test_chan_cancel_never_loses_a_value(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    for (int fut = 0; fut < 2; fut++) {
        for (int dl = 0; dl < 2; dl++) {
            int64_t deadline = dl ? moor_deadline_in(SAFETY_MS) : -1;

            /* A receiver on a rendezvous channel. */
            moor_chan *ch = chan_new(sizeof(int), 0);
            chan_call rcall = {.ch = ch, .use_future = fut, .deadline = deadline, .got = -1};
            moor_fiber *f;
            assert_int_equal(moor_spawn(&f, chan_call_fn, &rcall, NULL), 0);
            settle();
            int v = 4242;
            assert_int_equal(moor_chan_try_send(ch, &v), 0);
            moor_cancel(f); /* right after the send that completed it */
            intptr_t r = -1;
            assert_int_equal(moor_join(f, &r), -ECANCELED);
            assert_int_equal(r, 0);
            assert_int_equal(rcall.got, 4242);

            /* A sender on a rendezvous channel. */
            chan_call scall = {.ch = ch, .send = 1, .use_future = fut, .deadline = deadline,
                            .value = 777};
            assert_int_equal(moor_spawn(&f, chan_call_fn, &scall, NULL), 0);
            settle();
            v = 0;
            assert_int_equal(moor_chan_try_recv(ch, &v), 0);
            assert_int_equal(v, 777);
            moor_cancel(f);
            assert_int_equal(moor_join(f, &r), -ECANCELED);
            assert_int_equal(r, 0);
            moor_chan_free(ch);

            /* A sender on a full buffered channel whose value a receive moved into the ring. */
            ch = chan_new(sizeof(int), 1);
            v = 1;
            assert_int_equal(moor_chan_try_send(ch, &v), 0);
            scall = (chan_call){.ch = ch, .send = 1, .use_future = fut, .deadline = deadline,
                             .value = 2};
            assert_int_equal(moor_spawn(&f, chan_call_fn, &scall, NULL), 0);
            settle();
            assert_int_equal(moor_chan_try_recv(ch, &v), 0);
            assert_int_equal(v, 1);
            moor_cancel(f);
            assert_int_equal(moor_join(f, &r), -ECANCELED);
            assert_int_equal(r, 0);
            assert_int_equal(moor_chan_len(ch), 1);
            assert_int_equal(moor_chan_try_recv(ch, &v), 0);
            assert_int_equal(v, 2);
            moor_chan_free(ch);
        }
    }
    ex_free(ex);
}

/* moor_cancel first, a send right after it, before the cancelled receiver has run: either the
 * cancel withdrew the receive (the send finds nobody) or the send completed it (the receiver
 * reports the value). Never both, never neither. */
static void test_chan_cancel_then_send_loses_nothing(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch = chan_new(sizeof(int), 0);
    chan_call rcall = {.ch = ch, .deadline = -1, .got = -1};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, chan_call_fn, &rcall, NULL), 0);
    settle();
    moor_cancel(f);
    int v = 99;
    int src = moor_chan_try_send(ch, &v);
    intptr_t r = 1;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    if (src == 0) {
        assert_int_equal(r, 0);
        assert_int_equal(rcall.got, 99);
    } else {
        assert_int_equal(src, -EAGAIN);
        assert_int_equal(r, -ECANCELED);
        assert_int_equal(rcall.got, -1);
    }
    assert_int_equal(moor_chan_try_send(ch, &v), -EAGAIN);
    moor_chan_free(ch);
    ex_free(ex);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_chan_cancel_blocked),
        TEST(test_chan_cancel_before_waiting),
        TEST(test_chan_cancel_never_loses_a_value),
        TEST(test_chan_cancel_then_send_loses_nothing),
    };
    return RUN_TESTS(tests);
}
