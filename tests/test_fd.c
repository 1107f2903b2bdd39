/* File descriptors: a stale hint may cost a system call, never a hang or an abort.
 *
 * Waits on fds that are not open (negative, closed, beyond any table) return -EBADF; a number
 * reused after a plain close() works whether moor made the old fd or not; moor_close wakes
 * every fiber waiting on the fd with -EBADF before the number can be reused (also one whose
 * readiness had been reported but which had not run yet); a cancelled fiber still gets a
 * result that is there without waiting; running out of descriptors when the event loop is
 * made, attached or re-armed after fork returns -EMFILE instead of aborting.
 *
 * Every case that crashed or hung before runs in a forked child with a watchdog (fork_child),
 * so that it fails rather than hangs; the child checks with CCHECK, its fibers with FCHECK
 * (fixture.h). Sockets are socketpairs, pipes
 * and loopback TCP only. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <ev.h>

#include "moor.h"

#include "fixture.h"

#define WATCHDOG_S 60

/* ---- helpers ------------------------------------------------------------------------------ */

/* A socketpair whose ends moor did not make, non-blocking. */
static int plain_pair(int sv[2])
{
    return socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv);
}

/* A connected unix stream pair that moor made (moor_unix_connect and moor_accept): fds that
 * moor keeps registered between waits and keeps readiness hints for. Unix sockets, so that a
 * write is in the peer's receive queue when it returns. 0 or -errno. */
static int moor_pair(int fds[2])
{
    char dir[] = "/tmp/moor-test-fd-XXXXXX";
    if (!mkdtemp(dir))
        return -errno;
    char path[64];
    snprintf(path, sizeof path, "%s/s", dir);
    int lfd = moor_unix_listen(path, 4);
    int c = lfd >= 0 ? moor_unix_connect(path, moor_deadline_in(SAFETY_MS)) : lfd;
    int a = c >= 0 ? moor_accept(lfd, NULL, NULL, moor_deadline_in(SAFETY_MS)) : c;
    if (lfd >= 0)
        moor_close(lfd);
    unlink(path);
    rmdir(dir);
    if (a < 0) {
        if (c >= 0)
            moor_close(c);
        return a;
    }
    fds[0] = a;
    fds[1] = c;
    return 0;
}

/* Give `fd`'s number to a fresh socketpair end (dup2 onto it): the number is reused at once,
 * whatever the allocation order. The pair's other end is returned in *peer. 0 or -1. */
static int reuse_number(int fd, int *peer)
{
    int sv[2];
    if (plain_pair(sv) < 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        if (sv[i] == fd) { /* socketpair took the number itself */
            *peer = sv[!i];
            return 0;
        }
    }
    if (dup2(sv[0], fd) != fd) {
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    close(sv[0]);
    *peer = sv[1];
    return 0;
}

/* The lowest free descriptor number (what the next fd made would get). */
static int lowest_free_fd(void)
{
    int fd = fcntl(0, F_DUPFD, 0);
    if (fd >= 0)
        close(fd);
    return fd;
}

/* Allow only `room` more descriptors than are open now (the lowest free number + room), so
 * that the next fds made fail with EMFILE. */
static void limit_fds(int room, struct rlimit *saved)
{
    CCHECK(getrlimit(RLIMIT_NOFILE, saved) == 0);
    int lowest = lowest_free_fd();
    CCHECK(lowest >= 0);
    struct rlimit tight = *saved;
    tight.rlim_cur = (rlim_t)(lowest + room);
    CCHECK(setrlimit(RLIMIT_NOFILE, &tight) == 0);
}

static void join_ok(moor_fiber *f)
{
    intptr_t r = -1;
    CCHECK(moor_join(f, &r) == 0);
    if (r != 0)
        fprintf(stderr, "a fiber failed its check at line %ld\n", (long)r);
    CCHECK(r == 0);
}

static intptr_t wait_fd_fiber(void *arg)
{
    int *a = arg; /* {fd, events, expected} */
    FCHECK(moor_wait_fd(a[0], a[1], moor_deadline_in(SAFETY_MS)) == a[2]);
    return 0;
}

/* moor_wait_fd(fd, events) from plain code, from a fiber and as a future returns `expect`. */
static void expect_wait(int fd, int events, int expect)
{
    CCHECK(moor_wait_fd(fd, events, moor_deadline_in(SAFETY_MS)) == expect);
    moor_io_future io;
    moor_io_init(&io, fd, events, moor_deadline_in(SAFETY_MS));
    CCHECK(moor_block_on(&io.base) == expect);
    int a[3] = {fd, events, expect};
    moor_fiber *f;
    CCHECK(moor_spawn(&f, wait_fd_fiber, a, NULL) == 0);
    join_ok(f);
}

/* Count the loop's active referenced watchers other than moor's own unpark async: an io
 * watcher left behind would show here (white-box, as in test_io). */
static int active_watchers(moor_executor *ex)
{
    struct ev_loop *loop = moor_executor_loop(ex);
    ev_unref(loop);
    int active = ev_run(loop, EVRUN_NOWAIT);
    ev_ref(loop);
    return active;
}

/* ---- waits on fds that are not open ------------------------------------------------------- */

static void negative_child(void)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    expect_wait(-1, MOOR_READABLE, -EBADF);
    expect_wait(INT_MIN, MOOR_WRITABLE, -EBADF);
    char b;
    CCHECK(moor_read(-1, &b, 1, moor_deadline_in(SAFETY_MS)) == -EBADF);
    moor_executor_free(ex);
}

