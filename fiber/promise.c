/* Promises: a one-shot value from a callback on any thread to an awaiter on one executor.
 * The state is on the heap with two references, the awaiter's and the resolver's (see
 * moor/future.h), under a lock of its own since the resolver may be on any thread. The
 * awaiter waits with the shared wait skeleton (wait.h); the resolver wakes it through its
 * waker, which is safe from any thread and a no-op once the awaiter's task is gone. */
#include <pthread.h>

#include "alloc.h"
#include "assert.h"
#include "wait.h"

enum { PROMISE_PENDING = 0, PROMISE_RESOLVED };

struct moor_promise {
    pthread_mutex_t lock;
    int state;              /* PROMISE_*; under lock */
    int refs;               /* halves still held (2, 1, then it is freed); under lock */
    int awaiter_gone;       /* the awaiter's half was dropped; under lock */
    int received;           /* an awaiter took the value: it is the awaiter's now */
    intptr_t value;         /* once RESOLVED */
    moor_waker waker;       /* the awaiting task, while one waits; under lock */
    void (*drop)(intptr_t value); /* frees a value nobody received; may be NULL */
    moor_executor *ex;      /* the awaiter's executor */
};

int moor_promise_new(moor_promise **out, void (*drop)(intptr_t value))
{
    moor_executor *ex = moor__tls_executor;
    moor__assert(ex, "moor_promise_new: no executor on this thread (call moor_executor_new first)");
    moor_promise *p = moor__alloc(sizeof *p);
    if (!p)
        return -ENOMEM;
    pthread_mutex_init(&p->lock, NULL);
    p->state = PROMISE_PENDING;
    p->refs = 2;
    p->awaiter_gone = 0;
    p->received = 0;
    p->value = 0;
    p->waker = (moor_waker){0};
    p->drop = drop;
    p->ex = ex;
    ex->promises_held++;
    *out = p;
    return 0;
}

/* The last half is gone: free the value if nobody received it, then the promise. */
static void promise_free(moor_promise *p)
{
    if (p->state == PROMISE_RESOLVED && !p->received && p->drop)
        p->drop(p->value);
    pthread_mutex_destroy(&p->lock);
    moor__free(p);
}

int moor_promise_resolve(moor_promise *p, intptr_t value)
{
    pthread_mutex_lock(&p->lock);
    if (p->state == PROMISE_RESOLVED) {
        pthread_mutex_unlock(&p->lock);
        return -EALREADY;
    }
    p->state = PROMISE_RESOLVED;
    p->value = value;
    moor_waker waker = p->waker;
    int last = --p->refs == 0;
    pthread_mutex_unlock(&p->lock);
    /* From here p is the awaiter's alone (unless this was the last half): only the copy of
     * the waker is used, and a waker whose task is gone wakes nothing. */
    if (last)
        promise_free(p);
    else
        moor_waker_wake(&waker);
    return 0;
}

void moor_promise_drop(moor_promise *p)
{
    moor_executor *ex = p->ex;
    moor__assert(ex == moor__tls_executor,
                 "moor_promise_drop: the promise's awaiter belongs to another thread's executor");
    moor__assert(ex->promises_held > 0, "moor_promise_drop: promise bookkeeping broken");
    pthread_mutex_lock(&p->lock);
    moor__assert(!p->awaiter_gone, "moor_promise_drop: the awaiter's half was dropped already");
    p->awaiter_gone = 1;
    p->waker = (moor_waker){0};
    int last = --p->refs == 0;
    pthread_mutex_unlock(&p->lock);
    /* Unless this was the last half, p may be freed by the resolver from here on. */
    ex->promises_held--;
    if (last)
        promise_free(p);
}

/* ---- the awaiter's future ---------------------------------------------------------------- */

/* Take the value if it is there and cx's select (if any) is this future's to win: a select
 * that another future has won leaves the value with the promise, which drops it. */
static int take(moor_promise *p, moor_future *fut, moor_cx *cx)
{
    pthread_mutex_lock(&p->lock);
    int taken = p->state == PROMISE_RESOLVED && moor_cx_claim(cx);
    if (taken) {
        p->received = 1;
        fut->result = p->value;
    }
    pthread_mutex_unlock(&p->lock);
    return taken;
}

