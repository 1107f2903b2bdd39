/* Channels: a ring buffer of fixed-size values and two FIFO queues of waiting operations.
 * A value goes straight from a waiting sender to a waiting receiver (or through the ring),
 * completing the waiter's future and waking it; nothing is copied twice. */
#include <errno.h>
#include <string.h>

#include "alloc.h"
#include "assert.h"
#include "dump.h"
#include "ring.h"
#include "wait.h"

/* What a send or receive reads first comes first, in 64 bytes (malloc aligns the struct to
 * 16 only, so it may span two cache lines). */
struct moor_chan {
    moor_executor *ex; /* the executor whose fibers use it (bound at first use if NULL) */
    moor__list senders, receivers; /* moor_chan_future waiters */
    size_t count;      /* values in the ring */
    size_t elem_size;
    int closed;
    uint8_t inline_copy; /* elem_size if a hand-off copies it inline (4, 8 or 16), else 0 */
    size_t cap;        /* ring slots; 0 = rendezvous */
    size_t head;       /* next slot to receive from */
    unsigned char *ring;
};

int moor_chan_new(moor_chan **out, size_t elem_size, size_t capacity)
{
    unsigned char *ring;
    int rc = moor__ring_alloc(elem_size, capacity, &ring);
    if (rc < 0)
        return rc;
    moor_chan *ch = moor__alloc(sizeof *ch);
    if (!ch) {
        moor__free(ring);
        return -ENOMEM;
    }
    memset(ch, 0, sizeof *ch);
    ch->ex = moor__tls_executor;
    ch->elem_size = elem_size;
    ch->inline_copy = elem_size == 4 || elem_size == 8 || elem_size == 16 ? (uint8_t)elem_size : 0;
    ch->cap = capacity;
    ch->ring = ring;
    *out = ch;
    return 0;
}

static inline void owner_check(moor_chan *ch, const char *what)
{
    moor__owner_check(&ch->ex, what);
}

void moor_chan_free(moor_chan *ch)
{
    if (!ch)
        return;
    /* After its executor has gone (or before any used it) nothing can wait on it. */
    moor__assert(!ch->ex || !moor__tls_executor || ch->ex == moor__tls_executor,
                 "moor_chan_free: called from another thread than the one whose executor owns it");
    moor__assert(!ch->senders.head && !ch->receivers.head,
                 "moor_chan_free: a fiber still waits on the channel");
    moor__free(ch->ring);
    moor__free(ch);
}

size_t moor_chan_len(const moor_chan *ch) { return ch->count; }

static inline unsigned char *slot(moor_chan *ch, size_t i)
{
    return ch->ring + moor__ring_at(ch->head, i, ch->cap) * ch->elem_size;
}

/* A counterpart finished `w`'s operation with `result`: record it and wake its fiber. */
static inline void complete(moor__waiter *w, intptr_t result)
{
    moor_chan_future *op = moor_container_of(w, moor_chan_future, waiter);
    moor__waiter_complete(w);
    op->base.result = result;
    moor__wake(&w->waker);
}

/* Send now if it needs no waiting: to a waiting receiver, or into the ring. 0, -EAGAIN,
 * -EPIPE. `cx`: the op trying, for select's claim (NULL for plain calls). */
static inline __attribute__((always_inline)) int try_send(moor_chan *ch, const void *elem, const moor_cx *cx)
{
    if (ch->closed)
        return -EPIPE;
    if (!moor__claim_open(cx))
        return -EAGAIN;
    moor__waiter *w = moor__waitq_take(&ch->receivers, cx ? cx->claim : NULL);
    if (w) {
        (void)moor__claim(cx);
        moor__copy_elem(moor_container_of(w, moor_chan_future, waiter)->elem, elem, ch->elem_size);
        complete(w, 0);
        return 0;
    }
    if (ch->count < ch->cap) {
        (void)moor__claim(cx);
        moor__copy_elem(slot(ch, ch->count), elem, ch->elem_size);
        ch->count++;
        return 0;
    }
    return -EAGAIN;
}

