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

/* Freed executors, kept for reuse: their memory is never given back (see remote_lock). */
static pthread_mutex_t recycle_lock = PTHREAD_MUTEX_INITIALIZER;
static moor_executor *recycled;

static void remote_sync_init(moor_executor *ex)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ex->remote_cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&ex->remote_lock, NULL);
}

/* Memory for an executor: a recycled one (cleared with its lock held, as a late waker may
 * be about to take it), or a new one. Returned with remote_lock held. */
static moor_executor *executor_memory(void)
{
    pthread_mutex_lock(&recycle_lock);
    moor_executor *ex = recycled;
    if (ex)
        recycled = ex->recycle_next;
    pthread_mutex_unlock(&recycle_lock);
    uint64_t next_gen = 1;
    if (ex) {
        pthread_mutex_lock(&ex->remote_lock);
        next_gen = ex->next_gen; /* generations stay unique to this memory across lives */
    } else {
        ex = moor__alloc(sizeof *ex);
        if (!ex)
            return NULL;
        remote_sync_init(ex);
        pthread_mutex_lock(&ex->remote_lock);
    }
    memset(ex, 0, offsetof(moor_executor, remote_lock));
    ex->next_gen = next_gen;
    ex->gen_base = next_gen;
    return ex;
}

/* Called with remote_lock held: the executor is dead to other threads from now on. */
static void executor_recycle(moor_executor *ex)
{
    ex->alive = 0;
    moor__free(ex->remote);
    ex->remote = NULL;
    ex->nremote = ex->cap_remote = 0;
    pthread_mutex_unlock(&ex->remote_lock);
    pthread_mutex_lock(&recycle_lock);
    ex->recycle_next = recycled;
    recycled = ex;
    pthread_mutex_unlock(&recycle_lock);
}

static int bad_size(size_t size, size_t page)
{
    return size > SIZE_MAX / 4 - page; /* no rounding or sum of three sizes can overflow */
}

int moor_executor_new(moor_executor **out, const moor_executor_attr *attr)
{
    static const moor_executor_attr defaults;
    if (!attr)
        attr = &defaults;
    if (moor__tls_executor)
        return -EEXIST;
    size_t page = moor__page_size();
    if (bad_size(attr->stack_size, page) || bad_size(attr->guard_size, page) ||
        attr->blocking_threads > MOOR__BLOCKING_THREADS_MAX)
        return -EINVAL;

    moor_executor *ex = executor_memory();
    if (!ex)
        return -ENOMEM;
    size_t stack = attr->stack_size ? attr->stack_size : DEFAULT_STACK_SIZE;
    ex->stack_size = (stack + page - 1) / page * page;
    int rc = moor__stack_pool_init(&ex->pool, attr->guard_size ? attr->guard_size : DEFAULT_GUARD_SIZE,
                                   attr->pool_hot ? attr->pool_hot : DEFAULT_POOL_HOT, attr->guard);
    if (rc < 0)
        goto fail;
    ex->stack_map_size = moor__fiber_map_size(ex, ex->stack_size);
    ex->blocking_threads = attr->blocking_threads ? attr->blocking_threads : 4;
    /* The default size's bucket first: the inline fast path of the pool looks only there. */
    char *warm;
    rc = moor__stack_get(&ex->pool, ex->stack_map_size, &warm);
    if (rc < 0) {
        moor__stack_pool_destroy(&ex->pool);
        goto fail;
    }
    moor__stack_put(&ex->pool, warm, ex->stack_map_size);
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
    ex->driver = &plain_driver;
    ex->driver_self = ex;

    rc = moor__overflow_thread_init(ex);
    if (rc < 0) {
        moor__stack_pool_destroy(&ex->pool);
        goto fail;
    }
#ifdef MOOR_TSAN_FIBERS
    ex->ctx.tsan_fiber = __tsan_get_current_fiber();
#endif
    ex->alive = 1;
    pthread_mutex_unlock(&ex->remote_lock);
    moor__tls_executor = ex;
    *out = ex;
    return 0;
fail:
    executor_recycle(ex);
    return rc;
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
    moor__assert(ex->spawns_kept == 0,
                 "moor_executor_free: %zu fiber(s) spawned from other threads have not started "
                 "(they wait for memory for their stacks); run the executor until they have",
                 ex->spawns_kept);
    for (size_t i = MOOR__PARTS; i-- > 0;)
        if (ex->parts[i].ops)
            ex->parts[i].ops->free(ex, ex->parts[i].self);
    moor__fibers_release_all(ex);
    moor__stack_pool_destroy(&ex->pool);
    moor__timer_heap_free(&ex->timers);
    for (size_t i = 0; i < ex->ntask_chunks; i++)
        moor__free(ex->task_chunks[i]);
    moor__free(ex->task_chunks);
    moor__overflow_thread_fini(ex);
    moor__tls_executor = NULL;
    /* From now on a wake from another thread finds it dead and does nothing. */
    pthread_mutex_lock(&ex->remote_lock);
    executor_recycle(ex);
}

