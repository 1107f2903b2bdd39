/* Channels: order at every capacity, FIFO service of waiting senders and receivers, close
 * semantics, the non-blocking calls, many senders against many receivers, deadlines,
 * cancellation of a blocked fiber (and that a value already handed over is never lost), the
 * operation futures awaited and block_on'd, elements of many sizes, and misuse.
 *
 * Checks inside fibers are FCHECKs (fixture.h). Timing is asserted only as a lower bound. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moor.h"

#include "fixture.h"

/* ---- scaffolding of this file (the shared fixture is in fixture.h) ---------------------- */

/* A fiber that does one channel call and reports what it saw. */
typedef struct chan_call {
    moor_chan *ch;
    int send;           /* 1: send `value`; 0: receive into `got` */
    int use_future;     /* await a moor_chan_op instead of calling send/recv */
    int64_t deadline;
    int value;
    int got;
    int rc;
    int returned;       /* set once the call has returned */
    int64_t returned_at;
} chan_call;

static intptr_t chan_call_fn(void *arg)
{
    chan_call *c = arg;
    if (c->use_future) {
        moor_chan_op op;
        if (c->send)
            moor_chan_send_init(&op, c->ch, &c->value, c->deadline);
        else
            moor_chan_recv_init(&op, c->ch, &c->got, c->deadline);
        c->rc = (int)moor_await(&op.base);
    } else {
        c->rc = c->send ? moor_chan_send(c->ch, &c->value, c->deadline)
                        : moor_chan_recv(c->ch, &c->got, c->deadline);
    }
    c->returned = 1;
    c->returned_at = moor_now();
    return c->rc;
}

/* ---- creation ---------------------------------------------------------------------------- */

static void test_chan_new_rejects_bad_sizes(void **state)
{
    (void)state;
    moor_chan *ch = (moor_chan *)0x1;
    assert_int_equal(moor_chan_new(&ch, 0, 4), -EINVAL);
    assert_int_equal(moor_chan_new(&ch, 0, 0), -EINVAL);
    assert_int_equal(moor_chan_new(&ch, SIZE_MAX / 2, 3), -EINVAL); /* size * capacity overflows */
    assert_int_equal(moor_chan_new(&ch, SIZE_MAX / 2 + 1, 2), -EINVAL);
    assert_int_equal(moor_chan_new(&ch, 3, SIZE_MAX / 2), -EINVAL);
    /* Representable, but no memory is that large: -ENOMEM, never a short ring. */
    assert_int_equal(moor_chan_new(&ch, 1, SIZE_MAX), -ENOMEM);
    assert_int_equal(moor_chan_new(&ch, SIZE_MAX, 1), -ENOMEM);
    assert_int_equal(moor_chan_new(&ch, 16, SIZE_MAX / 16), -ENOMEM);
    assert_ptr_equal(ch, (moor_chan *)0x1);                           /* untouched on error */
    /* No executor is needed to make, use without waiting, and free a channel. */
    ch = chan_new(sizeof(int), 1);
    int v = 5, w = 0;
    assert_int_equal(moor_chan_try_send(ch, &v), 0);
    assert_int_equal(moor_chan_try_recv(ch, &w), 0);
    assert_int_equal(w, 5);
    moor_chan_free(ch);
    moor_chan_free(NULL);
}

/* ---- order -------------------------------------------------------------------------------- */

#define ORDER_N 3000

typedef struct order_ctx {
    moor_chan *ch;
    int yield_every; /* 0: never */
    int mismatches;
    int first_bad;
    int received;
} order_ctx;

static intptr_t order_producer(void *arg)
{
    order_ctx *o = arg;
    for (int i = 0; i < ORDER_N; i++) {
        FCHECK(moor_chan_send(o->ch, &i, moor_deadline_in(SAFETY_MS)) == 0);
        if (o->yield_every && i % o->yield_every == 0)
            moor_yield();
    }
    return 0;
}

static intptr_t order_consumer(void *arg)
{
    order_ctx *o = arg;
    for (int i = 0; i < ORDER_N; i++) {
        int v = -1;
        FCHECK(moor_chan_recv(o->ch, &v, moor_deadline_in(SAFETY_MS)) == 0);
        if (v != i && o->mismatches++ == 0)
            o->first_bad = i;
        o->received++;
        if (o->yield_every && i % (o->yield_every + 1) == 0)
            moor_yield();
    }
    return 0;
}

