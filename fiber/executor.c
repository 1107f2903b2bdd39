/* The executor and its fibers (see executor.h). */
#include "executor.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <string.h>
#include <time.h>

#include "alloc.h"
#include "assert.h"
#include "dump.h"
#include "future.h"
#include "wait.h"

#define DEFAULT_STACK_SIZE (256u * 1024u)
#define DEFAULT_GUARD_SIZE (64u * 1024u)
#define DEFAULT_POOL_HOT 64u
#define DEFAULT_BLOCKING_THREADS 4u

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

static const moor__driver plain_driver = {plain_park, plain_unpark, NULL};

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
    ex->stack_overhead = moor__fiber_map_size(ex, 0);
    ex->blocking_threads = attr->blocking_threads ? attr->blocking_threads : DEFAULT_BLOCKING_THREADS;
    /* The default size's bucket first: the inline fast path of the pool looks only there. */
    char *warm;
    rc = moor__stack_get(&ex->pool, ex->stack_map_size, &warm);
    if (rc < 0) {
        moor__stack_pool_destroy(&ex->pool);
        goto fail;
    }
    moor__stack_put(&ex->pool, warm, ex->stack_map_size);
    ex->next_fiber_id = 1;
    ex->coop_budget = MOOR__COOP_BUDGET;
    ex->now = moor_now();
    ex->errno_ptr = &errno;
    /* A write to a socket or pipe whose reader has gone must fail with -EPIPE, not raise a
     * signal that kills the process; leave SIGPIPE alone if the application chose for it. */
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
        signal(SIGPIPE, SIG_IGN);
    ex->ctx.resume = moor__resume_ret; /* the thread's own stack: it will wait at a switch */
    ex->handoffs_left = MOOR__HANDOFF_BUDGET;
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
    __atomic_add_fetch(&moor__executors_alive, 1, __ATOMIC_SEQ_CST); /* moor_set_allocator */
    moor__tls_executor = ex;
    moor__live_add(ex);
    *out = ex;
    return 0;
fail:
    executor_recycle(ex);
    return rc;
}

static void fibers_release_all(moor_executor *ex);

void moor_executor_free(moor_executor *ex)
{
    moor__assert(ex == moor__tls_executor,
                 "moor_executor_free: the executor belongs to another thread");
    moor__assert(!ex->running, "moor_executor_free: called while the executor runs (from a fiber "
                               "or a poll)");
    moor__assert(ex->ntasks == 0,
                 "moor_executor_free: %zu task(s) still pending; join or finish them first",
                 ex->ntasks);
    moor__assert(ex->promises_held == 0,
                 "moor_executor_free: %zu promise(s) still held by their awaiter; await or "
                 "moor_promise_drop them first (a library may keep the resolver's half)",
                 ex->promises_held);
    moor__assert(ex->spawns_kept == 0,
                 "moor_executor_free: %zu fiber(s) spawned from other threads have not started "
                 "(they wait for memory for their stacks); run the executor until they have",
                 ex->spawns_kept);
    for (size_t i = MOOR__PARTS; i-- > 0;)
        if (ex->parts[i].ops)
            ex->parts[i].ops->free(ex, ex->parts[i].self);
    fibers_release_all(ex);
    moor__stack_pool_destroy(&ex->pool);
    moor__timer_heap_free(&ex->timers);
    for (size_t i = 0; i < ex->ntask_chunks; i++)
        moor__free(ex->task_chunks[i]);
    moor__free(ex->task_chunks);
    moor__overflow_thread_fini(ex);
    moor__live_remove(ex);
    moor__tls_executor = NULL;
    __atomic_sub_fetch(&moor__executors_alive, 1, __ATOMIC_SEQ_CST);
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
    size_t fibers = 0, alive = 0;
    for (const moor__node *n = ex->fibers.head; n; n = n->next) {
        fibers++;
        alive += moor_container_of(n, moor_fiber, link)->state == MOOR__FIBER_LIVE;
    }
    moor__stack_counts sc;
    moor__stack_pool_counts(&ex->pool, &sc);
    *out = (moor_executor_stats){.tasks = ex->ntasks, .fibers = fibers, .timers = ex->timers.n,
                                 .fibers_alive = alive, .switches = moor__switches(ex),
                                 .wakeups = ex->wakeups, .stacks_mapped = sc.mapped,
                                 .stacks_pooled = sc.hot + sc.cold, .guard = ex->pool.mode};
}