moor_executor *moor_executor_current(void) { return moor__tls_executor; }

moor_guard_mode moor_executor_guard(const moor_executor *ex) { return ex->pool.mode; }

void moor_executor_stats_get(const moor_executor *ex, moor_executor_stats *out)
{
    moor__assert(ex == moor__tls_executor,
                 "moor_executor_stats_get: the executor belongs to another thread");
    size_t fibers = 0;
    for (const moor_fiber *f = ex->fibers; f; f = f->next)
        fibers++;
    *out = (moor_executor_stats){.tasks = ex->ntasks, .fibers = fibers, .timers = ex->timers.n};
}

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
    /* Before gen_base: a waker of an earlier life of this memory, whose tasks are gone.
     * Otherwise a changed gen: the task finished; its slot may already hold another. */
    if (gen < ex->gen_base || t->gen != gen)
        return;
    if (t->state == MOOR__TASK_IDLE) {
        t->state = MOOR__TASK_SCHEDULED;
        moor__runq_push(ex, t);
    } else if (t->state == MOOR__TASK_RUNNING) {
        t->state = MOOR__TASK_NOTIFIED;
    }
}

/* Queue a request for the executor's thread and unpark it. -ESRCH if the executor has been
 * freed (its memory stays valid: see executor_recycle), or the request is a wake from an
 * earlier life of that memory. */
