/* Allocation failure: every allocation moor makes goes through the allocator installed with
 * moor_set_allocator, which this test makes fail on demand. Whatever fails, the call reports
 * -ENOMEM and the runtime stays usable; nothing crashes, nothing is lost. (tests/test_fault.c
 * fails each allocation of whole scenarios in turn.) */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "moor.h"

#include "fixture.h"

/* While failing is set, every allocation (not frees) fails. */
static int failing;
static unsigned long refused;

static void *failing_malloc(size_t size)
{
    if (failing) {
        refused++;
        return NULL;
    }
    return malloc(size);
}

static void *failing_realloc(void *ptr, size_t size)
{
    if (failing) {
        refused++;
        return NULL;
    }
    return realloc(ptr, size);
}

static intptr_t add_one(void *arg) { return (intptr_t)arg + 1; }

/* Joining from plain code needs no allocation: with every allocation refused, the fiber
 * still runs and its result comes back. */
static void test_alloc_join_from_plain_code_needs_no_memory(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, add_one, (void *)41, NULL), 0); /* a warm stack: no malloc */
    failing = 1;
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    failing = 0;
    assert_int_equal(r, 42);
    ex_free(ex);
}

typedef struct ready_future {
    moor_future base;
} ready_future;

static moor_poll ready_poll(moor_future *fut, moor_cx *cx)
{
    (void)cx;
    fut->result = 7;
    return MOOR_READY;
}

static const moor_future_ops ready_ops = {"ready", ready_poll, NULL};

/* A spawned task needs a slot: without memory, spawning says -ENOMEM and the executor works
 * again once memory is back. moor_block_on needs none (the executor keeps a slot for plain
 * code's one future), so it works without memory. */
static void test_alloc_task_spawn_and_block_on(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    ready_future a;
    moor_future_init(&a.base, &ready_ops, 0);
    failing = 1;
    assert_int_equal(moor_spawn_future(&a.base), -ENOMEM);
    assert_int_equal(moor_block_on(&a.base), 7);
    failing = 0;
    moor_future_init(&a.base, &ready_ops, 0);
    assert_int_equal(moor_block_on(&a.base), 7);
    ex_free(ex);
}

static void test_alloc_chan_new(void **state)
{
    (void)state;
    moor_chan *ch = NULL;
    failing = 1;
    assert_int_equal(moor_chan_new(&ch, sizeof(int), 4), -ENOMEM);
    failing = 0;
    assert_int_equal(moor_chan_new(&ch, sizeof(int), 4), 0);
    moor_chan_free(ch);
}

static intptr_t sleeper(void *arg)
{
    return moor_sleep(moor_deadline_in((int64_t)(intptr_t)arg));
}

/* The timer heap grows on the first sleep: refused, the sleep reports -ENOMEM rather than
 * sleeping forever or not at all. The refused sleep's deadline is far off: one already past
 * when the fiber gets to it (a slow machine, valgrind) would return 0 without the heap. */
static void test_alloc_timer_heap(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, sleeper, (void *)(intptr_t)60000, NULL), 0);
    failing = 1;
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    failing = 0;
    assert_int_equal(r, -ENOMEM);
    assert_true(refused > 0);
    assert_int_equal(moor_spawn(&f, sleeper, (void *)(intptr_t)1, NULL), 0);
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 0);
    ex_free(ex);
}

/* A child of a scope that waits on an event until cancelled. */
typedef struct event_kid {
    moor_event *ev;
    int rc;
    int returned;
} event_kid;

static intptr_t event_kid_fn(void *arg)
{
    event_kid *k = arg;
    k->rc = moor_event_wait(k->ev, -1);
    k->returned = 1;
    return k->rc;
}

#define SCOPE_KIDS 3

typedef struct scope_owner {
    moor_event ev;
    event_kid kids[SCOPE_KIDS];
    size_t count_before, count_after;
    int kids_returned_before; /* children that had returned when the close began */
    int kids_returned_after;  /* ...and when it returned */
    int close_rc;
} scope_owner;

/* The scope's owner is a fiber: its wait needs no task slot (plain code's would), so the
 * one allocation the close asks for is the deadline's timer. */
static intptr_t scope_owner_fn(void *arg)
{
    scope_owner *o = arg;
    moor_scope scope;
    moor_scope_init(&scope);
    for (int i = 0; i < SCOPE_KIDS; i++) {
        o->kids[i] = (event_kid){.ev = &o->ev, .rc = 1};
        FCHECK(moor_scope_spawn(&scope, event_kid_fn, &o->kids[i], NULL) == 0);
    }
    moor_yield(); /* every child runs and waits on the event */
    o->count_before = scope.count;
    for (int i = 0; i < SCOPE_KIDS; i++)
        o->kids_returned_before += o->kids[i].returned;
    failing = 1;
    o->close_rc = moor_scope_close(&scope, moor_deadline_in(SAFETY_MS));
    failing = 0;
    o->count_after = scope.count;
    for (int i = 0; i < SCOPE_KIDS; i++)
        o->kids_returned_after += o->kids[i].returned;
    return 0;
}

/* moor_scope_close with a deadline, when the deadline's timer cannot be had (the timer heap
 * of a fresh executor is empty, and growing it is refused): the children are cancelled
 * anyway, so the close waits them out without the deadline and returns 0, each child having
 * returned with -ECANCELED and the scope empty. It does not give up on them with -ENOMEM. */