/* Before: libev's "ev_io_start called with negative fd" assertion. */
static void test_fd_wait_negative_fd(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        negative_child();
        child_exit();
    }
    wait_child_ok(pid);
}

static void closed_child(void)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    struct ev_loop *loop = moor_executor_loop(ex); /* before the numbers below are free */
    CCHECK(loop != NULL);
    int p[2];
    CCHECK(pipe2(p, O_NONBLOCK | O_CLOEXEC) == 0);
    CCHECK(close(p[0]) == 0);
    CCHECK(close(p[1]) == 0);
    expect_wait(p[0], MOOR_READABLE, -EBADF);
    expect_wait(p[1], MOOR_WRITABLE, -EBADF);
    expect_wait(p[0], MOOR_READABLE | MOOR_WRITABLE, -EBADF);

    /* An fd moor made and registered with its loop, then closed with plain close(). */
    int m[2];
    CCHECK(moor_pair(m) == 0);
    CCHECK(moor_wait_fd(m[1], MOOR_WRITABLE, moor_deadline_in(SAFETY_MS)) == 0);
    char b = 'x';
    CCHECK(moor_write(m[1], &b, 1, moor_deadline_in(SAFETY_MS)) == 1);
    CCHECK(moor_read(m[0], &b, 1, moor_deadline_in(SAFETY_MS)) == 1);
    CCHECK(close(m[0]) == 0);
    expect_wait(m[0], MOOR_READABLE, -EBADF);
    CCHECK(moor_read(m[0], &b, 1, moor_deadline_in(SAFETY_MS)) == -EBADF);
    CCHECK(moor_close(m[1]) == 0);
    CCHECK(active_watchers(ex) == 0);
    moor_executor_free(ex);
}

/* Before: "I/O watcher with invalid fd found in epoll_ctl" (EBADF) aborted the process. */
static void test_fd_wait_closed_fd(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        closed_child();
        child_exit();
    }
    wait_child_ok(pid);
}

static void beyond_child(void)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    expect_wait(1 << 30, MOOR_READABLE, -EBADF);
    expect_wait(INT_MAX, MOOR_WRITABLE, -EBADF);
    moor_executor_free(ex);
}

/* Before: libev grew its fd table to the number (gigabytes) and then aborted. */
static void test_fd_wait_beyond_table(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        beyond_child();
        child_exit();
    }
    wait_child_ok(pid);
}

/* ---- numbers reused after a plain close() -------------------------------------------------- */

typedef struct reader_arg {
    int fd;
    ssize_t n;
    char buf[64];
} reader_arg;

static intptr_t read_once(void *arg)
{
    reader_arg *a = arg;
    a->n = moor_read(a->fd, a->buf, sizeof a->buf, moor_deadline_in(SAFETY_MS));
    return 0;
}

