/* The executor and its fibers, one concept (as libdill keeps its scheduler and coroutines in
 * one cr.c): the run queue, tasks and wakers, the driver seam (park/unpark), the parts that
 * layers above attach (the reactor, the blocking pool); and the fiber control block with the
 * poll adapter that makes a fiber one more task. Implemented in executor.c. */
#ifndef MOOR_FIBER_EXECUTOR_H
#define MOOR_FIBER_EXECUTOR_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "assert.h"
#include "context.h"
#include "list.h"
#include "moor.h"
#include "stack.h"
#include "timer.h"

/* Plain task slots per allocation (moor_executor.task_chunks). */
#define MOOR__TASKS_PER_CHUNK 64u

/* The most worker threads a blocking pool may be given (moor_executor_attr). */
#define MOOR__BLOCKING_THREADS_MAX 4096u

enum moor__task_state {
    MOOR__TASK_FREE = 0,   /* slot unused (gen is 0) */
    MOOR__TASK_IDLE,       /* pending, waiting for a wake */
    MOOR__TASK_SCHEDULED,  /* on the run queue */
    MOOR__TASK_RUNNING,    /* being polled now */
    MOOR__TASK_NOTIFIED,   /* woken while being polled: goes back on the queue after */
};

enum moor__task_kind {
    MOOR__TASK_PLAIN = 0,  /* a future spawned as a task; its slot is the executor's */
    MOOR__TASK_FIBER,      /* a fiber; the task lives in its control block, fut is unused */
    MOOR__TASK_BLOCK_ON,   /* moor_block_on's future: the executor's own slot (block_on_task) */
};

struct moor_task {
    moor_task *next;   /* run queue, or the free list */
    moor_future *fut;  /* what polling the task polls; a fiber's: the future it waits on
                          while it is IDLE (set at each suspend, NULL: not known), for
                          moor_dump and deadlock detection */
    uint64_t gen;      /* generation this task was started with; 0 while free */
    uint8_t state;     /* enum moor__task_state */
    uint8_t kind;      /* enum moor__task_kind */
    uint32_t since;    /* low 32 bits of the executor's cached clock (moor_executor.now)
                          when it began its current wait: in the padding, no clock read */
};

/* How the executor waits when its run queue is empty (Tokio's park/unpark split). fiber/
 * ships a plain driver on a condition variable; reactor/ installs one on libev. */
typedef struct moor__driver {
    /* Wait for events for up to timeout_ms (-1: until unpark; 0: only look, never block),
     * waking the tasks they concern. */
    void (*park)(void *self, int64_t timeout_ms);
    /* End a park early, or make the next one return at once. Any thread; always called
     * with the executor's remote_lock held. */
    void (*unpark)(void *self);
    /* Non-zero if something else than moor's own waits may wake a task during a park (an
     * application's loop or watchers): then no deadlock is ever reported. May be NULL. */
    int (*foreign)(void *self);
} moor__driver;

/* A request from another thread: wake (task, gen), or spawn a detached fiber fn(arg). */
typedef struct moor__remote_req {
    moor_task *task;   /* NULL for a spawn */
    uint64_t gen;
    moor_fiber_fn fn;
    void *arg;
} moor__remote_req;

/* Something an executor owns on behalf of a layer above it (reactor/'s event loop, its
 * blocking pool): the layer attaches it when first needed, and the executor tells it of a
 * fork and frees it with itself. So the executor never calls into those layers by name. */
typedef struct moor__part_ops {
    /* In a forked child, before anything is changed: 0, or -errno if the part cannot be made
     * to work in the child now (moor_executor_after_fork then changes nothing and fails with
     * it). May be NULL. */
    int (*fork_check)(moor_executor *ex, void *self);
    /* In a forked child, once every part passed its check. May be NULL. */
    void (*after_fork)(moor_executor *ex, void *self);
    /* At moor_executor_free, in the reverse order of the part ids. */
    void (*free)(moor_executor *ex, void *self);
} moor__part_ops;

