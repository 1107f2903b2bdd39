/* Crash paths (stack overflow, pin violation, assertions on misuse) are run in a forked child
 * whose exit status and stderr the parent checks:
 *
 *     child_report r;
 *     child_run(fn, arg, &r);                    // fn(arg) runs in the child, stderr captured
 *     expect_child_signal(&r, SIGABRT, "joined twice");
 *
 * The child exits 0 if fn returns. Inside the child, cmocka's assertions must not be used (a
 * failed one would longjmp into the parent's copy of the test runner): check with
 * CHILD_REQUIRE, which prints the failed condition and exits with CHILD_CHECK_FAILED.
 *
 * cmocka installs its own SIGSEGV/SIGBUS/SIGILL/SIGFPE/SIGSYS handlers around each test and
 * restores the previous ones afterwards. A child must not run cmocka's handler (it would
 * longjmp into the runner and carry on running tests in the child), so each test program
 * calls child_signals_save() at the start of main, before cmocka runs, and every child puts
 * those dispositions back before it runs its code. */
#ifndef MOOR_TESTS_HELPERS_H
#define MOOR_TESTS_HELPERS_H

#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "fiber/executor.h"

/* ---- the tools the suite runs under (.ci/run) ------------------------------------------- */

#if defined(__SANITIZE_THREAD__)
#define UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define UNDER_TSAN 1
#endif
#endif
#ifndef UNDER_TSAN
#define UNDER_TSAN 0
#endif

/* TSan gives every fiber the state of a thread: making one costs about a millisecond, and it
 * dies once more than 8128 are alive at once ("Thread limit exceeded"). A test that makes
 * tens of thousands of fibers, or keeps thousands alive, makes fewer under it:
 * FIBER_COUNT(10000, 2000). What such a test checks does not depend on the number. */
#define FIBER_COUNT(n, under_tsan) (UNDER_TSAN ? (under_tsan) : (n))

/* Valgrind is known at run time. Its header comes with the valgrind package (.ci/deps installs
 * it); a machine without it is taken not to run the tests under valgrind. */
#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define UNDER_VALGRIND (RUNNING_ON_VALGRIND != 0)
#endif
#endif
#ifndef UNDER_VALGRIND
#define UNDER_VALGRIND 0
#endif

/* After a test that failed half-way: forget the executor it left behind (freeing it would
 * assert on its pending tasks) so that the next test can make its own. */
__attribute__((unused)) static int forget_leftover_executor(void **state)
{
    (void)state;
    moor__tls_executor = NULL;
    return 0;
}

#define TEST_FORGETTING(f) cmocka_unit_test_teardown(f, forget_leftover_executor)

#define CHILD_CHECK_FAILED 99
/* A child that hangs (a deadlock, a lost wakeup) is killed by SIGALRM after this many seconds
 * so that the rest of the suite still runs. Not a timing assertion: MOOR_TEST_WATCHDOG (in
 * seconds) widens it on a slow machine. */
#define CHILD_WATCHDOG_S 60

#define CHILD_REQUIRE(cond)                                                                   \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "child check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__);  \
            fflush(stderr);                                                                   \
            _exit(CHILD_CHECK_FAILED);                                                        \
        }                                                                                     \
    } while (0)

typedef struct child_report {
    int status;        /* as waitpid() gives it */
    char err[16384];   /* the child's stderr, NUL-terminated (cut if longer) */
} child_report;

static const int child_signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS};
static struct sigaction child_saved_actions[sizeof child_signals / sizeof child_signals[0]];

/* Record the signal dispositions that children get back (call before cmocka runs). */
__attribute__((unused)) static void child_signals_save(void)
{
    for (size_t i = 0; i < sizeof child_signals / sizeof child_signals[0]; i++)
        sigaction(child_signals[i], NULL, &child_saved_actions[i]);
}

__attribute__((unused)) static unsigned child_watchdog_s(void)
{
    const char *env = getenv("MOOR_TEST_WATCHDOG");
    long s = env ? strtol(env, NULL, 10) : 0;
    return s > 0 ? (unsigned)s : CHILD_WATCHDOG_S;
}