static inline __attribute__((always_inline)) int try_recv(moor_chan *ch, void *elem, const moor_cx *cx)
{
    if (!moor__claim_open(cx))
        return -EAGAIN;
    if (ch->count) {
        (void)moor__claim(cx);
        moor__copy_elem(elem, slot(ch, 0), ch->elem_size);
        ch->head = moor__ring_at(ch->head, 1, ch->cap);
        ch->count--;
        /* A slot is free: the first waiting sender moves its value in. */
        moor__waiter *w = moor__waitq_take(&ch->senders, cx ? cx->claim : NULL);
        if (w) {
            moor__copy_elem(slot(ch, ch->count),
                            moor_container_of(w, moor_chan_future, waiter)->elem, ch->elem_size);
            ch->count++;
            complete(w, 0);
        }
        return 0;
    }
    moor__waiter *w = moor__waitq_take(&ch->senders, cx ? cx->claim : NULL);
    if (w) {
        (void)moor__claim(cx);
        moor__copy_elem(elem, moor_container_of(w, moor_chan_future, waiter)->elem, ch->elem_size);
        complete(w, 0);
        return 0;
    }
    return ch->closed ? -EPIPE : -EAGAIN;
}

int moor_chan_try_send(moor_chan *ch, const void *elem)
{
    owner_check(ch, "moor_chan_try_send");
    return try_send(ch, elem, NULL);
}

int moor_chan_try_recv(moor_chan *ch, void *elem)
{
    owner_check(ch, "moor_chan_try_recv");
    return try_recv(ch, elem, NULL);
}

void moor_chan_close(moor_chan *ch)
{
    owner_check(ch, "moor_chan_close");
    moor__assert(!ch->closed, "moor_chan_close: the channel is already closed");
    ch->closed = 1;
    moor__waiter *w;
    while ((w = moor__waitq_take(&ch->senders, NULL)))
        complete(w, -EPIPE);
    /* Receivers wait only while the ring is empty: none of them will get a value now. */
    while ((w = moor__waitq_take(&ch->receivers, NULL)))
        complete(w, -EPIPE);
}

/* ---- the operation future -------------------------------------------------------------- */

static const moor_future_ops send_ops, recv_ops;

/* The direction is the ops': an op keeps no field of its own for it. */
static inline int op_sends(const moor_chan_future *op)
{
    return op->base.ops == &send_ops;
}

static inline moor__list *queue_of(moor_chan_future *op)
{
    return op_sends(op) ? &op->chan->senders : &op->chan->receivers;
}

MOOR__WAIT_OP int op_ready(moor_future *fut, moor_cx *cx)
{
    moor_chan_future *op = moor_container_of(fut, moor_chan_future, base);
    if (moor__waiter_done(&op->waiter))
        return 1; /* result set by the counterpart */
    if (op->waiter.state == MOOR__WAITER_QUEUED)
        return 0; /* a counterpart completes it, none has yet */
    int rc = op_sends(op) ? try_send(op->chan, op->elem, cx) : try_recv(op->chan, op->elem, cx);
    if (rc == -EAGAIN)
        return 0;
    fut->result = rc;
    return 1;
}

MOOR__WAIT_OP int op_park(moor_future *fut, moor_cx *cx)
{
    moor_chan_future *op = moor_container_of(fut, moor_chan_future, base);
    moor__waitq_park(queue_of(op), &op->waiter, cx);
    return 0;
}

/* Completed by a counterpart already: the value moved; the result must not be lost. */
MOOR__WAIT_OP int op_unpark(moor_future *fut)
{
    moor_chan_future *op = moor_container_of(fut, moor_chan_future, base);
    moor__waitq_remove(queue_of(op), &op->waiter);
    return moor__waiter_done(&op->waiter);
}

static const moor__wait_ops op_wait = {op_ready, op_park, op_unpark, -ETIMEDOUT};

static moor_poll op_poll(moor_future *fut, moor_cx *cx)
{
    moor_chan_future *op = moor_container_of(fut, moor_chan_future, base);
    owner_check(op->chan, op_sends(op) ? "chan send future" : "chan recv future");
    return moor__wait_poll(fut, &op->deadline, cx, &op_wait);
}