void moor_dump(FILE *out)
{
    moor_executor *ex = moor__tls_executor;
    if (ex)
        moor__dump_executor(ex, out);
}

moor_executor_stats moor_stats(void)
{
    moor_executor_stats st = {0};
    if (moor__tls_executor)
        moor_executor_stats_get(moor__tls_executor, &st);
    return st;
}

void moor_executor_hold(moor_executor *ex)
{
    __atomic_add_fetch(&ex->holds, 1, __ATOMIC_SEQ_CST);
}

void moor_executor_release(moor_executor *ex)
{
    int left = __atomic_sub_fetch(&ex->holds, 1, __ATOMIC_SEQ_CST);
    moor__assert(left >= 0, "moor_executor_release: released more often than held");
    if (left)
        return;
    /* Let a park that could not report a deadlock while held look again. */
    pthread_mutex_lock(&ex->remote_lock);
    if (ex->alive)
        ex->driver->unpark(ex->driver_self);
    pthread_mutex_unlock(&ex->remote_lock);
}

void moor__owner_bind(moor_executor **owner, const char *what)
{
    moor__assert(!*owner, "%s: called from another thread than the one whose executor owns it "
                          "(objects of one executor are not thread-safe; other threads reach "
                          "its fibers with moor_spawn_remote or moor_waker_wake)",
                 what);
    *owner = moor__tls_executor;
}

/* ---- tasks ---------------------------------------------------------------------------- */

