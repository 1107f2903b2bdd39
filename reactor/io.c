/* Readiness futures and the I/O calls built on them. Each call tries its system call first
 * and waits only on EAGAIN, with an ev_io that lives inside a moor_io_future on the calling
 * fiber's stack.
 *
 * libev must never see an fd that is not open: it asserts on a negative fd, aborts when
 * epoll_ctl says EBADF, and grows its table to any number it is given. So a wait starts its
 * watcher only on an fd known to be open: one a system call has just used (it returned
 * EAGAIN), or one fcntl(F_GETFD) has just checked (moor_wait_fd, moor_io_init). The one
 * exception is a wait on a hint (below), which is started only when libev will make no
 * system call for it at all.
 *
 * What can go stale is what moor remembers of a number across calls, since a plain close()
 * and a new fd on the same number go unseen: that the fd is registered with libev's backend
 * (MOOR__FD_LIVE), and that it is drained or full (the hints). Neither can abort (see
 * above); a stale LIVE can leave a wait unregistered. Such waits go on the reactor's check
 * list, and one that lasts 10-20 ms is checked once at a park: fcntl, and if the fd is open
 * libev registers it again (EEXIST if nothing changed), else the wait fails with -EBADF.
 * Waits on the busy path end before they are ever checked. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "fiber/assert.h"
#include "fiber/alloc.h"
#include "fiber/executor.h"
#include "reactor.h"
#include "fiber/wait.h"

/* moor_io_future.state */
enum {
    IO_NEW = 0,    /* not started: fcntl checks the fd before libev sees it */
    IO_NEW_OPEN,   /* not started: a system call has just used the fd, it is open */
    IO_NEW_HINTED, /* not started, on a hint: started without a system call if it still
                      starts quietly (starts_quietly), else as IO_NEW */
    IO_UNCHECKED,  /* watcher started without registering the fd (LIVE): on the fd's list of
                      waiters and on the check list */
    IO_WAITING,    /* watcher started, the fd registered by it or since checked; on the fd's
                      list of waiters (and in debug builds on the check list) */
    IO_READY,      /* libev reported readiness; the watcher stays started until the poll */
    IO_BADF,       /* the fd was closed under it (moor_close, or found closed): -EBADF */
    IO_FAILED,     /* libev could not watch the fd (epoll_ctl failed, say ENOMEM): -ENOMEM */
};

/* Debug builds check every wait every 10-20 ms while it lasts, and every wait before libev
 * first looks at its fd, to report a plain close() under a waiter. */
#ifdef NDEBUG
#define CHECK_ALL 0
#else
#define CHECK_ALL 1
#endif

/* At most so many waits are checked at each epoch boundary (two system calls each). */
#define CHECKS_PER_EPOCH 64u

static inline ev_io *watcher_of(moor_io_future *io) { return (ev_io *)(void *)io->watcher; }

static inline int ev_events_of(int events)
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

static inline uint8_t watched_mask(const moor__fd *e)
{
    return (uint8_t)((e->nread ? EV_READ : 0) | (e->nwrite ? EV_WRITE : 0));
}

/* Before moor changes its watchers on the fd: at the first change since libev's last look,
 * the mask as it stands is what libev registered then. */
static inline void fd_touch(moor__reactor *r, moor__fd *e)
{
    unsigned it = ev_iteration(r->loop);
    if (e->seen_iter != it) {
        e->seen_iter = it;
        e->seen_mask = watched_mask(e);
    }
}

/* Starting a watcher for `events` now, without EV__IOFDSET, leaves libev nothing to tell
 * the kernel at its next look. */
static inline int starts_quietly(moor__reactor *r, const moor__fd *e, int events)
{
    if (!(e->flags & MOOR__FD_LIVE))
        return 0;
    uint8_t mask = watched_mask(e);
    uint8_t seen = e->seen_iter == ev_iteration(r->loop) ? e->seen_mask : mask;
    return (mask | events) == seen;
}

static void fd_link(moor__reactor *r, moor__fd *e, moor_io_future *io, int events)
{
    fd_touch(r, e);
    io->fd_next = e->waiters;
    if (e->waiters)
        e->waiters->fd_prev = &io->fd_next;
    io->fd_prev = &e->waiters;
    e->waiters = io;
    e->nread += (events & EV_READ) != 0;
    e->nwrite += (events & EV_WRITE) != 0;
}

