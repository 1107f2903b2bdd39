/* Fibers: spawn and join, identity, pinned stacks, per-fiber errno and floating-point state,
 * scheduling order, the fiber as a future, detached fibers, many fibers, misuse.
 *
 * Checks inside fibers only record what they see; the test function asserts once the fibers
 * are joined, so that a failed assertion never unwinds from a fiber's stack. */
#include <errno.h>
#include <fenv.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>

#include "helpers.h"
#include "moor.h"

#include "fiber/executor.h"
#include "fiber/executor.h"
#include "fiber/stack.h"

static intptr_t return_arg(void *arg) { return (intptr_t)arg; }

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
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
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
    assert_null(ex->fibers.head);
    moor_executor_free(ex);
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
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
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
    moor_executor_free(ex);
}

/* ---- join from a fiber, yield alone ---------------------------------------------------- */

static intptr_t yield_then_return(void *arg)
{
    for (intptr_t i = 0; i < (intptr_t)arg; i++)
        moor_yield();
    return (intptr_t)arg;
}

static intptr_t spawn_and_join_children(void *arg)
{
    (void)arg;
    moor_fiber *kids[10];
    for (intptr_t i = 0; i < 10; i++)
        if (moor_spawn(&kids[i], yield_then_return, (void *)i, NULL) != 0)
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
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    moor_fiber *parent;
    assert_int_equal(moor_spawn(&parent, spawn_and_join_children, NULL, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(parent, &r), 0);
    assert_int_equal(r, 45);
    assert_null(ex->fibers.head);
    moor_executor_free(ex);
}

static void test_fiber_yield_alone(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, yield_then_return, (void *)1000, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 1000);
    moor_executor_free(ex);
}

/* ---- pinned stacks ----------------------------------------------------------------------- */

#define PIN_ROUNDS 1000
#define PIN_OTHERS 10
#define PIN_BUF 4096

static long scribbles; /* turns taken by the scribblers, all together */

struct keeper {
    char *addr;               /* the buffer's address, kept off the fiber's stack */
    char *stack_lo, *stack_hi; /* the fiber's usable stack (white-box) */
    int rounds;
    int moved, corrupted;
    long min_between, max_between; /* scribbler turns between two of the keeper's */
};

static char pattern(int round, size_t i) { return (char)(round * 31 + i * 7 + 1); }

static intptr_t keeper_fn(void *arg)
{
    struct keeper *k = arg;
    char buf[PIN_BUF];
    char *p = buf; /* a pointer into the stack, kept on the stack */
    moor_fiber *self = moor_self();
    k->stack_lo = self->stack_base + self->ex->pool.guard;
    k->stack_hi = (char *)self;
    k->addr = buf;
    k->min_between = PIN_ROUNDS * PIN_OTHERS;
    for (size_t i = 0; i < PIN_BUF; i++)
        k->addr[i] = pattern(0, i);
    for (int round = 0; round < PIN_ROUNDS; round++) {
        long before = scribbles;
        moor_yield();
        long between = scribbles - before;
        if (between < k->min_between)
            k->min_between = between;
        if (between > k->max_between)
            k->max_between = between;
        if (p != k->addr || (char *)buf != k->addr)
            k->moved++;
        for (size_t i = 0; i < PIN_BUF; i++) {
            if (k->addr[i] != pattern(round, i)) {
                k->corrupted++;
                break;
            }
        }
        for (size_t i = 0; i < PIN_BUF; i++)
            p[i] = pattern(round + 1, i);
        k->rounds++;
    }
    return 0;
}

static intptr_t scribbler_fn(void *arg)
{
    intptr_t id = (intptr_t)arg;
    volatile char buf[PIN_BUF];
    intptr_t bad = 0;
    for (int round = 0; round < PIN_ROUNDS; round++) {
        memset((char *)buf, (int)(id * 17 + round), sizeof buf);
        scribbles++;
        moor_yield();
        if (buf[0] != (char)(id * 17 + round) || buf[PIN_BUF - 1] != (char)(id * 17 + round))
            bad++;
    }
    return bad;
}