static void test_chan_order_preserved(void **state)
{
    (void)state;
    static const size_t caps[] = {0, 1, 2, 16, ORDER_N + 1};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        for (int yield_every = 0; yield_every <= 3; yield_every += 3) {
            moor_executor *ex = ex_new();
            order_ctx o = {.ch = chan_new(sizeof(int), caps[c]), .yield_every = yield_every};
            moor_fiber *p, *q;
            /* Consumer first for one half, producer first for the other. */
            if (yield_every) {
                assert_int_equal(moor_spawn(&q, order_consumer, &o, NULL), 0);
                assert_int_equal(moor_spawn(&p, order_producer, &o, NULL), 0);
            } else {
                assert_int_equal(moor_spawn(&p, order_producer, &o, NULL), 0);
                assert_int_equal(moor_spawn(&q, order_consumer, &o, NULL), 0);
            }
            assert_int_equal(moor_join(p, NULL), 0);
            assert_int_equal(moor_join(q, NULL), 0);
            if (o.mismatches)
                fail_msg("capacity %zu: %d values out of order, first at %d", caps[c],
                         o.mismatches, o.first_bad);
            assert_int_equal(o.received, ORDER_N);
            assert_int_equal(moor_chan_len(o.ch), 0);
            moor_chan_free(o.ch);
            ex_free(ex);
        }
    }
}

/* Plain code on one side: its sends wait by running the executor. */
static void test_chan_order_plain_code_sender(void **state)
{
    (void)state;
    static const size_t caps[] = {0, 1, 5};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        moor_executor *ex = ex_new();
        order_ctx o = {.ch = chan_new(sizeof(int), caps[c]), .yield_every = 2};
        moor_fiber *q;
        assert_int_equal(moor_spawn(&q, order_consumer, &o, NULL), 0);
        for (int i = 0; i < ORDER_N; i++)
            assert_int_equal(moor_chan_send(o.ch, &i, moor_deadline_in(SAFETY_MS)), 0);
        assert_int_equal(moor_join(q, NULL), 0);
        assert_int_equal(o.mismatches, 0);
        assert_int_equal(o.received, ORDER_N);
        moor_chan_free(o.ch);
        ex_free(ex);
    }
}

/* ---- FIFO service of waiters --------------------------------------------------------------- */

#define FIFO_N 10

static void test_chan_fifo_waiting_senders(void **state)
{
    (void)state;
    static const size_t caps[] = {0, 1, 3};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        moor_executor *ex = ex_new();
        size_t cap = caps[c];
        moor_chan *ch = chan_new(sizeof(int), cap);
        for (size_t i = 0; i < cap; i++) { /* fill the ring: the senders below must wait */
            int v = 1000 + (int)i;
            assert_int_equal(moor_chan_try_send(ch, &v), 0);
        }
        chan_call calls[FIFO_N];
        moor_fiber *f[FIFO_N];
        for (int i = 0; i < FIFO_N; i++) {
            /* Every other sender waits through a future, some with a deadline: the queue is
             * one queue whatever way a sender waits. */
            calls[i] = (chan_call){.ch = ch, .send = 1, .use_future = i % 2,
                                   .deadline = i % 3 ? moor_deadline_in(SAFETY_MS) : -1,
                                   .value = i};
            assert_int_equal(moor_spawn(&f[i], chan_call_fn, &calls[i], NULL), 0);
        }
        settle();
        for (int i = 0; i < FIFO_N; i++)
            assert_false(calls[i].returned); /* all of them are waiting */
        assert_int_equal(moor_chan_len(ch), cap);

        /* Take one value at a time: buffered ones first, then the senders in arrival order,
         * and only the sender whose value was taken (or moved into the ring) returns. */
        for (size_t i = 0; i < cap; i++) {
            int v = -1;
            assert_int_equal(moor_chan_try_recv(ch, &v), 0);
            assert_int_equal(v, 1000 + (int)i);
            settle();
            for (int j = 0; j < FIFO_N; j++)
                assert_int_equal(calls[j].returned, j <= (int)i);
        }
        for (int i = 0; i < FIFO_N; i++) {
            int v = -1;
            assert_int_equal(moor_chan_try_recv(ch, &v), 0);
            assert_int_equal(v, i);
            settle();
            for (int j = 0; j < FIFO_N; j++)
                assert_int_equal(calls[j].returned, j <= i + (int)cap);
        }
        int v;
        assert_int_equal(moor_chan_try_recv(ch, &v), -EAGAIN);
        for (int i = 0; i < FIFO_N; i++) {
            intptr_t r = -1;
            assert_int_equal(moor_join(f[i], &r), 0);
            assert_int_equal(r, 0);
        }
        moor_chan_free(ch);
        ex_free(ex);
    }
}