static void fd_unlink(moor__reactor *r, moor__fd *e, moor_io_future *io, int events)
{
    fd_touch(r, e);
    *io->fd_prev = io->fd_next;
    if (io->fd_next)
        io->fd_next->fd_prev = io->fd_prev;
    e->nread -= (events & EV_READ) != 0;
    e->nwrite -= (events & EV_WRITE) != 0;
}

/* ---- the check list -------------------------------------------------------------------------- */

static void on_check_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    moor__reactor *r = w->data;
    r->epoch++;
    r->check_due = 1;
    if (!r->check_head) { /* nothing listed for a whole epoch: rest */
        ev_ref(loop);
        ev_timer_stop(loop, w);
    }
}

void moor__reactor_check_timer_init(moor__reactor *r)
{
    ev_timer_init(&r->check_timer, on_check_timer, MOOR__CHECK_EPOCH_MS / 1000.,
                  MOOR__CHECK_EPOCH_MS / 1000.);
    r->check_timer.data = r;
}

void moor__reactor_check_timer_stop(moor__reactor *r)
{
    if (ev_is_active(&r->check_timer)) {
        ev_ref(r->loop);
        ev_timer_stop(r->loop, &r->check_timer);
    }
}

static void check_push(moor__reactor *r, moor_io_future *io)
{
    if (!ev_is_active(&r->check_timer)) {
        /* Unreferenced: it must not keep an application's ev_run going by itself. */
        ev_timer_again(r->loop, &r->check_timer);
        ev_unref(r->loop);
    }
    io->epoch = r->epoch;
    io->check_next = NULL;
    io->check_prev = r->check_tail;
    *r->check_tail = io;
    r->check_tail = &io->check_next;
}

static void check_remove(moor__reactor *r, moor_io_future *io)
{
    if (!io->check_prev)
        return;
    *io->check_prev = io->check_next;
    if (io->check_next)
        io->check_next->check_prev = io->check_prev;
    else
        r->check_tail = io->check_prev;
    io->check_prev = NULL;
}

/* ---- the future -------------------------------------------------------------------------- */

/* A started future leaves the fd's waiters and the check list; its watcher stops. */
static void io_detach(moor__reactor *r, moor_io_future *io)
{
    ev_io *w = watcher_of(io);
    fd_unlink(r, &r->fds[io->fd], io, ev_events_of(io->events));
    check_remove(r, io);
    ev_io_stop(r->loop, w); /* a no-op if libev stopped it itself (EV_ERROR) */
}

/* Complete a waiting future without readiness (state IO_BADF or IO_FAILED) and wake it. */
static void io_fail(moor__reactor *r, moor_io_future *io, int state)
{
    io_detach(r, io);
    io->state = state;
    moor__wake(&io->waker);
}

static void on_ready(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    moor_io_future *io = w->data;
    moor__reactor *r = (moor__reactor *)moor__part_get(moor__tls_executor, MOOR__PART_REACTOR);
    if (revents & EV_ERROR) {
        /* epoll_ctl failed (ENOMEM, ENOSPC: fs.epoll.max_user_watches) and libev stopped every
         * watcher of the fd. Failing the wait, rather than retrying it, cannot spin. */
        r->fds[io->fd].flags &= (uint8_t)~MOOR__FD_LIVE;
        io_fail(r, io, IO_FAILED);
        return;
    }
    /* The watcher stays active until the future completes, inside its fiber's run: that run
     * usually starts the fd's next wait before the loop looks at fds again, and libev turns
     * a stop and a start between two looks into no epoll_ctl at all. (Stopped here, the fd
     * could be looked at with no watcher in between, and re-added on every message.) Until
     * then level-triggered epoll may report it again: the wake is idempotent. */
    if (io->state == IO_WAITING || io->state == IO_UNCHECKED) {
        io->state = IO_READY;
        check_remove(r, io); /* reported: its registration works */
    }
    moor__wake(&io->waker);
}