static void test_fiber_pinned_stack(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    struct keeper k = {0};
    scribbles = 0;
    moor_fiber *keeper, *others[PIN_OTHERS];
    assert_int_equal(moor_spawn(&keeper, keeper_fn, &k, NULL), 0);
    for (intptr_t i = 0; i < PIN_OTHERS; i++)
        assert_int_equal(moor_spawn(&others[i], scribbler_fn, (void *)i, NULL), 0);
    assert_int_equal(moor_join(keeper, NULL), 0);
    for (int i = 0; i < PIN_OTHERS; i++) {
        intptr_t bad = -1;
        assert_int_equal(moor_join(others[i], &bad), 0);
        assert_int_equal(bad, 0);
    }
    assert_int_equal(k.rounds, PIN_ROUNDS);
    assert_int_equal(k.moved, 0);
    assert_int_equal(k.corrupted, 0);
    /* The buffer was on the fiber's own stack... */
    assert_true(k.addr >= k.stack_lo && k.addr + PIN_BUF <= k.stack_hi);
    /* ...and every other fiber ran once between two of its turns (moor_yield). */
    assert_int_equal(k.min_between, PIN_OTHERS);
    assert_int_equal(k.max_between, PIN_OTHERS);
    moor_executor_free(ex);
}

/* ---- errno --------------------------------------------------------------------------------- */

static intptr_t errno_keeper(void *arg)
{
    int base = (int)(intptr_t)arg;
    intptr_t bad = 0;
    for (int i = 0; i < 1000; i++) {
        errno = base + i;
        moor_yield();
        if (errno != base + i)
            bad++;
    }
    errno = base; /* left set on return: must not leak into the joiner */
    return bad;
}

static void test_fiber_errno_survives_switch(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    moor_fiber *a, *b;
    assert_int_equal(moor_spawn(&a, errno_keeper, (void *)1000, NULL), 0);
    assert_int_equal(moor_spawn(&b, errno_keeper, (void *)5000, NULL), 0);
    intptr_t bad_a = -1, bad_b = -1;
    errno = 777;
    int rc = moor_join(a, &bad_a);
    int seen = errno;
    assert_int_equal(rc, 0);
    assert_int_equal(seen, 777);
    errno = 778;
    rc = moor_join(b, &bad_b);
    seen = errno;
    assert_int_equal(rc, 0);
    assert_int_equal(seen, 778);
    assert_int_equal(bad_a, 0);
    assert_int_equal(bad_b, 0);
    moor_executor_free(ex);
}

/* ---- floating point ---------------------------------------------------------------------- */

/* The FE_* rounding modes of <fenv.h>, read and set straight in the hardware: glibc keeps the
 * fenv functions in libm, which the test programs do not link. Both units are handled, as
 * fesetround() does: SSE (MXCSR, bits 13-14) and x87 (control word, bits 10-11). */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FP_TESTS 1

static unsigned short x87_control(void)
{
    unsigned short cw;
    __asm__ volatile("fnstcw %0" : "=m"(cw));
    return cw;
}

static unsigned short x87_status(void)
{
    unsigned short sw;
    __asm__ volatile("fnstsw %0" : "=m"(sw));
    return sw;
}

/* The rounding mode if both units agree on it, else -1. */
static int fp_round_get(void)
{
    int x87 = x87_control() & 0xc00;
    int sse = (int)(_mm_getcsr() >> 3) & 0xc00;
    return x87 == sse ? x87 : -1;
}

static void fp_round_set(int mode)
{
    unsigned short cw = (unsigned short)((x87_control() & ~0xc00u) | (unsigned)mode);
    __asm__ volatile("fldcw %0" : : "m"(cw));
    _mm_setcsr((_mm_getcsr() & ~0x6000u) | ((unsigned)mode << 3));
}

/* FE_DIVBYZERO raised, in either unit. */
static int fp_divbyzero_raised(void)
{
    return ((_mm_getcsr() | x87_status()) & FE_DIVBYZERO) != 0;
}

static void fp_flags_clear(void)
{
    _mm_setcsr(_mm_getcsr() & ~0x3fu);
    __asm__ volatile("fnclex");
}

