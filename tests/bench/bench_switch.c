/* bench_switch — what a switch costs in moor, beside a raw Boost.Context jump measured in
 * the same run.
 *
 *   raw_switch_round_trip_ns     jump_fcontext main -> context -> main, on a stack of our own
 *   yield_round_trip_ns          two fibers moor_yield() in turn; one yield by each, both in
 *                                one function (the same call site: see _asym)
 *   yield_round_trip_asym_ns     the same between a driver and a worker that run different
 *                                functions, as real programs and every peer's benchmark do: the
 *                                return after each resume lands at another call site
 *   spawn_join_warm_ns           moor_spawn + run + moor_join of an empty fiber, pooled stack
 *   spawn_join_cold_ns           the same with every stack freshly mapped (fresh executor)
 *   yield_round_trip_fp_ns       yield_round_trip_ns after both fibers and the executor's
 *                                thread have raised floating-point exception flags
 *   yield_round_trip_fp_asym_ns  the same in the different-functions shape
 *   yield_round_trip_fp_each_ns  (information) a flag raised by each fiber before every yield
 *   raw_switch_round_trip_asym_ns  (information) the raw round trip in the different-functions
 *                                shape: a driver and a worker function, each switching through
 *                                one out-of-line call; what that shape itself costs (bench.h)
 *   yield_asym_vs_raw_asym_ratio (information) yield_round_trip_asym_ns over it: what moor itself
 *                                adds to a switch in that shape
 *   yield_asym_vs_raw_ratio, spawn_vs_raw_ratio  issue 17's targets: the asymmetric yield and
 *                                the warm spawn over the raw round trip, measured in paired
 *                                slices at the core's full throughput (bench.h), each with
 *                                _all_slices, _slices, _full_throughput_slices, _probe_best_ns
 *                                and _probe_median_ns
 *
 * Each figure is the median of REPS repetitions, after one warm-up round that is thrown away.
 * A round runs every measurement once, so that a noisy stretch of the machine hits all of
 * them alike and the ratios stay meaningful.
 *
 * Floating point is kept out of everything but the deliberate flag raising: times are
 * integer nanoseconds from CLOCK_MONOTONIC, per-operation figures integer picoseconds, and
 * medians, ratios and printing integer arithmetic. A sticky flag left set by the benchmark's
 * own arithmetic would make the MXCSR values the two sides of a raw jump load differ, which is
 * the very cost yield_round_trip_fp_ns looks for (DESIGN.md, "The MXCSR cliff").
 *
 * Usage: bench_switch [scale]    scale multiplies every iteration count (0.1: a quick run).
 */
#include <fenv.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define HAVE_MXCSR 1
#define MXCSR_FLAGS 0x3fu
#endif

#include "fiber/fcontext.h"
#include "fiber/future.h"
#define BENCH_NAME "bench_switch"
#define BENCH_RAW_JUMP
#include "bench.h"
#include "moor.h"

/* Iteration counts at scale 1: each repetition of each measurement takes ~10-60 ms. */
#define RAW_N 2000000u
#define YIELD_N 1000000u
#define SPAWN_N 500000u
#define COLD_K 10000u
#define FP_EACH_N 500000u

/* The floating-point state a switch reloads: MXCSR where there is one, else the flags. */
static unsigned fp_state(void)
{
#ifdef HAVE_MXCSR
    return _mm_getcsr();
#else
    return (unsigned)fetestexcept(FE_ALL_EXCEPT);
#endif
}

static int fp_state_clean(unsigned state)
{
#ifdef HAVE_MXCSR
    return (state & MXCSR_FLAGS) == 0;
#else
    return state == 0;
#endif
}

/* ---- raising floating-point exception flags ------------------------------------------ */

/* Volatile operands: the division happens at run time, so the flag is really raised. */
static volatile double fp_one = 1.0, fp_three = 3.0, fp_zero = 0.0, fp_big = 1e308;
static volatile double fp_sink;

enum fp_who { FP_FIBER_A, FP_FIBER_B, FP_EXECUTOR };

/* A different flag for each party, so that no two sides agree by accident. */
static void fp_raise(enum fp_who who)
{
    switch (who) {
    case FP_FIBER_A:
        fp_sink = fp_one / fp_three; /* FE_INEXACT */
        break;
    case FP_FIBER_B:
        fp_sink = fp_one / fp_zero; /* FE_DIVBYZERO */
        break;
    case FP_EXECUTOR:
        fp_sink = fp_big * fp_big; /* FE_OVERFLOW (and FE_INEXACT) */
        break;
    }
}