static void pipe_reuse_child(void)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    int p[2];
    CCHECK(pipe2(p, O_NONBLOCK | O_CLOEXEC) == 0);
    char buf[64];
    CCHECK(write(p[1], "hello", 5) == 5);
    /* A short read: the pipe was drained (moor used to remember that as a hint). */
    CCHECK(moor_read(p[0], buf, sizeof buf, moor_deadline_in(SAFETY_MS)) == 5);
    int number = p[0];
    CCHECK(close(p[0]) == 0);
    CCHECK(close(p[1]) == 0);
    /* The number is not open: a read says so at once. */
    CCHECK(moor_read(number, buf, sizeof buf, moor_deadline_in(SAFETY_MS)) == -EBADF);

    /* A new pipe on the same number: data already there, and data that comes later. */
    int q[2];
    CCHECK(pipe2(q, O_NONBLOCK | O_CLOEXEC) == 0);
    CCHECK(q[0] == number);
    CCHECK(write(q[1], "world", 5) == 5);
    CCHECK(moor_read(q[0], buf, sizeof buf, moor_deadline_in(SAFETY_MS)) == 5);
    CCHECK(memcmp(buf, "world", 5) == 0);
    reader_arg ra = {q[0], 0, {0}};
    moor_fiber *f;
    CCHECK(moor_spawn(&f, read_once, &ra, NULL) == 0);
    settle(); /* the reader waits */
    CCHECK(write(q[1], "again", 5) == 5);
    join_ok(f);
    CCHECK(ra.n == 5 && memcmp(ra.buf, "again", 5) == 0);
    close(q[0]);
    close(q[1]);
    moor_executor_free(ex);
}

/* The pipe case: a short read, close(), and the number used again. */
static void test_fd_pipe_reused_after_plain_close(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        pipe_reuse_child();
        child_exit();
    }
    wait_child_ok(pid);
}

typedef struct reuse_arg {
    int fd;        /* a moor-made fd; its number is reused by the fiber */
    int peer;      /* the reusing pair's other end, once the fiber made it */
    int data_first; /* write into the new pair before the fiber reads it */
    ssize_t n;
    char buf[64];
} reuse_arg;

/* Waits on a moor-made fd (so moor registers it with its loop), then, in one run: reads,
 * closes it with plain close(), gives the number to a new socketpair and reads from that. */
static intptr_t reuse_reader(void *arg)
{
    reuse_arg *a = arg;
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    char b[64];
    FCHECK(moor_read(a->fd, b, sizeof b, deadline) == 3); /* waits, then a short read */
    FCHECK(close(a->fd) == 0);
    FCHECK(reuse_number(a->fd, &a->peer) == 0);
    if (a->data_first)
        FCHECK(write(a->peer, "new", 3) == 3);
    a->n = moor_read(a->fd, a->buf, sizeof a->buf, deadline);
    return 0;
}

static void moor_fd_reuse_case(int data_first)
{
    int m[2];
    CCHECK(moor_pair(m) == 0);
    reuse_arg a = {m[0], -1, data_first, 0, {0}};
    moor_fiber *f;
    CCHECK(moor_spawn(&f, reuse_reader, &a, NULL) == 0);
    settle(); /* the reader waits on m[0] */
    CCHECK(moor_write(m[1], "old", 3, moor_deadline_in(SAFETY_MS)) == 3);
    if (!data_first) {
        /* Run until the reader waits on the new socket, then give it data. */
        while (a.peer < 0)
            CCHECK(moor_sleep(moor_deadline_in(1)) == 0);
        settle();
        CCHECK(write(a.peer, "new", 3) == 3);
    }
    join_ok(f);
    if (a.n != 3)
        fprintf(stderr, "read on the reused number: %s\n",
                a.n < 0 ? moor_strerror((int)a.n) : "short");
    CCHECK(a.n == 3 && memcmp(a.buf, "new", 3) == 0);
    moor_close(a.fd);
    close(a.peer);
    moor_close(m[1]);
}

static void moor_reuse_child(void)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    moor_fd_reuse_case(0);
    moor_fd_reuse_case(1);
    CCHECK(active_watchers(ex) == 0);
    moor_executor_free(ex);
}

/* The socketpair case: a number moor made, closed with plain close() and reused, was
 * never woken (moor's registration belonged to the old file). Now it is, within the safety
 * timeout, whether the data comes later or was there already. */
