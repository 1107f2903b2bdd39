#include "executor.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "assert.h"
#include "fiber.h"
#include "future.h"

#define DEFAULT_STACK_SIZE (256u * 1024u)
#define DEFAULT_GUARD_SIZE (64u * 1024u)
#define DEFAULT_POOL_HOT 64u
#define TASKS_PER_CHUNK 64u

__thread moor_executor *moor__tls_executor __attribute__((tls_model("initial-exec")));

/* ---- the plain driver: a condition variable, for executors without an event loop ------- */

static void plain_park(void *self, int64_t deadline)
{
    moor_executor *ex = self;
    pthread_mutex_lock(&ex->remote_lock);
    while (!ex->unparked && !__atomic_load_n(&ex->remote_pending, __ATOMIC_RELAXED)) {
        if (deadline < 0) {
            pthread_cond_wait(&ex->remote_cond, &ex->remote_lock);
            continue;
        }
        struct timespec ts = {.tv_sec = deadline / 1000, .tv_nsec = (deadline % 1000) * 1000000};
        if (pthread_cond_timedwait(&ex->remote_cond, &ex->remote_lock, &ts) == ETIMEDOUT)
            break;
    }
    ex->unparked = 0;
    pthread_mutex_unlock(&ex->remote_lock);
}

static void plain_unpark(void *self)
{
    moor_executor *ex = self;
    pthread_mutex_lock(&ex->remote_lock);
    ex->unparked = 1;
    pthread_cond_signal(&ex->remote_cond);
    pthread_mutex_unlock(&ex->remote_lock);
}

static const moor__driver plain_driver = {plain_park, plain_unpark};

void moor__driver_set(moor_executor *ex, const moor__driver *driver, void *self)
{
    ex->driver = driver ? driver : &plain_driver;
    ex->driver_self = driver ? self : ex;
}

static void fp_check_once(void) { (void)moor__fp_frame_check(); }

/* ---- executor lifecycle --------------------------------------------------------------- */

int moor_executor_new(moor_executor **out, const moor_executor_attr *attr)
{
    static const moor_executor_attr defaults;
    if (!attr)
        attr = &defaults;
    if (moor__tls_executor)
        return -EEXIST;

    moor_executor *ex = moor__alloc(sizeof *ex);
    if (!ex)
        return -ENOMEM;
    memset(ex, 0, sizeof *ex);
    size_t page = moor__page_size();
    size_t stack = attr->stack_size ? attr->stack_size : DEFAULT_STACK_SIZE;
    ex->stack_size = (stack + page - 1) / page * page;
    int rc = moor__stack_pool_init(&ex->pool, attr->guard_size ? attr->guard_size : DEFAULT_GUARD_SIZE,
                                   attr->pool_hot ? attr->pool_hot : DEFAULT_POOL_HOT, attr->guard);
    if (rc < 0) {
        moor__free(ex);
        return rc;
    }
    ex->stack_map_size = moor__fiber_map_size(ex, ex->stack_size);
    /* The default size's bucket first: the inline fast path of the pool looks only there. */
    char *warm;
    rc = moor__stack_get(&ex->pool, ex->stack_map_size, &warm);
    if (rc < 0) {
        moor__stack_pool_destroy(&ex->pool);
        moor__free(ex);
        return rc;
    }
    moor__stack_put(&ex->pool, warm, ex->stack_map_size);
    ex->next_gen = 1;
    ex->next_fiber_id = 1;
    ex->errno_ptr = &errno;
    static pthread_once_t fp_once = PTHREAD_ONCE_INIT;
    pthread_once(&fp_once, fp_check_once);

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ex->remote_cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&ex->remote_lock, NULL);
    moor__driver_set(ex, NULL, NULL);

    rc = moor__overflow_thread_init(ex);
    if (rc < 0) {
        pthread_mutex_destroy(&ex->remote_lock);
        pthread_cond_destroy(&ex->remote_cond);
        moor__stack_pool_destroy(&ex->pool);
        moor__free(ex);
        return rc;
    }
#ifdef MOOR_TSAN_FIBERS
    ex->ctx.tsan_fiber = __tsan_get_current_fiber();
#endif
    moor__tls_executor = ex;
    *out = ex;
    return 0;
}

void moor_executor_free(moor_executor *ex)
{
    moor__assert(ex == moor__tls_executor,
                 "moor_executor_free: the executor belongs to another thread");
    moor__assert(!ex->running, "moor_executor_free: called while the executor runs (from a fiber "
                               "or a poll)");
    moor__assert(ex->ntasks == 0,
                 "moor_executor_free: %zu task(s) still pending; join or finish them first",
                 ex->ntasks);
    moor__fibers_release_all(ex);
    moor__stack_pool_destroy(&ex->pool);
    for (size_t i = 0; i < ex->ntask_chunks; i++)
        moor__free(ex->task_chunks[i]);
    moor__free(ex->task_chunks);
    moor__free(ex->remote);
    moor__overflow_thread_fini(ex);
    pthread_mutex_destroy(&ex->remote_lock);
    pthread_cond_destroy(&ex->remote_cond);
    moor__tls_executor = NULL;
    moor__free(ex);
}

moor_executor *moor_executor_current(void) { return moor__tls_executor; }

moor_guard_mode moor_executor_guard(const moor_executor *ex) { return ex->pool.mode; }

/* ---- tasks ---------------------------------------------------------------------------- */