/* fp_raise, then make sure the flag is really up (outside timed loops only). */
static void fp_raise_checked(enum fp_who who)
{
    static const int expect[] = {FE_INEXACT, FE_DIVBYZERO, FE_OVERFLOW};
    fp_raise(who);
    if (!fetestexcept(expect[who]))
        die("floating-point work did not raise its exception flag");
}

/* ---- (a) the raw reference: jump_fcontext on a stack of our own ----------------------- */

#define RAW_STACK_SIZE (64u * 1024u)

enum raw_cmd { RAW_BOUNCE = 0, RAW_CLEAR_FLAGS, RAW_GET_FP_STATE };

struct raw {
    fcontext_t ctx; /* where the context waits for the next jump */
    void *stack;
};

/* The other side of the round trip: jump straight back, or run a command first. Never
 * returns (returning from a context's function would end the thread). */
static void raw_entry(transfer_t t)
{
    for (;;) {
        void *reply = NULL;
        if (__builtin_expect(t.data != (void *)RAW_BOUNCE, 0)) {
            if (t.data == (void *)RAW_CLEAR_FLAGS)
                feclearexcept(FE_ALL_EXCEPT);
            else
                reply = (void *)(uintptr_t)fp_state();
        }
        t = jump_fcontext(t.fctx, reply);
    }
}

static void raw_init(struct raw *r)
{
    r->stack = mmap(NULL, RAW_STACK_SIZE, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (r->stack == MAP_FAILED)
        die("mmap of the raw context's stack failed");
    r->ctx = make_fcontext((char *)r->stack + RAW_STACK_SIZE, RAW_STACK_SIZE, raw_entry);
}

static void *raw_send(struct raw *r, enum raw_cmd cmd)
{
    transfer_t t = jump_fcontext(r->ctx, (void *)(uintptr_t)cmd);
    r->ctx = t.fctx;
    return t.data;
}

static uint64_t bench_raw(struct raw *r, uint64_t n)
{
    /* Both sides clean before timing: each jump then loads the value already in force. */
    feclearexcept(FE_ALL_EXCEPT);
    raw_send(r, RAW_CLEAR_FLAGS);
    for (uint64_t i = 0; i < n / 16; i++)
        r->ctx = jump_fcontext(r->ctx, NULL).fctx;

    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++)
        r->ctx = jump_fcontext(r->ctx, NULL).fctx;
    uint64_t t1 = now_ns();

    unsigned here = fp_state();
    unsigned there = (unsigned)(uintptr_t)raw_send(r, RAW_GET_FP_STATE);
    if (here != there || !fp_state_clean(here))
        fprintf(stderr, "bench_switch: warning: raw reference ran with fp state %#x here, %#x "
                        "in the context\n", here, there);
    return ps_per_op(t0, t1, n);
}

/* ---- executors ------------------------------------------------------------------------ */

/* Every moor measurement gets an executor of its own, so that none inherits another's
 * stacks, queue or floating-point state. */
static moor_executor *executor_begin(void)
{
    moor_executor *ex;
    check(moor_executor_new(&ex, NULL), "moor_executor_new");
    return ex;
}

/* ---- (b), (e), fp_each: two fibers yielding in turn ---------------------------------- */

enum fp_mode {
    FP_NONE,   /* clean: nobody does floating point */
    FP_BEFORE, /* each party raises a flag once, before the timed loop */
    FP_EACH,   /* each fiber raises a flag before every yield */
};

struct yield_pair {
    uint64_t warm, n;
    enum fp_mode fp;
    uint64_t t0, t1; /* taken by fiber A, around its n yields (B's n fall in between) */
};

struct yielder {
    struct yield_pair *pair;
    enum fp_who who; /* FP_FIBER_A times the loop */
};

static intptr_t yielder_fn(void *arg)
{
    const struct yielder *y = arg;
    struct yield_pair *p = y->pair;
    for (uint64_t i = 0; i < p->warm; i++)
        moor_yield();
    if (p->fp != FP_NONE)
        fp_raise_checked(y->who);
    if (y->who == FP_FIBER_A)
        p->t0 = now_ns();
    if (p->fp == FP_EACH) {
        for (uint64_t i = 0; i < p->n; i++) {
            fp_raise(y->who);
            moor_yield();
        }
    } else {
        for (uint64_t i = 0; i < p->n; i++)
            moor_yield();
    }
    if (y->who == FP_FIBER_A)
        p->t1 = now_ns();
    return 0;
}

