/* Fiber stacks: guard pages and overflow diagnosis, stack sizes, the stack pool.
 *
 * ctest runs this program with ASAN_OPTIONS=handle_segv=0, so that under ASan the guard-page
 * fault reaches moor's SIGSEGV handler instead of ASan's. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

#include "moor.h"

#include "fixture.h"

/* White-box: the pool's buckets, guard size and a fiber's stack bounds are what this tests. */
#include "fiber/executor.h"
#include "fiber/stack.h"

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif

#define KiB 1024u

#ifdef MOOR_TEST_ASAN
/* The guard-page fault must reach moor's handler, not ASan's: what ctest sets in
 * ASAN_OPTIONS, also when the program is run by hand. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "handle_segv=0"; }
#endif

/* Does this kernel have MADV_GUARD_INSTALL (Linux 6.13+)? Asked independently of moor. */
static int kernel_has_guard_install(void)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void *p = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(p != MAP_FAILED);
    int ok = madvise(p, page, MADV_GUARD_INSTALL) == 0;
    munmap(p, 2 * page);
    return ok;
}

/* Skip (visibly) a test that needs an executor with `mode` when the kernel cannot give it. */
static void require_guard_mode(moor_guard_mode mode)
{
    moor_executor_attr attr = {.guard = mode};
    moor_executor *ex;
    int rc = moor_executor_new(&ex, &attr);
    if (rc == -EINVAL) {
        print_message("guard mode %d not available on this kernel\n", (int)mode);
        skip();
    }
    assert_int_equal(rc, 0);
    moor_executor_free(ex);
}

/* Resident pages in [lo, lo + len) (both page-aligned). */
static size_t resident_pages(const char *lo, size_t len)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t n = len / page, resident = 0;
    unsigned char *vec = malloc(n);
    assert_non_null(vec);
    assert_int_equal(mincore((void *)lo, len, vec), 0);
    for (size_t i = 0; i < n; i++)
        resident += vec[i] & 1;
    free(vec);
    return resident;
}

static moor__stack_bucket *default_bucket(moor_executor *ex)
{
    for (size_t i = 0; i < ex->pool.nbuckets; i++)
        if (ex->pool.buckets[i].map_size == ex->stack_map_size)
            return &ex->pool.buckets[i];
    return NULL;
}

/* ---- overflow ------------------------------------------------------------------------------ */

static volatile int recurse_limit = INT_MAX;

/* A frame of at least 512 bytes, touched at both ends, and a call that is not a tail call:
 * the compiler can neither make this a loop nor skip over the guard. */
__attribute__((noinline)) static int recurse(int depth)
{
    volatile char pad[512];
    pad[0] = (char)depth;
    pad[sizeof pad - 1] = (char)depth;
    if (depth >= recurse_limit)
        return pad[0];
    return recurse(depth + 1) + pad[sizeof pad - 1];
}

static intptr_t deep_fn(void *arg)
{
    (void)arg;
    return recurse(0);
}

static void overflow_child(void *arg)
{
    moor_executor_attr attr = {.guard = *(const moor_guard_mode *)arg};
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, &attr) == 0);
    CHILD_REQUIRE(moor_executor_guard(ex) == attr.guard);
    moor_fiber_attr fattr = {.name = "deep", .stack_size = 64 * KiB};
    moor_fiber *f;
    CHILD_REQUIRE(moor_spawn(&f, deep_fn, NULL, &fattr) == 0);
    moor_join(f, NULL);
    fprintf(stderr, "the fiber returned from endless recursion\n");
}

static void check_overflow_diagnosed(moor_guard_mode mode)
{
    require_guard_mode(mode);
    child_report r;
    child_run(overflow_child, &mode, &r);
    expect_child_signal(&r, SIGABRT, "moor: fiber 1 \"deep\" overflowed its 64 KiB stack\n");
}

static void test_stack_overflow_diagnosed_madvise(void **state)
{
    (void)state;
    check_overflow_diagnosed(MOOR_GUARD_MADVISE);
}

static void test_stack_overflow_diagnosed_mprotect(void **state)
{
    (void)state;
    check_overflow_diagnosed(MOOR_GUARD_MPROTECT);
}

/* ---- guard modes --------------------------------------------------------------------------- */

static void test_stack_guard_mode(void **state)
{
    (void)state;
    int have = kernel_has_guard_install();
    /* AUTO, unless the environment says otherwise (test_stack_guard_mode_from_env) */
    const char *env = getenv("MOOR_GUARD");
    moor_executor *ex;
    if (env && strcmp(env, "madvise") == 0 && !have) {
        assert_int_equal(moor_executor_new(&ex, NULL), -EINVAL);
    } else {
        ex = ex_new();
        moor_guard_mode expect = have ? MOOR_GUARD_MADVISE : MOOR_GUARD_MPROTECT;
        if (env && strcmp(env, "mprotect") == 0)
            expect = MOOR_GUARD_MPROTECT;
        assert_int_equal(moor_executor_guard(ex), expect);
        ex_free(ex);
    }

    moor_executor_attr attr = {.guard = MOOR_GUARD_MPROTECT};
    ex = ex_new_attr(&attr);
    assert_int_equal(moor_executor_guard(ex), MOOR_GUARD_MPROTECT);
    ex_free(ex);

    attr.guard = MOOR_GUARD_MADVISE;
    int rc = moor_executor_new(&ex, &attr);
    if (have) {
        assert_int_equal(rc, 0);
        assert_int_equal(moor_executor_guard(ex), MOOR_GUARD_MADVISE);
        ex_free(ex);
    } else {
        assert_int_equal(rc, -EINVAL);
        assert_null(moor_executor_current());
    }
}

/* ---- an overflow inside a switch ---------------------------------------------------------------
 * A fiber whose stack is all but full calls moor_yield: the switch's own frames (and the
 * registers ontop_fcontext saves) land in the guard after the executor already names the next
 * context as current. Tried with a range of room left, so that the fault happens at every
 * point of the switch path; every one must be named. */

