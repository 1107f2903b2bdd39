/* Channels: creation, order at every capacity (plain code on either side too, past its
 * cooperative budget), values of every size, FIFO service of waiting senders and receivers,
 * the non-blocking calls, many senders against many receivers, and misuse. Closing is tested
 * in test_chan_close.c, deadlines in test_chan_deadline.c, cancellation in
 * test_chan_cancel.c, the operation futures in test_chan_op.c, select over them in
 * test_select.c.
 *
 * Checks inside fibers are FCHECKs (fixture.h). */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "moor.h"

#include "fixture.h"

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

/* Plain code receiving: its receives take from waiting senders on moor_chan_recv's fast path
 * (a rendezvous channel) or through the ring, and wait by running the executor. One producer
 * fiber streams ORDER_N values; then PLAIN_WAITERS fibers, one value each, all wait to send
 * before plain code receives, so that far more receives than the executor's cooperative
 * budget (128) are hand-offs in a row: the budget runs out inside the fast path, whose yield
 * runs the senders it has woken. Order and count are checked throughout. */
#define PLAIN_WAITERS 300

typedef struct one_send {
    moor_chan *ch;
    int value;
    int rc;
} one_send;

static intptr_t one_send_fn(void *arg)
{
    one_send *s = arg;
    s->rc = moor_chan_send(s->ch, &s->value, -1);
    return 0;
}

static void test_chan_order_plain_code_receiver(void **state)
{
    (void)state;
    static const size_t caps[] = {0, 1, 5};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        for (int yield_every = 0; yield_every <= 3; yield_every += 3) {
            moor_executor *ex = ex_new();
            order_ctx o = {.ch = chan_new(sizeof(int), caps[c]), .yield_every = yield_every};
            moor_fiber *p;
            assert_int_equal(moor_spawn(&p, order_producer, &o, NULL), 0);
            for (int i = 0; i < ORDER_N; i++) {
                int v = -1;
                assert_int_equal(moor_chan_recv(o.ch, &v, -1), 0);
                if (v != i && o.mismatches++ == 0)
                    o.first_bad = i;
                o.received++;
            }
            assert_int_equal(moor_join(p, NULL), 0);
            if (o.mismatches)
                fail_msg("capacity %zu: %d values out of order, first at %d", caps[c],
                         o.mismatches, o.first_bad);
            assert_int_equal(o.received, ORDER_N);
            assert_int_equal(moor_chan_len(o.ch), 0);

            /* Every sender waits before the first receive. */
            one_send *s = calloc(PLAIN_WAITERS, sizeof *s);
            moor_fiber **f = calloc(PLAIN_WAITERS, sizeof *f);
            assert_non_null(s);
            assert_non_null(f);
            for (int i = 0; i < PLAIN_WAITERS; i++) {
                s[i] = (one_send){o.ch, i, 1};
                assert_int_equal(moor_spawn(&f[i], one_send_fn, &s[i], NULL), 0);
            }
            settle();
            assert_int_equal(moor_chan_len(o.ch), caps[c]);
            int done = 0;
            for (int i = 0; i < PLAIN_WAITERS; i++)
                done += s[i].rc == 0;
            assert_int_equal(done, (int)caps[c]); /* the rest wait */
            for (int i = 0; i < PLAIN_WAITERS; i++) {
                int v = -1;
                assert_int_equal(moor_chan_recv(o.ch, &v, -1), 0);
                if (v != i)
                    fail_msg("capacity %zu: receive %d got %d", caps[c], i, v);
            }
            for (int i = 0; i < PLAIN_WAITERS; i++) {
                assert_int_equal(moor_join(f[i], NULL), 0);
                assert_int_equal(s[i].rc, 0);
            }
            int v;
            assert_int_equal(moor_chan_try_recv(o.ch, &v), -EAGAIN);
            free(s);
            free(f);
            moor_chan_free(o.ch);
            ex_free(ex);
        }
    }
}

/* Plain code sending to fibers that all wait to receive, one value each: every send is a
 * hand-off on moor_chan_send's fast path, far more than the cooperative budget in a row. Each
 * receiver gets the value of its place in the queue. */
typedef struct one_recv {
    moor_chan *ch;
    int got;
    int rc;
} one_recv;

static intptr_t one_recv_fn(void *arg)
{
    one_recv *r = arg;
    r->rc = moor_chan_recv(r->ch, &r->got, -1);
    return 0;
}

