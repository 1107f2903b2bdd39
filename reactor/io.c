/* Readiness futures and the I/O calls built on them. Each call tries its system call first
 * and waits only on EAGAIN, with an ev_io that lives inside a moor_io_future on the calling
 * fiber's stack. */
#include <errno.h>
#include <unistd.h>

#include "fiber/assert.h"
#include "fiber/fiber.h"
#include "reactor.h"

static inline ev_io *watcher_of(moor_io_future *io) { return (ev_io *)(void *)io->watcher; }

static void on_ready(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    moor_io_future *io = w->data;
    /* Level-triggered: stop now, or libev reports the fd again on every turn until the task
     * has run. The next wait starts it again; libev coalesces a stop and a start between two
     * polls into no epoll_ctl at all. */
    ev_io_stop(loop, w);
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
        moor__reactor *r = moor__reactor_get(ex);
        if (!r) {
            fut->result = -ENOMEM;
            return MOOR_READY;
        }
        ev_io_init(w, on_ready, io->fd,
                   ((io->events & MOOR_READABLE) ? EV_READ : 0) |
                       ((io->events & MOOR_WRITABLE) ? EV_WRITE : 0));
        w->data = io;
        ev_io_start(r->loop, w);
    }
    if (io->deadline >= 0) {
        if (moor__timer_node_queued(&io->node)) {
            io->node.waker = cx->waker;
        } else if (moor__timer_add(&ex->timers, &io->node, io->deadline, &cx->waker) < 0) {
            io_stop(io, ex);
            fut->result = -ENOMEM;
            return MOOR_READY;
        }
    }
    return MOOR_PENDING;
}

static void io_cancel(moor_future *fut)
{
    moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    io_stop(io, moor__tls_executor);
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

ssize_t moor_read(int fd, void *buf, size_t len, int64_t deadline)
{
    ssize_t out;
    while (must_wait(read(fd, buf, len), fd, MOOR_READABLE, deadline, &out))
        ;
    return out;
}

ssize_t moor_write(int fd, const void *buf, size_t len, int64_t deadline)
{
    ssize_t out;
    while (must_wait(write(fd, buf, len), fd, MOOR_WRITABLE, deadline, &out))
        ;
    return out;
}

ssize_t moor_readv(int fd, const struct iovec *iov, int iovcnt, int64_t deadline)
{
    ssize_t out;
    while (must_wait(readv(fd, iov, iovcnt), fd, MOOR_READABLE, deadline, &out))
        ;
    return out;
}

ssize_t moor_writev(int fd, const struct iovec *iov, int iovcnt, int64_t deadline)
{
    ssize_t out;
    while (must_wait(writev(fd, iov, iovcnt), fd, MOOR_WRITABLE, deadline, &out))
        ;
    return out;
}

ssize_t moor_recv(int fd, void *buf, size_t len, int flags, int64_t deadline)
{
    ssize_t out;
    while (must_wait(recv(fd, buf, len, flags), fd, MOOR_READABLE, deadline, &out))
        ;
    return out;
}

ssize_t moor_send(int fd, const void *buf, size_t len, int flags, int64_t deadline)
{
    ssize_t out;
    /* MSG_NOSIGNAL: a peer that went away is -EPIPE, not a SIGPIPE that kills the process. */
    while (must_wait(send(fd, buf, len, flags | MSG_NOSIGNAL), fd, MOOR_WRITABLE, deadline, &out))
        ;
    return out;
}

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
