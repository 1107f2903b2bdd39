/* The io future (moor_io_init, moor_wait_fd) and the I/O calls built on it: moor_read,
 * moor_write and their vector, socket and datagram kin, moor_write_all. Each call tries its
 * system call first and waits only on EAGAIN, with an io future on the calling fiber's
 * stack; the future's watcher is fd.c's (fd.h), which also says why a wait must know its fd
 * is open before libev sees it.
 *
 * A reader's wakeup, end to end: the loop's park runs ev_run and epoll reports the fd
 * (loop.c); the watcher's callback marks the future ready and wakes its task (fd.c); the
 * executor resumes the fiber (fiber/), which polls the future again; io_poll finds it ready
 * (here), and moor_read retries its system call. */
#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fiber/assert.h"
#include "fiber/dump.h"
#include "fiber/wait.h"
#include "fd.h"
#include "io.h"

/* ---- the future -------------------------------------------------------------------------- */

/* Stop the watcher, if it was started: the future is as if fresh. Its waker names the
 * executor whose loop has the watcher (whichever thread stops it). */
static void io_unwatch(moor_io_future *io)
{
    if (moor__io_watched(io))
        moor__fd_unwatch(moor__fd_table_of(io->waker.ex), io);
    io->state = MOOR__IO_NEW;
}

MOOR__WAIT_OP int io_ready(moor_future *fut, moor_cx *cx)
{
    (void)cx;
    moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    switch (io->state) {
    case MOOR__IO_READY:
        fut->result = 0;
        break;
    case MOOR__IO_BADF: /* moor_close closed it, or it was never open */
        fut->result = -EBADF;
        break;
    case MOOR__IO_FAILED: /* the loop could not watch it */
        fut->result = -ENOMEM;
        break;
    default:
        return 0;
    }
    io_unwatch(io);
    return 1;
}

/* Start the watcher the first time (fd.c's), point it at the current waker after. */
MOOR__WAIT_OP int io_park(moor_future *fut, moor_cx *cx)
{
    moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    io->waker = cx->waker;
    if (io->state == MOOR__IO_UNCHECKED || io->state == MOOR__IO_WAITING)
        return 0;
    if (io->fd < 0)
        return -EBADF; /* before any loop is made for it */
    moor__fd_table *t;
    int rc = moor__fd_table_get(cx->waker.ex, &t);
    return rc < 0 ? rc : moor__fd_watch(t, io);
}

/* Readiness is level-triggered: a wait given up on is seen again by the next one. But one
 * that had failed (closed under it) completed: say how. */
MOOR__WAIT_OP int io_unpark(moor_future *fut)
{
    moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    int state = io->state;
    io_unwatch(io);
    io->waker = (moor_waker){0}; /* as if fresh: any executor may start it again */
    if (state != MOOR__IO_BADF && state != MOOR__IO_FAILED)
        return 0;
    fut->result = state == MOOR__IO_BADF ? -EBADF : -ENOMEM;
    return 1;
}

static const moor__wait_ops io_wait = {io_ready, io_park, io_unpark, -ETIMEDOUT};

static moor_poll io_poll(moor_future *fut, moor_cx *cx)
{
    moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    moor_executor *ex = cx->waker.ex;
    /* Its watcher is in one executor's loop: polled from another thread, or by another
     * executor once started, it would race with that loop. */
    moor__assert(ex && ex == moor__tls_executor && (!io->waker.ex || io->waker.ex == ex),
                 "wait on fd %d polled from another thread than its executor's", io->fd);
    return moor__wait_poll(fut, &io->deadline, cx, &io_wait);
}

static moor_poll io_cancel(moor_future *fut)
{
    moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    return moor__wait_cancel(fut, &io->deadline, &io_wait);
}

static const moor_future_ops io_ops = {"fd wait", io_poll, io_cancel};

/* "read fd 7", "write fd 7", "accept fd 3" (a read on a listening socket: getsockopt is
 * async-signal-safe), "read/write fd 7". An fd's readiness comes from outside: never local. */
static int io_describe(const moor_future *fut, char *buf, size_t size)
{
    const moor_io_future *io = moor_container_of(fut, moor_io_future, base);
    if (size == 0)
        return 0; /* only asked whether it is local: no system call */
    const char *what = "read/write fd ";
    if (io->events == MOOR_WRITABLE) {
        what = "write fd ";
    } else if (io->events == MOOR_READABLE) {
        int listening = 0;
        socklen_t len = sizeof listening;
        what = getsockopt(io->fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && listening
                   ? "accept fd "
                   : "read fd ";
    }
    moor__fmt out = moor__fmt_init(buf, size);
    moor__fmt_str(&out, what);
    moor__fmt_i64(&out, io->fd);
    return 0;
}

static moor_future_kind io_kind = {&io_ops, io_describe, NULL};

__attribute__((constructor)) static void io_kind_register(void)
{
    moor_future_kind_register(&io_kind);
}

void moor_io_init(moor_io_future *io, int fd, int events, int64_t deadline)
{
    moor_future_init(&io->base, &io_ops, 0);
    io->fd = fd;
    io->events = events;
    io->state = MOOR__IO_NEW; /* its watcher is set up when it starts (fd.c) */
    io->epoch = 0;
    io->waker = (moor_waker){0};
    io->fd_link = (moor__node){NULL, NULL};
    io->check_link = (moor__node){NULL, NULL};
    io->checked = 0;
    moor__deadline_init(&io->deadline, deadline);
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
    return wait_fd(fd, events, deadline, MOOR__IO_NEW);
}

int moor__wait_fd_open(int fd, int events, int64_t deadline)
{
    return wait_fd(fd, events, deadline, MOOR__IO_NEW_OPEN);
}

/* ---- the calls ------------------------------------------------------------------------- */

/* Before a stream call: if the last one said the fd was drained (reading) or full (writing),
 * wait for readiness now instead of paying a system call to learn it; but only where that
 * wait costs libev no system call either, and where the call's own result decides otherwise:
 * with no time left, and in a cancelled fiber (which still gets data or room that is there).
 * Returns 0 or the wait's error. */
static inline int wait_if_hinted(int fd, int events, unsigned hint, int64_t deadline)
{
    moor_executor *ex = moor__tls_executor;
    if (!moor__fd_hint_take(ex, fd, hint, events) || (ex->current && ex->current->cancelled) ||
        (deadline >= 0 && moor_now() >= deadline))
        return 0;
    return wait_fd(fd, events, deadline, MOOR__IO_NEW_HINTED);
}

/* After a stream call that moved n of len bytes on fd: a short count is a hint. */
static inline void note_hint(int fd, unsigned hint, ssize_t n, size_t len)
{
    if (n <= 0 || (size_t)n >= len)
        return;
    moor__fd_hint_give(moor__tls_executor, fd, hint);
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
