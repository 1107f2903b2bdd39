/* bench_chan — what channels, select and the mutex cost in moor, beside the raw moor_yield
 * round trip measured in the same run.
 *
 *   chan_round_trip_ns        two fibers ping-pong an int over two channels of capacity 0:
 *                             A -> B, then B -> A; both fibers run the same function
 *   chan1_round_trip_ns       the same with capacity 1
 *   raw_switch_round_trip_ns  jump_fcontext main -> context -> main: the reference of
 *                             chan_asym_vs_raw_ratio
 *   chan_round_trip_asym_ns   the capacity-0 ping-pong written as two functions,
 *                             one that sends then receives and one that receives then sends
 *   chan_asym_vs_raw_ratio    issue 17's target: chan_round_trip_asym_ns over the raw round
 *                             trip, measured in paired slices at the core's full throughput
 *                             (bench.h), with _all_slices, _slices, _full_throughput_slices
 *                             and _probe_best_ns, _probe_median_ns
 *   raw_switch_round_trip_asym_ns  (information) the raw round trip in that shape: a driver
 *                             and a worker function, each switching through one out-of-line
 *                             call; what the shape itself costs (bench.h)
 *   chan_asym_vs_raw_asym_ratio  (information) chan_round_trip_asym_ns over it: what moor's
 *                             channel and switch add in that shape
 *   mutex_lock_unlock_ns      moor_mutex_lock + moor_mutex_unlock, uncontended, in one fiber
 *   select2_ns                one round: moor_select over two receive futures, satisfied by a
 *                             partner fiber's send on one of the two channels, alternately
 *   yield_round_trip_ns       two fibers moor_yield() in turn; one yield by each (as
 *                             bench_switch measures it)
 *   chan_vs_yield_ratio       chan_round_trip_ns over yield_round_trip_ns, in paired slices
 *                             like chan_asym_vs_raw_ratio (with the same companion keys)
 *
 * The ping-pong and the yield loop have the same shape on purpose: two fibers running one
 * function, each suspending at the same call site, so that chan_vs_yield_ratio compares the
 * channel's own work with a bare switch and nothing else.
 *
 * Each figure is the median of REPS repetitions, after one warm-up round that is thrown away.
 * A round runs every measurement once, so that a noisy stretch of the machine hits all of
 * them alike and the ratio stays meaningful. As in bench_switch, no floating point runs
 * after the scale argument is read: times are integer nanoseconds from CLOCK_MONOTONIC,
 * per-operation figures integer picoseconds, medians, ratios and printing integer arithmetic.
 *
 * Usage: bench_chan [scale]    scale multiplies every iteration count (0.1: a quick run).
 */
#include <fenv.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BENCH_NAME "bench_chan"
#define BENCH_RAW_JUMP
#include "bench.h"
#include "moor.h"

/* Iteration counts at scale 1: each repetition of each measurement takes ~10-60 ms. */
#define YIELD_N 1000000u
#define CHAN_N 1000000u
#define MUTEX_N 10000000u
#define SELECT_N 1000000u

/* ---- executors, fibers, channels ------------------------------------------------------ */

/* Every measurement gets an executor of its own, so that none inherits another's stacks,
 * queue or floating-point state. */
static moor_executor *executor_begin(void)
{
    moor_executor *ex;
    feclearexcept(FE_ALL_EXCEPT);
    check(moor_executor_new(&ex, NULL), "moor_executor_new");
    return ex;
}

static moor_chan *chan_checked(size_t capacity)
{
    moor_chan *ch;
    check(moor_chan_new(&ch, sizeof(int), capacity), "moor_chan_new");
    return ch;
}

static void send_checked(moor_chan *ch, int v)
{
    check(moor_chan_send(ch, &v, -1), "moor_chan_send");
}

static int recv_checked(moor_chan *ch)
{
    int v;
    check(moor_chan_recv(ch, &v, -1), "moor_chan_recv");
    return v;
}

/* ---- yield_round_trip_ns: two fibers yielding in turn ---------------------------------- */

struct yield_pair {
    uint64_t warm, n;
    uint64_t t0, t1; /* taken by fiber A, around its n yields (B's n fall in between) */
};

struct yielder {
    struct yield_pair *pair;
    int times; /* fiber A: takes t0 and t1 */
};

static intptr_t yielder_fn(void *arg)
{
    const struct yielder *y = arg;
    struct yield_pair *p = y->pair;
    for (uint64_t i = 0; i < p->warm; i++)
        moor_yield();
    if (y->times)
        p->t0 = now_ns();
    for (uint64_t i = 0; i < p->n; i++)
        moor_yield();
    if (y->times)
        p->t1 = now_ns();
    return 0;
}

