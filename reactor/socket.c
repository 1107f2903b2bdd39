/* Sockets: accept and connect as waits, and listeners/connections on numeric addresses. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

#include "fiber/assert.h"
#include "fiber/executor.h"
#include "fd.h"
#include "io.h"
#include "reactor.h"

/* After accept failed for want of descriptors or memory, the next accepts wait this long
 * (ms) first. */
#define ACCEPT_BACKOFF_MS 100

int moor_accept(int fd, struct sockaddr *addr, socklen_t *addrlen, int64_t deadline)
{
    moor__reactor *r;
    int rc = moor__reactor_get(moor__tls_executor, &r);
    if (rc < 0)
        return rc;
    /* Out of descriptors last time: the listener stays readable, so accepting again at once
     * would spin. Wait a little first; descriptors may have been closed meanwhile. (Not in
     * a cancelled fiber: it tries once more, as every call tries before it gives up.) */
    if (r->accept_backoff_until > moor_now() && !moor_cancelled()) {
        int64_t until = r->accept_backoff_until;
        if (deadline >= 0 && deadline < until) {
            rc = moor_sleep(deadline);
            return rc < 0 ? rc : -ETIMEDOUT;
        }
        rc = moor_sleep(until);
        if (rc < 0)
            return rc;
    }
    for (;;) {
        int c = accept4(fd, addr, addrlen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c >= 0) {
            moor__fd_new(c);
            moor__coop_spend();
            return c;
        }
        int err = errno;
        if (err == EINTR || err == ECONNABORTED)
            continue;
        if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
            r->accept_backoff_until = moor_now() + ACCEPT_BACKOFF_MS;
            return -err;
        }
        if (err != EAGAIN && err != EWOULDBLOCK)
            return -err;
        int w = moor__wait_fd_open(fd, MOOR_READABLE, deadline);
        if (w < 0)
            return w;
    }
}

int moor_connect(int fd, const struct sockaddr *addr, socklen_t addrlen, int64_t deadline)
{
    while (connect(fd, addr, addrlen) < 0) {
        if (errno == EINTR)
            continue;
        if (errno != EINPROGRESS)
            return -errno;
        int w = moor__wait_fd_open(fd, MOOR_WRITABLE, deadline);
        if (w < 0)
            return w;
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            return -errno;
        return -err;
    }
    return 0;
}

/* A numeric IPv4 or IPv6 address; NULL or "" is 0.0.0.0. */
static int parse_addr(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    if (port < 0 || port > 65535)
        return -EINVAL;
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    if (!host || !*host) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        in4->sin_addr.s_addr = htonl(INADDR_ANY);
        *len = sizeof *in4;
    } else if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        *len = sizeof *in4;
    } else if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        *len = sizeof *in6;
    } else {
        return -EINVAL;
    }
    return 0;
}

static int unix_addr(const char *path, struct sockaddr_un *un, socklen_t *len)
{
    size_t n = path ? strlen(path) : 0;
    if (n == 0 || n >= sizeof un->sun_path)
        return -EINVAL;
    memset(un, 0, sizeof *un);
    un->sun_family = AF_UNIX;
    memcpy(un->sun_path, path, n + 1);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
    return 0;
}

static int listen_on(const struct sockaddr *addr, socklen_t len, int backlog, unsigned flags)
{
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    int one = 1;
    if (addr->sa_family != AF_UNIX)
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    /* Unlike SO_REUSEADDR, a listener that asked to share its port and could not must say
     * so: its siblings would fail to bind, or it would take every connection alone. */
    if (((flags & MOOR_TCP_REUSEPORT) &&
         setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) ||
        bind(fd, addr, len) < 0 || listen(fd, backlog) < 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    moor__fd_new(fd);
    return fd;
}

static int connect_to(const struct sockaddr *addr, socklen_t len, int64_t deadline)
{
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    moor__fd_new(fd);
    int rc = moor_connect(fd, addr, len, deadline);
    if (rc < 0) {
        moor_close(fd);
        return rc;
    }
    if (addr->sa_family != AF_UNIX) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return fd;
}

int moor_tcp_listen(const char *host, int port, int backlog)
{
    return moor_tcp_listen_opt(host, port, backlog, 0);
}

int moor_tcp_listen_opt(const char *host, int port, int backlog, unsigned flags)
{
    if (flags & ~MOOR_TCP_REUSEPORT)
        return -EINVAL;
    struct sockaddr_storage ss;
    socklen_t len;
    int rc = parse_addr(host, port, &ss, &len);
    return rc < 0 ? rc : listen_on((struct sockaddr *)&ss, len, backlog, flags);
}

int moor_tcp_connect(const char *host, int port, int64_t deadline)
{
    struct sockaddr_storage ss;
    socklen_t len;
    int rc = parse_addr(host, port, &ss, &len);
    return rc < 0 ? rc : connect_to((struct sockaddr *)&ss, len, deadline);
}

int moor_unix_listen(const char *path, int backlog)
{
    struct sockaddr_un un;
    socklen_t len;
    int rc = unix_addr(path, &un, &len);
    return rc < 0 ? rc : listen_on((struct sockaddr *)&un, len, backlog, 0);
}

int moor_unix_connect(const char *path, int64_t deadline)
{
    struct sockaddr_un un;
    socklen_t len;
    int rc = unix_addr(path, &un, &len);
    return rc < 0 ? rc : connect_to((struct sockaddr *)&un, len, deadline);
}

int moor_socket_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        return -errno;
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    if (ss.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    return -EAFNOSUPPORT;
}
