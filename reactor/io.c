/* Readiness futures and the I/O calls built on them. Each call tries its system call first
 * and waits only on EAGAIN, with an ev_io that lives inside a moor_io_future on the calling
 * fiber's stack. */
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "fiber/assert.h"
#include "fiber/alloc.h"
#include "fiber/fiber.h"
#include "reactor.h"

static inline ev_io *watcher_of(moor_io_future *io) { return (ev_io *)(void *)io->watcher; }

static void on_ready(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop, (void)revents;
    moor_io_future *io = w->data;
    /* The watcher stays active until the future completes, inside its fiber's run: that run
     * usually starts the fd's next wait before the loop looks at fds again, and libev turns
     * a stop and a start between two looks into no epoll_ctl at all. (Stopped here, the fd
     * could be looked at with no watcher in between, and re-added on every message.) Until
     * then level-triggered epoll may report it again: the wake is idempotent. */
    io->fired = 1;
    moor_waker_wake(&io->waker);
}

static void io_stop(moor_io_future *io, moor_executor *ex)
{
    moor__reactor *r = ex->reactor;
    if (r && ev_is_active(watcher_of(io)))
        ev_io_stop(r->loop, watcher_of(io));
    moor__timer_remove(&ex->timers, &io->node);
}

static moor_poll io_poll(moor_future *fut, moor_cx *cx)
{
    moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    moor_executor *ex = cx->waker.ex;
    if (io->fired) {
        io_stop(io, ex);
        fut->result = 0;
        return MOOR_READY;
    }
    if (io->deadline >= 0 && moor_now() >= io->deadline) {
        io_stop(io, ex);
        fut->result = -ETIMEDOUT;
        return MOOR_READY;
    }
    io->waker = cx->waker;
    ev_io *w = watcher_of(io);
    if (!ev_is_active(w)) {
        moor__reactor *r;
        int rc = moor__reactor_get(ex, &r);
        if (rc < 0) {
            fut->result = rc;
            return MOOR_READY;
        }
        int events = ((io->events & MOOR_READABLE) ? EV_READ : 0) |
                     ((io->events & MOOR_WRITABLE) ? EV_WRITE : 0);
        uint8_t *st = (size_t)io->fd < r->nfd_hints ? &r->fd_hints[io->fd] : NULL;
        if (st && (*st & MOOR__FD_LIVE)) {
            /* Same file as when it was registered (moor would have heard of its close): no
             * EV__IOFDSET, so libev does not register it with the backend again. */
            w->fd = io->fd;
            w->events = events;
        } else {
            ev_io_set(w, io->fd, events);
            if (st && (*st & MOOR__FD_OWNED))
                *st |= MOOR__FD_LIVE;
        }
        w->data = io;
        ev_io_start(r->loop, w);
    }
    if (moor__timer_arm(&ex->timers, &io->node, io->deadline, &cx->waker) < 0) {
        io_stop(io, ex);
        fut->result = -ENOMEM;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static moor_poll io_cancel(moor_future *fut)
{
    moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    io_stop(io, moor__tls_executor);
    return MOOR_PENDING; /* readiness is level-triggered: the next wait sees it again */
}

static const moor_future_ops io_ops = {"fd wait", io_poll, io_cancel};

void moor_io_init(moor_io_future *io, int fd, int events, int64_t deadline)
{
    moor_future_init(&io->base, &io_ops, 0);
    io->fd = fd;
    io->events = events;
    io->deadline = deadline;
    io->fired = 0;
    io->waker = (moor_waker){0};
    moor__timer_node_init(&io->node);
    ev_init(watcher_of(io), on_ready); /* inactive until the first poll */
}

int moor_wait_fd(int fd, int events, int64_t deadline)
{
    moor_io_future io;
    moor_io_init(&io, fd, events, deadline);
    return (int)moor__wait(&io.base);
}

/* ---- the calls ------------------------------------------------------------------------- */

/* The state byte of fd, growing the table as needed; NULL if it cannot grow (then no state
 * is kept, which only costs the system calls it saves). */
uint8_t *moor__reactor_fd(moor__reactor *r, int fd)
{
    if (fd < 0)
        return NULL;
    if ((size_t)fd < r->nfd_hints)
        return &r->fd_hints[fd];
    size_t n = r->nfd_hints ? r->nfd_hints : 64;
    while (n <= (size_t)fd)
        n *= 2;
    uint8_t *nv = moor__realloc(r->fd_hints, n);
    if (!nv)
        return NULL;
    memset(nv + r->nfd_hints, 0, n - r->nfd_hints);
    r->fd_hints = nv;
    r->nfd_hints = n;
    return &nv[fd];
}

/* Before a stream call: if the last one said the fd was drained (reading) or full
 * (writing), wait for readiness now. Returns 0 or the wait's error. */
static inline int wait_if_hinted(int fd, int events, unsigned hint, int64_t deadline)
{
    moor_executor *ex = moor__tls_executor;
    moor__reactor *r = ex ? ex->reactor : NULL;
    if (!r || fd < 0 || (size_t)fd >= r->nfd_hints || !(r->fd_hints[fd] & hint))
        return 0;
    r->fd_hints[fd] &= (uint8_t)~hint;
    if (deadline >= 0 && moor_now() >= deadline)
        return 0; /* no time to wait: the system call itself says whether it can go */
    return moor_wait_fd(fd, events, deadline);
}

/* After a stream call that moved n of len bytes. */
static inline void note_hint(int fd, unsigned hint, ssize_t n, size_t len)
{
    if (n <= 0 || (size_t)n >= len)
        return;
    moor_executor *ex = moor__tls_executor;
    moor__reactor *r;
    uint8_t *h = ex && moor__reactor_get(ex, &r) == 0 ? moor__reactor_fd(r, fd) : NULL;
    if (h)
        *h |= (uint8_t)hint;
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
    int w = moor_wait_fd(fd, events, deadline);
    if (w < 0) {
        *out = w;
        return 0;
    }
    return 1;
}

/* A stream call: hinted wait, then try and wait on EAGAIN, then note a new hint. */
#define STREAM_CALL(fd, events, hint, len, deadline, syscall)                                \
    do {                                                                                     \
        ssize_t out;                                                                         \
        int w = wait_if_hinted(fd, events, hint, deadline);                                  \
        if (w < 0)                                                                           \
            return w;                                                                        \
        while (must_wait(syscall, fd, events, deadline, &out))                               \
            ;                                                                                \
        note_hint(fd, hint, out, len);                                                       \
        return out;                                                                          \
    } while (0)

ssize_t moor_read(int fd, void *buf, size_t len, int64_t deadline)
{
    STREAM_CALL(fd, MOOR_READABLE, MOOR__FD_DRAINED, len, deadline, read(fd, buf, len));
}

ssize_t moor_write(int fd, const void *buf, size_t len, int64_t deadline)
{
    STREAM_CALL(fd, MOOR_WRITABLE, MOOR__FD_FULL, len, deadline, write(fd, buf, len));
}

ssize_t moor_readv(int fd, const struct iovec *iov, int iovcnt, int64_t deadline)
{
    STREAM_CALL(fd, MOOR_READABLE, MOOR__FD_DRAINED, iov_len(iov, iovcnt), deadline,
                readv(fd, iov, iovcnt));
}

ssize_t moor_writev(int fd, const struct iovec *iov, int iovcnt, int64_t deadline)
{
    STREAM_CALL(fd, MOOR_WRITABLE, MOOR__FD_FULL, iov_len(iov, iovcnt), deadline,
                writev(fd, iov, iovcnt));
}

ssize_t moor_recv(int fd, void *buf, size_t len, int flags, int64_t deadline)
{
    STREAM_CALL(fd, MOOR_READABLE, MOOR__FD_DRAINED, len, deadline, recv(fd, buf, len, flags));
}

ssize_t moor_send(int fd, const void *buf, size_t len, int flags, int64_t deadline)
{
    /* MSG_NOSIGNAL: a peer that went away is -EPIPE, not a SIGPIPE that kills the process. */
    STREAM_CALL(fd, MOOR_WRITABLE, MOOR__FD_FULL, len, deadline,
                send(fd, buf, len, flags | MSG_NOSIGNAL));
}

/* Datagrams: a short datagram says nothing about the queue, so no hints. */
ssize_t moor_recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr,
                      socklen_t *addrlen, int64_t deadline)
{
    ssize_t out;
    while (must_wait(recvfrom(fd, buf, len, flags, addr, addrlen), fd, MOOR_READABLE, deadline,
                     &out))
        ;
    return out;
}

ssize_t moor_sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr,
                    socklen_t addrlen, int64_t deadline)
{
    ssize_t out;
    while (must_wait(sendto(fd, buf, len, flags | MSG_NOSIGNAL, addr, addrlen), fd, MOOR_WRITABLE,
                     deadline, &out))
        ;
    return out;
}

void moor__reactor_fd_new(int fd)
{
    moor_executor *ex = moor__tls_executor;
    moor__reactor *r;
    uint8_t *st = ex && moor__reactor_get(ex, &r) == 0 ? moor__reactor_fd(r, fd) : NULL;
    if (st)
        *st = MOOR__FD_OWNED;
}

int moor_close(int fd)
{
    moor_executor *ex = moor__tls_executor;
    moor__reactor *r = ex ? ex->reactor : NULL;
    if (r && fd >= 0 && (size_t)fd < r->nfd_hints)
        r->fd_hints[fd] = 0;
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
