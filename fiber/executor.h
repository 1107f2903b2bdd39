/* The executor: run queue, tasks, wakers, the driver seam, and what it owns (stack pool,
 * fibers). Internal to moor; fiber.c and reactor/ build on it. */
#ifndef MOOR_FIBER_EXECUTOR_H
#define MOOR_FIBER_EXECUTOR_H

#include <pthread.h>
#include <stdint.h>

#include "context.h"
#include "moor.h"
#include "stack.h"
#include "timer.h"

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
};

struct moor_task {
    moor_task *next;   /* run queue, or the free list */
    moor_future *fut;  /* what polling the task polls */
    uint64_t gen;      /* generation this task was started with; 0 while free */
    uint8_t state;     /* enum moor__task_state */
    uint8_t kind;      /* enum moor__task_kind */
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

typedef struct moor__fiber_list {
    moor_fiber *head;
} moor__fiber_list;

struct moor_executor {
    moor_task *run_head, *run_tail;  /* FIFO run queue */
    moor_fiber *current;             /* the fiber running now, or NULL */
    moor_fiber *zombie;              /* a detached fiber that finished on its own stack; the
                                        next context to run releases it */
    unsigned handoffs_left;          /* fiber-to-fiber switches before the run loop gets a turn */
    moor__ctx ctx;                   /* the executor's own context: the thread's stack */
    int *errno_ptr;                  /* this thread's errno: fibers never migrate */
    uint64_t next_gen;               /* generations are never reused, so stale wakers miss */
    uint64_t next_fiber_id;
    size_t ntasks;                   /* tasks started and not finished */
    int running;                     /* inside run/block_on */
    uint16_t plain_budget;           /* plain code's cooperative budget (fiber.h) */
    unsigned plain_turns;            /* turns plain code has given the executor */

    moor_task *free_tasks;           /* free slots for plain tasks */
    void **task_chunks;              /* slabs of task slots, freed with the executor */
    size_t ntask_chunks;

    moor__stack_pool pool;
    moor__timer_heap timers;
    size_t stack_size;               /* default usable size of a fiber stack */
    size_t stack_map_size;           /* its mapping: guard, stack, control block */
    size_t blocking_threads;         /* worker threads of reactor/'s blocking pool */
    moor_fiber *fibers;              /* every fiber not yet released (doubly linked) */

    const moor__driver *driver;      /* read by other threads under remote_lock */
    void *driver_self;
    moor__part parts[MOOR__PARTS];   /* see moor__part_ops */

    /* Remote spawns (moor_executor_spawn_remote) are started a batch at a time: the next
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
    int unparked;                    /* plain driver: an unpark is outstanding */
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
    if (ex->run_tail)
        ex->run_tail->next = t;
    else
        ex->run_head = t;
    ex->run_tail = t;
}

static inline moor_task *moor__runq_pop(moor_executor *ex)
{
    moor_task *t = ex->run_head;
    if (t) {
        ex->run_head = t->next;
        if (!ex->run_head)
            ex->run_tail = NULL;
    }
    return t;
}

/* For an executor embedded in a foreign event loop: fire due timers, take remote requests
 * and run what is runnable, at most `budget` tasks, without blocking. Returns non-zero if
 * tasks are still runnable; *next_deadline is the earliest timer deadline or -1. */
int moor__executor_tick(moor_executor *ex, unsigned budget, int64_t *next_deadline);

/* From plain code whose cooperative budget is spent: run every task that is runnable now
 * once, after a look at timers and events that does not block. */
void moor__executor_turn(moor_executor *ex);

/* From plain code: run the executor until done(arg) holds. Needs no allocation. */
void moor__executor_run_until(moor_executor *ex, int (*done)(const void *arg), const void *arg);

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

/* moor_waker_wake, with the common case (a task of this thread) inline. */
static inline void moor__wake(const moor_waker *w)
{
    moor_task *t = w->task;
    if (t && w->ex == moor__tls_executor) {
        /* A waker of an earlier life of this executor's memory: its task memory is gone. */
        if (w->gen < w->ex->gen_base || t->gen != w->gen)
            return;
        if (t->state == MOOR__TASK_IDLE) {
            t->state = MOOR__TASK_SCHEDULED;
            moor__runq_push(w->ex, t);
        } else if (t->state == MOOR__TASK_RUNNING) {
            t->state = MOOR__TASK_NOTIFIED;
        }
        return;
    }
    moor_waker_wake(w);
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

/* A fiber spawned from another thread has started running (fiber.c). */
void moor__remote_started(moor_executor *ex);

/* A task has finished: its generation dies, so stale wakers miss. */
void moor__task_finish(moor_executor *ex, moor_task *t);
/* Defined in fiber.c: release every fiber still held (executor teardown). */
void moor__fibers_release_all(moor_executor *ex);

/* Defined in overflow.c: install the SIGSEGV handler (once per process) and this thread's
 * sigaltstack; and undo the latter. */
int moor__overflow_thread_init(moor_executor *ex);
void moor__overflow_thread_fini(moor_executor *ex);

#endif
