/* moor_blocking and its worker pool: calls run on worker threads while the executor serves
 * other fibers, deadlines, cancellation, the pool's size, and fork.
 *
 * Timing is asserted only as a lower bound; progress is counted (ticks of another fiber).
 * Checks inside fibers only record what they see (a fiber returns the line of its first
 * failed check, or 0); the test function asserts once the fibers are joined. Forked children
 * check with CCHECK and exit non-zero on a failure. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "moor.h"

#define FIXTURE_FCHECK_RETURNS
#include "fixture.h"

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static int blocking_over; /* written by the executor's thread only */
static int slow_done;     /* atomic: a slow fn ran to its end on its worker */

static intptr_t slow_fn(void *arg)
{
    sleep_ms((int)(intptr_t)arg);
    __atomic_add_fetch(&slow_done, 1, __ATOMIC_SEQ_CST);
    return 42;
}

/* A call that blocks its worker until the test lets it go (a byte down a pipe), so that
 * "still running" never depends on how fast the machine is. */
static int gate_pipe[2];
static int gate_done; /* atomic */

static void gate_init(void)
{
    assert_int_equal(pipe(gate_pipe), 0);
    gate_done = 0;
}

static intptr_t gate_fn(void *arg)
{
    char c;
    while (read(gate_pipe[0], &c, 1) < 0 && errno == EINTR)
        ;
    __atomic_add_fetch(&gate_done, 1, __ATOMIC_SEQ_CST);
    return (intptr_t)arg;
}

static void gate_release(int n)
{
    for (int i = 0; i < n; i++)
        assert_int_equal(write(gate_pipe[1], "g", 1), 1);
}

static void gate_fini(void)
{
    close(gate_pipe[0]);
    close(gate_pipe[1]);
}

static intptr_t blocking_caller(void *arg)
{
    (void)arg;
    intptr_t result = -1;
    int64_t start = moor_now();
    int rc = moor_blocking(slow_fn, (void *)(intptr_t)200, &result, moor_deadline_in(SAFETY_MS));
    blocking_over = 1;
    FCHECK(rc == 0);
    FCHECK(result == 42);
    FCHECK(moor_now() >= start + 200);
    return 0;
}

static intptr_t progress_ticker(void *arg)
{
    (void)arg;
    intptr_t ticks = 0;
    while (!blocking_over) {
        if (moor_sleep(moor_deadline_in(5)) != 0)
            return -1;
        ticks++;
    }
    return ticks;
}

static void test_blocking_others_progress(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    blocking_over = 0;
    slow_done = 0;
    moor_fiber *caller, *ticker;
    assert_int_equal(moor_spawn(&caller, blocking_caller, NULL, NULL), 0);
    assert_int_equal(moor_spawn(&ticker, progress_ticker, NULL, NULL), 0);
    intptr_t r = -1, ticks = -1;
    assert_int_equal(moor_join(caller, &r), 0);
    assert_int_equal(r, 0);
    assert_int_equal(moor_join(ticker, &ticks), 0);
    /* 200 ms of 5 ms sleeps: ~40 ticks on a quiet machine; an fn run inline would allow one. */
    print_message("ticks during a 200 ms blocking call: %ld\n", (long)ticks);
    assert_true(ticks >= 5);
    assert_int_equal(__atomic_load_n(&slow_done, __ATOMIC_SEQ_CST), 1);
    moor_executor_free(ex);
}

static intptr_t sentinel_fn(void *arg)
{
    *(int *)arg += 1;
    return 7;
}

