/* Select and the combinators: one winner out of 1,000 channel operations with the losers
 * cancelled cleanly, deadlines, never two values taken, a sleep against a channel, race,
 * timeout, join_all, retry (awaited, block_on'd and spawned as a plain task),
 * cancellation of a fiber waiting in a select, a select's lost waiter ahead of a plain one,
 * and a receive future whose waker is not a fiber's.
 *
 * Checks inside fibers are FCHECKs (fixture.h). Timing is asserted only as a lower bound. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moor.h"

#include "fixture.h"

/* ---- scaffolding of this file (the shared fixture is in fixture.h) ---------------------- */

/* A hand-written future: PENDING for `pending` polls (waking itself each time), then READY
 * with `value`. Counts its polls and cancels. */
typedef struct val_future {
    moor_future base;
    int pending;
    intptr_t value;
    int polls;
    int cancels;
} val_future;

static moor_poll val_poll(moor_future *fut, moor_cx *cx)
{
    val_future *v = moor_container_of(fut, val_future, base);
    v->polls++;
    if (v->pending > 0) {
        v->pending--;
        moor_waker_wake(&cx->waker);
        return MOOR_PENDING;
    }
    fut->result = v->value;
    return MOOR_READY;
}

static moor_poll val_cancel(moor_future *fut)
{
    moor_container_of(fut, val_future, base)->cancels++;
    return MOOR_PENDING;
}

static const moor_future_ops val_ops = {"value", val_poll, val_cancel};

static void val_init(val_future *v, int pending, intptr_t value)
{
    moor_future_init(&v->base, &val_ops, 0);
    v->pending = pending;
    v->value = value;
    v->polls = 0;
    v->cancels = 0;
}

/* A sender fiber: yields `yields` times, then sends `value` on `ch`. */
typedef struct send_arg {
    moor_chan *ch;
    int value;
    int yields;
    int rc;
    int returned;
} send_arg;

static intptr_t sender_fn(void *arg)
{
    send_arg *s = arg;
    for (int i = 0; i < s->yields; i++)
        moor_yield();
    s->rc = moor_chan_send(s->ch, &s->value, moor_deadline_in(SAFETY_MS));
    s->returned = 1;
    return s->rc;
}

/* ---- one of 1,000 ------------------------------------------------------------------------- */

#define NSEL 1000

typedef struct sel_ctx {
    moor_chan *ch[NSEL];
    moor_chan_future ops[NSEL];
    moor_future *futs[NSEL];
    int vals[NSEL];
    int rc;
    int64_t deadline;
} sel_ctx;

static sel_ctx *sel_new(size_t cap)
{
    sel_ctx *s = calloc(1, sizeof *s);
    assert_non_null(s);
    for (int i = 0; i < NSEL; i++) {
        s->ch[i] = chan_new(sizeof(int), cap);
        s->vals[i] = -1;
        moor_chan_recv_init(&s->ops[i], s->ch[i], &s->vals[i], -1);
        s->futs[i] = &s->ops[i].base;
    }
    s->deadline = moor_deadline_in(SAFETY_MS);
    return s;
}

static void sel_free(sel_ctx *s)
{
    for (int i = 0; i < NSEL; i++)
        moor_chan_free(s->ch[i]); /* asserts if a loser's waiter was left queued */
    free(s);
}

static intptr_t selector_fn(void *arg)
{
    sel_ctx *s = arg;
    s->rc = moor_select(s->futs, NSEL, s->deadline);
    return s->rc;
}

/* Exactly ops[k] completed with its value; every other op is neither done nor queued. */
static void expect_only_winner(sel_ctx *s, int k, int value)
{
    assert_int_equal(s->rc, k);
    assert_true(moor_future_done(s->futs[k]));
    assert_int_equal(s->ops[k].base.result, 0);
    assert_int_equal(s->vals[k], value);
    for (int j = 0; j < NSEL; j++) {
        if (j == k)
            continue;
        if (moor_future_done(s->futs[j]) || s->vals[j] != -1)
            fail_msg("loser %d completed (winner %d)", j, k);
        int v = 1;
        /* A send now finds no receiver: the loser's cancelled receive is gone. */
        if (moor_chan_try_send(s->ch[j], &v) != -EAGAIN)
            fail_msg("a send on loser channel %d completed (winner %d)", j, k);
    }
}

static void test_select_one_of_1000(void **state)
{
    (void)state;
    uint32_t seed = 0x2545f491u;
    for (int from_fiber = 0; from_fiber < 2; from_fiber++) {
        for (int round = 0; round < 3; round++) {
            moor_executor *ex = ex_new();
            sel_ctx *s = sel_new(0);
            int k = (int)(rnd(&seed) % NSEL);
            if (round == 0)
                k = NSEL - 1; /* the last one polled */
            /* The sender yields first so that the select is pending on all 1,000 when the
             * value arrives. */
            send_arg sa = {s->ch[k], 7000 + k, 3, 1, 0};
            moor_fiber *sf, *self = NULL;
            if (from_fiber)
                assert_int_equal(moor_spawn(&self, selector_fn, s, NULL), 0);
            assert_int_equal(moor_spawn(&sf, sender_fn, &sa, NULL), 0);
            if (from_fiber) {
                intptr_t r = -1;
                assert_int_equal(moor_join(self, &r), 0);
                assert_int_equal(r, k);
            } else {
                s->rc = moor_select(s->futs, NSEL, s->deadline);
            }
            assert_int_equal(moor_join(sf, NULL), 0);
            assert_int_equal(sa.rc, 0);
            expect_only_winner(s, k, 7000 + k);
            sel_free(s);
            ex_free(ex);
        }
    }
}

/* The value is there before the select starts: it wins on the first poll; the futures before
 * it are cancelled, the ones after it never polled. */
static void test_select_ready_before_select(void **state)
{
    (void)state;
    static const int ks[] = {0, 1, NSEL / 2, NSEL - 1};
    for (size_t t = 0; t < sizeof ks / sizeof ks[0]; t++) {
        for (size_t cap = 0; cap <= 1; cap++) {
            moor_executor *ex = ex_new();
            sel_ctx *s = sel_new(cap);
            int k = ks[t];
            send_arg sa = {s->ch[k], 9000 + k, 0, 1, 0};
            moor_fiber *sf;
            assert_int_equal(moor_spawn(&sf, sender_fn, &sa, NULL), 0);
            if (cap == 0)
                settle(); /* the sender waits on ch[k] */
            else
                assert_int_equal(moor_join(sf, NULL), 0); /* its value is buffered */
            s->rc = moor_select(s->futs, NSEL, s->deadline);
            if (cap == 0)
                assert_int_equal(moor_join(sf, NULL), 0);
            assert_int_equal(sa.rc, 0);
            if (cap == 0) {
                expect_only_winner(s, k, 9000 + k);
            } else {
                assert_int_equal(s->rc, k);
                assert_int_equal(s->vals[k], 9000 + k);
                for (int j = 0; j < NSEL; j++) {
                    int v = 0;
                    assert_int_equal(moor_chan_len(s->ch[j]), 0);
                    if (j != k) {
                        assert_false(moor_future_done(s->futs[j]));
                        assert_int_equal(moor_chan_try_recv(s->ch[j], &v), -EAGAIN);
                    }
                }
            }
            sel_free(s);
            ex_free(ex);
        }
    }
}

/* ---- deadline ------------------------------------------------------------------------------ */

typedef struct dl_ctx {
    moor_chan *empty0, *empty2, *full;
    int r0, r1;
    int s_val;
    moor_chan_future ops[3];
    moor_future *futs[3];
    int64_t deadline;
    int rc;
    int64_t returned_at;
} dl_ctx;

static void dl_init(dl_ctx *d)
{
    d->r0 = d->r1 = -1;
    d->s_val = 5;
    moor_chan_recv_init(&d->ops[0], d->empty0, &d->r0, -1);
    moor_chan_recv_init(&d->ops[1], d->empty2, &d->r1, -1);
    moor_chan_send_init(&d->ops[2], d->full, &d->s_val, -1);
    for (int i = 0; i < 3; i++)
        d->futs[i] = &d->ops[i].base;
    d->deadline = moor_deadline_in(WAIT_MS);
}

static intptr_t dl_selector(void *arg)
{
    dl_ctx *d = arg;
    d->rc = moor_select(d->futs, 3, d->deadline);
    d->returned_at = moor_now();
    return 0;
}

