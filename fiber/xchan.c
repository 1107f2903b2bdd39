/* Channels across executors: moor_chan's ring and two FIFO queues of waiting operations,
 * under a mutex, since senders and receivers may run on different threads.
 *
 * Who completes whom. A waiting operation is completed by its counterpart, on whatever
 * thread that runs: the counterpart copies the value, stores the outcome, and publishes it
 * with a release store of `done` (the waiter's poll reads it with an acquire load, or under
 * the lock), then wakes the waiter through a copy of its waker once the lock is released.
 * A waiter that gives up (deadline, cancel) takes the lock and either finds `done` set, and
 * keeps the result, or takes itself off the queue: so a value is handed over exactly once.
 *
 * The exception is a waiter polled inside a select (its claim is not NULL). Its select's claim
 * is a plain struct of its own thread, which decides between the select's futures; only that
 * thread may touch it. So a counterpart completes a select's waiter only if it runs on the
 * waiter's executor (then it claims the select, as moor_chan does). Counterparts on other
 * threads pass over it and wake it when something it may take appears (a value in the ring, a
 * free slot, a plain waiter on the other side, the close); its poll then takes it, claiming
 * its own select. Select waiters wake each other only through such changes, never for each
 * other's mere presence: two selects of different threads over a rendezvous channel never
 * pair (moor.h says so), and never wake each other in a loop either. */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "assert.h"
#include "dump.h"
#include "future.h"
#include "ring.h"
#include "wait.h"

struct moor_xchan {
    pthread_mutex_t lock; /* guards everything below, and the queued waiters' fields */
    pthread_cond_t threads; /* threads without an executor wait on it (on the monotonic clock) */
    size_t elem_size;
    size_t cap;           /* ring slots; 0 = rendezvous */
    size_t head;          /* next slot to receive from */
    size_t count;         /* values in the ring */
    int closed;
    moor__list senders, receivers; /* moor_xchan_future.node, oldest first */
    unsigned char *ring;
};

int moor_xchan_new(moor_xchan **out, size_t elem_size, size_t capacity)
{
    unsigned char *ring;
    int rc = moor__ring_alloc(elem_size, capacity, &ring);
    if (rc < 0)
        return rc;
    moor_xchan *ch = moor__alloc(sizeof *ch);
    if (!ch) {
        moor__free(ring);
        return -ENOMEM;
    }
    memset(ch, 0, sizeof *ch);
    ch->elem_size = elem_size;
    ch->cap = capacity;
    ch->ring = ring;
    pthread_mutex_init(&ch->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ch->threads, &ca);
    pthread_condattr_destroy(&ca);
    *out = ch;
    return 0;
}

void moor_xchan_free(moor_xchan *ch)
{
    if (!ch)
        return;
    /* Taking the lock waits for a counterpart that is still finishing an operation (it may
     * have published a waiter's result and not yet released the lock). */
    pthread_mutex_lock(&ch->lock);
    moor__assert(!ch->senders.head && !ch->receivers.head,
                 "moor_xchan_free: an operation still waits on the channel (a fiber, plain code "
                 "or a pending future, of any thread)");
    pthread_mutex_unlock(&ch->lock);
    pthread_mutex_destroy(&ch->lock);
    pthread_cond_destroy(&ch->threads);
    moor__free(ch->ring);
    moor__free(ch);
}

size_t moor_xchan_len(moor_xchan *ch)
{
    pthread_mutex_lock(&ch->lock);
    size_t n = ch->count;
    pthread_mutex_unlock(&ch->lock);
    return n;
}

/* ---- wakes, made once the lock is released ------------------------------------------------ */

/* The waiters to wake after an operation. A wake may take the other executor's lock and
 * write to its pipe: done outside the channel's lock, so the counterpart is not kept
 * waiting for it. More than fit are woken at once, under the lock (the order of the locks is
 * always the channel's, then an executor's). */
#define WAKES_MAX 4

typedef struct wakes {
    int n;
    moor_waker w[WAKES_MAX];
} wakes;

static void wakes_add(wakes *ws, const moor_waker *w)
{
    if (ws->n == WAKES_MAX)
        moor_waker_wake(w);
    else
        ws->w[ws->n++] = *w;
}

static void unlock_and_wake(moor_xchan *ch, wakes *ws)
{
    pthread_mutex_unlock(&ch->lock);
    for (int i = 0; i < ws->n; i++)
        moor__wake(&ws->w[i]);
}

/* ---- the queues (all under the lock) ----------------------------------------------------- */

static inline moor_xchan_future *op_of(moor__node *n)
{
    return moor_container_of(n, moor_xchan_future, node);
}

static inline moor__list *queue_of(moor_xchan_future *op)
{
    return op->send ? &op->chan->senders : &op->chan->receivers;
}