/* The parts, in the order they are told of a fork (and the reverse of their freeing). */
enum moor__part_id {
    MOOR__PART_REACTOR = 0, /* reactor/loop.c: the event loop, its driver, fds, signals */
    MOOR__PART_BLOCKING,    /* reactor/blocking.c: moor_blocking's worker threads */
    MOOR__PARTS
};

typedef struct moor__part {
    const moor__part_ops *ops; /* NULL: not attached */
    void *self;
} moor__part;

struct moor_executor {
    moor_task *run_head, *run_tail;  /* FIFO run queue; run_tail is stale while it is empty
                                        (run_head NULL), so that taking the last task off
                                        writes one word */
    moor_fiber *current;             /* the fiber running now, or NULL */
    moor_fiber *zombie;              /* a detached fiber that finished on its own stack: it
                                        switched to the run loop, which releases it */
    int handoffs_left;               /* fiber-to-fiber switches before the run loop gets a turn;
                                        MOOR__HANDOFF_BUDGET less it: the hand-offs not yet
                                        counted in `switches` (moor__switches); -1 once one
                                        was refused (moor__fiber_next) */
    moor__ctx ctx;                   /* the executor's own context: the thread's stack */
    int *errno_ptr;                  /* this thread's errno: fibers never migrate */
    uint64_t next_gen;               /* generations are never reused, so stale wakers miss */
    uint64_t next_fiber_id;
    size_t ntasks;                   /* tasks started and not finished */
    size_t promises_held;            /* awaiter's halves of promises not yet dropped */
    int running;                     /* inside run/block_on */
    int64_t now;                     /* moor_now() at the executor's last look at timers and
                                        events (events()): wait stamps */
    uint64_t switches;               /* fibers switched to (moor_stats), but the hand-offs of
                                        the run in progress: read moor__switches */
    uint64_t wakeups;                /* waiting tasks made runnable (moor_stats) */
    moor_task *live_hint;            /* deadlock detection: a task last found waiting on
                                        something non-local, looked at first; NULL when it
                                        finishes */
    unsigned coop_budget;            /* operations that complete at once left before a yield,
                                        whoever runs (moor__coop_spend_on) */
    unsigned plain_turns;            /* turns plain code has given the executor */
    uint64_t looked_ns;              /* CLOCK_MONOTONIC at the last look at timers and events */

    moor_task *free_tasks;           /* free slots for plain tasks */
    moor_task block_on_task;         /* moor_block_on's: plain code blocks on one future at a
                                        time, so it needs no allocation */
    void **task_chunks;              /* slabs of task slots, freed with the executor */
    size_t ntask_chunks, cap_task_chunks;

    moor__stack_pool pool;
    moor__timer_heap timers;
    size_t stack_size;               /* default usable size of a fiber stack */
    size_t stack_map_size;           /* its mapping: guard, stack, control block */
    size_t stack_overhead;           /* what a mapping holds beyond the usable stack */
    size_t blocking_threads;         /* worker threads of reactor/'s blocking pool */
    moor__list fibers;               /* every fiber not yet released (moor_fiber.link) */

    const moor__driver *driver;      /* read by other threads under remote_lock */
    void *driver_self;
    moor__part parts[MOOR__PARTS];   /* see moor__part_ops */

    /* Remote spawns (moor_spawn_remote) are started a batch at a time: the next
     * batch only once the last one has started running (and, if it finished, given its
     * stacks back), so a burst of them never maps a stack per request at once. A spawn that
     * cannot get a stack waits in the queue and is retried; it is never dropped. */
    size_t remote_unstarted;         /* remote spawns started and not yet running */
    size_t spawns_kept;              /* remote spawns left in the queue by the last drain */
    int64_t spawn_retry_at;          /* after a failed spawn: no new try before (ms), or 0 */
    int spawn_failed_said;           /* the failure has been reported on stderr */

    void *altstack;                  /* this thread's sigaltstack, if moor made it */