static void test_fd_moor_fd_reused_after_plain_close(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        moor_reuse_child();
        child_exit();
    }
    wait_child_ok(pid);
}

static intptr_t reuse_cases(void *arg)
{
    (void)arg;
    moor_fd_reuse_case(0);
    moor_fd_reuse_case(1);
    return 0;
}

static void attached_reuse_child(void)
{
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    CCHECK(loop != NULL);
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    CCHECK(moor_executor_attach(ex, loop) == 0);
    moor_fiber *f;
    CCHECK(moor_spawn(&f, reuse_cases, NULL, NULL) == 0);
    ev_run(loop, 0); /* returns once the fibers are done */
    join_ok(f);
    moor_executor_free(ex);
    ev_loop_destroy(loop);
}

/* The same in an executor attached to the application's loop, which checks the waits from its
 * prepare watcher. */
static void test_fd_moor_fd_reused_after_plain_close_attached(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        attached_reuse_child();
        child_exit();
    }
    wait_child_ok(pid);
}

/* ---- moor_close wakes the fibers that wait on the fd --------------------------------------- */

#define MAX_WAITERS 8

typedef struct close_case {
    int fd;
    int peer;          /* the socketpair that reuses the number after the close */
    int nreaders, nwriters;
    int started;       /* waiters that are about to wait */
    ssize_t rc[MAX_WAITERS];
    char got[MAX_WAITERS][16];
} close_case;

typedef struct waiter_arg {
    close_case *c;
    int i;
} waiter_arg;

static intptr_t close_waiter(void *arg)
{
    waiter_arg *w = arg;
    close_case *c = w->c;
    c->started++;
    if (w->i < c->nreaders) {
        c->rc[w->i] = moor_read(c->fd, c->got[w->i], sizeof c->got[w->i],
                                moor_deadline_in(SAFETY_MS));
    } else {
        static const char big[4096];
        c->rc[w->i] = moor_write(c->fd, big, sizeof big, moor_deadline_in(SAFETY_MS));
    }
    return 0;
}

/* Closes the fd under its waiters, gives the number to a new socketpair with data in it,
 * and lets the waiters run before reading that data back itself. */
static intptr_t closer(void *arg)
{
    close_case *c = arg;
    FCHECK(moor_close(c->fd) == 0);
    FCHECK(reuse_number(c->fd, &c->peer) == 0);
    FCHECK(write(c->peer, "later fd", 8) == 8);
    FCHECK(moor_sleep(moor_deadline_in(5)) == 0);
    char buf[16];
    FCHECK(moor_read(c->fd, buf, sizeof buf, moor_deadline_in(SAFETY_MS)) == 8);
    return 0;
}

static void close_case_run(int nreaders, int nwriters)
{
    close_case c;
    memset(&c, 0, sizeof c);
    int sv[2];
    CCHECK(plain_pair(sv) == 0);
    c.fd = sv[0];
    c.peer = -1;
    c.nreaders = nreaders;
    c.nwriters = nwriters;
    if (nwriters) { /* fill the send buffer, so that writers wait for room */
        static const char fill[65536];
        while (write(sv[0], fill, sizeof fill) > 0)
            ;
        CCHECK(errno == EAGAIN);
    }
    int n = nreaders + nwriters;
    waiter_arg wa[MAX_WAITERS];
    moor_fiber *f[MAX_WAITERS];
    for (int i = 0; i < n; i++) {
        wa[i] = (waiter_arg){&c, i};
        c.rc[i] = 1;
        CCHECK(moor_spawn(&f[i], close_waiter, &wa[i], NULL) == 0);
    }
    settle();
    CCHECK(c.started == n);
    for (int i = 0; i < n; i++)
        CCHECK(c.rc[i] == 1); /* all still waiting */
    moor_fiber *cl;
    CCHECK(moor_spawn(&cl, closer, &c, NULL) == 0);
    for (int i = 0; i < n; i++)
        join_ok(f[i]);
    join_ok(cl);
    for (int i = 0; i < n; i++) {
        if (c.rc[i] != -EBADF)
            fprintf(stderr, "%s %d: %zd\n", i < nreaders ? "reader" : "writer", i, c.rc[i]);
        CCHECK(c.rc[i] == -EBADF);
    }
    close(c.fd);
    close(c.peer);
    close(sv[1]);
}