static void unqueue(moor_xchan_future *op)
{
    if (!op->queued)
        return;
    moor__list_remove(queue_of(op), &op->node);
    op->queued = 0;
}

/* A counterpart finished `op` with `outcome`: off the queue, its wake noted, then the result
 * published. `op` may be gone the moment `done` is stored: nothing touches it after. */
static void complete(moor_xchan_future *op, intptr_t outcome, wakes *ws)
{
    unqueue(op);
    if (op->thread) /* it waits for the lock, to look at done */
        pthread_cond_broadcast(&op->chan->threads);
    else
        wakes_add(ws, &op->waker);
    op->outcome = outcome;
    __atomic_store_n(&op->done, 1, __ATOMIC_RELEASE);
}

/* Wake a select waiter: it stays queued, and its poll looks again. Once per poll: a burst of
 * sends wakes a select of another thread once, not once a value. */
static void wake_select(moor_xchan_future *w, wakes *ws)
{
    if (w->woken)
        return;
    w->woken = 1;
    wakes_add(ws, &w->waker);
}

/* Wake every select waiter of q: something it may take has appeared. */
static void wake_selects(moor__list *q, wakes *ws)
{
    for (moor__node *n = q->head; n; n = n->next)
        if (op_of(n)->claim)
            wake_select(op_of(n), ws);
}

/* The first waiter of q that the calling thread may complete, off the queue, its select (if
 * any) claimed for its slot. Passed over: waiters of the caller's own select (`mine`; a
 * select must not pair its send with its own receive) and select waiters of other executors
 * (see the head of the file). A select waiter of this executor whose select another future
 * has won is dropped from the queue (its select cancels it). NULL if none. */
static moor_xchan_future *take(moor__list *q, const struct moor__claim *mine)
{
    moor_executor *ex = moor__tls_executor;
    moor__node *next;
    for (moor__node *n = q->head; n; n = next) {
        next = n->next;
        moor_xchan_future *w = op_of(n);
        if (!w->claim)
            return w;
        if (w->claim == mine || !ex || w->waker.ex != ex)
            continue;
        moor__list_remove(q, n);
        w->queued = 0;
        if (moor__claim_slot(w->claim, w->slot, 1))
            return w;
    }
    return NULL;
}

static inline unsigned char *slot(moor_xchan *ch, size_t i)
{
    return ch->ring + moor__ring_at(ch->head, i, ch->cap) * ch->elem_size;
}

/* Send now if it needs no waiting: to a waiting receiver, or into the ring. 0, -EAGAIN,
 * -EPIPE. `cx`: the op trying, for its select's claim (NULL for plain calls). */
static int try_send(moor_xchan *ch, const void *elem, const moor_cx *cx, wakes *ws)
{
    if (ch->closed)
        return -EPIPE;
    if (!moor__claim_open(cx))
        return -EAGAIN;
    moor_xchan_future *w = take(&ch->receivers, cx ? cx->claim : NULL);
    if (w) {
        (void)moor__claim(cx);
        moor__copy_elem(w->elem, elem, ch->elem_size);
        complete(w, 0, ws);
        return 0;
    }
    if (ch->count < ch->cap) {
        (void)moor__claim(cx);
        moor__copy_elem(slot(ch, ch->count), elem, ch->elem_size);
        ch->count++;
        wake_selects(&ch->receivers, ws);
        return 0;
    }
    return -EAGAIN;
}

static int try_recv(moor_xchan *ch, void *elem, const moor_cx *cx, wakes *ws)
{
    if (!moor__claim_open(cx))
        return -EAGAIN;
    const struct moor__claim *mine = cx ? cx->claim : NULL;
    if (ch->count) {
        (void)moor__claim(cx);
        moor__copy_elem(elem, slot(ch, 0), ch->elem_size);
        ch->head = moor__ring_at(ch->head, 1, ch->cap);
        ch->count--;
        /* A slot is free: the first waiting sender moves its value in, or the selects that
         * wait to send are told. */
        moor_xchan_future *w = take(&ch->senders, mine);
        if (w) {
            moor__copy_elem(slot(ch, ch->count), w->elem, ch->elem_size);
            ch->count++;
            complete(w, 0, ws);
        } else {
            wake_selects(&ch->senders, ws);
        }
        return 0;
    }
    moor_xchan_future *w = take(&ch->senders, mine);
    if (w) {
        (void)moor__claim(cx);
        moor__copy_elem(elem, w->elem, ch->elem_size);
        complete(w, 0, ws);
        return 0;
    }
    return ch->closed ? -EPIPE : -EAGAIN;
}

int moor_xchan_try_send(moor_xchan *ch, const void *elem)
{
    wakes ws = {0};
    pthread_mutex_lock(&ch->lock);
    int rc = try_send(ch, elem, NULL, &ws);
    unlock_and_wake(ch, &ws);
    return rc;
}

