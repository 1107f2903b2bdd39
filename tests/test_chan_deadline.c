/* Deadlines on channel calls: a send or receive that has to wait ends with -ETIMEDOUT, never
 * before its deadline, and leaves nobody queued; a deadline already past does not stop a call
 * that needs no waiting; a value that arrives first is received and its timer goes with it.
 *
 * Timing is asserted only as a lower bound. Checks inside fibers are FCHECKs (fixture.h). */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "moor.h"

#include "fixture.h"

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

static void test_chan_deadline_expires(void **state)
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
static void test_chan_deadline_value_arrives_first(void **state)
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

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_chan_deadline_expires),
        TEST(test_chan_deadline_value_arrives_first),
    };
    return RUN_TESTS(tests);
}