__attribute__((unused)) static void child_run(void (*fn)(void *), void *arg, child_report *out)
{
    int fds[2];
    memset(out, 0, sizeof *out);
    assert_int_equal(pipe(fds), 0);
    fflush(NULL); /* nothing buffered in the parent may be written twice */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], STDERR_FILENO);
        close(fds[1]);
        for (size_t i = 0; i < sizeof child_signals / sizeof child_signals[0]; i++)
            sigaction(child_signals[i], &child_saved_actions[i], NULL);
        struct rlimit no_core = {0, 0};
        setrlimit(RLIMIT_CORE, &no_core);
        alarm(child_watchdog_s());
        fn(arg);
        _exit(0);
    }
    close(fds[1]);
    size_t len = 0;
    for (;;) {
        char chunk[4096];
        ssize_t n = read(fds[0], chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        size_t take = (size_t)n;
        if (take > sizeof out->err - 1 - len)
            take = sizeof out->err - 1 - len;
        memcpy(out->err + len, chunk, take);
        len += take;
    }
    out->err[len] = '\0';
    close(fds[0]);
    while (waitpid(pid, &out->status, 0) < 0)
        assert_int_equal(errno, EINTR);
}

__attribute__((unused)) static void child_describe(const child_report *r)
{
    if (WIFEXITED(r->status))
        print_message("child exited with status %d\n", WEXITSTATUS(r->status));
    else if (WIFSIGNALED(r->status) && WTERMSIG(r->status) == SIGALRM)
        print_message("child hung: killed by the watchdog after %u s (MOOR_TEST_WATCHDOG)\n",
                      child_watchdog_s());
    else if (WIFSIGNALED(r->status))
        print_message("child killed by signal %d (%s)\n", WTERMSIG(r->status),
                      strsignal(WTERMSIG(r->status)));
    print_message("child stderr:\n%s\n", r->err);
}

/* The child died of `sig` and its stderr contains `needle` (if not NULL). */
#define expect_child_signal(r, sig, needle) expect_child_signal_at(r, sig, needle, __FILE__, __LINE__)

__attribute__((unused)) static void expect_child_signal_at(const child_report *r, int sig,
                                                           const char *needle, const char *file,
                                                           int line)
{
    if (!WIFSIGNALED(r->status) || WTERMSIG(r->status) != sig) {
        print_message("expected the child to die of signal %d (%s)\n", sig, strsignal(sig));
        child_describe(r);
        _fail(file, line);
    }
    if (needle && !strstr(r->err, needle)) {
        print_message("expected the child's stderr to contain: %s\n", needle);
        child_describe(r);
        _fail(file, line);
    }
}

/* The child returned from its function (or called _exit(0)). */
#define expect_child_ok(r) expect_child_ok_at(r, __FILE__, __LINE__)

__attribute__((unused)) static void expect_child_ok_at(const child_report *r, const char *file,
                                                       int line)
{
    if (!WIFEXITED(r->status) || WEXITSTATUS(r->status) != 0) {
        child_describe(r);
        _fail(file, line);
    }
}


/* ---- children that carry on with the test's own code ------------------------------------ */

/* For a test whose child runs on from the fork (fork itself under test) or changes
 * process-wide state the rest of the suite must not see (signal dispositions,
 * RLIMIT_NOFILE). Unlike child_run, its stderr is not captured and it checks with CCHECK. */

/* In such a child: on a failed check, say where and exit non-zero. */
#define CCHECK(cond)                                                                          \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "%s:%d: check failed in the child: %s\n", __FILE__, __LINE__,     \
                    #cond);                                                                   \
            _exit(100);                                                                       \
        }                                                                                     \
    } while (0)

/* fork() with cmocka's crash handlers put back in the child and a watchdog alarm. */
__attribute__((unused)) static pid_t fork_child(unsigned watchdog_s)
{
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        static const int sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS, SIGABRT};
        for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
            signal(sigs[i], SIG_DFL);
        alarm(watchdog_s);
    }
    return pid;
}

/* Wait for a child of fork_child and assert that it exited with status 0. */
__attribute__((unused)) static void wait_child_ok(pid_t pid)
{
    int status;
    while (waitpid(pid, &status, 0) < 0)
        assert_int_equal(errno, EINTR);
    if (WIFSIGNALED(status))
        fail_msg("child killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("child exited with status %d", WEXITSTATUS(status));
}


/* ---- plain waiting, and functions for moor_blocking's workers ----------------------------- */

__attribute__((unused)) static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

__attribute__((unused)) static int slow_done; /* atomic: a slow_fn ran to its end */

/* A worker's job that blocks its thread for arg milliseconds, then returns 42. */
__attribute__((unused)) static intptr_t slow_fn(void *arg)
{
    sleep_ms((int)(intptr_t)arg);
    __atomic_add_fetch(&slow_done, 1, __ATOMIC_SEQ_CST);
    return 42;
}

/* A worker's job that counts its runs in *(int *)arg and returns 7. */
__attribute__((unused)) static intptr_t sentinel_fn(void *arg)
{
    *(int *)arg += 1;
    return 7;
}

#endif
