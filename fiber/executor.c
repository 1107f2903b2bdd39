#include "executor.h"

#include <errno.h>
#include <signal.h>
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

static void plain_park(void *self, int64_t timeout_ms)
{
    moor_executor *ex = self;
    struct timespec until;
    if (timeout_ms > 0) {
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (timeout_ms % 1000) * 1000000;
        if (until.tv_nsec >= 1000000000) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000;
        }
    }
    pthread_mutex_lock(&ex->remote_lock);
    while (timeout_ms != 0 && !ex->unparked &&
           !__atomic_load_n(&ex->remote_pending, __ATOMIC_RELAXED)) {
        if (timeout_ms < 0)
            pthread_cond_wait(&ex->remote_cond, &ex->remote_lock);
        else if (pthread_cond_timedwait(&ex->remote_cond, &ex->remote_lock, &until) == ETIMEDOUT)
            break;
    }
    ex->unparked = 0;
    pthread_mutex_unlock(&ex->remote_lock);
}

/* Called with remote_lock held (remote_push), the mutex the park waits with. */
static void plain_unpark(void *self)
{
    moor_executor *ex = self;
    ex->unparked = 1;
    pthread_cond_signal(&ex->remote_cond);
}

static const moor__driver plain_driver = {plain_park, plain_unpark};

void moor__driver_set(moor_executor *ex, const moor__driver *driver, void *self)
{
    pthread_mutex_lock(&ex->remote_lock);
    ex->driver = driver ? driver : &plain_driver;
    ex->driver_self = driver ? self : ex;
    pthread_mutex_unlock(&ex->remote_lock);
}

static void context_setup_once(void)
{
    (void)moor__fp_frame_check();
    moor__ctx_template_init();
}

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
    ex->blocking_threads = attr->blocking_threads ? attr->blocking_threads : 4;
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
    ex->plain_budget = MOOR__COOP_BUDGET;
    ex->errno_ptr = &errno;
    /* A write to a socket or pipe whose reader has gone must fail with -EPIPE, not raise a
     * signal that kills the process; leave SIGPIPE alone if the application chose for it. */
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
        signal(SIGPIPE, SIG_IGN);
    ex->ctx.started = 1; /* the thread's own stack: it will wait inside moor__switch */
    static pthread_once_t fp_once = PTHREAD_ONCE_INIT;
    pthread_once(&fp_once, context_setup_once);

    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ex->remote_cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&ex->remote_lock, NULL);
    ex->driver = &plain_driver;
    ex->driver_self = ex;

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
    if (ex->reactor_free)
        ex->reactor_free(ex);
    moor__fibers_release_all(ex);
    moor__stack_pool_destroy(&ex->pool);
    moor__timer_heap_free(&ex->timers);
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

void moor__owner_bind(moor_executor **owner, const char *what)
{
    moor__assert(!*owner, "%s: called from another thread than the one whose executor owns it "
                          "(objects of one executor are not thread-safe; other threads reach "
                          "its fibers with moor_executor_spawn_remote or moor_waker_wake)",
                 what);
    *owner = moor__tls_executor;
}

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
    moor_task *t = task_slot_get(ex);
    if (!t)
        return -ENOMEM;
    t->kind = MOOR__TASK_PLAIN;
    moor__task_start(ex, t, fut);
    return 0;
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

/* Queue a request for the executor's thread and unpark it. */
static int remote_push(moor_executor *ex, moor__remote_req req)
{
    pthread_mutex_lock(&ex->remote_lock);
    if (ex->nremote == ex->cap_remote) {
        size_t ncap = ex->cap_remote ? ex->cap_remote * 2 : 64;
        moor__remote_req *nv = moor__realloc(ex->remote, ncap * sizeof *nv);
        if (!nv) {
            pthread_mutex_unlock(&ex->remote_lock);
            return -ENOMEM;
        }
        ex->remote = nv;
        ex->cap_remote = ncap;
    }
    ex->remote[ex->nremote++] = req;
    __atomic_store_n(&ex->remote_pending, 1, __ATOMIC_RELEASE);
    /* Under the lock: the driver may be swapped (reactor install) only under it too. */
    ex->driver->unpark(ex->driver_self);
    pthread_mutex_unlock(&ex->remote_lock);
    return 0;
}

static void wake_remote(moor_executor *ex, moor_task *t, uint64_t gen)
{
    /* A wake cannot be refused: losing it could hang its task forever. */
    int rc = remote_push(ex, (moor__remote_req){t, gen, NULL, NULL});
    moor__assert(rc == 0, "out of memory queueing a wake from another thread");
}

