/* moor_tcp_dial: connecting by name, with happy eyeballs (RFC 8305, as Go's net.Dial).
 *
 * The name's addresses (moor_resolve) are put in the order of the attempts: the family of
 * the first address first, then the other, alternating, the rest of the longer list last.
 * Attempts start one by one: the next when the one before has had 250 ms, or at once when
 * an attempt fails. All of them wait together in one moor_select on the calling fiber (the
 * connecting sockets' writability, and a sleep until the next start); the first socket to
 * connect wins, and every other attempt is closed, on every path out. No fiber is spawned:
 * the attempts are the caller's, and so is their cleanup. */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "fiber/alloc.h"
#include "fiber/assert.h"
#include "fiber/executor.h"
#include "fd.h"

/* RFC 8305's recommended Connection Attempt Delay. */
#define ATTEMPT_DELAY_MS 250

typedef struct attempt {
    const struct addrinfo *ai;
    int fd;            /* -1: not started, or over (failed and closed) */
    moor_io_future io; /* waits for the connect to finish (writable) */
} attempt;

/* The addresses in the order they are tried. */
static void interleave(struct addrinfo *res, attempt *att, size_t n)
{
    int first = res->ai_family;
    struct addrinfo *a = res, *b = res;
    for (size_t i = 0; i < n; i++) {
        int want_first = (i % 2 == 0);
        /* The next of the family whose turn it is, or of the other once it ran out. */
        struct addrinfo **cur = want_first ? &a : &b;
        while (*cur && (((*cur)->ai_family == first) != want_first))
            *cur = (*cur)->ai_next;
        if (!*cur) {
            cur = want_first ? &b : &a;
            while (*cur && (((*cur)->ai_family == first) == want_first))
                *cur = (*cur)->ai_next;
        }
        att[i].ai = *cur;
        att[i].fd = -1;
        *cur = (*cur)->ai_next;
    }
}

/* Start an attempt: 0 if it connects in the background, 1 if connected at once, -errno if it
 * failed (closed). */
static int attempt_start(attempt *a)
{
    const struct addrinfo *ai = a->ai;
    int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    moor__fd_new(fd);
    while (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        if (errno == EINTR)
            continue;
        if (errno == EINPROGRESS) {
            a->fd = fd;
            return 0;
        }
        int err = errno;
        moor_close(fd);
        return -err;
    }
    a->fd = fd;
    return 1;
}

static void attempt_close(attempt *a)
{
    if (a->fd >= 0)
        moor_close(a->fd);
    a->fd = -1;
}

/* The attempts race; the index of the winner, or the error. */
static int race(attempt *att, size_t n, moor_future **futs, size_t *owner, int64_t deadline)
{
    size_t next = 0, live = 0;
    int64_t next_at = 0; /* when attempt `next` may start */
    int err = -ECONNREFUSED; /* replaced by the first real failure */
    for (;;) {
        /* Start what is due: the next attempt once its delay is over, or at once when none is
         * in flight (the previous one failed sooner). */
        while (next < n && (live == 0 || moor_now() >= next_at)) {
            attempt *a = &att[next++];
            int rc = attempt_start(a);
            if (rc == 1)
                return (int)(a - att);
            if (rc < 0) {
                err = rc;
                continue;
            }
            live++;
            next_at = moor_now() + ATTEMPT_DELAY_MS;
        }
        if (live == 0)
            return err; /* every address failed */

        size_t k = 0;
        for (size_t i = 0; i < next; i++) {
            if (att[i].fd < 0)
                continue;
            moor_io_init(&att[i].io, att[i].fd, MOOR_WRITABLE, -1);
            owner[k] = i;
            futs[k++] = &att[i].io.base;
        }
        moor_sleep_future pause;
        if (next < n) {
            moor_sleep_init(&pause, next_at);
            futs[k++] = &pause.base;
        }
        int w = moor_select(futs, k, deadline);
        if (w < 0)
            return w; /* -ETIMEDOUT, -ECANCELED: the caller closes what is in flight */
        if (futs[w] == &pause.base) {
            if (pause.base.result < 0)
                return (int)pause.base.result;
            continue;
        }
        attempt *a = &att[owner[w]];
        int rc = (int)a->io.base.result;
        if (rc == 0) {
            int so = 0;
            socklen_t len = sizeof so;
            rc = getsockopt(a->fd, SOL_SOCKET, SO_ERROR, &so, &len) < 0 ? -errno : -so;
        }
        if (rc == 0)
            return (int)(a - att);
        attempt_close(a);
        live--;
        err = rc;
        next_at = moor_now(); /* it failed sooner: the next one starts now */
    }
}

int moor_tcp_dial(const char *host, int port, int64_t deadline)
{
    if (!host || !*host || port < 0 || port > 65535)
        return -EINVAL;
    char service[8];
    snprintf(service, sizeof service, "%d", port);
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    hints.ai_flags = AI_NUMERICSERV;
    struct addrinfo *res;
    int rc = moor_resolve(host, service, &hints, deadline, &res);
    if (rc < 0)
        return rc;
    size_t n = 0;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next)
        n++;
    /* One block: the attempts, the select's futures (attempts and the pause), their owners. */
    size_t bytes = n * (sizeof(attempt) + sizeof(moor_future *) + sizeof(size_t)) +
                   sizeof(moor_future *);
    attempt *att = moor__alloc(bytes);
    if (!att) {
        moor_resolve_free(res);
        return -ENOMEM;
    }
    moor_future **futs = (moor_future **)(void *)(att + n);
    size_t *owner = (size_t *)(void *)(futs + n + 1);
    interleave(res, att, n);
    rc = race(att, n, futs, owner, deadline);
    int fd = -1;
    if (rc >= 0) {
        fd = att[rc].fd;
        att[rc].fd = -1;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    for (size_t i = 0; i < n; i++)
        attempt_close(&att[i]);
    moor__free(att);
    moor_resolve_free(res);
    return rc >= 0 ? fd : rc;
}