static double third(void)
{
    volatile double one = 1.0, three = 3.0; /* computed now, in the current mode (SSE) */
    return one / three;
}

static long double third_x87(void)
{
    volatile long double one = 1.0L, three = 3.0L; /* long double: computed by the x87 */
    return one / three;
}

struct fp_keeper {
    int mode;
    double expect;          /* 1.0 / 3.0 rounded in `mode` */
    long double expect_x87; /* the same in long double */
    int bad_mode, bad_value, rounds;
};

static intptr_t fp_keeper_fn(void *arg)
{
    struct fp_keeper *k = arg;
    fp_round_set(k->mode);
    for (int i = 0; i < 1000; i++) {
        moor_yield();
        if (fp_round_get() != k->mode)
            k->bad_mode++;
        if (third() != k->expect || third_x87() != k->expect_x87)
            k->bad_value++;
        k->rounds++;
    }
    return 0;
}
#endif

static void test_fiber_rounding_mode_survives_switch(void **state)
{
    (void)state;
#ifndef FP_TESTS
    print_message("floating-point state is read from x86 registers; not on this CPU\n");
    skip();
#else
    if (UNDER_VALGRIND) {
        /* Its synthetic CPU rounds arithmetic to nearest whatever the mode (it honours the
         * mode in conversions only), so the two modes give the same third. */
        print_message("skipped under valgrind: it ignores the rounding mode\n");
        skip();
    }
    int orig = fp_round_get();
    assert_int_equal(orig, FE_TONEAREST);
    fp_round_set(FE_UPWARD);
    double up = third();
    long double up_x87 = third_x87();
    fp_round_set(FE_DOWNWARD);
    double down = third();
    long double down_x87 = third_x87();
    fp_round_set(orig);
    /* the two modes really give different results */
    assert_true(up > down);
    assert_true(up_x87 > down_x87);

    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    struct fp_keeper a = {.mode = FE_UPWARD, .expect = up, .expect_x87 = up_x87};
    struct fp_keeper b = {.mode = FE_DOWNWARD, .expect = down, .expect_x87 = down_x87};
    moor_fiber *fa, *fb;
    assert_int_equal(moor_spawn(&fa, fp_keeper_fn, &a, NULL), 0);
    assert_int_equal(moor_spawn(&fb, fp_keeper_fn, &b, NULL), 0);
    assert_int_equal(moor_join(fa, NULL), 0);
    assert_int_equal(moor_join(fb, NULL), 0);
    int main_mode = fp_round_get();
    fp_round_set(orig);
    moor_executor_free(ex);

    assert_int_equal(main_mode, orig); /* the fibers' modes did not leak into plain code */
    assert_int_equal(a.rounds, 1000);
    assert_int_equal(b.rounds, 1000);
    assert_int_equal(a.bad_mode, 0);
    assert_int_equal(b.bad_mode, 0);
    assert_int_equal(a.bad_value, 0);
    assert_int_equal(b.bad_value, 0);
#endif
}

#ifdef FP_TESTS
struct fp_flags {
    int set_before, set_after;
};

static intptr_t fp_flags_fn(void *arg)
{
    struct fp_flags *f = arg;
    fp_flags_clear();
    volatile double one = 1.0, zero = 0.0;
    volatile double inf = one / zero;
    (void)inf;
    f->set_before = fp_divbyzero_raised();
    moor_yield(); /* another fiber runs: a real switch away and back */
    f->set_after = fp_divbyzero_raised();
    return 0;
}
#endif

static void test_fiber_fp_flags_cleared_by_suspension(void **state)
{
    (void)state;
#ifndef FP_TESTS
    print_message("floating-point state is read from x86 registers; not on this CPU\n");
    skip();
#else
    if (UNDER_VALGRIND) {
        /* Its synthetic CPU raises no floating-point exception flags: 1/0 leaves none. */
        print_message("skipped under valgrind: it sets no exception flags\n");
        skip();
    }
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    struct fp_flags flags = {-1, -1};
    moor_fiber *f, *other;
    assert_int_equal(moor_spawn(&f, fp_flags_fn, &flags, NULL), 0);
    assert_int_equal(moor_spawn(&other, yield_then_return, (void *)3, NULL), 0);
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(moor_join(other, NULL), 0);
    fp_flags_clear();
    moor_executor_free(ex);
    assert_int_equal(flags.set_before, 1);
    assert_int_equal(flags.set_after, 0);
#endif
}

