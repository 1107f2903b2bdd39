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
 *    -ECANCELED, ...), or for name lookups a MOOR_EAI_ code below -4096; moor_strerror()
 *    names it. errno is not the error channel.
 *  - "May suspend" means the call may switch away from the calling fiber; such calls made
 *    from plain code (outside any fiber) run the executor until they can return.
 *  - Misuse by the programmer (awaiting outside a fiber, joining twice, using an object of
 *    one executor from another thread, ...) fails an assertion whose message names the
 *    misuse, in every build type. Nothing that arrives from outside may crash.
 *  - Fairness: a call that could wait but completes at once (a read with data there, a
 *    channel value buffered, a free lock, a future ready at its first poll) spends one unit of
 *    the executor's budget of 128, which every turn of its run loop fills again; the call that
 *    spends the last unit yields to the run loop and the other runnable tasks before it
 *    returns (plain code runs a turn of the executor instead). So one busy connection cannot
 *    starve the others or the timers. The try_ variants never yield.
 *  - Struct fields are marked public (yours to set), read-only (yours to read) or private.
 *    Types and fields named moor__ are private layouts: storage only.
 *
 * Contents, in the order a program meets them: executor; fibers and scopes; time; I/O
 * (fds, sockets, names, signals, blocking calls); channels; synchronisation; select and
 * combinators. For writing futures and adapters of your own: the future, waker and claim
 * API in <moor/future.h>, which this header includes.
 */
#ifndef MOOR_H
#define MOOR_H

#include <errno.h> /* results are -E... values */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h> /* moor_dump */
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

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

/* A static description of a negative errno value ("Connection timed out") or of a MOOR_EAI_
 * code ("No such host"). Never NULL. */
MOOR_API const char *moor_strerror(int err);

/* ------------------------------------------------------------------------------------------
 * Memory
 *
 * Every allocation moor makes (executors, task slots, the stack pool's and timer heap's
 * arrays, channels, promises, the fd table, readers' buffers, moor_resolve's lists, DNS
 * lookups, and c-ares' own allocations) goes through one allocator, libc's by default. The
 * fiber stacks are mmap'd, not allocated. libev's allocations stay on libc's: libev aborts
 * when an allocation fails, so it gets no allocator that may fail.
 * ---------------------------------------------------------------------------------------- */

/* Install malloc_fn, realloc_fn and free_fn as moor's allocator (for fault injection, a
 * tracking or arena allocator); three NULLs put libc's back. They may be called from any
 * thread that uses moor, at once: they must be thread-safe. A NULL result is a failure, which
 * moor reports (-ENOMEM, or what each call documents) and recovers from. moor never asks for
 * 0 bytes, nor for more than PTRDIFF_MAX (refused without a call).
 *
 * Memory is freed with the allocator that is installed when it is freed, so call this only
 * while moor holds no memory: before the first executor is made, or after the last one is
 * freed and with no channel, promise, moor_resolve list or moor_reader buffer left (their
 * memory must be freed with the allocator that made it). Misuse (assertion): an executor
 * exists on any thread; some functions NULL and others not. Never suspends. */
MOOR_API void moor_set_allocator(void *(*malloc_fn)(size_t), void *(*realloc_fn)(void *, size_t),
                                 void (*free_fn)(void *));

typedef struct moor_executor moor_executor;
typedef struct moor_task moor_task;
typedef struct moor_future moor_future;
typedef struct moor_fiber moor_fiber;
typedef intptr_t (*moor_fiber_fn)(void *arg);

/* Futures, wakers and select claims, for writing futures and adapters; and the private
 * layouts the caller-owned structs below embed. */
#include "moor/future.h"

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
    size_t guard_size; /* public: guard below each stack; 0 = 64 KiB; rounded to pages. A
                          frame larger than the guard could jump it: build with
                          -fstack-clash-protection (moor.pc and the CMake package add it) */
    size_t pool_hot;   /* public: freed stacks kept resident; beyond it the pool gives their
                          memory back with MADV_DONTNEED, 64 stacks at a time; 0 = 64 */
    moor_guard_mode guard; /* public: AUTO takes the environment variable MOOR_GUARD
                              (mprotect, madvise or auto) if set. Stacks are carved from
                              large reservations, many to a mapping; MPROTECT costs two more
                              mappings a stack, so that vm.max_map_count (65530 by default)
                              caps the fibers near 32,000 */
    size_t blocking_threads; /* public: worker threads for moor_blocking; 0 = 4; at most 4096 */
} moor_executor_attr;

/* Create the executor of the calling thread (at most one per thread) and make it current.
 * attr may be NULL. Sets SIGPIPE to SIG_IGN if it was SIG_DFL, so that a write to a peer that
 * has gone fails with -EPIPE instead of killing the process. Errors: -ENOMEM (the first stack
 * could not be mapped), -EINVAL (guard mode not available, also when MOOR_GUARD asks for it; a stack or guard size that cannot
 * be mapped whatever the memory, such as SIZE_MAX; blocking_threads above 4096), -EEXIST
 * (this thread has one). */
MOOR_API int moor_executor_new(moor_executor **out, const moor_executor_attr *attr);

/* Free the executor of the calling thread and every stack it holds. Wakers of its tasks
 * that other threads still hold become no-ops. Misuse (assertion): a task is still pending,
 * a fiber spawned from another thread is still waiting to start, or the call comes from a
 * fiber. */
MOOR_API void moor_executor_free(moor_executor *ex);

/* The calling thread's executor, or NULL. */
MOOR_API moor_executor *moor_executor_current(void);

/* Which guard this executor's stacks use: MOOR_GUARD_MADVISE or MOOR_GUARD_MPROTECT. */
MOOR_API moor_guard_mode moor_executor_guard(const moor_executor *ex);

/* What an executor holds now: a program (or a test) checks with it that it left nothing
 * behind before moor_executor_free. */
typedef struct moor_executor_stats {
    size_t tasks;  /* tasks started and not finished, fibers included */
    size_t fibers; /* fibers not yet released: running, waiting, or returned and not joined */
    size_t timers; /* deadlines queued (sleeps, waits with a deadline) */
    size_t fibers_alive;   /* fibers whose function has not returned */
    uint64_t switches;     /* times a fiber was switched to (resumed or started) */
    uint64_t wakeups;      /* times a waiting task was made runnable by a wake */
    size_t stacks_mapped;  /* fiber stacks mapped: in use or pooled */
    size_t stacks_pooled;  /* of those, freed and kept for reuse */
    moor_guard_mode guard; /* MOOR_GUARD_MADVISE or MOOR_GUARD_MPROTECT */
} moor_executor_stats;

/* Fill *out with ex's figures. From ex's thread. */
MOOR_API void moor_executor_stats_get(const moor_executor *ex, moor_executor_stats *out);

/* ------------------------------------------------------------------------------------------
 * Introspection: stats, dumps, deadlock detection
 * ---------------------------------------------------------------------------------------- */

/* The figures of the calling thread's executor (all zero without one). */
MOOR_API moor_executor_stats moor_stats(void);

