/* Signals: moor_signal_wait, its deadline and cancellation, and the disposition a signal has
 * once no fiber waits for it.
 *
 * Timing is asserted only as a lower bound. */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "moor.h"

#include "fiber/executor.h"

#define FIXTURE_FCHECK_RETURNS
#include "fixture.h"

/* ---- waiting -------------------------------------------------------------------------------- */

static intptr_t signal_waiter(void *arg)
{
    (void)arg;
    return moor_signal_wait(SIGUSR1, moor_deadline_in(SAFETY_MS));
}

static intptr_t signal_raiser(void *arg)
{
    (void)arg;
    moor_yield(); /* the waiter is waiting already; once more for good measure */
    FCHECK(kill(getpid(), SIGUSR1) == 0);
    return 0;
}

static void test_signal_wait(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    moor_fiber *w, *k;
    assert_int_equal(moor_spawn(&w, signal_waiter, NULL, NULL), 0);
    assert_int_equal(moor_spawn(&k, signal_raiser, NULL, NULL), 0);
    intptr_t r = -1;
    assert_int_equal(moor_join(k, &r), 0);
    assert_int_equal(r, 0);
    assert_int_equal(moor_join(w, &r), 0);
    assert_int_equal(r, SIGUSR1);
    moor_executor_free(ex);
}

static void test_signal_timeout_and_bad_signal(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    int64_t deadline = moor_deadline_in(40);
    assert_int_equal(moor_signal_wait(SIGUSR1, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_int_equal(moor_signal_wait(0, -1), -EINVAL);
    assert_int_equal(moor_signal_wait(-3, -1), -EINVAL);
    assert_int_equal(moor_signal_wait(NSIG, -1), -EINVAL);
    assert_int_equal(moor_signal_wait(1000, -1), -EINVAL);
    assert_int_equal(moor_signal_wait(SIGKILL, -1), -EINVAL);
    assert_int_equal(moor_signal_wait(SIGSTOP, -1), -EINVAL);
    moor_executor_free(ex);
}

static intptr_t signal_waiter_forever(void *arg)
{
    (void)arg;
    return moor_signal_wait(SIGUSR1, -1);
}

static void test_signal_wait_cancel(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    moor_fiber *w;
    assert_int_equal(moor_spawn(&w, signal_waiter_forever, NULL, NULL), 0);
    assert_int_equal(moor_sleep(moor_deadline_in(5)), 0);
    moor_cancel(w);
    intptr_t r = 0;
    assert_int_equal(moor_join(w, &r), -ECANCELED);
    assert_int_equal(r, -ECANCELED);
    assert_int_equal(moor_executor_run(ex), 0);
    moor_executor_free(ex);
}

static int usr2_seen;

static void usr2_handler(int sig)
{
    (void)sig;
    usr2_seen++;
}

/* "Once no fiber waits, its previous disposition is back": an application's own handler. */
static void test_signal_restores_disposition(void **state)
{
    (void)state;
    struct sigaction sa, old, now;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = usr2_handler;
    sigemptyset(&sa.sa_mask);
    assert_int_equal(sigaction(SIGUSR2, &sa, &old), 0);
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    assert_int_equal(moor_signal_wait(SIGUSR2, moor_deadline_in(10)), -ETIMEDOUT);
    moor_executor_free(ex);
    assert_int_equal(sigaction(SIGUSR2, &old, &now), 0);
    if (now.sa_handler != usr2_handler)
        fail_msg("SIGUSR2's handler after moor_signal_wait is %s, not the application's",
                 now.sa_handler == SIG_DFL ? "SIG_DFL" : "something else");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        TEST(test_signal_wait),
        TEST(test_signal_timeout_and_bad_signal),
        TEST(test_signal_wait_cancel),
        TEST(test_signal_restores_disposition),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