static void test_chan_fifo_waiting_receivers(void **state)
{
    (void)state;
    static const size_t caps[] = {0, 4};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        moor_executor *ex = ex_new();
        moor_chan *ch = chan_new(sizeof(int), caps[c]);
        chan_call calls[FIFO_N];
        moor_fiber *f[FIFO_N];
        for (int i = 0; i < FIFO_N; i++) {
            calls[i] = (chan_call){.ch = ch, .use_future = i % 2 == 0,
                                   .deadline = i % 4 ? moor_deadline_in(SAFETY_MS) : -1,
                                   .got = -1};
            assert_int_equal(moor_spawn(&f[i], chan_call_fn, &calls[i], NULL), 0);
        }
        settle();
        for (int i = 0; i < FIFO_N; i++)
            assert_false(calls[i].returned);
        /* Each value goes straight to the receiver that has waited longest. */
        for (int i = 0; i < FIFO_N; i++) {
            int v = 100 + i;
            assert_int_equal(moor_chan_try_send(ch, &v), 0);
            assert_int_equal(moor_chan_len(ch), 0); /* handed over, not buffered */
        }
        for (int i = 0; i < FIFO_N; i++) {
            intptr_t r = -1;
            assert_int_equal(moor_join(f[i], &r), 0);
            assert_int_equal(r, 0);
            assert_int_equal(calls[i].got, 100 + i);
        }
        moor_chan_free(ch);
        ex_free(ex);
    }
}

/* ---- close --------------------------------------------------------------------------------- */

static void test_chan_close_drains_then_epipe(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch = chan_new(sizeof(int), 4);
    for (int i = 1; i <= 3; i++)
        assert_int_equal(moor_chan_send(ch, &i, -1), 0);
    assert_int_equal(moor_chan_len(ch), 3);
    moor_chan_close(ch);
    int v = 9;
    assert_int_equal(moor_chan_send(ch, &v, -1), -EPIPE);
    assert_int_equal(moor_chan_send(ch, &v, moor_deadline_in(SAFETY_MS)), -EPIPE);
    assert_int_equal(moor_chan_try_send(ch, &v), -EPIPE);
    assert_int_equal(moor_chan_len(ch), 3); /* the refused sends added nothing */

    v = 0;
    assert_int_equal(moor_chan_recv(ch, &v, -1), 0);
    assert_int_equal(v, 1);
    assert_int_equal(moor_chan_len(ch), 2);
    assert_int_equal(moor_chan_try_recv(ch, &v), 0);
    assert_int_equal(v, 2);
    assert_int_equal(moor_chan_len(ch), 1);
    moor_chan_op op;
    moor_chan_recv_init(&op, ch, &v, -1);
    assert_int_equal(moor_block_on(&op.base), 0);
    assert_int_equal(v, 3);
    assert_int_equal(moor_chan_len(ch), 0);
    v = 77;
    assert_int_equal(moor_chan_recv(ch, &v, -1), -EPIPE); /* drained: never waits */
    assert_int_equal(moor_chan_recv(ch, &v, moor_deadline_in(SAFETY_MS)), -EPIPE);
    assert_int_equal(moor_chan_try_recv(ch, &v), -EPIPE);
    moor_chan_recv_init(&op, ch, &v, -1);
    assert_int_equal(moor_block_on(&op.base), -EPIPE);
    assert_int_equal(v, 77); /* nothing was written to elem */
    moor_chan_free(ch);

    /* A rendezvous channel closed with nobody waiting. */
    ch = chan_new(sizeof(int), 0);
    moor_chan_close(ch);
    assert_int_equal(moor_chan_recv(ch, &v, -1), -EPIPE);
    assert_int_equal(moor_chan_send(ch, &v, -1), -EPIPE);
    assert_int_equal(moor_chan_try_recv(ch, &v), -EPIPE);
    assert_int_equal(moor_chan_try_send(ch, &v), -EPIPE);
    moor_chan_free(ch);
    ex_free(ex);
}

#define CLOSE_WAITERS 4