/* A yields, B runs and yields, A runs again: between A's timestamps lie n yields of each,
 * that is n round trips. */
static uint64_t bench_yield(uint64_t n)
{
    moor_executor *ex = executor_begin();
    struct yield_pair pair = {.warm = n / 16, .n = n};
    struct yielder a = {&pair, 1}, b = {&pair, 0};
    moor_fiber *fa, *fb;
    spawn_checked(&fa, yielder_fn, &a);
    spawn_checked(&fb, yielder_fn, &b);
    join_checked(fa);
    join_checked(fb);
    moor_executor_free(ex);
    return ps_per_op(pair.t0, pair.t1, n);
}

/* ---- chan_round_trip_ns, chan1_round_trip_ns: one function on both sides ---------------- */

struct pingpong {
    uint64_t warm, n;
    uint64_t t0, t1; /* taken by the serving fiber around its n rounds */
};

struct pinger {
    struct pingpong *pp;
    moor_chan *in, *out;
    int serves; /* puts the ball in play, times the rounds; the other takes it out at the end */
};

/* Receive, pass on one more. Both fibers wait at this one moor_chan_recv call. */
static void ping_rounds(const struct pinger *me, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        int v = recv_checked(me->in);
        send_checked(me->out, v + 1);
    }
}

static intptr_t pinger_fn(void *arg)
{
    const struct pinger *me = arg;
    struct pingpong *pp = me->pp;
    if (me->serves)
        send_checked(me->out, 0);
    ping_rounds(me, pp->warm);
    if (me->serves)
        pp->t0 = now_ns();
    ping_rounds(me, pp->n);
    if (me->serves)
        pp->t1 = now_ns();
    if (!me->serves) {
        /* Every hop added one: the serve (0) plus 2 (warm + n) hops. */
        int last = recv_checked(me->in);
        if ((uint64_t)last != 2 * (pp->warm + pp->n))
            die("ping-pong: a value was lost or duplicated");
    }
    return 0;
}

/* Between the server's timestamps it receives n times and sends n times, and each receive
 * waits for the other fiber's send of what the server sent before: n round trips. The other
 * fiber is spawned first, so that it is already waiting in recv when the ball is served: a
 * receive then waits and a send finds its receiver waiting, at every hop and for both
 * capacities (with capacity 1 the ring holds the served ball only until it is taken). */
static uint64_t bench_pingpong(uint64_t n, size_t capacity)
{
    moor_executor *ex = executor_begin();
    moor_chan *ab = chan_checked(capacity), *ba = chan_checked(capacity);
    struct pingpong pp = {.warm = n / 16, .n = n};
    struct pinger a = {&pp, ba, ab, 1}, b = {&pp, ab, ba, 0};
    moor_fiber *fa, *fb;
    spawn_checked(&fb, pinger_fn, &b);
    spawn_checked(&fa, pinger_fn, &a);
    join_checked(fb);
    join_checked(fa);
    moor_chan_free(ab);
    moor_chan_free(ba);
    moor_executor_free(ex);
    return ps_per_op(pp.t0, pp.t1, n);
}

/* ---- chan_round_trip_asym_ns: the same ping-pong as two functions ----------------------- */

/* x86: the return-stack predictor misses the return into the other function after each resume. */

static int serve_rounds(const struct pinger *me, uint64_t n)
{
    int v = 0;
    for (uint64_t i = 0; i < n; i++) {
        send_checked(me->out, v);
        v = recv_checked(me->in) + 1;
    }
    return v;
}

static void return_rounds(const struct pinger *me, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        int v = recv_checked(me->in);
        send_checked(me->out, v + 1);
    }
}

static intptr_t server_fn(void *arg)
{
    const struct pinger *me = arg;
    struct pingpong *pp = me->pp;
    serve_rounds(me, pp->warm);
    pp->t0 = now_ns();
    int v = serve_rounds(me, pp->n);
    pp->t1 = now_ns();
    if (v != 2 * (int)pp->n)
        die("asymmetric ping-pong: a value was lost or duplicated");
    return 0;
}

static intptr_t returner_fn(void *arg)
{
    const struct pinger *me = arg;
    return_rounds(me, me->pp->warm + me->pp->n);
    return 0;
}

