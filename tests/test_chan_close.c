/* Closing a channel: what was buffered still comes out, then -EPIPE; every waiting sender
 * and receiver, by call or by future, with or without a deadline, is woken with -EPIPE; a
 * fiber may close while others wait.
 *
 * Checks inside fibers are FCHECKs (fixture.h). */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "moor.h"

#include "fixture.h"

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
    moor_chan_future op;
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

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_chan_close_drains_then_epipe),
        TEST(test_chan_close_wakes_blocked),
        TEST(test_chan_close_from_fiber),
    };
    return RUN_TESTS(tests);
}
