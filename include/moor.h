/*
 * moor — a stackful fiber runtime for C with pinned stacks.
 *
 * Every fiber runs on its own mmap'd, guard-paged stack that stays at one address from spawn
 * to exit, so anything a fiber keeps on its stack (a buffer, a pointer into it, an embedded
 * watcher) stays valid while the fiber is suspended. Around the fibers sits a small
 * Future/poll/waker core modelled on Rust's Future: the executor polls tasks, and a fiber is
 * one more future to it.
 *
 * Conventions
 *  - A call returns a non-negative result or a negative errno value (-ENOMEM, -ETIMEDOUT,
 *    -ECANCELED, ...); moor_strerror() names it. errno is not the error channel.
 *  - "May suspend" means the call may switch away from the calling fiber; such calls made
 *    from plain code (outside any fiber) run the executor until they can return.
 *  - Misuse by the programmer (awaiting outside a fiber, joining twice, ...) fails an
 *    assertion whose message names the misuse. Nothing that arrives from outside may crash.
 *  - Struct fields are marked public (yours to set), read-only (yours to read) or private.
 */
#ifndef MOOR_H
#define MOOR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(MOOR_BUILDING) && defined(__GNUC__)
#define MOOR_API __attribute__((visibility("default")))
#else
#define MOOR_API
#endif

#define MOOR_VERSION_MAJOR 0
#define MOOR_VERSION_MINOR 1
#define MOOR_VERSION_PATCH 0

/* Recover the outer struct from a pointer to one of its members, as libev users do. */
#define moor_container_of(ptr, type, member) \
    ((type *)(void *)((char *)(ptr) - offsetof(type, member)))

/* A static description of a negative errno value ("Connection timed out"). Never NULL. */
MOOR_API const char *moor_strerror(int err);

/* ------------------------------------------------------------------------------------------
 * Futures, wakers, contexts
 *
 * A future is a caller-owned struct with an ops table. The executor (or moor_await) calls
 * ops->poll: the future either finishes, stores its output in `result` and returns
 * MOOR_READY, or arranges for cx->waker to be woken when it can make progress and returns
 * MOOR_PENDING. A future that has returned PENDING once must not move (the C form of Rust's
 * Pin) unless it carries MOOR_UNPIN; builds with MOOR_PIN_CHECK abort on a moved future.
 *
 * Embed a moor_future as the first member or anywhere in your own struct and recover the
 * outer struct in poll with moor_container_of.
 * ---------------------------------------------------------------------------------------- */

typedef enum moor_poll { MOOR_PENDING = 0, MOOR_READY = 1 } moor_poll;

typedef struct moor_executor moor_executor;
typedef struct moor_task moor_task;
typedef struct moor_future moor_future;

/* A handle that makes a task runnable again. It is a task plus the generation the task had
 * when the handle was made: waking a task that has since finished (and whose slot may hold a
 * new task) is a harmless no-op, and waking a task twice queues it once. Plain data: copy it
 * freely. A zeroed waker is valid and wakes nothing. */
typedef struct moor_waker {
    moor_executor *ex; /* private */
    moor_task *task;   /* private */
    uint64_t gen;      /* private: 0 means no task */
} moor_waker;

/* What a poll receives: the waker of the task being polled. */
typedef struct moor_cx {
    moor_waker waker; /* read-only */
} moor_cx;

typedef struct moor_future_ops {
    /* Short description for diagnostics ("sleep", "read", "countdown"). */
    const char *label;
    /* Make progress. On completion set self->result and return MOOR_READY; otherwise store
     * cx->waker where the event source will find it and return MOOR_PENDING. */
    moor_poll (*poll)(moor_future *self, moor_cx *cx);
    /* Called once if the future is dropped while pending: unregister wakers and watchers and
     * release what the future holds. May be NULL if there is nothing to undo. */
    void (*cancel)(moor_future *self);
} moor_future_ops;

/* moor_future.flags */
#define MOOR_UNPIN 0x1u /* the future may be moved between polls */

struct moor_future {
    const moor_future_ops *ops; /* read-only: set by moor_future_init */
    void *data;                 /* public: for the owner of the future */
    intptr_t result;            /* read-only: the output, valid once moor_future_done() */
    uint32_t flags;             /* public: MOOR_UNPIN */
    uint32_t state;             /* private */
    const moor_future *pinned_at; /* private: address at its first pending poll */
};

/* Prepare a future for its first poll. Does not allocate. */
MOOR_API void moor_future_init(moor_future *fut, const moor_future_ops *ops, uint32_t flags);

/* Poll a future once (what executors and combinators call; user code usually awaits).
 * Polling a finished or cancelled future is misuse and fails an assertion. */
MOOR_API moor_poll moor_future_poll(moor_future *fut, moor_cx *cx);

/* Drop a pending future: calls its cancel op once. No-op on a future that is done, cancelled
 * or was never polled. */
MOOR_API void moor_future_cancel(moor_future *fut);

/* Non-zero once the future has returned MOOR_READY. */
MOOR_API int moor_future_done(const moor_future *fut);

/* Make the waker's task runnable. Idempotent; a no-op for a finished task or a zeroed waker.
 * Callable from any thread: from a thread that is not the task's, the wake is handed to the
 * task's executor, which is woken from its park. */
MOOR_API void moor_waker_wake(const moor_waker *waker);

/* ------------------------------------------------------------------------------------------
 * Executor: one per thread. It owns the run queue (FIFO), the stack pool and the fibers.
 * ---------------------------------------------------------------------------------------- */

