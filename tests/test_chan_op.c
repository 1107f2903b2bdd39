/* The channel operation futures (moor_chan_future): awaited in fibers and block_on'd from plain
 * code, for elements of many sizes and for structs, nothing written past an element; an op
 * with a deadline reports -ETIMEDOUT as its output and may be initialised again and reused.
 * Select over them is tested in test_select.c.
 *
 * Timing is asserted only as a lower bound. Checks inside fibers are FCHECKs (fixture.h). */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "moor.h"

#include "fixture.h"

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
        moor_chan_future op;
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
                    moor_chan_future op;
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

static void test_chan_op_struct_elements(void **state)
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
            moor_chan_future op;
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
    moor_chan_future op;
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

static void test_chan_op_deadline_then_reuse(void **state)
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

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_chan_op_futures_and_sizes),
        TEST(test_chan_op_struct_elements),
        TEST(test_chan_op_deadline_then_reuse),
    };
    return RUN_TESTS(tests);
}