/* As bench_pingpong, capacity 0: the returner waits in recv first. */
static uint64_t bench_pingpong_asym(uint64_t n)
{
    moor_executor *ex = executor_begin();
    moor_chan *ab = chan_checked(0), *ba = chan_checked(0);
    struct pingpong pp = {.warm = n / 16, .n = n};
    struct pinger a = {&pp, ba, ab, 1}, b = {&pp, ab, ba, 0};
    moor_fiber *fa, *fb;
    spawn_checked(&fb, returner_fn, &b);
    spawn_checked(&fa, server_fn, &a);
    join_checked(fb);
    join_checked(fa);
    moor_chan_free(ab);
    moor_chan_free(ba);
    moor_executor_free(ex);
    return ps_per_op(pp.t0, pp.t1, n);
}

/* ---- mutex_lock_unlock_ns: uncontended, one fiber -------------------------------------- */

struct mutex_loop {
    uint64_t warm, n;
    uint64_t t0, t1;
};

static void lock_rounds(moor_mutex *m, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        check(moor_mutex_lock(m, -1), "moor_mutex_lock");
        moor_mutex_unlock(m);
    }
}

static intptr_t mutex_fn(void *arg)
{
    struct mutex_loop *s = arg;
    moor_mutex m = MOOR_MUTEX_INIT;
    lock_rounds(&m, s->warm);
    s->t0 = now_ns();
    lock_rounds(&m, s->n);
    s->t1 = now_ns();
    if (m.locked)
        die("mutex: still locked after the loop");
    return 0;
}

static uint64_t bench_mutex(uint64_t n)
{
    moor_executor *ex = executor_begin();
    struct mutex_loop s = {.warm = n / 16, .n = n};
    moor_fiber *f;
    spawn_checked(&f, mutex_fn, &s);
    join_checked(f);
    moor_executor_free(ex);
    return ps_per_op(s.t0, s.t1, n);
}

/* ---- select2_ns: select over two receives, the partner alternating channels ------------- */

struct select_pair {
    moor_chan *ch[2];
    uint64_t warm, n;
    uint64_t t0, t1; /* taken by the selecting fiber around its n rounds */
};

static void select_rounds(struct select_pair *p, uint64_t from, uint64_t to)
{
    for (uint64_t i = from; i < to; i++) {
        int v[2] = {-1, -1};
        moor_chan_future op[2];
        moor_future *futs[2] = {&op[0].base, &op[1].base};
        moor_chan_recv_init(&op[0], p->ch[0], &v[0], -1);
        moor_chan_recv_init(&op[1], p->ch[1], &v[1], -1);
        int w = moor_select(futs, 2, -1);
        check(w, "moor_select");
        check((int)op[w].base.result, "moor_select: the winning receive");
        if (w != (int)(i & 1) || v[w] != (int)i)
            die("select: the wrong channel won, or the wrong value arrived");
    }
}

static intptr_t selector_fn(void *arg)
{
    struct select_pair *p = arg;
    select_rounds(p, 0, p->warm);
    p->t0 = now_ns();
    select_rounds(p, p->warm, p->warm + p->n);
    p->t1 = now_ns();
    return 0;
}

static intptr_t select_partner_fn(void *arg)
{
    const struct select_pair *p = arg;
    for (uint64_t i = 0; i < p->warm + p->n; i++)
        send_checked(p->ch[i & 1], (int)i);
    return 0;
}

/* The selector is spawned first and waits in its first select. From then on the rounds
 * come in pairs: the partner's send completes the waiting select and goes on to its next
 * send, which waits (no receiver yet); the selector runs, its select returns, and its next
 * select finds that sender waiting and completes it without suspending; the select after
 * that waits again. So a figure covers one select and one send, and half a switch each way. */
static uint64_t bench_select2(uint64_t n)
{
    moor_executor *ex = executor_begin();
    struct select_pair p = {.ch = {chan_checked(0), chan_checked(0)}, .warm = n / 16, .n = n};
    moor_fiber *fs, *fp;
    spawn_checked(&fs, selector_fn, &p);
    spawn_checked(&fp, select_partner_fn, &p);
    join_checked(fs);
    join_checked(fp);
    moor_chan_free(p.ch[0]);
    moor_chan_free(p.ch[1]);
    moor_executor_free(ex);
    return ps_per_op(p.t0, p.t1, n);
}

/* ---- results -------------------------------------------------------------------------- */

enum figure { CHAN0, CHAN1, CHAN0_ASYM, MUTEX, SELECT2, YIELD, RAW, RAW_ASYM, NFIGURES };

static const char *const figure_key[NFIGURES] = {
    "chan_round_trip_ns",   "chan1_round_trip_ns", "chan_round_trip_asym_ns",
    "mutex_lock_unlock_ns", "select2_ns",          "yield_round_trip_ns",
    "raw_switch_round_trip_ns", "raw_switch_round_trip_asym_ns",
};