/* ---- scheduling order ---------------------------------------------------------------------- */

#define FIFO_TURNS 100
#define FIFO_MAX (4 * FIFO_TURNS)

struct fifo_log {
    int who[FIFO_MAX], turn[FIFO_MAX];
    int n;
};

struct fifo_member {
    struct fifo_log *log;
    int id;
};

static void fifo_record(struct fifo_log *log, int id, int turn)
{
    if (log->n < FIFO_MAX) {
        log->who[log->n] = id;
        log->turn[log->n] = turn;
    }
    log->n++;
}

static intptr_t fifo_fiber(void *arg)
{
    struct fifo_member *m = arg;
    for (int turn = 0; turn < FIFO_TURNS; turn++) {
        fifo_record(m->log, m->id, turn);
        moor_yield();
    }
    return 0;
}

/* The same as a plain future task: records a turn per poll, wakes itself to yield. */
typedef struct fifo_task {
    moor_future fut;
    struct fifo_member m;
    int turn;
} fifo_task;

static moor_poll fifo_task_poll(moor_future *self, moor_cx *cx)
{
    fifo_task *t = moor_container_of(self, fifo_task, fut);
    fifo_record(t->m.log, t->m.id, t->turn);
    if (++t->turn == FIFO_TURNS) {
        self->result = 0;
        return MOOR_READY;
    }
    moor_waker_wake(&cx->waker);
    return MOOR_PENDING;
}

static const moor_future_ops fifo_task_ops = {"fifo", fifo_task_poll, NULL};

static void check_round_robin(const struct fifo_log *log, int members)
{
    assert_int_equal(log->n, members * FIFO_TURNS);
    for (int i = 0; i < log->n; i++) {
        if (log->who[i] != i % members || log->turn[i] != i / members) {
            print_message("entry %d: member %d turn %d, expected member %d turn %d\n", i,
                          log->who[i], log->turn[i], i % members, i / members);
            fail();
        }
    }
}

static void test_fiber_fifo_fairness(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);

    static struct fifo_log log;
    memset(&log, 0, sizeof log);
    struct fifo_member m[3];
    moor_fiber *f[3];
    for (int i = 0; i < 3; i++) {
        m[i] = (struct fifo_member){&log, i};
        assert_int_equal(moor_spawn(&f[i], fifo_fiber, &m[i], NULL), 0);
    }
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    check_round_robin(&log, 3);

    /* Fibers and a plain future task share the one queue: still round-robin. */
    memset(&log, 0, sizeof log);
    fifo_task t = {.m = {&log, 3}};
    for (int i = 0; i < 3; i++) {
        m[i] = (struct fifo_member){&log, i};
        assert_int_equal(moor_spawn(&f[i], fifo_fiber, &m[i], NULL), 0);
    }
    moor_future_init(&t.fut, &fifo_task_ops, 0);
    assert_int_equal(moor_spawn_future(&t.fut), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    check_round_robin(&log, 4);
    moor_executor_free(ex);
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
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    /* wait_first 0: the target is still running when awaited; 20: it has already returned */
    static const int waits[] = {0, 20};
    for (size_t i = 0; i < sizeof waits / sizeof waits[0]; i++) {
        struct fiber_future_case c = {.wait_first = waits[i]};
        moor_fiber *ticker, *waiter;
        assert_int_equal(moor_spawn(&c.target, yield_then_return, (void *)5, NULL), 0);
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
    assert_null(ex->fibers.head);
    moor_executor_free(ex);
}

static void test_fiber_future_block_on(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, yield_then_return, (void *)12, NULL), 0);
    moor_future *fut = moor_fiber_future(f);
    assert_ptr_equal(moor_fiber_future(f), fut); /* one future per fiber */
    assert_int_equal(moor_block_on(fut), 12);
    assert_true(moor_future_done(fut));
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 12);
    assert_null(ex->fibers.head);
    moor_executor_free(ex);
}