static void test_blocking_from_plain_code(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    static int calls;
    calls = 0;
    intptr_t result = 0;
    assert_int_equal(moor_blocking(sentinel_fn, &calls, &result, -1), 0);
    assert_int_equal(result, 7);
    assert_int_equal(calls, 1);
    assert_int_equal(moor_blocking(sentinel_fn, &calls, NULL, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(calls, 2);
    moor_executor_free(ex);
}

static intptr_t timed_out_caller(void *arg)
{
    (void)arg;
    intptr_t result = -12345;
    int64_t deadline = moor_deadline_in(50);
    FCHECK(moor_blocking(gate_fn, (void *)1, &result, deadline) == -ETIMEDOUT);
    FCHECK(moor_now() >= deadline);
    FCHECK(result == -12345); /* not written */
    return 0;
}

static void test_blocking_deadline(void **state)
{
    (void)state;
    gate_init();
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    /* From a fiber that then returns: its stack goes back to the pool while fn runs on. */
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, timed_out_caller, NULL, NULL), 0);
    intptr_t r = -1;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 0);
    /* And from plain code. */
    intptr_t result = -12345;
    int64_t deadline = moor_deadline_in(30);
    assert_int_equal(moor_blocking(gate_fn, (void *)2, &result, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_int_equal(result, -12345);

    /* The pool still serves while the abandoned calls block two of its workers. */
    static int calls;
    calls = 0;
    assert_int_equal(moor_blocking(sentinel_fn, &calls, &result, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(result, 7);
    assert_int_equal(calls, 1);
    assert_int_equal(__atomic_load_n(&gate_done, __ATOMIC_SEQ_CST), 0);

    /* Let them finish late: freeing the executor waits for the workers, whose completions
     * free the abandoned jobs and touch nothing else (ASan would say). */
    gate_release(2);
    moor_executor_free(ex);
    assert_int_equal(__atomic_load_n(&gate_done, __ATOMIC_SEQ_CST), 2);
    gate_fini();
}

static int never_ran;

static intptr_t must_not_run(void *arg)
{
    (void)arg;
    __atomic_add_fetch(&never_ran, 1, __ATOMIC_SEQ_CST);
    return 0;
}

static intptr_t queued_caller(void *arg)
{
    (void)arg;
    intptr_t result = -5;
    int64_t deadline = moor_deadline_in(40);
    FCHECK(moor_blocking(must_not_run, NULL, &result, deadline) == -ETIMEDOUT);
    FCHECK(moor_now() >= deadline);
    FCHECK(result == -5);
    return 0;
}

static intptr_t gated_caller(void *arg)
{
    intptr_t result = 0;
    FCHECK(moor_blocking(gate_fn, arg, &result, moor_deadline_in(SAFETY_MS)) == 0);
    FCHECK(result == (intptr_t)arg);
    return 0;
}

/* One worker: the second call waits in the queue behind a call that cannot finish, times out
 * there, and never runs. */
static void test_blocking_queued_timeout(void **state)
{
    (void)state;
    gate_init();
    moor_executor *ex;
    moor_executor_attr attr = {.blocking_threads = 1};
    assert_int_equal(moor_executor_new(&ex, &attr), 0);
    never_ran = 0;
    moor_fiber *a, *b;
    assert_int_equal(moor_spawn(&a, gated_caller, (void *)5, NULL), 0);
    assert_int_equal(moor_spawn(&b, queued_caller, NULL, NULL), 0);
    intptr_t r = -1;
    assert_int_equal(moor_join(b, &r), 0);
    assert_int_equal(r, 0);
    gate_release(1);
    assert_int_equal(moor_join(a, &r), 0);
    assert_int_equal(r, 0);
    moor_executor_free(ex);
    assert_int_equal(__atomic_load_n(&gate_done, __ATOMIC_SEQ_CST), 1);
    assert_int_equal(__atomic_load_n(&never_ran, __ATOMIC_SEQ_CST), 0);
    gate_fini();
}

static intptr_t cancelled_caller(void *arg)
{
    int *rc = arg;
    intptr_t result = -5;
    *rc = moor_blocking(gate_fn, (void *)9, &result, -1);
    FCHECK(result == -5);
    return 0;
}

static void test_blocking_cancel(void **state)
{
    (void)state;
    gate_init();
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    int rc = 1;
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, cancelled_caller, &rc, NULL), 0);
    assert_int_equal(moor_sleep(moor_deadline_in(10)), 0); /* f hands its call to a worker */
    assert_int_equal(rc, 1);
    moor_cancel(f);
    intptr_t r = -1;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, 0);
    assert_int_equal(rc, -ECANCELED);
    gate_release(1);
    moor_executor_free(ex); /* waits for the worker to finish the abandoned call */
    assert_int_equal(__atomic_load_n(&gate_done, __ATOMIC_SEQ_CST), 1);
    gate_fini();
}

/* ---- the pool's size ---------------------------------------------------------------------- */

#define MEET 3
static int meet_count; /* atomic */

/* Returns arg once MEET calls run at the same time (each needs its own worker), -1 if they
 * never do. */
static intptr_t meet_fn(void *arg)
{
    __atomic_add_fetch(&meet_count, 1, __ATOMIC_SEQ_CST);
    for (int waited = 0; __atomic_load_n(&meet_count, __ATOMIC_SEQ_CST) < MEET; waited++) {
        if (waited >= SAFETY_MS)
            return -1;
        sleep_ms(1);
    }
    return (intptr_t)arg;
}

