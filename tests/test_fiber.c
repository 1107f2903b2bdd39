#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "moor.h"

static intptr_t add_one(void *arg) { return (intptr_t)arg + 1; }

static void test_fiber_join_returns_result(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, add_one, (void *)41, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 42);
    moor_executor_free(ex);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fiber_join_returns_result),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