/* Print the calling thread's executor to `out`: a header line (executor, tasks, fibers,
 * timers, switches, wakeups), then one line per fiber and per plain task:
 *
 *   fiber 3 "reader" waiting on read fd 7 for 1520 ms, stack 256 KiB, touched 12 KiB
 *   fiber 4 "fiber" ready, stack 256 KiB, touched 4 KiB
 *   task 0x55d0c2a0 waiting on sleep 120 ms left for 3 ms
 *
 * States: running (the caller, if a fiber), ready (runnable), waiting (on what, with its
 * argument: see moor_future_kind), done (returned, not joined yet). The time waited is
 * counted from the executor's last look at the clock before the wait began (it looks at
 * every park and every 64 tasks run), so it may also count some time the tasks ran just
 * before: a wait that began after a long computation is shown that much longer.
 * "touched" is how much of the stack's mapping is resident, measured with mincore(2) from
 * the lowest resident page up: the high-water mark that tells how small a stack could be
 * (a reused stack shows what an earlier fiber touched too). From plain code or a fiber;
 * never suspends. No-op without an executor. */
MOOR_API void moor_dump(FILE *out);

/* Opt in to a dump on SIGQUIT (Ctrl-\), as Go prints its goroutines: the handler writes
 * the dump of every live executor of the process to stderr, and the process goes on.
 * It runs in signal context: it formats with write(2) only and takes no lock, so it reads
 * other threads' executors while they run, best effort (a fiber that changes state at that
 * moment may be printed stale or skipped). Replaces SIGQUIT's previous disposition.
 * Returns 0, or -errno from sigaction. */
MOOR_API int moor_dump_on_sigquit(void);

/* Deadlock detection. When every task of an executor waits and nothing can wake any of
 * them, moor_executor_run and moor_block_on do not hang: they print the dump to stderr,
 * under a first line that says so, and return -EDEADLK. "Nothing can wake" means: no task
 * runnable, no timer queued, no request from another thread queued, the executor neither
 * attached to an application's loop nor its loop handed out (moor_executor_loop), no hold
 * (below), and every task waits on something only a task of this executor could complete
 * (channels, locks, conditions, events, wait groups, joins, scopes, and selects or
 * await_alls of only those; see moor_future_kind for your own types). A wait on a file
 * descriptor, a signal, a name lookup, a blocking call, a promise or a future of a type not
 * declared local is never called a deadlock.
 *
 * Other threads can feed an executor only through moor_spawn_remote (a new fiber that may
 * then complete the waits): a program that spawns from other threads while the executor
 * could be idle holds it for as long as they may (libuv's ref/unref). Hold before the
 * threads start, release when they are done; any thread. While the count is above zero no
 * deadlock is reported; a release that brings it to zero wakes the executor to look again.
 * Misuse: releasing more often than held. */
MOOR_API void moor_executor_hold(moor_executor *ex);
MOOR_API void moor_executor_release(moor_executor *ex);

/* Run `fut` as a task of its own on the calling thread's executor (a future need not be a
 * fiber to be a task; moor_spawn runs a function as a fiber). The future must stay where it
 * is until it is done; its output is then in fut->result. The task runs until its future
 * completes: to stop it early, make the future complete (cancelling the future does not drop
 * the task). Errors: -ENOMEM. */
MOOR_API int moor_spawn_future(moor_future *fut);

/* moor_spawn from any thread: spawn a detached fiber fn(arg) on `ex`, which starts it on its own thread
 * (waking it if it is parked). Requests are started in order, a batch of 64 at a time: the
 * next batch once the last has started running, so that a burst of them reuses the stacks of
 * fibers that have finished instead of mapping one per request. A request that finds no
 * memory for its stack waits in the queue and is tried again every 10 ms (said once on
 * stderr); it is never dropped, and moor_executor_run does not return before it has started.
 * Errors: -ENOMEM (no memory to queue the request), -ESRCH (the executor has been freed). */
MOOR_API int moor_spawn_remote(moor_executor *ex, moor_fiber_fn fn, void *arg);

/* In the child after fork(): re-arm the event loop (a loop moor owns is re-armed now, an
 * attached loop at the application's next ev_run) and reset what other threads of the parent
 * held; blocking calls in flight in the parent's workers fail with -ECANCELED in the child.
 * Returns 0, or -EMFILE/-ENFILE if the child has no descriptor left for the loop's new async
 * pipe: then nothing has been changed, and the call must be made again (once descriptors
 * are free) before the executor is used, or the executor freed. */
MOOR_API int moor_executor_after_fork(moor_executor *ex);

/* Run tasks until none is left. Returns 0, or -EDEADLK: every task left waits and nothing
 * can wake any of them (see moor_executor_hold); the dump went to stderr and the tasks stay
 * where they are, to be cancelled (moor_cancel) and run again, or inspected. Not from a
 * fiber (assertion). */
MOOR_API int moor_executor_run(moor_executor *ex);

/* From plain code on a thread with an executor: run the executor until `fut` is done (other
 * tasks run meanwhile and stay where they are when it returns), and return its output.
 * Not from a fiber (assertion): a fiber uses moor_await. Needs no memory. Its one failure
 * is -EDEADLK (as moor_executor_run): then fut has been cancelled (unless its cancel
 * reported it done: its output is returned) and the other tasks stay where they are. The
 * calls that may suspend return -EDEADLK from plain code the same way. */
MOOR_API intptr_t moor_block_on(moor_future *fut);

/* ------------------------------------------------------------------------------------------
 * Many cores: an executor per thread. Fibers never move between threads; values cross them
 * through moor_spawn_remote, wakers and promises (and SO_REUSEPORT listeners spread
 * connections, see moor_tcp_listen_opt). docs/CORES.md has the patterns.
 * ---------------------------------------------------------------------------------------- */

/* Run n executors on n new threads and wait for them: thread i makes an executor (attr, may
 * be NULL), spawns fn(arg) as its first fiber (named "thread i"), runs the executor until no
 * task is left (fibers fn spawned included) and no hold is on it (moor_executor_hold: a
 * held executor with no task waits for spawns until the release, where a plain
 * moor_executor_run would return), and frees it. moor_thread_index() in thread i
 * returns i. fn starts on no thread before every thread has made its executor (or failed
 * to), so moor_thread_executor() finds each one from the start. Once fn has returned, the
 * first fiber waits until fn has returned on every thread before it ends: an executor of the
 * run stays up while any fn may still spawn onto it (moor_spawn_remote), and a deadlock
 * inside fn is still found, the wait coming after it.
 *
 * The calling thread only starts the threads and joins them: it runs no executor meanwhile
 * (one it has of its own is left alone, not run). The threads start with the caller's signal
 * mask: block the signals that must not land on an executor's thread before the call.
 *
 * Returns once every thread that started has been joined: 0, or the error of the
 * lowest-numbered thread that failed: -errno of starting it (-EAGAIN), of making its
 * executor (as moor_executor_new: -ENOMEM, -EINVAL) or of spawning fn's fiber; -EDEADLK
 * when its executor deadlocked (moor_executor_run: the dump went to stderr). A failure of
 * one thread does not stop the others: they run and are joined. A deadlocked executor has
 * every fiber cancelled and is run again, so that they clean up and it can be freed; if tasks
 * still cannot finish (a plain task of moor_spawn_future waiting on a local future, a fiber
 * that waits again for ever after its cancel), the executor is left allocated with them
 * (said on stderr) and its thread ends. results (NULL: not wanted) gets, for each i, fn's
 * return value, or that thread's error when fn could not run or its executor deadlocked.
 * fn's own return values are not errors of the call, negative ones included.
 * Errors before any thread starts: -EINVAL (n is 0 or above INT_MAX, fn is NULL), -ENOMEM.
 * Misuse (assertion): called from a fiber (it would stall the fiber's executor). */
