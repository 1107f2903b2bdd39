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
typedef struct moor_fiber moor_fiber;
typedef intptr_t (*moor_fiber_fn)(void *arg);

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
    size_t blocking_threads; /* public: worker threads for moor_blocking; 0 = 4 */
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

/* From any thread: spawn a detached fiber fn(arg) on `ex`, which starts it on its own thread
 * at its next turn (waking it if it is parked). Errors: -ENOMEM. If the executor later
 * cannot map a stack for it, it says so on stderr. */
MOOR_API int moor_executor_spawn_remote(moor_executor *ex, moor_fiber_fn fn, void *arg);

/* Run tasks until none is left. Returns 0. Not from a fiber (assertion). */
MOOR_API int moor_executor_run(moor_executor *ex);

/* From plain code on a thread with an executor: run the executor until `fut` is done (other
 * tasks run meanwhile and stay where they are when it returns), and return its output.
 * Not from a fiber (assertion): a fiber uses moor_await. Errors: -ENOMEM. */
MOOR_API intptr_t moor_block_on(moor_future *fut);

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

/* A place in the executor's timer heap; embedded in futures that wait with a deadline. */
typedef struct moor_timer_node {
    int64_t deadline;  /* private */
    uint64_t seq;      /* private: ties broken first-come first-served */
    size_t index;      /* private: position in the heap; SIZE_MAX when not in it */
    moor_waker waker;  /* private */
} moor_timer_node;

/* A future that becomes ready (output 0) once moor_now() >= deadline; never earlier. Caller
 * owned; must not move once polled. Output -ENOMEM if the timer heap could not grow. */
typedef struct moor_sleep_future {
    moor_future base;     /* public: poll, await, select this */
    moor_timer_node node; /* private */
} moor_sleep_future;

MOOR_API void moor_sleep_init(moor_sleep_future *sf, int64_t deadline);

/* Suspend the calling fiber until the deadline passes; returns 0 (or -ENOMEM). From plain
 * code it runs the executor meanwhile. */
MOOR_API int moor_sleep(int64_t deadline);

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
 * the executor until the fiber is done. Returns 0, or -ECANCELED if the fiber had been
 * cancelled (its return value is still stored). Waiting in moor_join is not cut short when
 * the caller is cancelled, so a cancelled fiber can still reap its children. Misuse: joining
 * twice, joining a detached fiber or oneself. */
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

/* Cancel a fiber: the call it is waiting in, and every call that could wait that it makes
 * afterwards, return -ECANCELED (the future it waited on is cancelled cleanly), so it runs
 * its own cleanup and returns. moor_join then reports -ECANCELED. Idempotent; a no-op on a
 * fiber that has returned. Any fiber or plain code of the same thread. */
MOOR_API void moor_cancel(moor_fiber *fiber);

/* Non-zero if the calling fiber has been cancelled. */
MOOR_API int moor_cancelled(void);

/* Floating point: a fiber keeps its own rounding mode and exception masks (MXCSR and the x87
 * control word) across switches. The sticky exception flags (FE_INEXACT, FE_DIVBYZERO, ...)
 * are cleared whenever a fiber or the executor switches away, so test them with
 * fetestexcept() before the next suspension point, not after it. */

/* ------------------------------------------------------------------------------------------
 * Reactor: libev turns OS events into wakeups
 *
 * An executor gets its event loop when something first needs one (an fd wait, a signal), or
 * is attached to a loop the application already runs. Making it sets SIGPIPE to SIG_IGN if
 * it was SIG_DFL, so that a write to a peer that has gone fails with -EPIPE. File descriptors given to moor's I/O
 * calls must be non-blocking (the socket helpers make them so). Each call tries the system
 * call first and waits only on EAGAIN; the libev watcher it waits with lives inside a future
 * on the calling fiber's pinned stack. All of them may suspend; from plain code they run the
 * executor meanwhile. Errors are -errno of the system call, -ETIMEDOUT once the deadline has
 * passed, -ECANCELED in a cancelled fiber.
 * ---------------------------------------------------------------------------------------- */

struct ev_loop;

/* Run this executor inside an event loop the application owns and runs (ev_run): moor adds
 * prepare/idle/timer/async watchers (unreferenced: they do not keep ev_run alive) and runs
 * its tasks from them. Call before anything used the executor's own loop.
 * Errors: -EBUSY (the executor has a loop already), -ENOMEM. */
MOOR_API int moor_executor_attach(moor_executor *ex, struct ev_loop *loop);

/* The executor's libev loop (made now if it has none), for adapters that own watchers.
 * NULL if it could not be made. */
MOOR_API struct ev_loop *moor_executor_loop(moor_executor *ex);

/* In the child after fork(): re-arm the event loop (ev_loop_fork) and reset what other
 * threads of the parent held; blocking calls in flight in the parent's workers fail with
 * -ECANCELED in the child. */
MOOR_API void moor_executor_after_fork(moor_executor *ex);

#define MOOR_READABLE 0x1
#define MOOR_WRITABLE 0x2

/* A readiness future: output 0 once `fd` is ready for `events`, -ETIMEDOUT once `deadline`
 * passes, -ENOMEM. Caller owned; must not move once polled (its watcher is inside). */
typedef struct moor_io_future {
    moor_future base;      /* public: poll, await, select this */
    int fd;                /* read-only */
    int events;            /* read-only: MOOR_READABLE and/or MOOR_WRITABLE */
    int64_t deadline;      /* read-only */
    int fired;             /* private */
    moor_waker waker;      /* private */
    moor_timer_node node;  /* private */
    _Alignas(16) unsigned char watcher[64]; /* private: an ev_io */
} moor_io_future;

MOOR_API void moor_io_init(moor_io_future *io, int fd, int events, int64_t deadline);

/* Wait until fd is ready. Returns 0, -ETIMEDOUT, -ECANCELED, -ENOMEM. */
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

/* Close an fd and forget moor's state for it. The fds that moor makes (moor_accept,
 * moor_tcp_*, moor_unix_*) must be closed with moor_close: moor keeps them registered with
 * the event loop between waits (no system call per wait, as libev's own watchers), and must
 * hear of their close before the number is reused. Plain close() is fine for fds moor did
 * not make. No fiber may be waiting on the fd (cancel it first). Returns 0 or -errno. */
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

/* The local port a socket is bound to (after listening on port 0), or -errno. */
MOOR_API int moor_socket_port(int fd);

/* Wait for a signal (SIGTERM for a graceful shutdown, ...). While a fiber waits, the signal
 * is caught; once no fiber waits, its previous disposition is back. Returns signum,
 * -ETIMEDOUT, -ECANCELED, -EINVAL (bad signal number). */
MOOR_API int moor_signal_wait(int signum, int64_t deadline);

/* Run fn(arg) on a worker thread while the calling fiber waits and the executor serves all
 * other fibers; store its return value in *result. Returns 0, -ETIMEDOUT or -ECANCELED (fn
 * keeps running on its worker and its result is discarded; fn must not use the caller's
 * stack then), -ENOMEM, -EAGAIN (no worker thread could be started). */
typedef intptr_t (*moor_blocking_fn)(void *arg);
MOOR_API int moor_blocking(moor_blocking_fn fn, void *arg, intptr_t *result, int64_t deadline);

#ifdef __cplusplus
}
#endif

#endif /* MOOR_H */
