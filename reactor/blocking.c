/* moor_blocking and the pool of worker threads it runs calls on. One pool per executor,
 * attached to it as a part (MOOR__PART_BLOCKING) on first use and grown on demand up to its
 * cap. It needs no event loop: a worker wakes the waiting task with moor_waker_wake, which
 * is thread-safe, whatever the executor parks on.
 *
 * The rule that makes moor_blocking memory-safe: the call never returns while fn may still
 * use arg. Its arg usually points into the caller's stack, which another fiber gets once the
 * caller has returned, so letting go of a running call (as a future cancelled by a deadline
 * would) would let fn write into someone else's frame. Instead, the deadline and
 * cancellation bound only the wait for a worker to start fn:
 *
 *   QUEUED  --worker takes it-->  RUNNING  --fn returns-->  DONE
 *     |                                                       (FAILED: in a forked child,
 *     +--deadline / cancel: taken out of the queue,            for calls the parent's
 *        fn never runs (-ETIMEDOUT / -ECANCELED)               workers held)
 *
 * Once RUNNING, the call waits for DONE however long fn takes, and keeps fn's result. Since
 * the call outlives the job, the job lives in the caller's frame (inside the future) and
 * needs no allocation: the worker touches it only under the pool lock, last when it marks it
 * DONE, and the caller sees DONE only under that lock, so after the worker's last touch. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "fiber/alloc.h"
#include "fiber/assert.h"
#include "fiber/executor.h"
#include "fiber/wait.h"

enum job_state { JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED };

typedef struct job {
    moor__node link;   /* in the queue, or the list of running jobs; under the pool lock */
    moor_blocking_fn fn;
    void *arg;
    intptr_t result;   /* fn's return value, once DONE */
    int state;         /* enum job_state; under the pool lock */
    moor_waker waker;  /* the waiting task, woken at DONE/FAILED; under the pool lock */
} job;

typedef struct worker_pool {
    pthread_mutex_t lock;
    pthread_cond_t work;
    moor__list queue;  /* jobs queued, oldest first */
    size_t queued;     /* jobs in the queue */
    moor__list running; /* jobs being run by a worker */
    pthread_t *threads; /* the workers started, to join at the end */
    size_t nthreads, cap_threads; /* started; room in threads */
    size_t max_threads; /* the executor's blocking_threads: a cap, never an allocation size */
    size_t idle;       /* workers waiting for a job */
    int stopping;
} worker_pool;

static void *worker(void *arg)
{
    worker_pool *p = arg;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->queue.head && !p->stopping) {
            p->idle++;
            pthread_cond_wait(&p->work, &p->lock);
            p->idle--;
        }
        if (!p->queue.head)
            break; /* stopping, and nothing left to run */
        job *j = moor_container_of(moor__list_pop(&p->queue), job, link);
        p->queued--;
        j->state = JOB_RUNNING;
        moor__list_push(&p->running, &j->link);
        moor_blocking_fn fn = j->fn;
        void *fn_arg = j->arg;
        pthread_mutex_unlock(&p->lock);
        intptr_t result = fn(fn_arg);
        pthread_mutex_lock(&p->lock);
        moor__list_remove(&p->running, &j->link);
        j->result = result;
        j->state = JOB_DONE;
        /* The last touch of j: its caller reads DONE only after this unlock, and may return
         * (freeing j's frame) at once. The wake is thread-safe: queued to the executor. */
        moor_waker_wake(&j->waker);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* With the lock held: room for one more thread handle. The array grows with the threads
 * actually started (doubling), so a huge cap costs nothing. */
static int reserve_thread(worker_pool *p)
{
    return moor__grow(&p->threads, &p->cap_threads, p->nthreads + 1, sizeof *p->threads);
}

/* With the lock held: queue the job, starting a worker if the idle ones are all spoken for
 * (each queued job will take one) and the pool may grow. If it cannot grow, the job waits
 * for a busy worker; with no worker at all it would wait for ever, so that fails. */