MOOR_API int moor_threads_run(size_t n, moor_fiber_fn fn, void *arg, const moor_executor_attr *attr,
                              intptr_t *results);

/* The index of the calling thread in its moor_threads_run (0..n-1), or -1 outside one (in
 * the calling thread, in moor_blocking's workers). */
MOOR_API int moor_thread_index(void);

/* From a thread of a moor_threads_run: the executor of thread i of the same run, for
 * moor_spawn_remote and moor_executor_hold; NULL if i is out of range, if that thread could
 * not run fn (no executor) or has freed its executor, and outside a run. The handle is good
 * while thread i's executor cannot end: until fn has returned on every thread (see
 * moor_threads_run), or while it is held. So fn may spawn onto any executor of the run at
 * any time; a feeder that goes on after its fn has returned (a fiber fn spawned, another
 * thread) takes a hold on the target (moor_executor_hold) before its fn returns and releases
 * it when it is done: an executor that ended may be recycled as another thread's, and a
 * spawn onto a stale handle would land there. The exception is a thread whose executor
 * deadlocked: its fibers are cancelled, and it may end before the other fns return. */
MOOR_API moor_executor *moor_thread_executor(size_t i);

/* ------------------------------------------------------------------------------------------
 * Fibers
 *
 * Stack layout of a fiber (one mapping; grows down; never moved or resized):
 *
 *   low                                                                        high
 *   +---------------------+----------------------------------+---------------+---+
 *   | guard (64 KiB,      | usable stack (256 KiB default) <- | control block |   |
 *   | faults on touch)    |                         sp starts | (moor_fiber)  |   |
 *   +---------------------+----------------------------------+---------------+---+
 *                                                                     0-960 bytes
 *
 * The control block sits near the top of the stack's own mapping (0 to 960 bytes below it,
 * by the mapping's address, so that fibers' blocks do not all share one page offset), so an
 * idle fiber that has touched only the top of its stack costs one resident page. An overflow into the guard is
 * named on stderr ("moor: fiber 7 \"parser\" overflowed its 64 KiB stack") and aborts, also
 * when it happens inside a switch. A single frame larger than the guard would jump it unless
 * the code is built with -fstack-clash-protection, which probes every page of a large frame:
 * moor's pkg-config file and CMake package add that flag to your compile options.
 * ---------------------------------------------------------------------------------------- */

typedef struct moor_fiber_attr {
    const char *name;  /* public: copied (up to 31 bytes); NULL = "fiber" */
    size_t stack_size; /* public: usable stack size, rounded up to pages; 0 = executor's */
} moor_fiber_attr;

/* Spawn a fiber on the calling thread's executor running fn(arg); it runs once the executor
 * gets to it (the caller keeps running). With out == NULL the fiber is detached: it frees
 * itself when fn returns. Otherwise *out must be joined once with moor_join.
 * attr may be NULL. Errors: -ENOMEM (no memory or address space for the stack, or the process
 * is out of memory mappings: then, once per process, a message on stderr names
 * vm.max_map_count and the value it would need; the executor stays usable, and spawning
 * works again once fibers have exited), -EINVAL (a stack size no mapping can have, such as
 * SIZE_MAX). */
MOOR_API int moor_spawn(moor_fiber **out, moor_fiber_fn fn, void *arg, const moor_fiber_attr *attr);

/* Wait for a fiber to return, store its return value in *result (if result is not NULL) and
 * release the fiber; the handle is invalid afterwards. May suspend; from plain code it runs
 * the executor until the fiber is done. Returns 0, or -ECANCELED if the fiber had been
 * cancelled (its return value is still stored). Waiting in moor_join is not cut short when
 * the caller is cancelled, so a cancelled fiber can still reap its children. From plain code
 * it may also return -EDEADLK (see moor_executor_hold): the fiber is then not joined, and
 * the handle stays valid (cancel it, then join again). Misuse: joining twice, joining a
 * detached fiber or oneself. */
MOOR_API int moor_join(moor_fiber *fiber, intptr_t *result);

/* Join with a bound on the fiber's run: wait for it to return until the deadline, and if it
 * has not, cancel it and wait for it to return (its cleanup is not bounded). Returns 0 (or
 * -ECANCELED if someone else had cancelled it, as moor_join), or -ETIMEDOUT: it was cancelled
 * at the deadline. If the caller is cancelled while it waits, the fiber is cancelled too and
 * the call returns -ECANCELED once it has returned. Either way the fiber has returned, its
 * value is in *result (if not NULL) and the handle is released. May suspend. */
MOOR_API int moor_join_deadline(moor_fiber *fiber, intptr_t *result, int64_t deadline);

/* The fiber's completion as a future (its output is the fiber's return value): await it,
 * select on it, block_on it. One future per fiber; it does not release the fiber, which must
 * still be joined (moor_join returns at once then). Like any future it becomes done when it
 * is polled after the fiber returned, not by itself. A timeout or select over it that gives
 * up lets go of the *join*, not of the fiber, which runs on: to bound a fiber's run, use
 * moor_join_deadline (or moor_cancel it). */
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

/* Cancel a fiber: the call it is waiting in, and every call that would have to wait that it
 * makes afterwards, return -ECANCELED (the future it waited on is cancelled cleanly), so it
 * runs its own cleanup and returns. A call whose result is there without waiting still
 * completes: reading buffered data, writing into a socket with room, an uncontended lock, a
 * select or timeout over a future that is ready, a sleep whose deadline has passed, awaiting
 * a fiber that has returned (every wait polls once before it looks at the cancel;
 * moor_cancelled() tells a loop that never waits to stop). A wait that had already completed
 * when the cancel arrived (a value received, a lock handed over) returns its result: nothing
 * is lost.
 * moor_join then reports -ECANCELED. Idempotent; a no-op on a fiber that has returned. Any
 * fiber or plain code of the same thread. */
MOOR_API void moor_cancel(moor_fiber *fiber);

/* Non-zero if the calling fiber has been cancelled. */
MOOR_API int moor_cancelled(void);

/* Floating point: a fiber starts with the floating-point control settings (rounding mode,
 * exception masks) the process had when its first executor was made, not the spawner's, and
 * keeps its own settings (MXCSR and the x87 control word) across switches. The sticky
 * exception flags (FE_INEXACT, FE_DIVBYZERO, ...) do not survive a suspension: they are clear
 * when a fiber resumes, so test them with fetestexcept() before the next call that may
 * suspend, not after it. */

/* ------------------------------------------------------------------------------------------
 * Scopes (nurseries): fibers spawned into a scope cannot be forgotten. Children that return
 * are released at once; moor_scope_close cancels the ones still running and waits for them.
 * A fiber that returns with a scope of its own still open fails an assertion.
 * ---------------------------------------------------------------------------------------- */

typedef struct moor_scope {
    moor__list children;   /* private: the exit hooks of its running children */
    size_t count;          /* read-only: children running */
    moor__list waiters;    /* private: fibers waiting for count to reach 0 */
    moor_fiber *owner;     /* private: the fiber that opened it, or NULL */
    int closed;            /* private: 0 open, -1 closing, 1 closed */
    moor_executor *ex;     /* private: the executor whose fibers use it */
} moor_scope;