static int remote_push(moor_executor *ex, moor__remote_req req)
{
    pthread_mutex_lock(&ex->remote_lock);
    if (!ex->alive || (req.task && req.gen < ex->gen_base)) {
        pthread_mutex_unlock(&ex->remote_lock);
        return -ESRCH;
    }
    if (ex->nremote == ex->cap_remote) {
        size_t ncap = ex->cap_remote ? ex->cap_remote * 2 : 64;
        moor__remote_req *nv =
            ncap <= SIZE_MAX / sizeof *nv ? moor__realloc(ex->remote, ncap * sizeof *nv) : NULL;
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
    /* A wake cannot be refused: losing it could hang its task forever. A dead executor has
     * no task left to wake. */
    int rc = remote_push(ex, (moor__remote_req){t, gen, NULL, NULL});
    moor__assert(rc == 0 || rc == -ESRCH, "out of memory queueing a wake from another thread");
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

/* Remote spawns started per batch (see remote_unstarted), and how long a spawn that found no
 * memory for its stack waits before it is tried again. */
#define REMOTE_SPAWN_BATCH 64u
#define SPAWN_RETRY_MS 10

/* Start a remote spawn; 0, or -ENOMEM when no stack could be had (it stays queued). */
static int remote_spawn(moor_executor *ex, const moor__remote_req *req)
{
    moor_fiber *f;
    /* Spawning touches only this executor's state, never remote_lock's. */
    int rc = moor__fiber_spawn(ex, &f, req->fn, req->arg, NULL, 1);
    if (rc < 0) {
        ex->spawn_retry_at = moor_now() + SPAWN_RETRY_MS;
        if (!ex->spawn_failed_said) {
            fprintf(stderr, "moor: a fiber spawned from another thread waits for memory for its "
                            "stack (%s); retrying every %d ms\n", moor_strerror(rc), SPAWN_RETRY_MS);
            ex->spawn_failed_said = 1;
        }
        return rc;
    }
    f->remote = 1;
    ex->remote_unstarted++;
    ex->spawn_retry_at = 0;
    ex->spawn_failed_said = 0;
    return 0;
}

static void drain_remote(moor_executor *ex)
{
    int may_spawn = ex->remote_unstarted == 0 &&
                    (ex->spawn_retry_at == 0 || moor_now() >= ex->spawn_retry_at);
    pthread_mutex_lock(&ex->remote_lock);
    size_t kept = 0;
    for (size_t i = 0; i < ex->nremote; i++) {
        moor__remote_req req = ex->remote[i];
        if (req.task) {
            wake_local(ex, req.task, req.gen);
            continue;
        }
        if (may_spawn && ex->remote_unstarted < REMOTE_SPAWN_BATCH && remote_spawn(ex, &req) == 0)
            continue;
        may_spawn = 0;
        ex->remote[kept++] = req; /* a later batch, in order */
    }
    ex->nremote = kept;
    ex->spawns_kept = kept;
    /* What is kept is looked at again when the batch has started (moor__remote_started) or
     * the retry time has come (events), not before every task. */
    __atomic_store_n(&ex->remote_pending, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&ex->remote_lock);
}

void moor__remote_started(moor_executor *ex)
{
    if (--ex->remote_unstarted == 0 && ex->spawns_kept)
        __atomic_store_n(&ex->remote_pending, 1, __ATOMIC_RELAXED);
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

/* Remote spawns that waited for memory: due for another try at `now` (the remote queue is
 * marked for a look), or the time of that try if it is before `next` (a timer deadline or -1). */
static int64_t spawn_retry(moor_executor *ex, int64_t now, int64_t next)
{
    if (!ex->spawns_kept || ex->remote_unstarted)
        return next;
    if (now >= ex->spawn_retry_at) {
        __atomic_store_n(&ex->remote_pending, 1, __ATOMIC_RELAXED);
        return next;
    }
    return next < 0 || ex->spawn_retry_at < next ? ex->spawn_retry_at : next;
}

/* Fire due timers and let the driver look for events, blocking only if may_block and no
 * timer fired: until the next timer's deadline, an event or an unpark. */
static void events(moor_executor *ex, int may_block)
{
    int64_t now = moor_now();
    if (moor__timer_fire(&ex->timers, now))
        may_block = 0;
    int64_t next = spawn_retry(ex, now, moor__timer_next(&ex->timers));
    if (__atomic_load_n(&ex->remote_pending, __ATOMIC_RELAXED))
        may_block = 0;
    int64_t timeout = 0;
    if (may_block)
        timeout = next < 0 ? -1 : next - now;
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
        if (done ? done(arg) : ex->ntasks == 0 && ex->spawns_kept == 0)
            break;
        events(ex, 1);
    }
    ex->running = 0;
}

int moor__executor_tick(moor_executor *ex, unsigned budget, int64_t *next_deadline)
{
    moor__assert(!ex->running, "the executor is already running (called from inside a poll)");
    ex->running = 1;
    int64_t now = moor_now();
    moor__timer_fire(&ex->timers, now);
    (void)spawn_retry(ex, now, -1);
    if (__atomic_load_n(&ex->remote_pending, __ATOMIC_ACQUIRE))
        drain_remote(ex);
    moor_task *t;
    while (budget-- && (t = moor__runq_pop(ex)))
        task_run(ex, t);
    ex->running = 0;
    *next_deadline = spawn_retry(ex, moor_now(), moor__timer_next(&ex->timers));
    return ex->run_head != NULL || __atomic_load_n(&ex->remote_pending, __ATOMIC_ACQUIRE);
}

/* Turns of plain code between two looks at timers and events: a look costs system calls
 * (the clock, and epoll_wait with a reactor), a turn with nothing runnable almost nothing. */
#define EVENTS_EVERY_TURNS 16u

void moor__executor_turn(moor_executor *ex)
{
    moor__assert(ex == moor__tls_executor, "the executor belongs to another thread");
    ex->running = 1;
    if (++ex->plain_turns % EVENTS_EVERY_TURNS == 0)
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

void moor__part_set(moor_executor *ex, enum moor__part_id id, const moor__part_ops *ops,
                    void *self)
{
    ex->parts[id] = (moor__part){ops, ops ? self : NULL};
}

#define FORK_HOOKS_MAX 4
static pthread_mutex_t fork_hooks_lock = PTHREAD_MUTEX_INITIALIZER;
static void (*fork_hooks[FORK_HOOKS_MAX])(moor_executor *ex);

void moor__fork_hook_add(void (*hook)(moor_executor *ex))
{
    pthread_mutex_lock(&fork_hooks_lock);
    size_t i = 0;
    while (i < FORK_HOOKS_MAX && fork_hooks[i] && fork_hooks[i] != hook)
        i++;
    moor__assert(i < FORK_HOOKS_MAX, "moor__fork_hook_add: more than %d hooks", FORK_HOOKS_MAX);
    fork_hooks[i] = hook;
    pthread_mutex_unlock(&fork_hooks_lock);
}

int moor_executor_after_fork(moor_executor *ex)
{
    moor__assert(ex == moor__tls_executor,
                 "moor_executor_after_fork: the executor belongs to another thread");
    for (size_t i = 0; i < MOOR__PARTS; i++) {
        const moor__part *p = &ex->parts[i];
        int rc = p->ops && p->ops->fork_check ? p->ops->fork_check(ex, p->self) : 0;
        if (rc < 0)
            return rc;
    }
    /* The locks other threads of the parent may have held are new. */
    remote_sync_init(ex);
    /* The child has one thread: the hook list cannot be changing under us. */
    pthread_mutex_init(&fork_hooks_lock, NULL);
    for (size_t i = 0; i < FORK_HOOKS_MAX && fork_hooks[i]; i++)
        fork_hooks[i](ex);
    for (size_t i = 0; i < MOOR__PARTS; i++) {
        const moor__part *p = &ex->parts[i];
        if (p->ops && p->ops->after_fork)
            p->ops->after_fork(ex, p->self);
    }
    return 0;
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