struct squeeze {
    size_t room; /* bytes of stack left below the frame that yields */
};

__attribute__((noinline)) static void yield_with_room(size_t room)
{
    moor_fiber *f = moor_self();
    char *lo = f->stack_base + f->ex->pool.guard;
    volatile char here;
    size_t left = (size_t)((char *)&here - lo);
    volatile char *eat = __builtin_alloca(left > room ? left - room : 1);
    eat[0] = 1;
    moor_yield();
    eat[0] = 2;
}

static intptr_t squeezed_fn(void *arg)
{
    yield_with_room(((struct squeeze *)arg)->room);
    return 0;
}

static intptr_t bystander_fn(void *arg)
{
    (void)arg;
    for (int i = 0; i < 4; i++)
        moor_yield();
    return 0;
}

static void squeeze_child(void *arg)
{
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_fiber_attr fattr = {.name = "squeezed", .stack_size = 64 * KiB};
    moor_fiber *f, *other;
    CHILD_REQUIRE(moor_spawn(&other, bystander_fn, NULL, NULL) == 0);
    CHILD_REQUIRE(moor_spawn(&f, squeezed_fn, arg, &fattr) == 0);
    moor_join(f, NULL);
    moor_join(other, NULL);
    fprintf(stderr, "the squeezed fiber yielded without touching its guard\n");
}

static void test_stack_overflow_in_switch_named(void **state)
{
    (void)state;
#ifdef MOOR_TEST_ASAN
    print_message("ASan's own frames around alloca change what is left: not meaningful\n");
    skip();
#endif
    int faulted = 0;
    for (size_t room = 8; room <= 512; room += 8) {
        struct squeeze sq = {room};
        child_report r;
        child_run(squeeze_child, &sq, &r);
        if (WIFEXITED(r.status) && WEXITSTATUS(r.status) == 0)
            continue; /* enough room for the whole switch */
        faulted++;
        if (!strstr(r.err, "moor: fiber 2 \"squeezed\" overflowed its 64 KiB stack\n"))
            fail_msg("with %zu bytes left, the fault in the switch was not named: status %d, "
                     "stderr: %s", room, r.status, r.err);
    }
    assert_true(faulted > 0); /* the smallest rooms do fault */
}

/* ---- a frame larger than the guard --------------------------------------------------------
 * Without stack-clash protection a 256 KiB frame moves the stack pointer past the 64 KiB
 * guard in one step and the first store lands in whatever lies below. moor builds (and tells
 * users to build, through moor.pc and its CMake package) with -fstack-clash-protection, which
 * probes every page of a large frame: the guard is hit and the overflow named. */
__attribute__((noinline)) static int huge_frame(int x)
{
    volatile char big[256 * KiB];
    big[0] = (char)x;
    big[sizeof big - 1] = (char)x;
    return big[0] + big[sizeof big - 1];
}

static intptr_t huge_frame_fn(void *arg)
{
    return huge_frame((int)(intptr_t)arg);
}

static void huge_frame_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_fiber_attr fattr = {.name = "huge", .stack_size = 64 * KiB};
    moor_fiber *f;
    CHILD_REQUIRE(moor_spawn(&f, huge_frame_fn, (void *)1, &fattr) == 0);
    moor_join(f, NULL);
    fprintf(stderr, "a 256 KiB frame ran on a 64 KiB stack\n");
}

static void test_stack_frame_larger_than_guard_named(void **state)
{
    (void)state;
#ifdef MOOR_TEST_ASAN
    print_message("ASan moves large locals to a fake stack: not meaningful\n");
    skip();
#endif
    child_report r;
    child_run(huge_frame_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor: fiber 1 \"huge\" overflowed its 64 KiB stack\n");
}

/* ---- sizes near SIZE_MAX ----------------------------------------------------------------- */

static void test_stack_impossible_sizes_refused(void **state)
{
    (void)state;
    moor_executor *ex;
    moor_executor_attr attr = {.stack_size = SIZE_MAX};
    assert_int_equal(moor_executor_new(&ex, &attr), -EINVAL);
    attr = (moor_executor_attr){.guard_size = SIZE_MAX};
    assert_int_equal(moor_executor_new(&ex, &attr), -EINVAL);
    attr = (moor_executor_attr){.stack_size = SIZE_MAX - 4096, .guard_size = SIZE_MAX / 2};
    assert_int_equal(moor_executor_new(&ex, &attr), -EINVAL);
    attr = (moor_executor_attr){.blocking_threads = SIZE_MAX};
    assert_int_equal(moor_executor_new(&ex, &attr), -EINVAL);
    /* Large but representable: the mapping is refused by the kernel, not wrapped. */
    attr = (moor_executor_attr){.stack_size = (size_t)1 << 60};
    assert_int_equal(moor_executor_new(&ex, &attr), -ENOMEM);
    assert_null(moor_executor_current());

    ex = ex_new();
    moor_fiber *f;
    const size_t sizes[] = {SIZE_MAX, SIZE_MAX - 1, SIZE_MAX / 2, SIZE_MAX / 2 - 4096};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        moor_fiber_attr fattr = {.stack_size = sizes[i]};
        assert_int_equal(moor_spawn(&f, return_arg, NULL, &fattr), -EINVAL);
    }
    moor_fiber_attr big = {.stack_size = (size_t)1 << 60};
    assert_int_equal(moor_spawn(&f, return_arg, NULL, &big), -ENOMEM);
    /* The executor still works, with a guard, at the sizes asked for. */
    moor_fiber_attr ok = {.stack_size = 64 * KiB};
    assert_int_equal(moor_spawn(&f, return_arg, (void *)3, &ok), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 3);
    assert_true(ex->pool.guard >= 64 * KiB);
    ex_free(ex);
}

/* ---- a fault that is not an overflow ------------------------------------------------------- */