    /* Shared with other threads, under remote_lock. An executor's memory is never given back
     * (freed executors are recycled), so a waker that outlives its executor still reaches a
     * valid lock here and finds the executor dead, or alive again with a newer gen_base. */
    int alive;                       /* between moor_executor_new and moor_executor_free */
    uint64_t gen_base;               /* the first generation of this life: older wakers miss */
    moor__remote_req *remote;
    size_t nremote, cap_remote;
    int remote_pending;              /* atomic: something in the remote queue to act on */
    int remote_wake_all;             /* a wake found no memory to queue: wake every task */
    int unparked;                    /* plain driver: an unpark is outstanding */
    int holds;                       /* atomic: moor_executor_hold minus release */
    moor_executor *live_next;        /* the list of live executors (SIGQUIT dump), under
                                        executor.c's live lock for writers; never freed */
    /* Last, so that recycling can clear everything before them while they stay valid. */
    pthread_mutex_t remote_lock;
    pthread_cond_t remote_cond;      /* the plain driver parks on it */
    moor_executor *recycle_next;     /* the list of freed executors (executor.c's lock) */
};

/* The calling thread's executor (NULL if none). Initial-exec: one %fs-relative load, no
 * __tls_get_addr call, on every yield and await. */
extern __thread moor_executor *moor__tls_executor
    __attribute__((tls_model("initial-exec"), visibility("hidden")));

static inline void moor__runq_push(moor_executor *ex, moor_task *t)
{
    t->next = NULL;
    if (ex->run_head)
        ex->run_tail->next = t;
    else
        ex->run_head = t;
    ex->run_tail = t;
}

static inline moor_task *moor__runq_pop(moor_executor *ex)
{
    moor_task *t = ex->run_head;
    if (t)
        ex->run_head = t->next; /* run_tail goes stale if that was the last */
    return t;
}

/* For an executor embedded in a foreign event loop: fire due timers, take remote requests
 * and run what is runnable, at most `budget` tasks, without blocking. Returns non-zero if
 * tasks are still runnable; *next_deadline is the earliest timer deadline or -1. */
int moor__executor_tick(moor_executor *ex, unsigned budget, int64_t *next_deadline);

/* Attach (ops non-NULL) or detach a part. */
void moor__part_set(moor_executor *ex, enum moor__part_id id, const moor__part_ops *ops,
                    void *self);

/* A process-wide fork hook, for state no single executor owns (the signal table): run by
 * moor_executor_after_fork in any executor, after the executor's locks are renewed and before
 * its parts are told. Adding the same hook again is a no-op; at most 4 hooks. */
void moor__fork_hook_add(void (*hook)(moor_executor *ex));

static inline void *moor__part_get(const moor_executor *ex, enum moor__part_id id)
{
    return ex->parts[id].self;
}

/* Objects of one executor (channels, mutexes, events, scopes) belong to the executor of the
 * thread that made or first used them; a use from any other thread is misuse, caught in every
 * build by one thread-local compare. */
void moor__owner_bind(moor_executor **owner, const char *what);

static inline void moor__owner_check(moor_executor **owner, const char *what)
{
    moor_executor *ex = moor__tls_executor;
    if (__builtin_expect(*owner != ex, 0))
        moor__owner_bind(owner, what);
}

/* Start `task` (its kind set) under a new generation, at the back of the run queue. */
static inline void moor__task_start(moor_executor *ex, moor_task *task, moor_future *fut)
{
    task->fut = fut;
    task->gen = ex->next_gen++;
    task->state = MOOR__TASK_SCHEDULED;
    ex->ntasks++;
    moor__runq_push(ex, task);
}
void moor__driver_set(moor_executor *ex, const moor__driver *driver, void *self);

/* A wake of t, a live task of ex (the calling thread's executor): on the run queue if it was
 * idle, marked to go back there if it is running now. */
