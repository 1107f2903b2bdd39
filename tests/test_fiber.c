/* Fibers: spawn and join, identity, joining from a fiber, the fiber as a future, detached
 * fibers, many fibers and the stack pool they reuse, misuse, running out of memory.
 * Cancellation is tested in test_cancel.c; what a switch keeps, in test_switch.c.
 *
 * Fibers record what they see; the test function asserts once they are joined (fixture.h). */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>

#include "moor.h"

#include "fixture.h"

/* White-box: that detached and joined fibers give their stacks back to the pool, and that
 * spawning again takes them from it, is read in the pool. */
#include "fiber/executor.h"

/* Stacks the pool holds (hot or cold), over all sizes. */
static size_t pooled_stacks(const moor_executor *ex)
{
    size_t n = 0;
    for (size_t i = 0; i < ex->pool.nbuckets; i++)
        n += ex->pool.buckets[i].nhot + ex->pool.buckets[i].ncold;
    return n;
}

/* ---- spawn, join, identity --------------------------------------------------------------- */

static void test_fiber_join_returns_result(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_fiber *f[3];
    static const intptr_t values[3] = {42, -1, INTPTR_MAX};
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_spawn(&f[i], return_arg, (void *)values[i], NULL), 0);
    for (int i = 2; i >= 0; i--) { /* join order need not be spawn order */
        intptr_t r = 0;
        assert_int_equal(moor_join(f[i], &r), 0);
        assert_int_equal(r, values[i]);
    }
    moor_fiber *g;
    assert_int_equal(moor_spawn(&g, return_arg, (void *)7, NULL), 0);
    assert_int_equal(moor_join(g, NULL), 0); /* the result may be ignored */
    assert_int_equal(ex_stats(ex).fibers, 0);
    ex_free(ex);
}

struct ident {
    moor_fiber *self;
    uint64_t id;
    char name[64];
};

static intptr_t record_ident(void *arg)
{
    struct ident *i = arg;
    i->self = moor_self();
    i->id = moor_fiber_id(i->self);
    snprintf(i->name, sizeof i->name, "%s", moor_fiber_name(i->self));
    return 0;
}

static void test_fiber_self_id_name(void **state)
{
    (void)state;
    assert_null(moor_self()); /* no executor at all */
    moor_executor *ex = ex_new();
    assert_null(moor_self()); /* plain code */

    struct ident a = {0}, b = {0}, c = {0};
    char name[] = "worker-7";
    const char *longname = "a-name-much-longer-than-thirty-one-bytes";
    moor_fiber_attr named = {.name = name};
    moor_fiber_attr too_long = {.name = longname};
    moor_fiber *fa, *fb, *fc;
    assert_int_equal(moor_spawn(&fa, record_ident, &a, NULL), 0);
    assert_int_equal(moor_spawn(&fb, record_ident, &b, &named), 0);
    assert_int_equal(moor_spawn(&fc, record_ident, &c, &too_long), 0);
    memcpy(name, "XXXXXXXX", sizeof name); /* the name was copied at spawn */

    assert_int_equal(moor_fiber_id(fa), 1);
    assert_int_equal(moor_fiber_id(fb), 2);
    assert_int_equal(moor_fiber_id(fc), 3);
    assert_string_equal(moor_fiber_name(fa), "fiber");
    assert_string_equal(moor_fiber_name(fb), "worker-7");

    assert_int_equal(moor_join(fa, NULL), 0);
    assert_int_equal(moor_join(fb, NULL), 0);
    assert_int_equal(moor_join(fc, NULL), 0);
    assert_ptr_equal(a.self, fa);
    assert_ptr_equal(b.self, fb);
    assert_ptr_equal(c.self, fc);
    assert_int_equal(a.id, 1);
    assert_int_equal(b.id, 2);
    assert_int_equal(c.id, 3);
    assert_string_equal(a.name, "fiber");
    assert_string_equal(b.name, "worker-7");
    assert_int_equal(strlen(c.name), 31);
    assert_memory_equal(c.name, longname, 31);
    assert_null(moor_self());

    /* Ids are never reused, even when stacks are. */
    moor_fiber *fd;
    assert_int_equal(moor_spawn(&fd, record_ident, &a, NULL), 0);
    assert_int_equal(moor_fiber_id(fd), 4);
    assert_int_equal(moor_join(fd, NULL), 0);
    ex_free(ex);
}

