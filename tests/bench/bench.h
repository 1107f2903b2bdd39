/* The measurement plumbing that bench_switch and bench_chan share: repetitions and integer
 * medians, the `key: value unit` lines (STYLE.md) and the table for humans.
 *
 * Past reading the scale argument (after which a program clears the exception flags) the
 * plumbing does no floating point: times are integer nanoseconds from CLOCK_MONOTONIC,
 * per-operation figures integer picoseconds, and medians, ratios and printing integer
 * arithmetic. bench_switch measures what a sticky floating-point flag costs a switch, and a
 * flag raised by the plumbing would spoil that.
 *
 * A program defines BENCH_NAME (its name, for error messages) before including this. */
#ifndef MOOR_BENCH_H
#define MOOR_BENCH_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "moor.h"

#ifndef BENCH_NAME
#error "define BENCH_NAME before including bench.h"
#endif

#define REPS 11
#define BENCH_MAX_FIGURES 16

typedef unsigned long long ull;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Picoseconds per operation: keeps a decimal or two of a nanosecond without floating point. */
static uint64_t ps_per_op(uint64_t t0, uint64_t t1, uint64_t n)
{
    return (t1 - t0) * 1000u / n;
}

static void check(int rc, const char *what)
{
    if (rc < 0) {
        fprintf(stderr, BENCH_NAME ": %s: %s\n", what, moor_strerror(rc));
        exit(1);
    }
}

static void die(const char *msg)
{
    fprintf(stderr, BENCH_NAME ": %s\n", msg);
    exit(1);
}

/* ---- the raw reference: a jump_fcontext round trip on a stack of the bench's own ---------- */

#ifdef BENCH_RAW_JUMP
#include <sys/mman.h>

#include "fiber/fcontext.h"

#define BENCH_RAW_STACK (64u * 1024u)

/* The other side: jump straight back, for ever. */
static void bench_raw_bounce(transfer_t t)
{
    for (;;)
        t = jump_fcontext(t.fctx, NULL);
}

/* Picoseconds per round trip main -> context -> main over n round trips (after n/16 warm). */
__attribute__((unused)) static uint64_t bench_raw_round_trip(uint64_t n)
{
    static void *stack;
    static fcontext_t ctx;
    if (!stack) {
        stack = mmap(NULL, BENCH_RAW_STACK, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED)
            die("mmap of the raw context's stack failed");
        ctx = make_fcontext((char *)stack + BENCH_RAW_STACK, BENCH_RAW_STACK, bench_raw_bounce);
    }
    for (uint64_t i = 0; i < n / 16; i++)
        ctx = jump_fcontext(ctx, NULL).fctx;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++)
        ctx = jump_fcontext(ctx, NULL).fctx;
    return ps_per_op(t0, now_ns(), n);
}

/* The same round trip in the different-functions shape, with nothing of a runtime in it: a
 * driver loop and a worker loop, different functions, each switching through one out-of-line
 * call (as every stackful runtime's suspend is one). On x86 the return out of that call after
 * each switch lands in the other function than the one the return-stack predictor expects,
 * so each switch costs a mispredicted return: what this shape costs any runtime built on
 * fcontext. A runtime's figure in this shape over this one is what the runtime itself adds. */
static fcontext_t bench_raw_asym_other; /* where the other side waits */

static __attribute__((noinline)) void bench_raw_asym_switch(void)
{
    bench_raw_asym_other = jump_fcontext(bench_raw_asym_other, NULL).fctx;
}

static __attribute__((noinline)) void bench_raw_asym_worker(void)
{
    for (;;)
        bench_raw_asym_switch();
}

static void bench_raw_asym_entry(transfer_t t)
{
    bench_raw_asym_other = t.fctx;
    bench_raw_asym_worker();
}

static __attribute__((noinline)) void bench_raw_asym_driver(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        bench_raw_asym_switch();
}

__attribute__((unused)) static uint64_t bench_raw_asym_round_trip(uint64_t n)
{
    static void *stack;
    if (!stack) {
        stack = mmap(NULL, BENCH_RAW_STACK, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED)
            die("mmap of the raw context's stack failed");
        bench_raw_asym_other = make_fcontext((char *)stack + BENCH_RAW_STACK, BENCH_RAW_STACK,
                                             bench_raw_asym_entry);
        bench_raw_asym_switch(); /* the worker starts and switches straight back */
    }
    bench_raw_asym_driver(n / 16);
    uint64_t t0 = now_ns();
    bench_raw_asym_driver(n);
    return ps_per_op(t0, now_ns(), n);
}
#endif