static inline void moor__task_wake(moor_executor *ex, moor_task *t)
{
    if (t->state == MOOR__TASK_IDLE) {
        t->state = MOOR__TASK_SCHEDULED;
        ex->wakeups++;
        moor__runq_push(ex, t);
    } else if (t->state == MOOR__TASK_RUNNING) {
        t->state = MOOR__TASK_NOTIFIED;
    }
}

/* moor_waker_wake, with the common case (a task of this thread) inline. */
static inline void moor__wake(const moor_waker *w)
{
    moor_task *t = w->task;
    if (t && w->ex == moor__tls_executor) {
        /* A waker of an earlier life of this executor's memory: its task memory is gone. */
        if (w->gen < w->ex->gen_base || t->gen != w->gen)
            return;
        moor__task_wake(w->ex, t);
        return;
    }
    moor_waker_wake(w);
}

/* moor__wake for the waker a wait still registered on one of ex's objects holds (a waiter in
 * a channel's queue, say): its task is alive in the generation the waker names, so only the
 * state is looked at. ex is the calling thread's executor. 0 if the waker is not simply a
 * task of ex (none, or another executor's): the caller wakes it with moor__wake, out of its
 * fast path. */
static inline int moor__wake_registered(moor_executor *ex, const moor_waker *w)
{
    moor_task *t = w->task;
    if (__builtin_expect(!t || w->ex != ex, 0))
        return 0;
#ifndef NDEBUG
    moor__assert(t->gen == w->gen, "a registered waker names task %p, which has moved on: a "
                                   "waiting future was dropped without its cancel",
                 (void *)t);
#endif
    moor__task_wake(ex, t);
    return 1;
}

/* The bookkeeping of a task whose poll returned PENDING: back on the queue if it was woken
 * meanwhile, else idle until a wake. */
static inline void moor__task_pending(moor_executor *ex, moor_task *t)
{
    if (t->state == MOOR__TASK_NOTIFIED) {
        t->state = MOOR__TASK_SCHEDULED;
        moor__runq_push(ex, t);
    } else {
        t->state = MOOR__TASK_IDLE;
    }
}

/* A task has finished: its generation dies, so stale wakers miss. */
void moor__task_finish(moor_executor *ex, moor_task *t);

/* ---- fibers ---------------------------------------------------------------------------- */

#define MOOR__FIBER_NAME_MAX 32

/* Fiber-to-fiber hand-offs allowed before the run loop gets a turn (to drain remote wakes
 * and, with a reactor, to look at events). */
#define MOOR__HANDOFF_BUDGET 64u

/* Operations that may complete without waiting between two turns of the run loop (Tokio's
 * cooperative budget, kept by the executor rather than by each task): one busy connection
 * cannot starve the others or the timers. The fiber that completes the last of them yields
 * to the run loop, as 64 hand-offs do, and the run loop then looks at timers and events if
 * it has not for MOOR__EVENTS_LATENCY_NS: busy fibers delay an fd's readiness by about that
 * much, or by 64 of their slices between waits or yields if those are longer. */
#define MOOR__COOP_BUDGET 128u
#define MOOR__EVENTS_LATENCY_NS 100000u

enum moor__fiber_state {
    MOOR__FIBER_FREE = 0, /* released to the pool (a zeroed, trimmed stack reads as this) */
    MOOR__FIBER_LIVE,     /* spawned, its function has not returned */
    MOOR__FIBER_DONE,     /* its function returned; waiting for moor_join unless detached */
};

/* Told when a fiber's function has returned, before the fiber is released or joined: how a
 * scope keeps its children without the fiber knowing of scopes. The node and arg are the
 * hook owner's (a scope's list of running children, the scope). */
typedef struct moor__exit_hook {
    moor__node node;
    void (*fn)(struct moor__exit_hook *hook); /* NULL: no hook */
    void *arg;
} moor__exit_hook;

/* What every switch and wait reads or writes of a fiber comes first, in its first 64 bytes
 * (the control block is 64-byte aligned; ASan's and TSan's context fields push it past): the
 * task, the context, the executor and the flags. */