static void test_chan_close_wakes_blocked(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *rx = chan_new(sizeof(int), 0); /* its receivers wait: nothing to receive */
    moor_chan *tx = chan_new(sizeof(int), 1); /* its senders wait: the ring is full */
    int first = 41;
    assert_int_equal(moor_chan_try_send(tx, &first), 0);
    chan_call calls[2 * CLOSE_WAITERS];
    moor_fiber *f[2 * CLOSE_WAITERS];
    for (int i = 0; i < 2 * CLOSE_WAITERS; i++) {
        int send = i >= CLOSE_WAITERS;
        calls[i] = (chan_call){.ch = send ? tx : rx, .send = send, .use_future = i % 2,
                               .deadline = i % 3 == 0 ? -1 : moor_deadline_in(SAFETY_MS),
                               .value = i, .got = -1};
        assert_int_equal(moor_spawn(&f[i], chan_call_fn, &calls[i], NULL), 0);
    }
    settle();
    for (int i = 0; i < 2 * CLOSE_WAITERS; i++)
        assert_false(calls[i].returned);
    moor_chan_close(rx);
    moor_chan_close(tx);
    for (int i = 0; i < 2 * CLOSE_WAITERS; i++) {
        intptr_t r = 0;
        assert_int_equal(moor_join(f[i], &r), 0);
        assert_int_equal(r, -EPIPE);
        assert_int_equal(calls[i].rc, -EPIPE);
        assert_int_equal(calls[i].got, -1);
    }
    /* What was buffered before the close still comes out, then -EPIPE. */
    int v = 0;
    assert_int_equal(moor_chan_recv(tx, &v, -1), 0);
    assert_int_equal(v, 41);
    assert_int_equal(moor_chan_recv(tx, &v, -1), -EPIPE);
    moor_chan_free(rx);
    moor_chan_free(tx);
    ex_free(ex);
}

/* A fiber closes the channel while others wait on it (close from a fiber, not plain code). */
typedef struct closer_ctx {
    moor_chan *ch;
    int yields;
} closer_ctx;

static intptr_t closer_fn(void *arg)
{
    closer_ctx *c = arg;
    for (int i = 0; i < c->yields; i++)
        moor_yield();
    moor_chan_close(c->ch);
    return 0;
}

static void test_chan_close_from_fiber(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch = chan_new(sizeof(int), 0);
    chan_call calls[3];
    moor_fiber *f[3], *cf;
    for (int i = 0; i < 3; i++) {
        calls[i] = (chan_call){.ch = ch, .send = i == 1, .deadline = -1, .value = i};
        assert_int_equal(moor_spawn(&f[i], chan_call_fn, &calls[i], NULL), 0);
    }
    /* Receiver 0 and sender 1 pair up; receiver 2 is left waiting until the close. */
    closer_ctx cc = {ch, 4};
    assert_int_equal(moor_spawn(&cf, closer_fn, &cc, NULL), 0);
    assert_int_equal(moor_join(cf, NULL), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    assert_int_equal(calls[0].rc, 0);
    assert_int_equal(calls[0].got, 1);
    assert_int_equal(calls[1].rc, 0);
    assert_int_equal(calls[2].rc, -EPIPE);
    moor_chan_free(ch);
    ex_free(ex);
}

/* ---- try_send / try_recv / len ---------------------------------------------------------- */

static void test_chan_try_ops(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int v = 0;

    /* Rendezvous: a try succeeds only against a waiting counterpart. */
    moor_chan *ch = chan_new(sizeof(int), 0);
    v = 1;
    assert_int_equal(moor_chan_try_send(ch, &v), -EAGAIN);
    assert_int_equal(moor_chan_try_recv(ch, &v), -EAGAIN);
    assert_int_equal(moor_chan_len(ch), 0);
    chan_call rcall = {.ch = ch, .deadline = -1, .got = -1};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, chan_call_fn, &rcall, NULL), 0);
    settle();
    v = 11;
    assert_int_equal(moor_chan_try_send(ch, &v), 0);
    assert_int_equal(moor_chan_try_send(ch, &v), -EAGAIN); /* that receiver is served */
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(rcall.got, 11);
    chan_call scall = {.ch = ch, .send = 1, .deadline = -1, .value = 12};
    assert_int_equal(moor_spawn(&f, chan_call_fn, &scall, NULL), 0);
    settle();
    v = 0;
    assert_int_equal(moor_chan_try_recv(ch, &v), 0);
    assert_int_equal(v, 12);
    assert_int_equal(moor_chan_try_recv(ch, &v), -EAGAIN);
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(scall.rc, 0);
    moor_chan_close(ch);
    assert_int_equal(moor_chan_try_send(ch, &v), -EPIPE);
    assert_int_equal(moor_chan_try_recv(ch, &v), -EPIPE);
    moor_chan_free(ch);

    /* Buffered: fills to capacity, empties in order, len follows; wraps around the ring. */
    ch = chan_new(sizeof(int), 3);
    for (int round = 0; round < 5; round++) {
        for (int i = 0; i < 3; i++) {
            v = round * 10 + i;
            assert_int_equal(moor_chan_try_send(ch, &v), 0);
            assert_int_equal(moor_chan_len(ch), (size_t)i + 1);
        }
        assert_int_equal(moor_chan_try_send(ch, &v), -EAGAIN);
        assert_int_equal(moor_chan_len(ch), 3);
        for (int i = 0; i < 2; i++) { /* leave one behind so that head moves round */
            assert_int_equal(moor_chan_try_recv(ch, &v), 0);
            assert_int_equal(v, round * 10 + i);
        }
        assert_int_equal(moor_chan_len(ch), 1);
        assert_int_equal(moor_chan_try_recv(ch, &v), 0);
        assert_int_equal(v, round * 10 + 2);
        assert_int_equal(moor_chan_try_recv(ch, &v), -EAGAIN);
        assert_int_equal(moor_chan_len(ch), 0);
    }
    v = 5;
    assert_int_equal(moor_chan_try_send(ch, &v), 0);
    moor_chan_close(ch);
    assert_int_equal(moor_chan_try_send(ch, &v), -EPIPE);
    assert_int_equal(moor_chan_try_recv(ch, &v), 0); /* drained after the close */
    assert_int_equal(v, 5);
    assert_int_equal(moor_chan_try_recv(ch, &v), -EPIPE);
    moor_chan_free(ch);
    ex_free(ex);
}

