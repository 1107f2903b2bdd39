/* The fd table: per fd number, the io futures waiting on it and what moor knows of it (its
 * OWNED/LIVE flags and the DRAINED/FULL hints); starting and stopping an io future's watcher
 * on it; the libev callback that turns readiness into the waiting task's wake; the check
 * list that catches waits on fds closed behind moor's back; and moor_close, which fails the
 * fd's waiters before the number can be reused. The io future itself and the calls built on
 * it are io.c's.
 *
 * libev must never see an fd that is not open: it asserts on a negative fd, aborts when
 * epoll_ctl says EBADF, and grows its table to any number it is given. So a watcher starts
 * only on an fd known to be open: one a system call has just used (it returned EAGAIN), or
 * one fcntl(F_GETFD) has just checked (moor_wait_fd, moor_io_init). The one exception is a
 * wait on a hint, which is started only when libev will make no system call for it at all.
 *
 * What can go stale is what moor remembers of a number across calls, since a plain close()
 * and a new fd on the same number go unseen: that the fd is registered with libev's backend
 * (MOOR__FD_LIVE), and that it is drained or full (the hints). Neither can abort (see
 * above); a stale LIVE can leave a wait unregistered. Such waits go on the check list, and
 * one that lasts 10-20 ms is checked once at a park: fcntl, and if the fd is open libev
 * registers it again (EEXIST if nothing changed), else the wait fails with -EBADF. Waits on
 * the busy path end before they are ever checked. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "fiber/alloc.h"
#include "fiber/assert.h"
#include "fd.h"

_Static_assert(sizeof(ev_io) <= sizeof(((moor_io_future *)0)->watcher),
               "moor_io_future.watcher must hold an ev_io");

/* Debug builds check every wait every 10-20 ms while it lasts, and every wait before libev
 * first looks at its fd, to report a plain close() under a waiter. */
#ifdef NDEBUG
#define CHECK_ALL 0
#else
#define CHECK_ALL 1
#endif

/* At most so many waits are checked at each epoch boundary (two system calls each). */
#define CHECKS_PER_EPOCH 64u
/* A wait is checked once this many epoch boundaries have passed since it was listed: it has
 * lasted at least one whole epoch. */
#define CHECK_AFTER_EPOCHS 2u

static inline ev_io *watcher_of(moor_io_future *io) { return (ev_io *)(void *)io->watcher; }

static inline moor_io_future *io_of(ev_io *w)
{
    return moor_container_of(w, moor_io_future, watcher);
}

/* ---- the table --------------------------------------------------------------------------- */

/* The entry of fd, growing the table as needed; NULL if it cannot grow (or fd < 0). */
static moor__fd *fd_get(moor__fd_table *t, int fd)
{
    if (fd < 0)
        return NULL;
    if ((size_t)fd < t->nfds)
        return &t->fds[fd];
    size_t old = t->nfds;
    if (moor__grow(&t->fds, &t->nfds, (size_t)fd + 1, sizeof *t->fds) < 0)
        return NULL;
    /* (No waiter points into the table: its lists are NULL-terminated at both ends.) */
    memset(t->fds + old, 0, (t->nfds - old) * sizeof *t->fds);
    return &t->fds[fd];
}

/* Before moor changes its watchers on the fd: at the first change since libev's last look,
 * the mask as it stands is what libev registered then. */
static inline void fd_touch(moor__fd_table *t, moor__fd *e)
{
    unsigned it = ev_iteration(t->reactor->loop);
    if (e->seen_iter != it) {
        e->seen_iter = it;
        e->seen_mask = moor__fd_watched_mask(e);
    }
}

static void fd_link(moor__fd_table *t, moor__fd *e, moor_io_future *io, int events)
{
    fd_touch(t, e);
    moor__list_push(&e->waiters, &io->fd_link);
    e->nread += (events & EV_READ) != 0;
    e->nwrite += (events & EV_WRITE) != 0;
}