#ifndef NDEBUG
static void note_fresh(moor__reactor *r, int fd)
{
    if (r->nfresh && r->fresh[r->nfresh - 1] == fd)
        return;
    if (r->nfresh == r->capfresh) {
        size_t cap = r->capfresh ? 2 * r->capfresh : 64;
        int *nv = moor__realloc(r->fresh, cap * sizeof *nv);
        if (!nv)
            return; /* not checked early: only the report is lost */
        r->fresh = nv;
        r->capfresh = cap;
    }
    r->fresh[r->nfresh++] = fd;
}
#endif

/* Start the watcher: 0, or the future's error. */
static int io_start(moor_io_future *io, moor_executor *ex)
{
    if (io->fd < 0)
        return -EBADF;
    moor__reactor *r;
    int rc = moor__reactor_get(ex, &r);
    if (rc < 0)
        return rc;
    int events = ev_events_of(io->events);
    moor__fd *e = (size_t)io->fd < r->nfds ? &r->fds[io->fd] : NULL;
    int quiet = io->state == IO_NEW_HINTED && e && starts_quietly(r, e, events);
    if ((io->state == IO_NEW || io->state == IO_NEW_HINTED) && !quiet &&
        fcntl(io->fd, F_GETFD) < 0)
        return -EBADF; /* not open: libev must not see it */
    if (!e && !(e = moor__reactor_fd(r, io->fd)))
        return -ENOMEM;
    ev_io *w = watcher_of(io);
    int live = (e->flags & MOOR__FD_LIVE) != 0;
    fd_link(r, e, io, events);
    if (live) {
        w->fd = io->fd; /* no EV__IOFDSET: registered already, or checked later */
        w->events = events;
    } else {
        ev_io_set(w, io->fd, events);
        e->seen_mask = MOOR__FD_SEEN_SET;
        if (e->flags & MOOR__FD_OWNED)
            e->flags |= MOOR__FD_LIVE;
    }
    w->data = io;
    ev_io_start(r->loop, w);
    io->state = live ? IO_UNCHECKED : IO_WAITING;
    if (live || CHECK_ALL)
        check_push(r, io);
#ifndef NDEBUG
    note_fresh(r, io->fd);
#endif
    return 0;
}

/* Done or dropped: out of every list, the watcher and the timer stopped. */
static void io_stop(moor_io_future *io, moor_executor *ex)
{
    if (io->state == IO_UNCHECKED || io->state == IO_WAITING || io->state == IO_READY)
        io_detach(moor__part_get(ex, MOOR__PART_REACTOR), io);
    io->state = IO_NEW;
    moor__deadline_disarm(&io->node);
}

static moor_poll io_poll(moor_future *fut, moor_cx *cx)
{
    moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    moor_executor *ex = cx->waker.ex;
    /* Its watcher is in one executor's loop: polled from another thread, or by another
     * executor once started, it would race with that loop. */
    moor__assert(ex && ex == moor__tls_executor && (!io->waker.ex || io->waker.ex == ex),
                 "wait on fd %d polled from another thread than its executor's", io->fd);
    int rc;
    if (io->state == IO_READY) {
        rc = 0;
    } else if (io->state == IO_BADF || io->state == IO_FAILED) {
        rc = io->state == IO_BADF ? -EBADF : -ENOMEM;
    } else if (io->deadline >= 0 && moor_now() >= io->deadline) {
        rc = -ETIMEDOUT;
    } else {
        io->waker = cx->waker;
        int started = io->state == IO_UNCHECKED || io->state == IO_WAITING;
        if (started || (rc = io_start(io, ex)) == 0) {
            if ((io->node.at = io->deadline, moor__deadline_arm(&io->node, &cx->waker)) == 0)
                return MOOR_PENDING;
            rc = -ENOMEM;
        }
    }
    io_stop(io, ex);
    fut->result = rc;
    return MOOR_READY;
}

static moor_poll io_cancel(moor_future *fut)
{
    moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    int state = io->state;
    io_stop(io, moor__tls_executor);
    io->waker = (moor_waker){0}; /* as if fresh: any executor may start it again */
    if (state == IO_BADF || state == IO_FAILED) { /* it had completed: say how */
        fut->result = state == IO_BADF ? -EBADF : -ENOMEM;
        return MOOR_READY;
    }
    return MOOR_PENDING; /* readiness is level-triggered: the next wait sees it again */
}

static const moor_future_ops io_ops = {"fd wait", io_poll, io_cancel};

