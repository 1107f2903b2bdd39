/* Many executors in one process: moor_threads_run starts a thread per executor, runs a
 * function as each one's first fiber and joins them, so that an error in one of them is
 * reported rather than lost. Nothing here is on a hot path: each executor runs alone on its
 * thread, and the threads share only the run's bookkeeping, touched at start and at end. */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>

#include "alloc.h"
#include "assert.h"
#include "executor.h"

typedef struct threads_run threads_run;

typedef struct run_thread {
    threads_run *run;
    size_t index;
    pthread_t thread;
    int started;            /* pthread_create succeeded: to be joined */
    moor_executor *ex;      /* atomic: the thread's executor while fn's fiber may run on it
                               (see moor_thread_executor), else NULL */
    moor_promise *others_done; /* resolved once fn has returned on every thread */
    int runs_fn;            /* fn's fiber was spawned: counted in fns_running (set at the
                               barrier, read-only after) */
    int fn_returned;        /* this thread's fn has returned (its own thread only) */
    intptr_t result;        /* fn's return value, or the thread's error (error != 0) */
    int error;              /* 0, or why fn could not run or its executor deadlocked */
} run_thread;

struct threads_run {
    moor_fiber_fn fn;
    void *arg;
    const moor_executor_attr *attr;
    size_t n;
    run_thread *threads;
    /* The start barrier: no fn runs before every thread that started has made its executor
     * and spawned fn's fiber (or failed to), so that moor_thread_executor finds them all. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    size_t arrived;          /* threads at the barrier */
    size_t expected;         /* threads started; SIZE_MAX until every create was tried */
    int go;                  /* the barrier is open */
    size_t fns_running;      /* atomic: fns that have not returned */
};

/* The calling thread's place in its run, or NULL outside one. */
static __thread run_thread *tls_thread;

/* Under run->lock, once every started thread has arrived: count the fns that will run and
 * open the barrier. */
static void barrier_open(threads_run *run)
{
    size_t fns = 0;
    for (size_t i = 0; i < run->n; i++) {
        run_thread *t = &run->threads[i];
        t->runs_fn = t->started && __atomic_load_n(&t->ex, __ATOMIC_ACQUIRE) != NULL;
        fns += (size_t)t->runs_fn;
    }
    __atomic_store_n(&run->fns_running, fns, __ATOMIC_RELEASE);
    run->go = 1;
    pthread_cond_broadcast(&run->cond);
}

static void barrier_wait(threads_run *run)
{
    pthread_mutex_lock(&run->lock);
    run->arrived++;
    if (run->arrived == run->expected && !run->go)
        barrier_open(run);
    while (!run->go)
        pthread_cond_wait(&run->cond, &run->lock);
    pthread_mutex_unlock(&run->lock);
}

/* fn has returned on the calling thread (or will never return there: its executor was
 * given up on). The last of the run lets every first fiber end. */
