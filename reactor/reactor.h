/* The reactor: an executor's libev loop and what hangs off it. It installs itself as the
 * executor's driver (park/unpark) when something first needs a loop, or when the
 * application attaches the executor to a loop it runs. */
#ifndef MOOR_REACTOR_REACTOR_H
#define MOOR_REACTOR_REACTOR_H

#include <ev.h>

#include "fiber/executor.h"

typedef struct moor__reactor moor__reactor;

/* What a file above loop.c needs done at the reactor's turns. Each hook may be NULL; self is
 * what the file attached with them. */
typedef struct moor__reactor_hook_ops {
    /* Before libev looks at fds: at each park (timeout_ms is the park's, -1 for none), and
     * attached, in the prepare watcher just before the application's loop looks (-1).
     * Returns the timeout to park with: timeout_ms, or 0 if it woke a task. */
    int64_t (*before_look)(moor__reactor *r, void *self, int64_t timeout_ms);
    /* The unpark async fired: another thread, or a signal handler, sent it. */
    void (*unparked)(moor__reactor *r, void *self);
    /* In a forked child, before the loop registers its fds again. */
    void (*after_fork)(moor__reactor *r, void *self);
    /* At the reactor's teardown, while its loop still runs; in the reverse order of the ids. */
    void (*free)(moor__reactor *r, void *self);
} moor__reactor_hook_ops;

/* The hooks, in the order they are called (and the reverse of their freeing). */
enum moor__reactor_hook_id {
    MOOR__REACTOR_HOOK_SIGNAL = 0, /* signal.c: the signals caught for this reactor */
    MOOR__REACTOR_HOOKS
};

typedef struct moor__reactor_hook {
    const moor__reactor_hook_ops *ops; /* NULL: not attached */
    void *self;
} moor__reactor_hook;

/* What the reactor knows of one fd number (io.c). */
typedef struct moor__fd {
    moor_io_future *waiters; /* io futures whose watcher is started on it: moor_close wakes them */
    uint32_t nread, nwrite;  /* how many of them wait for reading, for writing */
    unsigned seen_iter;      /* ev_iteration() when moor last changed its watchers on it */
    uint8_t seen_mask;       /* libev's registration of it as of its last look before then:
                                EV_READ|EV_WRITE bits, or MOOR__FD_SEEN_SET if a watcher
                                started since makes libev register it again at its next look */
    uint8_t flags;           /* MOOR__FD_* */
} moor__fd;

/* The file behind the number is the one moor made (accept, connect, listen); moor hears of
 * its close (moor_close), but not of a plain close(). */
#define MOOR__FD_OWNED 0x1u
/* ...and a watcher for it was started with EV__IOFDSET since: later waits start their watcher
 * without it, so that libev does not register the fd again (an epoll_ctl per wait). If the
 * fd was closed with plain close() and the number reused, that is stale: the wait goes on
 * the reactor's check list and is checked once it has lasted. */
#define MOOR__FD_LIVE 0x2u
/* Hints, kept for LIVE fds only: a short read means the receive buffer was emptied (the next
 * read would fail with EAGAIN), a short write that the send buffer is full. The next call
 * then waits first, but only if starting that wait makes libev do no system call at all, so
 * that a stale hint can only leave a wait unregistered, which the check catches. */
#define MOOR__FD_DRAINED 0x4u
#define MOOR__FD_FULL 0x8u

#define MOOR__FD_SEEN_SET 0xffu

/* Waits on the check list are checked once they have lasted from one epoch boundary to the
 * next. A repeating timer marks the boundaries while waits are listed, this far apart (ms;
 * closer only when the loop runs late) and ends a park, so a wait is checked after 10-20 ms
 * at the next park (later while the executor runs tasks without a park, or when more waits
 * than io.c checks per epoch are due). */
#define MOOR__CHECK_EPOCH_MS 10