/* Open a scope (caller-owned memory, usually on the opening fiber's stack). */
MOOR_API void moor_scope_init(moor_scope *scope);
/* Spawn a child into the scope (detached from the caller, owned by the scope); while the
 * scope is being closed the child starts cancelled. Errors as moor_spawn. Misuse: the scope
 * is closed. */
MOOR_API int moor_scope_spawn(moor_scope *scope, moor_fiber_fn fn, void *arg,
                              const moor_fiber_attr *attr);
/* Wait until every child has returned, without cancelling them. Returns 0, -ETIMEDOUT,
 * -ECANCELED (the children keep running), -EPIPE if the scope was closed meanwhile with
 * children still running (moor_scope_close timed out and let go of them), or -ENOMEM (no
 * room to time the wait). */
MOOR_API int moor_scope_wait(moor_scope *scope, int64_t deadline);
/* Cancel every child still running and wait for them to return; the scope is closed after.
 * Returns 0, or -ETIMEDOUT if some child has not returned by the deadline (it has been
 * cancelled; it is released when it returns). Not cut short by cancellation of the caller. */
MOOR_API int moor_scope_close(moor_scope *scope, int64_t deadline);

/* ------------------------------------------------------------------------------------------
 * Time
 *
 * Deadlines are absolute milliseconds on the monotonic clock (moor_now()), -1 meaning none,
 * so one deadline can bound a whole sequence of calls. Timers belong to the executor, not to
 * an event loop: they work on every executor.
 * ---------------------------------------------------------------------------------------- */

/* Milliseconds on the monotonic clock. */
MOOR_API int64_t moor_now(void);

/* moor_now() + ms: a deadline `ms` from now (ms < 0 gives -1, no deadline). */
MOOR_API int64_t moor_deadline_in(int64_t ms);

/* A future that becomes ready (output 0) once moor_now() >= deadline; never earlier. Caller
 * owned; must not move once polled. Output -ENOMEM if the timer heap could not grow. */
typedef struct moor_sleep_future {
    moor_future base;        /* public: poll, await, select this */
    moor__deadline deadline; /* private */
} moor_sleep_future;

MOOR_API void moor_sleep_init(moor_sleep_future *sf, int64_t deadline);

/* Suspend the calling fiber until the deadline passes; returns 0 (or -ENOMEM). From plain
 * code it runs the executor meanwhile. */
MOOR_API int moor_sleep(int64_t deadline);

/* ------------------------------------------------------------------------------------------
 * I/O: libev turns OS events into wakeups
 *
 * An executor gets its event loop when something first needs one (an fd wait, a signal), or
 * is attached to a loop the application already runs. File descriptors given to moor's I/O
 * calls must be non-blocking (the socket helpers make them so). Each call tries the system
 * call first and waits only on EAGAIN; the libev watcher it waits with lives inside a future
 * on the calling fiber's pinned stack. All of them may suspend; from plain code they run the
 * executor meanwhile. Errors are -errno of the system call, -ETIMEDOUT once the deadline has
 * passed, -ECANCELED in a cancelled fiber (once the system call has been tried: data or room
 * that is there is still used), -EBADF for an fd that is not open or that moor_close closed
 * while the call waited, and -EMFILE/-ENFILE/-ENOMEM when the event loop could not be made.
 *
 * File descriptors belong to moor while it waits on them: close them with moor_close, which
 * wakes their waiters first. Any fd may be closed with plain close() when no fiber waits on
 * it, whether moor made it or not; a later wait on whatever new fd reuses the number works.
 * For the fds it makes (moor_accept, moor_tcp_*, moor_unix_*) moor keeps per-fd hints that
 * spare system calls (they stay registered with the loop between waits, as libev's own
 * watchers do; a short read means the next read would find nothing): such a hint can go
 * stale when the fd is closed without moor_close and its number reused, and then costs a
 * system call or a delay of some 10-20 ms (more on an overloaded executor) before the wait
 * is checked, never a hang.
 * ---------------------------------------------------------------------------------------- */

struct ev_loop;

/* Run this executor inside an event loop the application owns and runs (ev_run): moor adds
 * prepare/idle/timer/async watchers (unreferenced: they do not keep ev_run alive) and runs
 * its tasks from them. Call before anything used the executor's own loop.
 * Errors: -EBUSY (the executor has a loop already), -EMFILE/-ENFILE (no descriptor for the
 * loop's async pipe, if it had none yet), -ENOMEM. */
MOOR_API int moor_executor_attach(moor_executor *ex, struct ev_loop *loop);

/* The executor's libev loop (made now if it has none), for adapters that own watchers.
 * NULL if it could not be made (out of descriptors or memory). */
MOOR_API struct ev_loop *moor_executor_loop(moor_executor *ex);

#define MOOR_READABLE 0x1
#define MOOR_WRITABLE 0x2

/* A readiness future: output 0 once `fd` is ready for `events`; -EBADF if fd is not open when
 * it is first polled, or if moor_close closes it while the future waits (even if readiness
 * had been reported but the future not yet polled: its owner never touches the number's
 * next file); -ETIMEDOUT once `deadline` passes; -EMFILE, -ENFILE, -ENOMEM if the event loop
 * could not be made or could not watch fd. Caller owned; must not move once polled (its
 * watcher is inside). */
typedef struct moor_io_future {
    moor_future base;      /* public: poll, await, select this */
    int fd;                /* read-only */
    int events;            /* read-only: MOOR_READABLE and/or MOOR_WRITABLE */
    int state;             /* private: enum moor__io_state (reactor/fd.h) */
    uint32_t epoch;        /* private: when it was put on the check list (10 ms epochs) */
    moor_waker waker;      /* private */
    moor__deadline deadline; /* private */
    moor__node fd_link;    /* private: in its fd's waiters */
    moor__node check_link; /* private: in the waits to check */
    int checked;           /* private: on the check list */
    _Alignas(16) unsigned char watcher[64]; /* private: an ev_io */
} moor_io_future;

MOOR_API void moor_io_init(moor_io_future *io, int fd, int events, int64_t deadline);

/* Wait until fd is ready. Returns 0, -EBADF (fd not open, or closed by moor_close meanwhile),
 * -ETIMEDOUT, -ECANCELED, -EMFILE/-ENFILE/-ENOMEM (no event loop). Costs one fcntl() to check
 * that fd is open before the event loop sees it. */
MOOR_API int moor_wait_fd(int fd, int events, int64_t deadline);

MOOR_API ssize_t moor_read(int fd, void *buf, size_t len, int64_t deadline);
MOOR_API ssize_t moor_write(int fd, const void *buf, size_t len, int64_t deadline);
MOOR_API ssize_t moor_readv(int fd, const struct iovec *iov, int iovcnt, int64_t deadline);
MOOR_API ssize_t moor_writev(int fd, const struct iovec *iov, int iovcnt, int64_t deadline);
MOOR_API ssize_t moor_recv(int fd, void *buf, size_t len, int flags, int64_t deadline);
MOOR_API ssize_t moor_send(int fd, const void *buf, size_t len, int flags, int64_t deadline);
MOOR_API ssize_t moor_recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr,
                               socklen_t *addrlen, int64_t deadline);
MOOR_API ssize_t moor_sendto(int fd, const void *buf, size_t len, int flags,
                             const struct sockaddr *addr, socklen_t addrlen, int64_t deadline);

