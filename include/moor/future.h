/*
 * moor/future.h — the future, waker and claim API: for people writing their own futures and
 * adapters (a callback library made awaitable, a combinator). Included by moor.h; include
 * moor.h, not this file.
 *
 * Its last section holds the private layouts that moor's caller-owned structs embed (a
 * moor_mutex's wait queue, a sleep's deadline): they are here only so those structs have a
 * size. Their fields are moor's.
 */
#ifndef MOOR_FUTURE_H
#define MOOR_FUTURE_H

#ifndef MOOR_H
#error "include <moor.h>, which includes <moor/future.h>"
#endif

/* ------------------------------------------------------------------------------------------
 * Futures, wakers, contexts
 *
 * A future is a caller-owned struct with an ops table. The executor (or moor_await) calls
 * ops->poll: the future either finishes, stores its output in `result` and returns
 * MOOR_READY, or arranges for cx->waker to be woken when it can make progress and returns
 * MOOR_PENDING. A future that has returned PENDING once must not move (the C form of Rust's
 * Pin) unless it carries MOOR_UNPIN: every poll and cancel of a pending future checks its
 * address (a compare, under a nanosecond) and aborts with a message naming it if it moved.
 *
 * Embed a moor_future as the first member or anywhere in your own struct and recover the
 * outer struct in poll with moor_container_of.
 * ---------------------------------------------------------------------------------------- */

typedef enum moor_poll { MOOR_PENDING = 0, MOOR_READY = 1 } moor_poll;

/* A handle that makes a task runnable again. It is a task plus the generation the task had
 * when the handle was made: waking a task that has since finished (and whose slot may hold a
 * new task) is a harmless no-op, and waking a task twice queues it once. Plain data: copy it
 * freely. A zeroed waker is valid and wakes nothing. */
typedef struct moor_waker {
    moor_executor *ex; /* private */
    moor_task *task;   /* private */
    uint64_t gen;      /* private: 0 means no task */
} moor_waker;

/* A select's one-winner token, private to moor: see moor_cx_claim. */
struct moor__claim;

/* What a poll receives: the waker of the task being polled, and, inside a select, which
 * select and which of its slots the poll speaks for (claim NULL outside a select).
 *
 * A future that wraps others (a retry, a timeout of your own, an adapter) passes the cx it was
 * given down unchanged to the inner future whose completion is its own: the inner future then
 * claims the select on the wrapper's behalf, and the select sees the wrapper win. An inner
 * future whose completion must not count as a win (a helper timer) is polled with a copy of cx
 * whose claim is NULL. */
typedef struct moor_cx {
    moor_waker waker;  /* read-only */
    struct moor__claim *claim; /* read-only */
    const void *slot;  /* private: the select's own future this poll is made for */
} moor_cx;

/* For a future about to take something in its poll: 1 if it may (its select, if any, is now
 * won by its slot), 0 if the select was won by another future (take nothing, return PENDING
 * or let the select cancel it). Outside a select always 1. */
MOOR_API int moor_cx_claim(const moor_cx *cx);

/* The ops of a future type. Both ops run on the thread of the executor that polls the
 * future. Of the moor_future they are given they may write `result` (the output, when they
 * return MOOR_READY) and read `data` and `flags`; `ops`, `state` and `pinned_at` belong to
 * moor_future_poll/moor_future_cancel, which call the ops and keep the state. Everything
 * else in the outer struct (found with moor_container_of) is the type's own. */