/* Not instrumented: UBSan would report the null store itself instead of letting it fault. */
__attribute__((noinline, no_sanitize("address", "undefined"))) static void write_null(void)
{
    volatile int *p = NULL;
    __asm__ volatile("" : "+r"(p)); /* the compiler may not assume anything about p now */
    *p = 1;
}

static intptr_t write_null_fn(void *arg)
{
    (void)arg;
    write_null();
    return 0;
}

static void segv_child(void *arg)
{
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    if (arg) {
        moor_fiber_attr fattr = {.name = "faulty"};
        moor_fiber *f;
        CHILD_REQUIRE(moor_spawn(&f, write_null_fn, NULL, &fattr) == 0);
        moor_join(f, NULL);
    } else {
        write_null();
    }
    fprintf(stderr, "survived a null write\n");
}

/* The child died of its null write: of SIGSEGV, once moor's handler has put the default
 * action back; under TSan, maybe in TSan's own report of the fault instead (on the
 * development VM it ends "nested bug in the same thread" and exits 66, with the code of
 * a6986a7 too: TSan's handler, not moor's). */
static void expect_segv_death(const child_report *r)
{
#ifdef MOOR_TEST_TSAN
    if (WIFEXITED(r->status) && strstr(r->err, "ThreadSanitizer: SEGV on unknown address")) {
        print_message("TSan reported the fault itself\n");
        return;
    }
#endif
    expect_child_signal(r, SIGSEGV, NULL);
}

static void test_stack_other_segfault_not_overflow(void **state)
{
    (void)state;
    child_report r;
    child_run(segv_child, (void *)1, &r); /* in a fiber */
    expect_segv_death(&r);
    assert_null(strstr(r.err, "overflowed"));
    child_run(segv_child, NULL, &r); /* in plain code */
    expect_segv_death(&r);
    assert_null(strstr(r.err, "overflowed"));
}

/* ---- stack sizes --------------------------------------------------------------------------- */

struct stack_use {
    size_t touch;              /* bytes of stack to use */
    char *used_lo, *used_hi;   /* what the fiber used */
    char *stack_lo, *stack_hi; /* its usable stack (white-box) */
    size_t stack_size;         /* as recorded in its control block */
};

__attribute__((noinline)) static void touch_stack(struct stack_use *u)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    volatile char *buf = __builtin_alloca(u->touch);
    for (size_t i = 0; i < u->touch; i += page)
        buf[i] = (char)i;
    buf[u->touch - 1] = 1;
    u->used_lo = (char *)buf;
    u->used_hi = (char *)buf + u->touch;
}

static intptr_t stack_use_fn(void *arg)
{
    struct stack_use *u = arg;
    moor_fiber *self = moor_self();
    u->stack_lo = self->stack_base + self->ex->pool.guard;
    u->stack_hi = (char *)self;
    u->stack_size = moor__fiber_stack_size(self->ex, self);
    touch_stack(u);
    return 0;
}

static void test_stack_size_per_fiber(void **state)
{
    (void)state;
    moor_executor_attr attr = {.stack_size = 128 * KiB};
    moor_executor *ex = ex_new_attr(&attr);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);

    /* A 1 MiB stack holds 900 KiB of locals. */
    struct stack_use u = {.touch = 900 * KiB};
    moor_fiber_attr big = {.stack_size = 1024 * KiB};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, stack_use_fn, &u, &big), 0);
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(u.stack_size, 1024 * KiB);
    assert_true((size_t)(u.stack_hi - u.stack_lo) >= 1024 * KiB);
    assert_true((size_t)(u.stack_hi - u.stack_lo) < 1024 * KiB + 2 * page);
    assert_true(u.used_lo >= u.stack_lo && u.used_hi <= u.stack_hi);

    /* The executor's default, and a size that is not a page multiple (rounded up). */
    u = (struct stack_use){.touch = 100 * KiB};
    assert_int_equal(moor_spawn(&f, stack_use_fn, &u, NULL), 0);
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(u.stack_size, 128 * KiB);
    assert_true((size_t)(u.stack_hi - u.stack_lo) >= 128 * KiB);
    assert_true(u.used_lo >= u.stack_lo && u.used_hi <= u.stack_hi);

    u = (struct stack_use){.touch = 90000};
    moor_fiber_attr odd = {.stack_size = 100000};
    assert_int_equal(moor_spawn(&f, stack_use_fn, &u, &odd), 0);
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(u.stack_size, (100000 + page - 1) / page * page);
    assert_true((size_t)(u.stack_hi - u.stack_lo) >= 100000);
    assert_true(u.used_lo >= u.stack_lo && u.used_hi <= u.stack_hi);
    ex_free(ex);
}

static void test_stack_guard_size_rounded(void **state)
{
    (void)state;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    moor_executor *ex = ex_new();
    assert_int_equal(ex->pool.guard, 64 * KiB);
    ex_free(ex);
    moor_executor_attr attr = {.guard_size = 10000};
    ex = ex_new_attr(&attr);
    assert_int_equal(ex->pool.guard, (10000 + page - 1) / page * page);
    ex_free(ex);
}

/* ---- reuse under ASan ------------------------------------------------------------------------ */

#ifdef MOOR_TEST_ASAN
/* A first frame with an addressable local right below fiber_entry: where the previous fiber
 * on this stack left the frames of its last switch, which never return. */
static intptr_t use_first_frame(void *arg)
{
    char local[192];
    memset(local, (int)(intptr_t)arg, sizeof local);
    __asm__ volatile("" : : "r"(local) : "memory");
    return local[sizeof local - 1];
}