typedef enum moor_guard_mode {
    MOOR_GUARD_AUTO = 0,  /* madvise(MADV_GUARD_INSTALL) where the kernel has it, else mprotect */
    MOOR_GUARD_MADVISE,   /* MADV_GUARD_INSTALL only: no extra mapping per stack (Linux 6.13+) */
    MOOR_GUARD_MPROTECT,  /* mprotect(PROT_NONE): splits the mapping, costs a vm.max_map_count entry */
} moor_guard_mode;

typedef struct moor_executor_attr {
    size_t stack_size; /* public: default usable stack size of its fibers; 0 = 256 KiB */
    size_t guard_size; /* public: guard below each stack; 0 = 64 KiB; rounded to pages */
    size_t pool_hot;   /* public: freed stacks kept resident; beyond it the pool gives their
                          memory back with MADV_DONTNEED; 0 = 64 */
    moor_guard_mode guard; /* public */
} moor_executor_attr;

/* Create the executor of the calling thread (at most one per thread) and make it current.
 * attr may be NULL. Errors: -ENOMEM, -EINVAL (guard mode not available), -EEXIST (this
 * thread has one). */
MOOR_API int moor_executor_new(moor_executor **out, const moor_executor_attr *attr);

/* Free the executor of the calling thread and every stack it holds. Misuse (assertion): a
 * task is still pending, or the call comes from a fiber. */
MOOR_API void moor_executor_free(moor_executor *ex);

/* The calling thread's executor, or NULL. */
MOOR_API moor_executor *moor_executor_current(void);

/* Which guard this executor's stacks use: MOOR_GUARD_MADVISE or MOOR_GUARD_MPROTECT. */
MOOR_API moor_guard_mode moor_executor_guard(const moor_executor *ex);

/* Run `fut` as a task of its own on `ex` (a future need not be a fiber to be a task). The
 * future must stay where it is until it is done; its output is then in fut->result.
 * Errors: -ENOMEM. */
MOOR_API int moor_executor_spawn(moor_executor *ex, moor_future *fut);

/* Run tasks until none is left. Returns 0. Not from a fiber (assertion). */
MOOR_API int moor_executor_run(moor_executor *ex);

/* From plain code on a thread with an executor: run the executor until `fut` is done (other
 * tasks run meanwhile and stay where they are when it returns), and return its output.
 * Not from a fiber (assertion): a fiber uses moor_await. Errors: -ENOMEM. */
MOOR_API intptr_t moor_block_on(moor_future *fut);

/* ------------------------------------------------------------------------------------------
 * Fibers
 *
 * Stack layout of a fiber (one mapping; grows down; never moved or resized):
 *
 *   low                                                                    high
 *   +---------------------+----------------------------------+---------------+
 *   | guard (64 KiB,      | usable stack (256 KiB default) <- | control block |
 *   | faults on touch)    |                         sp starts | (moor_fiber)  |
 *   +---------------------+----------------------------------+---------------+
 *
 * The control block sits at the top of the stack's own mapping, so an idle fiber that has
 * touched only the top of its stack costs one resident page.
 * ---------------------------------------------------------------------------------------- */

typedef struct moor_fiber moor_fiber;
typedef intptr_t (*moor_fiber_fn)(void *arg);

typedef struct moor_fiber_attr {
    const char *name;  /* public: copied (up to 31 bytes); NULL = "fiber" */
    size_t stack_size; /* public: usable stack size, rounded up to pages; 0 = executor's */
} moor_fiber_attr;

/* Spawn a fiber on the calling thread's executor running fn(arg); it runs once the executor
 * gets to it (the caller keeps running). With out == NULL the fiber is detached: it frees
 * itself when fn returns. Otherwise *out must be joined once with moor_join.
 * attr may be NULL. Errors: -ENOMEM (no memory or address space for the stack). */
MOOR_API int moor_spawn(moor_fiber **out, moor_fiber_fn fn, void *arg, const moor_fiber_attr *attr);

/* Wait for a fiber to return, store its return value in *result (if result is not NULL) and
 * release the fiber; the handle is invalid afterwards. May suspend; from plain code it runs
 * the executor until the fiber is done. Returns 0. Misuse: joining twice, joining a detached
 * fiber or oneself. */
MOOR_API int moor_join(moor_fiber *fiber, intptr_t *result);

/* The fiber's completion as a future (its output is the fiber's return value): await it,
 * select on it, block_on it. One future per fiber; it does not release the fiber, which must
 * still be joined (moor_join returns at once then). */
MOOR_API moor_future *moor_fiber_future(moor_fiber *fiber);

/* Suspend the calling fiber until `fut` is ready and return its output. Only the calling
 * fiber waits; the executor runs others. Misuse: called outside a fiber. */
MOOR_API intptr_t moor_await(moor_future *fut);

/* Let every other runnable task run once, then continue. Misuse: outside a fiber. */
MOOR_API void moor_yield(void);

/* The calling fiber, or NULL from plain code. */
MOOR_API moor_fiber *moor_self(void);

/* The fiber's id (unique within its executor, from 1) and name. */
MOOR_API uint64_t moor_fiber_id(const moor_fiber *fiber);
MOOR_API const char *moor_fiber_name(const moor_fiber *fiber);

/* Floating point: a fiber keeps its own rounding mode and exception masks (MXCSR and the x87
 * control word) across switches. The sticky exception flags (FE_INEXACT, FE_DIVBYZERO, ...)
 * are cleared whenever a fiber or the executor switches away, so test them with
 * fetestexcept() before the next suspension point, not after it. */

#ifdef __cplusplus
}
#endif

#endif /* MOOR_H */