/* The different-functions shape: a driver that times, and a worker of its own code. Both
 * loops are written out in each, so that neither suspends at the other's call site. */
static intptr_t yield_driver_fn(void *arg)
{
    const struct yielder *y = arg;
    struct yield_pair *p = y->pair;
    for (uint64_t i = 0; i < p->warm; i++)
        moor_yield();
    if (p->fp != FP_NONE)
        fp_raise_checked(y->who);
    p->t0 = now_ns();
    for (uint64_t i = 0; i < p->n; i++)
        moor_yield();
    p->t1 = now_ns();
    return 0;
}

static intptr_t yield_worker_fn(void *arg)
{
    const struct yielder *y = arg;
    struct yield_pair *p = y->pair;
    if (p->fp != FP_NONE)
        fp_raise_checked(y->who); /* before the driver's timed loop, as FP_BEFORE asks */
    for (uint64_t i = 0; i < p->warm + p->n; i++)
        moor_yield();
    return 0;
}

enum yield_shape { SAME_FUNCTION, DIFFERENT_FUNCTIONS };

/* A yields, B runs and yields, A runs again: between A's timestamps lie n yields of each,
 * that is n round trips. */
static uint64_t bench_yield_shaped(uint64_t n, enum fp_mode fp, enum yield_shape shape)
{
    feclearexcept(FE_ALL_EXCEPT);
    moor_executor *ex = executor_begin();
    struct yield_pair pair = {.warm = n / 16, .n = n, .fp = fp};
    struct yielder a = {&pair, FP_FIBER_A}, b = {&pair, FP_FIBER_B};
    moor_fiber *fa, *fb;
    spawn_checked(&fa, shape == SAME_FUNCTION ? yielder_fn : yield_driver_fn, &a);
    spawn_checked(&fb, shape == SAME_FUNCTION ? yielder_fn : yield_worker_fn, &b);
    if (fp != FP_NONE)
        fp_raise_checked(FP_EXECUTOR); /* the thread that runs the executor, as it starts */
    join_checked(fa);
    join_checked(fb);
    moor_executor_free(ex);
    return ps_per_op(pair.t0, pair.t1, n);
}

static uint64_t bench_yield(uint64_t n, enum fp_mode fp)
{
    return bench_yield_shaped(n, fp, SAME_FUNCTION);
}

/* ---- (c) spawn + join with a warm stack pool ------------------------------------------ */

static intptr_t empty_fn(void *arg)
{
    (void)arg;
    return 0;
}

struct spawn_loop {
    uint64_t warm, n;
    uint64_t t0, t1;
};

static intptr_t spawn_loop_fn(void *arg)
{
    struct spawn_loop *s = arg;
    for (uint64_t i = 0; i < s->warm; i++) {
        moor_fiber *f;
        spawn_checked(&f, empty_fn, NULL);
        join_checked(f);
    }
    s->t0 = now_ns();
    for (uint64_t i = 0; i < s->n; i++) {
        moor_fiber *f;
        spawn_checked(&f, empty_fn, NULL);
        join_checked(f);
    }
    s->t1 = now_ns();
    return 0;
}

static uint64_t bench_spawn_warm(uint64_t n)
{
    feclearexcept(FE_ALL_EXCEPT);
    moor_executor *ex = executor_begin();
    struct spawn_loop s = {.warm = n / 16, .n = n};
    moor_fiber *f;
    spawn_checked(&f, spawn_loop_fn, &s);
    join_checked(f);
    moor_executor_free(ex);
    return ps_per_op(s.t0, s.t1, n);
}

/* ---- (d) spawn + join with every stack freshly mapped ---------------------------------- */

struct spawn_cold {
    uint64_t k;
    moor_fiber **fibers;
    uint64_t t0, t1;
};

/* None is joined before all are spawned, so the pool never has a stack to hand back: each
 * spawn maps one. (The executor's pre-mapped stack went to this driver fiber.) */
static intptr_t spawn_cold_fn(void *arg)
{
    struct spawn_cold *s = arg;
    s->t0 = now_ns();
    for (uint64_t i = 0; i < s->k; i++)
        spawn_checked(&s->fibers[i], empty_fn, NULL);
    for (uint64_t i = 0; i < s->k; i++)
        join_checked(s->fibers[i]);
    s->t1 = now_ns();
    return 0;
}