static void asan_reuse_child(void *arg)
{
    (void)arg;
    /* Round 2 maps its stacks where round 1's freed executor had them (munmap, mmap). */
    for (int round = 0; round < 2; round++) {
        moor_executor *ex;
        CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
        for (intptr_t i = 1; i <= 3; i++) { /* the pool hands the same stack back each time */
            moor_fiber *f;
            intptr_t r = 0;
            CHILD_REQUIRE(moor_spawn(&f, use_first_frame, (void *)i, NULL) == 0);
            CHILD_REQUIRE(moor_join(f, &r) == 0 && r == i);
        }
        moor_executor_free(ex);
    }
}
#endif

/* ASan keeps shadow state for every stack frame; a stack that comes back from the pool (or is
 * mapped again at the same address) must not carry the previous fiber's poisoning, or ASan
 * reports a stack-buffer-overflow in perfectly good code of the next fiber. */
static void test_stack_reuse_leaves_no_asan_poison(void **state)
{
    (void)state;
#ifndef MOOR_TEST_ASAN
    print_message("only meaningful under ASan (MOOR_ASAN)\n");
    skip();
#else
    child_report r;
    child_run(asan_reuse_child, NULL, &r);
    expect_child_ok(&r);
#endif
}

/* ---- the pool ------------------------------------------------------------------------------ */

static void test_stack_pool_lifo(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_fiber *a, *b, *x, *y;
    assert_int_equal(moor_spawn(&a, return_arg, NULL, NULL), 0);
    assert_int_equal(moor_join(a, NULL), 0);
    assert_int_equal(moor_spawn(&b, return_arg, NULL, NULL), 0);
    assert_ptr_equal(b, a);
    assert_int_equal(moor_join(b, NULL), 0);

    assert_int_equal(moor_spawn(&x, return_arg, NULL, NULL), 0);
    assert_int_equal(moor_spawn(&y, return_arg, NULL, NULL), 0);
    assert_ptr_not_equal(x, y);
    assert_int_equal(moor_join(x, NULL), 0);
    assert_int_equal(moor_join(y, NULL), 0);
    assert_int_equal(moor_spawn(&a, return_arg, NULL, NULL), 0);
    assert_ptr_equal(a, y); /* freed last, reused first */
    assert_int_equal(moor_spawn(&b, return_arg, NULL, NULL), 0);
    assert_ptr_equal(b, x);
    assert_int_equal(moor_join(a, NULL), 0);
    assert_int_equal(moor_join(b, NULL), 0);

    /* Stacks of another size come from their own bucket. */
    moor_fiber_attr other = {.stack_size = 512 * KiB};
    assert_int_equal(moor_spawn(&a, return_arg, NULL, &other), 0);
    assert_ptr_not_equal(a, x);
    assert_ptr_not_equal(a, y);
    assert_int_equal(moor_join(a, NULL), 0);
    assert_int_equal(moor_spawn(&b, return_arg, NULL, &other), 0);
    assert_ptr_equal(b, a);
    assert_int_equal(moor_join(b, NULL), 0);
    ex_free(ex);
}

#define TRIM_HOT 4
#define TRIM_FIBERS (TRIM_HOT + MOOR__STACK_TRIM_BATCH)
#define TRIM_TOUCH (128 * KiB)

static intptr_t touch_128k(void *arg)
{
    (void)arg;
    struct stack_use u = {.touch = TRIM_TOUCH};
    touch_stack(&u);
    return 0;
}

/* Spawn n fibers at once that each touch TRIM_TOUCH of their stack, join them. */
static void spawn_touch_join(int n)
{
    moor_fiber *f[TRIM_FIBERS];
    for (int i = 0; i < n; i++)
        if (moor_spawn(&f[i], touch_128k, NULL, NULL) != 0)
            abort();
    for (int i = 0; i < n; i++)
        moor_join(f[i], NULL);
}

static size_t usable_resident(moor_executor *ex, const char *base)
{
    return resident_pages(base + ex->pool.guard, ex->stack_map_size - ex->pool.guard);
}

/* Past pool_hot, freed stacks give their memory back in batches: a full batch at once when
 * it fills, a partial one when the pool is trimmed. */
static void test_stack_pool_gives_memory_back(void **state)
{
    (void)state;
    moor_executor_attr attr = {.pool_hot = TRIM_HOT};
    moor_executor *ex = ex_new_attr(&attr);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    spawn_touch_join(TRIM_FIBERS);

    moor__stack_bucket *b = default_bucket(ex);
    assert_non_null(b);
    assert_int_equal(b->nhot, TRIM_HOT);
    assert_int_equal(b->ncold, TRIM_FIBERS - TRIM_HOT);
    assert_int_equal(b->untrimmed, 0); /* the batch filled: given back without being asked */
    for (size_t i = 0; i < b->ncold; i++)
        assert_int_equal(usable_resident(ex, b->cold[i]), 0);
    for (size_t i = 0; i < b->nhot; i++)
        assert_true(usable_resident(ex, b->hot[i]) >= TRIM_TOUCH / page);

    /* A partial batch stays resident until the pool is trimmed. */
    spawn_touch_join(TRIM_HOT + 3);
    assert_int_equal(b->untrimmed, 3);
    for (size_t i = b->ncold - 3; i < b->ncold; i++)
        assert_true(usable_resident(ex, b->cold[i]) >= TRIM_TOUCH / page);
    moor__stack_pool_trim(&ex->pool);
    assert_int_equal(b->untrimmed, 0);
    for (size_t i = 0; i < b->ncold; i++)
        assert_int_equal(usable_resident(ex, b->cold[i]), 0);
    ex_free(ex);
}

/* A freed fiber's control block stays readable, and reads as free, before and after its
 * memory is given back: what a stale waker relies on. */