static void test_select_deadline(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    dl_ctx d;
    d.empty0 = chan_new(sizeof(int), 0);
    d.empty2 = chan_new(sizeof(int), 2);
    d.full = chan_new(sizeof(int), 1);
    int one = 1;
    assert_int_equal(moor_chan_try_send(d.full, &one), 0);
    for (int from_fiber = 0; from_fiber < 2; from_fiber++) {
        dl_init(&d);
        if (from_fiber) {
            moor_fiber *f;
            assert_int_equal(moor_spawn(&f, dl_selector, &d, NULL), 0);
            assert_int_equal(moor_join(f, NULL), 0);
        } else {
            dl_selector(&d);
        }
        assert_int_equal(d.rc, -ETIMEDOUT);
        assert_true(d.returned_at >= d.deadline);
        for (int i = 0; i < 3; i++)
            assert_false(moor_future_done(d.futs[i]));
        assert_int_equal(d.r0, -1);
        assert_int_equal(d.r1, -1);
        /* All cancelled: nobody waits on any of the channels. */
        int v = 3;
        assert_int_equal(moor_chan_try_send(d.empty0, &v), -EAGAIN);
        assert_int_equal(moor_chan_len(d.full), 1);
        assert_int_equal(moor_chan_try_recv(d.full, &v), 0);
        assert_int_equal(v, 1);
        assert_int_equal(moor_chan_try_recv(d.full, &v), -EAGAIN); /* no sender moved in */
        assert_int_equal(moor_chan_try_send(d.full, &one), 0);
    }
    /* A future ready at the first poll wins even when the deadline has already passed. */
    dl_init(&d);
    int v = 44;
    assert_int_equal(moor_chan_try_send(d.empty2, &v), 0);
    d.deadline = moor_now() - 1;
    dl_selector(&d);
    assert_int_equal(d.rc, 1);
    assert_int_equal(d.r1, 44);
    /* and with nothing ready a past deadline returns at once */
    dl_init(&d);
    d.deadline = moor_now() - 1;
    dl_selector(&d);
    assert_int_equal(d.rc, -ETIMEDOUT);
    moor_chan_free(d.empty0);
    moor_chan_free(d.empty2);
    moor_chan_free(d.full);
    ex_free(ex);
}

/* ---- never two values ---------------------------------------------------------------------- */

static void test_select_never_takes_two(void **state)
{
    (void)state;
    for (int variant = 0; variant < 2; variant++) {
        moor_executor *ex = ex_new();
        moor_chan *a = chan_new(sizeof(int), 0), *b = chan_new(sizeof(int), 0);
        send_arg sa = {a, 1, 0, 1, 0}, sb = {b, 2, 0, 1, 0};
        moor_fiber *fa, *fb;
        int va = -1, vb = -1;
        moor_chan_future ops[2];
        moor_chan_recv_init(&ops[0], a, &va, -1);
        moor_chan_recv_init(&ops[1], b, &vb, -1);
        moor_future *futs[2] = {&ops[0].base, &ops[1].base};
        int rc;
        if (variant == 0) {
            /* Both senders wait before the select starts. */
            assert_int_equal(moor_spawn(&fa, sender_fn, &sa, NULL), 0);
            assert_int_equal(moor_spawn(&fb, sender_fn, &sb, NULL), 0);
            settle();
            rc = moor_select(futs, 2, moor_deadline_in(SAFETY_MS));
        } else {
            /* Both senders arrive in one round while the select waits on both. */
            sa.yields = sb.yields = 2;
            assert_int_equal(moor_spawn(&fa, sender_fn, &sa, NULL), 0);
            assert_int_equal(moor_spawn(&fb, sender_fn, &sb, NULL), 0);
            rc = moor_select(futs, 2, moor_deadline_in(SAFETY_MS));
        }
        assert_true(rc == 0 || rc == 1);
        settle();
        int other = 1 - rc;
        send_arg *won = rc == 0 ? &sa : &sb, *lost = rc == 0 ? &sb : &sa;
        assert_true(moor_future_done(futs[rc]));
        assert_false(moor_future_done(futs[other]));
        assert_int_equal(rc == 0 ? va : vb, rc + 1);
        assert_int_equal(rc == 0 ? vb : va, -1);
        assert_true(won->returned);
        assert_int_equal(won->rc, 0);
        assert_false(lost->returned); /* still waiting to send */
        /* The other value is still there for a later receive. */
        int v = -1;
        assert_int_equal(moor_chan_recv(lost->ch, &v, moor_deadline_in(SAFETY_MS)), 0);
        assert_int_equal(v, other + 1);
        assert_int_equal(moor_join(fa, NULL), 0);
        assert_int_equal(moor_join(fb, NULL), 0);
        assert_int_equal(lost->rc, 0);
        moor_chan_free(a);
        moor_chan_free(b);
        ex_free(ex);
    }
}

/* 1,000 senders, one per channel, all arriving while the select waits: exactly one value is
 * taken and the 999 others are still there to be received afterwards. */
static void test_select_many_senders_one_taken(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    sel_ctx *s = sel_new(0);
    send_arg *sa = calloc(NSEL, sizeof *sa);
    moor_fiber **sf = calloc(NSEL, sizeof *sf);
    assert_non_null(sa);
    assert_non_null(sf);
    moor_fiber *self;
    assert_int_equal(moor_spawn(&self, selector_fn, s, NULL), 0);
    for (int i = 0; i < NSEL; i++) {
        sa[i] = (send_arg){s->ch[i], 100000 + i, 1 + i % 3, 1, 0};
        assert_int_equal(moor_spawn(&sf[i], sender_fn, &sa[i], NULL), 0);
    }
    intptr_t r = -1;
    assert_int_equal(moor_join(self, &r), 0);
    int k = (int)r;
    assert_true(k >= 0 && k < NSEL);
    assert_int_equal(s->vals[k], 100000 + k);
    settle();
    int done = 0, waiting = 0;
    for (int i = 0; i < NSEL; i++) {
        done += moor_future_done(s->futs[i]) != 0;
        waiting += !sa[i].returned;
    }
    assert_int_equal(done, 1);
    assert_int_equal(waiting, NSEL - 1);
    for (int i = 0; i < NSEL; i++) {
        if (i == k)
            continue;
        int v = -1;
        assert_int_equal(moor_chan_try_recv(s->ch[i], &v), 0);
        assert_int_equal(v, 100000 + i);
    }
    for (int i = 0; i < NSEL; i++) {
        assert_int_equal(moor_join(sf[i], NULL), 0);
        assert_int_equal(sa[i].rc, 0);
    }
    free(sa);
    free(sf);
    sel_free(s);
    ex_free(ex);
}

/* A select that both receives from and sends to one rendezvous channel has nobody to pair
 * with but itself: it must not complete both of its operations. */
static void test_select_send_and_recv_same_channel(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch = chan_new(sizeof(int), 0);
    int in = -1, out = 5;
    moor_chan_future r_op, s_op;
    moor_chan_recv_init(&r_op, ch, &in, -1);
    moor_chan_send_init(&s_op, ch, &out, -1);
    moor_future *futs[2] = {&r_op.base, &s_op.base};
    int rc = moor_select(futs, 2, moor_deadline_in(WAIT_MS));
    int done = moor_future_done(&r_op.base) + moor_future_done(&s_op.base);
    int winner_done = rc >= 0 && rc < 2 && moor_future_done(futs[rc]);
    moor_chan_free(ch);
    ex_free(ex);
    if (done > 1)
        print_message("select returned %d with both the receive (got %d) and the send done\n",
                      rc, in);
    assert_true(done <= 1);
    assert_true(rc == -ETIMEDOUT || winner_done);
}

/* ---- select over a sleep and a channel ------------------------------------------------- */