void moor_io_init(moor_io_future *io, int fd, int events, int64_t deadline)
{
    moor_future_init(&io->base, &io_ops, 0);
    io->fd = fd;
    io->events = events;
    io->deadline = deadline;
    io->state = IO_NEW;
    io->epoch = 0;
    io->waker = (moor_waker){0};
    io->fd_next = NULL;
    io->fd_prev = NULL;
    io->check_next = NULL;
    io->check_prev = NULL;
    moor__deadline_init(&io->node, -1);
    ev_init(watcher_of(io), on_ready); /* inactive until the first poll */
}

static int wait_fd(int fd, int events, int64_t deadline, int state)
{
    moor_io_future io;
    moor_io_init(&io, fd, events, deadline);
    io.state = state;
    return (int)moor__wait(&io.base);
}

int moor_wait_fd(int fd, int events, int64_t deadline)
{
    return wait_fd(fd, events, deadline, IO_NEW);
}

int moor__wait_fd_open(int fd, int events, int64_t deadline)
{
    return wait_fd(fd, events, deadline, IO_NEW_OPEN);
}

/* ---- checking waits that have lasted --------------------------------------------------------- */

/* The fd of a waiting future is found closed: its waiters fail with -EBADF (debug builds say
 * so: moor_close would have woken them) and what moor knew of the number is forgotten. */
static void fd_found_closed(moor__reactor *r, int fd)
{
#ifndef NDEBUG
    fprintf(stderr, "moor: fd %d was closed while a fiber waited on it (close such fds with "
                    "moor_close); the wait fails with -EBADF\n", fd);
#endif
    moor__fd *e = &r->fds[fd];
    e->flags = 0;
    while (e->waiters)
        io_fail(r, e->waiters, IO_BADF);
}

/* Is the fd still open, and is the file now behind the number registered? Returns 1 if it
 * completed the wait. */
static int check_wait(moor__reactor *r, moor_io_future *io)
{
    check_remove(r, io);
    if (fcntl(io->fd, F_GETFD) < 0) {
        fd_found_closed(r, io->fd);
        return 1;
    }
    if (io->state == IO_UNCHECKED) {
        /* Open: libev registers it again. The kernel says EEXIST if the file is the one that
         * was registered (nothing changes); if the number names another file now, that one
         * is added. */
        moor__fd *e = &r->fds[io->fd];
        ev_io *w = watcher_of(io);
        int events = w->events & (EV_READ | EV_WRITE);
        fd_touch(r, e);
        ev_io_stop(r->loop, w);
        ev_io_set(w, io->fd, events);
        ev_io_start(r->loop, w);
        e->seen_mask = MOOR__FD_SEEN_SET;
        io->state = IO_WAITING;
    }
    if (CHECK_ALL)
        check_push(r, io); /* and again while it lasts */
    return 0;
}

int64_t moor__reactor_check(moor__reactor *r, int64_t timeout_ms)
{
    int completed = 0;
#ifndef NDEBUG
    for (size_t i = 0; i < r->nfresh; i++) {
        int fd = r->fresh[i];
        if (r->fds[fd].waiters && fcntl(fd, F_GETFD) < 0) {
            fd_found_closed(r, fd);
            completed = 1;
        }
    }
    r->nfresh = 0;
#endif
    if (r->check_due) {
        r->check_due = 0;
        moor_io_future *io;
        /* Listed in order: those listed two boundaries ago have lasted >= 10 ms since. At
         * most so many per epoch, so that an overloaded server, whose waits all last, pays
         * a bounded price (the rest wait for the next boundaries). */
        for (unsigned n = 0; n < CHECKS_PER_EPOCH && (io = r->check_head) &&
                             r->epoch - io->epoch >= 2;
             n++)
            completed |= check_wait(r, io);
    }
    return completed ? 0 : timeout_ms;
}

void moor__reactor_check_all(moor__reactor *r)
{
    size_t n = 0; /* those listed now: debug builds list a checked wait again */
    for (moor_io_future *io = r->check_head; io; io = io->check_next)
        n++;
    while (n-- && r->check_head)
        check_wait(r, r->check_head);
}

/* ---- the calls ------------------------------------------------------------------------- */

