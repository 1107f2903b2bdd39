/* The pool of worker threads for calls that would block the loop. One pool per executor,
 * started on first use and grown to its size on demand. A job is shared by the waiting fiber
 * and the worker; whichever lets go of it last frees it, so a fiber that stops waiting
 * (deadline, cancel) leaves the worker nothing freed to touch. */
#include <errno.h>
#include <pthread.h>
#include <string.h>

#include "fiber/alloc.h"
#include "fiber/assert.h"
#include "fiber/fiber.h"
#include "reactor.h"

enum job_state { JOB_QUEUED, JOB_RUNNING, JOB_DONE, JOB_FAILED };

typedef struct job {
    struct job *next;  /* the queue, or the list of running jobs */
    moor_blocking_fn fn;
    void *arg;
    intptr_t result;
    int state;         /* enum job_state; under the pool lock */
    int abandoned;     /* the fiber stopped waiting; the worker frees the job */
    moor_waker waker;  /* the waiting fiber's task; under the pool lock */
} job;

struct moor__blocking_pool {
    pthread_mutex_t lock;
    pthread_cond_t work;
    job *head, *tail;  /* queued */
    job *running;      /* being run by a worker */
    pthread_t *threads;
    size_t nthreads, max_threads, idle;
    int stopping;
};

static void *worker(void *arg)
{
    moor__blocking_pool *p = arg;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->head && !p->stopping) {
            p->idle++;
            pthread_cond_wait(&p->work, &p->lock);
            p->idle--;
        }
        if (!p->head)
            break; /* stopping, and nothing left to run */
        job *j = p->head;
        p->head = j->next;
        if (!p->head)
            p->tail = NULL;
        j->state = JOB_RUNNING;
        j->next = p->running;
        p->running = j;
        pthread_mutex_unlock(&p->lock);
        intptr_t result = j->fn(j->arg);
        pthread_mutex_lock(&p->lock);
        for (job **link = &p->running; *link; link = &(*link)->next) {
            if (*link == j) {
                *link = j->next;
                break;
            }
        }
        if (j->abandoned) {
            moor__free(j);
            continue;
        }
        j->result = result;
        j->state = JOB_DONE;
        moor_waker_wake(&j->waker); /* thread-safe: queued to the executor, which is unparked */
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