static void test_stack_stale_control_block_reads_free(void **state)
{
    (void)state;
    moor_executor_attr attr = {.pool_hot = 1};
    moor_executor *ex = ex_new_attr(&attr);
    moor_fiber *f[8];
    for (int i = 0; i < 8; i++)
        assert_int_equal(moor_spawn(&f[i], return_arg, (void *)(intptr_t)(i + 1), NULL), 0);
    for (int i = 0; i < 8; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    for (int i = 0; i < 8; i++)
        assert_int_equal(((volatile moor_fiber *)f[i])->state, MOOR__FIBER_FREE);
    moor__stack_bucket *b = default_bucket(ex);
    assert_int_equal(b->nhot, 1);
    assert_int_equal(b->untrimmed, 7);
    moor__stack_pool_trim(&ex->pool);
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t zeroed = 0;
    for (int i = 0; i < 8; i++) {
        /* Asked before reading: a read maps the zero page, which mincore counts. */
        char *top = (char *)((uintptr_t)f[i] & ~(uintptr_t)(page - 1));
        int given_back = resident_pages(top, page) == 0;
        volatile moor_fiber *v = f[i];
        assert_int_equal(v->state, MOOR__FIBER_FREE);
        if (given_back) {
            assert_true(v->ex == NULL && v->id == 0); /* reads as zeros */
            zeroed++;
        }
    }
    assert_int_equal(zeroed, 7); /* all but the hot one */
    ex_free(ex);
}

static int in_list(char *const *v, size_t n, const char *x)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] == x)
            return 1;
    return 0;
}

/* After the pool has gone cold, a fiber on a cold stack overflows into a guard still there.
 * The stack is one whose lower neighbour was given back with it, so that its guard lay inside
 * one coalesced MADV_DONTNEED. */
static void cold_overflow_child(void *arg)
{
    moor_executor_attr attr = {.pool_hot = TRIM_HOT, .guard = *(const moor_guard_mode *)arg};
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, &attr) == 0);
    spawn_touch_join(TRIM_FIBERS);
    moor__stack_bucket *b = default_bucket(ex);
    CHILD_REQUIRE(b && b->nhot == TRIM_HOT && b->ncold > 0 && b->untrimmed == 0);
    size_t at = b->ncold;
    while (at-- > 0 && !in_list(b->cold, b->ncold, b->cold[at] - b->map_size))
        ;
    CHILD_REQUIRE(at < b->ncold);
    char *cold = b->cold[at];
    CHILD_REQUIRE(usable_resident(ex, cold) == 0);

    /* Take the hot stacks, and the cold ones above ours. */
    moor_fiber *holders[TRIM_FIBERS], *f;
    size_t nholders = TRIM_HOT + (b->ncold - 1 - at);
    for (size_t i = 0; i < nholders; i++)
        CHILD_REQUIRE(moor_spawn(&holders[i], return_arg, NULL, NULL) == 0);
    CHILD_REQUIRE(b->nhot == 0);
    moor_fiber_attr fattr = {.name = "deep"};
    CHILD_REQUIRE(moor_spawn(&f, deep_fn, NULL, &fattr) == 0);
    CHILD_REQUIRE(f->stack_base == cold);
    moor_join(f, NULL);
    fprintf(stderr, "the fiber returned from endless recursion\n");
}

static void check_cold_stack_keeps_guard(moor_guard_mode mode)
{
    require_guard_mode(mode);
    child_report r;
    child_run(cold_overflow_child, &mode, &r);
    expect_child_signal(&r, SIGABRT, "\"deep\" overflowed its 256 KiB stack\n");
}

static void test_stack_cold_stack_keeps_guard_madvise(void **state)
{
    (void)state;
    check_cold_stack_keeps_guard(MOOR_GUARD_MADVISE);
}

static void test_stack_cold_stack_keeps_guard_mprotect(void **state)
{
    (void)state;
    check_cold_stack_keeps_guard(MOOR_GUARD_MPROTECT);
}

/* ---- slabs ------------------------------------------------------------------------------
 * Stacks are carved from large reservations, side by side: each must still be distinct and
 * have its own guard, or an overflow would run silently into its neighbour's control block. */

#define SLAB_FIBERS 100

static int by_address(const void *a, const void *b)
{
    const char *x = *(char *const *)a, *y = *(char *const *)b;
    return (x > y) - (x < y);
}

/* Does reading `addr` fault? Asked of the kernel (write from it to a pipe: EFAULT), which
 * does not raise a signal. */
static int faults(int fd, const char *addr)
{
    return write(fd, addr, 1) == -1 && errno == EFAULT;
}