static void fn_done(run_thread *t)
{
    threads_run *run = t->run;
    t->fn_returned = 1;
    if (__atomic_sub_fetch(&run->fns_running, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    for (size_t i = 0; i < run->n; i++)
        if (run->threads[i].runs_fn)
            moor_promise_resolve(run->threads[i].others_done, 0);
}

/* Each thread's first fiber: fn, then a wait until fn has returned on every thread, so that
 * an executor of the run cannot end (and its memory become another executor) while an fn
 * elsewhere may still spawn onto it. A promise is never called a deadlock, but fn waits
 * before it, so a deadlock inside fn is still found. */
static intptr_t first_fiber(void *p)
{
    run_thread *t = p;
    intptr_t result = t->run->fn(t->run->arg);
    fn_done(t);
    /* In a fiber cancelled after a deadlock this returns at once: the executor ends with
     * its fibers, and spawns onto it fail (-ESRCH). */
    moor_promise_await(t->others_done, -1);
    return result;
}

/* After a deadlock: cancel every fiber of ex, so that their waits return -ECANCELED and they
 * clean up. Returns how many were cancelled. */
static size_t cancel_all(moor_executor *ex)
{
    size_t n = 0;
    for (moor__node *node = ex->fibers.head; node; node = node->next) {
        moor_fiber *f = moor_container_of(node, moor_fiber, link);
        if (f->state == MOOR__FIBER_LIVE && !f->cancelled) {
            moor_cancel(f);
            n++;
        }
    }
    return n;
}

/* moor_executor_run, and while it finds no task left but a hold on ex (a feeder on another
 * thread means to spawn onto it), wait for the spawn or the release and run again: a plain
 * run returns once no task is left, held or not. The spawn and the release both unpark the
 * driver, and an unpark that comes before the park makes it return at once, so neither is
 * missed. */
static int run_while_held(moor_executor *ex)
{
    for (;;) {
        int rc = moor_executor_run(ex);
        if (rc < 0 || !__atomic_load_n(&ex->holds, __ATOMIC_ACQUIRE))
            return rc;
        ex->driver->park(ex->driver_self, -1);
    }
}

/* Run ex until no task and no hold is left. 0, or -EDEADLK if it deadlocked: then its fibers
 * have been cancelled and run to their end, as far as they would go. Returns with tasks still
 * pending only if the cancels could not end them. */
static int run_to_end(moor_executor *ex)
{
    int rc = run_while_held(ex);
    if (rc != -EDEADLK)
        return rc;
    /* Cancel and run again while that makes progress: a cancelled fiber may wait in a
     * moor_join for a child that has its own cleanup to do, or spawn one. */
    for (;;) {
        size_t before = ex->ntasks;
        size_t cancelled = cancel_all(ex);
        if (run_while_held(ex) == 0 || (cancelled == 0 && ex->ntasks >= before))
            break;
    }
    return -EDEADLK;
}

static void *thread_main(void *p)
{
    run_thread *t = p;
    threads_run *run = t->run;
    tls_thread = t;

    moor_executor *ex = NULL;
    moor_fiber *first = NULL;
    int rc = moor_executor_new(&ex, run->attr);
    if (rc == 0)
        rc = moor_promise_new(&t->others_done, NULL);
    if (rc == 0) {
        char name[MOOR__FIBER_NAME_MAX];
        snprintf(name, sizeof name, "thread %zu", t->index);
        moor_fiber_attr fattr = {.name = name, .stack_size = 0};
        rc = moor_spawn(&first, first_fiber, t, &fattr);
        if (rc < 0) {
            moor_promise_drop(t->others_done);
            moor_promise_resolve(t->others_done, 0);
        }
    }
    /* Published before the barrier, and only with fn's fiber spawned: a spawn from another
     * thread that finds the handle finds a task here that keeps the executor from ending. */
    if (rc == 0)
        __atomic_store_n(&t->ex, ex, __ATOMIC_RELEASE);
    barrier_wait(run);

    if (rc == 0) {
        rc = run_to_end(ex);
        intptr_t result = 0;
        if (ex->ntasks == 0) {
            moor_join(first, &result); /* done, or cancelled after a deadlock: no wait */
            __atomic_store_n(&t->ex, NULL, __ATOMIC_RELEASE);
            moor_executor_free(ex);
        } else {
            fprintf(stderr, "moor: moor_threads_run: thread %zu's executor deadlocked and %zu "
                            "task(s) could not be cancelled; it is left allocated with them\n",
                    t->index, ex->ntasks);
            __atomic_store_n(&t->ex, NULL, __ATOMIC_RELEASE);
            if (!t->fn_returned)
                fn_done(t); /* it never will: let the others end */
        }
        t->result = rc < 0 ? rc : result;
    } else {
        t->result = rc;
        if (ex)
            moor_executor_free(ex);
    }
    t->error = rc;
    tls_thread = NULL;
    return NULL;
}

int moor_threads_run(size_t n, moor_fiber_fn fn, void *arg, const moor_executor_attr *attr,
                     intptr_t *results)
{
    moor__assert(!moor_self(),
                 "moor_threads_run: called from a fiber (it blocks its thread until every "
                 "thread is joined, stalling the fiber's executor); call it from plain code");
    if (n == 0 || n > INT_MAX || !fn)
        return -EINVAL;
    if (n > SIZE_MAX / sizeof(run_thread))
        return -ENOMEM;
    threads_run run = {.fn = fn, .arg = arg, .attr = attr, .n = n, .expected = SIZE_MAX};
    run.threads = moor__alloc(n * sizeof *run.threads);
    if (!run.threads)
        return -ENOMEM;
    pthread_mutex_init(&run.lock, NULL);
    pthread_cond_init(&run.cond, NULL);

    size_t started = 0;
    for (size_t i = 0; i < n; i++) {
        run_thread *t = &run.threads[i];
        *t = (run_thread){.run = &run, .index = i};
        int err = pthread_create(&t->thread, NULL, thread_main, t);
        if (err) {
            t->result = -err;
            t->error = -err;
            continue;
        }
        t->started = 1;
        started++;
    }
    pthread_mutex_lock(&run.lock);
    run.expected = started;
    if (run.arrived == run.expected && !run.go)
        barrier_open(&run);
    pthread_mutex_unlock(&run.lock);

    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        run_thread *t = &run.threads[i];
        if (t->started)
            pthread_join(t->thread, NULL);
        if (rc == 0 && t->error)
            rc = t->error;
        if (results)
            results[i] = t->result;
    }
    pthread_cond_destroy(&run.cond);
    pthread_mutex_destroy(&run.lock);
    moor__free(run.threads);
    return rc;
}

int moor_thread_index(void)
{
    return tls_thread ? (int)tls_thread->index : -1;
}

moor_executor *moor_thread_executor(size_t i)
{
    run_thread *t = tls_thread;
    if (!t || i >= t->run->n)
        return NULL;
    return __atomic_load_n(&t->run->threads[i].ex, __ATOMIC_ACQUIRE);
}