static int submit(worker_pool *p, job *j)
{
    int rc = -EAGAIN;
    if (p->queued >= p->idle && p->nthreads < p->max_threads) {
        rc = reserve_thread(p);
        if (rc == 0 && pthread_create(&p->threads[p->nthreads], NULL, worker, p) != 0)
            rc = -EAGAIN;
        if (rc == 0)
            p->nthreads++;
    }
    if (p->nthreads == 0)
        return rc;
    j->state = JOB_QUEUED;
    moor__list_push(&p->queue, &j->link);
    p->queued++;
    pthread_cond_signal(&p->work);
    return 0;
}

/* With the lock held: take a job out of the queue before any worker has started it. */
static void withdraw(worker_pool *p, job *j)
{
    moor__list_remove(&p->queue, &j->link);
    p->queued--;
}

static void pool_free(moor_executor *ex, void *self)
{
    worker_pool *p = self;
    moor__part_set(ex, MOOR__PART_BLOCKING, NULL, NULL);
    pthread_mutex_lock(&p->lock);
    /* Every job belongs to a call that waits for it, and the executor is freed only with no
     * task pending: nothing is queued or running. */
    moor__assert(!p->queue.head && !p->running.head, "blocking pool freed with calls in flight");
    p->stopping = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    for (size_t i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->work);
    moor__free(p->threads);
    moor__free(p);
}

static void pool_after_fork(moor_executor *ex, void *self)
{
    (void)ex;
    worker_pool *p = self;
    /* The workers did not cross the fork: in the child, queued and running jobs fail and
     * their calls return -ECANCELED. No thread of the child runs fn, so nothing can still
     * use their args. */
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    moor__list *lists[] = {&p->queue, &p->running};
    for (size_t i = 0; i < 2; i++) {
        moor__node *n;
        while ((n = moor__list_pop(lists[i]))) {
            job *j = moor_container_of(n, job, link);
            j->state = JOB_FAILED;
            moor_waker_wake(&j->waker);
        }
    }
    p->queued = 0;
    p->nthreads = 0;
    p->idle = 0;
}

static const moor__part_ops pool_part = {NULL, pool_after_fork, pool_free};

/* The executor's pool, made if it has none; NULL if out of memory. */
static worker_pool *pool_get(moor_executor *ex)
{
    worker_pool *p = moor__part_get(ex, MOOR__PART_BLOCKING);
    if (p)
        return p;
    p = moor__alloc(sizeof *p);
    if (!p)
        return NULL;
    memset(p, 0, sizeof *p);
    p->max_threads = ex->blocking_threads;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    moor__part_set(ex, MOOR__PART_BLOCKING, &pool_part, p);
    return p;
}

typedef struct blocking_future {
    moor_future base;
    moor_executor *ex;  /* the caller's, whose pool runs the job */
    worker_pool *pool;
    moor_fiber *fiber;  /* the calling fiber, whose cancel withdraws a queued job; NULL in
                         * plain code */
    int submitted;      /* the job was queued (it may have run since) */
    job job;            /* shared with the worker once submitted */
    moor__deadline deadline; /* bounds the wait for a worker only: dropped once fn starts */
} blocking_future;

/* Done, or to be withdrawn now? Submits the job the first time. Registration happens here
 * too, under the pool's lock (the job's waker), so that no worker finishing it is missed. */