static void test_chan_order_plain_code_sender_to_waiters(void **state)
{
    (void)state;
    static const size_t caps[] = {0, 1, 5};
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        moor_executor *ex = ex_new();
        moor_chan *ch = chan_new(sizeof(int), caps[c]);
        for (int round = 0; round < 2; round++) {
            one_recv *r = calloc(PLAIN_WAITERS, sizeof *r);
            moor_fiber **f = calloc(PLAIN_WAITERS, sizeof *f);
            assert_non_null(r);
            assert_non_null(f);
            for (int i = 0; i < PLAIN_WAITERS; i++) {
                r[i] = (one_recv){ch, -1, 1};
                assert_int_equal(moor_spawn(&f[i], one_recv_fn, &r[i], NULL), 0);
            }
            settle(); /* all of them wait */
            for (int i = 0; i < PLAIN_WAITERS; i++) {
                int v = round * 1000 + i;
                assert_int_equal(moor_chan_send(ch, &v, -1), 0);
                assert_int_equal(moor_chan_len(ch), 0); /* handed over, never buffered */
            }
            for (int i = 0; i < PLAIN_WAITERS; i++) {
                assert_int_equal(moor_join(f[i], NULL), 0);
                assert_int_equal(r[i].rc, 0);
                if (r[i].got != round * 1000 + i)
                    fail_msg("capacity %zu: receiver %d got %d", caps[c], i, r[i].got);
            }
            free(r);
            free(f);
        }
        /* Then the stream of test_chan_order_plain_code_sender, with no deadline. */
        order_ctx o = {.ch = ch, .yield_every = 0};
        moor_fiber *q;
        assert_int_equal(moor_spawn(&q, order_consumer, &o, NULL), 0);
        for (int i = 0; i < ORDER_N; i++)
            assert_int_equal(moor_chan_send(ch, &i, -1), 0);
        assert_int_equal(moor_join(q, NULL), 0);
        assert_int_equal(o.mismatches, 0);
        assert_int_equal(o.received, ORDER_N);
        int v;
        assert_int_equal(moor_chan_try_recv(ch, &v), -EAGAIN);
        moor_chan_free(ch);
        ex_free(ex);
    }
}

/* ---- element sizes ----------------------------------------------------------------------
 * moor_chan_send hands values of 4, 8 and 16 bytes to a waiting receiver inline and sends
 * the others the general way; moor_chan_recv takes any size from a waiting sender. A
 * ping-pong over channels of many sizes checks every byte that arrives, and that nothing is
 * written past the element (the receive buffers carry a guard). Lazy rounds make each side
 * yield before it receives, so that the other side's call waits first: the receives then
 * take from waiting senders, where eager rounds hand to waiting receivers. */

#define SIZE_ROUNDS 64
#define SIZE_GUARD 32
#define GUARD_BYTE 0xEE

typedef struct size_pp {
    moor_chan *ping, *pong;
    size_t size;
    int lazy;
    int bad;        /* bytes that differed from what was sent, or a guard overwritten */
    int rounds;
} size_pp;

static unsigned char size_pattern(size_t size, int round, size_t j, int echo)
{
    unsigned char b = (unsigned char)(size * 13u + (unsigned)round * 31u + j * 7u + (j >> 8));
    return echo ? (unsigned char)(b ^ 0xA5) : b;
}

/* Check buf against the pattern and its guard; reset it for the next receive. */
static int size_check(unsigned char *buf, size_t size, int round, int echo)
{
    int bad = 0;
    for (size_t j = 0; j < size; j++)
        bad += buf[j] != size_pattern(size, round, j, echo);
    for (size_t j = size; j < size + SIZE_GUARD; j++)
        bad += buf[j] != GUARD_BYTE;
    memset(buf, GUARD_BYTE, size + SIZE_GUARD);
    return bad;
}

/* Receives each value on ping, checks it, sends its echo (every byte flipped) on pong. */
static intptr_t size_echo(void *arg)
{
    size_pp *pp = arg;
    unsigned char *in = malloc(pp->size + SIZE_GUARD), *out = malloc(pp->size);
    FCHECK(in && out);
    if (!in || !out)
        return -ENOMEM;
    memset(in, GUARD_BYTE, pp->size + SIZE_GUARD);
    for (int round = 0; round < SIZE_ROUNDS; round++) {
        if (pp->lazy)
            moor_yield();
        FCHECK(moor_chan_recv(pp->ping, in, -1) == 0);
        pp->bad += size_check(in, pp->size, round, 0);
        for (size_t j = 0; j < pp->size; j++)
            out[j] = size_pattern(pp->size, round, j, 1);
        FCHECK(moor_chan_send(pp->pong, out, -1) == 0);
    }
    free(in);
    free(out);
    return 0;
}