/* Write all of buf, looping over partial writes. Returns len, or a negative error; on error
 * the number of bytes already written is stored in *written (if not NULL) so that nothing is
 * lost silently. */
MOOR_API ssize_t moor_write_all(int fd, const void *buf, size_t len, size_t *written,
                                int64_t deadline);

/* moor_write_all over an iovec array (a line and its newline in one system call): writes
 * every byte of every element, looping over partial writes. Returns the total, or a negative
 * error with the bytes already written in *written (if not NULL). The array is not changed.
 * Errors as moor_writev, and -EINVAL for iovcnt outside 0..IOV_MAX or a total that
 * overflows ssize_t. */
MOOR_API ssize_t moor_writev_all(int fd, const struct iovec *iov, int iovcnt, size_t *written,
                                 int64_t deadline);

/* Buffered reading over an fd, for line and length-prefixed protocols (Go's bufio.Reader):
 * reads as much as the buffer takes per system call and hands out lines and byte runs from
 * it. Caller-owned struct; the buffer is on the heap (moor_reader_init makes it,
 * moor_reader_free frees it; neither touches the fd). One fiber reads from a reader at a
 * time. The end of the stream is MOOR_EOF, distinct from an empty line. */
#define MOOR_EOF (-5100) /* the peer closed its side: no more bytes will come */

typedef struct moor_reader {
    int fd;                 /* read-only */
    unsigned char *buf;     /* private */
    size_t cap;             /* read-only: the buffer's size, the longest line it can hold
                               (counting its '\n') */
    size_t start, end;      /* private: the buffered bytes are buf[start..end) */
    size_t skipped;         /* private: bytes of an over-long line dropped so far, while a
                               timeout or cancel came before its '\n'; 0 if none */
    int state;              /* private: 0, or MOOR_EOF / -errno once the stream ended */
} moor_reader;

/* A reader of fd with a buffer of `size` bytes. Errors: -EINVAL (size 0), -ENOMEM (no memory,
 * or a size no object can have, above PTRDIFF_MAX). moor_reader_free may be called after
 * either. */
MOOR_API int moor_reader_init(moor_reader *r, int fd, size_t size);
MOOR_API void moor_reader_free(moor_reader *r);

/* Read one line: the bytes up to the next '\n', without it and without a '\r' just before
 * it. *line points into the reader's buffer, valid until the next call on the reader.
 * Returns the line's length (0 for an empty line), or:
 *  -EMSGSIZE  no '\n' within max bytes (max <= the buffer's size; 0 means the buffer's size).
 *             max counts the line's '\r' and '\n': a line of max bytes with them is read.
 *             The over-long line is consumed and discarded up to and including its '\n' (or
 *             to the end of the stream), and *discarded (if not NULL) tells how many bytes
 *             were dropped, '\n' included, so the caller may reply and go on, or disconnect.
 *             If the deadline passes or the fiber is cancelled before that '\n' comes, that
 *             error is returned instead, and the next call goes on dropping the same line;
 *  MOOR_EOF   the stream ended cleanly before any byte of a line; a last line without its
 *             '\n' (shorter than max) is returned as a line first, as it is, then MOOR_EOF;
 *  -ETIMEDOUT, -ECANCELED, -ECONNRESET and moor_read's other errors (bytes of a partial line
 *             stay buffered after a timeout or a cancel: the next call goes on with them);
 *  -EINVAL    max above the buffer's size.
 * The end of the stream and an error that ends it (-ECONNRESET, ...; not a timeout, a cancel
 * or a lack of memory or descriptors for the event loop) are kept: once the complete lines
 * already buffered are read, every later call returns them, and a line the error cut short
 * is never returned. *discarded is set on every return (0 but for -EMSGSIZE).
 * May suspend. */
MOOR_API ssize_t moor_read_line(moor_reader *r, const char **line, size_t max, size_t *discarded,
                                int64_t deadline);

/* Read exactly len bytes into dst (buffered ones first). Returns len; MOOR_EOF if the stream
 * ended before any byte, -EPIPE if it ended part-way, -EINVAL for len above SSIZE_MAX, or
 * moor_read's errors. On every return the bytes read so far are in dst (they are consumed),
 * their count in *got if not NULL: after a timeout or cancel the call can go on from there. A
 * run as long as the buffer or longer is read into dst directly. May suspend. */
MOOR_API ssize_t moor_read_exact(moor_reader *r, void *dst, size_t len, size_t *got,
                                 int64_t deadline);

/* What is buffered now, without reading: *data points at it, valid until the next call on
 * the reader. Returns its length. moor_reader_consume(r, n) drops the first n of those bytes
 * (misuse: more than are buffered). Never suspends. */
MOOR_API size_t moor_reader_buffered(const moor_reader *r, const void **data);
MOOR_API void moor_reader_consume(moor_reader *r, size_t n);

/* Close an fd: first every io future of this thread's executor that waits on it (moor_read,
 * moor_write, moor_wait_fd, ... in any fiber) completes with -EBADF, its watcher stopped and
 * its fiber woken, so that no waiter ever acts on a later fd that reuses the number (as Go's
 * netpoller does on Close); then moor forgets its hints for the fd and closes it. Plain
 * close() is fine for any fd no fiber waits on; a plain close() under a waiter is misuse
 * (debug builds report it on stderr within some 20 ms and fail the wait with -EBADF; release
 * builds leave the waiter to its deadline). Returns 0 or -errno of close(). */
MOOR_API int moor_close(int fd);

/* Accept a connection: the new fd is non-blocking and close-on-exec. Under EMFILE/ENFILE it
 * returns that error at once and the next accept on this executor first waits 100 ms, so a
 * server loop neither spins nor stops. */
MOOR_API int moor_accept(int fd, struct sockaddr *addr, socklen_t *addrlen, int64_t deadline);

/* Connect a non-blocking socket, waiting for the handshake. Returns 0 or -errno
 * (-ECONNREFUSED, -ETIMEDOUT, ...). */
MOOR_API int moor_connect(int fd, const struct sockaddr *addr, socklen_t addrlen, int64_t deadline);

/* Sockets on numeric addresses ("127.0.0.1", "::1"; NULL or "" is any IPv4 address), made
 * non-blocking and close-on-exec. Listeners set SO_REUSEADDR. Return an fd or -errno
 * (-EINVAL for an address that is not numeric). Close them with moor_close. */
MOOR_API int moor_tcp_listen(const char *host, int port, int backlog);
MOOR_API int moor_tcp_connect(const char *host, int port, int64_t deadline);
MOOR_API int moor_unix_listen(const char *path, int backlog);
MOOR_API int moor_unix_connect(const char *path, int64_t deadline);

/* moor_tcp_listen with options (flags 0: the same call). MOOR_TCP_REUSEPORT sets
 * SO_REUSEPORT, so that several sockets (one per executor) listen on the same address and
 * port and the kernel spreads new connections among them by a hash of the connection's
 * addresses and ports; each must set it, and all belong to the same user (another process of
 * that user could join the group and take connections). With port 0 each call gets a port
 * of its own: listen once on port 0, read the port with moor_socket_port, and make the
 * others on that port. A connection queued on one listener is accepted there only: closing a
 * listener resets the connections queued on it, not those of the others (unless the
 * sysctl net.ipv4.tcp_migrate_req moves them to the others, Linux 5.14+). Errors as
 * moor_tcp_listen, and -EINVAL for an unknown flag bit (nothing is made). */