static void test_stack_slab_stacks_distinct_and_guarded(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_fiber *f[SLAB_FIBERS];
    char *base[SLAB_FIBERS];
    for (int i = 0; i < SLAB_FIBERS; i++) {
        assert_int_equal(moor_spawn(&f[i], return_arg, NULL, NULL), 0);
        base[i] = f[i]->stack_base;
    }
    moor__stack_counts c;
    moor__stack_pool_counts(&ex->pool, &c);
    assert_int_equal(c.mapped, SLAB_FIBERS);
    assert_true(c.slabs < SLAB_FIBERS / 8); /* many stacks a reservation */
    assert_true(c.reserved >= SLAB_FIBERS * ex->stack_map_size);
    assert_true(c.reserved <= 4 * SLAB_FIBERS * ex->stack_map_size);

    /* Distinct, not overlapping, and many side by side. */
    qsort(base, SLAB_FIBERS, sizeof *base, by_address);
    size_t adjacent = 0;
    for (int i = 1; i < SLAB_FIBERS; i++) {
        assert_true(base[i] >= base[i - 1] + ex->stack_map_size);
        adjacent += base[i] == base[i - 1] + ex->stack_map_size;
    }
    assert_true(adjacent >= SLAB_FIBERS / 2);

    /* Every guard faults, at both ends; the usable stack does not. Memcheck would report the
     * deliberate bad reads: the overflow tests below cover it there. */
    if (!UNDER_VALGRIND) {
        int fds[2];
        assert_int_equal(pipe2(fds, O_NONBLOCK), 0);
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        for (int i = 0; i < SLAB_FIBERS; i++) {
            assert_true(faults(fds[1], base[i]));
            assert_true(faults(fds[1], base[i] + ex->pool.guard - page));
            char drain[8];
            assert_false(faults(fds[1], base[i] + ex->stack_map_size - page));
            assert_int_equal(read(fds[0], drain, sizeof drain), 1);
        }
        close(fds[0]);
        close(fds[1]);
    }
    for (int i = 0; i < SLAB_FIBERS; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    moor__stack_pool_counts(&ex->pool, &c);
    assert_int_equal(c.mapped, SLAB_FIBERS);
    assert_int_equal(c.hot + c.cold, SLAB_FIBERS);
    assert_int_equal(c.hot, 64); /* the default pool_hot */
    ex_free(ex);
}

/* A fiber whose stack sits right above a neighbour's in the same slab overflows into its
 * own guard, not into the neighbour. */
static void neighbour_overflow_child(void *arg)
{
    moor_executor_attr attr = {.guard = *(const moor_guard_mode *)arg};
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, &attr) == 0);
    moor__stack_bucket *b = default_bucket(ex);
    moor_fiber *holders[SLAB_FIBERS], *f;
    int n = 0, below = -1;
    /* Hold stacks until the next one carved has a neighbour carved right below it. */
    while (below < 0) {
        CHILD_REQUIRE(n < SLAB_FIBERS);
        CHILD_REQUIRE(moor_spawn(&holders[n++], return_arg, NULL, NULL) == 0);
        if (b->nhot == 0 && b->ncold == 0 && b->carve != b->carve_end)
            for (int i = 0; i < n; i++)
                if (holders[i]->stack_base == b->carve - b->map_size)
                    below = i;
    }
    moor_fiber_attr fattr = {.name = "deep"};
    CHILD_REQUIRE(moor_spawn(&f, deep_fn, NULL, &fattr) == 0);
    CHILD_REQUIRE(f->stack_base == holders[below]->stack_base + b->map_size);
    moor_join(f, NULL);
    fprintf(stderr, "the fiber returned from endless recursion\n");
}

static void check_neighbour_overflow(moor_guard_mode mode)
{
    require_guard_mode(mode);
    child_report r;
    child_run(neighbour_overflow_child, &mode, &r);
    expect_child_signal(&r, SIGABRT, "\"deep\" overflowed its 256 KiB stack\n");
}

static void test_stack_slab_neighbour_overflow_madvise(void **state)
{
    (void)state;
    check_neighbour_overflow(MOOR_GUARD_MADVISE);
}

static void test_stack_slab_neighbour_overflow_mprotect(void **state)
{
    (void)state;
    check_neighbour_overflow(MOOR_GUARD_MPROTECT);
}

/* Once every stack of a slab is cold and given back, the slab gives back its page tables
 * too, guard markers included; a stack taken from it again gets its guard back. */

#define BARE_FIBERS 63 /* slabs of 1, 2, 4, 8, 16 and 32 stacks, all carved */

static moor_executor *bare_slabs_executor(moor_fiber **f)
{
    moor_executor_attr attr = {.pool_hot = 1, .guard = MOOR_GUARD_MADVISE};
    moor_executor *ex;
    if (moor_executor_new(&ex, &attr) != 0)
        return NULL;
    for (int i = 0; i < BARE_FIBERS; i++)
        if (moor_spawn(&f[i], return_arg, NULL, NULL) != 0)
            abort();
    for (int i = 0; i < BARE_FIBERS; i++)
        moor_join(f[i], NULL);
    moor__stack_pool_trim(&ex->pool);
    return ex;
}

/* The executor trims by itself when it idles: no call to moor__stack_pool_trim, only a park
 * of 100 ms or more after the burst (a plain-code sleep). */
static void test_stack_idle_executor_trims(void **state)
{
    (void)state;
    require_guard_mode(MOOR_GUARD_MADVISE);
    moor_executor_attr attr = {.pool_hot = 1, .guard = MOOR_GUARD_MADVISE};
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, &attr), 0);
    moor_fiber *f[BARE_FIBERS];
    for (int i = 0; i < BARE_FIBERS; i++)
        assert_int_equal(moor_spawn(&f[i], return_arg, NULL, NULL), 0);
    for (int i = 0; i < BARE_FIBERS; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    moor__stack_counts c;
    moor__stack_pool_counts(&ex->pool, &c);
    assert_int_equal(c.slabs_bare, 0); /* a short burst: not trimmed yet */
    assert_int_equal(moor_sleep(moor_deadline_in(20)), 0);
    moor__stack_pool_counts(&ex->pool, &c);
    assert_int_equal(c.slabs_bare, 0); /* a short park is not an idle moment */
    assert_int_equal(moor_sleep(moor_deadline_in(150)), 0);
    moor__stack_pool_counts(&ex->pool, &c);
    assert_int_equal(c.slabs_bare, 5); /* as an explicit trim: all but the hot stack's slab */
    assert_int_equal(c.cold, BARE_FIBERS - 1);
    moor_executor_free(ex);
}