static void test_select_sleep_and_chan(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch = chan_new(sizeof(int), 0);
    int v = -1;

    /* No sender: the sleep wins, no earlier than its deadline; the receive is withdrawn. */
    moor_sleep_future sl;
    moor_chan_future op;
    int64_t deadline = moor_deadline_in(WAIT_MS);
    moor_sleep_init(&sl, deadline);
    moor_chan_recv_init(&op, ch, &v, -1);
    moor_future *futs[2] = {&sl.base, &op.base};
    assert_int_equal(moor_select(futs, 2, -1), 0);
    assert_true(moor_now() >= deadline);
    assert_int_equal(sl.base.result, 0);
    assert_false(moor_future_done(&op.base));
    int w = 1;
    assert_int_equal(moor_chan_try_send(ch, &w), -EAGAIN);

    /* A sender: the receive wins, the sleep is cancelled (its timer gone). */
    moor_sleep_init(&sl, moor_deadline_in(SAFETY_MS));
    moor_chan_recv_init(&op, ch, &v, -1);
    send_arg sa = {ch, 321, 2, 1, 0};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, sender_fn, &sa, NULL), 0);
    assert_int_equal(moor_select(futs, 2, -1), 1);
    assert_int_equal(v, 321);
    assert_false(moor_future_done(&sl.base));
    assert_int_equal(ex_stats(ex).timers, 0);
    assert_int_equal(moor_join(f, NULL), 0);

    /* Both ready at the first poll: only one wins, and a take-nothing sleep never steals a
     * value (the receive is not done if the sleep won). */
    moor_sleep_init(&sl, moor_now() - 1);
    moor_chan_recv_init(&op, ch, &v, -1);
    sa = (send_arg){ch, 654, 0, 1, 0};
    assert_int_equal(moor_spawn(&f, sender_fn, &sa, NULL), 0);
    settle();
    v = -1;
    int rc = moor_select(futs, 2, -1);
    assert_int_equal(rc, 0);
    assert_false(moor_future_done(&op.base));
    assert_int_equal(v, -1);
    assert_false(sa.returned);
    assert_int_equal(moor_chan_recv(ch, &v, -1), 0); /* the value is still with its sender */
    assert_int_equal(v, 654);
    assert_int_equal(moor_join(f, NULL), 0);

    moor_chan_free(ch);
    ex_free(ex);
}

/* The receive wins, but the sleep's time had come too by the time the select cancelled it
 * (the sender spins past the sleep's deadline before it sends, so nothing runs meanwhile and
 * no timer fires). The losing sleep was cancelled, not completed: it is not done, as if
 * freshly initialised, and awaiting it afterwards returns 0 (at once). */
typedef struct late_sel {
    moor_chan *ch;
    int64_t tick_at;     /* the sleep's deadline */
    int v;
    int rc;
    int tick_done;       /* moor_future_done of the losing sleep right after the select */
    int await_rc;
    int returned;
    int64_t sent_at;
} late_sel;

static intptr_t late_selector_fn(void *arg)
{
    late_sel *l = arg;
    moor_chan_future rf;
    moor_sleep_future tick;
    moor_chan_recv_init(&rf, l->ch, &l->v, -1);
    moor_sleep_init(&tick, l->tick_at);
    moor_future *futs[2] = {&rf.base, &tick.base};
    l->rc = moor_select(futs, 2, moor_deadline_in(SAFETY_MS));
    l->tick_done = moor_future_done(&tick.base);
    if (!l->tick_done) /* awaiting a done future again would fail an assertion */
        l->await_rc = (int)moor_await(&tick.base);
    l->returned = 1;
    return 0;
}

static intptr_t late_sender_fn(void *arg)
{
    late_sel *l = arg;
    while (moor_now() < l->tick_at)
        ; /* hold the thread: the selector is not polled, no timer fires */
    l->sent_at = moor_now();
    int v = 808;
    return moor_chan_send(l->ch, &v, moor_deadline_in(SAFETY_MS));
}

static void test_select_losing_sleep_cancelled_past_deadline(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    late_sel l = {.ch = chan_new(sizeof(int), 0), .v = -1, .rc = -1, .await_rc = -1};
    l.tick_at = moor_deadline_in(WAIT_MS);
    moor_fiber *sel, *snd;
    assert_int_equal(moor_spawn(&sel, late_selector_fn, &l, NULL), 0);
    settle(); /* the select waits on both */
    assert_false(l.returned);
    assert_int_equal(moor_spawn(&snd, late_sender_fn, &l, NULL), 0);
    intptr_t r = -1;
    assert_int_equal(moor_join(snd, &r), 0);
    assert_int_equal(r, 0);
    assert_true(l.sent_at >= l.tick_at); /* the sleep's time had come before the select ran */
    assert_int_equal(moor_join(sel, NULL), 0);
    assert_int_equal(l.rc, 0);
    assert_int_equal(l.v, 808);
    assert_int_equal(l.tick_done, 0);
    assert_int_equal(l.await_rc, 0);
    moor_chan_free(l.ch);
    ex_free(ex);
}

/* ---- race, timeout ------------------------------------------------------------------------ */

static intptr_t sleep_then_return(void *arg)
{
    moor_sleep(moor_deadline_in(WAIT_MS));
    return (intptr_t)arg;
}