int moor_xchan_try_recv(moor_xchan *ch, void *elem)
{
    wakes ws = {0};
    pthread_mutex_lock(&ch->lock);
    int rc = try_recv(ch, elem, NULL, &ws);
    unlock_and_wake(ch, &ws);
    return rc;
}

void moor_xchan_close(moor_xchan *ch)
{
    wakes ws = {0};
    pthread_mutex_lock(&ch->lock);
    moor__assert(!ch->closed, "moor_xchan_close: the channel is already closed");
    ch->closed = 1;
    /* Plain waiters are finished here. Select waiters are woken: their polls see the close
     * (a sender's at once, a receiver's once the ring is drained). A plain receiver waits
     * only while the ring is empty: none of them will get a value now. */
    moor__list *queues[2] = {&ch->senders, &ch->receivers};
    for (int i = 0; i < 2; i++) {
        moor__node *next;
        for (moor__node *n = queues[i]->head; n; n = next) {
            next = n->next;
            moor_xchan_future *w = op_of(n);
            if (w->claim)
                wake_select(w, &ws);
            else
                complete(w, -EPIPE, &ws);
        }
    }
    unlock_and_wake(ch, &ws);
}

/* ---- the operation future ---------------------------------------------------------------- */

static moor_poll finish(moor_future *fut, moor_xchan_future *op, intptr_t result)
{
    moor__deadline_disarm(&op->deadline);
    fut->result = result;
    return MOOR_READY;
}

static void check_thread(moor_xchan_future *op, const char *what)
{
    moor_executor *ex = moor__tls_executor;
    if (!op->ex)
        op->ex = ex;
    moor__assert(op->ex == ex, "moor_xchan %s future %s on another thread than the one that "
                               "polled it first (a future belongs to the executor that polls it)",
                 op->send ? "send" : "recv", what);
}

/* Queue op, or refresh its waker and select after a wake. A plain waiter that joins the
 * queue is something the other side's selects may take: they are told. */
static void park(moor_xchan_future *op, const moor_cx *cx, wakes *ws)
{
    op->waker = cx->waker;
    op->claim = cx->claim;
    op->slot = cx->slot;
    op->woken = 0; /* it has looked: a change from now on wakes it again */
    if (op->queued)
        return;
    moor__list_push(queue_of(op), &op->node);
    op->queued = 1;
    if (!op->claim)
        wake_selects(op->send ? &op->chan->receivers : &op->chan->senders, ws);
}

static moor_poll op_poll(moor_future *fut, moor_cx *cx)
{
    moor_xchan_future *op = moor_container_of(fut, moor_xchan_future, base);
    if (__atomic_load_n(&op->done, __ATOMIC_ACQUIRE))
        return finish(fut, op, op->outcome);
    check_thread(op, "polled");
    moor_xchan *ch = op->chan;
    wakes ws = {0};
    pthread_mutex_lock(&ch->lock);
    if (__atomic_load_n(&op->done, __ATOMIC_RELAXED)) { /* completed since the look above */
        pthread_mutex_unlock(&ch->lock);
        return finish(fut, op, op->outcome);
    }
    /* Queued or not, try: a select waiter woken by another thread takes here what it was
     * woken for. A queued plain waiter finds nothing (anything there would have been handed
     * to it), so trying costs it a look only. */
    int rc = op->send ? try_send(ch, op->elem, cx, &ws) : try_recv(ch, op->elem, cx, &ws);
    if (rc == -EAGAIN && moor__deadline_passed(&op->deadline))
        rc = -ETIMEDOUT;
    if (rc != -EAGAIN) {
        unqueue(op);
        unlock_and_wake(ch, &ws);
        return finish(fut, op, rc);
    }
    park(op, cx, &ws);
    unlock_and_wake(ch, &ws);
    if (moor__deadline_arm(&op->deadline, &cx->waker) < 0) {
        pthread_mutex_lock(&ch->lock);
        int done = __atomic_load_n(&op->done, __ATOMIC_RELAXED);
        unqueue(op);
        pthread_mutex_unlock(&ch->lock);
        return finish(fut, op, done ? op->outcome : -ENOMEM);
    }
    return MOOR_PENDING;
}

/* Given up: off the queue, unless a counterpart completed it first (then the value moved and
 * the result stands). */
static moor_poll op_cancel(moor_future *fut)
{
    moor_xchan_future *op = moor_container_of(fut, moor_xchan_future, base);
    check_thread(op, "cancelled");
    moor__deadline_disarm(&op->deadline);
    pthread_mutex_lock(&op->chan->lock);
    int done = __atomic_load_n(&op->done, __ATOMIC_RELAXED);
    unqueue(op);
    pthread_mutex_unlock(&op->chan->lock);
    if (!done)
        return MOOR_PENDING;
    fut->result = op->outcome;
    return MOOR_READY;
}