struct moor_fiber {
    moor_task task;        /* the executor's handle on this fiber */
    moor__ctx ctx;         /* where the fiber resumes */
    moor_executor *ex;
    uint8_t state;         /* enum moor__fiber_state */
    uint8_t detached;      /* released as soon as it finishes */
    uint8_t join_claimed;  /* moor_join was called */
    uint8_t cancelled;     /* moor_cancel was called: waits return -ECANCELED */
    uint8_t remote;        /* spawned from another thread and not started yet */
    moor_future join_fut;  /* completes with the fiber's result (moor_fiber_future) */
    moor_fiber_fn fn;
    void *arg;
    intptr_t result;       /* fn's return value, once DONE */
    moor_waker joiner;     /* who waits in join_fut: zeroed at spawn and when a waiting
                              future gives up; it may still name the last joiner after */
    moor__node link;       /* in the executor's list of fibers not yet released */
    char *stack_base;      /* the mapping: guard at stack_base, this block near its top */
    size_t map_size;
    uint64_t id;
    moor__exit_hook exit;  /* told when fn returns (moor__fiber_on_exit) */
    size_t open_scopes;    /* scopes it opened and has not closed (moor__fiber_scopes) */
    char name[MOOR__FIBER_NAME_MAX];
};
#if !defined(MOOR_ASAN_FIBERS) && !defined(MOOR_TSAN_FIBERS)
_Static_assert(offsetof(struct moor_fiber, remote) + sizeof(uint8_t) <= 64,
               "what a switch touches of a fiber grew past its control block's first 64 bytes");
#endif

/* Bytes at the top of a stack mapping taken by the control block. Keep it small: a fresh
 * fiber touches all of it, and the bytes past a 64-byte boundary cost spawn time. */
#define MOOR__FIBER_CTL_SIZE \
    ((sizeof(struct moor_fiber) + MOOR__STACK_RESERVED + 63) & ~(size_t)63)
_Static_assert(MOOR__FIBER_CTL_SIZE <= 320, "the fiber control block grew past 320 bytes: a "
                                            "fresh fiber would touch another cache line");

/* How far below the top of the stack mapping at `base` its fiber's control block sits, and
 * so its stack's top: 0 to 960 bytes, in steps of a cache line, picked by a hash of the
 * mapping's address. Without it every fiber's control block and first frames sit at one
 * offset within a page, and a fiber writing into another's (a hand-off completes the
 * waiter's op and queues its task) is followed by loads from its own at the same low 12
 * address bits, which the CPU's memory disambiguation may take for a dependency (4K
 * aliasing). Measured on the channel ping-pong (a Zen 3 VM): ~2% at the median, ~4% at the
 * 10th percentile. A function of the mapping, not of the fiber: a stack's control block stays
 * where it was, so a stale waker still finds a control block (or zeros) there. The top page
 * has room: the control block takes 320 bytes of it, and a fresh fiber's first frames still
 * start in it. */
static inline size_t moor__fiber_color(const char *base)
{
    uint64_t page = (uint64_t)((uintptr_t)base >> 12);
    return (size_t)((page * UINT64_C(0x9e3779b97f4a7c15)) >> 60) * 64;
}

/* The mapping of a fiber stack with `size` usable bytes: guard, stack, control block. */
static inline size_t moor__fiber_map_size(const moor_executor *ex, size_t size)
{
    size_t page = moor__page_size();
    return ex->pool.guard + size + ((MOOR__FIBER_CTL_SIZE + page - 1) & ~(page - 1));
}

/* The usable bytes of f's stack (what an overflow message reports): its mapping less the
 * guard and the pages of the control block. */
static inline size_t moor__fiber_stack_size(const moor_executor *ex, const moor_fiber *f)
{
    return f->map_size - ex->stack_overhead; /* no call: the overflow handler uses it */
}

/* Spawn a fiber on ex (moor_spawn's body): *out is set on success, detached or not.
 * Errors: -ENOMEM, -EINVAL (a stack size that cannot be mapped). */