static void close_wakes_child(void)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    close_case_run(1, 0);
    close_case_run(0, 1);
    close_case_run(3, 2);
    close_case_run(MAX_WAITERS / 2, MAX_WAITERS / 2);
    CCHECK(active_watchers(ex) == 0);
    moor_executor_free(ex);
}

/* Readers and writers blocked on an fd get -EBADF from its moor_close at once, and never the
 * data of the socket that reuses the number. Before: they slept on (a later fd's data could
 * reach them, or nothing ever did). */
static void test_fd_close_wakes_waiters(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        close_wakes_child();
        child_exit();
    }
    wait_child_ok(pid);
}

typedef struct fired_case {
    int fd;
    int peer;
    ssize_t rc;
    char got[16];
    int64_t wake_at;
} fired_case;

static intptr_t fired_reader(void *arg)
{
    fired_case *c = arg;
    c->rc = moor_read(c->fd, c->got, sizeof c->got, moor_deadline_in(SAFETY_MS));
    return 0;
}

/* Woken by its timer in the same turn as the reader's readiness, and queued before it. */
static intptr_t fired_closer(void *arg)
{
    fired_case *c = arg;
    FCHECK(moor_sleep(c->wake_at) == 0);
    FCHECK(moor_close(c->fd) == 0);
    FCHECK(reuse_number(c->fd, &c->peer) == 0);
    FCHECK(write(c->peer, "later fd", 8) == 8);
    return 0;
}

static void fired_child(void)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    int sv[2];
    CCHECK(plain_pair(sv) == 0);
    /* The closer's timer must not fire before settle() is over: under valgrind, making the
     * event loop for the reader's first wait alone can take longer than 50 ms. */
    fired_case c = {sv[0], -1, 1, {0}, moor_deadline_in(UNDER_VALGRIND ? 2000 : 50)};
    moor_fiber *r, *cl;
    CCHECK(moor_spawn(&r, fired_reader, &c, NULL) == 0);
    CCHECK(moor_spawn(&cl, fired_closer, &c, NULL) == 0);
    settle(); /* both wait: the reader on the fd, the closer on its timer */
    CCHECK(c.rc == 1);
    /* Make the fd readable and let the closer's deadline pass without running anything: the
     * next turn fires the timer first, then the loop reports the fd (the reader is woken but
     * runs after the closer). */
    CCHECK(write(sv[1], "old", 3) == 3);
    while (moor_now() < c.wake_at)
        usleep(1000);
    join_ok(cl);
    join_ok(r);
    if (c.rc != -EBADF)
        fprintf(stderr, "reader: %zd (%.*s)\n", c.rc, c.rc > 0 ? (int)c.rc : 0, c.got);
    CCHECK(c.rc == -EBADF);
    close(c.fd);
    close(c.peer);
    close(sv[1]);
    CCHECK(active_watchers(ex) == 0);
    moor_executor_free(ex);
}

/* A reader whose readiness was reported but which had not run yet when another fiber
 * moor_close'd its fd gets -EBADF, not a read() on the number's next file. */
static void test_fd_close_after_readiness_before_poll(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        fired_child();
        child_exit();
    }
    wait_child_ok(pid);
}

/* ---- a cancelled fiber still gets what is there without waiting ----------------------------- */

/* Two ways to be cancelled between a short read (or write) and the next call: by another
 * fiber while yielding, or by itself in the same run as the wait that preceded the short
 * call (then the fd's readiness hint is as fresh as it gets). */
typedef struct cancel_case {
    int fd, peer;
    int self;     /* cancel itself instead of waiting for the test to */
    int go;       /* set by the test once it has cancelled the fiber */
    ssize_t first, second, third;
    char buf[64];
    unsigned char *big;
    size_t big_len;
} cancel_case;

static intptr_t cancelled_reader(void *arg)
{
    cancel_case *c = arg;
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    c->first = moor_read(c->fd, c->buf, sizeof c->buf, deadline); /* short: 5 of 64 */
    if (c->self) {
        FCHECK(write(c->peer, "after", 5) == 5);
        moor_cancel(moor_self());
    }
    while (!c->go)
        moor_yield();
    c->second = moor_read(c->fd, c->buf, sizeof c->buf, deadline); /* 5 more are buffered */
    c->third = moor_read(c->fd, c->buf, sizeof c->buf, deadline);  /* nothing: would wait */
    return 0;
}