static moor_poll op_cancel(moor_future *fut)
{
    moor_chan_future *op = moor_container_of(fut, moor_chan_future, base);
    return moor__wait_cancel(fut, &op->deadline, &op_wait);
}

static const moor_future_ops send_ops = {"chan send", op_poll, op_cancel};
static const moor_future_ops recv_ops = {"chan recv", op_poll, op_cancel};

/* "chan recv 0x...": a channel is one executor's, so only its tasks can complete the op. */
static int op_describe(const moor_future *fut, char *buf, size_t size)
{
    const moor_chan_future *op = moor_container_of(fut, moor_chan_future, base);
    moor__fmt out = moor__fmt_init(buf, size);
    moor__fmt_str(&out, fut->ops->label);
    moor__fmt_str(&out, " ");
    moor__fmt_ptr(&out, op->chan);
    return MOOR_WAIT_LOCAL;
}

static moor_future_kind send_kind = {&send_ops, op_describe, NULL};
static moor_future_kind recv_kind = {&recv_ops, op_describe, NULL};

__attribute__((constructor)) static void chan_kinds_register(void)
{
    moor_future_kind_register(&send_kind);
    moor_future_kind_register(&recv_kind);
}

/* What every op sets of itself, the future it is aside (whose ops give the direction): its
 * channel and value. */
static inline void op_fields(moor_chan_future *op, moor_chan *ch, void *elem)
{
    op->chan = ch;
    op->elem = elem;
}

/* A whole op, ready for its first poll. */
static inline void op_init(moor_chan_future *op, moor_chan *ch, void *elem, int64_t deadline,
                           int send)
{
    op->base = (moor_future){.ops = send ? &send_ops : &recv_ops}; /* moor_future_init */
    op_fields(op, ch, elem);
    moor__waiter_init(&op->waiter);
    moor__deadline_init(&op->deadline, deadline);
}

void moor_chan_send_init(moor_chan_future *op, moor_chan *ch, const void *elem, int64_t deadline)
{
    op_init(op, ch, (void *)elem, deadline, 1);
}

void moor_chan_recv_init(moor_chan_future *op, moor_chan *ch, void *elem, int64_t deadline)
{
    op_init(op, ch, elem, deadline, 0);
}

static void waiter_unlink(void *arg)
{
    moor_chan_future *op = arg;
    moor__waitq_remove(queue_of(op), &op->waiter);
}

/* Queue a fiber's op on ch, to be completed by a counterpart. In a fiber op->base is never
 * polled: its ops name the wait (moor_dump, deadlock detection) and a counterpart writes its
 * result; nothing reads the rest. */
static inline __attribute__((always_inline)) void fiber_op_queue(moor_chan_future *op,
                                                                moor_executor *ex,
                                                                moor_fiber *f, moor_chan *ch,
                                                                void *elem, int send)
{
    op->base.ops = send ? &send_ops : &recv_ops;
    op->base.result = 0; /* what a hand-off leaves it at (hand_off) */
    op_fields(op, ch, elem);
    /* moor__waitq_push, for this fiber's task and no select (no claim: the slot is unread) */
    op->waiter.waker = (moor_waker){ex, &f->task, f->task.gen};
    op->waiter.claim = NULL;
    moor__list_push(send ? &ch->senders : &ch->receivers, &op->waiter.node);
    op->waiter.state = MOOR__WAITER_QUEUED;
}

/* The rest of fiber_wait, when the op is not done at its first wake (a cancel, or a wake of
 * every task after a remote wake found no memory) or the fiber was cancelled before it:
 * the general wait, with no deadline. (It stamps the wait again: only these rare waits show
 * it shorter in moor_dump.) f: the running fiber. */
static __attribute__((noinline)) int fiber_wait_more(moor_chan_future *op, moor_fiber *f)
{
    moor__deadline_init(&op->deadline, -1);
    return moor__fiber_wait_completion(f, &op->waiter, &op->base, &op->deadline,
                                       waiter_unlink, op, 1);
}