static void fd_unlink(moor__fd_table *t, moor__fd *e, moor_io_future *io, int events)
{
    fd_touch(t, e);
    moor__list_remove(&e->waiters, &io->fd_link);
    e->nread -= (events & EV_READ) != 0;
    e->nwrite -= (events & EV_WRITE) != 0;
}

/* ---- the check list -------------------------------------------------------------------------- */

static void on_check_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    moor__fd_table *t = w->data;
    t->epoch++;
    t->check_due = 1;
    if (!t->check.head) { /* nothing listed for a whole epoch: rest */
        ev_ref(loop);
        ev_timer_stop(loop, w);
    }
}

static void check_push(moor__fd_table *t, moor_io_future *io)
{
    if (!ev_is_active(&t->check_timer)) {
        /* Unreferenced: it must not keep an application's ev_run going by itself. */
        ev_timer_again(t->reactor->loop, &t->check_timer);
        ev_unref(t->reactor->loop);
    }
    io->epoch = t->epoch;
    moor__list_push(&t->check, &io->check_link);
    io->checked = 1;
}

static moor_io_future *check_first(const moor__fd_table *t)
{
    return t->check.head ? moor_container_of(t->check.head, moor_io_future, check_link) : NULL;
}

static void check_remove(moor__fd_table *t, moor_io_future *io)
{
    if (!io->checked)
        return;
    moor__list_remove(&t->check, &io->check_link);
    io->checked = 0;
}

/* ---- the watchers ------------------------------------------------------------------------ */

void moor__fd_unwatch(moor__fd_table *t, moor_io_future *io)
{
    ev_io *w = watcher_of(io);
    fd_unlink(t, &t->fds[io->fd], io, moor__ev_events(io->events));
    check_remove(t, io);
    ev_io_stop(t->reactor->loop, w); /* a no-op if libev stopped it itself (EV_ERROR) */
}

/* Complete a watched future without readiness (state MOOR__IO_BADF or MOOR__IO_FAILED) and
 * wake it. */
static void io_fail(moor__fd_table *t, moor_io_future *io, int state)
{
    moor__fd_unwatch(t, io);
    io->state = state;
    moor__wake(&io->waker);
}

/* The wakeup path: the loop's park reports the fd, and this marks the future ready and wakes
 * its task, which polls it (io.c). */
static void on_ready(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    moor__fd_table *t = w->data;
    moor_io_future *io = io_of(w);
    if (revents & EV_ERROR) {
        /* epoll_ctl failed (ENOMEM, ENOSPC: fs.epoll.max_user_watches) and libev stopped every
         * watcher of the fd. Failing the wait, rather than retrying it, cannot spin. */
        t->fds[io->fd].flags &= (uint8_t)~MOOR__FD_LIVE;
        io_fail(t, io, MOOR__IO_FAILED);
        return;
    }
    /* The watcher stays active until the future completes, inside its fiber's run: that run
     * usually starts the fd's next wait before the loop looks at fds again, and libev turns
     * a stop and a start between two looks into no epoll_ctl at all. (Stopped here, the fd
     * could be looked at with no watcher in between, and re-added on every message.) Until
     * then level-triggered epoll may report it again: the wake is idempotent. */
    if (io->state == MOOR__IO_WAITING || io->state == MOOR__IO_UNCHECKED) {
        io->state = MOOR__IO_READY;
        check_remove(t, io); /* reported: its registration works */
    }
    moor__wake(&io->waker);
}

#ifndef NDEBUG
static void note_fresh(moor__fd_table *t, int fd)
{
    if (t->nfresh && t->fresh[t->nfresh - 1] == fd)
        return;
    if (moor__grow(&t->fresh, &t->capfresh, t->nfresh + 1, sizeof *t->fresh) < 0)
        return; /* not checked early: only the report is lost */
    t->fresh[t->nfresh++] = fd;
}
#endif

