/* File descriptors: running out of them when the event loop is made, attached or re-armed
 * after fork returns -EMFILE instead of aborting.
 *
 * Every case that crashed before runs in a forked child with a watchdog (fork_child); the
 * child checks with CCHECK, its fibers with FCHECK (a fiber returns the line of its first
 * failed check, or 0). Sockets are socketpairs, pipes and loopback TCP only. */
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

#include "fiber/executor.h"

#define FIXTURE_FCHECK_RETURNS
#include "fixture.h"

#define WATCHDOG_S 60

/* ---- helpers ------------------------------------------------------------------------------ */

/* A socketpair whose ends moor did not make, non-blocking. */
static int plain_pair(int sv[2])
{
    return socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv);
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
            _exit(0);
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
        _exit(0);
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
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    int fds[2];
    assert_int_equal(plain_pair(fds), 0);
    char b = 'p';
    assert_int_equal(moor_write(fds[1], &b, 1, moor_deadline_in(SAFETY_MS)), 1);
    assert_int_equal(moor_wait_fd(fds[0], MOOR_READABLE, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(moor_read(fds[0], &b, 1, moor_deadline_in(SAFETY_MS)), 1);
    pid_t pid = fork_child(WATCHDOG_S);
    if (pid == 0) {
        after_fork_child(ex, fds);
        _exit(0);
    }
    wait_child_ok(pid);
    close(fds[0]);
    close(fds[1]);
    moor_executor_free(ex);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_fd_emfile_when_loop_is_made),
        TEST(test_fd_emfile_when_attaching),
        TEST(test_fd_emfile_after_fork),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