/* The other side: sends each value on ping, receives and checks its echo. */
static intptr_t size_driver(void *arg)
{
    size_pp *pp = arg;
    unsigned char *in = malloc(pp->size + SIZE_GUARD), *out = malloc(pp->size);
    FCHECK(in && out);
    if (!in || !out)
        return -ENOMEM;
    memset(in, GUARD_BYTE, pp->size + SIZE_GUARD);
    for (int round = 0; round < SIZE_ROUNDS; round++) {
        for (size_t j = 0; j < pp->size; j++)
            out[j] = size_pattern(pp->size, round, j, 0);
        FCHECK(moor_chan_send(pp->ping, out, -1) == 0);
        memset(out, 0, pp->size); /* the value was copied: the sender's buffer is its own */
        if (pp->lazy && moor_self())
            moor_yield();
        FCHECK(moor_chan_recv(pp->pong, in, -1) == 0);
        pp->bad += size_check(in, pp->size, round, 1);
        pp->rounds++;
    }
    free(in);
    free(out);
    return 0;
}

static void test_chan_element_sizes(void **state)
{
    (void)state;
    static const size_t sizes[] = {1, 4, 8, 12, 16, 24, 4096};
    static const size_t caps[] = {0, 1};
    moor_executor *ex = ex_new();
    for (size_t z = 0; z < sizeof sizes / sizeof sizes[0]; z++) {
        for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
            for (int mode = 0; mode < 4; mode++) {
                size_pp pp = {.ping = chan_new(sizes[z], caps[c]),
                              .pong = chan_new(sizes[z], caps[c]), .size = sizes[z],
                              .lazy = mode & 1};
                int driver_in_fiber = mode >> 1;
                moor_fiber *e, *d = NULL;
                assert_int_equal(moor_spawn(&e, size_echo, &pp, NULL), 0);
                if (driver_in_fiber)
                    assert_int_equal(moor_spawn(&d, size_driver, &pp, NULL), 0);
                else
                    settle(); /* the echo waits (or, lazy, yields) first */
                if (driver_in_fiber)
                    assert_int_equal(moor_join(d, NULL), 0);
                else
                    assert_int_equal(size_driver(&pp), 0);
                assert_int_equal(moor_join(e, NULL), 0);
                if (pp.bad)
                    fail_msg("element size %zu, capacity %zu, mode %d: %d bad bytes", sizes[z],
                             caps[c], mode, pp.bad);
                assert_int_equal(pp.rounds, SIZE_ROUNDS);
                assert_int_equal(moor_chan_len(pp.ping), 0);
                assert_int_equal(moor_chan_len(pp.pong), 0);
                moor_chan_free(pp.ping);
                moor_chan_free(pp.pong);
            }
        }
    }
    ex_free(ex);
}

/* ---- FIFO service of waiters --------------------------------------------------------------- */

#define FIFO_N 10

/* recv_call: drain with moor_chan_recv (its fast path takes a waiting sender's value only
 * when the ring is empty: the values in the ring come first) instead of moor_chan_try_recv. */
static void fifo_waiting_senders(int recv_call)
{
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
            assert_int_equal(recv_call ? moor_chan_recv(ch, &v, -1) : moor_chan_try_recv(ch, &v),
                             0);
            assert_int_equal(v, 1000 + (int)i);
            settle();
            for (int j = 0; j < FIFO_N; j++)
                assert_int_equal(calls[j].returned, j <= (int)i);
        }
        for (int i = 0; i < FIFO_N; i++) {
            int v = -1;
            assert_int_equal(recv_call ? moor_chan_recv(ch, &v, -1) : moor_chan_try_recv(ch, &v),
                             0);
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

static void test_chan_fifo_waiting_senders(void **state)
{
    (void)state;
    fifo_waiting_senders(0);
}

static void test_chan_fifo_waiting_senders_recv(void **state)
{
    (void)state;
    fifo_waiting_senders(1);
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
        TEST(test_chan_order_plain_code_receiver),
        TEST(test_chan_order_plain_code_sender_to_waiters),
        TEST(test_chan_fifo_waiting_senders),
        TEST(test_chan_fifo_waiting_senders_recv),
        TEST(test_chan_element_sizes),
        TEST(test_chan_fifo_waiting_receivers),
        TEST(test_chan_try_ops),
        TEST(test_chan_many_senders_many_receivers),
        TEST(test_chan_misuse_asserts),
    };
    return RUN_TESTS(tests);
}