static void test_stack_bare_slab_regains_guards(void **state)
{
    (void)state;
    require_guard_mode(MOOR_GUARD_MADVISE);
    moor_fiber *f[BARE_FIBERS];
    moor_executor *ex = bare_slabs_executor(f);
    assert_non_null(ex);
    moor__stack_counts c;
    moor__stack_pool_counts(&ex->pool, &c);
    assert_int_equal(c.mapped, BARE_FIBERS);
    assert_int_equal(c.slabs, 6);
    assert_int_equal(c.slabs_bare, 5); /* all but the one with the hot stack */
    for (int i = 0; i < BARE_FIBERS; i++)
        assert_int_equal(((volatile moor_fiber *)f[i])->state, MOOR__FIBER_FREE);

    /* Take them all again: every guard is back. */
    for (int i = 0; i < BARE_FIBERS; i++)
        assert_int_equal(moor_spawn(&f[i], return_arg, NULL, NULL), 0);
    moor__stack_pool_counts(&ex->pool, &c);
    assert_int_equal(c.mapped, BARE_FIBERS); /* from the pool, none carved */
    assert_int_equal(c.slabs_bare, 0);
    if (!UNDER_VALGRIND) {
        int fds[2];
        assert_int_equal(pipe2(fds, O_NONBLOCK), 0);
        for (int i = 0; i < BARE_FIBERS; i++) {
            assert_true(faults(fds[1], f[i]->stack_base));
            assert_true(faults(fds[1], f[i]->stack_base + ex->pool.guard - 1));
        }
        close(fds[0]);
        close(fds[1]);
    }
    for (int i = 0; i < BARE_FIBERS; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    ex_free(ex);
}

static void bare_overflow_child(void *arg)
{
    (void)arg;
    moor_fiber *f[BARE_FIBERS];
    moor_executor *ex = bare_slabs_executor(f);
    CHILD_REQUIRE(ex != NULL);
    moor__stack_bucket *b = default_bucket(ex);
    CHILD_REQUIRE(b->nhot == 1 && b->ncold == BARE_FIBERS - 1);
    moor_fiber *hot;
    CHILD_REQUIRE(moor_spawn(&hot, return_arg, NULL, NULL) == 0);
    CHILD_REQUIRE(ex->pool.slabs[0].bare || ex->pool.slabs[1].bare);
    moor_fiber_attr fattr = {.name = "deep"};
    moor_fiber *deep;
    CHILD_REQUIRE(moor_spawn(&deep, deep_fn, NULL, &fattr) == 0);
    size_t s = 0;
    while (!(ex->pool.slabs[s].base <= deep->stack_base &&
             deep->stack_base < ex->pool.slabs[s].base + ex->pool.slabs[s].len))
        s++;
    CHILD_REQUIRE(ex->pool.slabs[s].bare);
    moor_join(deep, NULL);
    fprintf(stderr, "the fiber returned from endless recursion\n");
}

static void test_stack_bare_slab_overflow_named(void **state)
{
    (void)state;
    require_guard_mode(MOOR_GUARD_MADVISE);
    child_report r;
    child_run(bare_overflow_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "\"deep\" overflowed its 256 KiB stack\n");
}

/* ---- guard mode from the environment ------------------------------------------------------ */

static void env_guard_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(setenv("MOOR_GUARD", "mprotect", 1) == 0);
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    CHILD_REQUIRE(moor_executor_guard(ex) == MOOR_GUARD_MPROTECT);
    moor_executor_free(ex);
    /* The attribute wins over the environment. */
    moor_executor_attr attr = {.guard = MOOR_GUARD_MADVISE};
    int rc = moor_executor_new(&ex, &attr);
    if (rc == 0) {
        CHILD_REQUIRE(moor_executor_guard(ex) == MOOR_GUARD_MADVISE);
        moor_executor_free(ex);
    }
    CHILD_REQUIRE(setenv("MOOR_GUARD", "auto", 1) == 0);
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    CHILD_REQUIRE(moor_executor_guard(ex) == (rc == 0 ? MOOR_GUARD_MADVISE : MOOR_GUARD_MPROTECT));
    moor_executor_free(ex);
    CHILD_REQUIRE(setenv("MOOR_GUARD", "madvise", 1) == 0);
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == (rc == 0 ? 0 : -EINVAL));
    if (rc == 0)
        moor_executor_free(ex);
}

static void test_stack_guard_mode_from_env(void **state)
{
    (void)state;
    child_report r;
    child_run(env_guard_child, NULL, &r);
    expect_child_ok(&r);
}

/* ---- running out of mappings or memory -----------------------------------------------------
 * mprotect guards cost two mappings a stack. A process near vm.max_map_count gets -ENOMEM
 * from spawn, a message that says why (once), and spawns again once stacks come back. */

#define MAPS_ROOM 80 /* mappings left free for the executor to run out of */

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

static size_t mappings_now(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    size_t n = 0;
    int ch;
    if (!f)
        return 0;
    while ((ch = getc(f)) != EOF)
        n += ch == '\n';
    fclose(f);
    return n;
}

static void out_of_maps_child(void *arg)
{
    (void)arg;
    CHILD_REQUIRE(setenv("MOOR_GUARD", "mprotect", 1) == 0);
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    CHILD_REQUIRE(moor_executor_guard(ex) == MOOR_GUARD_MPROTECT);

    /* Eat all but MAPS_ROOM mappings: one region whose every other page changes protection,
     * each change in its middle making two more. */
    long max = read_long("/proc/sys/vm/max_map_count");
    size_t have = mappings_now();
    CHILD_REQUIRE(max > 0 && have > 0 && (size_t)max > have + MAPS_ROOM);
    size_t splits = ((size_t)max - have - MAPS_ROOM) / 2;
    size_t page = (size_t)sysconf(_SC_PAGESIZE), len = (2 * splits + 2) * page;
    char *eat = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    CHILD_REQUIRE(eat != MAP_FAILED);
    for (size_t i = 0; i < splits; i++)
        CHILD_REQUIRE(mprotect(eat + (2 * i + 1) * page, page, PROT_READ) == 0);

    moor_fiber *f[MAPS_ROOM];
    int n = 0, rc;
    while ((rc = moor_spawn(&f[n], return_arg, NULL, NULL)) == 0)
        CHILD_REQUIRE(++n < MAPS_ROOM);
    CHILD_REQUIRE(rc == -ENOMEM);
    CHILD_REQUIRE(n > 0);
    moor_fiber *extra;
    CHILD_REQUIRE(moor_spawn(&extra, return_arg, NULL, NULL) == -ENOMEM); /* said once only */
    /* Once fibers exit their stacks come back, and spawning works again. */
    for (int i = 0; i < n; i++)
        CHILD_REQUIRE(moor_join(f[i], NULL) == 0);
    for (int i = 0; i < n; i++)
        CHILD_REQUIRE(moor_spawn(&f[i], return_arg, (void *)(intptr_t)i, NULL) == 0);
    for (int i = 0; i < n; i++) {
        intptr_t r = -1;
        CHILD_REQUIRE(moor_join(f[i], &r) == 0 && r == i);
    }
    munmap(eat, len);
    moor_executor_free(ex);
}