/* ---- cancellation ------------------------------------------------------------------------ */

/* PENDING until cancelled; counts polls and cancels. With `completed` set, its cancel op
 * reports that it had in fact completed (a value handed over just before the cancel). */
typedef struct stuck {
    moor_future fut;
    int polls, cancels, completed;
} stuck;

static moor_poll stuck_poll(moor_future *self, moor_cx *cx)
{
    (void)cx;
    moor_container_of(self, stuck, fut)->polls++;
    return MOOR_PENDING;
}

static moor_poll stuck_cancel(moor_future *self)
{
    stuck *s = moor_container_of(self, stuck, fut);
    s->cancels++;
    if (s->completed) {
        self->result = 99;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static const moor_future_ops stuck_ops = {"stuck", stuck_poll, stuck_cancel};

static void stuck_init(stuck *s, int completed)
{
    memset(s, 0, sizeof *s);
    moor_future_init(&s->fut, &stuck_ops, 0);
    s->completed = completed;
}

struct victim {
    stuck first, second;
    intptr_t first_out, second_out;
    int cancelled_seen;
    intptr_t child_result;
    int child_rc;
};

static intptr_t victim_fn(void *arg)
{
    struct victim *v = arg;
    v->first_out = moor_await(&v->first.fut);
    v->cancelled_seen = moor_cancelled();
    v->second_out = moor_await(&v->second.fut); /* a wait after the cancel */
    /* Reaping a child still works in a cancelled fiber. */
    moor_fiber *child;
    if (moor_spawn(&child, yield_then_return, (void *)10, NULL) == 0)
        v->child_rc = moor_join(child, &v->child_result);
    return 7;
}

struct canceller {
    moor_fiber *target;
    const stuck *wait_for; /* cancel once this has been polled */
};

static intptr_t canceller_fn(void *arg)
{
    struct canceller *c = arg;
    for (int i = 0; i < 100 && c->wait_for->polls == 0; i++)
        moor_yield();
    moor_cancel(c->target);
    moor_cancel(c->target); /* idempotent */
    return moor_cancelled();
}

static void test_fiber_cancel_waiting_fiber(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    assert_int_equal(moor_cancelled(), 0); /* plain code */
    struct victim v;
    memset(&v, 0, sizeof v);
    stuck_init(&v.first, 0);
    stuck_init(&v.second, 0);
    v.child_rc = -1;
    moor_fiber *victim, *canceller;
    assert_int_equal(moor_spawn(&victim, victim_fn, &v, NULL), 0);
    struct canceller c = {victim, &v.first};
    assert_int_equal(moor_spawn(&canceller, canceller_fn, &c, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(victim, &r), -ECANCELED);
    assert_int_equal(r, 7); /* its return value is still there */
    assert_int_equal(moor_join(canceller, &r), 0);
    assert_int_equal(r, 0); /* the canceller was not cancelled itself */

    assert_int_equal(v.first_out, -ECANCELED);
    assert_int_equal(v.first.cancels, 1);
    assert_false(moor_future_done(&v.first.fut));
    assert_int_equal(v.cancelled_seen, 1);
    assert_int_equal(v.second_out, -ECANCELED);
    /* A wait after the cancel is polled once (a result there without waiting would be
     * returned), then cancelled rather than waited for. */
    assert_int_equal(v.second.polls, 1);
    assert_int_equal(v.second.cancels, 1);
    assert_int_equal(v.child_rc, 0);
    assert_int_equal(v.child_result, 10);
    moor_executor_free(ex);
}

static intptr_t await_stuck_fn(void *arg) { return moor_await(arg); }

static void test_fiber_cancel_keeps_completed_result(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    stuck s;
    stuck_init(&s, 1);
    moor_fiber *f, *canceller;
    assert_int_equal(moor_spawn(&f, await_stuck_fn, &s.fut, NULL), 0);
    struct canceller c = {f, &s};
    assert_int_equal(moor_spawn(&canceller, canceller_fn, &c, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, 99); /* the wait had completed: its value is not lost */
    assert_int_equal(s.cancels, 1);
    assert_true(moor_future_done(&s.fut));
    assert_int_equal(moor_join(canceller, NULL), 0);
    moor_executor_free(ex);
}

static void test_fiber_cancel_before_start_and_after_return(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);

    /* Cancelled before it ever ran: it still runs (to clean up); its first wait fails. */
    stuck s;
    stuck_init(&s, 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, await_stuck_fn, &s.fut, NULL), 0);
    moor_cancel(f);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, -ECANCELED);
    assert_int_equal(s.polls, 1); /* looked at once: it was not ready, so not waited for */

    /* Cancelling a fiber that has returned changes nothing. */
    assert_int_equal(moor_spawn(&f, return_arg, (void *)5, NULL), 0);
    moor_future *done = moor_fiber_future(f);
    assert_int_equal(moor_block_on(done), 5);
    moor_cancel(f);
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 5);
    moor_executor_free(ex);
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
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    struct detached_count c = {.children = 3};
    for (int i = 0; i < 100; i++)
        assert_int_equal(moor_spawn(NULL, detached_parent, &c, NULL), 0);
    assert_non_null(ex->fibers.head);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(c.ran, 100 + 100 * 3);
    assert_null(ex->fibers.head);
    assert_int_equal(ex->ntasks, 0);
    assert_int_equal(pooled_stacks(ex), ex->pool.mapped); /* every stack back in the pool */

    /* A detached fiber that finishes last, with nothing to run after it, is released too. */
    c.ran = 0;
    assert_int_equal(moor_spawn(NULL, detached_leaf, &c, NULL), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(c.ran, 1);
    assert_null(ex->fibers.head);
    assert_int_equal(pooled_stacks(ex), ex->pool.mapped);
    moor_executor_free(ex);
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
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    long max_maps = read_long("/proc/sys/vm/max_map_count");
    if (moor_executor_guard(ex) == MOOR_GUARD_MPROTECT && max_maps >= 0 && max_maps < 3L * MANY) {
        moor_executor_free(ex);
        print_message("mprotect guards need ~2 mappings per stack; vm.max_map_count is %ld\n",
                      max_maps);
        skip();
    }
    moor_fiber **fs = calloc(MANY, sizeof *fs);
    assert_non_null(fs);

    assert_int_equal(spawn_join_many(fs), 0);
    size_t mapped = ex->pool.mapped;
    assert_true(mapped >= MANY);
    assert_null(ex->fibers.head);

    assert_int_equal(spawn_join_many(fs), 0);
    assert_int_equal(ex->pool.mapped, mapped); /* every stack came from the pool */
    assert_null(ex->fibers.head);
    assert_int_equal(pooled_stacks(ex), mapped);

    free(fs);
    moor_executor_free(ex);
}

/* ---- misuse: assertions in forked children ------------------------------------------------- */

static moor_poll never_ready(moor_future *self, moor_cx *cx)
{
    (void)self;
    (void)cx;
    return MOOR_PENDING;
}

static const moor_future_ops never_ops = {"never", never_ready, NULL};

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
    CHILD_REQUIRE(moor_spawn(&target, yield_then_return, (void *)10, &attr) == 0);
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

#define TEST(f) TEST_FORGETTING(f)

/* ---- bounding a fiber's run ------------------------------------------------------------------
 * A timeout or select over a fiber's future abandons the join, not the fiber;
 * moor_join_deadline cancels the fiber when the deadline passes and reaps it. */

static intptr_t sleep_forever_then(void *arg)
{
    int rc = moor_sleep(-1); /* only a cancel ends it */
    return rc == -ECANCELED ? (intptr_t)arg : -1;
}

static intptr_t join_deadline_in_fiber(void *arg)
{
    moor_fiber *child;
    if (moor_spawn(&child, sleep_forever_then, (void *)8, NULL) != 0)
        return -1;
    intptr_t r = 0;
    int rc = moor_join_deadline(child, &r, moor_deadline_in(30000));
    /* arg: 1 = this fiber is cancelled meanwhile: the child is cancelled with it. */
    (void)arg;
    return rc == -ECANCELED && r == 8 ? 0 : __LINE__;
}

static void test_fiber_join_deadline(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);

    /* Returns in time: 0 and its value. */
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, yield_then_return, (void *)4, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join_deadline(f, &r, moor_deadline_in(30000)), 0);
    assert_int_equal(r, 4);

    /* Out of time: cancelled at the deadline, reaped, its value stored. */
    assert_int_equal(moor_spawn(&f, sleep_forever_then, (void *)6, NULL), 0);
    int64_t start = moor_now();
    r = 0;
    assert_int_equal(moor_join_deadline(f, &r, moor_deadline_in(30)), -ETIMEDOUT);
    assert_true(moor_now() - start >= 30);
    assert_int_equal(r, 6);

    /* A timeout over the fiber's future lets go of the join only: the fiber keeps running. */
    assert_int_equal(moor_spawn(&f, sleep_forever_then, (void *)7, NULL), 0);
    assert_int_equal(moor_await_deadline(moor_fiber_future(f), moor_deadline_in(10)), -ETIMEDOUT);
    assert_int_equal(ex->ntasks, 1);
    moor_cancel(f);
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, 7);

    /* A caller cancelled while it waits takes the child down with it. */
    moor_fiber *parent;
    assert_int_equal(moor_spawn(&parent, join_deadline_in_fiber, NULL, NULL), 0);
    assert_int_equal(moor_sleep(moor_deadline_in(5)), 0);
    moor_cancel(parent);
    assert_int_equal(moor_join(parent, &r), -ECANCELED);
    assert_int_equal(r, 0);
    assert_int_equal(ex->ntasks, 0);
    moor_executor_free(ex);
}