/* A fiber's wait with no deadline, the common case: moor__fiber_wait_completion's loop
 * without the deadline, written out here so that a channel round trip costs no call beyond
 * the switch, and with only its first turn inline (a wake that finds the op done). f: the
 * running fiber, of ex. */
static inline __attribute__((always_inline)) int fiber_wait(moor_executor *ex, moor_fiber *f,
                                                           moor_chan *ch, void *elem, int send)
{
    moor_chan_future op;
    fiber_op_queue(&op, ex, f, ch, elem, send);
    moor__wait_stamp(ex, &f->task);
    if (__builtin_expect(!f->cancelled, 1)) {
        moor__fiber_suspend_on(ex, f, &op.base);
        if (__builtin_expect(moor__waiter_done(&op.waiter), 1))
            return (int)op.base.result;
        f = moor__tls_executor->current; /* the same fiber: read again, not kept across */
    }
    return fiber_wait_more(&op, f);
}

/* A fiber's send or receive that has to wait: queue its op and wait for the counterpart to
 * complete it, without a future poll in between. f: the running fiber, of ex. */
static inline __attribute__((always_inline)) int fiber_wait_op(moor_executor *ex, moor_fiber *f,
                                                              moor_chan *ch, void *elem,
                                                              int64_t deadline, int send)
{
    if (__builtin_expect(deadline < 0, 1))
        return fiber_wait(ex, f, ch, elem, send);
    moor_chan_future op;
    fiber_op_queue(&op, ex, f, ch, elem, send);
    moor__deadline_init(&op.deadline, deadline);
    return moor__fiber_wait_completion(f, &op.waiter, &op.base, &op.deadline,
                                       waiter_unlink, &op, 1);
}

/* A send or receive that has to wait: fiber_wait_op in a fiber; plain code runs the executor
 * on the op as a future. ex: the calling thread's executor (the caller checked the channel
 * is its). */
static inline __attribute__((always_inline)) int wait_op(moor_executor *ex, moor_chan *ch,
                                                        void *elem, int64_t deadline, int send)
{
    moor_fiber *f = ex ? ex->current : NULL;
    if (f)
        return fiber_wait_op(ex, f, ch, elem, deadline, send);
    moor_chan_future op;
    op_init(&op, ch, elem, deadline, send);
    return (int)moor_block_on(&op.base);
}

/* The first waiter of q if a plain call may pair with it at once: one that is no select's
 * (a select's waiter needs its claim, which try_send and try_recv handle). NULL otherwise. */
static inline moor__waiter *plain_waiter(const moor__list *q)
{
    moor__node *n = q->head;
    if (!n)
        return NULL;
    moor__waiter *w = moor__waiter_of(n);
    return w->claim ? NULL : w;
}

/* moor__copy_elem for a channel's inline_copy size: no memcpy call left to make. */
static inline void copy_small(void *dst, const void *src, size_t size)
{
    if (size == 4)
        memcpy(dst, src, 4);
    else if (size == 8)
        memcpy(dst, src, 8);
    else
        memcpy(dst, src, 16);
}

/* A value was handed to a plain waiter of ex's channel whose waker is not simply a task of
 * ex (or has none): wake it the general way, then count the operation. Out of line, and
 * reached by a tail call, so that the hand-off itself needs no stack frame. */
static __attribute__((noinline, cold)) int handed_off_wake(moor_executor *ex, moor__waiter *w)
{
    moor__wake(&w->waker);
    moor__coop_spend_on(ex);
    return 0;
}

/* The hand-off's budget is spent: yield, then report the hand-off (0). */
static __attribute__((noinline, cold)) int handed_off_yield(moor_executor *ex)
{
    moor__coop_yield(ex);
    return 0;
}

/* Give w, the first waiter of q (a plain one, of ex), its completion (the value is copied
 * already): complete(), leaving the result at the 0 every op starts with, and waking through
 * moor__wake_registered; then moor__coop_spend_on; their rare turns as tail calls. (Leaving
 * the result alone saves a store into the waiter's frame: ~1.3 ns of a 60 ns round trip.) */