/* ---- 1,000 senders and 1,000 receivers on one channel ------------------------------------- */

#define MANY 1000

typedef struct many_ctx {
    moor_chan *ch;
    int counts[MANY];
    int bad_values;
    int received;
    uint32_t seed;
} many_ctx;

typedef struct many_arg {
    many_ctx *m;
    int value;   /* senders: what to send */
    int yields;  /* before the call */
} many_arg;

static intptr_t many_sender(void *arg)
{
    many_arg *a = arg;
    for (int i = 0; i < a->yields; i++)
        moor_yield();
    FCHECK(moor_chan_send(a->m->ch, &a->value, moor_deadline_in(SAFETY_MS)) == 0);
    return 0;
}

static intptr_t many_receiver(void *arg)
{
    many_arg *a = arg;
    for (int i = 0; i < a->yields; i++)
        moor_yield();
    int v = -1;
    FCHECK(moor_chan_recv(a->m->ch, &v, moor_deadline_in(SAFETY_MS)) == 0);
    if (v >= 0 && v < MANY)
        a->m->counts[v]++;
    else
        a->m->bad_values++;
    a->m->received++;
    return 0;
}

static void test_chan_many_senders_many_receivers(void **state)
{
    (void)state;
    static const size_t caps[] = {0, 16};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        moor_executor *ex = ex_new();
        many_ctx *m = calloc(1, sizeof *m);
        many_arg *args = calloc(2 * MANY, sizeof *args);
        moor_fiber **f = calloc(2 * MANY, sizeof *f);
        assert_non_null(m);
        assert_non_null(args);
        assert_non_null(f);
        m->ch = chan_new(sizeof(int), caps[c]);
        m->seed = 0x9e3779b9u + (uint32_t)c;
        /* Senders and receivers spawned in a shuffled interleaving, each yielding 0-3 times
         * first, so that both queues fill and drain in turn. */
        int next_sender = 0, next_receiver = 0;
        for (int i = 0; i < 2 * MANY; i++) {
            int send = next_receiver == MANY || (next_sender < MANY && rnd(&m->seed) % 2);
            args[i] = (many_arg){m, send ? next_sender : -1, (int)(rnd(&m->seed) % 4)};
            if (send)
                next_sender++;
            else
                next_receiver++;
            assert_int_equal(moor_spawn(&f[i], send ? many_sender : many_receiver, &args[i], NULL),
                             0);
        }
        for (int i = 0; i < 2 * MANY; i++)
            assert_int_equal(moor_join(f[i], NULL), 0);
        assert_int_equal(m->received, MANY);
        assert_int_equal(m->bad_values, 0);
        for (int v = 0; v < MANY; v++)
            if (m->counts[v] != 1)
                fail_msg("capacity %zu: value %d delivered %d times", caps[c], v, m->counts[v]);
        assert_int_equal(moor_chan_len(m->ch), 0);
        int v;
        assert_int_equal(moor_chan_try_recv(m->ch, &v), -EAGAIN);
        moor_chan_free(m->ch);
        free(f);
        free(args);
        free(m);
        ex_free(ex);
    }
}