static uint64_t bench_spawn_cold(uint64_t k, moor_fiber **fibers)
{
    feclearexcept(FE_ALL_EXCEPT);
    moor_executor *ex = executor_begin();
    struct spawn_cold s = {.k = k, .fibers = fibers};
    moor_fiber *f;
    spawn_checked(&f, spawn_cold_fn, &s);
    join_checked(f);
    moor_executor_free(ex);
    return ps_per_op(s.t0, s.t1, k);
}

/* ---- the pin check's cost per poll ----------------------------------------------------------
 * A future that stays pending, polled through its op with and without the check that
 * moor_future_poll and moor_future_cancel make first (the same inline function). */

struct counting {
    moor_future base;
    uint64_t polls;
};

__attribute__((noinline)) static moor_poll counting_poll(moor_future *fut, moor_cx *cx)
{
    (void)cx;
    ((struct counting *)(void *)fut)->polls++;
    return MOOR_PENDING;
}

static const moor_future_ops counting_ops = {"counting", counting_poll, NULL};

static uint64_t bench_poll(uint64_t n, int checked)
{
    struct counting c = {.polls = 0};
    moor_future_init(&c.base, &counting_ops, 0);
    moor_cx cx = {{NULL, NULL, 0}, NULL, NULL};
    moor_future *volatile fut = &c.base; /* reloaded each time, as a caller's would be */
    (void)moor_future_poll(fut, &cx);   /* pending: pinned from here on */
    uint64_t t0 = now_ns();
    if (checked) {
        for (uint64_t i = 0; i < n; i++) {
            moor_future *f = fut;
            moor__pin_check(f, "polled");
            (void)f->ops->poll(f, &cx);
        }
    } else {
        for (uint64_t i = 0; i < n; i++) {
            moor_future *f = fut;
            (void)f->ops->poll(f, &cx);
        }
    }
    uint64_t t1 = now_ns();
    if (c.polls != n + 1)
        die("poll count is off");
    (void)moor_future_cancel(&c.base);
    return ps_per_op(t0, t1, n);
}

/* ---- results -------------------------------------------------------------------------- */

enum figure {
    RAW, YIELD, SPAWN_WARM, SPAWN_COLD, YIELD_FP, YIELD_FP_EACH, POLL, POLL_DIRECT, YIELD_ASYM,
    YIELD_FP_ASYM, RAW_ASYM, NFIGURES
};

static const char *const figure_key[NFIGURES] = {
    "raw_switch_round_trip_ns", "yield_round_trip_ns",    "spawn_join_warm_ns",
    "spawn_join_cold_ns",       "yield_round_trip_fp_ns", "yield_round_trip_fp_each_ns",
    "poll_pin_checked_ns",      "poll_unchecked_ns",      "yield_round_trip_asym_ns",
    "yield_round_trip_fp_asym_ns", "raw_switch_round_trip_asym_ns",
};

static const char *guard_name(moor_guard_mode mode)
{
    switch (mode) {
    case MOOR_GUARD_MADVISE:
        return "madvise";
    case MOOR_GUARD_MPROTECT:
        return "mprotect";
    case MOOR_GUARD_AUTO:
        break;
    }
    return "auto";
}

/* Targets (issue 17): the different-functions shape is the headline; libdill sits at 3.2 x
 * raw for a yield and 3.6 x for a spawn on this machine. */
static const struct bench_ratio ratios[] = {
    {"yield_vs_raw_ratio", YIELD, RAW, 300, "3"},
    {"fp_vs_clean_ratio", YIELD_FP, YIELD, 120, "1.2"},
    {"fp_asym_vs_clean_ratio", YIELD_FP_ASYM, YIELD_ASYM, 120, "1.2"},
};
#define NRATIOS (sizeof ratios / sizeof ratios[0])

static uint64_t pair_raw(uint64_t n, void *ctx)
{
    return bench_raw(ctx, n);
}

static uint64_t pair_yield_asym(uint64_t n, void *ctx)
{
    (void)ctx;
    return bench_yield_shaped(n, FP_NONE, DIFFERENT_FUNCTIONS);
}

static uint64_t pair_spawn_warm(uint64_t n, void *ctx)
{
    (void)ctx;
    return bench_spawn_warm(n);
}

/* The two targets in the different-functions shape, in paired slices (bench.h) of a few
 * milliseconds; ctx: the raw reference's struct raw. */