static void test_select_race(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    val_future v[3];
    val_init(&v[0], 5, 50);
    val_init(&v[1], 2, 20);
    val_init(&v[2], 9, 90);
    moor_future *futs[3] = {&v[0].base, &v[1].base, &v[2].base};
    size_t winner = 99;
    assert_int_equal(moor_race(futs, 3, &winner, -1), 20);
    assert_int_equal(winner, 1);
    assert_true(moor_future_done(&v[1].base));
    for (int i = 0; i < 3; i += 2) {
        assert_false(moor_future_done(&v[i].base));
        assert_int_equal(v[i].cancels, 1);
    }
    assert_int_equal(v[1].cancels, 0);

    /* Negative outputs are outputs, not errors of the race. */
    val_init(&v[0], 3, 1);
    val_init(&v[1], 0, -EIO);
    assert_int_equal(moor_race(futs, 2, NULL, -1), -EIO);

    /* Over fibers' futures, from a fiber's point of view the same: the quick one wins; the
     * slow one is still joined afterwards with its own result. */
    moor_fiber *slow, *quick;
    assert_int_equal(moor_spawn(&slow, sleep_then_return, (void *)111, NULL), 0);
    assert_int_equal(moor_spawn(&quick, yield_n, (void *)2, NULL), 0);
    moor_future *ff[2] = {moor_fiber_future(slow), moor_fiber_future(quick)};
    winner = 99;
    assert_int_equal(moor_race(ff, 2, &winner, -1), 2); /* the quick one's output */
    assert_int_equal(winner, 1);
    intptr_t r = 0;
    assert_int_equal(moor_join(slow, &r), 0);
    assert_int_equal(r, 111);
    assert_int_equal(moor_join(quick, NULL), 0);

    /* A race that nobody wins in time. */
    moor_chan *ch = chan_new(sizeof(int), 0);
    int a = -1, b = -1;
    moor_chan_future ops[2];
    moor_chan_recv_init(&ops[0], ch, &a, -1);
    moor_chan_recv_init(&ops[1], ch, &b, -1);
    moor_future *of[2] = {&ops[0].base, &ops[1].base};
    int64_t deadline = moor_deadline_in(WAIT_MS);
    winner = 99;
    assert_int_equal(moor_race(of, 2, &winner, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_int_equal(winner, 99);
    int x = 1;
    assert_int_equal(moor_chan_try_send(ch, &x), -EAGAIN);
    moor_chan_free(ch);
    ex_free(ex);
}

typedef struct timeout_ctx {
    moor_chan *ch;
    int value;
    intptr_t rc;
    int64_t deadline, returned_at;
    int done;
} timeout_ctx;

static intptr_t timeout_fn(void *arg)
{
    timeout_ctx *t = arg;
    moor_chan_future op;
    t->value = -1;
    moor_chan_recv_init(&op, t->ch, &t->value, -1);
    t->rc = moor_await_deadline(&op.base, t->deadline);
    t->returned_at = moor_now();
    t->done = moor_future_done(&op.base);
    return 0;
}

static void test_select_timeout(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch = chan_new(sizeof(int), 0);
    for (int from_fiber = 0; from_fiber < 2; from_fiber++) {
        /* Nothing arrives: -ETIMEDOUT no earlier than the deadline, the receive withdrawn. */
        timeout_ctx t = {.ch = ch, .deadline = moor_deadline_in(WAIT_MS)};
        if (from_fiber) {
            moor_fiber *f;
            assert_int_equal(moor_spawn(&f, timeout_fn, &t, NULL), 0);
            assert_int_equal(moor_join(f, NULL), 0);
        } else {
            timeout_fn(&t);
        }
        assert_int_equal(t.rc, -ETIMEDOUT);
        assert_true(t.returned_at >= t.deadline);
        assert_false(t.done);
        assert_int_equal(t.value, -1);
        int v = 1;
        assert_int_equal(moor_chan_try_send(ch, &v), -EAGAIN);

        /* A value in time: the operation's output (0) and the value. */
        t = (timeout_ctx){.ch = ch, .deadline = moor_deadline_in(SAFETY_MS)};
        send_arg sa = {ch, 17, 2, 1, 0};
        moor_fiber *sf, *f = NULL;
        if (from_fiber)
            assert_int_equal(moor_spawn(&f, timeout_fn, &t, NULL), 0);
        assert_int_equal(moor_spawn(&sf, sender_fn, &sa, NULL), 0);
        if (from_fiber)
            assert_int_equal(moor_join(f, NULL), 0);
        else
            timeout_fn(&t);
        assert_int_equal(moor_join(sf, NULL), 0);
        assert_int_equal(t.rc, 0);
        assert_true(t.done);
        assert_int_equal(t.value, 17);
    }
    /* The future's own output comes through, negative or not. */
    val_future v;
    val_init(&v, 3, -ENOENT);
    assert_int_equal(moor_await_deadline(&v.base, moor_deadline_in(SAFETY_MS)), -ENOENT);
    val_init(&v, 0, 12345);
    assert_int_equal(moor_await_deadline(&v.base, -1), 12345);
    moor_chan_free(ch);
    ex_free(ex);
}

/* ---- join_all ------------------------------------------------------------------------------ */

static void test_select_join_all(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch = chan_new(sizeof(int), 0);

    /* All finish: 0, every output in place. */
    val_future v[2];
    val_init(&v[0], 4, 1);
    val_init(&v[1], 0, -2);
    int got = -1;
    moor_chan_future op;
    moor_chan_recv_init(&op, ch, &got, -1);
    moor_sleep_future sl;
    int64_t sleep_until = moor_deadline_in(WAIT_MS);
    moor_sleep_init(&sl, sleep_until);
    moor_future *futs[4] = {&v[0].base, &v[1].base, &op.base, &sl.base};
    send_arg sa = {ch, 77, 3, 1, 0};
    moor_fiber *sf;
    assert_int_equal(moor_spawn(&sf, sender_fn, &sa, NULL), 0);
    assert_int_equal(moor_await_all(futs, 4, moor_deadline_in(SAFETY_MS)), 0);
    assert_true(moor_now() >= sleep_until); /* it waited for the slowest */
    for (int i = 0; i < 4; i++)
        assert_true(moor_future_done(futs[i]));
    assert_int_equal(v[0].base.result, 1);
    assert_int_equal(v[1].base.result, -2);
    assert_int_equal(op.base.result, 0);
    assert_int_equal(got, 77);
    assert_int_equal(sl.base.result, 0);
    assert_int_equal(moor_join(sf, NULL), 0);

    /* A deadline passes first: -ETIMEDOUT, the unfinished ones cancelled and not done. */
    val_init(&v[0], 2, 5);
    got = -1;
    moor_chan_recv_init(&op, ch, &got, -1);
    moor_sleep_init(&sl, moor_deadline_in(SAFETY_MS));
    futs[1] = &op.base;
    futs[2] = &sl.base;
    int64_t deadline = moor_deadline_in(WAIT_MS);
    assert_int_equal(moor_await_all(futs, 3, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_true(moor_future_done(&v[0].base));
    assert_int_equal(v[0].base.result, 5);
    assert_false(moor_future_done(&op.base));
    assert_false(moor_future_done(&sl.base));
    int x = 1;
    assert_int_equal(moor_chan_try_send(ch, &x), -EAGAIN); /* the receive was withdrawn */
    assert_int_equal(got, -1);
    assert_int_equal(ex_stats(ex).timers, 0);                      /* and the sleep's timer */

    moor_chan_free(ch);
    ex_free(ex);
}

static intptr_t join_all_fn(void *arg)
{
    val_future *v = arg;
    moor_future *futs[3] = {&v[0].base, &v[1].base, &v[2].base};
    FCHECK(moor_await_all(futs, 3, -1) == 0);
    return v[0].base.result + v[1].base.result + v[2].base.result;
}

static void test_select_join_all_in_fiber(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    val_future v[3];
    val_init(&v[0], 7, 100);
    val_init(&v[1], 1, 20);
    val_init(&v[2], 0, 3);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, join_all_fn, v, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 123);
    ex_free(ex);
}

/* ---- retry --------------------------------------------------------------------------------- */

#define MAX_ATTEMPTS 8

typedef struct factory {
    val_future slot;          /* one slot, reused by each attempt */
    intptr_t outputs[MAX_ATTEMPTS + 1]; /* output of attempt n (1-based) */
    int pending;              /* polls each attempt stays pending */
    unsigned made;
    unsigned last_attempt;
    int64_t made_at[MAX_ATTEMPTS + 1];
    int fail_make_at;         /* return NULL at this attempt (0: never) */
} factory;

static moor_future *factory_make(void *arg, unsigned attempt)
{
    factory *fa = arg;
    fa->made++;
    fa->last_attempt = attempt;
    if (attempt <= MAX_ATTEMPTS)
        fa->made_at[attempt] = moor_now();
    if ((int)attempt == fa->fail_make_at)
        return NULL;
    val_init(&fa->slot, fa->pending, attempt <= MAX_ATTEMPTS ? fa->outputs[attempt] : -EINVAL);
    return &fa->slot.base;
}

#define BACKOFF_MS 20

static void test_select_retry_succeeds_on_third(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    for (int pending = 0; pending <= 2; pending += 2) {
        factory fa = {.outputs = {0, -EIO, -EAGAIN, 42, 43}, .pending = pending};
        int64_t start = moor_now();
        assert_int_equal(moor_retry(factory_make, &fa, 5, BACKOFF_MS, -1), 42);
        int64_t elapsed = moor_now() - start;
        assert_int_equal(fa.made, 3);
        assert_int_equal(fa.last_attempt, 3);
        /* Backoffs of 20 then 40 ms: lower bounds only. */
        assert_true(fa.made_at[2] - fa.made_at[1] >= BACKOFF_MS);
        assert_true(fa.made_at[3] - fa.made_at[2] >= 2 * BACKOFF_MS);
        assert_true(elapsed >= 3 * BACKOFF_MS);
    }
    /* The same with the future in hand: attempt reports how many were started. */
    factory fb = {.outputs = {0, -EIO, -EIO, 7}};
    moor_retry_future rf;
    moor_retry_init(&rf, factory_make, &fb, 3, 1, moor_deadline_in(SAFETY_MS));
    assert_int_equal(moor_block_on(&rf.base), 7);
    assert_int_equal(rf.attempt, 3);
    assert_true(moor_future_done(&rf.base));
    ex_free(ex);
}

static intptr_t retry_in_fiber(void *arg)
{
    factory *fa = arg;
    return moor_retry(factory_make, fa, 4, BACKOFF_MS, moor_deadline_in(SAFETY_MS));
}

static void test_select_retry_outcomes(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();

    /* Every attempt fails: the last attempt's error. */
    factory fa = {.outputs = {0, -EIO, -EAGAIN, -ECONNREFUSED, 9}};
    assert_int_equal(moor_retry(factory_make, &fa, 3, 1, -1), -ECONNREFUSED);
    assert_int_equal(fa.made, 3);

    /* One attempt only: no retry at all. */
    fa = (factory){.outputs = {0, -EIO, 1}};
    assert_int_equal(moor_retry(factory_make, &fa, 1, BACKOFF_MS, -1), -EIO);
    assert_int_equal(fa.made, 1);

    /* Success at once: one attempt, no backoff. */
    fa = (factory){.outputs = {0, 0}};
    assert_int_equal(moor_retry(factory_make, &fa, 3, 10000, -1), 0);
    assert_int_equal(fa.made, 1);

    /* The deadline passes during a backoff: -ETIMEDOUT, no earlier than the deadline, and no
     * further attempt is started. */
    fa = (factory){.outputs = {0, -EIO, 5}};
    int64_t deadline = moor_deadline_in(WAIT_MS);
    assert_int_equal(moor_retry(factory_make, &fa, 5, 10000, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_int_equal(fa.made, 1);
    assert_int_equal(ex_stats(ex).timers, 0); /* the backoff's sleep went with it */

    /* The deadline passes during an attempt: it is cancelled. */
    fa = (factory){.outputs = {0, 1}, .pending = 1 << 30};
    moor_retry_future rf;
    deadline = moor_deadline_in(WAIT_MS);
    moor_retry_init(&rf, factory_make, &fa, 3, 1, deadline);
    assert_int_equal(moor_block_on(&rf.base), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_int_equal(fa.slot.cancels, 1);
    assert_false(moor_future_done(&fa.slot.base));

    /* make returning NULL: -ENOMEM. */
    fa = (factory){.outputs = {0, -EIO, -EIO}, .fail_make_at = 2};
    assert_int_equal(moor_retry(factory_make, &fa, 3, 1, -1), -ENOMEM);
    assert_int_equal(fa.made, 2);

    /* Awaited from a fiber. */
    fa = (factory){.outputs = {0, -EIO, 77}, .pending = 1};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, retry_in_fiber, &fa, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 77);
    assert_int_equal(fa.made, 2);
    ex_free(ex);
}

/* A retry future spawned as a task of its own, never awaited: the executor drives it,
 * backoffs included, and its output is in base.result. */
static void test_select_retry_spawned_as_task(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    factory fa = {.outputs = {0, -EIO, -EIO, 31}, .pending = 2};
    factory fb = {.outputs = {0, -EPERM, -EPERM, -EPERM}};
    moor_retry_future ra, rb;
    moor_retry_init(&ra, factory_make, &fa, 4, BACKOFF_MS, -1);
    moor_retry_init(&rb, factory_make, &fb, 3, 1, moor_deadline_in(SAFETY_MS));
    int64_t start = moor_now();
    assert_int_equal(moor_spawn_future(&ra.base), 0);
    assert_int_equal(moor_spawn_future(&rb.base), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_true(moor_future_done(&ra.base));
    assert_true(moor_future_done(&rb.base));
    assert_int_equal(ra.base.result, 31);
    assert_int_equal(ra.attempt, 3);
    assert_true(moor_now() - start >= 3 * BACKOFF_MS);
    assert_int_equal(rb.base.result, -EPERM);
    assert_int_equal(rb.attempt, 3);
    ex_free(ex);
}

/* ---- retry: what the deadline counts ------------------------------------------------------
 * The one attempt is a gate: pending until opened, then ready with its value; its cancel
 * reports nothing completed (it takes nothing that could be lost), so only a poll finds it
 * finished. The retry's fiber waits in its attempt; a hog fiber opens the gate (or not) and
 * wakes the retry, then holds the thread until past the retry's deadline: the retry is
 * polled again only after its deadline has passed. */

typedef struct gate_future {
    moor_future base;
    int open;
    intptr_t value;
    moor_waker waker;   /* from the last pending poll */
    int polls;
    int cancels;
    int64_t polled_at;  /* when it was last polled */
} gate_future;

static moor_poll gate_poll(moor_future *fut, moor_cx *cx)
{
    gate_future *g = moor_container_of(fut, gate_future, base);
    g->polls++;
    g->polled_at = moor_now();
    if (g->open) {
        fut->result = g->value;
        return MOOR_READY;
    }
    g->waker = cx->waker;
    return MOOR_PENDING;
}

static moor_poll gate_cancel(moor_future *fut)
{
    moor_container_of(fut, gate_future, base)->cancels++;
    return MOOR_PENDING;
}

static const moor_future_ops gate_ops = {"gate", gate_poll, gate_cancel};

typedef struct gated_retry {
    gate_future gate;
    intptr_t value;     /* the attempt's output once opened */
    int open_it;        /* the hog opens the gate (before the deadline) */
    int64_t deadline;   /* the retry's */
    unsigned made;
    intptr_t out;
    int returned;
    int64_t returned_at;
} gated_retry;

static moor_future *make_gate(void *arg, unsigned attempt)
{
    (void)attempt;
    gated_retry *gr = arg;
    gr->made++;
    moor_future_init(&gr->gate.base, &gate_ops, 0);
    gr->gate.open = 0;
    gr->gate.value = gr->value;
    gr->gate.polls = 0;
    gr->gate.cancels = 0;
    return &gr->gate.base;
}

static intptr_t gated_retry_fn(void *arg)
{
    gated_retry *gr = arg;
    gr->out = moor_retry(make_gate, gr, 1, 0, gr->deadline);
    gr->returned = 1;
    gr->returned_at = moor_now();
    return 0;
}

static intptr_t gate_hog_fn(void *arg)
{
    gated_retry *gr = arg;
    if (gr->open_it) {
        gr->gate.open = 1;
        moor_waker_wake(&gr->gate.waker);
    }
    while (moor_now() < gr->deadline)
        ; /* hold the thread past the retry's deadline */
    return 0;
}

/* Run the retry of gr in a fiber against the hog; return once both have returned. */
static void run_gated_retry(moor_executor *ex, gated_retry *gr)
{
    gr->deadline = moor_deadline_in(WAIT_MS);
    moor_fiber *rt, *hog;
    assert_int_equal(moor_spawn(&rt, gated_retry_fn, gr, NULL), 0);
    settle(); /* the retry waits in its one attempt */
    assert_false(gr->returned);
    assert_int_equal(gr->made, 1);
    assert_int_equal(gr->gate.polls, 1);
    assert_int_equal(moor_spawn(&hog, gate_hog_fn, gr, NULL), 0);
    assert_int_equal(moor_join(hog, NULL), 0);
    assert_int_equal(moor_join(rt, NULL), 0);
    assert_true(gr->returned);
    assert_int_equal(gr->made, 1);
    assert_int_equal(ex_stats(ex).timers, 0);
}

/* The attempt finished before the deadline, but the retry is polled only after it: an
 * attempt found finished when the retry is polled counts (as a ready future wins a select),
 * so the retry returns its output, not -ETIMEDOUT. With one attempt, a negative output is
 * the last attempt's and is returned as well. */
static void test_select_retry_attempt_finished_before_deadline_counts(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    static const intptr_t values[] = {7, -EIO};
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        gated_retry gr = {.value = values[i], .open_it = 1, .out = 1};
        run_gated_retry(ex, &gr);
        assert_int_equal(gr.out, values[i]);
        assert_int_equal(gr.gate.polls, 2);
        assert_true(gr.gate.polled_at >= gr.deadline); /* polled again only past it... */
        assert_int_equal(gr.gate.cancels, 0); /* ...found finished, not cancelled */
        assert_true(moor_future_done(&gr.gate.base));
    }
    ex_free(ex);
}

/* The complement: the attempt never finishes; the retry is polled after its deadline and
 * times out, no earlier than the deadline, its attempt cancelled and not done. */
static void test_select_retry_attempt_pending_at_deadline_times_out(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    gated_retry gr = {.value = 7, .open_it = 0, .out = 1};
    run_gated_retry(ex, &gr);
    assert_int_equal(gr.out, -ETIMEDOUT);
    assert_true(gr.returned_at >= gr.deadline);
    assert_int_equal(gr.gate.cancels, 1);
    assert_false(moor_future_done(&gr.gate.base));
    ex_free(ex);
}

/* ---- a cancelled fiber in a select ---------------------------------------------------- */

typedef struct csel_ctx {
    moor_chan *ch[3];
    int vals[3];
    moor_chan_future ops[3];
    moor_sleep_future sl;
    moor_future *futs[4];
    int rc;
    int returned;
} csel_ctx;

/* A future that is already done when the select starts is ready: it wins at once (its
 * output stays in its result), and the others are cancelled without being taken. */
static void test_select_already_done_future_wins(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    val_future done, later;
    val_init(&done, 0, 77);
    assert_int_equal(moor_block_on(&done.base), 77);
    assert_true(moor_future_done(&done.base));
    val_init(&later, 1000, 5); /* would stay pending for 1,000 polls */
    moor_future *futs[] = {&later.base, &done.base};
    assert_int_equal(moor_select(futs, 2, moor_deadline_in(5000)), 1);
    assert_int_equal(done.base.result, 77);
    assert_int_equal(later.cancels, 1);
    assert_true(later.polls <= 1);
    ex_free(ex);
}

static intptr_t csel_fn(void *arg)
{
    csel_ctx *c = arg;
    for (int i = 0; i < 3; i++) {
        c->vals[i] = -1;
        moor_chan_recv_init(&c->ops[i], c->ch[i], &c->vals[i],
                            i == 1 ? moor_deadline_in(SAFETY_MS) : -1);
        c->futs[i] = &c->ops[i].base;
    }
    moor_sleep_init(&c->sl, moor_deadline_in(SAFETY_MS));
    c->futs[3] = &c->sl.base;
    c->rc = moor_select(c->futs, 4, moor_deadline_in(SAFETY_MS));
    c->returned = 1;
    return c->rc;
}

static void test_select_cancelled_fiber(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    csel_ctx c;
    memset(&c, 0, sizeof c);
    for (int i = 0; i < 3; i++)
        c.ch[i] = chan_new(sizeof(int), 0);

    /* Cancelled while it waits: -ECANCELED, every future cancelled, nothing queued. */
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, csel_fn, &c, NULL), 0);
    settle();
    assert_false(c.returned);
    assert_true(ex_stats(ex).timers >= 2); /* select's deadline, the op's, the sleep's */
    moor_cancel(f);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, -ECANCELED);
    for (int i = 0; i < 4; i++)
        assert_false(moor_future_done(c.futs[i]));
    for (int i = 0; i < 3; i++) {
        int v = 1;
        assert_int_equal(moor_chan_try_send(c.ch[i], &v), -EAGAIN);
        assert_int_equal(c.vals[i], -1);
    }
    assert_int_equal(ex_stats(ex).timers, 0);

    /* A value handed to one of its operations just before the cancel is not lost: the
     * select reports that operation. */
    memset(c.vals, 0, sizeof c.vals);
    c.returned = 0;
    assert_int_equal(moor_spawn(&f, csel_fn, &c, NULL), 0);
    settle();
    int v = 2024;
    assert_int_equal(moor_chan_try_send(c.ch[2], &v), 0);
    moor_cancel(f);
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, 2);
    assert_int_equal(c.vals[2], 2024);
    assert_true(moor_future_done(c.futs[2]));
    for (int i = 0; i < 4; i++)
        if (i != 2)
            assert_false(moor_future_done(c.futs[i]));
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_chan_try_send(c.ch[i], &v), -EAGAIN);

    /* Cancelled before it calls select at all: -ECANCELED without waiting. */
    c.returned = 0;
    assert_int_equal(moor_spawn(&f, csel_fn, &c, NULL), 0);
    moor_cancel(f);
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, -ECANCELED);
    assert_true(c.returned);

    for (int i = 0; i < 3; i++)
        moor_chan_free(c.ch[i]);
    ex_free(ex);
}