#define MOOR_TCP_REUSEPORT 1u
MOOR_API int moor_tcp_listen_opt(const char *host, int port, int backlog, unsigned flags);

/* The local port a socket is bound to (after listening on port 0), or -errno. */
MOOR_API int moor_socket_port(int fd);

/* ------------------------------------------------------------------------------------------
 * Names: DNS lookups on c-ares, and connecting by name
 *
 * Lookups run on one c-ares channel per executor, made at the first lookup and driven by the
 * executor's event loop: many fibers resolve at once on it, none blocks a thread. The channel
 * reads the system's configuration (/etc/resolv.conf, /etc/hosts, /etc/nsswitch.conf) when it
 * is made; the environment variable MOOR_DNS_SERVERS, if set then, replaces the name servers
 * with its list ("127.0.0.1:5353,[::1]:53": c-ares' ares_set_servers_ports_csv format).
 *
 * Errors of name resolution that are not errno values have codes of their own below -4096
 * (outside the kernel's errno range), which moor_strerror names. */
#define MOOR_EAI_NONAME   (-5001) /* "No such host": the name does not exist */
#define MOOR_EAI_NODATA   (-5002) /* the name exists but has no address of the family asked */
#define MOOR_EAI_SERVFAIL (-5003) /* the name server failed, or answered what cannot be read */
#define MOOR_EAI_REFUSED  (-5004) /* the name server refused the query */
#define MOOR_EAI_BADNAME  (-5005) /* the host name is malformed */
#define MOOR_EAI_SERVICE  (-5006) /* the service is not a port number or a known service */

struct addrinfo;

/* Resolve host (a name, or a numeric IPv4/IPv6 address) and service (a port number, a
 * service name, or NULL for port 0) into a list of addresses, as getaddrinfo(3) does, and
 * store it in *result (NULL on error); free it with moor_resolve_free. hints may be NULL
 * (any family, any socket type); its ai_family, ai_socktype, ai_protocol and the flags
 * AI_CANONNAME, AI_NUMERICHOST, AI_NUMERICSERV, AI_PASSIVE, AI_V4MAPPED, AI_ALL and
 * AI_ADDRCONFIG are honoured. Names in /etc/hosts resolve without a query (as the system's
 * lookup order says); a numeric host with a numeric service (or none) resolves at once
 * without the channel. May suspend the calling fiber; from plain code it runs the executor.
 *
 * The lookup belongs to the call: when the deadline passes or the fiber is cancelled, the
 * call returns at once, and the answer that c-ares may still get later is dropped (c-ares
 * gives up on it after its own timeout, by default 5 s per try).
 *
 * Returns 0 or: MOOR_EAI_NONAME, MOOR_EAI_NODATA, MOOR_EAI_SERVFAIL, MOOR_EAI_REFUSED,
 * MOOR_EAI_BADNAME, MOOR_EAI_SERVICE (above); -ETIMEDOUT (the deadline passed, or c-ares
 * gave up waiting for the servers); -ECONNREFUSED (no server listens where the configuration
 * says); -ECANCELED (the fiber was cancelled; or, in a forked child, a lookup that was in
 * flight at the fork); -EINVAL (host NULL, bad hints, or a bad MOOR_DNS_SERVERS); -ENOMEM;
 * -EIO (the configuration could not be read); -EMFILE/-ENFILE (no event loop). */
MOOR_API int moor_resolve(const char *host, const char *service, const struct addrinfo *hints,
                          int64_t deadline, struct addrinfo **result);

/* Free a list from moor_resolve (NULL is fine). Not for lists from getaddrinfo(3). */
MOOR_API void moor_resolve_free(struct addrinfo *res);

/* Connect to host:port over TCP, host a name or a numeric address: moor_tcp_connect for
 * names. A name is resolved with moor_resolve, then its addresses are tried as RFC 8305
 * (happy eyeballs) and Go's net.Dial do: IPv6 and IPv4 addresses interleaved, starting with
 * the family of the first address; each attempt 250 ms after the previous one started, or
 * at once when the previous one fails sooner; the first to connect wins and the others are
 * closed. One deadline bounds the lookup and every attempt. Returns a non-blocking,
 * close-on-exec fd with TCP_NODELAY (close it with moor_close), or: a lookup error (above);
 * the last attempt's error when every address failed (-ECONNREFUSED, -ENETUNREACH, ...);
 * -ETIMEDOUT; -ECANCELED; -EINVAL (port out of range, host NULL or empty); -ENOMEM. May
 * suspend the calling fiber. */
MOOR_API int moor_tcp_dial(const char *host, int port, int64_t deadline);

/* Wait for a signal (SIGTERM for a graceful shutdown, ...). May suspend the calling fiber.
 *
 * Disposition: when the first wait for signum begins, moor's own handler replaces the
 * signal's disposition; when the last one ends, the disposition it had before comes back in
 * the same sigaction call that removes moor's handler. The signal never meets SIG_DFL in
 * between: one that was SIG_IGN, or had the application's handler, never kills the process,
 * whichever thread it arrives on. The handler runs on any thread, on its sigaltstack if it
 * has one, with every signal blocked.
 *
 * Delivery: a signal that arrives while waits are pending completes each wait for it that
 * had begun by then, even one whose fiber is cancelled or whose deadline passes before it
 * resumes (it returns signum); one that arrives just as the last wait ends may go to the
 * next wait to begin instead, or to none. Signals are not queued: one that arrives after
 * every pending wait already has a signal merges with those, and a wait that begins later
 * does not see it. One that arrives while no fiber waits gets the previous disposition, so
 * a loop that waits again after each signal should set SIG_IGN (or a handler) first if a
 * signal between two of its waits must not kill the process.
 *
 * One executor at a time may wait for a given signal. After fork(), the child may wait for
 * any signal once it has called moor_executor_after_fork: what other executors of the
 * parent waited for is given back its previous disposition there.
 *
 * Returns signum, -ETIMEDOUT, -ECANCELED, -EINVAL (bad signal number, or one the C library
 * keeps for itself), -EBUSY (another executor waits for it), -ENOMEM. */
MOOR_API int moor_signal_wait(int signum, int64_t deadline);

/* Run fn(arg) on a worker thread while the calling fiber waits and the executor serves all
 * other fibers (from plain code, the call runs the executor meanwhile); store fn's return
 * value in *result (if not NULL). Suspends the calling fiber.
 *
 * The call never returns while fn may still use arg, so arg may point into the caller's
 * stack. The deadline and cancellation bound only the wait for a worker to start fn: a call
 * still queued when the deadline passes or the fiber is cancelled is withdrawn, and fn never
 * runs. Once fn has started, the call waits until fn returns, however long that takes, and
 * then returns 0 with its result even if the deadline passed or the fiber was cancelled
 * meanwhile: it happened, nothing is lost. A deadline is therefore no bound on fn itself.
 *
 * Returns 0; -ETIMEDOUT or -ECANCELED (fn did not run); -ECANCELED in a forked child for a
 * call that the parent's workers held (fn may have started in the parent; nothing in the
 * child runs it); -ENOMEM; -EAGAIN (no worker thread could be started). */
typedef intptr_t (*moor_blocking_fn)(void *arg);
MOOR_API int moor_blocking(moor_blocking_fn fn, void *arg, intptr_t *result, int64_t deadline);