static void test_stack_out_of_mappings_mprotect(void **state)
{
    (void)state;
    require_guard_mode(MOOR_GUARD_MPROTECT);
    if (UNDER_VALGRIND || UNDER_TSAN) {
        print_message("the tool's own mappings would run out first\n");
        skip();
    }
    child_report r;
    child_run(out_of_maps_child, NULL, &r);
    expect_child_ok(&r);
    const char *said = strstr(r.err, "moor: out of memory mappings");
    if (!said) {
        child_describe(&r);
        fail_msg("no message about vm.max_map_count");
    }
    assert_null(strstr(said + 1, "moor: out of memory mappings")); /* once */
    char limit[64];
    snprintf(limit, sizeof limit, "vm.max_map_count (/proc/sys/vm/max_map_count) is %ld",
             read_long("/proc/sys/vm/max_map_count"));
    assert_non_null(strstr(said, limit));
    assert_non_null(strstr(said, "sysctl -w vm.max_map_count="));
    assert_non_null(strstr(said, "MADV_GUARD_INSTALL"));
}

static size_t address_space_now(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long pages = 0;
    if (f) {
        if (fscanf(f, "%lu", &pages) != 1)
            pages = 0;
        fclose(f);
    }
    return (size_t)pages * (size_t)sysconf(_SC_PAGESIZE);
}

#define AS_FIBERS 1000

/* Under a low RLIMIT_AS, spawn fails cleanly and the executor carries on. */
static void rlimit_as_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    static moor_fiber *f[AS_FIBERS];
    struct rlimit old, low;
    CHILD_REQUIRE(getrlimit(RLIMIT_AS, &old) == 0);
    low = old;
    low.rlim_cur = address_space_now() + 8 * ex->stack_map_size;
    CHILD_REQUIRE(setrlimit(RLIMIT_AS, &low) == 0);
    int n = 0, rc;
    while ((rc = moor_spawn(&f[n], return_arg, NULL, NULL)) == 0)
        CHILD_REQUIRE(++n < AS_FIBERS);
    CHILD_REQUIRE(rc == -ENOMEM);
    CHILD_REQUIRE(n > 0);
    CHILD_REQUIRE(moor_spawn(&f[n], return_arg, NULL, NULL) == -ENOMEM);
    for (int i = 0; i < n; i++)
        CHILD_REQUIRE(moor_join(f[i], NULL) == 0);
    /* The stacks came back: as many fibers again, under the same limit. */
    for (int i = 0; i < n; i++)
        CHILD_REQUIRE(moor_spawn(&f[i], return_arg, (void *)(intptr_t)i, NULL) == 0);
    for (int i = 0; i < n; i++) {
        intptr_t r = -1;
        CHILD_REQUIRE(moor_join(f[i], &r) == 0 && r == i);
    }
    /* And more once the limit is lifted. */
    CHILD_REQUIRE(setrlimit(RLIMIT_AS, &old) == 0);
    for (int i = 0; i < n + 1; i++)
        CHILD_REQUIRE(moor_spawn(&f[i], return_arg, NULL, NULL) == 0);
    for (int i = 0; i < n + 1; i++)
        CHILD_REQUIRE(moor_join(f[i], NULL) == 0);
    moor_executor_free(ex);
}

static void test_stack_spawn_under_rlimit_as(void **state)
{
    (void)state;
    if (UNDER_TSAN) {
        print_message("TSan's own state for each fiber (~800 KiB) runs out of the limit first\n");
        skip();
    }
    child_report r;
    child_run(rlimit_as_child, NULL, &r);
    expect_child_ok(&r);
    assert_null(strstr(r.err, "moor: out of memory mappings")); /* memory, not mappings */
}

int main(void)
{
    /* The first executor of a process installs moor's SIGSEGV handler, once. cmocka swaps
     * SIGSEGV handlers around every test and puts back what was there before, which would
     * remove a handler installed during a test. So install it here, as a program's first
     * executor would, before cmocka runs; children get it back from child_signals_save. */
    moor_executor *ex;
    if (moor_executor_new(&ex, NULL) != 0)
        return 1;
    moor_executor_free(ex);
    child_signals_save();

    const struct CMUnitTest tests[] = {
        TEST(test_stack_overflow_diagnosed_madvise),
        TEST(test_stack_overflow_diagnosed_mprotect),
        TEST(test_stack_guard_mode),
        TEST(test_stack_other_segfault_not_overflow),
        TEST(test_stack_overflow_in_switch_named),
        TEST(test_stack_frame_larger_than_guard_named),
        TEST(test_stack_impossible_sizes_refused),
        TEST(test_stack_size_per_fiber),
        TEST(test_stack_guard_size_rounded),
        TEST(test_stack_reuse_leaves_no_asan_poison),
        TEST(test_stack_pool_lifo),
        TEST(test_stack_pool_gives_memory_back),
        TEST(test_stack_stale_control_block_reads_free),
        TEST(test_stack_slab_stacks_distinct_and_guarded),
        TEST(test_stack_slab_neighbour_overflow_madvise),
        TEST(test_stack_slab_neighbour_overflow_mprotect),
        TEST(test_stack_bare_slab_regains_guards),
        TEST(test_stack_idle_executor_trims),
        TEST(test_stack_bare_slab_overflow_named),
        TEST(test_stack_guard_mode_from_env),
        TEST(test_stack_out_of_mappings_mprotect),
        TEST(test_stack_spawn_under_rlimit_as),
        TEST(test_stack_cold_stack_keeps_guard_madvise),
        TEST(test_stack_cold_stack_keeps_guard_mprotect),
    };
    return RUN_TESTS(tests);
}