static void spawn_checked(moor_fiber **out, moor_fiber_fn fn, void *arg)
{
    check(moor_spawn(out, fn, arg, NULL), "moor_spawn");
}

static void join_checked(moor_fiber *f)
{
    check(moor_join(f, NULL), "moor_join");
}

/* ---- the scale argument ---------------------------------------------------------------- */

/* `prog [scale]`: the scale (1 without the argument) and its text in *scale_arg. Exits with
 * status 2 after a message if the argument is not a number in (0, 1000]. */
static double bench_scale_arg(int argc, char **argv, const char **scale_arg)
{
    *scale_arg = "1";
    if (argc > 2) {
        fprintf(stderr, "usage: %s [scale]   (scale multiplies iteration counts; default 1)\n",
                argv[0]);
        exit(2);
    }
    if (argc < 2)
        return 1.0;
    char *end;
    *scale_arg = argv[1];
    double scale = strtod(*scale_arg, &end);
    if (end == *scale_arg || *end != '\0' || !(scale > 0.0) || scale > 1000.0) {
        fprintf(stderr, "%s: scale must be a number in (0, 1000], not \"%s\"\n", argv[0],
                *scale_arg);
        exit(2);
    }
    return scale;
}

static uint64_t scaled(unsigned base, double scale)
{
    uint64_t n = (uint64_t)((double)base * scale);
    return n ? n : 1;
}

/* ---- repetitions ----------------------------------------------------------------------- */

struct stats {
    uint64_t median, min, max; /* picoseconds per operation */
};

static struct stats stats_of(const uint64_t *v, size_t n)
{
    uint64_t s[REPS];
    memcpy(s, v, n * sizeof *s);
    for (size_t i = 1; i < n; i++) /* insertion sort: n is tiny */
        for (size_t j = i; j > 0 && s[j - 1] > s[j]; j--) {
            uint64_t tmp = s[j];
            s[j] = s[j - 1];
            s[j - 1] = tmp;
        }
    return (struct stats){.median = s[n / 2], .min = s[0], .max = s[n - 1]};
}

/* One round: every measurement once, figure i into r[i]. */
typedef void bench_round_fn(uint64_t *r, void *ctx);

/* A round runs every measurement once, so that a noisy stretch of the machine hits all of
 * them alike and the ratios stay meaningful. Round -1 warms up and is discarded. */
static void bench_repeat(int nfigures, bench_round_fn *round_fn, void *ctx, struct stats *st)
{
    if (nfigures > BENCH_MAX_FIGURES)
        die("too many figures");
    uint64_t results[BENCH_MAX_FIGURES][REPS];
    for (int round = -1; round < REPS; round++) {
        uint64_t r[BENCH_MAX_FIGURES];
        round_fn(r, ctx);
        if (round >= 0)
            for (int i = 0; i < nfigures; i++)
                results[i][round] = r[i];
    }
    for (int i = 0; i < nfigures; i++)
        st[i] = stats_of(results[i], REPS);
}

/* ---- targets in paired slices, and the machine's throughput ---------------------------- */

/* This VM's core is at times shared (by another guest on its sibling hardware thread, as far
 * as can be told from inside), for milliseconds to minutes. Code that needs the core's issue
 * bandwidth then runs up to ~1.7 x slower, while the raw jump loop, bound by the latency of
 * the control-register loads in each jump, runs ~1.15 x slower: a ratio to the raw loop
 * taken in such a stretch says more about the machine than about moor. So each target ratio
 * is measured in slices of a few milliseconds (the raw loop, moor's figure, the raw loop
 * again), each between two runs of a probe that is bound by issue bandwidth the same way but
 * has nothing of moor in it; the slices where the probe runs at full speed give the target
 * figure, and every slice's median is printed beside it. If the whole run is slow, the
 * probe's best is slow too and the slow slices count: the figure is then the slow one. */
#define BENCH_SLICES 151
#define BENCH_FULL_MIN 11 /* slices at full throughput needed for the target figure */

static volatile uint64_t bench_probe_sink;

/* Four independent chains of integer work, no memory, no floating point: picoseconds per
 * iteration (~36 ns at full throughput on the development VM, 45-75 ns when shared). */