/* ---- wrappers that pass the select's claim down ------------------------------------------
 * A future that wraps another (moor_retry around a channel receive, or one of the user's own)
 * polls the inner future with the cx it was given: the inner future claims the select for the
 * wrapper's slot, and the select sees the wrapper win. A value taken inside a wrapper is never
 * lost to the select. */

typedef struct recv_maker {
    moor_chan *ch;
    moor_chan_future op;
    int value;
} recv_maker;

static moor_future *make_recv(void *arg, unsigned attempt)
{
    (void)attempt;
    recv_maker *m = arg;
    moor_chan_recv_init(&m->op, m->ch, &m->value, -1);
    return &m->op.base;
}

typedef struct wrapped_timeout {
    recv_maker m;
    moor_retry_future rf;
    intptr_t out;
} wrapped_timeout;

static intptr_t timeout_of_retry_fn(void *arg)
{
    wrapped_timeout *w = arg;
    moor_retry_init(&w->rf, make_recv, &w->m, 3, 1, -1);
    w->out = moor_await_deadline(&w->rf.base, moor_deadline_in(SAFETY_MS));
    return 0;
}

static void test_select_timeout_of_retry_keeps_value(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    wrapped_timeout w = {.m = {.ch = chan_new(sizeof(int), 0), .value = -1}, .out = -1};
    moor_fiber *waiter, *sender;
    assert_int_equal(moor_spawn(&waiter, timeout_of_retry_fn, &w, NULL), 0);
    settle(); /* the receive is queued inside retry inside timeout */
    send_arg a = {.ch = w.m.ch, .value = 4242};
    assert_int_equal(moor_spawn(&sender, sender_fn, &a, NULL), 0);
    intptr_t r = -1;
    assert_int_equal(moor_join(sender, &r), 0);
    assert_int_equal(r, 0); /* the value left the channel... */
    assert_int_equal(moor_join(waiter, NULL), 0);
    assert_int_equal(w.out, 0); /* ...and arrived: not -ETIMEDOUT */
    assert_int_equal(w.m.value, 4242);
    moor_chan_free(w.m.ch);
    ex_free(ex);
}