static moor_task *task_slot_get(moor_executor *ex)
{
    if (!ex->free_tasks) {
        if (moor__grow(&ex->task_chunks, &ex->cap_task_chunks, ex->ntask_chunks + 1,
                       sizeof *ex->task_chunks) < 0)
            return NULL;
        moor_task *slab = moor__alloc(MOOR__TASKS_PER_CHUNK * sizeof *slab);
        if (!slab)
            return NULL;
        memset(slab, 0, MOOR__TASKS_PER_CHUNK * sizeof *slab);
        ex->task_chunks[ex->ntask_chunks++] = slab;
        for (size_t i = 0; i < MOOR__TASKS_PER_CHUNK; i++) {
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
    if (ex->live_hint == t)
        ex->live_hint = NULL;
    t->gen = 0;
    t->state = MOOR__TASK_FREE;
    if (t->kind == MOOR__TASK_PLAIN) {
        t->fut = NULL;
        t->next = ex->free_tasks;
        ex->free_tasks = t;
    }
}

int moor_spawn_future(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    moor__assert(ex, "moor_spawn_future: no executor on this thread (call moor_executor_new first)");
    moor__assert(!moor_future_done(fut), "moor_spawn_future: future %p is already done",
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
    moor__task_wake(ex, t);
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
    if (moor__grow(&ex->remote, &ex->cap_remote, ex->nremote + 1, sizeof *ex->remote) == 0) {
        ex->remote[ex->nremote++] = req;
    } else if (req.task) {
        /* No room to queue the wake, and losing it could hang its task for ever: the
         * executor wakes every task instead (a spurious wake costs one poll). */
        ex->remote_wake_all = 1;
    } else {
        pthread_mutex_unlock(&ex->remote_lock);
        return -ENOMEM;
    }
    __atomic_store_n(&ex->remote_pending, 1, __ATOMIC_RELEASE);
    /* Under the lock: the driver may be swapped (reactor install) only under it too. */
    ex->driver->unpark(ex->driver_self);
    pthread_mutex_unlock(&ex->remote_lock);
    return 0;
}

static void wake_remote(moor_executor *ex, moor_task *t, uint64_t gen)
{
    /* Never refused for want of memory (see remote_push). A dead executor (-ESRCH) has no
     * task left to wake. */
    (void)remote_push(ex, (moor__remote_req){t, gen, NULL, NULL});
}

int moor_spawn_remote(moor_executor *ex, moor_fiber_fn fn, void *arg)
{
    moor__assert(fn, "moor_spawn_remote: fn is NULL");
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

static int fiber_spawn_detached(moor_executor *ex, moor_fiber **out, moor_fiber_fn fn, void *arg);

/* Start a remote spawn; 0, or -ENOMEM when no stack could be had (it stays queued). */
static int remote_spawn(moor_executor *ex, const moor__remote_req *req)
{
    moor_fiber *f;
    /* Spawning touches only this executor's state, never remote_lock's. */
    int rc = fiber_spawn_detached(ex, &f, req->fn, req->arg);
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

/* A remote wake found no memory: wake every task started and not finished. */
static void wake_all(moor_executor *ex)
{
    for (moor__node *n = ex->fibers.head; n; n = n->next) {
        moor_fiber *f = moor_container_of(n, moor_fiber, link);
        wake_local(ex, &f->task, f->task.gen);
    }
    for (size_t i = 0; i < ex->ntask_chunks; i++) {
        moor_task *slab = ex->task_chunks[i];
        for (size_t j = 0; j < MOOR__TASKS_PER_CHUNK; j++)
            if (slab[j].gen)
                wake_local(ex, &slab[j], slab[j].gen);
    }
    if (ex->block_on_task.gen)
        wake_local(ex, &ex->block_on_task, ex->block_on_task.gen);
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
    if (ex->remote_wake_all) {
        ex->remote_wake_all = 0;
        wake_all(ex);
    }
    /* What is kept is looked at again when the batch has started (remote_started) or
     * the retry time has come (events), not before every task. */
    __atomic_store_n(&ex->remote_pending, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&ex->remote_lock);
}

static void remote_started(moor_executor *ex)
{
    if (--ex->remote_unstarted == 0 && ex->spawns_kept)
        __atomic_store_n(&ex->remote_pending, 1, __ATOMIC_RELAXED);
}

/* ---- running -------------------------------------------------------------------------- */

/* Run one task. A fiber task is resumed; it does its own bookkeeping when it stops, and
 * may hand off to further fibers before control comes back here (moor__fiber_suspend).
 * Returns 1 if the hand-offs stopped because their budget was spent (see events_due). */
static inline int task_run(moor_executor *ex, moor_task *t)
{
    t->state = MOOR__TASK_RUNNING;
    if (t->kind == MOOR__TASK_FIBER) {
        moor__fiber_resume(ex, moor_container_of(t, moor_fiber, task));
        /* Count its hand-offs now rather than one by one (a store fewer per switch). */
        /* Spent: a hand-off was refused (-1), or none is left (a budget yield sets 0, and the
         * queue's head may be a plain task, which takes none). */
        int spent = ex->handoffs_left <= 0;
        ex->switches = moor__switches(ex);
        ex->handoffs_left = MOOR__HANDOFF_BUDGET;
        ex->coop_budget = MOOR__COOP_BUDGET; /* a turn of the run loop */
        return spent;
    }
    moor_cx cx = {{ex, t, t->gen}, NULL, NULL};
    if (moor__future_poll(t->fut, &cx) == MOOR_READY) {
        moor__task_finish(ex, t);
    } else {
        moor__wait_stamp(ex, t);
        moor__task_pending(ex, t);
    }
    return 0;
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

/* A deadline came due: wake whoever waits with it. */
static void deadline_due(moor__deadline *dl) { moor__wake(&dl->waker); }

/* A park at least this long (or unbounded) is an idle moment: the stack pool is trimmed. */
#define IDLE_TRIM_MS 100

/* Fire due timers and let the driver look for events, blocking only if may_block and no
 * timer fired: until the next timer's deadline, an event or an unpark. */
static void events(moor_executor *ex, int may_block)
{
    ex->looked_ns = moor__now_ns();
    int64_t now = (int64_t)(ex->looked_ns / 1000000u); /* moor_now() */
    ex->now = now;
    if (moor__timer_fire(&ex->timers, now, deadline_due))
        may_block = 0;
    int64_t next = spawn_retry(ex, now, moor__timer_next(&ex->timers));
    if (__atomic_load_n(&ex->remote_pending, __ATOMIC_RELAXED))
        may_block = 0;
    int64_t timeout = 0;
    if (may_block)
        timeout = next < 0 ? -1 : next - now;
    /* About to wait a while with nothing to run: give back what a burst of fibers left (their
     * stacks' memory, and the page tables of slabs whose stacks are all cold). */
    if (timeout < 0 || timeout >= IDLE_TRIM_MS)
        moor__stack_pool_trim_idle(&ex->pool);
    ex->driver->park(ex->driver_self, timeout);
    if (timeout != 0) {
        ex->now = moor_now();
        moor__timer_fire(&ex->timers, ex->now, deadline_due);
    }
}

/* Run tasks until done(arg) holds, or, with done == NULL, until no task is left. While
 * tasks are runnable it never blocks, but it still looks at timers and events every
 * EVENTS_EVERY runs, and after a run of hand-offs that spent its budget if the last look is
 * MOOR__EVENTS_LATENCY_NS old, so that a busy queue cannot starve them. */
#define EVENTS_EVERY 64u

/* After a run of fiber hand-offs that ended because their budget was spent (64 of them, or a
 * fiber that spent its cooperative budget): has the last look at timers and events been
 * MOOR__EVENTS_LATENCY_NS ago or more? A clock read per 64 hand-offs, where a look (a system
 * call with a reactor) per turn would cost a tenth of a channel ping-pong's time. */
static int events_due(const moor_executor *ex)
{
    return moor__now_ns() - ex->looked_ns >= MOOR__EVENTS_LATENCY_NS;
}

/* Nothing is runnable and the run would park: 1 if it never could wake (a deadlock; see
 * moor__deadlocked in dump.c for what can wake a task). */
static int stuck(moor_executor *ex)
{
    if (ex->timers.n || ex->spawns_kept ||
        __atomic_load_n(&ex->remote_pending, __ATOMIC_ACQUIRE) ||
        __atomic_load_n(&ex->holds, __ATOMIC_ACQUIRE) ||
        (ex->driver->foreign && ex->driver->foreign(ex->driver_self)))
        return 0;
    return moor__deadlocked(ex);
}

/* Returns 0 once done (or no task is left), or -EDEADLK: the dump went to stderr. */
static int run(moor_executor *ex, int (*done)(const void *arg), const void *arg)
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
            int spent = task_run(ex, t);
            if (done && done(arg))
                break;
            if (++runs % EVENTS_EVERY == 0 || (spent && events_due(ex)))
                events(ex, 0);
            continue;
        }
        if (done ? done(arg) : ex->ntasks == 0 && ex->spawns_kept == 0)
            break;
        if (stuck(ex)) {
            ex->running = 0;
            moor__dump_deadlock(ex);
            return -EDEADLK;
        }
        events(ex, 1);
    }
    ex->running = 0;
    return 0;
}

int moor__executor_tick(moor_executor *ex, unsigned budget, int64_t *next_deadline)
{
    moor__assert(!ex->running, "the executor is already running (called from inside a poll)");
    ex->running = 1;
    int64_t now = moor_now();
    moor__timer_fire(&ex->timers, now, deadline_due);
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

static void executor_turn(moor_executor *ex)
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

int moor_executor_run(moor_executor *ex)
{
    return run(ex, NULL, NULL);
}

intptr_t moor_block_on(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    moor__assert(ex, "moor_block_on: no executor on this thread (call moor_executor_new first)");
    moor__assert(!ex->current, "moor_block_on called from a fiber; a fiber uses moor_await");
    moor__assert(!ex->running, "moor_block_on from inside a poll: the executor is running");
    moor__assert(!moor_future_done(fut), "moor_block_on: future %p is already done", (void *)fut);
    /* Its own slot, free again: the last block_on ran until its future was done. */
    ex->block_on_task.kind = MOOR__TASK_BLOCK_ON;
    moor__task_start(ex, &ex->block_on_task, fut);
    if (run(ex, future_is_done, fut) < 0) {
        /* Deadlocked: give the future up, so that nothing keeps pointing at it (a wait
         * queue, its deadline), and its task slot with it. */
        moor__task_finish(ex, &ex->block_on_task); /* idle: a deadlock has nothing queued */
        if (moor_future_cancel(fut) != MOOR_READY)
            return -EDEADLK;
    }
    return fut->result;
}

/* ==== fibers ============================================================================ */

static const char *label_of(const moor_future *fut)
{
    return fut->ops && fut->ops->label ? fut->ops->label : "?";
}

/* ---- running and stopping ------------------------------------------------------------ */

static void fiber_release(moor_executor *ex, moor_fiber *f);

void moor__fiber_reap(moor_executor *ex)
{
    moor_fiber *f = ex->zombie;
    ex->zombie = NULL;
    fiber_release(ex, f);
}

static MOOR__HOT transfer_t fiber_entry(transfer_t t)
{
    moor_executor *ex = moor__tls_executor;
    moor_fiber *f = ex->current;
    moor__switch_arrived(t, &f->ctx);
    moor__ctx_started(&f->ctx);
    if (f->remote) {
        f->remote = 0;
        remote_started(ex);
    }
    f->result = f->fn(f->arg);
    moor__assert(f->open_scopes == 0,
                 "fiber %" PRIu64 " \"%s\" returned with %zu scope(s) still open: close them "
                 "(moor_scope_close) so that no child is forgotten",
                 f->id, moor_fiber_name(f), f->open_scopes);
    if (f->exit.fn)
        f->exit.fn(&f->exit);

    /* The poll adapter's READY: finish the task, hand the result to the joiner. */
    f->state = MOOR__FIBER_DONE;
    ex->ntasks--; /* moor__task_finish, for a fiber's task */
    if (ex->live_hint == &f->task)
        ex->live_hint = NULL;
    f->task.gen = 0;
    f->task.state = MOOR__TASK_FREE;
    if (f->detached) {
        /* Not released here: we are still running on its stack. The run loop releases it
         * once it is back (moor__fiber_resume), so no other switch has to look. */
        ex->zombie = f;
        ex->current = NULL;
        return moor__switch_last(&f->ctx, &ex->ctx);
    }
    /* Registered: join_cancel clears it when a joiner gives up. No local's address is taken
     * here, so the switch below stays a tail call. */
    if (!moor__wake_registered(ex, &f->joiner))
        moor__wake(&f->joiner);
    return moor__switch_last(&f->ctx, moor__fiber_next(ex));
}

/* ---- join future ----------------------------------------------------------------------- */

static moor_poll join_poll(moor_future *fut, moor_cx *cx)
{
    moor_fiber *f = moor_container_of(fut, moor_fiber, join_fut);
    if (f->state == MOOR__FIBER_DONE) {
        fut->result = f->result;
        f->joiner = (moor_waker){0};
        return MOOR_READY;
    }
    f->joiner = cx->waker;
    return MOOR_PENDING;
}

static moor_poll join_cancel(moor_future *fut)
{
    moor_fiber *f = moor_container_of(fut, moor_fiber, join_fut);
    f->joiner = (moor_waker){0};
    return MOOR_PENDING; /* the fiber stays joinable: nothing is lost */
}

static const moor_future_ops join_ops = {"join", join_poll, join_cancel};

/* "join fiber 12": only the joined fiber, a task of this executor, can complete it. */
static int join_describe(const moor_future *fut, char *buf, size_t size)
{
    const moor_fiber *f = moor_container_of(fut, moor_fiber, join_fut);
    moor__fmt out = moor__fmt_init(buf, size);
    moor__fmt_str(&out, "join fiber ");
    moor__fmt_u64(&out, f->id);
    return MOOR_WAIT_LOCAL;
}

static moor_future_kind join_kind = {&join_ops, join_describe, NULL};

__attribute__((constructor)) static void join_kind_register(void)
{
    moor_future_kind_register(&join_kind);
}

/* ---- lifecycle ------------------------------------------------------------------------- */

static void fiber_release(moor_executor *ex, moor_fiber *f)
{
    moor__list_remove(&ex->fibers, &f->link);
#ifdef MOOR_TSAN_FIBERS
    __tsan_destroy_fiber(f->ctx.tsan_fiber);
#endif
    f->state = MOOR__FIBER_FREE;
    moor__stack_put(&ex->pool, f->stack_base, f->map_size);
}

/* moor_spawn's body, inlined there (the hot path) and into moor__fiber_spawn. */
static inline __attribute__((always_inline)) int
fiber_spawn(moor_executor *ex, moor_fiber **out, moor_fiber_fn fn, void *arg,
            const moor_fiber_attr *attr, int detached)
{
    size_t size = ex->stack_size;
    size_t map_size = ex->stack_map_size;
    if (attr && attr->stack_size) {
        size_t page = moor__page_size();
        /* Rounding and the mapping's sum must not wrap to a small stack. */
        if (attr->stack_size > SIZE_MAX / 2 - ex->pool.guard - 4 * page)
            return -EINVAL;
        size = (attr->stack_size + page - 1) & ~(page - 1);
        map_size = moor__fiber_map_size(ex, size);
    }
    char *base;
    int rc = moor__stack_get(&ex->pool, map_size, &base);
    if (rc < 0)
        return rc;
#ifdef MOOR_ASAN_FIBERS
    {
        /* Before anything is written there. A previous fiber's frames that never returned
         * left their redzones poisoned, and this fiber's control block and locals would look
         * like overflows. Those are its first frames and its last switch, at the top of the
         * stack (every deeper frame returned): clearing the top is enough, and touches 2 KiB
         * of shadow rather than the whole stack's. (A stack of an earlier pool at these
         * addresses left the tops of its stacks clear: moor__stack_pool_destroy.) */
        size_t span = map_size - ex->pool.guard;
        if (span > MOOR__ASAN_STACK_TOP)
            span = MOOR__ASAN_STACK_TOP;
        __asan_unpoison_memory_region(base + map_size - span, span);
    }
#endif

    /* The control block at the top (colored); the stack grows down from just below it. Every
     * field is set here (a pooled stack holds the previous fiber's values) but `result`, which
     * fn's return sets before anything may read it (one store fewer: ~1.5 ns of a 43 ns
     * spawn + join, measured). */
    moor_fiber *f = (moor_fiber *)(base + map_size - MOOR__FIBER_CTL_SIZE -
                                   moor__fiber_color(base));
    f->ex = ex;
    f->fn = fn;
    f->arg = arg;
    f->joiner = (moor_waker){0};
    f->stack_base = base;
    f->map_size = map_size;
    f->id = ex->next_fiber_id++;
    f->state = MOOR__FIBER_LIVE;
    f->detached = (uint8_t)detached;
    f->join_claimed = 0;
    f->cancelled = 0;
    f->remote = 0;
    f->exit.fn = NULL;
    f->open_scopes = 0;
    f->name[0] = '\0'; /* empty: the default name, "fiber" (moor_fiber_name) */
    if (attr && attr->name) {
        size_t len = 0;
        while (len < sizeof f->name - 1 && attr->name[len]) {
            f->name[len] = attr->name[len];
            len++;
        }
        f->name[len] = '\0';
    }

    char *lo = base + ex->pool.guard;
    moor__ctx_make(&f->ctx, lo, (size_t)((char *)f - lo), fiber_entry);
#ifdef MOOR_TSAN_FIBERS
    f->ctx.tsan_fiber = __tsan_create_fiber(0);
#endif
    f->join_fut = (moor_future){.ops = &join_ops}; /* moor_future_init, inline */

    moor__list_push_front(&ex->fibers, &f->link);

    f->task.kind = MOOR__TASK_FIBER; /* its task is in the control block: no allocation */
    moor__task_start(ex, &f->task, NULL);
    *out = f;
    return 0;
}

MOOR__HOT int moor_spawn(moor_fiber **out, moor_fiber_fn fn, void *arg,
                         const moor_fiber_attr *attr)
{
    moor_executor *ex = moor__tls_executor;
    moor__assert(ex, "moor_spawn: no executor on this thread (call moor_executor_new first)");
    moor__assert(fn, "moor_spawn: fn is NULL");
    moor_fiber *f;
    int rc = fiber_spawn(ex, &f, fn, arg, attr, out == NULL);
    if (rc == 0 && out)
        *out = f;
    return rc;
}

int moor__fiber_spawn(moor_executor *ex, moor_fiber **out, moor_fiber_fn fn, void *arg,
                      const moor_fiber_attr *attr, int detached)
{
    return fiber_spawn(ex, out, fn, arg, attr, detached);
}

static int fiber_spawn_detached(moor_executor *ex, moor_fiber **out, moor_fiber_fn fn, void *arg)
{
    return fiber_spawn(ex, out, fn, arg, NULL, 1);
}

static void fibers_release_all(moor_executor *ex)
{
    while (ex->fibers.head)
        fiber_release(ex, moor_container_of(ex->fibers.head, moor_fiber, link));
}

moor__exit_hook *moor__fiber_on_exit(moor_fiber *f, void (*fn)(moor__exit_hook *hook), void *arg)
{
    moor__assert(f->state == MOOR__FIBER_LIVE, "moor__fiber_on_exit: fiber %" PRIu64 " has returned",
                 f->id);
    f->exit.fn = fn;
    f->exit.arg = arg;
    return &f->exit;
}

void moor__fiber_scopes(moor_fiber *f, int delta)
{
    moor__assert(delta > 0 || f->open_scopes > 0, "fiber %" PRIu64 ": scope bookkeeping broken", f->id);
    f->open_scopes += (size_t)(ptrdiff_t)delta;
}

static void check_handle(const moor_fiber *f, const char *what)
{
    moor__assert(f && f->state != MOOR__FIBER_FREE,
                 "%s: fiber %p was already joined (or is not a fiber)", what, (const void *)f);
    moor__assert(f->ex == moor__tls_executor, "%s: fiber %" PRIu64 " belongs to another thread",
                 what, f->id);
}

static int fiber_is_done(const void *f)
{
    return ((const moor_fiber *)f)->state == MOOR__FIBER_DONE;
}

MOOR__HOT int moor_join(moor_fiber *f, intptr_t *result)
{
    check_handle(f, "moor_join");
    moor__assert(!f->detached, "moor_join: fiber %" PRIu64 " \"%s\" is detached", f->id, moor_fiber_name(f));
    moor__assert(!f->join_claimed, "moor_join: fiber %" PRIu64 " \"%s\" joined twice", f->id,
                 moor_fiber_name(f));
    moor__assert(f != f->ex->current, "moor_join: fiber %" PRIu64 " \"%s\" joins itself", f->id,
                 moor_fiber_name(f));
    f->join_claimed = 1;
    moor_fiber *self = f->ex->current;
    if (f->state != MOOR__FIBER_DONE && self) {
        /* What awaiting join_fut would do, without the generic poll around it. Not cut
         * short by cancellation: a cancelled fiber must still be able to reap its children. */
        moor__wait_stamp(f->ex, &self->task);
        while (f->state != MOOR__FIBER_DONE) {
            f->joiner = (moor_waker){f->ex, &self->task, self->task.gen};
            moor__fiber_suspend(self, &f->join_fut);
        }
    } else if (f->state != MOOR__FIBER_DONE) {
        /* From plain code: run the executor until the fiber has returned. Not a block_on of
         * join_fut, which would need a task slot, and so could fail for want of memory. */
        moor__assert(!f->ex->running, "moor_join from inside a poll: the executor is running");
        if (run(f->ex, fiber_is_done, f) < 0) {
            f->join_claimed = 0; /* not joined: it may be cancelled and joined again */
            return -EDEADLK;
        }
    }
    if (result)
        *result = f->result;
    int rc = f->cancelled ? -ECANCELED : 0;
    fiber_release(f->ex, f);
    return rc;
}

moor_future *moor_fiber_future(moor_fiber *f)
{
    check_handle(f, "moor_fiber_future");
    moor__assert(!f->detached, "moor_fiber_future: fiber %" PRIu64 " \"%s\" is detached", f->id,
                 moor_fiber_name(f));
    return &f->join_fut;
}

intptr_t moor_await(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    moor_fiber *f = ex ? ex->current : NULL;
    moor__assert(f, "moor_await(\"%s\") called outside a fiber; plain code uses moor_block_on",
                 label_of(fut));
    moor_cx cx = {{ex, &f->task, f->task.gen}, NULL, NULL};
    if (moor__future_poll(fut, &cx) == MOOR_READY) {
        moor__coop_spend(); /* ready at once: it counts against the budget */
        return fut->result;
    }
    moor__wait_stamp(ex, &f->task);
    for (;;) {
        /* Polled before the cancel is looked at: a result that is there without waiting is
         * returned even in a cancelled fiber, as is a wait that completed before the cancel
         * arrived (its cancel op reports it). */
        if (__builtin_expect(f->cancelled, 0))
            return moor_future_cancel(fut) == MOOR_READY ? fut->result : -ECANCELED;
        moor__fiber_suspend(f, fut);
        if (moor__future_poll(fut, &cx) == MOOR_READY)
            return fut->result;
    }
}

int moor__fiber_wait_completion(moor_fiber *f, const moor__waiter *w, moor_future *op,
                                moor__deadline *dl, void (*unlink)(void *arg), void *arg,
                                int cancellable)
{
    moor_waker self = {f->ex, &f->task, f->task.gen};
    const intptr_t *result = &op->result;
    if (moor__deadline_arm(dl, &self) < 0) {
        unlink(arg);
        return -ENOMEM;
    }
    moor__wait_stamp(f->ex, &f->task);
    for (;;) {
        if (cancellable && f->cancelled) {
            unlink(arg);
            break;
        }
        moor__fiber_suspend(f, op);
        if (moor__waiter_done(w))
            break;
        if (moor__deadline_passed(dl)) {
            unlink(arg);
            break;
        }
    }
    moor__deadline_disarm(dl);
    if (moor__waiter_done(w))
        return (int)*result; /* even when cancelled or late: it happened, do not lose it */
    return cancellable && f->cancelled ? -ECANCELED : -ETIMEDOUT;
}

intptr_t moor__wait(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    return ex && ex->current ? moor_await(fut) : moor_block_on(fut);
}

intptr_t moor__wait_uncancellable(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    moor_fiber *f = ex ? ex->current : NULL;
    if (!f)
        return moor_block_on(fut);
    moor_cx cx = {{ex, &f->task, f->task.gen}, NULL, NULL};
    moor__wait_stamp(ex, &f->task);
    while (moor__future_poll(fut, &cx) == MOOR_PENDING)
        moor__fiber_suspend(f, fut);
    return fut->result;
}

void moor_cancel(moor_fiber *f)
{
    check_handle(f, "moor_cancel");
    if (f->state != MOOR__FIBER_LIVE || f->cancelled)
        return;
    f->cancelled = 1;
    /* Wake it so that the wait it is in sees the flag. */
    moor_waker w = {f->ex, &f->task, f->task.gen};
    moor_waker_wake(&w);
}

int moor_cancelled(void)
{
    moor_fiber *f = moor__self();
    return f && f->cancelled;
}

void moor__coop_yield(moor_executor *ex)
{
    moor_fiber *f = ex->current;
    ex->coop_budget = MOOR__COOP_BUDGET;
    if (f) {
        f->task.state = MOOR__TASK_NOTIFIED; /* to the back of the run queue */
        /* To the run loop, not the next fiber: it may have events to look at (events_due).
         * The hand-offs not made are taken off the count the run loop will add. */
        ex->switches -= ex->handoffs_left;
        ex->handoffs_left = 0;
        moor__fiber_suspend_on(ex, f, NULL);
        return;
    }
    if (!ex->running)
        executor_turn(ex);
}

MOOR__HOT void moor_yield(void)
{
    moor_executor *ex = moor__tls_executor;
    moor_fiber *f = ex ? ex->current : NULL;
    moor__assert(f, "moor_yield called outside a fiber");
    /* Woken while running: the executor puts it at the back of the run queue. */
    f->task.state = MOOR__TASK_NOTIFIED;
    moor__fiber_suspend_on(ex, f, NULL);
}

moor_fiber *moor_self(void) { return moor__self(); }

uint64_t moor_fiber_id(const moor_fiber *f) { return f->id; }

const char *moor_fiber_name(const moor_fiber *f) { return f->name[0] ? f->name : "fiber"; }