static __attribute__((noinline, unused)) uint64_t bench_probe(void)
{
    enum { N = 10000 };
    uint64_t a = 1, b = 2, c = 3, d = 4;
    uint64_t t0 = now_ns();
    for (unsigned i = 0; i < N; i++)
        for (unsigned k = 0; k < 25; k++) {
            a = a * 3 + 1;
            b ^= b << 7;
            c += c >> 3;
            d = d * 5 + k;
            a ^= b;
            c += d;
            b += 11;
            d ^= 13;
        }
    uint64_t ps = ps_per_op(t0, now_ns(), N);
    bench_probe_sink = a + b + c + d;
    return ps;
}

/* A target measured in paired slices: num(num_n, ctx) in picoseconds per operation over
 * den(den_n, ctx), the raw reference, at most limit_hundredths. */
struct bench_pair {
    const char *key;
    uint64_t (*num)(uint64_t n, void *ctx);
    uint64_t num_n;
    uint64_t (*den)(uint64_t n, void *ctx);
    uint64_t den_n;
    unsigned limit_hundredths;
    const char *limit_text;
};

struct bench_pair_result {
    uint64_t full, all; /* median ratio in hundredths: full-throughput slices, every slice */
    unsigned nfull;     /* slices at full throughput, of BENCH_SLICES */
    uint64_t probe_best, probe_median; /* picoseconds per probe iteration */
};

static __attribute__((unused)) uint64_t median_u64(uint64_t *v, size_t n)
{
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0 && v[j - 1] > v[j]; j--) {
            uint64_t tmp = v[j];
            v[j] = v[j - 1];
            v[j - 1] = tmp;
        }
    return v[n / 2];
}

/* A slice is at full throughput when both its probes ran within 10% of the best probes (the
 * 10th percentile: one probe alone may run fast by chance). */
__attribute__((unused)) static struct bench_pair_result bench_pair_run(const struct bench_pair *p,
                                                                       void *ctx)
{
    uint64_t ratio[BENCH_SLICES], probe[BENCH_SLICES], sorted[BENCH_SLICES];
    (void)p->num(p->num_n, ctx); /* warm up */
    for (int i = 0; i < BENCH_SLICES; i++) {
        uint64_t p0 = bench_probe();
        uint64_t d0 = p->den(p->den_n, ctx);
        uint64_t x = p->num(p->num_n, ctx);
        uint64_t d1 = p->den(p->den_n, ctx);
        uint64_t p1 = bench_probe();
        uint64_t den = (d0 + d1) / 2;
        ratio[i] = den ? (x * 100 + den / 2) / den : UINT64_MAX;
        probe[i] = p0 > p1 ? p0 : p1;
    }
    struct bench_pair_result r = {0};
    memcpy(sorted, probe, sizeof sorted);
    r.probe_median = median_u64(sorted, BENCH_SLICES);
    r.probe_best = sorted[BENCH_SLICES / 10];
    uint64_t full[BENCH_SLICES];
    for (int i = 0; i < BENCH_SLICES; i++)
        if (probe[i] * 10 <= r.probe_best * 11)
            full[r.nfull++] = ratio[i];
    memcpy(sorted, ratio, sizeof sorted);
    r.all = median_u64(sorted, BENCH_SLICES);
    r.full = r.nfull >= BENCH_FULL_MIN ? median_u64(full, r.nfull) : r.all;
    return r;
}

/* ---- printing -------------------------------------------------------------------------- */

/* Picoseconds as nanoseconds with one decimal, rounded. */
static const char *fmt_ns(char *buf, size_t len, uint64_t ps)
{
    ull tenths = (ps + 50) / 100;
    snprintf(buf, len, "%llu.%llu", tenths / 10, tenths % 10);
    return buf;
}

/* num/den with two decimals, rounded. */
static const char *fmt_ratio(char *buf, size_t len, uint64_t num, uint64_t den)
{
    if (den == 0) {
        snprintf(buf, len, "inf");
        return buf;
    }
    ull hundredths = (num * 100 + den / 2) / den;
    snprintf(buf, len, "%llu.%02llu", hundredths / 100, hundredths % 100);
    return buf;
}

/* A target: the median of figure num over that of figure den, at most limit_hundredths. */
struct bench_ratio {
    const char *key;
    int num, den;
    unsigned limit_hundredths;
    const char *limit_text;
};

/* The `key: value unit` lines: every figure's median, then every ratio. */
static void bench_print_keys(const char *const *keys, const struct stats *st, int nfigures,
                             const struct bench_ratio *ratios, size_t nratios)
{
    char b[32];
    for (int i = 0; i < nfigures; i++)
        printf("%s: %s ns\n", keys[i], fmt_ns(b, sizeof b, st[i].median));
    for (size_t i = 0; i < nratios; i++)
        printf("%s: %s x\n", ratios[i].key,
               fmt_ratio(b, sizeof b, st[ratios[i].num].median, st[ratios[i].den].median));
}

