/* What every test program shares: one way to check inside a fiber, one way to make and free
 * the executor of a test, one teardown, and the plumbing of forked children. Public API
 * only: this header includes moor.h and system headers, never an internal one.
 *
 * A test of a fiber-level module reads:
 *
 *     static intptr_t worker(void *arg)
 *     {
 *         FCHECK(moor_chan_send(arg, &v, -1) == 0);   // in a fiber: records, never unwinds
 *         return 0;
 *     }
 *
 *     static void test_chan_something(void **state)
 *     {
 *         (void)state;
 *         moor_executor *ex = ex_new();                // asserts it was made
 *         ... spawn, join, assert_* in plain code ...
 *         ex_free(ex);   // asserts: no task, fiber or timer left, no FCHECK failed; frees it
 *     }
 *
 *     TEST(test_chan_something),                       // in main's table
 *
 * - Checks in fibers. A failed cmocka assertion longjmps to the test runner: from a fiber's
 *   stack (or from a poll function, a waker, another thread) it would leave the executor
 *   half-switched. So code that runs under the executor checks with FCHECK, which prints the
 *   failed condition and records the first failure, and carries on; the test asserts once
 *   it has joined its fibers: ex_free does, and so does the teardown. A forked child checks
 *   the same record on its way out (child_run, child_exit). Values a fiber observes may also
 *   simply be stored and asserted by the test after the join.
 *
 * - The executor of a test is made with ex_new (or ex_new_attr) and freed with ex_free, which
 *   checks with moor_executor_stats_get that the test left nothing behind.
 *
 * - TEST registers a case with fixture_setup and fixture_teardown, which run before and
 *   after every case, passed or failed. A case that failed half-way may have left its
 *   executor current. If it holds no task the teardown frees it, and the next case runs as
 *   usual. If tasks are still pending, their fibers may point into the unwound stack of the
 *   failed case and must never run again; an executor cannot be freed with tasks pending,
 *   and a thread has only one. So the teardown says which case left what and fails it, and
 *   once cmocka has reported that case (with its own failure message), the next setup ends
 *   the process with a failing status: later cases never run on a poisoned executor (and
 *   nothing ever runs it again), and ctest reports the program as failed. A case that passed
 *   but left its executor, or in which an FCHECK failed, fails in the teardown.
 *
 * Crash paths (stack overflow, pin violation, assertions on misuse) are run in a forked child
 * whose exit status and stderr the parent checks:
 *
 *     child_report r;
 *     child_run(fn, arg, &r);                    // fn(arg) runs in the child, stderr captured
 *     expect_child_signal(&r, SIGABRT, "joined twice");
 *
 * The child exits 0 if fn returns (and no FCHECK failed in it). Inside the child, cmocka's
 * assertions must not be used (a failed one would longjmp into the parent's copy of the test
 * runner): check with CHILD_REQUIRE, which prints the failed condition and exits with
 * CHILD_CHECK_FAILED.
 *
 * cmocka installs its own SIGSEGV/SIGBUS/SIGILL/SIGFPE/SIGSYS handlers around each test and
 * restores the previous ones afterwards. A child must not run cmocka's handler (it would
 * longjmp into the runner and carry on running tests in the child), so each test program
 * calls child_signals_save() at the start of main, before cmocka runs, and every child puts
 * those dispositions back before it runs its code.
 *
 * Every function here is marked unused, so that a file which needs only some of them still
 * builds under -Werror. */
#ifndef MOOR_TESTS_FIXTURE_H
#define MOOR_TESTS_FIXTURE_H

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "moor.h"

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

/* ---- time bounds -------------------------------------------------------------------------- */

/* A generous bound on waits that should succeed: a bug fails a test rather than hanging it.
 * Never asserted as an upper bound on time. */
#define SAFETY_MS 30000

/* A short deadline, for waits that are meant to run out and for brief sleeps: asserted only
 * as a lower bound, and short to keep the suite quick. */
#define WAIT_MS 40

/* ---- checks in fibers --------------------------------------------------------------------- */

/* The line of the first FCHECK that failed in this process since the last teardown, 0 if
 * none. Atomic: fibers of executors on other threads check too. */
__attribute__((unused)) static int fiber_fail_line;