/* ------------------------------------------------------------------------------------------
 * Channels
 *
 * A channel carries values of a fixed size between fibers of one executor, in order. With
 * capacity 0 a send waits for a receiver (rendezvous); with capacity N it waits only when N
 * values are buffered. Waiters are served first-come first-served. After moor_chan_close,
 * receivers still drain what is buffered, then get -EPIPE; senders get -EPIPE; fibers waiting
 * at the close are woken. Values are copied (elem_size bytes).
 * ---------------------------------------------------------------------------------------- */

typedef struct moor_chan moor_chan;

/* Errors: -ENOMEM, -EINVAL (elem_size 0). */
MOOR_API int moor_chan_new(moor_chan **out, size_t elem_size, size_t capacity);
/* Free a channel. Misuse: a fiber still waits on it. */
MOOR_API void moor_chan_free(moor_chan *ch);
/* Misuse: closing twice. */
MOOR_API void moor_chan_close(moor_chan *ch);

/* May suspend. Return 0, -EPIPE (closed; for recv: closed and drained), -ETIMEDOUT,
 * -ECANCELED. */
MOOR_API int moor_chan_send(moor_chan *ch, const void *elem, int64_t deadline);
MOOR_API int moor_chan_recv(moor_chan *ch, void *elem, int64_t deadline);
/* Never suspend: 0, -EAGAIN (would wait), -EPIPE. */
MOOR_API int moor_chan_try_send(moor_chan *ch, const void *elem);
MOOR_API int moor_chan_try_recv(moor_chan *ch, void *elem);
/* Buffered values now. */
MOOR_API size_t moor_chan_len(const moor_chan *ch);

/* A send or receive as a future (for moor_select and the combinators): output 0, -EPIPE,
 * -ETIMEDOUT. `elem` must stay valid until it is done or cancelled. Caller owned; must not
 * move once polled. */
typedef struct moor_chan_future {
    moor_future base;     /* public: poll, await, select this */
    moor_chan *chan;      /* read-only */
    void *elem;           /* private */
    moor__waiter waiter;     /* private */
    moor__deadline deadline; /* private */
} moor_chan_future;

MOOR_API void moor_chan_send_init(moor_chan_future *op, moor_chan *ch, const void *elem, int64_t deadline);
MOOR_API void moor_chan_recv_init(moor_chan_future *op, moor_chan *ch, void *elem, int64_t deadline);

/* ------------------------------------------------------------------------------------------
 * Channels across executors
 *
 * A moor_xchan is a channel whose senders and receivers may be fibers of different executors
 * (one executor per thread), or plain code on any thread (see below). The semantics are
 * moor_chan's: values of a fixed size, copied; capacity 0 is a rendezvous (a send completes
 * only when a receiver takes the value), capacity N buffers N; FIFO among the senders and
 * among the receivers that wait; close, deadlines, cancellation and the try_ variants as
 * above. Every value is received exactly once, or its send reports failure: a deadline or a
 * cancel that races with a counterpart on another thread either takes back the whole
 * operation or reports it done (a value received is returned even to a cancelled fiber).
 *
 * It is the cross-thread path: a lock inside the channel, the value copied under it, and the
 * other side woken with moor_waker_wake (thread-safe). Between fibers of one executor,
 * moor_chan is several times cheaper (bench_cores: xchan_local_round_trip_ns beside
 * chan_round_trip_ns).
 *
 * Ownership and lifetime. A channel belongs to no executor: any thread may make it, use it
 * and free it, and it outlives the executors of the threads that used it (an executor that
 * made it may be freed while others go on with it). Free it once no operation waits on it
 * and no future of it is pending, whoever made it: freeing it while a send, receive or future
 * is queued on it is misuse (assertion). An executor cannot be freed while one of its fibers
 * waits on a channel (moor_executor_free's rule); a counterpart that completes a wait just as
 * the waiter's executor finishes wakes nothing (wakers of a finished task or a freed executor
 * are no-ops). A thread without an executor (a worker of a callback library, say) may use
 * every call but the futures: a send or receive that has to wait blocks the thread on a
 * condition variable of the channel, until a counterpart completes it or the deadline passes.
 *
 * In moor_select (and moor_race, moor_await_deadline), a channel future competes with the
 * select's other futures on its own thread: a counterpart on another thread cannot claim
 * the select, so it wakes the future, which takes the value (or hands it over) when its select
 * polls it, if no other future has won by then. Such a future is therefore served when polled,
 * not in FIFO order with the plain waiters, and two selects on different threads never meet
 * over a rendezvous channel (capacity 0): each waits for a counterpart that is not a select
 * (or for its deadline). Give a channel between selects of two threads a capacity of 1 or
 * more. Futures awaited alone (moor_await, moor_block_on, moor_spawn_future) wait in FIFO
 * order and are completed by the counterpart directly.
 * ---------------------------------------------------------------------------------------- */

typedef struct moor_xchan moor_xchan;

/* A new channel, owned by no executor; any thread. Errors: -EINVAL (elem_size 0, or
 * elem_size * capacity overflows), -ENOMEM. */
MOOR_API int moor_xchan_new(moor_xchan **out, size_t elem_size, size_t capacity);
/* Free a channel (NULL is fine); any thread. Buffered values are dropped. Misuse: an
 * operation still waits on it, or a future of it is pending. */
MOOR_API void moor_xchan_free(moor_xchan *ch);
/* Close: waiting senders get -EPIPE; receivers drain what is buffered, then get -EPIPE; later
 * sends get -EPIPE. Any thread; never suspends. Misuse: closing twice. */
MOOR_API void moor_xchan_close(moor_xchan *ch);

/* May suspend (from plain code: run the executor meanwhile; on a thread without an executor:
 * block the thread). Return 0, -EPIPE (closed; for recv: closed and drained), -ETIMEDOUT,
 * -ECANCELED (the fiber was cancelled: nothing was sent or received). */
MOOR_API int moor_xchan_send(moor_xchan *ch, const void *elem, int64_t deadline);
MOOR_API int moor_xchan_recv(moor_xchan *ch, void *elem, int64_t deadline);
/* Never suspend, any thread: 0, -EAGAIN (would wait), -EPIPE. */
MOOR_API int moor_xchan_try_send(moor_xchan *ch, const void *elem);
MOOR_API int moor_xchan_try_recv(moor_xchan *ch, void *elem);
/* Buffered values now (stale as soon as it returns, if other threads use the channel). */
MOOR_API size_t moor_xchan_len(moor_xchan *ch);

/* A send or receive as a future (for moor_select and the combinators; see above for how a
 * select is served): output 0, -EPIPE, -ETIMEDOUT. `elem` must stay valid until it is done
 * or cancelled: a counterpart on another thread reads or writes it until then. Caller owned;
 * must not move once polled; polled and cancelled on one thread (misuse otherwise). Moor's
 * deadlock detection never counts a wait on it as a deadlock: another thread may end it. */