int moor__fd_watch(moor__fd_table *t, moor_io_future *io)
{
    int events = moor__ev_events(io->events);
    moor__fd *e = (size_t)io->fd < t->nfds ? &t->fds[io->fd] : NULL;
    int quiet = io->state == MOOR__IO_NEW_HINTED && e && moor__fd_starts_quietly(t, e, events);
    if ((io->state == MOOR__IO_NEW || io->state == MOOR__IO_NEW_HINTED) && !quiet &&
        fcntl(io->fd, F_GETFD) < 0)
        return -EBADF; /* not open: libev must not see it */
    if (!e && !(e = fd_get(t, io->fd)))
        return -ENOMEM;
    ev_io *w = watcher_of(io);
    int live = (e->flags & MOOR__FD_LIVE) != 0;
    fd_link(t, e, io, events);
    ev_init(w, on_ready);
    if (live) {
        w->fd = io->fd; /* no EV__IOFDSET: registered already, or checked later */
        w->events = events;
    } else {
        ev_io_set(w, io->fd, events);
        e->seen_mask = MOOR__FD_SEEN_SET;
        if (e->flags & MOOR__FD_OWNED)
            e->flags |= MOOR__FD_LIVE;
    }
    w->data = t;
    ev_io_start(t->reactor->loop, w);
    io->state = live ? MOOR__IO_UNCHECKED : MOOR__IO_WAITING;
    if (live || CHECK_ALL)
        check_push(t, io);
#ifndef NDEBUG
    note_fresh(t, io->fd);
#endif
    return 0;
}

/* ---- checking waits that have lasted --------------------------------------------------------- */

/* The fd of a waiting future is found closed: its waiters fail with -EBADF (debug builds say
 * so: moor_close would have woken them) and what moor knew of the number is forgotten. */
static void fd_found_closed(moor__fd_table *t, int fd)
{
#ifndef NDEBUG
    fprintf(stderr, "moor: fd %d was closed while a fiber waited on it (close such fds with "
                    "moor_close); the wait fails with -EBADF\n", fd);
#endif
    moor__fd *e = &t->fds[fd];
    e->flags = 0;
    while (e->waiters.head)
        io_fail(t, moor_container_of(e->waiters.head, moor_io_future, fd_link), MOOR__IO_BADF);
}

/* Is the fd still open, and is the file now behind the number registered? Returns 1 if it
 * completed the wait. */
static int check_wait(moor__fd_table *t, moor_io_future *io)
{
    check_remove(t, io);
    if (fcntl(io->fd, F_GETFD) < 0) {
        fd_found_closed(t, io->fd);
        return 1;
    }
    if (io->state == MOOR__IO_UNCHECKED) {
        /* Open: libev registers it again. The kernel says EEXIST if the file is the one that
         * was registered (nothing changes); if the number names another file now, that one
         * is added. */
        moor__fd *e = &t->fds[io->fd];
        ev_io *w = watcher_of(io);
        int events = w->events & (EV_READ | EV_WRITE);
        fd_touch(t, e);
        ev_io_stop(t->reactor->loop, w);
        ev_io_set(w, io->fd, events);
        ev_io_start(t->reactor->loop, w);
        e->seen_mask = MOOR__FD_SEEN_SET;
        io->state = MOOR__IO_WAITING;
    }
    if (CHECK_ALL)
        check_push(t, io); /* and again while it lasts */
    return 0;
}

/* Once an epoch boundary has passed, check the waits that have lasted since the one before;
 * in debug builds also those started since libev's last look. Returns the park's timeout, 0
 * if a wait failed (its task is woken). */
static int64_t check(moor__fd_table *t, int64_t timeout_ms)
{
    int completed = 0;
#ifndef NDEBUG
    for (size_t i = 0; i < t->nfresh; i++) {
        int fd = t->fresh[i];
        if (t->fds[fd].waiters.head && fcntl(fd, F_GETFD) < 0) {
            fd_found_closed(t, fd);
            completed = 1;
        }
    }
    t->nfresh = 0;
#endif
    if (t->check_due) {
        t->check_due = 0;
        moor_io_future *io;
        /* Listed in order: those listed two boundaries ago have lasted >= 10 ms since. At
         * most so many per epoch, so that an overloaded server, whose waits all last, pays
         * a bounded price (the rest wait for the next boundaries). */
        for (unsigned n = 0; n < CHECKS_PER_EPOCH && (io = check_first(t)) &&
                             t->epoch - io->epoch >= CHECK_AFTER_EPOCHS;
             n++)
            completed |= check_wait(t, io);
    }
    return completed ? 0 : timeout_ms;
}

