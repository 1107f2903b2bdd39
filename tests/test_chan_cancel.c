/* Cancelling a fiber blocked on a channel: its call reports -ECANCELED and leaves no waiter
 * behind; a fiber cancelled before it calls does not wait at all; a value already handed
 * over (or taken) is never lost, whichever of the cancel and the hand-over comes first,
 * also when the hand-over is a blocking call's fast path.
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

/* ---- cancel racing the fast paths ----------------------------------------------------------
 * The same two races, with counterparts that make the blocking calls (moor_chan_send,
 * moor_chan_recv with no deadline): against a waiter that is no select's these hand the
 * value over on their fast path, which completes the waiter without a future poll. The
 * victim (the waiting fiber) waits by call or by future, with a deadline or without; the
 * counterpart is plain code or a fiber; the channel is a rendezvous one or holds one value.
 * Whatever the order of cancel and call, every value is received exactly once, or its send
 * reports failure. One executor and one channel per capacity serve every round, so that a
 * waiter left behind by one round shows in the next. */

#define RACE_ROUNDS (UNDER_VALGRIND ? 256 : 2000)
#define RACE_FILLER 0x7000 /* what fills the ring ahead of a waiting sender */

/* The counterpart: cancels the victim and makes one blocking call, in either order. */
typedef struct racer {
    moor_chan *ch;
    moor_fiber *victim;
    int cancel_first;
    int send;     /* 1: moor_chan_send(value); 0: moor_chan_recv into got */
    int value;
    int got;
    int rc;
    int returned;
} racer;

static void race_call(racer *c)
{
    if (c->cancel_first)
        moor_cancel(c->victim);
    c->rc = c->send ? moor_chan_send(c->ch, &c->value, -1) : moor_chan_recv(c->ch, &c->got, -1);
    if (!c->cancel_first)
        moor_cancel(c->victim);
    c->returned = 1;
}

static intptr_t racer_fn(void *arg)
{
    race_call(arg);
    return 0;
}

typedef struct race_tally {
    int completed; /* rounds in which the value moved */
    int withdrawn; /* rounds in which the cancel took the victim's call back first */
    int cancel_late; /* rounds in which the victim had finished when the cancel came */
} race_tally;