typedef struct moor_xchan_future {
    moor_future base;        /* public: poll, await, select this */
    moor_xchan *chan;        /* read-only */
    void *elem;              /* private */
    int send;                /* private */
    int queued;              /* private: in the channel's queue (under its lock) */
    int done;                /* private, atomic: a counterpart finished it; output in outcome */
    int woken;               /* private: woken since its last poll (select waiters) */
    int thread;              /* private: a thread without an executor waits on it */
    intptr_t outcome;        /* private: written by the counterpart before done */
    moor_executor *ex;       /* private: the executor that polls it, NULL before */
    moor__node node;         /* private: in the channel's senders or receivers */
    moor_waker waker;        /* private: who to wake (under the channel's lock) */
    struct moor__claim *claim; /* private: its select's claim, or NULL */
    const void *slot;        /* private: its slot in that select */
    moor__deadline deadline; /* private */
} moor_xchan_future;

MOOR_API void moor_xchan_send_init(moor_xchan_future *op, moor_xchan *ch, const void *elem,
                                   int64_t deadline);
MOOR_API void moor_xchan_recv_init(moor_xchan_future *op, moor_xchan *ch, void *elem,
                                   int64_t deadline);

/* ------------------------------------------------------------------------------------------
 * Synchronisation between fibers of one executor. Caller-owned structs, initialised with
 * their _INIT macro (all zero but a semaphore's permits); all waits are FIFO and take a
 * deadline; they return 0, -ETIMEDOUT or -ECANCELED. Each object belongs to the executor of
 * the thread that first uses it: using it from another thread (setting an event from a worker
 * thread, say) is misuse and fails an assertion; other threads reach fibers through
 * moor_spawn_remote or moor_waker_wake.
 * ---------------------------------------------------------------------------------------- */

/* A mutex with FIFO hand-off: unlock gives the lock to the first waiter, so nobody barges
 * in ahead of a fiber that has waited. */
typedef struct moor_mutex {
    moor_fiber *owner;  /* read-only: holder, or NULL (or the plain code marker) */
    int locked;         /* read-only */
    moor__list waiters; /* private */
    moor_executor *ex;  /* private: bound at first use */
} moor_mutex;
#define MOOR_MUTEX_INIT {.ex = NULL}
MOOR_API int moor_mutex_lock(moor_mutex *m, int64_t deadline);
MOOR_API int moor_mutex_trylock(moor_mutex *m); /* 0 or -EBUSY */
/* Misuse: unlocking a mutex that is not locked, or from another fiber than its owner. */
MOOR_API void moor_mutex_unlock(moor_mutex *m);

/* A condition variable. wait unlocks m, waits for a signal and locks m again before it
 * returns, whatever it returns. */
typedef struct moor_cond {
    moor__list waiters; /* private */
    moor_executor *ex;  /* private: bound at first use */
} moor_cond;
#define MOOR_COND_INIT {.ex = NULL}
MOOR_API int moor_cond_wait(moor_cond *c, moor_mutex *m, int64_t deadline);
MOOR_API void moor_cond_signal(moor_cond *c);
MOOR_API void moor_cond_broadcast(moor_cond *c);

/* A counting semaphore; release hands a permit to the first waiter. */
typedef struct moor_sem {
    size_t permits;     /* read-only */
    moor__list waiters; /* private */
    moor_executor *ex;  /* private: bound at first use */
} moor_sem;
#define MOOR_SEM_INIT(n) {.permits = (n)}
MOOR_API int moor_sem_acquire(moor_sem *s, int64_t deadline);
MOOR_API int moor_sem_try_acquire(moor_sem *s); /* 0 or -EAGAIN */
MOOR_API void moor_sem_release(moor_sem *s);

/* A wait group: wait returns once the count is back at zero. */
typedef struct moor_waitgroup {
    size_t count;       /* read-only */
    moor__list waiters; /* private */
    moor_executor *ex;  /* private: bound at first use */
} moor_waitgroup;
#define MOOR_WAITGROUP_INIT {.ex = NULL}
MOOR_API void moor_waitgroup_add(moor_waitgroup *wg, size_t n);
/* Misuse: more done than add. */
MOOR_API void moor_waitgroup_done(moor_waitgroup *wg);
MOOR_API int moor_waitgroup_wait(moor_waitgroup *wg, int64_t deadline);

/* A one-shot event: once set, every wait returns at once. */
typedef struct moor_event {
    int set;            /* read-only */
    moor__list waiters; /* private */
    moor_executor *ex;  /* private: bound at first use */
} moor_event;
#define MOOR_EVENT_INIT {.ex = NULL}
MOOR_API void moor_event_set(moor_event *e);
MOOR_API int moor_event_wait(moor_event *e, int64_t deadline);

/* ------------------------------------------------------------------------------------------
 * Select and combinators. Each is a call that may suspend (from plain code it runs the
 * executor); the futures passed in are caller owned and left done or cancelled.
 * ---------------------------------------------------------------------------------------- */

/* Wait until one of the futures is ready; return its index (its output is in its result)
 * and cancel the others cleanly. At most one of several channel operations, locks or
 * permits completes. Returns -ETIMEDOUT (all cancelled) or -ECANCELED. */
MOOR_API int moor_select(moor_future **futs, size_t n, int64_t deadline);

/* The output of whichever future is ready first (its index in *winner if not NULL); the
 * others are cancelled. -ETIMEDOUT, -ECANCELED as moor_select. */
MOOR_API intptr_t moor_race(moor_future **futs, size_t n, size_t *winner, int64_t deadline);

/* Await all of them at once: 0 when all are done (outputs in their results). On -ETIMEDOUT
 * or -ECANCELED the unfinished ones are cancelled (moor_future_done tells which finished). */
MOOR_API int moor_await_all(moor_future **futs, size_t n, int64_t deadline);

/* moor_await with a deadline (from plain code too): fut's output, or -ETIMEDOUT with fut
 * cancelled. */
MOOR_API intptr_t moor_await_deadline(moor_future *fut, int64_t deadline);

/* The classic retryable future: make(arg, attempt) returns a fresh future for attempt 1,
 * 2, ... (it may reuse one slot: the previous attempt is done by then). An attempt whose
 * output is >= 0 ends it; a negative output is retried after a backoff (backoff_ms, doubled
 * each time) up to `attempts` attempts. The output is the last attempt's; -ETIMEDOUT when
 * the deadline passes before an attempt ends it (the attempt in flight is cancelled, and no
 * new one starts; an attempt found finished when the retry is polled counts, as a ready
 * future wins a select); -ENOMEM if make returned NULL.
 * A future itself: await it, select on it or spawn it. Caller owned; must not move once polled. */
typedef moor_future *(*moor_retry_make)(void *arg, unsigned attempt);

typedef struct moor_retry_future {
    moor_future base;       /* public */
    moor_retry_make make;   /* private */
    void *arg;              /* private */
    unsigned attempts;      /* private */
    unsigned attempt;       /* read-only: attempts started so far */
    int64_t backoff_ms;     /* private */
    moor_future *current;   /* private: the attempt in flight, NULL while backing off */
    int pausing;            /* private */
    moor_sleep_future pause; /* private: the backoff */
    moor__deadline deadline; /* private */
} moor_retry_future;

MOOR_API void moor_retry_init(moor_retry_future *rf, moor_retry_make make, void *arg,
                              unsigned attempts, int64_t backoff_ms, int64_t deadline);
/* moor_retry_init and wait for it. */
MOOR_API intptr_t moor_retry(moor_retry_make make, void *arg, unsigned attempts,
                             int64_t backoff_ms, int64_t deadline);

#ifdef __cplusplus
}
#endif

#endif /* MOOR_H */