static void cancelled_read_case(int self)
{
    int m[2];
    CCHECK(moor_pair(m) == 0);
    cancel_case c = {m[0], m[1], self, self, 0, 0, 0, {0}, NULL, 0};
    moor_fiber *f;
    CCHECK(moor_spawn(&f, cancelled_reader, &c, NULL) == 0);
    settle(); /* the reader waits */
    CCHECK(write(m[1], "first", 5) == 5);
    if (!self) {
        while (c.first == 0)
            CCHECK(moor_sleep(moor_deadline_in(1)) == 0);
        CCHECK(write(m[1], "after", 5) == 5);
        moor_cancel(f);
        c.go = 1;
    }
    intptr_t r;
    CCHECK(moor_join(f, &r) == -ECANCELED);
    CCHECK(c.first == 5);
    if (c.second != 5)
        fprintf(stderr, "second read: %zd\n", c.second);
    CCHECK(c.second == 5 && memcmp(c.buf, "after", 5) == 0);
    CCHECK(c.third == -ECANCELED);
    moor_close(m[0]);
    moor_close(m[1]);
}

static void cancelled_read_child(void)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    cancelled_read_case(0);
    cancelled_read_case(1);
    moor_executor_free(ex);
}

/* Before: the readiness hint of the short read turned the second read into a wait, which the
 * cancel cut short (-ECANCELED with 5 bytes buffered). */
static void test_fd_cancelled_fiber_reads_buffered_data(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        cancelled_read_child();
        child_exit();
    }
    wait_child_ok(pid);
}

/* Read from fd until it would block; returns the bytes read. */
static ssize_t drain(int fd)
{
    static char sink[65536];
    ssize_t total = 0, n;
    while ((n = read(fd, sink, sizeof sink)) > 0)
        total += n;
    return total;
}

static intptr_t cancelled_writer(void *arg)
{
    cancel_case *c = arg;
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    c->first = moor_write(c->fd, c->big, c->big_len, deadline); /* short: the socket is full */
    if (c->self) {
        /* Wait for room (the test drains some), write until full again, then drain the peer
         * in the same run: the socket has room, and the short write's hint is fresh. */
        ssize_t n = moor_write(c->fd, c->big, c->big_len, deadline);
        FCHECK(n > 0 && (size_t)n < c->big_len);
        FCHECK(drain(c->peer) > 0);
        moor_cancel(moor_self());
    }
    while (!c->go)
        moor_yield();
    c->second = moor_write(c->fd, "x", 1, deadline); /* room again */
    return 0;
}

static void cancelled_write_case(int self)
{
    int m[2];
    CCHECK(moor_pair(m) == 0);
    cancel_case c = {m[0], m[1], self, self, 0, 0, 0, {0}, NULL, 64u << 20};
    c.big = calloc(1, c.big_len);
    CCHECK(c.big != NULL);
    moor_fiber *f;
    CCHECK(moor_spawn(&f, cancelled_writer, &c, NULL) == 0);
    settle();
    CCHECK(c.first > 0 && (size_t)c.first < c.big_len);
    CCHECK(drain(m[1]) > 0); /* room: the writer (self) goes on, or has room to write into */
    if (!self) {
        moor_cancel(f);
        c.go = 1;
    }
    intptr_t r;
    CCHECK(moor_join(f, &r) == -ECANCELED);
    if (c.second != 1)
        fprintf(stderr, "second write: %zd\n", c.second);
    CCHECK(c.second == 1);
    free(c.big);
    moor_close(m[0]);
    moor_close(m[1]);
}

static void cancelled_write_child(void)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    cancelled_write_case(0);
    cancelled_write_case(1);
    moor_executor_free(ex);
}

/* Before: the hint of the short write made the next write wait first, and the cancel cut the
 * wait short although the socket had room. */
static void test_fd_cancelled_fiber_writes_with_room(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        cancelled_write_child();
        child_exit();
    }
    wait_child_ok(pid);
}

/* ---- out of descriptors when the loop is made ----------------------------------------------- */