/* ---- join from a fiber ------------------------------------------------------------------ */

static intptr_t spawn_and_join_children(void *arg)
{
    (void)arg;
    moor_fiber *kids[10];
    for (intptr_t i = 0; i < 10; i++)
        if (moor_spawn(&kids[i], yield_n, (void *)i, NULL) != 0)
            return -1;
    intptr_t sum = 0;
    for (int i = 9; i >= 0; i--) {
        intptr_t r = 0;
        moor_join(kids[i], &r);
        sum += r;
    }
    return sum;
}

static void test_fiber_join_from_fiber(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_fiber *parent;
    assert_int_equal(moor_spawn(&parent, spawn_and_join_children, NULL, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(parent, &r), 0);
    assert_int_equal(r, 45);
    assert_int_equal(ex_stats(ex).fibers, 0);
    ex_free(ex);
}

/* ---- the fiber as a future --------------------------------------------------------------- */

struct fiber_future_case {
    moor_fiber *target;
    int wait_first;      /* yield this often before awaiting */
    intptr_t awaited, joined;
    long ticks_before_join, ticks_after_join;
    int stop;
    long ticks;
};

static intptr_t ticker_fn(void *arg)
{
    struct fiber_future_case *c = arg;
    while (!c->stop) {
        c->ticks++;
        moor_yield();
    }
    return 0;
}

static intptr_t waiter_fn(void *arg)
{
    struct fiber_future_case *c = arg;
    for (int i = 0; i < c->wait_first; i++)
        moor_yield();
    c->awaited = moor_await(moor_fiber_future(c->target));
    c->ticks_before_join = c->ticks;
    moor_join(c->target, &c->joined);
    c->ticks_after_join = c->ticks;
    c->stop = 1;
    return 0;
}

static void test_fiber_future_awaited(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    /* wait_first 0: the target is still running when awaited; 20: it has already returned */
    static const int waits[] = {0, 20};
    for (size_t i = 0; i < sizeof waits / sizeof waits[0]; i++) {
        struct fiber_future_case c = {.wait_first = waits[i]};
        moor_fiber *ticker, *waiter;
        assert_int_equal(moor_spawn(&c.target, yield_n, (void *)5, NULL), 0);
        assert_int_equal(moor_spawn(&ticker, ticker_fn, &c, NULL), 0);
        assert_int_equal(moor_spawn(&waiter, waiter_fn, &c, NULL), 0);
        assert_int_equal(moor_join(waiter, NULL), 0);
        assert_int_equal(moor_join(ticker, NULL), 0);
        assert_int_equal(c.awaited, 5);
        assert_int_equal(c.joined, 5);
        /* The join after the await did not suspend: the ticker did not run in between. */
        assert_int_equal(c.ticks_before_join, c.ticks_after_join);
        assert_true(c.ticks > 0);
    }
    assert_int_equal(ex_stats(ex).fibers, 0);
    ex_free(ex);
}

static void test_fiber_future_block_on(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, yield_n, (void *)12, NULL), 0);
    moor_future *fut = moor_fiber_future(f);
    assert_ptr_equal(moor_fiber_future(f), fut); /* one future per fiber */
    assert_int_equal(moor_block_on(fut), 12);
    assert_true(moor_future_done(fut));
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 12);
    assert_int_equal(ex_stats(ex).fibers, 0);
    ex_free(ex);
}

/* ---- detached fibers ----------------------------------------------------------------------- */

struct detached_count {
    int ran;
    int children; /* detached fibers each of the first ones spawns */
};