moor__fd *moor__reactor_fd(moor__reactor *r, int fd)
{
    if (fd < 0)
        return NULL;
    if ((size_t)fd < r->nfds)
        return &r->fds[fd];
    size_t n = r->nfds ? r->nfds : 64;
    while (n <= (size_t)fd)
        n *= 2;
    moor__fd *nv = moor__realloc(r->fds, n * sizeof *nv);
    if (!nv)
        return NULL;
    memset(nv + r->nfds, 0, (n - r->nfds) * sizeof *nv);
    /* The lists of waiters point into the table: move their heads' back links. */
    for (size_t i = 0; i < r->nfds; i++)
        if (nv[i].waiters)
            nv[i].waiters->fd_prev = &nv[i].waiters;
    r->fds = nv;
    r->nfds = n;
    return &nv[fd];
}

void moor__reactor_fd_new(int fd)
{
    moor_executor *ex = moor__tls_executor;
    moor__reactor *r;
    if (!ex || moor__reactor_get(ex, &r) < 0)
        return; /* no state: the fd only misses what the hints would save */
    moor__fd *e = moor__reactor_fd(r, fd);
    if (e)
        e->flags = MOOR__FD_OWNED;
}

/* Before a stream call: if the last one said the fd was drained (reading) or full (writing),
 * wait for readiness now instead of paying a system call to learn it; but only where that
 * wait costs libev no system call either, and where the call's own result decides otherwise:
 * with no time left, and in a cancelled fiber (which still gets data or room that is there).
 * Returns 0 or the wait's error. */
static inline int wait_if_hinted(int fd, int events, unsigned hint, int64_t deadline)
{
    moor_executor *ex = moor__tls_executor;
    moor__reactor *r = ex ? moor__part_get(ex, MOOR__PART_REACTOR) : NULL;
    if (!r || fd < 0 || (size_t)fd >= r->nfds || !(r->fds[fd].flags & hint))
        return 0;
    moor__fd *e = &r->fds[fd];
    e->flags &= (uint8_t)~hint;
    if ((ex->current && ex->current->cancelled) || !starts_quietly(r, e, ev_events_of(events)) ||
        (deadline >= 0 && moor_now() >= deadline))
        return 0;
    return wait_fd(fd, events, deadline, IO_NEW_HINTED);
}

/* After a stream call that moved n of len bytes on fd. */
static inline void note_hint(int fd, unsigned hint, ssize_t n, size_t len)
{
    if (n <= 0 || (size_t)n >= len)
        return;
    moor_executor *ex = moor__tls_executor;
    moor__reactor *r = ex ? moor__part_get(ex, MOOR__PART_REACTOR) : NULL;
    if (r && (size_t)fd < r->nfds && (r->fds[fd].flags & MOOR__FD_LIVE))
        r->fds[fd].flags |= (uint8_t)hint;
}

static size_t iov_len(const struct iovec *iov, int iovcnt)
{
    size_t len = 0;
    for (int i = 0; i < iovcnt; i++)
        len += iov[i].iov_len;
    return len;
}

/* The result of a system call that may need to wait: retry after EINTR, wait for
 * readiness after EAGAIN (returns 1 to try again), else the result or -errno. */
static inline int must_wait(ssize_t r, int fd, int events, int64_t deadline, ssize_t *out)
{
    if (r >= 0) {
        *out = r;
        return 0;
    }
    if (errno == EINTR)
        return 1;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
        *out = -errno;
        return 0;
    }
    int w = moor__wait_fd_open(fd, events, deadline);
    if (w < 0) {
        *out = w;
        return 0;
    }
    return 1;
}

/* The stream calls, one function for all six: a hinted wait, then the system call (retried
 * after EINTR, and after a wait on EAGAIN), then a new hint. Inlined into each call, where
 * `op` is a constant. */
typedef enum stream_op { OP_READ, OP_WRITE, OP_READV, OP_WRITEV, OP_RECV, OP_SEND } stream_op;

static inline ssize_t stream_syscall(stream_op op, int fd, void *buf, size_t len,
                                     const struct iovec *iov, int iovcnt, int flags)
{
    switch (op) {
    case OP_READ:
        return read(fd, buf, len);
    case OP_WRITE:
        return write(fd, buf, len);
    case OP_READV:
        return readv(fd, iov, iovcnt);
    case OP_WRITEV:
        return writev(fd, iov, iovcnt);
    case OP_RECV:
        return recv(fd, buf, len, flags);
    case OP_SEND:
        /* MSG_NOSIGNAL: a peer that went away is -EPIPE, not a SIGPIPE that kills the process. */
        return send(fd, buf, len, flags | MSG_NOSIGNAL);
    }
    return -1;
}