/* ---- the table's hooks on the reactor ------------------------------------------------------ */

static int64_t table_before_look(moor__reactor *r, void *self, int64_t timeout_ms)
{
    (void)r;
    moor__fd_table *t = self;
#ifndef NDEBUG
    if (t->nfresh && !t->check.head)
        t->nfresh = 0; /* their waits are over */
    if (t->nfresh)
        return check(t, timeout_ms);
#endif
    if (t->check_due)
        return check(t, timeout_ms);
    return timeout_ms;
}

/* Check every listed wait now: the loop is about to register every fd again. */
static void table_after_fork(moor__reactor *r, void *self)
{
    (void)r;
    moor__fd_table *t = self;
    size_t n = 0; /* those listed now: debug builds list a checked wait again */
    for (const moor__node *node = t->check.head; node; node = node->next)
        n++;
    while (n-- && t->check.head)
        check_wait(t, check_first(t));
}

static void table_free(moor__reactor *r, void *self)
{
    moor__fd_table *t = self;
    if (ev_is_active(&t->check_timer)) {
        ev_ref(r->loop);
        ev_timer_stop(r->loop, &t->check_timer);
    }
    moor__reactor_hook_set(r, MOOR__REACTOR_HOOK_FD, NULL, NULL);
    moor__free(t->fds);
#ifndef NDEBUG
    moor__free(t->fresh);
#endif
    moor__free(t);
}

static const moor__reactor_hook_ops table_hooks = {table_before_look, NULL, table_after_fork,
                                                   table_free};

int moor__fd_table_make(moor_executor *ex, moor__fd_table **out)
{
    moor__reactor *r;
    int rc = moor__reactor_get(ex, &r);
    if (rc < 0)
        return rc;
    moor__fd_table *t = moor__reactor_hook_self(r, MOOR__REACTOR_HOOK_FD);
    if (!t) {
        t = moor__alloc(sizeof *t);
        if (!t)
            return -ENOMEM;
        memset(t, 0, sizeof *t);
        t->reactor = r;
        ev_timer_init(&t->check_timer, on_check_timer, MOOR__CHECK_EPOCH_MS / 1000.,
                      MOOR__CHECK_EPOCH_MS / 1000.);
        t->check_timer.data = t;
        moor__reactor_hook_set(r, MOOR__REACTOR_HOOK_FD, &table_hooks, t);
    }
    *out = t;
    return 0;
}

/* ---- fds moor makes and closes --------------------------------------------------------- */

void moor__fd_new(int fd)
{
    moor_executor *ex = moor__tls_executor;
    moor__fd_table *t;
    if (!ex || moor__fd_table_get(ex, &t) < 0)
        return; /* no state: the fd only misses what the hints would save */
    moor__fd *e = fd_get(t, fd);
    if (e)
        e->flags = MOOR__FD_OWNED;
}

int moor_close(int fd)
{
    moor_executor *ex = moor__tls_executor;
    moor__fd_table *t = ex ? moor__fd_table_of(ex) : NULL;
    if (t && fd >= 0 && (size_t)fd < t->nfds) {
        moor__fd *e = &t->fds[fd];
        /* Before the number can be reused: its waiters fail, even one whose readiness was
         * reported and that has not run yet, so that none acts on the next file. */
        while (e->waiters.head)
            io_fail(t, moor_container_of(e->waiters.head, moor_io_future, fd_link),
                    MOOR__IO_BADF);
        e->flags = 0;
    }
    /* Not retried on EINTR: on Linux the fd is gone either way. */
    return close(fd) < 0 && errno != EINTR ? -errno : 0;
}