#define NPAIRS 2
static const struct bench_pair pairs[NPAIRS] = {
    {"yield_asym_vs_raw_ratio", pair_yield_asym, 50000, pair_raw, 100000, 290, "2.9"},
    {"spawn_vs_raw_ratio", pair_spawn_warm, 40000, pair_raw, 100000, 340, "3.4"},
};

/* Information: what moor adds to the raw switch in the different-functions shape. */
static const struct bench_ratio info_ratios[] = {
    {"yield_asym_vs_raw_asym_ratio", YIELD_ASYM, RAW_ASYM, 0, "-"},
};

/* The iteration counts of this run, at its scale, and what the measurements need. */
struct run {
    uint64_t raw_n, yield, spawn, cold, fp_each;
    struct raw raw;
    moor_fiber **cold_fibers;
};

static void round_all(uint64_t *r, void *ctx)
{
    struct run *run = ctx;
    r[RAW] = bench_raw(&run->raw, run->raw_n);
    r[YIELD] = bench_yield(run->yield, FP_NONE);
    r[SPAWN_WARM] = bench_spawn_warm(run->spawn);
    r[SPAWN_COLD] = bench_spawn_cold(run->cold, run->cold_fibers);
    r[YIELD_FP] = bench_yield(run->yield, FP_BEFORE);
    r[YIELD_FP_EACH] = bench_yield(run->fp_each, FP_EACH);
    r[POLL] = bench_poll(run->yield, 1);
    r[POLL_DIRECT] = bench_poll(run->yield, 0);
    r[YIELD_ASYM] = bench_yield_shaped(run->yield, FP_NONE, DIFFERENT_FUNCTIONS);
    r[YIELD_FP_ASYM] = bench_yield_shaped(run->yield, FP_BEFORE, DIFFERENT_FUNCTIONS);
    r[RAW_ASYM] = bench_raw_asym_round_trip(run->raw_n);
}

int main(int argc, char **argv)
{
    const char *scale_arg;
    double scale = bench_scale_arg(argc, argv, &scale_arg);
    struct run run = {.raw_n = scaled(RAW_N, scale), .yield = scaled(YIELD_N, scale),
                      .spawn = scaled(SPAWN_N, scale), .cold = scaled(COLD_K, scale),
                      .fp_each = scaled(FP_EACH_N, scale)};
    feclearexcept(FE_ALL_EXCEPT); /* the last floating point until the deliberate kind */

    moor_executor *ex = executor_begin();
    moor_guard_mode guard = moor_executor_guard(ex);
    moor_executor_free(ex);

    run.cold_fibers = malloc(run.cold * sizeof *run.cold_fibers);
    if (!run.cold_fibers)
        die("out of memory");
    raw_init(&run.raw);

    struct stats st[NFIGURES];
    bench_repeat(NFIGURES, round_all, &run, st);
    struct bench_pair_result pair[NPAIRS];
    for (int i = 0; i < NPAIRS; i++)
        pair[i] = bench_pair_run(&pairs[i], &run.raw);
    feclearexcept(FE_ALL_EXCEPT);

    bench_print_keys(figure_key, st, NFIGURES, ratios, NRATIOS);
    for (int i = 0; i < NPAIRS; i++)
        bench_print_pair_keys(&pairs[i], &pair[i]);
    bench_print_keys(figure_key, st, 0, info_ratios, 1);
    /* What the pin check adds to a poll (medians; 0 when lost in the noise). */
    uint64_t poll_ps = st[POLL].median, direct_ps = st[POLL_DIRECT].median;
    uint64_t extra_ps = poll_ps > direct_ps ? poll_ps - direct_ps : 0;
    printf("pin_check_ns: %llu.%02llu ns\n", (ull)(extra_ps / 1000), (ull)(extra_ps % 1000 / 10));
    printf("guard_mode: %s\n", guard_name(guard));
    bench_print_cpu_model();

    const uint64_t iters[NFIGURES] = {run.raw_n, run.yield,   run.spawn, run.cold,
                                      run.yield, run.fp_each, run.yield, run.yield,
                                      run.yield, run.yield, run.raw_n};
    bench_print_table(scale_arg, figure_key, st, iters, NFIGURES);
    bench_print_targets(ratios, NRATIOS, st);
    for (int i = 0; i < NPAIRS; i++)
        bench_print_pair_target(&pairs[i], &pair[i]);

    munmap(run.raw.stack, RAW_STACK_SIZE); /* its context is never resumed again */
    free(run.cold_fibers);
    return 0;
}