static void check_thread(const moor_promise *p)
{
    moor__assert(p->ex == moor__tls_executor,
                 "promise awaited from another thread than its executor's");
}

MOOR__WAIT_OP int promise_ready(moor_future *fut, moor_cx *cx)
{
    moor_promise_future *pf = moor_container_of(fut, moor_promise_future, base);
    return take(pf->promise, fut, cx);
}

/* Register the awaiting task, under the lock the resolver takes: a resolve that comes after
 * it wakes this waker. One that came between ready's look and here found no waker to wake
 * (on the first poll there is none yet): the task wakes itself, and its next poll takes the
 * value. */
MOOR__WAIT_OP int promise_park(moor_future *fut, moor_cx *cx)
{
    moor_promise_future *pf = moor_container_of(fut, moor_promise_future, base);
    moor_promise *p = pf->promise;
    pthread_mutex_lock(&p->lock);
    int resolved = p->state == PROMISE_RESOLVED;
    if (!resolved)
        p->waker = cx->waker;
    pthread_mutex_unlock(&p->lock);
    if (resolved)
        moor__wake(&cx->waker);
    return 0;
}

/* Given up: unregister. A value that landed meanwhile is not taken: nothing was handed to
 * this future (the promise holds the value until it is received), and a select that has
 * already been won by another future must not see a second one complete. The value stays
 * with the promise, whose drop function frees it when the awaiter's half is dropped. */
MOOR__WAIT_OP int promise_unpark(moor_future *fut)
{
    moor_promise_future *pf = moor_container_of(fut, moor_promise_future, base);
    moor_promise *p = pf->promise;
    pthread_mutex_lock(&p->lock);
    p->waker = (moor_waker){0};
    pthread_mutex_unlock(&p->lock);
    return 0;
}

static const moor__wait_ops promise_wait = {promise_ready, promise_park, promise_unpark,
                                            -ETIMEDOUT};

/* moor_promise_future has no deadline; moor_promise_await's has one beside it. */
typedef struct timed_promise_future {
    moor_promise_future pf;
    moor__deadline deadline;
} timed_promise_future;

static moor_poll promise_poll(moor_future *fut, moor_cx *cx)
{
    moor_promise_future *pf = moor_container_of(fut, moor_promise_future, base);
    check_thread(pf->promise);
    moor__deadline none;
    moor__deadline_init(&none, -1);
    return moor__wait_poll(fut, &none, cx, &promise_wait);
}

static moor_poll promise_cancel(moor_future *fut)
{
    moor__deadline none;
    moor__deadline_init(&none, -1);
    return moor__wait_cancel(fut, &none, &promise_wait);
}

static moor_poll timed_poll(moor_future *fut, moor_cx *cx)
{
    timed_promise_future *tf = moor_container_of(fut, timed_promise_future, pf.base);
    check_thread(tf->pf.promise);
    return moor__wait_poll(fut, &tf->deadline, cx, &promise_wait);
}

static moor_poll timed_cancel(moor_future *fut)
{
    timed_promise_future *tf = moor_container_of(fut, timed_promise_future, pf.base);
    return moor__wait_cancel(fut, &tf->deadline, &promise_wait);
}

static const moor_future_ops promise_ops = {"promise", promise_poll, promise_cancel};
static const moor_future_ops timed_ops = {"promise", timed_poll, timed_cancel};

void moor_promise_future_init(moor_promise_future *pf, moor_promise *p)
{
    moor__assert(p, "moor_promise_future_init: promise is NULL");
    moor_future_init(&pf->base, &promise_ops, 0);
    pf->promise = p;
}

intptr_t moor_promise_await(moor_promise *p, int64_t deadline)
{
    moor__assert(p, "moor_promise_await: promise is NULL");
    check_thread(p);
    timed_promise_future tf;
    moor_future_init(&tf.pf.base, &timed_ops, 0);
    tf.pf.promise = p;
    moor__deadline_init(&tf.deadline, deadline);
    intptr_t r = moor__wait(&tf.pf.base);
    moor_promise_drop(p);
    return r;
}