/* In a cancelled fiber, awaiting a fiber that has already returned gives its value. */
static intptr_t await_returned_child(void *arg)
{
    moor_fiber *child = arg;
    while (!moor_cancelled())
        moor_yield();
    intptr_t v = moor_await(moor_fiber_future(child));
    intptr_t r = -1;
    int rc = moor_join(child, &r);
    return v == 21 && rc == 0 && r == 21 ? 0 : __LINE__;
}

static void test_fiber_await_returned_fiber_when_cancelled(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    moor_fiber *child, *f;
    assert_int_equal(moor_spawn(&child, return_arg, (void *)21, NULL), 0);
    assert_int_equal(moor_spawn(&f, await_returned_child, child, NULL), 0);
    moor_cancel(f);
    intptr_t r = -1;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, 0);
    moor_executor_free(ex);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_fiber_join_returns_result),
        TEST(test_fiber_self_id_name),
        TEST(test_fiber_join_from_fiber),
        TEST(test_fiber_yield_alone),
        TEST(test_fiber_pinned_stack),
        TEST(test_fiber_errno_survives_switch),
        TEST(test_fiber_rounding_mode_survives_switch),
        TEST(test_fiber_fp_flags_cleared_by_suspension),
        TEST(test_fiber_fifo_fairness),
        TEST(test_fiber_future_awaited),
        TEST(test_fiber_future_block_on),
        TEST(test_fiber_cancel_waiting_fiber),
        TEST(test_fiber_cancel_keeps_completed_result),
        TEST(test_fiber_cancel_before_start_and_after_return),
        TEST(test_fiber_join_deadline),
        TEST(test_fiber_await_returned_fiber_when_cancelled),
        TEST(test_fiber_detached_free_themselves),
        TEST(test_fiber_100k_and_pool_reuse),
        TEST(test_fiber_await_outside_fiber_asserts),
        TEST(test_fiber_yield_outside_fiber_asserts),
        TEST(test_fiber_join_twice_asserts),
        TEST(test_fiber_misuse_from_fiber_asserts),
        TEST(test_fiber_free_with_pending_task_asserts),
        TEST(test_fiber_exhaustion_is_enomem),
    };
    const char *filter = getenv("MOOR_TEST_FILTER"); /* e.g. "*pool*": run only those */
    if (filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