int moor_executor_spawn_remote(moor_executor *ex, moor_fiber_fn fn, void *arg)
{
    moor__assert(fn, "moor_executor_spawn_remote: fn is NULL");
    return remote_push(ex, (moor__remote_req){NULL, 0, fn, arg});
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

/* Remote spawns started per turn: a burst of them must not map a stack for every request
 * before the first one has run (and given its stack back). */
#define REMOTE_SPAWNS_PER_TURN 256u

static void drain_remote(moor_executor *ex)
{
    pthread_mutex_lock(&ex->remote_lock);
    size_t spawns = 0, kept = 0;
    for (size_t i = 0; i < ex->nremote; i++) {
        moor__remote_req req = ex->remote[i];
        if (req.task) {
            wake_local(ex, req.task, req.gen);
        } else if (spawns < REMOTE_SPAWNS_PER_TURN) {
            spawns++;
            /* Spawning touches only this executor's state, never remote_lock's. */
            int rc = moor_spawn(NULL, req.fn, req.arg, NULL);
            if (rc < 0) /* the caller has gone on; say so rather than drop it silently */
                fprintf(stderr, "moor: a fiber spawned from another thread could not start: %s\n",
                        moor_strerror(rc));
        } else {
            ex->remote[kept++] = req; /* next turn, in order */
        }
    }
    ex->nremote = kept;
    __atomic_store_n(&ex->remote_pending, kept != 0, __ATOMIC_RELAXED);
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
    moor_cx cx = {{ex, t, t->gen}, NULL, NULL};
    if (moor_future_poll(t->fut, &cx) == MOOR_READY)
        moor__task_finish(ex, t);
    else
        moor__task_pending(ex, t);
}

/* Fire due timers and let the driver look for events, blocking only if may_block and no
 * timer fired: until the next timer's deadline, an event or an unpark. */
static void events(moor_executor *ex, int may_block)
{
    int64_t now = moor_now();
    if (moor__timer_fire(&ex->timers, now))
        may_block = 0;
    int64_t timeout = 0;
    if (may_block) {
        int64_t next = moor__timer_next(&ex->timers);
        timeout = next < 0 ? -1 : next - now;
    }
    ex->driver->park(ex->driver_self, timeout);
    if (timeout != 0)
        moor__timer_fire(&ex->timers, moor_now());
}

/* Run tasks until done(arg) holds, or, with done == NULL, until no task is left. While
 * tasks are runnable it never blocks, but it still looks at timers and events every
 * EVENTS_EVERY runs so that a busy queue cannot starve them. */
#define EVENTS_EVERY 64u

static void run(moor_executor *ex, int (*done)(const void *arg), const void *arg)
{
    moor__assert(ex == moor__tls_executor, "the executor belongs to another thread");
    moor__assert(!ex->current, "the executor cannot be run from inside a fiber; use moor_await");
    moor__assert(!ex->running, "the executor is already running (called from inside a poll)");
    ex->running = 1;
    unsigned runs = 0;
    for (;;) {
        if (__atomic_load_n(&ex->remote_pending, __ATOMIC_ACQUIRE))
            drain_remote(ex);
        moor_task *t = moor__runq_pop(ex);
        if (t) {
            task_run(ex, t);
            if (done && done(arg))
                break;
            if (++runs % EVENTS_EVERY == 0)
                events(ex, 0);
            continue;
        }
        if (done ? done(arg) : ex->ntasks == 0)
            break;
        events(ex, 1);
    }
    ex->running = 0;
}

int moor__executor_tick(moor_executor *ex, unsigned budget, int64_t *next_deadline)
{
    moor__assert(!ex->running, "the executor is already running (called from inside a poll)");
    ex->running = 1;
    moor__timer_fire(&ex->timers, moor_now());
    if (__atomic_load_n(&ex->remote_pending, __ATOMIC_ACQUIRE))
        drain_remote(ex);
    moor_task *t;
    while (budget-- && (t = moor__runq_pop(ex)))
        task_run(ex, t);
    ex->running = 0;
    *next_deadline = moor__timer_next(&ex->timers);
    return ex->run_head != NULL || __atomic_load_n(&ex->remote_pending, __ATOMIC_ACQUIRE);
}

void moor__executor_turn(moor_executor *ex)
{
    moor__assert(ex == moor__tls_executor, "the executor belongs to another thread");
    ex->running = 1;
    events(ex, 0);
    if (__atomic_load_n(&ex->remote_pending, __ATOMIC_ACQUIRE))
        drain_remote(ex);
    size_t n = 0;
    for (moor_task *t = ex->run_head; t; t = t->next)
        n++;
    moor_task *t;
    while (n-- && (t = moor__runq_pop(ex)))
        task_run(ex, t);
    ex->running = 0;
}

void moor__executor_after_fork(moor_executor *ex)
{
    pthread_mutex_init(&ex->remote_lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ex->remote_cond, &ca);
    pthread_condattr_destroy(&ca);
}

static int future_is_done(const void *fut) { return moor__future_done(fut); }

void moor__executor_run_until(moor_executor *ex, int (*done)(const void *arg), const void *arg)
{
    run(ex, done, arg);
}

int moor_executor_run(moor_executor *ex)
{
    run(ex, NULL, NULL);
    return 0;
}

intptr_t moor__wait(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    return ex && ex->current ? moor_await(fut) : moor_block_on(fut);
}

intptr_t moor_block_on(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    moor__assert(ex, "moor_block_on: no executor on this thread (call moor_executor_new first)");
    moor__assert(!ex->current, "moor_block_on called from a fiber; a fiber uses moor_await");
    int rc = moor_executor_spawn(ex, fut);
    if (rc < 0)
        return rc;
    run(ex, future_is_done, fut);
    return fut->result;
}