int moor__fiber_spawn(moor_executor *ex, moor_fiber **out, moor_fiber_fn fn, void *arg,
                      const moor_fiber_attr *attr, int detached);

/* Have fn(hook) called when f's function returns (fn NULL: no longer); the hook, embedded in
 * f, is returned for the caller to list. */
moor__exit_hook *moor__fiber_on_exit(moor_fiber *f, void (*fn)(moor__exit_hook *hook), void *arg);

static inline moor_fiber *moor__exit_hook_fiber(moor__exit_hook *hook)
{
    return moor_container_of(hook, moor_fiber, exit);
}

/* Count a scope the fiber opened (+1) or closed (-1): a fiber that returns with one still
 * open fails an assertion. */
void moor__fiber_scopes(moor_fiber *f, int delta);

/* Release a detached fiber that finished (the run loop does, on the thread's stack: the
 * fiber's exit switched there). */
void moor__fiber_reap(moor_executor *ex);

/* The poll adapter. To the executor a fiber is one more future: polling it is resuming the
 * fiber (moor__fiber_resume), its PENDING is the fiber suspending in an await, its READY is
 * the fiber's function returning (the output goes to join_fut). The adapter is inlined rather
 * than called through an ops table because it sits next to the context switch: after a jump
 * returns, every frame that is unwound costs a mispredicted return (the jump's call left the
 * return-stack predictor out of step), so the run loop must not sit frames above the switch.
 *
 * A fiber that stops does its task's bookkeeping itself and hands off directly to the next
 * fiber on the run queue, without passing through the run loop: a yield round trip between
 * two fibers is then two jumps, not four. */
static inline void moor__fiber_resume(moor_executor *ex, moor_fiber *f)
{
    int saved_errno = *ex->errno_ptr;
    ex->current = f;
    ex->switches++;
    moor__switch(&ex->ctx, &f->ctx);
    *ex->errno_ptr = saved_errno;
    if (ex->zombie)
        moor__fiber_reap(ex);
}

/* Called by a fiber that stops running: where to switch to. The next fiber on the run queue
 * (made running and current), or the executor's own context when the queue is empty, starts
 * with a plain future or the hand-off budget is spent. Remote wakes wait for that turn of the
 * run loop, as I/O events do: at most MOOR__HANDOFF_BUDGET hand-offs. (Looking at them here
 * costs a load from another thread's cache line on every switch.) */
static inline moor__ctx *moor__fiber_next(moor_executor *ex)
{
    moor_task *t = ex->run_head;
    /* The budget is taken before it is looked at (a decrement and a sign test): a refused
     * hand-off leaves it at -1. Hand-offs are counted as switches at the run loop's turn. */
    if (__builtin_expect(t && t->kind == MOOR__TASK_FIBER && --ex->handoffs_left >= 0, 1)) {
        ex->run_head = t->next; /* moor__runq_pop, with t known to be the head */
        t->state = MOOR__TASK_RUNNING;
        moor_fiber *next = (moor_fiber *)(void *)t; /* task is the first member */
        ex->current = next;
        return &next->ctx;
    }
    ex->current = NULL;
    return &ex->ctx;
}

/* Fibers switched to so far: those counted, and the hand-offs of the run in progress. */
static inline uint64_t moor__switches(const moor_executor *ex)
{
    int left = ex->handoffs_left < 0 ? 0 : ex->handoffs_left;
    return ex->switches + (MOOR__HANDOFF_BUDGET - (unsigned)left);
}

/* The poll adapter's PENDING: the running fiber stops until its task is woken and picked
 * again, handing off to the next fiber if there is one. `waits_on` is the future it waits
 * on (NULL for a yield, or a wait no future describes): moor_dump names it, and deadlock
 * detection asks whether only this executor's tasks can complete it. The caller stamps
 * f->task.since once when the wait begins (moor__wait_stamp). */