typedef struct moor_future_ops {
    /* Short description for diagnostics ("sleep", "read", "countdown"). */
    const char *label;
    /* Make progress. On completion set self->result and return MOOR_READY; otherwise store
     * cx->waker where the event source will find it and return MOOR_PENDING. A future that
     * takes something (a value, a lock) asks moor_cx_claim(cx) first; one that wraps others
     * passes cx down (see moor_cx). */
    moor_poll (*poll)(moor_future *self, moor_cx *cx);
    /* Called once if the future is dropped while pending: unregister wakers and watchers and
     * release what the future holds, and return MOOR_PENDING (result is not read). If it
     * turns out to have completed already (a counterpart handed it a value it must not
     * lose), set self->result and return MOOR_READY instead: the future then counts as done.
     * May be NULL if there is nothing to undo. */
    moor_poll (*cancel)(moor_future *self);
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

/* Drop a pending future: calls its cancel op once. Returns MOOR_READY if the future had in
 * fact completed (its output is in fut->result and it is done), else MOOR_PENDING; then it is
 * as if freshly initialised. No-op (MOOR_PENDING) on a future that was never polled, and
 * MOOR_READY on one that is done. */
MOOR_API moor_poll moor_future_cancel(moor_future *fut);

/* Non-zero once the future has returned MOOR_READY. */
MOOR_API int moor_future_done(const moor_future *fut);

/* Make the waker's task runnable. Idempotent; a no-op for a finished task, a zeroed waker,
 * or a task whose executor has been freed (an executor's memory is kept for reuse, never
 * given back, so a late wake from another thread finds it dead and does nothing). Callable
 * from any thread: from a thread that is not the task's, the wake is handed to the task's
 * executor, which is woken from its park. */
MOOR_API void moor_waker_wake(const moor_waker *waker);

/* ------------------------------------------------------------------------------------------
 * Describing a future type: for moor_dump, and for deadlock detection
 *
 * moor_dump names what a task waits on by its future's ops->label. A type may say more by
 * registering a kind for its ops table (once per process, typically from its init function
 * or a constructor): describe writes the label with its argument ("read fd 7",
 * "chan recv 0x55d0c2a0"), and its return value says whether only tasks of the executor
 * that polls the future can complete it (MOOR_WAIT_LOCAL: a channel, a lock, a join). When
 * every task of an executor waits on such futures, nothing is runnable, no timer is queued
 * and nothing else can feed the executor, moor_executor_run and moor_block_on report a
 * deadlock (see moor_executor_hold). A type that returns 0, has no kind, or has no describe
 * is never taken for a deadlock: its waker may have gone to another thread or a callback.
 *
 * (The describe is not a field of moor_future_ops so that existing ops tables, initialised
 * by position, stay complete.)
 * ---------------------------------------------------------------------------------------- */

#define MOOR_WAIT_LOCAL 1

typedef struct moor_future_kind {
    const moor_future_ops *ops; /* public: the type described */
    /* public: may be NULL (the label alone). Write a NUL-terminated description of the
     * pending future `self` into buf (size bytes, at least 32) and return MOOR_WAIT_LOCAL if
     * only a task of the polling executor can complete it now, else 0. With size 0 (buf
     * NULL) only the answer is wanted: write nothing (snprintf(NULL, 0, ...) is fine),
     * and keep it cheap, as the run loop asks when it goes idle. It may run in a
     * signal handler (moor_dump_on_sigquit) while the future's task runs elsewhere: read
     * `self` only, take no lock, allocate nothing; snprintf is not async-signal-safe by
     * POSIX (glibc's is for integer and string conversions). */
    int (*describe)(const moor_future *self, char *buf, size_t size);
    struct moor_future_kind *next; /* private */
} moor_future_kind;

/* Register `kind` (static storage: it is linked into a process-wide list and never
 * unlinked). Registering the same kind again is a no-op; the first kind registered for an
 * ops table wins. Any thread, any time; lock-free. */
MOOR_API void moor_future_kind_register(moor_future_kind *kind);

/* ------------------------------------------------------------------------------------------
 * Promises: how a callback library is made awaitable
 *
 * A promise is a one-shot value handed from a callback (the resolver, on any thread) to a
 * fiber or plain code of one executor (the awaiter). The pattern, whole:
 *
 *     static void on_reply(void *arg, int status, void *reply)      (the library's callback)
 *     {
 *         moor_promise_resolve(arg, status < 0 ? status : (intptr_t)reply);
 *     }
 *     ...
 *     moor_promise *p;
 *     if (moor_promise_new(&p, free_reply) < 0)
 *         return -ENOMEM;
 *     lib_request(..., on_reply, p);                     (the library holds the resolver's half)
 *     intptr_t r = moor_promise_await(p, deadline);      (the awaiter's half, let go on return)
 *
 * Ownership, in two sentences: moor_promise_new allocates the promise on the heap holding two
 * references, the awaiter's (dropped when moor_promise_await returns, or by moor_promise_drop
 * after a moor_promise_future, or instead of awaiting) and the resolver's (dropped by the one
 * moor_promise_resolve); it is freed when both are gone, so a callback that comes after the
 * awaiter has given up (cancelled, timed out, its stack long reused) touches only the
 * promise, which frees the value it was given with the promise's drop function. The awaiter's half belongs to the executor of the
 * thread that made the promise, and moor_executor_free fails an assertion while any awaiter's
 * half is held; the resolver's half may outlive the executor (its resolve then only frees).
 * ---------------------------------------------------------------------------------------- */

typedef struct moor_promise moor_promise;

/* A new promise on the calling thread's executor. drop (may be NULL) frees a value that no
 * awaiter received: resolved after the awaiter gave up, or never awaited. Errors: -ENOMEM. */
MOOR_API int moor_promise_new(moor_promise **out, void (*drop)(intptr_t value));

/* Resolve with value (a negative value is an error code by convention) and drop the
 * resolver's half. Any thread, at most once: a second resolve while the awaiter still holds
 * the promise is refused with -EALREADY (value untouched, not dropped); after both halves
 * are gone the pointer dangles like any freed one. Returns 0, or -EALREADY. Never blocks
 * for long (a short lock), never suspends, never calls back into the library. */
MOOR_API int moor_promise_resolve(moor_promise *p, intptr_t value);

/* Await the value and drop the awaiter's half: the value, or -ETIMEDOUT / -ECANCELED (the
 * awaiter gave up; a value resolved later is dropped). May suspend; from plain code it runs
 * the executor. A value that was already there is returned even in a cancelled fiber. */
MOOR_API intptr_t moor_promise_await(moor_promise *p, int64_t deadline);

/* The awaiter's half as a future, for select and the combinators: output the value. The
 * future borrows the promise: once it is done or cancelled, drop the awaiter's half with
 * moor_promise_drop (a value it received is the caller's; one that lands after a cancel is
 * dropped with the promise's drop function). Caller owned; must not move once polled. */
typedef struct moor_promise_future {
    moor_future base;      /* public: poll, await, select this */
    moor_promise *promise; /* private */
} moor_promise_future;

MOOR_API void moor_promise_future_init(moor_promise_future *pf, moor_promise *p);

/* Drop the awaiter's half without awaiting it, or after its future is done or cancelled.
 * A value that no awaiter received (now or later) is dropped. From the awaiter's thread. */
MOOR_API void moor_promise_drop(moor_promise *p);

/* ------------------------------------------------------------------------------------------
 * Private layouts (moor__ names): storage for caller-owned structs. Do not touch.
 * ---------------------------------------------------------------------------------------- */

/* Private layouts, embedded in caller-owned structs: an intrusive list, and a place in a
 * FIFO wait queue of moor's synchronisation objects. */
typedef struct moor__node {
    struct moor__node *prev, *next;
} moor__node;

typedef struct moor__list {
    moor__node *head, *tail;
} moor__list;

typedef struct moor__waiter {
    moor__node node;
    moor_waker waker;
    struct moor__claim *claim;
    const void *slot;
    int state; /* MOOR__WAITER_IDLE, _QUEUED or _DONE (fiber/wait.h) */
} moor__waiter;

/* Private layout: a deadline (-1: none) and its place in the executor's timer heap;
 * embedded in futures that wait with a deadline. */
typedef struct moor__deadline {
    int64_t at;
    uint64_t seq;      /* ties broken first-come first-served */
    size_t index;      /* position in the heap; SIZE_MAX when not in it */
    moor_waker waker;
} moor__deadline;

#endif /* MOOR_FUTURE_H */