static inline __attribute__((always_inline)) int hand_off(moor_executor *ex, moor__list *q,
                                                         moor__waiter *w)
{
    moor__waitq_complete_first(q, w);
    if (__builtin_expect(!moor__wake_registered(ex, &w->waker), 0))
        return handed_off_wake(ex, w);
    if (__builtin_expect(--ex->coop_budget == 0, 0))
        return handed_off_yield(ex);
    return 0;
}

/* moor_chan_send's every case but a hand-off to a waiting plain receiver. A sender that
 * waits shows this function in a backtrace, just above its caller. */
static MOOR__HOT __attribute__((noinline)) int
moor_chan_send_waiting(moor_chan *ch, const void *elem, int64_t deadline)
{
    owner_check(ch, "moor_chan_send");
    int rc = try_send(ch, elem, NULL);
    if (rc == -EAGAIN)
        return wait_op(moor__tls_executor, ch, (void *)elem, deadline, 1);
    moor__coop_spend();
    return rc;
}

MOOR__HOT int moor_chan_send(moor_chan *ch, const void *elem, int64_t deadline)
{
    moor_executor *ex = ch->ex;
    moor__node *n = ch->receivers.head;
    /* A receiver waits (so the ring is empty and the channel open), not in a select: hand the
     * value over. This path has no frame and no call (see hand_off); everything else, the
     * owner check's first binding included, is moor_chan_send_waiting's. */
    if (__builtin_expect(n && ex == moor__tls_executor && ch->inline_copy, 1)) {
        moor__waiter *w = moor__waiter_of(n);
        if (!w->claim) {
            copy_small(moor_container_of(w, moor_chan_future, waiter)->elem, elem,
                       ch->inline_copy);
            return hand_off(ex, &ch->receivers, w);
        }
    }
    return moor_chan_send_waiting(ch, elem, deadline);
}

/* A fiber's wait in moor_chan_recv when no value can be taken: out of line with nothing
 * else, so that it needs few registers saved. Its first arguments are moor_chan_recv's own,
 * in the same registers: the tail call that reaches it moves only the last two. A receiver
 * that waits shows this function in a backtrace, just above its caller. */
static MOOR__HOT __attribute__((noinline)) int
moor_chan_recv_waiting(moor_chan *ch, void *elem, int64_t deadline, moor_executor *ex,
                       moor_fiber *f)
{
    return fiber_wait_op(ex, f, ch, elem, deadline, 0);
}

/* moor_chan_recv's every other case: a ring with values, a select's or a large value's
 * sender, a closed channel, plain code. */
static __attribute__((noinline)) int recv_general(moor_chan *ch, void *elem, int64_t deadline)
{
    owner_check(ch, "moor_chan_recv");
    moor_executor *ex = ch->ex;
    int rc = try_recv(ch, elem, NULL);
    if (rc == -EAGAIN)
        return wait_op(ex, ch, elem, deadline, 0);
    moor__coop_spend(); /* ex may be NULL: a channel used by plain code with no executor */
    return rc;
}

MOOR__HOT int moor_chan_recv(moor_chan *ch, void *elem, int64_t deadline)
{
    moor_executor *ex = ch->ex;
    /* The ring is empty, and the channel is the calling thread's (the owner check's first
     * binding is recv_general's). Neither path below has a stack frame. */
    if (__builtin_expect(!ch->count && ex == moor__tls_executor, 1)) {
        moor__node *n = ch->senders.head;
        if (n) {
            moor__waiter *w = moor__waiter_of(n);
            if (!w->claim && ch->inline_copy) {
                /* A plain sender waits (a rendezvous channel, or a drained ring whose senders
                 * came after): take its value. */
                copy_small(elem, moor_container_of(w, moor_chan_future, waiter)->elem,
                           ch->inline_copy);
                return hand_off(ex, &ch->senders, w);
            }
        } else if (!ch->closed && ex && ex->current) {
            /* nothing to take */
            return moor_chan_recv_waiting(ch, elem, deadline, ex, ex->current);
        }
    }
    return recv_general(ch, elem, deadline);
}