static void test_alloc_scope_close_without_timer(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    scope_owner o = {.ev = MOOR_EVENT_INIT};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, scope_owner_fn, &o, NULL), 0);
    refused = 0;
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(failing, 0);
    assert_true(refused > 0); /* the deadline's timer was refused */
    assert_int_equal(o.count_before, SCOPE_KIDS);
    assert_int_equal(o.kids_returned_before, 0);
    assert_int_equal(o.close_rc, 0);
    assert_int_equal(o.count_after, 0);
    assert_int_equal(o.kids_returned_after, SCOPE_KIDS); /* waited out, not let go */
    for (int i = 0; i < SCOPE_KIDS; i++)
        assert_int_equal(o.kids[i].rc, -ECANCELED);
    ex_free(ex);
}

/* A child whose cleanup takes a few turns, so that a close from plain code polls its wait
 * (and asks for the deadline's timer) before the children have returned. */
static intptr_t slow_kid_fn(void *arg)
{
    event_kid *k = arg;
    k->rc = moor_event_wait(k->ev, -1);
    for (int i = 0; i < 3; i++)
        moor_yield();
    k->returned = 1;
    return k->rc;
}

/* The same from plain code, whose wait takes the executor's block_on slot: the close needs
 * no memory but the deadline's timer, and waits its children out without it. */
static void test_alloc_scope_close_from_plain_code_without_memory(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    scope_owner o = {.ev = MOOR_EVENT_INIT};
    moor_scope scope;
    moor_scope_init(&scope);
    for (int i = 0; i < SCOPE_KIDS; i++) {
        o.kids[i] = (event_kid){.ev = &o.ev, .rc = 1};
        assert_int_equal(moor_scope_spawn(&scope, slow_kid_fn, &o.kids[i], NULL), 0);
    }
    settle(); /* every child runs and waits on the event */
    assert_int_equal(scope.count, SCOPE_KIDS);
    refused = 0;
    failing = 1;
    int rc = moor_scope_close(&scope, moor_deadline_in(SAFETY_MS));
    failing = 0;
    assert_true(refused > 0);
    assert_int_equal(rc, 0);
    assert_int_equal(scope.count, 0);
    for (int i = 0; i < SCOPE_KIDS; i++) {
        assert_int_equal(o.kids[i].returned, 1); /* waited out, not let go */
        assert_int_equal(o.kids[i].rc, -ECANCELED);
    }
    ex_free(ex);
}

/* A fiber stack of a new size needs its pool bucket: refused, spawn says -ENOMEM. */
static void test_alloc_spawn_new_stack_size(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_fiber *f;
    moor_fiber_attr attr = {.stack_size = 512 * 1024};
    failing = 1;
    assert_int_equal(moor_spawn(&f, add_one, NULL, &attr), -ENOMEM);
    failing = 0;
    assert_int_equal(moor_spawn(&f, add_one, (void *)1, &attr), 0);
    intptr_t r;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 2);
    ex_free(ex);
}

/* Three NULLs put libc's allocator back: with the failing one set to fail, a channel is
 * made all the same; the failing one installed again, it fails. */
static void test_alloc_set_allocator_null_restores_libc(void **state)
{
    (void)state;
    moor_chan *ch = NULL;
    moor_set_allocator(NULL, NULL, NULL);
    failing = 1;
    refused = 0;
    assert_int_equal(moor_chan_new(&ch, sizeof(int), 4), 0);
    moor_chan_free(ch);
    assert_int_equal(refused, 0);
    moor_set_allocator(failing_malloc, failing_realloc, free);
    assert_int_equal(moor_chan_new(&ch, sizeof(int), 4), -ENOMEM);
    failing = 0;
    assert_true(refused > 0);
}

static void set_allocator_with_executor(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_set_allocator(NULL, NULL, NULL);
}

static void set_allocator_half(void *arg)
{
    (void)arg;
    moor_set_allocator(malloc, NULL, free);
}

/* Misuse: changing the allocator while an executor exists (its memory would be freed with
 * another allocator than the one that made it), or giving only some of the functions. */
static void test_alloc_set_allocator_misuse(void **state)
{
    (void)state;
    child_report r;
    child_run(set_allocator_with_executor, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_set_allocator: 1 executor(s) exist");
    child_run(set_allocator_half, NULL, &r);
    expect_child_signal(&r, SIGABRT, "give all three functions");
}

int main(void)
{
    child_signals_save();
    moor_set_allocator(failing_malloc, failing_realloc, free);
    const struct CMUnitTest tests[] = {
        TEST(test_alloc_join_from_plain_code_needs_no_memory),
        TEST(test_alloc_task_spawn_and_block_on),
        TEST(test_alloc_scope_close_from_plain_code_without_memory),
        TEST(test_alloc_chan_new),
        TEST(test_alloc_timer_heap),
        TEST(test_alloc_scope_close_without_timer),
        TEST(test_alloc_spawn_new_stack_size),
        TEST(test_alloc_set_allocator_null_restores_libc),
        TEST(test_alloc_set_allocator_misuse),
    };
    return RUN_TESTS(tests);
}