static void emfile_child(int room)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0); /* no loop yet */
    int p[2];
    CCHECK(pipe2(p, O_NONBLOCK | O_CLOEXEC) == 0);
    /* A listener moor did not make (moor_tcp_listen would make the loop) with a client
     * waiting in its backlog. */
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    CCHECK(lfd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof sa;
    CCHECK(bind(lfd, (struct sockaddr *)&sa, sizeof sa) == 0);
    CCHECK(listen(lfd, 4) == 0);
    CCHECK(getsockname(lfd, (struct sockaddr *)&sa, &len) == 0);
    int cfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CCHECK(cfd >= 0);
    CCHECK(connect(cfd, (struct sockaddr *)&sa, sizeof sa) == 0);

    struct rlimit saved;
    limit_fds(room, &saved); /* room 0: epoll_create fails; 1: libev's async pipe does */
    int lowest = lowest_free_fd();
    char b;
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    for (int i = 0; i < 2; i++) { /* twice: a failed attempt leaves nothing half made */
        CCHECK(moor_wait_fd(p[0], MOOR_READABLE, deadline) == -EMFILE);
        CCHECK(moor_read(p[0], &b, 1, deadline) == -EMFILE);
        CCHECK(moor_accept(lfd, NULL, NULL, deadline) == -EMFILE);
        CCHECK(moor_executor_loop(ex) == NULL);
        CCHECK(lowest_free_fd() == lowest);
    }
    moor_fiber *f;
    int a[3] = {p[0], MOOR_READABLE, -EMFILE};
    CCHECK(moor_spawn(&f, wait_fd_fiber, a, NULL) == 0);
    join_ok(f);

    /* Descriptors again: the next calls make the loop and work. */
    CCHECK(setrlimit(RLIMIT_NOFILE, &saved) == 0);
    CCHECK(write(p[1], "y", 1) == 1);
    CCHECK(moor_wait_fd(p[0], MOOR_READABLE, deadline) == 0);
    CCHECK(moor_read(p[0], &b, 1, deadline) == 1 && b == 'y');
    int c = moor_accept(lfd, NULL, NULL, deadline);
    CCHECK(c >= 0);
    CCHECK(moor_executor_loop(ex) != NULL);
    CCHECK(write(cfd, "z", 1) == 1);
    CCHECK(moor_read(c, &b, 1, deadline) == 1 && b == 'z');
    moor_close(c);
    close(cfd);
    close(lfd);
    close(p[0]);
    close(p[1]);
    moor_executor_free(ex);
}

/* Before: libev could not make its signal/async pipe and aborted ("error creating
 * signal/async pipe"), or fell back to poll() when epoll_create failed. */
static void test_fd_emfile_when_loop_is_made(void **state)
{
    (void)state;
    for (int room = 0; room < 2; room++) {
        pid_t pid = fork_child(WATCHDOG_S);
        if (pid == 0) {
            emfile_child(room);
            child_exit();
        }
        wait_child_ok(pid);
    }
}

static intptr_t nap(void *arg)
{
    (void)arg;
    FCHECK(moor_sleep(moor_deadline_in(1)) == 0);
    return 0;
}

static void attach_emfile_child(void)
{
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO); /* no async or signal pipe yet */
    CCHECK(loop != NULL);
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    struct rlimit saved;
    limit_fds(0, &saved);
    CCHECK(moor_executor_attach(ex, loop) == -EMFILE);
    CCHECK(setrlimit(RLIMIT_NOFILE, &saved) == 0);
    CCHECK(moor_executor_attach(ex, loop) == 0);
    moor_fiber *f;
    CCHECK(moor_spawn(&f, nap, NULL, NULL) == 0);
    ev_run(loop, 0);
    join_ok(f);
    moor_executor_free(ex);
    ev_loop_destroy(loop);
}

/* Attaching to the application's loop needs libev's async pipe too. */
static void test_fd_emfile_when_attaching(void **state)
{
    (void)state;
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        attach_emfile_child();
        child_exit();
    }
    wait_child_ok(pid);
}

