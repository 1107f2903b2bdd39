/* The executor fixture of the fiber-level tests. Two kinds of test file share it, and differ
 * in how a check inside a fiber reports (a failed cmocka assertion must never unwind from a
 * fiber's stack):
 *
 * - By default (chan, select, sync, scope), FCHECK only records the first failed line in
 *   fiber_fail_line and the fiber carries on; a test makes its executor with ex_new and ends
 *   with ex_free, which asserts that no fiber, timer or task was left and no check failed.
 *   TEST's teardown frees or abandons the executor of a failed test.
 *
 * - With FIXTURE_FCHECK_RETURNS defined before this header (io, reactor, time), FCHECK makes
 *   the fiber return the failed line, which the test asserts is 0 once it has joined the
 *   fiber. Those tests make and free their executors themselves; TEST's teardown only
 *   forgets (leaks) the executor of a failed test.
 *
 * Every function here is marked unused, so that a file which needs only some of them still
 * builds under -Werror. */
#ifndef MOOR_TESTS_FIXTURE_H
#define MOOR_TESTS_FIXTURE_H

#include <stdint.h>
#include <stdio.h>

#include "helpers.h"
#include "moor.h"

#include "fiber/executor.h"

/* A generous bound on waits that should succeed: a bug fails a test rather than hanging it.
 * Never asserted as an upper bound on time. */
#define SAFETY_MS 30000

#ifdef FIXTURE_FCHECK_RETURNS

/* In a fiber (or a forked child's helper): on a failed check, say where and return the line. */
#define FCHECK(cond)                                                                          \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "%s:%d: check failed in a fiber: %s\n", __FILE__, __LINE__,       \
                    #cond);                                                                   \
            return __LINE__;                                                                  \
        }                                                                                     \
    } while (0)

/* After a test that failed half-way: its executor may still be current, with tasks pending,
 * and cannot be freed. Forget it (leak it) so that the next test can make its own. */
__attribute__((unused)) static int forget_executor(void **state)
{
    (void)state;
    if (moor__tls_executor) {
        print_message("a failed test left its executor behind; leaking it\n");
        moor__tls_executor = NULL;
    }
    return 0;
}

#define TEST(fn) cmocka_unit_test_teardown(fn, forget_executor)

#else /* checks in fibers record the first failed line */

__attribute__((unused)) static int fiber_fail_line; /* first failed FCHECK in a fiber, 0 if none */

#define FCHECK(cond)                                                                          \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "%s:%d: check failed in a fiber: %s\n", __FILE__, __LINE__,       \
                    #cond);                                                                   \
            if (!fiber_fail_line)                                                             \
                fiber_fail_line = __LINE__;                                                   \
        }                                                                                     \
    } while (0)

/* A short deadline, for waits that are meant to run out and for brief sleeps: asserted only
 * as a lower bound, and short to keep the suite quick. */
#define WAIT_MS 40

__attribute__((unused)) static moor_executor *ex_new_attr(const moor_executor_attr *attr)
{
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, attr), 0);
    fiber_fail_line = 0;
    return ex;
}

__attribute__((unused)) static moor_executor *ex_new(void)
{
    return ex_new_attr(NULL);
}

/* Free the executor, then assert it was left clean: no fiber unreleased, no timer queued (no
 * combinator, operation or sleep left one behind), no failed check in a fiber. */
__attribute__((unused)) static void ex_free(moor_executor *ex)
{
    int fibers_left = ex->fibers.head != NULL;
    size_t timers_left = ex->timers.n;
    size_t tasks_left = ex->ntasks;
    if (tasks_left == 0)
        moor_executor_free(ex);
    assert_int_equal(tasks_left, 0);
    assert_false(fibers_left);
    assert_int_equal(timers_left, 0);
    assert_int_equal(fiber_fail_line, 0);
}

/* After a failed test: free the executor it left behind, or if fibers are still pending
 * (their arguments may have lived on the failed test's stack, so they must never run
 * again) abandon it, so that the following tests do not fail on -EEXIST too. */
__attribute__((unused)) static int ex_teardown(void **state)
{
    (void)state;
    moor_executor *ex = moor_executor_current();
    if (!ex || ex->running || ex->current)
        return 0;
    if (ex->ntasks == 0) {
        moor_executor_free(ex);
    } else {
        print_message("abandoning the executor of the failed test (%zu tasks pending)\n",
                      ex->ntasks);
        moor__tls_executor = NULL;
    }
    return 0;
}

#define TEST(fn) cmocka_unit_test_teardown(fn, ex_teardown)

#endif /* FIXTURE_FCHECK_RETURNS */

__attribute__((unused)) static intptr_t yield_n(void *arg)
{
    for (intptr_t i = 0; i < (intptr_t)arg; i++)
        moor_yield();
    return 0;
}

/* From plain code: let every runnable fiber run until it blocks (each gets several turns). */
__attribute__((unused)) static void settle(void)
{
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, yield_n, (void *)8, NULL), 0);
    assert_int_equal(moor_join(f, NULL), 0);
}

/* xorshift32: the sequence is fixed by its seed, so that a failing run repeats. */
__attribute__((unused)) static uint32_t rnd(uint32_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    return *s;
}

#endif