struct moor__reactor {
    struct ev_loop *loop;
    moor_executor *ex;
    int owned;            /* moor made the loop (and destroys it) */
    ev_async unpark;      /* other threads end a park, or wake an attached executor; signal
                             handlers send it too (signal.c) */
    ev_timer park_timer;  /* bounds a park by the next timer deadline */
    ev_prepare prepare;   /* attached: run tasks before the loop blocks */
    ev_idle idle;         /* attached: keeps the loop from blocking while tasks are runnable */
    int holds_ref;        /* attached: one loop reference held while any task is pending */
    moor__reactor_hook hooks[MOOR__REACTOR_HOOKS];
    int64_t accept_backoff_until; /* after EMFILE/ENFILE, accepts wait until then (ms) */
    moor__fd *fds;        /* per fd number (io.c) */
    size_t nfds;
    /* Waits whose registration is to be checked (fcntl, then registered again) once they
     * have lasted, oldest first: those that started without registering their fd (LIVE), and
     * in debug builds all, so that a plain close() under a waiter is reported. */
    moor_io_future *check_head, **check_tail;
    ev_timer check_timer; /* unreferenced; repeats while waits are listed: epoch boundaries */
    uint32_t epoch;       /* epoch boundaries passed */
    int check_due;        /* a boundary has passed since the last check */
#ifndef NDEBUG
    /* Debug builds: fds whose waits started since libev last looked at fds, checked before
     * it looks again, so that a plain close() in between is reported rather than aborting
     * in libev (epoll_ctl: EBADF). */
    int *fresh;
    size_t nfresh, capfresh;
#endif
};

/* The entry of fd, growing the table as needed; NULL if it cannot grow (or fd < 0). */
moor__fd *moor__reactor_fd(moor__reactor *r, int fd);
/* moor made fd: what was known of its number is forgotten; it is owned. */
void moor__reactor_fd_new(int fd);

/* Wait until fd is ready, fd having just been used by a system call that returned EAGAIN or
 * EINPROGRESS (it is open: no fcntl). As moor_wait_fd otherwise. */
int moor__wait_fd_open(int fd, int events, int64_t deadline);

/* Before libev looks at fds again (at a park; attached, before its loop looks at fds): once
 * an epoch boundary has passed, check the waits that have lasted since the one before; in
 * debug builds also those started since the last look. Returns the park's timeout, 0 if a
 * wait failed (its task is woken). */
int64_t moor__reactor_check(moor__reactor *r, int64_t timeout_ms);
/* Check every listed wait now (after fork, before the loop registers every fd again). */
void moor__reactor_check_all(moor__reactor *r);
/* The epoch timer: set up with the reactor, stopped at its teardown (io.c). */
void moor__reactor_check_timer_init(moor__reactor *r);
void moor__reactor_check_timer_stop(moor__reactor *r);

static inline int64_t moor__reactor_before_look(moor__reactor *r, int64_t timeout_ms)
{
#ifndef NDEBUG
    if (r->nfresh && !r->check_head)
        r->nfresh = 0; /* their waits are over */
    if (r->nfresh)
        return moor__reactor_check(r, timeout_ms);
#endif
    if (r->check_due)
        return moor__reactor_check(r, timeout_ms);
    return timeout_ms;
}

/* The executor's reactor in *out, made with a loop of its own if it has none. 0, or -EMFILE,
 * -ENFILE (no descriptor for the loop), -ENOMEM. */
int moor__reactor_make(moor_executor *ex, moor__reactor **out);

static inline int moor__reactor_get(moor_executor *ex, moor__reactor **out)
{
    moor__reactor *r = moor__part_get(ex, MOOR__PART_REACTOR);
    if (__builtin_expect(r != NULL, 1)) {
        *out = r;
        return 0;
    }
    return moor__reactor_make(ex, out);
}

/* Attach a file's hooks (once, at its first use of r). */
static inline void moor__reactor_hook_set(moor__reactor *r, enum moor__reactor_hook_id id,
                                          const moor__reactor_hook_ops *ops, void *self)
{
    r->hooks[id] = (moor__reactor_hook){ops, self};
}

static inline int moor__reactor_hooked(const moor__reactor *r, enum moor__reactor_hook_id id)
{
    return r->hooks[id].ops != NULL;
}

static inline void *moor__reactor_hook_self(const moor__reactor *r, enum moor__reactor_hook_id id)
{
    return r->hooks[id].self;
}

#endif