static inline void moor__fiber_suspend_on(moor_executor *ex, moor_fiber *f,
                                          moor_future *waits_on)
{
    int saved_errno = *ex->errno_ptr;
    f->task.fut = waits_on;
    if (__builtin_expect(f->task.state != MOOR__TASK_NOTIFIED, 1)) {
        f->task.state = MOOR__TASK_IDLE; /* moor__task_pending */
        moor__switch(&f->ctx, moor__fiber_next(ex)); /* on no queue: the next is another */
    } else {
        moor__task_pending(ex, &f->task); /* woken meanwhile, or a yield: back of the queue */
        moor__ctx *to = moor__fiber_next(ex);
        if (to != &f->ctx) /* a lone yielding fiber may pick itself */
            moor__switch(&f->ctx, to);
    }
    *ex->errno_ptr = saved_errno;
}

/* moor__fiber_suspend_on f's executor (for a caller that does not have it at hand). */
static inline void moor__fiber_suspend(moor_fiber *f, moor_future *waits_on)
{
    moor__fiber_suspend_on(f->ex, f, waits_on);
}

/* A wait begins: stamp it with the executor's cached clock (a load and a store). */
static inline void moor__wait_stamp(moor_executor *ex, moor_task *t)
{
    t->since = (uint32_t)ex->now;
}

/* moor_self, inline: the calling fiber, or NULL from plain code. */
static inline moor_fiber *moor__self(void)
{
    moor_executor *ex = moor__tls_executor;
    return ex ? ex->current : NULL;
}

/* Out of line: the budget is spent; let every other runnable task run once first, and the
 * run loop look at timers and events if they are due (MOOR__EVENTS_LATENCY_NS). */
void moor__coop_yield(moor_executor *ex);

/* Count one operation that completed without waiting (an I/O call with data or room, a
 * channel value that was there, a free lock) against the executor's budget; when it is spent,
 * yield before returning (moor__coop_yield refills it, as each turn of the run loop does). In
 * plain code (no fiber) a turn of the executor is run instead. The budget is the executor's,
 * not each fiber's: waits and switches need not refill it (a store on every switch), and it
 * bounds what completes between the run loop's turns, whoever completes it. Cheap: a
 * decrement and a branch. ex: the calling thread's executor. */
static inline void moor__coop_spend_on(moor_executor *ex)
{
    if (__builtin_expect(--ex->coop_budget == 0, 0))
        moor__coop_yield(ex);
}

/* moor__coop_spend_on, for a caller without the executor at hand (a thread-local load more),
 * on a thread that may have none. */
static inline void moor__coop_spend(void)
{
    moor_executor *ex = moor__tls_executor;
    if (ex)
        moor__coop_spend_on(ex);
}

/* Await in a fiber, block_on in plain code: how every call that can wait waits. */
intptr_t moor__wait(moor_future *fut);
/* The same, but not cut short if the calling fiber is cancelled (relocking a mutex after a
 * condition wait, closing a scope). */
intptr_t moor__wait_uncancellable(moor_future *fut);

/* What a blocking call does in a fiber once it has queued a waiter that a counterpart will
 * complete: suspend until w is done (then return op->result), the deadline passes
 * (-ETIMEDOUT) or the fiber is cancelled (-ECANCELED, unless it completed meanwhile);
 * op is the operation's future (moor_dump names the wait by it; its result is the result);
 * unlink(arg) takes the waiter out when giving up. The same as awaiting the operation's
 * future, without the generic poll around it: this is the path every channel and lock wait
 * in a fiber takes. Errors: -ENOMEM (no room for the deadline's timer). */
int moor__fiber_wait_completion(moor_fiber *f, const moor__waiter *w, moor_future *op,
                                moor__deadline *dl, void (*unlink)(void *arg), void *arg,
                                int cancellable);


/* Defined in overflow.c: install the SIGSEGV handler (once per process) and this thread's
 * sigaltstack; and undo the latter. */
int moor__overflow_thread_init(moor_executor *ex);
void moor__overflow_thread_fini(moor_executor *ex);

#endif