/* One round: `combo` picks who waits, how, and who comes. */
static void cancel_race_round(moor_chan **chans, unsigned combo, int cancel_first, int value,
                              race_tally *tally)
{
    int victim_sends = combo & 1;
    size_t cap = (combo >> 1) & 1;
    int use_future = (combo >> 2) & 1;
    int with_deadline = (combo >> 3) & 1;
    int from_fiber = (combo >> 4) & 1;
    moor_chan *ch = chans[cap];
    if (victim_sends && cap) { /* a full ring: the victim's send waits */
        int filler = RACE_FILLER;
        assert_int_equal(moor_chan_try_send(ch, &filler), 0);
    }
    chan_call v = {.ch = ch, .send = victim_sends, .use_future = use_future,
                   .deadline = with_deadline ? moor_deadline_in(SAFETY_MS) : -1,
                   .value = value, .got = -1, .rc = 1};
    moor_fiber *vf;
    assert_int_equal(moor_spawn(&vf, chan_call_fn, &v, NULL), 0);
    settle();
    assert_false(v.returned); /* it waits */

    racer r = {.ch = ch, .victim = vf, .cancel_first = cancel_first, .send = !victim_sends,
               .value = value, .got = -1, .rc = 1};
    if (from_fiber) {
        moor_fiber *rf;
        assert_int_equal(moor_spawn(&rf, racer_fn, &r, NULL), 0);
        settle();
        if (!r.returned) /* its call found nobody and waits: give it up, it reports failure */
            moor_cancel(rf);
        assert_int_equal(moor_join(rf, NULL), r.returned ? 0 : -ECANCELED);
    } else {
        race_call(&r); /* plain code: if it found nobody, its wait ends in a deadlock report */
    }
    assert_true(r.returned);
    intptr_t vr = 1;
    int jr = moor_join(vf, &vr);
    assert_int_equal(vr, v.rc);
    if (jr == 0) {
        /* The call spent the last of its caller's cooperative budget and yielded: the victim
         * ran to its end before the cancel came, and the cancel found it finished. */
        assert_false(cancel_first);
        tally->cancel_late++;
    } else {
        assert_int_equal(jr, -ECANCELED);
    }

    /* Count the value wherever a receive found it: the counterpart's, the victim's, the ring. */
    int received = 0, fillers = 0;
    int seen[2] = {!r.send && r.rc == 0 ? r.got : -1, !victim_sends && v.rc == 0 ? v.got : -1};
    for (int i = 0; i < 2; i++) {
        received += seen[i] == value;
        fillers += seen[i] == RACE_FILLER;
    }
    int x;
    while (moor_chan_try_recv(ch, &x) == 0) {
        received += x == value;
        fillers += x == RACE_FILLER;
    }
    int send_rc = victim_sends ? v.rc : r.rc;
    int recv_rc = victim_sends ? r.rc : v.rc;
    if (!(send_rc == 0 && received == 1) && !(send_rc < 0 && received == 0))
        fail_msg("combo %u, cancel %s: the send returned %d and the value was received %d "
                 "times (victim rc %d, counterpart rc %d)", combo,
                 cancel_first ? "first" : "after", send_rc, received, v.rc, r.rc);
    assert_int_equal(fillers, victim_sends && cap); /* a filler is neither lost nor doubled */
    if (victim_sends) /* a receive wrote its buffer exactly when it reports success */
        assert_int_equal(recv_rc == 0, r.got == value || r.got == RACE_FILLER);
    else
        assert_int_equal(recv_rc == 0, v.got == value);
    if (!cancel_first) {
        /* The call completed the victim before the cancel: nothing may undo that. */
        assert_int_equal(send_rc, 0);
        assert_int_equal(recv_rc, 0);
        assert_int_equal(v.rc, 0);
    }
    if (send_rc == 0) {
        tally->completed++;
    } else {
        assert_int_equal(v.rc, -ECANCELED);
        tally->withdrawn++;
    }
    /* Nobody is left waiting on the channel. */
    assert_int_equal(moor_chan_len(ch), 0);
    x = 1;
    if (!cap)
        assert_int_equal(moor_chan_try_send(ch, &x), -EAGAIN);
    assert_int_equal(moor_chan_try_recv(ch, &x), -EAGAIN);
}

static void cancel_race(int cancel_first)
{
    moor_executor *ex = ex_new();
    moor_chan *chans[2] = {chan_new(sizeof(int), 0), chan_new(sizeof(int), 1)};
    race_tally tally = {0, 0, 0};
    for (int round = 0; round < RACE_ROUNDS; round++)
        cancel_race_round(chans, (unsigned)round % 32, cancel_first, 10000 + round, &tally);
    assert_int_equal(tally.completed + tally.withdrawn, RACE_ROUNDS);
    if (!cancel_first)
        assert_int_equal(tally.completed, RACE_ROUNDS);
    /* The race was run: in all but the rounds whose call yielded, the cancel came while the
     * victim, completed, had not run yet. */
    assert_true(tally.cancel_late < RACE_ROUNDS / 8);
    moor_chan_free(chans[0]);
    moor_chan_free(chans[1]);
    ex_free(ex);
}

/* The call that completes the victim comes first, the cancel right after it, before the
 * victim has run again: the victim reports success with the value. */
static void test_chan_cancel_never_loses_a_value_fast_path(void **state)
{
    (void)state;
    cancel_race(0);
}

/* The cancel comes first, the call right after it: either the cancel withdrew the victim's
 * call (the counterpart's call fails, nothing moved) or the call completed it (both report
 * success). Never both, never neither. */
static void test_chan_cancel_then_call_loses_nothing_fast_path(void **state)
{
    (void)state;
    cancel_race(1);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_chan_cancel_blocked),
        TEST(test_chan_cancel_before_waiting),
        TEST(test_chan_cancel_never_loses_a_value),
        TEST(test_chan_cancel_then_send_loses_nothing),
        TEST(test_chan_cancel_never_loses_a_value_fast_path),
        TEST(test_chan_cancel_then_call_loses_nothing_fast_path),
    };
    return RUN_TESTS(tests);
}