#define FCHECK(cond)                                                                          \
    do {                                                                                      \
        if (!(cond))                                                                          \
            fcheck_failed(__FILE__, __LINE__, #cond);                                         \
    } while (0)

__attribute__((unused)) static void fcheck_failed(const char *file, int line, const char *cond)
{
    fprintf(stderr, "%s:%d: check failed in a fiber: %s\n", file, line, cond);
    int none = 0;
    __atomic_compare_exchange_n(&fiber_fail_line, &none, line, 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
}

/* The first failed FCHECK's line, or 0. */
__attribute__((unused)) static int fiber_failed(void)
{
    return __atomic_load_n(&fiber_fail_line, __ATOMIC_SEQ_CST);
}

/* ---- the executor of a test --------------------------------------------------------------- */

__attribute__((unused)) static moor_executor *ex_new_attr(const moor_executor_attr *attr)
{
    moor_executor *ex = NULL;
    assert_int_equal(moor_executor_new(&ex, attr), 0);
    assert_non_null(ex);
    return ex;
}

__attribute__((unused)) static moor_executor *ex_new(void)
{
    return ex_new_attr(NULL);
}

/* What ex holds now, for assertions: assert_int_equal(ex_stats(ex).timers, 1). */
__attribute__((unused)) static moor_executor_stats ex_stats(const moor_executor *ex)
{
    moor_executor_stats st;
    moor_executor_stats_get(ex, &st);
    return st;
}

/* Free the executor, then assert it was left clean: no task pending, no fiber unreleased
 * (every fiber joined or, if detached, finished), no timer queued (no combinator, operation
 * or sleep left one behind), no failed FCHECK. With tasks pending it cannot be freed: the
 * assertion fails first and the teardown deals with it. */
#define ex_free(ex) ex_free_at(ex, __FILE__, __LINE__)

__attribute__((unused)) static void ex_free_at(moor_executor *ex, const char *file, int line)
{
    moor_executor_stats st = ex_stats(ex);
    _assert_int_equal(st.tasks, 0, file, line);
    moor_executor_free(ex);
    _assert_int_equal(st.fibers, 0, file, line);
    _assert_int_equal(st.timers, 0, file, line);
    _assert_int_equal((unsigned)fiber_failed(), 0, file, line);
}

/* The case that left an executor with tasks pending, or NULL: see the head of this file. */
__attribute__((unused)) static const char *fixture_poisoned_by;

/* Runs before every TEST (state holds the case's name, see TEST). */
__attribute__((unused)) static int fixture_setup(void **state)
{
    if (fixture_poisoned_by) {
        print_message("%s is not run, nor any case after it: %s left an executor that can "
                      "never be freed\n", (const char *)*state, fixture_poisoned_by);
        fflush(NULL);
        _exit(EXIT_FAILURE);
    }
    return 0;
}

/* Runs after every TEST, passed or failed: see the head of this file. */
__attribute__((unused)) static int fixture_teardown(void **state)
{
    const char *name = *state;
    int ok = 1;
    moor_executor *ex = moor_executor_current();
    if (ex) {
        moor_executor_stats st = ex_stats(ex);
        if (st.tasks) {
            print_message("%s left its executor with %zu tasks pending (%zu fibers, %zu timers),"
                          " which must never run again\n", name, st.tasks, st.fibers, st.timers);
            fixture_poisoned_by = name;
            return -1;
        }
        print_message("%s left its executor behind (%zu fibers, %zu timers); freeing it\n",
                      name, st.fibers, st.timers);
        moor_executor_free(ex);
        ok = 0;
    }
    int line = __atomic_exchange_n(&fiber_fail_line, 0, __ATOMIC_SEQ_CST);
    if (line) {
        print_message("%s: a check in a fiber failed (line %d, see above)\n", name, line);
        ok = 0;
    }
    return ok ? 0 : -1;
}

#define TEST(fn)                                                                              \
    cmocka_unit_test_prestate_setup_teardown(fn, fixture_setup, fixture_teardown, (void *)#fn)

/* With MOOR_TEST_FILTER set (e.g. "*pool*"), run only the cases it matches. */
__attribute__((unused)) static void fixture_filter(void)
{
    const char *filter = getenv("MOOR_TEST_FILTER");
    if (filter)
        cmocka_set_test_filter(filter);
}

/* main's last line: child_signals_save() comes first, in main. */
#define RUN_TESTS(tests) (fixture_filter(), cmocka_run_group_tests(tests, NULL, NULL))

/* ---- small fibers and scheduling ------------------------------------------------------------ */

__attribute__((unused)) static intptr_t return_arg(void *arg) { return (intptr_t)arg; }

/* Yield (intptr_t)arg times, then return arg. */
__attribute__((unused)) static intptr_t yield_n(void *arg)
{
    for (intptr_t i = 0; i < (intptr_t)arg; i++)
        moor_yield();
    return (intptr_t)arg;
}

/* From plain code: let every runnable fiber run until it blocks (each gets several turns). */
__attribute__((unused)) static void settle(void)
{
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, yield_n, (void *)8, NULL), 0);
    assert_int_equal(moor_join(f, NULL), 0);
}

/* A future that is never ready (and has no cancel op). */
__attribute__((unused)) static moor_poll never_ready(moor_future *self, moor_cx *cx)
{
    (void)self;
    (void)cx;
    return MOOR_PENDING;
}

__attribute__((unused)) static const moor_future_ops never_ops = {"never", never_ready, NULL};

/* xorshift32: the sequence is fixed by its seed, so that a failing run repeats. */
__attribute__((unused)) static uint32_t rnd(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

__attribute__((unused)) static moor_chan *chan_new(size_t elem_size, size_t capacity)
{
    moor_chan *ch = NULL;
    assert_int_equal(moor_chan_new(&ch, elem_size, capacity), 0);
    assert_non_null(ch);
    return ch;
}

/* A fiber that does one channel call and reports what it saw. */
typedef struct chan_call {
    moor_chan *ch;
    int send;           /* 1: send `value`; 0: receive into `got` */
    int use_future;     /* await a moor_chan_future instead of calling send/recv */
    int64_t deadline;
    int value;
    int got;
    int rc;
    int returned;       /* set once the call has returned */
    int64_t returned_at;
} chan_call;

__attribute__((unused)) static intptr_t chan_call_fn(void *arg)
{
    chan_call *c = arg;
    if (c->use_future) {
        moor_chan_future op;
        if (c->send)
            moor_chan_send_init(&op, c->ch, &c->value, c->deadline);
        else
            moor_chan_recv_init(&op, c->ch, &c->got, c->deadline);
        c->rc = (int)moor_await(&op.base);
    } else {
        c->rc = c->send ? moor_chan_send(c->ch, &c->value, c->deadline)
                        : moor_chan_recv(c->ch, &c->got, c->deadline);
    }
    c->returned = 1;
    c->returned_at = moor_now();
    return c->rc;
}

/* A stream socketpair, both ends non-blocking. */
__attribute__((unused)) static void stream_pair(int sv[2])
{
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

/* ---- stderr captured: what a run prints (a deadlock's dump, say), checked by the test ------ */

__attribute__((unused)) static FILE *capture_file;
__attribute__((unused)) static int capture_saved_stderr = -1;

/* From here on, stderr goes to a temporary file. */
__attribute__((unused)) static void capture_begin(void)
{
    fflush(stderr);
    capture_file = tmpfile();
    assert_non_null(capture_file);
    capture_saved_stderr = dup(STDERR_FILENO);
    assert_true(capture_saved_stderr >= 0);
    assert_true(dup2(fileno(capture_file), STDERR_FILENO) >= 0);
}

/* The text written to stderr since capture_begin (static buffer), stderr restored; the text is
 * still shown in the test's log. */
__attribute__((unused)) static const char *capture_end(void)
{
    static char text[65536];
    fflush(stderr);
    assert_true(dup2(capture_saved_stderr, STDERR_FILENO) >= 0);
    close(capture_saved_stderr);
    rewind(capture_file);
    size_t n = fread(text, 1, sizeof text - 1, capture_file);
    text[n] = '\0';
    fclose(capture_file);
    fputs(text, stderr);
    return text;
}

/* The line of `text` that contains `needle`, copied into line (empty if none). */
__attribute__((unused)) static const char *line_with(const char *text, const char *needle,
                                                     char *line, size_t size)
{
    line[0] = '\0';
    const char *p = strstr(text, needle);
    if (!p)
        return line;
    const char *start = p;
    while (start > text && start[-1] != '\n')
        start--;
    const char *end = strchr(p, '\n');
    size_t len = end ? (size_t)(end - start) : strlen(start);
    if (len >= size)
        len = size - 1;
    memcpy(line, start, len);
    line[len] = '\0';
    return line;
}

/* ---- children that run a function: crash paths ------------------------------------------- */

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

/* The end of a forked child whose code returned: status 0, or CHILD_CHECK_FAILED if an
 * FCHECK failed in it (it printed which). */
__attribute__((unused)) static void child_exit(void)
{
    fflush(NULL);
    _exit(fiber_failed() ? CHILD_CHECK_FAILED : 0);
}

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
        child_exit();
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
 * RLIMIT_NOFILE). Unlike child_run, its stderr is not captured and it checks with CCHECK;
 * it ends with child_exit(). */

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