/* ---- deadlines ----------------------------------------------------------------------------- */

static void expect_timeout_in_fiber(moor_chan *ch, int send, int use_future)
{
    int64_t start = moor_now();
    chan_call c = {.ch = ch, .send = send, .use_future = use_future,
                   .deadline = start + WAIT_MS, .value = 3, .got = -1};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, chan_call_fn, &c, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, -ETIMEDOUT);
    assert_true(c.returned_at >= c.deadline); /* never early */
    assert_int_equal(c.got, -1);
}

static void expect_timeout_plain(moor_chan *ch, int send)
{
    int v = 3;
    int64_t deadline = moor_deadline_in(WAIT_MS);
    int rc = send ? moor_chan_send(ch, &v, deadline) : moor_chan_recv(ch, &v, deadline);
    assert_int_equal(rc, -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_int_equal(v, 3);
}

static void test_chan_deadlines(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *rv = chan_new(sizeof(int), 0);
    moor_chan *full = chan_new(sizeof(int), 1);
    int v = 8;
    assert_int_equal(moor_chan_try_send(full, &v), 0);

    for (int fut = 0; fut < 2; fut++) {
        expect_timeout_in_fiber(rv, 0, fut);   /* recv on an empty channel */
        expect_timeout_in_fiber(rv, 1, fut);   /* send with no receiver */
        expect_timeout_in_fiber(full, 1, fut); /* send on a full channel */
    }
    expect_timeout_plain(rv, 0);
    expect_timeout_plain(rv, 1);
    expect_timeout_plain(full, 1);

    /* Nobody stayed queued: a rendezvous try finds no counterpart, the full channel still
     * holds only its first value, and the channels free without complaint. */
    assert_int_equal(moor_chan_try_send(rv, &v), -EAGAIN);
    assert_int_equal(moor_chan_try_recv(rv, &v), -EAGAIN);
    assert_int_equal(moor_chan_len(full), 1);
    assert_int_equal(moor_chan_try_recv(full, &v), 0);
    assert_int_equal(v, 8);
    assert_int_equal(moor_chan_try_recv(full, &v), -EAGAIN);

    /* A deadline already past does not stop a call that needs no waiting. */
    int64_t past = moor_now() - 1;
    v = 21;
    assert_int_equal(moor_chan_send(full, &v, past), 0);
    assert_int_equal(moor_chan_send(full, &v, past), -ETIMEDOUT);
    v = 0;
    assert_int_equal(moor_chan_recv(full, &v, past), 0);
    assert_int_equal(v, 21);
    assert_int_equal(moor_chan_recv(full, &v, past), -ETIMEDOUT);

    moor_chan_free(rv);
    moor_chan_free(full);
    ex_free(ex);
}

/* A value arriving before the deadline is received, and the deadline's timer goes with it. */
static void test_chan_value_before_deadline(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch = chan_new(sizeof(int), 0);
    chan_call c = {.ch = ch, .deadline = moor_deadline_in(SAFETY_MS), .got = -1};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, chan_call_fn, &c, NULL), 0);
    settle();
    assert_int_equal(ex_stats(ex).timers, 1); /* the receiver's deadline */
    int v = 66;
    assert_int_equal(moor_chan_send(ch, &v, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(c.rc, 0);
    assert_int_equal(c.got, 66);
    assert_int_equal(ex_stats(ex).timers, 0);
    moor_chan_free(ch);
    ex_free(ex);
}

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

static void test_chan_cancelled_before_waiting(void **state)
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
static void test_chan_value_never_lost_on_cancel(void **state)
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

/* ---- the operation futures, and elements of many sizes --------------------------------- */

typedef struct rec {
    uint8_t tag;
    double weight;
    uint64_t id;
    char name[13];
    int16_t delta;
} rec;

#define SIZES_K 4     /* values per direction */
#define CANARY 0xA5

static void pattern(unsigned char *p, size_t size, int k)
{
    for (size_t j = 0; j < size; j++)
        p[j] = (unsigned char)(k * 37 + (int)j * 11 + (int)size);
}

typedef struct sized_ctx {
    moor_chan *ch;
    size_t size;
    int send;                 /* what the fiber does */
    unsigned char buf[SIZES_K][64];
    int rcs[SIZES_K];
} sized_ctx;

static intptr_t sized_fiber(void *arg)
{
    sized_ctx *s = arg;
    for (int k = 0; k < SIZES_K; k++) {
        moor_chan_op op;
        if (s->send) {
            pattern(s->buf[k], s->size, k);
            moor_chan_send_init(&op, s->ch, s->buf[k], k % 2 ? moor_deadline_in(SAFETY_MS) : -1);
        } else {
            memset(s->buf[k], CANARY, sizeof s->buf[k]);
            moor_chan_recv_init(&op, s->ch, s->buf[k], k % 2 ? moor_deadline_in(SAFETY_MS) : -1);
        }
        FCHECK(op.chan == s->ch);
        s->rcs[k] = (int)moor_await(&op.base);
        FCHECK(moor_future_done(&op.base));
        FCHECK(op.base.result == s->rcs[k]);
        if (k == 1)
            moor_yield();
    }
    return 0;
}

static void check_received(const unsigned char *buf, size_t size, int k)
{
    unsigned char want[64];
    pattern(want, size, k);
    assert_memory_equal(buf, want, size);
    for (size_t j = size; j < 64; j++)
        assert_int_equal(buf[j], CANARY); /* nothing written past the element */
}

static void test_chan_op_futures_and_sizes(void **state)
{
    (void)state;
    static const size_t sizes[] = {1, 2, 3, 4, 8, 16, 24, 33, 64};
    static const size_t caps[] = {0, 3};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
            for (int fiber_sends = 0; fiber_sends < 2; fiber_sends++) {
                moor_executor *ex = ex_new();
                size_t size = sizes[si];
                sized_ctx *s = calloc(1, sizeof *s);
                assert_non_null(s);
                s->ch = chan_new(size, caps[c]);
                s->size = size;
                s->send = fiber_sends;
                moor_fiber *f;
                assert_int_equal(moor_spawn(&f, sized_fiber, s, NULL), 0);
                /* Plain code does the other side with block_on on operation futures. */
                for (int k = 0; k < SIZES_K; k++) {
                    unsigned char buf[64];
                    moor_chan_op op;
                    if (fiber_sends) {
                        memset(buf, CANARY, sizeof buf);
                        moor_chan_recv_init(&op, s->ch, buf,
                                            k % 2 ? -1 : moor_deadline_in(SAFETY_MS));
                        assert_int_equal(moor_block_on(&op.base), 0);
                        check_received(buf, size, k);
                    } else {
                        pattern(buf, size, k);
                        moor_chan_send_init(&op, s->ch, buf,
                                            k % 2 ? -1 : moor_deadline_in(SAFETY_MS));
                        assert_int_equal(moor_block_on(&op.base), 0);
                    }
                    assert_true(moor_future_done(&op.base));
                }
                assert_int_equal(moor_join(f, NULL), 0);
                for (int k = 0; k < SIZES_K; k++) {
                    assert_int_equal(s->rcs[k], 0);
                    if (!fiber_sends)
                        check_received(s->buf[k], size, k);
                }
                moor_chan_free(s->ch);
                free(s);
                ex_free(ex);
            }
        }
    }
}