static const moor_future_ops send_ops = {"xchan send", op_poll, op_cancel};
static const moor_future_ops recv_ops = {"xchan recv", op_poll, op_cancel};

/* "xchan recv 0x...". Never local: a task of another executor may complete it. */
static int op_describe(const moor_future *fut, char *buf, size_t size)
{
    const moor_xchan_future *op = moor_container_of(fut, moor_xchan_future, base);
    moor__fmt out = moor__fmt_init(buf, size);
    moor__fmt_str(&out, fut->ops->label);
    moor__fmt_str(&out, " ");
    moor__fmt_ptr(&out, op->chan);
    return 0;
}

static moor_future_kind send_kind = {&send_ops, op_describe, NULL};
static moor_future_kind recv_kind = {&recv_ops, op_describe, NULL};

__attribute__((constructor)) static void xchan_kinds_register(void)
{
    moor_future_kind_register(&send_kind);
    moor_future_kind_register(&recv_kind);
}

static void op_init(moor_xchan_future *op, moor_xchan *ch, void *elem, int64_t deadline, int send)
{
    moor__assert(ch, "moor_xchan_%s_init: the channel is NULL", send ? "send" : "recv");
    moor_future_init(&op->base, send ? &send_ops : &recv_ops, 0);
    op->chan = ch;
    op->elem = elem;
    op->send = send;
    op->queued = 0;
    op->done = 0;
    op->woken = 0;
    op->thread = 0;
    op->outcome = 0;
    op->ex = NULL;
    op->waker = (moor_waker){0};
    op->claim = NULL;
    op->slot = NULL;
    moor__deadline_init(&op->deadline, deadline);
}

void moor_xchan_send_init(moor_xchan_future *op, moor_xchan *ch, const void *elem, int64_t deadline)
{
    op_init(op, ch, (void *)elem, deadline, 1);
}

void moor_xchan_recv_init(moor_xchan_future *op, moor_xchan *ch, void *elem, int64_t deadline)
{
    op_init(op, ch, elem, deadline, 0);
}

/* ---- the calls --------------------------------------------------------------------------- */

/* A thread without an executor has nothing to run while it waits: it queues a plain waiter
 * (completed by its counterpart like any other) and sleeps on the channel's condition
 * variable until the waiter is done or the deadline passes. Wakes it owes others are made
 * under the lock (the order of the locks is still the channel's, then an executor's). */
#define THREAD_WAIT_MAX_MS (24 * 3600 * 1000) /* a far deadline is waited for in steps */

static int thread_wait(moor_xchan *ch, void *elem, int64_t deadline, int send)
{
    moor_xchan_future op;
    op_init(&op, ch, elem, deadline, send);
    op.thread = 1;
    wakes ws = {0};
    pthread_mutex_lock(&ch->lock);
    int rc = send ? try_send(ch, elem, NULL, &ws) : try_recv(ch, elem, NULL, &ws);
    if (rc == -EAGAIN) {
        moor_cx none = {{0}, NULL, NULL};
        park(&op, &none, &ws);
        for (;;) {
            for (int i = 0; i < ws.n; i++)
                moor_waker_wake(&ws.w[i]);
            ws.n = 0;
            if (__atomic_load_n(&op.done, __ATOMIC_RELAXED)) {
                rc = (int)op.outcome;
                break;
            }
            int64_t now = moor_now();
            if (deadline >= 0 && now >= deadline) {
                unqueue(&op);
                rc = -ETIMEDOUT;
                break;
            }
            int64_t until = deadline >= 0 && deadline - now < THREAD_WAIT_MAX_MS
                                ? deadline : now + THREAD_WAIT_MAX_MS;
            struct timespec ts = {(time_t)(until / 1000), (long)(until % 1000) * 1000000};
            pthread_cond_timedwait(&ch->threads, &ch->lock, &ts);
        }
    }
    unlock_and_wake(ch, &ws);
    return rc;
}

/* A send or receive: its future, awaited (a fiber) or run by the executor (plain code); the
 * future's first poll tries before it waits, so a call that need not wait takes the lock
 * once. */
static int op_call(moor_xchan *ch, void *elem, int64_t deadline, int send)
{
    if (__builtin_expect(!moor__tls_executor, 0))
        return thread_wait(ch, elem, deadline, send);
    moor_xchan_future op;
    op_init(&op, ch, elem, deadline, send);
    return (int)moor__wait(&op.base);
}

int moor_xchan_send(moor_xchan *ch, const void *elem, int64_t deadline)
{
    return op_call(ch, (void *)elem, deadline, 1);
}

int moor_xchan_recv(moor_xchan *ch, void *elem, int64_t deadline)
{
    return op_call(ch, elem, deadline, 0);
}