static moor_task *task_slot_get(moor_executor *ex)
{
    if (!ex->free_tasks) {
        void **chunks = moor__realloc(ex->task_chunks, (ex->ntask_chunks + 1) * sizeof *chunks);
        if (!chunks)
            return NULL;
        ex->task_chunks = chunks;
        moor_task *slab = moor__alloc(TASKS_PER_CHUNK * sizeof *slab);
        if (!slab)
            return NULL;
        memset(slab, 0, TASKS_PER_CHUNK * sizeof *slab);
        chunks[ex->ntask_chunks++] = slab;
        for (size_t i = 0; i < TASKS_PER_CHUNK; i++) {
            slab[i].next = ex->free_tasks;
            ex->free_tasks = &slab[i];
        }
    }
    moor_task *t = ex->free_tasks;
    ex->free_tasks = t->next;
    return t;
}

int moor__task_start(moor_executor *ex, moor_future *fut, moor_task *task)
{
    if (!task) {
        task = task_slot_get(ex);
        if (!task)
            return -ENOMEM;
        task->kind = MOOR__TASK_PLAIN;
    } else {
        task->kind = MOOR__TASK_FIBER;
    }
    task->fut = fut;
    task->gen = ex->next_gen++;
    task->state = MOOR__TASK_SCHEDULED;
    ex->ntasks++;
    moor__runq_push(ex, task);
    return 0;
}

void moor__task_finish(moor_executor *ex, moor_task *t)
{
    ex->ntasks--;
    t->gen = 0;
    t->state = MOOR__TASK_FREE;
    if (t->kind == MOOR__TASK_PLAIN) {
        t->fut = NULL;
        t->next = ex->free_tasks;
        ex->free_tasks = t;
    }
}

int moor_executor_spawn(moor_executor *ex, moor_future *fut)
{
    moor__assert(ex == moor__tls_executor,
                 "moor_executor_spawn: the executor belongs to another thread");
    moor__assert(!moor_future_done(fut), "moor_executor_spawn: future %p is already done",
                 (void *)fut);
    return moor__task_start(ex, fut, NULL);
}

/* ---- wakers --------------------------------------------------------------------------- */

static inline void wake_local(moor_executor *ex, moor_task *t, uint64_t gen)
{
    if (t->gen != gen)
        return; /* the task finished; its slot may already hold another */
    if (t->state == MOOR__TASK_IDLE) {
        t->state = MOOR__TASK_SCHEDULED;
        moor__runq_push(ex, t);
    } else if (t->state == MOOR__TASK_RUNNING) {
        t->state = MOOR__TASK_NOTIFIED;
    }
}

static void wake_remote(moor_executor *ex, moor_task *t, uint64_t gen)
{
    pthread_mutex_lock(&ex->remote_lock);
    if (ex->nremote == ex->cap_remote) {
        size_t ncap = ex->cap_remote ? ex->cap_remote * 2 : 64;
        moor__remote_wake *nv = moor__realloc(ex->remote, ncap * sizeof *nv);
        moor__assert(nv, "out of memory queueing a wake from another thread");
        ex->remote = nv;
        ex->cap_remote = ncap;
    }
    ex->remote[ex->nremote++] = (moor__remote_wake){t, gen};
    __atomic_store_n(&ex->remote_pending, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&ex->remote_lock);
    ex->driver->unpark(ex->driver_self);
}

void moor_waker_wake(const moor_waker *w)
{
    if (!w->task)
        return;
    if (w->ex == moor__tls_executor)
        wake_local(w->ex, w->task, w->gen);
    else
        wake_remote(w->ex, w->task, w->gen);
}

static void drain_remote(moor_executor *ex)
{
    pthread_mutex_lock(&ex->remote_lock);
    for (size_t i = 0; i < ex->nremote; i++)
        wake_local(ex, ex->remote[i].task, ex->remote[i].gen);
    ex->nremote = 0;
    __atomic_store_n(&ex->remote_pending, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&ex->remote_lock);
}

/* ---- running -------------------------------------------------------------------------- */

/* Run one task. A fiber task is resumed; it does its own bookkeeping when it stops, and
 * may hand off to further fibers before control comes back here (moor__fiber_suspend). */
static inline void task_run(moor_executor *ex, moor_task *t)
{
    t->state = MOOR__TASK_RUNNING;
    if (t->kind == MOOR__TASK_FIBER) {
        ex->handoffs_left = MOOR__HANDOFF_BUDGET;
        moor__fiber_resume(ex, moor_container_of(t, moor_fiber, task));
        return;
    }
    moor_cx cx = {{ex, t, t->gen}};
    if (moor_future_poll(t->fut, &cx) == MOOR_READY)
        moor__task_finish(ex, t);
    else
        moor__task_pending(ex, t);
}

/* Run tasks until `until` is done, or, with until == NULL, until no task is left. */
static void run(moor_executor *ex, moor_future *until)
{
    moor__assert(ex == moor__tls_executor, "the executor belongs to another thread");
    moor__assert(!ex->current, "the executor cannot be run from inside a fiber; use moor_await");
    moor__assert(!ex->running, "the executor is already running (called from inside a poll)");
    ex->running = 1;
    for (;;) {
        if (__atomic_load_n(&ex->remote_pending, __ATOMIC_ACQUIRE))
            drain_remote(ex);
        moor_task *t = moor__runq_pop(ex);
        if (t) {
            task_run(ex, t);
            if (until && moor__future_done(until))
                break;
            continue;
        }
        if (until ? moor__future_done(until) : ex->ntasks == 0)
            break;
        ex->driver->park(ex->driver_self, -1);
    }
    ex->running = 0;
}

int moor_executor_run(moor_executor *ex)
{
    run(ex, NULL);
    return 0;
}

intptr_t moor_block_on(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    moor__assert(ex, "moor_block_on: no executor on this thread (call moor_executor_new first)");
    moor__assert(!ex->current, "moor_block_on called from a fiber; a fiber uses moor_await");
    int rc = moor_executor_spawn(ex, fut);
    if (rc < 0)
        return rc;
    run(ex, fut);
    return fut->result;
}