static intptr_t meet_caller(void *arg)
{
    intptr_t result = -2;
    FCHECK(moor_blocking(meet_fn, arg, &result, -1) == 0);
    FCHECK(result == (intptr_t)arg);
    return 0;
}

/* The pool's thread count is a cap, not a size to allocate up front: a count whose array of
 * thread handles would overflow size_t (here it would wrap to one handle's worth) must not
 * turn into a heap overflow when workers start. White-box: the executor may refuse such a
 * count in moor_executor_new, so the field is set behind its back. */
static void test_blocking_pool_size_overflow(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    ex->blocking_threads = SIZE_MAX / sizeof(pthread_t) + 2;
    meet_count = 0;
    moor_fiber *f[MEET];
    for (int i = 0; i < MEET; i++)
        assert_int_equal(moor_spawn(&f[i], meet_caller, (void *)(intptr_t)(i + 10), NULL), 0);
    for (int i = 0; i < MEET; i++) {
        intptr_t r = -1;
        assert_int_equal(moor_join(f[i], &r), 0);
        assert_int_equal(r, 0);
    }
    moor_executor_free(ex);
}

/* A thread count no machine could start is refused up front. The executor's validation of
 * its attributes (fiber/executor.c) is expected to make this pass. */
static void test_blocking_huge_thread_count(void **state)
{
    (void)state;
    moor_executor *ex;
    moor_executor_attr attr = {.blocking_threads = SIZE_MAX};
    int rc = moor_executor_new(&ex, &attr);
    if (rc == 0) {
        moor_executor_free(ex);
        fail_msg("moor_executor_new accepted blocking_threads = SIZE_MAX; expected -EINVAL");
    }
    assert_int_equal(rc, -EINVAL);
}

/* ---- fork --------------------------------------------------------------------------------- */

static int inflight_rc[2];

static intptr_t inflight_caller(void *arg)
{
    int i = (int)(intptr_t)arg;
    intptr_t result = 0;
    inflight_rc[i] = moor_blocking(gate_fn, (void *)42, &result, -1);
    return result;
}

/* "Blocking calls in flight in the parent's workers fail with -ECANCELED in the child": the
 * one running on the (only) worker and the one queued behind it. */
static void test_blocking_fork_in_flight(void **state)
{
    (void)state;
    gate_init();
    moor_executor *ex;
    moor_executor_attr attr = {.blocking_threads = 1};
    assert_int_equal(moor_executor_new(&ex, &attr), 0);
    inflight_rc[0] = inflight_rc[1] = 1;
    moor_fiber *f[2];
    assert_int_equal(moor_spawn(&f[0], inflight_caller, (void *)0, NULL), 0);
    assert_int_equal(moor_spawn(&f[1], inflight_caller, (void *)1, NULL), 0);
    assert_int_equal(moor_sleep(moor_deadline_in(30)), 0); /* one runs, one is queued */
    assert_int_equal(inflight_rc[0], 1);
    assert_int_equal(inflight_rc[1], 1);

    pid_t pid = fork_child(5);
    if (pid == 0) {
        moor_executor_after_fork(ex);
        intptr_t r;
        CCHECK(moor_join(f[1], &r) == 0);
        CCHECK(inflight_rc[1] == -ECANCELED);
        CCHECK(moor_join(f[0], &r) == 0);
        CCHECK(inflight_rc[0] == -ECANCELED);
        _exit(0);
    }
    /* The parent's own calls complete normally once let go. */
    gate_release(2);
    for (int i = 0; i < 2; i++) {
        intptr_t r = 0;
        assert_int_equal(moor_join(f[i], &r), 0);
        assert_int_equal(r, 42);
        assert_int_equal(inflight_rc[i], 0);
    }
    moor_executor_free(ex);
    gate_fini();
    wait_child_ok(pid);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        TEST(test_blocking_others_progress),
        TEST(test_blocking_from_plain_code),
        TEST(test_blocking_deadline),
        TEST(test_blocking_queued_timeout),
        TEST(test_blocking_cancel),
        TEST(test_blocking_pool_size_overflow),
        TEST(test_blocking_huge_thread_count),
        TEST(test_blocking_fork_in_flight),
    };
    const char *filter = getenv("MOOR_TEST_FILTER"); /* e.g. "*cancel*": run only those */
    if (filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