static void test_select_retry_of_recv_wins_select(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    for (int before = 0; before <= 1; before++) {
        recv_maker m = {.ch = chan_new(sizeof(int), 1), .value = -1};
        int v = 99;
        if (before) /* a value there at the first poll, or one sent while the select waits */
            assert_int_equal(moor_chan_try_send(m.ch, &v), 0);
        moor_retry_future rf;
        moor_retry_init(&rf, make_recv, &m, 2, 1, -1);
        moor_sleep_future sl;
        moor_sleep_init(&sl, moor_deadline_in(SAFETY_MS));
        moor_future *futs[] = {&sl.base, &rf.base};
        moor_fiber *sender = NULL;
        send_arg a = {.ch = m.ch, .value = v};
        if (!before)
            assert_int_equal(moor_spawn(&sender, sender_fn, &a, NULL), 0);
        assert_int_equal(moor_select(futs, 2, moor_deadline_in(SAFETY_MS)), 1);
        assert_int_equal(rf.base.result, 0);
        assert_int_equal(m.value, 99);
        assert_false(moor_future_done(&sl.base));
        if (sender)
            assert_int_equal(moor_join(sender, NULL), 0);
        assert_int_equal(moor_chan_len(m.ch), 0);
        moor_chan_free(m.ch);
    }
    ex_free(ex);
}

/* A wrapper of the user's own: adds 1000 to the output of the receive it wraps. */
typedef struct plus_future {
    moor_future base;
    moor_chan_future inner;
} plus_future;

static moor_poll plus_poll(moor_future *fut, moor_cx *cx)
{
    plus_future *p = moor_container_of(fut, plus_future, base);
    if (moor_future_poll(&p->inner.base, cx) == MOOR_PENDING)
        return MOOR_PENDING;
    fut->result = p->inner.base.result + 1000;
    return MOOR_READY;
}

static moor_poll plus_cancel(moor_future *fut)
{
    plus_future *p = moor_container_of(fut, plus_future, base);
    if (moor_future_cancel(&p->inner.base) == MOOR_PENDING)
        return MOOR_PENDING;
    fut->result = p->inner.base.result + 1000; /* it had completed: keep it */
    return MOOR_READY;
}

static const moor_future_ops plus_ops = {"plus", plus_poll, plus_cancel};

/* Two wrapped receives on two channels that both hold a value: exactly one is taken, and the
 * select names its wrapper. */
static void test_select_user_wrapper_claims_for_itself(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch[2] = {chan_new(sizeof(int), 1), chan_new(sizeof(int), 1)};
    int got[2] = {-1, -1};
    plus_future p[2];
    moor_future *futs[2];
    for (int i = 0; i < 2; i++) {
        int v = 10 + i;
        assert_int_equal(moor_chan_try_send(ch[i], &v), 0);
        moor_future_init(&p[i].base, &plus_ops, 0);
        moor_chan_recv_init(&p[i].inner, ch[i], &got[i], -1);
        futs[i] = &p[i].base;
    }
    int i = moor_select(futs, 2, moor_deadline_in(SAFETY_MS));
    assert_true(i == 0 || i == 1);
    assert_int_equal(p[i].base.result, 1000);
    assert_int_equal(got[i], 10 + i);
    assert_int_equal(got[1 - i], -1);
    assert_int_equal(moor_chan_len(ch[i]), 0);
    assert_int_equal(moor_chan_len(ch[1 - i]), 1); /* the loser took nothing */
    /* moor_cx_claim: outside a select a future may always take. */
    moor_cx plain = {{NULL, NULL, 0}, NULL, NULL};
    assert_int_equal(moor_cx_claim(&plain), 1);
    for (int k = 0; k < 2; k++)
        moor_chan_free(ch[k]);
    ex_free(ex);
}

/* ---- in a cancelled fiber, what is there without waiting is returned -------------------- */

typedef struct ready_in_cancelled {
    moor_chan *ch;
    int value;
    int select_rc, race_winner;
    intptr_t race_rc, timeout_rc, after_rc;
} ready_in_cancelled;

static intptr_t ready_in_cancelled_fn(void *arg)
{
    ready_in_cancelled *c = arg;
    while (!moor_cancelled())
        moor_yield();
    moor_chan_future op;
    moor_sleep_future sl;
    moor_chan_recv_init(&op, c->ch, &c->value, -1);
    moor_sleep_init(&sl, moor_deadline_in(SAFETY_MS));
    moor_future *futs[] = {&sl.base, &op.base};
    c->select_rc = moor_select(futs, 2, moor_deadline_in(SAFETY_MS));

    val_future ready;
    val_init(&ready, 0, 55);
    moor_sleep_init(&sl, moor_deadline_in(SAFETY_MS));
    moor_future *race[] = {&sl.base, &ready.base};
    size_t w = 9;
    c->race_rc = moor_race(race, 2, &w, moor_deadline_in(SAFETY_MS));
    c->race_winner = (int)w;

    val_init(&ready, 0, 66);
    c->timeout_rc = moor_await_deadline(&ready.base, moor_deadline_in(SAFETY_MS));

    /* Nothing ready: now the cancel shows. */
    val_init(&ready, 1000, 1);
    c->after_rc = moor_await_deadline(&ready.base, moor_deadline_in(SAFETY_MS));
    return 0;
}