static intptr_t detached_leaf(void *arg)
{
    struct detached_count *c = arg;
    moor_yield();
    c->ran++;
    return 0;
}

static intptr_t detached_parent(void *arg)
{
    struct detached_count *c = arg;
    for (int i = 0; i < c->children; i++)
        if (moor_spawn(NULL, detached_leaf, c, NULL) != 0)
            return -1;
    moor_yield();
    c->ran++;
    return 0;
}

static void test_fiber_detached_free_themselves(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    struct detached_count c = {.children = 3};
    for (int i = 0; i < 100; i++)
        assert_int_equal(moor_spawn(NULL, detached_parent, &c, NULL), 0);
    assert_true(ex_stats(ex).fibers > 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(c.ran, 100 + 100 * 3);
    assert_int_equal(ex_stats(ex).fibers, 0);
    assert_int_equal(ex_stats(ex).tasks, 0);
    assert_int_equal(pooled_stacks(ex), ex->pool.mapped); /* every stack back in the pool */

    /* A detached fiber that finishes last, with nothing to run after it, is released too. */
    c.ran = 0;
    assert_int_equal(moor_spawn(NULL, detached_leaf, &c, NULL), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(c.ran, 1);
    assert_int_equal(ex_stats(ex).fibers, 0);
    assert_int_equal(pooled_stacks(ex), ex->pool.mapped);
    ex_free(ex);
}

/* ---- many fibers --------------------------------------------------------------------------- */

/* All alive at once. Under valgrind this test took about a minute with 100,000 (most of the
 * memcheck stage); with a fifth as many, a few seconds. */
#define MANY (UNDER_VALGRIND ? 20000 : FIBER_COUNT(100000, 4000))

static long read_long(const char *path)
{
    FILE *f = fopen(path, "r");
    long v = -1;
    if (f) {
        if (fscanf(f, "%ld", &v) != 1)
            v = -1;
        fclose(f);
    }
    return v;
}

/* Spawn MANY fibers (all alive at once: none runs before the first join), join them all.
 * Returns the number of wrong results. */
static size_t spawn_join_many(moor_fiber **fs)
{
    for (size_t i = 0; i < MANY; i++) {
        int rc = moor_spawn(&fs[i], return_arg, (void *)(intptr_t)i, NULL);
        if (rc != 0) {
            print_message("spawn %zu: %s\n", i, moor_strerror(rc));
            fail();
        }
    }
    size_t bad = 0;
    for (size_t i = 0; i < MANY; i++) {
        intptr_t r = -1;
        moor_join(fs[i], &r);
        bad += r != (intptr_t)i;
    }
    return bad;
}

static void test_fiber_100k_and_pool_reuse(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    long max_maps = read_long("/proc/sys/vm/max_map_count");
    if (moor_executor_guard(ex) == MOOR_GUARD_MPROTECT && max_maps >= 0 && max_maps < 3L * MANY) {
        ex_free(ex);
        print_message("mprotect guards need ~2 mappings per stack; vm.max_map_count is %ld\n",
                      max_maps);
        skip();
    }
    moor_fiber **fs = calloc(MANY, sizeof *fs);
    assert_non_null(fs);

    assert_int_equal(spawn_join_many(fs), 0);
    size_t mapped = ex->pool.mapped;
    assert_true(mapped >= MANY);
    assert_int_equal(ex_stats(ex).fibers, 0);

    assert_int_equal(spawn_join_many(fs), 0);
    assert_int_equal(ex->pool.mapped, mapped); /* every stack came from the pool */
    assert_int_equal(ex_stats(ex).fibers, 0);
    assert_int_equal(pooled_stacks(ex), mapped);

    free(fs);
    ex_free(ex);
}

/* ---- misuse: assertions in forked children ------------------------------------------------- */

static void await_outside_child(void *arg)
{
    moor_executor *ex;
    if (arg) /* with an executor, from plain code; else with none at all */
        CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_future fut;
    moor_future_init(&fut, &never_ops, 0);
    moor_await(&fut);
}

static void test_fiber_await_outside_fiber_asserts(void **state)
{
    (void)state;
    child_report r;
    child_run(await_outside_child, (void *)1, &r);
    expect_child_signal(&r, SIGABRT, "outside a fiber");
    expect_child_signal(&r, SIGABRT, "\"never\"");
    child_run(await_outside_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "outside a fiber");
}

static void yield_outside_child(void *arg)
{
    moor_executor *ex;
    if (arg)
        CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_yield();
}

static void test_fiber_yield_outside_fiber_asserts(void **state)
{
    (void)state;
    child_report r;
    child_run(yield_outside_child, (void *)1, &r);
    expect_child_signal(&r, SIGABRT, "moor_yield called outside a fiber");
    child_run(yield_outside_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_yield called outside a fiber");
}

static intptr_t join_arg(void *arg) { return moor_join(arg, NULL); }

static void join_twice_concurrently_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_fiber *target, *j1, *j2;
    moor_fiber_attr attr = {.name = "target"};
    CHILD_REQUIRE(moor_spawn(&target, yield_n, (void *)10, &attr) == 0);
    CHILD_REQUIRE(moor_spawn(&j1, join_arg, target, NULL) == 0);
    CHILD_REQUIRE(moor_spawn(&j2, join_arg, target, NULL) == 0);
    moor_executor_run(ex);
}

static void join_twice_in_turn_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_fiber *f;
    CHILD_REQUIRE(moor_spawn(&f, return_arg, NULL, NULL) == 0);
    CHILD_REQUIRE(moor_join(f, NULL) == 0);
    moor_join(f, NULL);
}

static void test_fiber_join_twice_asserts(void **state)
{
    (void)state;
    child_report r;
    /* Two fibers join the same one while it runs. */
    child_run(join_twice_concurrently_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor: moor_join: fiber 1 \"target\" joined twice");
    /* The handle is joined again after the first join released it. */
    child_run(join_twice_in_turn_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "already joined");
}

static intptr_t join_self_fn(void *arg)
{
    (void)arg;
    return moor_join(moor_self(), NULL);
}

static intptr_t block_on_in_fiber_fn(void *arg)
{
    moor_future fut;
    moor_future_init(&fut, &never_ops, 0);
    (void)arg;
    return moor_block_on(&fut);
}

static intptr_t run_in_fiber_fn(void *arg)
{
    (void)arg;
    return moor_executor_run(moor_executor_current());
}

static intptr_t free_in_fiber_fn(void *arg)
{
    (void)arg;
    moor_executor_free(moor_executor_current());
    return 0;
}

/* Runs the fiber function *arg (not joined: nobody else has claimed the fiber). */
static void fiber_misuse_child(void *arg)
{
    const moor_fiber_fn *fn = arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_fiber *f;
    CHILD_REQUIRE(moor_spawn(&f, *fn, NULL, NULL) == 0);
    moor_executor_run(ex);
}

static const moor_fiber_fn join_self = join_self_fn, block_on_in_fiber = block_on_in_fiber_fn,
                           run_in_fiber = run_in_fiber_fn, free_in_fiber = free_in_fiber_fn;

static void test_fiber_misuse_from_fiber_asserts(void **state)
{
    (void)state;
    child_report r;
    child_run(fiber_misuse_child, (void *)&join_self, &r);
    expect_child_signal(&r, SIGABRT, "moor: moor_join: fiber 1 \"fiber\" joins itself");
    child_run(fiber_misuse_child, (void *)&block_on_in_fiber, &r);
    expect_child_signal(&r, SIGABRT, "moor_block_on called from a fiber");
    child_run(fiber_misuse_child, (void *)&run_in_fiber, &r);
    expect_child_signal(&r, SIGABRT, "inside a fiber");
    child_run(fiber_misuse_child, (void *)&free_in_fiber, &r);
    expect_child_signal(&r, SIGABRT, "moor_executor_free: called while the executor runs");
}

static void free_pending_child(void *arg)
{
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    static moor_future fut;
    if (arg) { /* a fiber that never ran */
        moor_fiber *f;
        CHILD_REQUIRE(moor_spawn(&f, return_arg, NULL, NULL) == 0);
    } else {   /* a plain task that never ran */
        moor_future_init(&fut, &never_ops, 0);
        CHILD_REQUIRE(moor_spawn_future(&fut) == 0);
    }
    moor_executor_free(ex);
}

static void test_fiber_free_with_pending_task_asserts(void **state)
{
    (void)state;
    child_report r;
    child_run(free_pending_child, (void *)1, &r);
    expect_child_signal(&r, SIGABRT, "still pending");
    child_run(free_pending_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "still pending");
}

/* ---- resource exhaustion ------------------------------------------------------------------- */

/* ASan and TSan reserve terabytes of address space and map more as they go: under them
 * RLIMIT_AS cannot be used. */
#if !defined(MOOR_TEST_ASAN) && !UNDER_TSAN
#define EXHAUST_MAX 4096

static void exhaust_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    long pages = -1;
    FILE *statm = fopen("/proc/self/statm", "r");
    CHILD_REQUIRE(statm != NULL);
    CHILD_REQUIRE(fscanf(statm, "%ld", &pages) == 1);
    fclose(statm);
    struct rlimit lim;
    CHILD_REQUIRE(getrlimit(RLIMIT_AS, &lim) == 0);
    lim.rlim_cur = (rlim_t)pages * (rlim_t)sysconf(_SC_PAGESIZE) + (64u << 20);
    CHILD_REQUIRE(setrlimit(RLIMIT_AS, &lim) == 0);

    static moor_fiber *fs[EXHAUST_MAX];
    moor_fiber_attr attr = {.name = "big", .stack_size = 1u << 20};
    int n = 0, rc;
    while ((rc = moor_spawn(&fs[n], return_arg, (void *)(intptr_t)n, &attr)) == 0) {
        n++;
        CHILD_REQUIRE(n < EXHAUST_MAX);
    }
    CHILD_REQUIRE(rc == -ENOMEM);
    CHILD_REQUIRE(n > 0);
    for (int i = 0; i < n; i++) {
        intptr_t r = -1;
        CHILD_REQUIRE(moor_join(fs[i], &r) == 0);
        CHILD_REQUIRE(r == i);
    }
    /* With the stacks back in the pool, spawning works again. */
    moor_fiber *f;
    CHILD_REQUIRE(moor_spawn(&f, return_arg, (void *)5, &attr) == 0);
    intptr_t r = 0;
    CHILD_REQUIRE(moor_join(f, &r) == 0 && r == 5);
    moor_executor_free(ex);
    fprintf(stderr, "%d fibers with 1 MiB stacks before -ENOMEM\n", n);
}
#endif

static void test_fiber_exhaustion_is_enomem(void **state)
{
    (void)state;
#if defined(MOOR_TEST_ASAN) || UNDER_TSAN
    print_message("a sanitizer's shadow memory leaves no room for an address-space limit\n");
    skip();
#else
    child_report r;
    child_run(exhaust_child, NULL, &r);
    expect_child_ok(&r);
    print_message("%s", r.err);
#endif
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_fiber_join_returns_result),
        TEST(test_fiber_self_id_name),
        TEST(test_fiber_join_from_fiber),
        TEST(test_fiber_future_awaited),
        TEST(test_fiber_future_block_on),
        TEST(test_fiber_detached_free_themselves),
        TEST(test_fiber_100k_and_pool_reuse),
        TEST(test_fiber_await_outside_fiber_asserts),
        TEST(test_fiber_yield_outside_fiber_asserts),
        TEST(test_fiber_join_twice_asserts),
        TEST(test_fiber_misuse_from_fiber_asserts),
        TEST(test_fiber_free_with_pending_task_asserts),
        TEST(test_fiber_exhaustion_is_enomem),
    };
    return RUN_TESTS(tests);
}
