/* The fd table (fd.c): what the reactor knows of each fd number, the io futures waiting on
 * it, and the watchers that turn its readiness into their wakes. io.c builds the io future
 * and the I/O calls on it; socket.c tells it of the fds moor makes. */
#ifndef MOOR_REACTOR_FD_H
#define MOOR_REACTOR_FD_H

#include "reactor.h"

/* What the reactor knows of one fd number. */
typedef struct moor__fd {
    moor__list waiters;      /* io futures whose watcher is started on it (fd_link): moor_close
                                wakes them */
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
 * the check list and is checked once it has lasted. */
#define MOOR__FD_LIVE 0x2u
/* Hints, kept for LIVE fds only: a short read means the receive buffer was emptied (the next
 * read would fail with EAGAIN), a short write that the send buffer is full. The next call
 * then waits first, but only if starting that wait makes libev do no system call at all, so
 * that a stale hint can only leave a wait unregistered, which the check catches. */
#define MOOR__FD_DRAINED 0x4u
#define MOOR__FD_FULL 0x8u

#define MOOR__FD_SEEN_SET 0xffu

/* moor_io_future.state: where a wait stands with the fd table and libev. io.c starts a
 * future in one of the NEW states, which say what is known of the fd; fd.c moves it on. */
enum moor__io_state {
    MOOR__IO_NEW = 0,    /* not started: fcntl checks the fd before libev sees it */
    MOOR__IO_NEW_OPEN,   /* not started: a system call has just used the fd, it is open */
    MOOR__IO_NEW_HINTED, /* not started, on a hint: started without a system call if it still
                            starts quietly (moor__fd_starts_quietly), else as MOOR__IO_NEW */
    MOOR__IO_UNCHECKED,  /* watcher started without registering the fd (LIVE): on the fd's
                            list of waiters and on the check list */
    MOOR__IO_WAITING,    /* watcher started, the fd registered by it or since checked; on the
                            fd's list of waiters (and in debug builds on the check list) */
    MOOR__IO_READY,      /* libev reported readiness; the watcher stays started until the poll */
    MOOR__IO_BADF,       /* the fd was closed under it (moor_close, or found closed): -EBADF */
    MOOR__IO_FAILED,     /* libev could not watch the fd (epoll_ctl failed, say ENOMEM) */
};

/* Waits on the check list are checked once they have lasted from one epoch boundary to the
 * next. A repeating timer marks the boundaries while waits are listed, this far apart (ms;
 * closer only when the loop runs late) and ends a park, so a wait is checked after 10-20 ms
 * at the next park (later while the executor runs tasks without a park, or when more waits
 * than fd.c checks per epoch are due). */
#define MOOR__CHECK_EPOCH_MS 10

/* A reactor's fd table: made at the first wait (or the first fd moor makes), hooked on the
 * reactor as MOOR__REACTOR_HOOK_FD, freed with it. */
typedef struct moor__fd_table {
    moor__reactor *reactor;
    moor__fd *fds;        /* per fd number, grown on demand */
    size_t nfds;
    /* Waits whose registration is to be checked (fcntl, then registered again) once they
     * have lasted, oldest first: those that started without registering their fd (LIVE), and
     * in debug builds all, so that a plain close() under a waiter is reported. */
    moor__list check;     /* moor_io_future.check_link */
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
} moor__fd_table;

/* The executor's fd table, NULL if it has none yet. */
static inline moor__fd_table *moor__fd_table_of(const moor_executor *ex)
{
    moor__reactor *r = moor__part_get(ex, MOOR__PART_REACTOR);
    return r ? (moor__fd_table *)moor__reactor_hook_self(r, MOOR__REACTOR_HOOK_FD) : NULL;
}

/* The executor's fd table in *out, made (with the reactor) if it has none. 0, or -EMFILE,
 * -ENFILE (no descriptor for the loop), -ENOMEM. */
int moor__fd_table_make(moor_executor *ex, moor__fd_table **out);

static inline int moor__fd_table_get(moor_executor *ex, moor__fd_table **out)
{
    moor__fd_table *t = moor__fd_table_of(ex);
    if (__builtin_expect(t != NULL, 1)) {
        *out = t;
        return 0;
    }
    return moor__fd_table_make(ex, out);
}

/* MOOR_READABLE/MOOR_WRITABLE as libev's EV_READ/EV_WRITE. */
static inline int moor__ev_events(int events)
{
    return ((events & MOOR_READABLE) ? EV_READ : 0) | ((events & MOOR_WRITABLE) ? EV_WRITE : 0);
}

/* ---- what libev has registered -------------------------------------------------------------
 *
 * libev looks at changed fds once per loop iteration (fd_reify) and then counts the
 * iteration (ev_iteration). A watcher started without EV__IOFDSET on an fd whose combined
 * events are what libev registered at its last look changes nothing: libev makes no system
 * call for it, whatever the number names now. moor tracks that per fd from its own watchers
 * (the fds moor waits on are moor's while it waits on them). */

static inline uint8_t moor__fd_watched_mask(const moor__fd *e)
{
    return (uint8_t)((e->nread ? EV_READ : 0) | (e->nwrite ? EV_WRITE : 0));
}

/* Starting a watcher for `ev_events` (EV_READ/EV_WRITE) now, without EV__IOFDSET, leaves
 * libev nothing to tell the kernel at its next look. */
static inline int moor__fd_starts_quietly(const moor__fd_table *t, const moor__fd *e,
                                          int ev_events)
{
    if (!(e->flags & MOOR__FD_LIVE))
        return 0;
    uint8_t mask = moor__fd_watched_mask(e);
    uint8_t seen = e->seen_iter == ev_iteration(t->reactor->loop) ? e->seen_mask : mask;
    return (mask | ev_events) == seen;
}

/* ---- the hints, for the stream calls (io.c) ---------------------------------------------- */

/* If fd has `hint` (MOOR__FD_DRAINED or MOOR__FD_FULL), take it off: 1 if a wait for
 * `events` would then start quietly (the call waits before its system call), else 0. */
static inline int moor__fd_hint_take(moor_executor *ex, int fd, unsigned hint, int events)
{
    moor__fd_table *t = ex ? moor__fd_table_of(ex) : NULL;
    if (!t || fd < 0 || (size_t)fd >= t->nfds || !(t->fds[fd].flags & hint))
        return 0;
    moor__fd *e = &t->fds[fd];
    e->flags &= (uint8_t)~hint;
    return moor__fd_starts_quietly(t, e, moor__ev_events(events));
}

/* Give fd `hint`, if libev has it registered (LIVE). */
static inline void moor__fd_hint_give(moor_executor *ex, int fd, unsigned hint)
{
    moor__fd_table *t = ex ? moor__fd_table_of(ex) : NULL;
    if (t && fd >= 0 && (size_t)fd < t->nfds && (t->fds[fd].flags & MOOR__FD_LIVE))
        t->fds[fd].flags |= (uint8_t)hint;
}

/* ---- the watchers ---------------------------------------------------------------------- */

/* moor made fd (this thread's executor): what was known of its number is forgotten; it is
 * owned. */
void moor__fd_new(int fd);

/* Start io's watcher on its fd (io->fd >= 0, io->state one of the NEW states, io->waker
 * set): its state becomes MOOR__IO_UNCHECKED or MOOR__IO_WAITING, and readiness makes it
 * MOOR__IO_READY and wakes io->waker. 0, or -EBADF (the fd is not open), -ENOMEM. */
int moor__fd_watch(moor__fd_table *t, moor_io_future *io);

/* io's watcher is started: it is among its fd's waiters, maybe on the check list. */
static inline int moor__io_watched(const moor_io_future *io)
{
    return io->state == MOOR__IO_UNCHECKED || io->state == MOOR__IO_WAITING ||
           io->state == MOOR__IO_READY;
}

/* Stop io's watcher (moor__io_watched): io leaves the fd's waiters and the check list. Its
 * state is left for the caller to reset. */
void moor__fd_unwatch(moor__fd_table *t, moor_io_future *io);

#endif