static void test_select_ready_results_in_cancelled_fiber(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    ready_in_cancelled c = {.ch = chan_new(sizeof(int), 1), .value = -1};
    int v = 31;
    assert_int_equal(moor_chan_try_send(c.ch, &v), 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, ready_in_cancelled_fn, &c, NULL), 0);
    moor_cancel(f);
    assert_int_equal(moor_join(f, NULL), -ECANCELED);
    assert_int_equal(c.select_rc, 1);
    assert_int_equal(c.value, 31);
    assert_int_equal(c.race_rc, 55);
    assert_int_equal(c.race_winner, 1);
    assert_int_equal(c.timeout_rc, 66);
    assert_int_equal(c.after_rc, -ECANCELED);
    moor_chan_free(c.ch);
    ex_free(ex);
}

/* ---- a select's lost waiter ahead of a plain one -----------------------------------------
 * A select that has been won elsewhere keeps its waiters on the other channels until it runs
 * and cancels them. A plain call that comes in the meantime must pass over such a waiter (its
 * select may take nothing more) and serve the plain waiter queued behind it, on the fast
 * paths of moor_chan_send and moor_chan_recv as well. */

typedef struct lost_sel {
    moor_chan *a, *b;
    int send;            /* the select sends on a and b (else it receives) */
    int va, vb;          /* its buffers */
    moor_chan_future ops[2];
    int rc;
    int returned;
} lost_sel;

static intptr_t lost_sel_fn(void *arg)
{
    lost_sel *l = arg;
    if (l->send) {
        moor_chan_send_init(&l->ops[0], l->a, &l->va, -1);
        moor_chan_send_init(&l->ops[1], l->b, &l->vb, -1);
    } else {
        moor_chan_recv_init(&l->ops[0], l->a, &l->va, -1);
        moor_chan_recv_init(&l->ops[1], l->b, &l->vb, -1);
    }
    moor_future *futs[2] = {&l->ops[0].base, &l->ops[1].base};
    l->rc = moor_select(futs, 2, -1);
    l->returned = 1;
    return l->rc;
}

/* What plain code or a fiber does once both wait: win the select on b without waiting, then
 * make the blocking call on a. */
typedef struct lost_counterpart {
    lost_sel *l;
    int b_rc, b_got;
    int a_rc, a_got;
} lost_counterpart;

static void lost_counterpart_calls(lost_counterpart *c)
{
    lost_sel *l = c->l;
    if (l->send) {
        c->b_rc = moor_chan_try_recv(l->b, &c->b_got);
        c->a_rc = moor_chan_recv(l->a, &c->a_got, -1);
    } else {
        int vb = 20, va = 10;
        c->b_rc = moor_chan_try_send(l->b, &vb);
        c->a_rc = moor_chan_send(l->a, &va, -1);
    }
}

static intptr_t lost_counterpart_fn(void *arg)
{
    lost_counterpart_calls(arg);
    return 0;
}

static void test_select_lost_waiter_before_plain_waiter(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    for (unsigned combo = 0; combo < 16; combo++) {
        int send = combo & 1;              /* the select sends (else receives) */
        size_t cap = (combo >> 1) & 1;     /* a and b: rendezvous, or a ring of one */
        int use_future = (combo >> 2) & 1; /* P waits by future (else by call) */
        int from_fiber = (combo >> 3) & 1; /* the counterpart is a fiber (else plain code) */
        if (send && cap)
            continue; /* senders wait only on a full ring: no receive would be a hand-off */
        lost_sel l = {.a = chan_new(sizeof(int), cap), .b = chan_new(sizeof(int), cap),
                      .send = send, .va = send ? 1 : -1, .vb = send ? 2 : -1, .rc = -99};
        moor_fiber *sf, *pf;
        assert_int_equal(moor_spawn(&sf, lost_sel_fn, &l, NULL), 0);
        settle(); /* the select waits on a and b */
        assert_false(l.returned);
        /* P waits on a behind the select: a receive if the select receives, else a send. */
        chan_call p = {.ch = l.a, .send = send, .use_future = use_future, .deadline = -1,
                       .value = 30, .got = -1};
        assert_int_equal(moor_spawn(&pf, chan_call_fn, &p, NULL), 0);
        settle();
        assert_false(p.returned);
        lost_counterpart c = {.l = &l, .b_rc = 1, .b_got = -1, .a_rc = 1, .a_got = -1};
        if (from_fiber) {
            moor_fiber *cf;
            assert_int_equal(moor_spawn(&cf, lost_counterpart_fn, &c, NULL), 0);
            assert_int_equal(moor_join(cf, NULL), 0);
        } else {
            lost_counterpart_calls(&c);
        }
        intptr_t r = -1;
        assert_int_equal(moor_join(sf, &r), 0);
        assert_int_equal(r, 1);
        assert_int_equal(c.b_rc, 0);
        assert_int_equal(c.a_rc, 0);
        assert_int_equal(l.rc, 1); /* the select won on b, and only on b */
        assert_true(moor_future_done(&l.ops[1].base));
        assert_int_equal(l.ops[1].base.result, 0);
        if (send ? c.a_got != 30 : l.va != -1)
            fail_msg("combo %u: the call on a paired with the select, which had won on b "
                     "(the call on a got %d; the select's buffer for a holds %d)", combo,
                     c.a_got, l.va);
        assert_false(moor_future_done(&l.ops[0].base));
        if (send) {
            assert_int_equal(c.b_got, 2);  /* the select's value on b */
        } else {
            assert_int_equal(l.vb, 20);
        }
        assert_int_equal(moor_join(pf, NULL), 0);
        assert_int_equal(p.rc, 0);
        if (!send)
            assert_int_equal(p.got, 10);   /* P got the value sent on a */
        /* Nothing is left on either channel, and nobody waits. */
        int x = 1;
        for (int i = 0; i < 2; i++) {
            moor_chan *ch = i ? l.b : l.a;
            assert_int_equal(moor_chan_len(ch), 0);
            assert_int_equal(moor_chan_try_recv(ch, &x), -EAGAIN);
            if (!cap)
                assert_int_equal(moor_chan_try_send(ch, &x), -EAGAIN);
        }
        moor_chan_free(l.a);
        moor_chan_free(l.b);
    }
    ex_free(ex);
}

/* ---- a receive future whose waker is not a fiber's -----------------------------------------
 * A moor_chan_recv_init future waits with the waker of whatever polls it: a select (whose
 * claim keeps it off moor_chan_send's fast path), a plain task, a zeroed waker (a future
 * polled by hand), or a task of another thread's executor. Completed by moor_chan_send (from
 * plain code and from a fiber), the value arrives exactly once, and the waker is woken. */

typedef struct fw_send {
    moor_chan *ch;
    int value;
    int rc;
    int yields; /* before the send (in a fiber) */
} fw_send;

static intptr_t fw_send_fn(void *arg)
{
    fw_send *s = arg;
    for (int i = 0; i < s->yields; i++)
        moor_yield();
    s->rc = moor_chan_send(s->ch, &s->value, -1);
    return 0;
}

/* Send s->value from a fiber, or from plain code; assert it went. */
static void fw_send_now(fw_send *s, int from_fiber)
{
    s->rc = 1;
    if (from_fiber) {
        moor_fiber *f;
        assert_int_equal(moor_spawn(&f, fw_send_fn, s, NULL), 0);
        assert_int_equal(moor_join(f, NULL), 0);
    } else {
        fw_send_fn(s);
    }
    assert_int_equal(s->rc, 0);
}

/* The value is gone from the channel: not buffered as well, nobody else served. */
static void fw_channel_empty(moor_chan *ch, size_t cap)
{
    int x = 1;
    assert_int_equal(moor_chan_len(ch), 0);
    assert_int_equal(moor_chan_try_recv(ch, &x), -EAGAIN);
    if (!cap)
        assert_int_equal(moor_chan_try_send(ch, &x), -EAGAIN);
}

typedef struct fw_select {
    moor_chan *ch, *idle;
    int v, w;
    moor_chan_future ops[2];
    int rc;
} fw_select;