typedef struct rec_ctx {
    moor_chan *ch;
    rec got[3];
    int rcs[3];
} rec_ctx;

static intptr_t rec_receiver(void *arg)
{
    rec_ctx *r = arg;
    for (int i = 0; i < 3; i++)
        r->rcs[i] = moor_chan_recv(r->ch, &r->got[i], moor_deadline_in(SAFETY_MS));
    return 0;
}

static void test_chan_struct_elements(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    for (size_t cap = 0; cap <= 2; cap += 2) {
        rec_ctx r;
        memset(&r, 0, sizeof r);
        r.ch = chan_new(sizeof(rec), cap);
        moor_fiber *f;
        assert_int_equal(moor_spawn(&f, rec_receiver, &r, NULL), 0);
        rec sent[3];
        for (int i = 0; i < 3; i++) {
            memset(&sent[i], 0, sizeof sent[i]);
            sent[i].tag = (uint8_t)(0xF0 + i);
            sent[i].weight = 1.5 * (i + 1);
            sent[i].id = UINT64_C(0x0123456789abcdef) + (uint64_t)i;
            memcpy(sent[i].name, "record-0", 9);
            sent[i].name[7] = (char)('0' + i);
            sent[i].delta = (int16_t)(-300 * (i + 1));
            moor_chan_op op;
            moor_chan_send_init(&op, r.ch, &sent[i], -1);
            assert_int_equal(moor_block_on(&op.base), 0);
        }
        assert_int_equal(moor_join(f, NULL), 0);
        for (int i = 0; i < 3; i++) {
            assert_int_equal(r.rcs[i], 0);
            assert_int_equal(r.got[i].tag, sent[i].tag);
            assert_true(r.got[i].weight == sent[i].weight);
            assert_true(r.got[i].id == sent[i].id);
            assert_string_equal(r.got[i].name, sent[i].name);
            assert_int_equal(r.got[i].delta, sent[i].delta);
        }
        moor_chan_free(r.ch);
    }
    ex_free(ex);
}