static inline __attribute__((always_inline)) ssize_t
stream_call(stream_op op, int fd, void *buf, size_t len, const struct iovec *iov, int iovcnt,
            int flags, int64_t deadline)
{
    int reading = op == OP_READ || op == OP_READV || op == OP_RECV;
    int events = reading ? MOOR_READABLE : MOOR_WRITABLE;
    unsigned hint = reading ? MOOR__FD_DRAINED : MOOR__FD_FULL;
    ssize_t out;
    int w = wait_if_hinted(fd, events, hint, deadline);
    if (w < 0)
        return w;
    while (must_wait(stream_syscall(op, fd, buf, len, iov, iovcnt, flags), fd, events, deadline,
                     &out))
        ;
    note_hint(fd, hint, out, iov ? iov_len(iov, iovcnt) : len);
    moor__coop_spend();
    return out;
}

ssize_t moor_read(int fd, void *buf, size_t len, int64_t deadline)
{
    return stream_call(OP_READ, fd, buf, len, NULL, 0, 0, deadline);
}

ssize_t moor_write(int fd, const void *buf, size_t len, int64_t deadline)
{
    return stream_call(OP_WRITE, fd, (void *)buf, len, NULL, 0, 0, deadline);
}

ssize_t moor_readv(int fd, const struct iovec *iov, int iovcnt, int64_t deadline)
{
    return stream_call(OP_READV, fd, NULL, 0, iov, iovcnt, 0, deadline);
}

ssize_t moor_writev(int fd, const struct iovec *iov, int iovcnt, int64_t deadline)
{
    return stream_call(OP_WRITEV, fd, NULL, 0, iov, iovcnt, 0, deadline);
}

ssize_t moor_recv(int fd, void *buf, size_t len, int flags, int64_t deadline)
{
    return stream_call(OP_RECV, fd, buf, len, NULL, 0, flags, deadline);
}

ssize_t moor_send(int fd, const void *buf, size_t len, int flags, int64_t deadline)
{
    return stream_call(OP_SEND, fd, (void *)buf, len, NULL, 0, flags, deadline);
}

/* Datagrams: a short datagram says nothing about the queue, so no hints. */
ssize_t moor_recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr,
                      socklen_t *addrlen, int64_t deadline)
{
    ssize_t out;
    while (must_wait(recvfrom(fd, buf, len, flags, addr, addrlen), fd, MOOR_READABLE, deadline,
                     &out))
        ;
    moor__coop_spend();
    return out;
}

ssize_t moor_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr,
                    socklen_t addrlen, int64_t deadline)
{
    ssize_t out;
    while (must_wait(sendto(fd, buf, len, flags | MSG_NOSIGNAL, addr, addrlen), fd, MOOR_WRITABLE,
                     deadline, &out))
        ;
    moor__coop_spend();
    return out;
}

int moor_close(int fd)
{
    moor_executor *ex = moor__tls_executor;
    moor__reactor *r = ex ? moor__part_get(ex, MOOR__PART_REACTOR) : NULL;
    if (r && fd >= 0 && (size_t)fd < r->nfds) {
        moor__fd *e = &r->fds[fd];
        /* Before the number can be reused: its waiters fail, even one whose readiness was
         * reported and that has not run yet, so that none acts on the next file. */
        while (e->waiters)
            io_fail(r, e->waiters, IO_BADF);
        e->flags = 0;
    }
    /* Not retried on EINTR: on Linux the fd is gone either way. */
    return close(fd) < 0 && errno != EINTR ? -errno : 0;
}

ssize_t moor_write_all(int fd, const void *buf, size_t len, size_t *written, int64_t deadline)
{
    const char *p = buf;
    size_t done = 0;
    while (done < len) {
        ssize_t n = moor_write(fd, p + done, len - done, deadline);
        if (n < 0) {
            if (written)
                *written = done;
            return n;
        }
        done += (size_t)n;
    }
    if (written)
        *written = done;
    return (ssize_t)done;
}