MOOR__WAIT_OP int blocking_ready(moor_future *fut, moor_cx *cx)
{
    blocking_future *bf = moor_container_of(fut, blocking_future, base);
    worker_pool *p = bf->pool;
    job *j = &bf->job;
    int cancelled = bf->fiber && bf->fiber->cancelled;
    pthread_mutex_lock(&p->lock);
    if (!bf->submitted) {
        if (!cancelled && moor__deadline_passed(&bf->deadline)) {
            pthread_mutex_unlock(&p->lock);
            return 0; /* the skeleton times it out: fn never started */
        }
        int rc = cancelled ? -ECANCELED : submit(p, j);
        if (rc < 0) {
            pthread_mutex_unlock(&p->lock);
            fut->result = rc; /* fn never started */
            return 1;
        }
        bf->submitted = 1;
    }
    int state = j->state;
    if (state == JOB_QUEUED && cancelled)
        withdraw(p, j); /* under the lock: no worker can have taken it meanwhile */
    j->waker = cx->waker;
    pthread_mutex_unlock(&p->lock);

    switch (state) {
    case JOB_QUEUED:
        if (!cancelled)
            return 0;
        fut->result = -ECANCELED;
        return 1;
    case JOB_RUNNING:
        /* Neither the deadline nor a cancel can end this wait: fn may be using arg. */
        moor__deadline_disarm(&bf->deadline);
        bf->deadline.at = -1;
        return 0;
    case JOB_DONE:
        fut->result = 0;
        return 1;
    default: /* JOB_FAILED: no worker crossed the fork */
        fut->result = -ECANCELED;
        return 1;
    }
}

MOOR__WAIT_OP int blocking_park(moor_future *fut, moor_cx *cx)
{
    (void)fut;
    (void)cx;
    return 0; /* blocking_ready set the job's waker under the pool's lock */
}

/* Withdraw the job if no worker has taken it; one that has started cannot be given up
 * (-1: keep waiting), and one that finished meanwhile has completed. */
MOOR__WAIT_OP int blocking_unpark(moor_future *fut)
{
    blocking_future *bf = moor_container_of(fut, blocking_future, base);
    if (!bf->submitted)
        return 0;
    worker_pool *p = bf->pool;
    job *j = &bf->job;
    pthread_mutex_lock(&p->lock);
    int state = j->state;
    if (state == JOB_QUEUED)
        withdraw(p, j);
    pthread_mutex_unlock(&p->lock);
    switch (state) {
    case JOB_QUEUED:
        return 0;
    case JOB_RUNNING:
        return -1;
    case JOB_DONE:
        fut->result = 0;
        return 1;
    default:
        fut->result = -ECANCELED;
        return 1;
    }
}

static const moor__wait_ops blocking_wait = {blocking_ready, blocking_park, blocking_unpark, -ETIMEDOUT};

static moor_poll blocking_poll(moor_future *fut, moor_cx *cx)
{
    blocking_future *bf = moor_container_of(fut, blocking_future, base);
    return moor__wait_poll(fut, &bf->deadline, cx, &blocking_wait);
}

/* moor_blocking waits with moor__wait_uncancellable and withdraws a queued job itself when its
 * fiber is cancelled, so nothing ever drops this future while it is pending. Were that to
 * change, dropping a running call could let fn write into a frame that is no longer the
 * caller's: moor__wait_cancel refuses loudly (blocking_unpark says it cannot be given up). */
static moor_poll blocking_cancel(moor_future *fut)
{
    blocking_future *bf = moor_container_of(fut, blocking_future, base);
    return moor__wait_cancel(fut, &bf->deadline, &blocking_wait);
}

static const moor_future_ops blocking_ops = {"blocking call", blocking_poll, blocking_cancel};

int moor_blocking(moor_blocking_fn fn, void *arg, intptr_t *result, int64_t deadline)
{
    moor_executor *ex = moor__tls_executor;
    moor__assert(ex, "moor_blocking: no executor on this thread");
    moor__assert(fn, "moor_blocking: fn is NULL");
    worker_pool *p = pool_get(ex);
    if (!p)
        return -ENOMEM;

    blocking_future bf;
    moor_future_init(&bf.base, &blocking_ops, 0);
    bf.ex = ex;
    bf.pool = p;
    bf.fiber = ex->current;
    bf.submitted = 0;
    memset(&bf.job, 0, sizeof bf.job);
    bf.job.fn = fn;
    bf.job.arg = arg;
    moor__deadline_init(&bf.deadline, deadline);
    /* Uncancellable: the poll itself withdraws a job still queued when the fiber is
     * cancelled, and waits out one that has started. */
    intptr_t rc = moor__wait_uncancellable(&bf.base);
    if (rc == 0 && result)
        *result = bf.job.result;
    return (int)rc;
}