/* An op future with a deadline reports -ETIMEDOUT as its output; the same op struct can be
 * initialised again and reused once it is done. */
typedef struct reuse_ctx {
    moor_chan *ch, *ready;
} reuse_ctx;

static intptr_t await_timeout_then_reuse(void *arg)
{
    reuse_ctx *c = arg;
    int v = -1;
    moor_chan_op op;
    int64_t deadline = moor_deadline_in(WAIT_MS);
    moor_chan_recv_init(&op, c->ch, &v, deadline);
    FCHECK(moor_await(&op.base) == -ETIMEDOUT);
    FCHECK(moor_now() >= deadline);
    FCHECK(op.base.result == -ETIMEDOUT);
    FCHECK(moor_future_done(&op.base));
    int one = 1;
    FCHECK(moor_chan_try_send(c->ready, &one) == 0); /* tell plain code to send now */
    moor_chan_recv_init(&op, c->ch, &v, moor_deadline_in(SAFETY_MS));
    FCHECK(moor_await(&op.base) == 0);
    FCHECK(v == 31);
    return 0;
}

static void test_chan_op_future_deadline(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    reuse_ctx c = {chan_new(sizeof(int), 0), chan_new(sizeof(int), 1)};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, await_timeout_then_reuse, &c, NULL), 0);
    int v;
    assert_int_equal(moor_chan_recv(c.ready, &v, moor_deadline_in(SAFETY_MS)), 0);
    v = 31;
    assert_int_equal(moor_chan_send(c.ch, &v, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(moor_join(f, NULL), 0);
    moor_chan_free(c.ch);
    moor_chan_free(c.ready);
    ex_free(ex);
}

/* ---- misuse (forked children) -------------------------------------------------------------- */

static void close_twice_child(void *arg)
{
    (void)arg;
    moor_chan *ch;
    CHILD_REQUIRE(moor_chan_new(&ch, 4, 1) == 0);
    moor_chan_close(ch);
    moor_chan_close(ch);
}

static intptr_t recv_forever(void *arg)
{
    int v;
    return moor_chan_recv(arg, &v, -1);
}

static void free_with_waiter_child(void *arg)
{
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_chan *ch;
    CHILD_REQUIRE(moor_chan_new(&ch, 4, arg ? 2 : 0) == 0);
    moor_fiber *f, *y;
    CHILD_REQUIRE(moor_spawn(&f, recv_forever, ch, NULL) == 0);
    CHILD_REQUIRE(moor_spawn(&y, yield_n, (void *)4, NULL) == 0);
    CHILD_REQUIRE(moor_join(y, NULL) == 0);
    moor_chan_free(ch);
}

static void test_chan_misuse_asserts(void **state)
{
    (void)state;
    child_report r;
    child_run(close_twice_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_chan_close: the channel is already closed");
    child_run(free_with_waiter_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_chan_free: a fiber still waits on the channel");
    child_run(free_with_waiter_child, (void *)1, &r);
    expect_child_signal(&r, SIGABRT, "still waits");
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_chan_new_rejects_bad_sizes),
        TEST(test_chan_order_preserved),
        TEST(test_chan_order_plain_code_sender),
        TEST(test_chan_fifo_waiting_senders),
        TEST(test_chan_fifo_waiting_receivers),
        TEST(test_chan_close_drains_then_epipe),
        TEST(test_chan_close_wakes_blocked),
        TEST(test_chan_close_from_fiber),
        TEST(test_chan_try_ops),
        TEST(test_chan_many_senders_many_receivers),
        TEST(test_chan_deadlines),
        TEST(test_chan_value_before_deadline),
        TEST(test_chan_cancel_blocked),
        TEST(test_chan_cancelled_before_waiting),
        TEST(test_chan_value_never_lost_on_cancel),
        TEST(test_chan_cancel_then_send_loses_nothing),
        TEST(test_chan_op_futures_and_sizes),
        TEST(test_chan_struct_elements),
        TEST(test_chan_op_future_deadline),
        TEST(test_chan_misuse_asserts),
    };
    return RUN_TESTS(tests);
}