static intptr_t fw_select_fn(void *arg)
{
    fw_select *s = arg;
    moor_chan_recv_init(&s->ops[0], s->ch, &s->v, -1);
    moor_chan_recv_init(&s->ops[1], s->idle, &s->w, -1);
    moor_future *futs[2] = {&s->ops[0].base, &s->ops[1].base};
    s->rc = moor_select(futs, 2, -1); /* no deadline: a lost wake shows as a deadlock */
    return 0;
}

/* A task of another thread's executor: a fiber there awaits a gate future that keeps the
 * waker of its first poll and is ready at its next; nothing but a wake polls it again. */
typedef struct fw_gate {
    moor_future base;
    moor_waker waker;
    int polls;
    int published; /* atomic: waker is set (-1: no executor could be made) */
    int finished;  /* atomic: the fiber's await returned */
    intptr_t out;  /* the fiber's await: the gate's polls */
} fw_gate;

static moor_poll fw_gate_poll(moor_future *fut, moor_cx *cx)
{
    fw_gate *g = moor_container_of(fut, fw_gate, base);
    if (g->polls++ == 0) {
        g->waker = cx->waker;
        __atomic_store_n(&g->published, 1, __ATOMIC_RELEASE);
        return MOOR_PENDING;
    }
    fut->result = g->polls;
    return MOOR_READY;
}

static const moor_future_ops fw_gate_ops = {"gate", fw_gate_poll, NULL};

static intptr_t fw_gate_fiber(void *arg)
{
    fw_gate *g = arg;
    g->out = moor_await(&g->base);
    __atomic_store_n(&g->finished, 1, __ATOMIC_RELEASE);
    return 0;
}

static void *fw_gate_thread(void *arg)
{
    fw_gate *g = arg;
    moor_executor *ex;
    if (moor_executor_new(&ex, NULL) != 0) {
        __atomic_store_n(&g->published, -1, __ATOMIC_RELEASE);
        return NULL;
    }
    /* The gate has no kind that calls it local: its wait is never taken for a deadlock. */
    moor_fiber *f;
    if (moor_spawn(&f, fw_gate_fiber, g, NULL) == 0)
        (void)moor_join(f, NULL);
    moor_executor_free(ex);
    return NULL;
}

/* Has the gate's fiber been woken (and finished)? If not within SAFETY_MS, wake it here so
 * that its thread ends, and say so. */
static int fw_gate_woken(fw_gate *g, pthread_t t)
{
    int64_t until = moor_now() + SAFETY_MS;
    while (!__atomic_load_n(&g->finished, __ATOMIC_ACQUIRE) && moor_now() < until)
        sleep_ms(1);
    int woken = __atomic_load_n(&g->finished, __ATOMIC_ACQUIRE);
    if (!woken)
        moor_waker_wake(&g->waker);
    assert_int_equal(pthread_join(t, NULL), 0);
    return woken;
}

static void test_select_recv_future_foreign_waker(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    for (size_t cap = 0; cap <= 1; cap++) {
        for (int from_fiber = 0; from_fiber < 2; from_fiber++) {
            moor_chan *ch = chan_new(sizeof(int), cap);
            int value = 70 + (int)cap * 2 + from_fiber;
            fw_send s = {ch, value, 1, 0};

            /* In a select: in a fiber when plain code sends, in plain code when a fiber does
             * (its sender waits for the select, which it finds polled and pending). */
            fw_select sel = {.ch = ch, .idle = chan_new(sizeof(int), cap), .v = -1, .w = -1,
                             .rc = -99};
            if (!from_fiber) {
                moor_fiber *sf;
                assert_int_equal(moor_spawn(&sf, fw_select_fn, &sel, NULL), 0);
                settle();
                assert_int_equal(sel.rc, -99); /* it waits */
                fw_send_now(&s, 0);
                assert_int_equal(moor_join(sf, NULL), 0);
            } else {
                s.rc = 1;
                s.yields = 3;
                moor_fiber *f;
                assert_int_equal(moor_spawn(&f, fw_send_fn, &s, NULL), 0);
                fw_select_fn(&sel); /* the sender sends while the select waits */
                assert_int_equal(moor_join(f, NULL), 0);
                assert_int_equal(s.rc, 0);
                s.yields = 0;
            }
            assert_int_equal(sel.rc, 0);
            assert_int_equal(sel.ops[0].base.result, 0);
            assert_int_equal(sel.v, value);
            assert_false(moor_future_done(&sel.ops[1].base));
            assert_int_equal(sel.w, -1);
            fw_channel_empty(ch, cap);
            fw_channel_empty(sel.idle, cap);
            moor_chan_free(sel.idle);

            /* In a plain task: the send wakes the task, whose next poll finds the value. */
            int v = -1;
            moor_chan_future op;
            moor_chan_recv_init(&op, ch, &v, -1);
            assert_int_equal(moor_spawn_future(&op.base), 0);
            settle(); /* polled once: it waits */
            assert_false(moor_future_done(&op.base));
            fw_send_now(&s, from_fiber);
            assert_int_equal(moor_executor_run(ex), 0); /* the task is woken and finishes */
            assert_true(moor_future_done(&op.base));
            assert_int_equal(op.base.result, 0);
            assert_int_equal(v, value);
            fw_channel_empty(ch, cap);

            /* Polled by hand with a zeroed waker, which wakes nothing: the value is there at
             * the next poll. */
            v = -1;
            moor_cx none = {{NULL, NULL, 0}, NULL, NULL};
            moor_chan_recv_init(&op, ch, &v, -1);
            assert_int_equal(moor_future_poll(&op.base, &none), MOOR_PENDING);
            fw_send_now(&s, from_fiber);
            assert_int_equal(v, value); /* handed over at the send */
            assert_int_equal(moor_future_poll(&op.base, &none), MOOR_READY);
            assert_int_equal(op.base.result, 0);
            fw_channel_empty(ch, cap);

            /* Polled by hand with the waker of a task of another thread: the send wakes that
             * task, across threads. */
            fw_gate g;
            memset(&g, 0, sizeof g);
            moor_future_init(&g.base, &fw_gate_ops, 0);
            pthread_t t;
            assert_int_equal(pthread_create(&t, NULL, fw_gate_thread, &g), 0);
            while (__atomic_load_n(&g.published, __ATOMIC_ACQUIRE) == 0)
                sleep_ms(1);
            assert_int_equal(__atomic_load_n(&g.published, __ATOMIC_ACQUIRE), 1);
            v = -1;
            moor_cx remote = {g.waker, NULL, NULL};
            moor_chan_recv_init(&op, ch, &v, -1);
            assert_int_equal(moor_future_poll(&op.base, &remote), MOOR_PENDING);
            fw_send_now(&s, from_fiber);
            if (!fw_gate_woken(&g, t))
                fail_msg("capacity %zu: the send handed the value over but did not wake the "
                         "other thread's task", cap);
            assert_int_equal(g.out, 2);
            assert_int_equal(v, value);
            assert_int_equal(moor_future_poll(&op.base, &remote), MOOR_READY);
            assert_int_equal(op.base.result, 0);
            fw_channel_empty(ch, cap);
            moor_chan_free(ch);
        }
    }
    ex_free(ex);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_select_one_of_1000),
        TEST(test_select_ready_before_select),
        TEST(test_select_deadline),
        TEST(test_select_never_takes_two),
        TEST(test_select_many_senders_one_taken),
        TEST(test_select_send_and_recv_same_channel),
        TEST(test_select_sleep_and_chan),
        TEST(test_select_losing_sleep_cancelled_past_deadline),
        TEST(test_select_race),
        TEST(test_select_timeout),
        TEST(test_select_join_all),
        TEST(test_select_join_all_in_fiber),
        TEST(test_select_retry_succeeds_on_third),
        TEST(test_select_retry_outcomes),
        TEST(test_select_retry_spawned_as_task),
        TEST(test_select_retry_attempt_finished_before_deadline_counts),
        TEST(test_select_retry_attempt_pending_at_deadline_times_out),
        TEST(test_select_cancelled_fiber),
        TEST(test_select_already_done_future_wins),
        TEST(test_select_timeout_of_retry_keeps_value),
        TEST(test_select_retry_of_recv_wins_select),
        TEST(test_select_user_wrapper_claims_for_itself),
        TEST(test_select_ready_results_in_cancelled_fiber),
        TEST(test_select_lost_waiter_before_plain_waiter),
        TEST(test_select_recv_future_foreign_waker),
    };
    return RUN_TESTS(tests);
}