/* a - b in picoseconds as signed nanoseconds with one decimal. */
static const char *fmt_ns_diff(char *buf, size_t len, uint64_t a, uint64_t b)
{
    buf[0] = a >= b ? '+' : '-';
    fmt_ns(buf + 1, len - 1, a >= b ? a - b : b - a);
    return buf;
}

/* chan_asym_vs_raw_ratio: the channel round trip in the shape real programs have, against the
 * raw jump measured in the same run (issue 17's target). */

static uint64_t pair_chan_asym(uint64_t n, void *ctx)
{
    (void)ctx;
    return bench_pingpong_asym(n);
}

static uint64_t pair_raw(uint64_t n, void *ctx)
{
    (void)ctx;
    return bench_raw_round_trip(n);
}

static uint64_t pair_chan(uint64_t n, void *ctx)
{
    (void)ctx;
    return bench_pingpong(n, 0);
}

static uint64_t pair_yield(uint64_t n, void *ctx)
{
    (void)ctx;
    return bench_yield(n);
}

/* The targets, in paired slices (bench.h) of a few milliseconds: issue 17's against the raw
 * jump, and the channel's own work against a bare switch (both moor's, in one function). */
#define NPAIRS 2
static const struct bench_pair pairs[NPAIRS] = {
    {"chan_asym_vs_raw_ratio", pair_chan_asym, 30000, pair_raw, 100000, 450, "4.5"},
    {"chan_vs_yield_ratio", pair_chan, 30000, pair_yield, 60000, 200, "2"},
};

/* Information: what moor adds to the raw switch in the different-functions shape. */
static const struct bench_ratio info_ratios[] = {
    {"chan_asym_vs_raw_asym_ratio", CHAN0_ASYM, RAW_ASYM, 0, "-"},
};

/* The iteration counts of this run, at its scale. */
struct counts {
    uint64_t yield, chan, mutex, select;
};

static void round_all(uint64_t *r, void *ctx)
{
    const struct counts *n = ctx;
    r[YIELD] = bench_yield(n->yield);
    r[CHAN0] = bench_pingpong(n->chan, 0);
    r[CHAN1] = bench_pingpong(n->chan, 1);
    r[CHAN0_ASYM] = bench_pingpong_asym(n->chan);
    r[MUTEX] = bench_mutex(n->mutex);
    r[SELECT2] = bench_select2(n->select);
    r[RAW] = bench_raw_round_trip(n->yield);
    r[RAW_ASYM] = bench_raw_asym_round_trip(n->yield);
}

int main(int argc, char **argv)
{
    const char *scale_arg;
    double scale = bench_scale_arg(argc, argv, &scale_arg);
    struct counts n = {.yield = scaled(YIELD_N, scale), .chan = scaled(CHAN_N, scale),
                       .mutex = scaled(MUTEX_N, scale), .select = scaled(SELECT_N, scale)};
    /* The ping-pong checks its values as int. */
    if (2 * (n.chan + n.chan / 16) > INT32_MAX || n.select + n.select / 16 > INT32_MAX)
        die("scale too large for int-valued messages");
    feclearexcept(FE_ALL_EXCEPT); /* the last floating point of the run */

    struct stats st[NFIGURES];
    bench_repeat(NFIGURES, round_all, &n, st);
    struct bench_pair_result pair[NPAIRS];
    for (int i = 0; i < NPAIRS; i++)
        pair[i] = bench_pair_run(&pairs[i], NULL);

    bench_print_keys(figure_key, st, NFIGURES, NULL, 0);
    for (int i = 0; i < NPAIRS; i++)
        bench_print_pair_keys(&pairs[i], &pair[i]);
    bench_print_keys(figure_key, st, 0, info_ratios, 1);
    bench_print_cpu_model();

    const uint64_t iters[NFIGURES] = {n.chan,   n.chan,  n.chan,  n.mutex,
                                      n.select, n.yield, n.yield, n.yield};
    bench_print_table(scale_arg, figure_key, st, iters, NFIGURES);
    char b1[32];
    printf("\nchan_round_trip_asym_ns (information): two functions, %s ns; on x86 the return "
           "into the other function after each resume is mispredicted\n",
           fmt_ns_diff(b1, sizeof b1, st[CHAN0_ASYM].median, st[CHAN0].median));
    printf("select2_ns: per round one select and the send that satisfies it; the select waits "
           "in every other round\n");

    printf("\n%-28s %10s %10s %8s\n", "target", "measured", "limit", "result");
    for (int i = 0; i < NPAIRS; i++)
        bench_print_pair_target(&pairs[i], &pair[i]);
    return 0;
}