static void cpu_model(char *buf, size_t len)
{
    snprintf(buf, len, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) != 0)
            continue;
        const char *v = strchr(line, ':');
        if (!v)
            continue;
        v++;
        while (*v == ' ' || *v == '\t')
            v++;
        snprintf(buf, len, "%s", v);
        buf[strcspn(buf, "\n")] = '\0';
        break;
    }
    fclose(f);
}

static void bench_print_cpu_model(void)
{
    char cpu[256];
    cpu_model(cpu, sizeof cpu);
    printf("cpu_model: %s\n", cpu);
}

/* The table for humans: median, min, max and spread of every figure. */
static void bench_print_table(const char *scale_arg, const char *const *keys,
                              const struct stats *st, const uint64_t *iters, int nfigures)
{
    char b1[32], b2[32], b3[32];
    printf("\n%d repetitions, median shown, after one warm-up round; scale %s\n", REPS,
           scale_arg);
    printf("%-28s %10s %10s %10s %8s %10s\n", "figure (ns)", "median", "min", "max", "spread",
           "iterations");
    for (int i = 0; i < nfigures; i++) {
        ull spread = st[i].median ? (st[i].max - st[i].min) * 100 / st[i].median : 0;
        printf("%-28s %10s %10s %10s %7llu%% %10llu\n", keys[i],
               fmt_ns(b1, sizeof b1, st[i].median), fmt_ns(b2, sizeof b2, st[i].min),
               fmt_ns(b3, sizeof b3, st[i].max), spread, (ull)iters[i]);
    }
}

/* Every ratio against its target. */
__attribute__((unused)) static void bench_print_targets(const struct bench_ratio *ratios,
                                                        size_t nratios, const struct stats *st)
{
    char b[32];
    printf("\n%-28s %10s %10s %8s\n", "target", "measured", "limit", "result");
    for (size_t i = 0; i < nratios; i++) {
        uint64_t num = st[ratios[i].num].median, den = st[ratios[i].den].median;
        int pass = num * 100 <= (uint64_t)ratios[i].limit_hundredths * den;
        printf("%-28s %8s x %8s x %8s\n", ratios[i].key, fmt_ratio(b, sizeof b, num, den),
               ratios[i].limit_text, pass ? "PASS" : "MISS");
    }
}

/* hundredths as "x.yz" */
static const char *fmt_hundredths(char *buf, size_t len, uint64_t h)
{
    snprintf(buf, len, "%llu.%02llu", (ull)(h / 100), (ull)(h % 100));
    return buf;
}

/* A paired target's `key: value unit` lines: the target figure (full-throughput slices, or
 * every slice if too few were), every slice's median, how many slices there were and how
 * many at full throughput, and the probe's best and median. */
__attribute__((unused)) static void bench_print_pair_keys(const struct bench_pair *p,
                                                          const struct bench_pair_result *r)
{
    char b[32];
    printf("%s: %s x\n", p->key, fmt_hundredths(b, sizeof b, r->full));
    printf("%s_all_slices: %s x\n", p->key, fmt_hundredths(b, sizeof b, r->all));
    printf("%s_slices: %d slices\n", p->key, BENCH_SLICES);
    printf("%s_full_throughput_slices: %u slices\n", p->key, r->nfull);
    printf("%s_probe_best_ns: %s ns\n", p->key, fmt_ns(b, sizeof b, r->probe_best));
    printf("%s_probe_median_ns: %s ns\n", p->key, fmt_ns(b, sizeof b, r->probe_median));
}

/* A paired target against its limit, as bench_print_targets prints the others. */
__attribute__((unused)) static void bench_print_pair_target(const struct bench_pair *p,
                                                            const struct bench_pair_result *r)
{
    char b[32], all[32];
    int pass = r->full <= p->limit_hundredths;
    printf("%-28s %8s x %8s x %8s   (%u of %d slices at full throughput; every slice: %s x)\n",
           p->key, fmt_hundredths(b, sizeof b, r->full), p->limit_text,
           r->nfull < BENCH_FULL_MIN ? (pass ? "PASS?" : "MISS?") : pass ? "PASS" : "MISS",
           r->nfull, BENCH_SLICES, fmt_hundredths(all, sizeof all, r->all));
}

#endif