static moor__blocking_pool *pool_get(moor__reactor *r)
{
    if (r->blocking)
        return r->blocking;
    moor__blocking_pool *p = moor__alloc(sizeof *p);
    if (!p)
        return NULL;
    memset(p, 0, sizeof *p);
    p->max_threads = r->ex->blocking_threads;
    p->threads = moor__alloc(p->max_threads * sizeof *p->threads);
    if (!p->threads) {
        moor__free(p);
        return NULL;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    r->blocking = p;
    return p;
}

/* With the lock held: queue the job, starting a worker if none is idle and the pool may grow. */
static int submit(moor__blocking_pool *p, job *j)
{
    if (p->idle == 0 && p->nthreads < p->max_threads) {
        if (pthread_create(&p->threads[p->nthreads], NULL, worker, p) == 0)
            p->nthreads++;
        else if (p->nthreads == 0)
            return -EAGAIN;
    }
    j->next = NULL;
    if (p->tail)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    pthread_cond_signal(&p->work);
    return 0;
}

void moor__blocking_pool_free(moor__blocking_pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->stopping = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    /* Workers finish what they run (abandoned jobs included) and then exit. */
    for (size_t i = 0; i < p->nthreads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->work);
    moor__free(p->threads);
    moor__free(p);
}

void moor__blocking_pool_after_fork(moor__blocking_pool *p)
{
    /* The workers did not cross the fork: in the child, queued and running jobs fail and
     * their fibers see -ECANCELED. No worker is left to race with, so abandoned ones are
     * freed here. */
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    for (int list = 0; list < 2; list++) {
        job *j = list ? p->running : p->head;
        while (j) {
            job *next = j->next;
            if (j->abandoned) {
                moor__free(j);
            } else {
                j->state = JOB_FAILED;
                moor_waker_wake(&j->waker);
            }
            j = next;
        }
    }
    p->head = p->tail = p->running = NULL;
    p->nthreads = 0;
    p->idle = 0;
}

typedef struct blocking_future {
    moor_future base;
    moor__blocking_pool *pool;
    moor_blocking_fn fn;
    void *arg;
    job *job;          /* NULL before the first poll and after letting go */
    intptr_t value;    /* fn's return value, once done */
    moor_timer_node node;
    int64_t deadline;
} blocking_future;

static void let_go(blocking_future *bf, moor_executor *ex)
{
    moor__timer_remove(&ex->timers, &bf->node);
    moor__blocking_pool *p = bf->pool;
    job *j = bf->job;
    bf->job = NULL;
    pthread_mutex_lock(&p->lock);
    if (j->state == JOB_QUEUED) {
        /* Never started: take it out of the queue and free it here. */
        job **link = &p->head;
        job *prev = NULL;
        while (*link != j) {
            prev = *link;
            link = &(*link)->next;
        }
        *link = j->next;
        if (p->tail == j)
            p->tail = prev;
        moor__free(j);
    } else if (j->state == JOB_RUNNING) {
        j->abandoned = 1; /* the worker frees it */
    } else {
        moor__free(j);
    }
    pthread_mutex_unlock(&p->lock);
}

/* First poll: hand the call to a worker. The job is made here, not before, so that a future
 * dropped before its first poll holds nothing. */
static int start(blocking_future *bf, moor_cx *cx)
{
    job *j = moor__alloc(sizeof *j);
    if (!j)
        return -ENOMEM;
    memset(j, 0, sizeof *j);
    j->fn = bf->fn;
    j->arg = bf->arg;
    j->state = JOB_QUEUED;
    j->waker = cx->waker;
    pthread_mutex_lock(&bf->pool->lock);
    int rc = submit(bf->pool, j);
    pthread_mutex_unlock(&bf->pool->lock);
    if (rc < 0) {
        moor__free(j);
        return rc;
    }
    bf->job = j;
    return 0;
}

static moor_poll blocking_poll(moor_future *fut, moor_cx *cx)
{
    blocking_future *bf = moor_container_of(fut, blocking_future, base);
    moor_executor *ex = cx->waker.ex;
    if (bf->deadline >= 0 && moor_now() >= bf->deadline) {
        if (bf->job)
            let_go(bf, ex);
        fut->result = -ETIMEDOUT;
        return MOOR_READY;
    }
    if (!bf->job) {
        int rc = start(bf, cx);
        if (rc < 0) {
            fut->result = rc;
            return MOOR_READY;
        }
    } else {
        job *j = bf->job;
        moor__blocking_pool *p = bf->pool;
        pthread_mutex_lock(&p->lock);
        int state = j->state;
        j->waker = cx->waker;
        bf->value = j->result;
        pthread_mutex_unlock(&p->lock);
        if (state == JOB_DONE || state == JOB_FAILED) {
            fut->result = state == JOB_DONE ? 0 : -ECANCELED;
            let_go(bf, ex);
            return MOOR_READY;
        }
    }
    if (moor__timer_arm(&ex->timers, &bf->node, bf->deadline, &cx->waker) < 0) {
        let_go(bf, ex);
        fut->result = -ENOMEM;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static moor_poll blocking_cancel(moor_future *fut)
{
    blocking_future *bf = moor_container_of(fut, blocking_future, base);
    if (!bf->job)
        return MOOR_PENDING;
    moor__blocking_pool *p = bf->pool;
    pthread_mutex_lock(&p->lock);
    int state = bf->job->state;
    bf->value = bf->job->result;
    pthread_mutex_unlock(&p->lock);
    let_go(bf, moor__tls_executor);
    if (state != JOB_DONE)
        return MOOR_PENDING;
    fut->result = 0; /* it finished: its result (bf->value) stands */
    return MOOR_READY;
}

static const moor_future_ops blocking_ops = {"blocking call", blocking_poll, blocking_cancel};

int moor_blocking(moor_blocking_fn fn, void *arg, intptr_t *result, int64_t deadline)
{
    moor_executor *ex = moor__tls_executor;
    moor__assert(ex, "moor_blocking: no executor on this thread");
    moor__assert(fn, "moor_blocking: fn is NULL");
    moor__reactor *r;
    int err = moor__reactor_get(ex, &r);
    if (err < 0)
        return err;
    moor__blocking_pool *p = pool_get(r);
    if (!p)
        return -ENOMEM;

    blocking_future bf;
    moor_future_init(&bf.base, &blocking_ops, 0);
    bf.pool = p;
    bf.fn = fn;
    bf.arg = arg;
    bf.job = NULL;
    bf.value = 0;
    bf.deadline = deadline;
    moor__timer_node_init(&bf.node);
    intptr_t rc = moor__wait(&bf.base);
    if (rc == 0 && result)
        *result = bf.value;
    return (int)rc;
}