static void after_fork_child(moor_executor *ex, int fds[2])
{
    struct rlimit saved;
    limit_fds(0, &saved);
    CCHECK(moor_executor_after_fork(ex) == -EMFILE);
    CCHECK(setrlimit(RLIMIT_NOFILE, &saved) == 0);
    CCHECK(moor_executor_after_fork(ex) == 0);
    char b = 'c';
    CCHECK(moor_write(fds[1], &b, 1, moor_deadline_in(SAFETY_MS)) == 1);
    CCHECK(moor_read(fds[0], &b, 1, moor_deadline_in(SAFETY_MS)) == 1 && b == 'c');
    CCHECK(moor_sleep(moor_deadline_in(2)) == 0);
    moor_executor_free(ex);
}

/* In a child out of descriptors, re-arming the loop after fork reports -EMFILE and leaves the
 * executor as it was, so the call can be made again once descriptors are free. Before: libev
 * aborted in the child's first ev_run. */
static void test_fd_emfile_after_fork(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int fds[2];
    assert_int_equal(plain_pair(fds), 0);
    char b = 'p';
    assert_int_equal(moor_write(fds[1], &b, 1, moor_deadline_in(SAFETY_MS)), 1);
    assert_int_equal(moor_wait_fd(fds[0], MOOR_READABLE, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(moor_read(fds[0], &b, 1, moor_deadline_in(SAFETY_MS)), 1);
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        after_fork_child(ex, fds);
        child_exit();
    }
    wait_child_ok(pid);
    close(fds[0]);
    close(fds[1]);
    ex_free(ex);
}

/* ---- debug builds: a plain close() under a waiter --------------------------------------------- */

__attribute__((unused)) static intptr_t misuse_reader(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char b;
    ssize_t n = moor_read(fd, &b, 1, moor_deadline_in(SAFETY_MS));
    if (n != -EBADF)
        fprintf(stderr, "misuse reader: %zd\n", n);
    FCHECK(n == -EBADF);
    return 0;
}

/* A reader waits on a socketpair end that is then closed with plain close(): before the loop
 * has looked at the fd (`looked` 0) or after (1). */
static void misuse_case(int looked)
{
    int sv[2];
    CHILD_REQUIRE(plain_pair(sv) == 0);
    moor_fiber *f;
    CHILD_REQUIRE(moor_spawn(&f, misuse_reader, (void *)(intptr_t)sv[0], NULL) == 0);
    settle();
    if (looked)
        CHILD_REQUIRE(moor_sleep(moor_deadline_in(30)) == 0);
    CHILD_REQUIRE(close(sv[0]) == 0); /* misuse: moor_close would have woken the reader */
    intptr_t r = -1;
    CHILD_REQUIRE(moor_join(f, &r) == 0);
    CHILD_REQUIRE(r == 0);
    close(sv[1]);
}

__attribute__((unused)) static void misuse_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    misuse_case(0);
    misuse_case(1);
    moor_executor_free(ex);
}

/* Documented misuse, caught in debug builds: the waiter gets -EBADF and stderr names the fd.
 * (Release builds do not look, and the reader would wait for its deadline.) */
static void test_fd_plain_close_under_waiter_debug(void **state)
{
    (void)state;
#ifdef NDEBUG
    skip();
#else
    child_report r;
    child_run(misuse_child, NULL, &r);
    expect_child_ok(&r);
    const char *first = strstr(r.err, "moor: fd ");
    if (!first || !strstr(first + 1, "moor: fd ") || !strstr(r.err, "moor_close")) {
        child_describe(&r);
        fail_msg("expected two warnings naming the fd");
    }
#endif
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_fd_wait_negative_fd),
        TEST(test_fd_wait_closed_fd),
        TEST(test_fd_wait_beyond_table),
        TEST(test_fd_pipe_reused_after_plain_close),
        TEST(test_fd_moor_fd_reused_after_plain_close),
        TEST(test_fd_moor_fd_reused_after_plain_close_attached),
        TEST(test_fd_close_wakes_waiters),
        TEST(test_fd_close_after_readiness_before_poll),
        TEST(test_fd_cancelled_fiber_reads_buffered_data),
        TEST(test_fd_cancelled_fiber_writes_with_room),
        TEST(test_fd_emfile_when_loop_is_made),
        TEST(test_fd_emfile_when_attaching),
        TEST(test_fd_emfile_after_fork),
        TEST(test_fd_plain_close_under_waiter_debug),
    };
    return RUN_TESTS(tests);
}
