/* bench_cores — what a second core adds: the same work on one executor (one thread) and on two
 * executors (two threads), and what a value costs to cross between executors.
 *
 *   yield_per_s_1, yield_per_s_2    aggregate moor_yield calls per second: a pair of fibers
 *                                   yielding in turn on one executor, then such a pair on each
 *                                   of two executors on two threads at once
 *   spawn_per_s_1, spawn_per_s_2    the same for spawn + join of a fiber that returns at once
 *   cores_scaling_ratio_yield       yield_per_s_2 over yield_per_s_1 (target >= 1.8: nothing
 *   cores_scaling_ratio_spawn       shared between executors on the hot path); the same for
 *                                   spawn; cores_scaling_ratio is the lower of the two
 *   chan_round_trip_ns              two fibers of one executor ping-pong an int over two
 *                                   moor_chan of capacity 0 (both running one function, as
 *                                   bench_chan's figure of the same name)
 *   xchan_local_round_trip_ns       the same over two moor_xchan, both fibers on one executor
 *   xchan_round_trip_ns             the same over two moor_xchan, the fibers on two executors
 *                                   on two threads: each hop a wake of the other thread
 *   raw_thread_round_trip_ns        the reference of xchan_round_trip_ns: two plain threads
 *                                   ping-pong a turn under a mutex, each waiting on a condition
 *                                   variable of its own (the plain driver parks the same way)
 *   xchan_vs_raw_thread_ratio       xchan_round_trip_ns over it
 *   raw_scaling_ratio               the first reference of cores_scaling_ratio: a loop of
 *                                   register arithmetic that shares nothing, on one thread and
 *                                   on two at once. Below 1.8 the machine did not give this
 *                                   program two cores (other work)
 *   raw_jump_scaling_ratio          the second: raw jump_fcontext round trips on a stack of each
 *                                   thread's own (no moor at all), on one thread and on two.
 *                                   A switch loop leans on what two hardware threads of one
 *                                   core share (load/store units, predictors, L1), which the
 *                                   register loop does not: where the two CPUs are SMT
 *                                   siblings (a VM's vCPUs may be, whatever it reports), this
 *                                   one stays low too, and cores_scaling_ratio cannot exceed it
 *   spawn_per_s_2_processes         the third, for spawn: spawn_per_s_2's work in two processes
 *                                   at once, each with its own executor (nothing shared, not
 *                                   even an address space)
 *   process_scaling_ratio_spawn     spawn_per_s_2_processes over spawn_per_s_1: what this
 *                                   machine allows that work with nothing shared; where it is
 *                                   as low as cores_scaling_ratio_spawn, the limit is not moor's
 *
 * Each figure is the median of REPS repetitions after a warm-up round; a round measures every
 * figure once, so a noisy stretch of the machine hits them all alike. The two-executor figures
 * need two idle cores: on a machine shared with other work the scaling ratio is noisy (quote
 * medians, look at the spread in the table). The threads are not pinned.
 *
 * Usage: bench_cores [scale]    scale multiplies every iteration count (0.1: a quick run).
 */
#include <fenv.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define BENCH_NAME "bench_cores"
#include "bench.h"
#include "fiber/fcontext.h"
#include "moor.h"

/* Its targets are upper bounds; this program's (a scaling ratio) is a lower one. */
static void bench_print_targets(const struct bench_ratio *ratios, size_t nratios,
                                const struct stats *st) __attribute__((unused));

/* Iteration counts at scale 1 (per executor): each repetition takes some 10-100 ms. */
#define YIELD_N 1000000u
#define SPAWN_N 300000u
#define CHAN_N 500000u
#define XCHAN_LOCAL_N 300000u
#define XCHAN_N 30000u

#define SPIN_N 20000000u
#define RAW_XTHREAD_N 30000u

enum { F_YIELD_1, F_YIELD_2, F_SPAWN_1, F_SPAWN_2, F_CHAN, F_XCHAN_LOCAL, F_XCHAN, F_SPIN_1,
       F_SPIN_2, F_RAW_XTHREAD, F_JUMP_1, F_JUMP_2, F_SPAWN_2P, NFIG };

static const char *const table_keys[NFIG] = {
    "yield_1_executor", "yield_2_executors", "spawn_join_1_executor", "spawn_join_2_executors",
    "chan_round_trip",  "xchan_local_round_trip", "xchan_round_trip", "spin_1_thread",
    "spin_2_threads",   "raw_thread_round_trip", "raw_jump_1_thread", "raw_jump_2_threads",
    "spawn_join_2_processes",
};

static moor_executor *executor_begin(void)
{
    moor_executor *ex;
    feclearexcept(FE_ALL_EXCEPT);
    check(moor_executor_new(&ex, NULL), "moor_executor_new");
    return ex;
}

/* ---- the same work on 1 or 2 executors ------------------------------------------------- */

/* One executor's share: its thread, what it runs, and when its timed part ran. */
struct share {
    pthread_t thread;
    pthread_barrier_t *start; /* every executor has warmed up: the timed part begins */
    uint64_t warm, n;
    int spawn;                /* spawn + join rather than yield */
    int spin;                 /* no executor: 1 the register loop of raw_scaling_ratio, 2 the
                                 raw switches of raw_jump_scaling_ratio */
    uint64_t t0, t1;
};

/* Fiber A of a yielding pair: warm up with B, wait for the other executors, time n yields
 * (B's n fall in between: 2n yields in all). */
static intptr_t yield_timer(void *arg)
{
    struct share *s = arg;
    for (uint64_t i = 0; i < s->warm; i++)
        moor_yield();
    pthread_barrier_wait(s->start); /* blocks this thread: B waits on the run queue */
    s->t0 = now_ns();
    for (uint64_t i = 0; i < s->n; i++)
        moor_yield();
    s->t1 = now_ns();
    return 0;
}

static intptr_t yield_partner(void *arg)
{
    const struct share *s = arg;
    for (uint64_t i = 0; i < s->warm + s->n; i++)
        moor_yield();
    return 0;
}

static intptr_t return_zero(void *arg)
{
    (void)arg;
    return 0;
}

static void spawn_rounds(uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        moor_fiber *f;
        spawn_checked(&f, return_zero, NULL);
        join_checked(f);
    }
}

static intptr_t spawn_timer(void *arg)
{
    struct share *s = arg;
    spawn_rounds(s->warm);
    pthread_barrier_wait(s->start);
    s->t0 = now_ns();
    spawn_rounds(s->n);
    s->t1 = now_ns();
    return 0;
}

/* xorshift steps: a dependent chain in registers, no memory touched. */
static uint64_t spin(uint64_t x, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        __asm__ volatile("" : "+r"(x));
    }
    return x;
}

static volatile uint64_t spin_sink;

/* The other side of a raw switch: jump straight back, for ever. */
static void raw_bounce(transfer_t t)
{
    for (;;)
        t = jump_fcontext(t.fctx, NULL);
}

#define RAW_STACK (64u * 1024u)

static void raw_jumps(struct share *s)
{
    void *stack = mmap(NULL, RAW_STACK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED)
        die("mmap of a raw context's stack failed");
    fcontext_t ctx = make_fcontext((char *)stack + RAW_STACK, RAW_STACK, raw_bounce);
    for (uint64_t i = 0; i < s->warm; i++)
        ctx = jump_fcontext(ctx, NULL).fctx;
    pthread_barrier_wait(s->start);
    s->t0 = now_ns();
    for (uint64_t i = 0; i < s->n; i++)
        ctx = jump_fcontext(ctx, NULL).fctx;
    s->t1 = now_ns();
    munmap(stack, RAW_STACK); /* the bouncer is abandoned mid-loop: it owns nothing */
}

static void *share_main(void *arg)
{
    struct share *s = arg;
    if (s->spin == 2) {
        raw_jumps(s);
        return NULL;
    }
    if (s->spin) {
        uint64_t x = spin(88172645463325252ull, s->warm);
        pthread_barrier_wait(s->start);
        s->t0 = now_ns();
        x = spin(x, s->n);
        s->t1 = now_ns();
        spin_sink = x;
        return NULL;
    }
    moor_executor *ex = executor_begin();
    moor_fiber *a, *b = NULL;
    if (s->spawn) {
        spawn_checked(&a, spawn_timer, s);
    } else {
        spawn_checked(&a, yield_timer, s);
        spawn_checked(&b, yield_partner, s);
    }
    join_checked(a);
    if (b)
        join_checked(b);
    moor_executor_free(ex);
    return NULL;
}

/* Picoseconds per operation, aggregate: the operations of every executor over the time from
 * the first start to the last end. Yields count 2 per iteration (one by each fiber). */
static uint64_t bench_shares(int executors, int spawn, int spin_only, uint64_t n)
{
    struct share s[2];
    pthread_barrier_t start;
    if (pthread_barrier_init(&start, NULL, (unsigned)executors) != 0)
        die("pthread_barrier_init");
    for (int i = 0; i < executors; i++) {
        s[i] = (struct share){.start = &start, .warm = n / 16, .n = n, .spawn = spawn,
                              .spin = spin_only};
        if (pthread_create(&s[i].thread, NULL, share_main, &s[i]) != 0)
            die("pthread_create");
    }
    uint64_t t0 = UINT64_MAX, t1 = 0;
    for (int i = 0; i < executors; i++) {
        pthread_join(s[i].thread, NULL);
        t0 = s[i].t0 < t0 ? s[i].t0 : t0;
        t1 = s[i].t1 > t1 ? s[i].t1 : t1;
    }
    pthread_barrier_destroy(&start);
    uint64_t ops = (uint64_t)executors * n * (spawn || spin_only ? 1 : 2);
    return ps_per_op(t0, t1, ops);
}

/* spawn_per_s_2_processes: bench_shares(2, 1, 0, n)'s work in two forked processes, each
 * with its own executor, started together through a barrier in shared memory. */
static uint64_t bench_spawn_processes(uint64_t n)
{
    struct {
        pthread_barrier_t start;
        uint64_t t0[2], t1[2];
    } *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED)
        die("mmap of the processes' shared page failed");
    pthread_barrierattr_t attr;
    pthread_barrierattr_init(&attr);
    pthread_barrierattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (pthread_barrier_init(&sh->start, &attr, 2) != 0)
        die("pthread_barrier_init");
    pthread_barrierattr_destroy(&attr);
    pid_t pid[2];
    for (int i = 0; i < 2; i++) {
        pid[i] = fork();
        if (pid[i] < 0)
            die("fork");
        if (pid[i] == 0) {
            struct share s = {.start = &sh->start, .warm = n / 16, .n = n, .spawn = 1};
            share_main(&s);
            sh->t0[i] = s.t0;
            sh->t1[i] = s.t1;
            _exit(0);
        }
    }
    for (int i = 0; i < 2; i++) {
        int status;
        if (waitpid(pid[i], &status, 0) != pid[i] || !WIFEXITED(status) ||
            WEXITSTATUS(status) != 0)
            die("a spawning process failed");
    }
    uint64_t t0 = sh->t0[0] < sh->t0[1] ? sh->t0[0] : sh->t0[1];
    uint64_t t1 = sh->t1[0] > sh->t1[1] ? sh->t1[0] : sh->t1[1];
    pthread_barrier_destroy(&sh->start);
    munmap(sh, sizeof *sh);
    return ps_per_op(t0, t1, 2 * n);
}

/* ---- ping-pong: moor_chan, moor_xchan on one executor, moor_xchan across two ------------ */

struct pingpong {
    moor_chan *chan[2];   /* a -> b, b -> a (moor_chan), or: */
    moor_xchan *xchan[2]; /* the same over moor_xchan */
    uint64_t warm, n;
    uint64_t t0, t1;      /* taken by the serving fiber around its n rounds */
};

struct pinger {
    struct pingpong *pp;
    int side;   /* 0 serves and times, 1 returns */
};

static void send_v(struct pingpong *pp, int to, int v)
{
    if (pp->chan[0])
        check(moor_chan_send(pp->chan[to], &v, -1), "moor_chan_send");
    else
        check(moor_xchan_send(pp->xchan[to], &v, -1), "moor_xchan_send");
}

static int recv_v(struct pingpong *pp, int from)
{
    int v;
    if (pp->chan[0])
        check(moor_chan_recv(pp->chan[from], &v, -1), "moor_chan_recv");
    else
        check(moor_xchan_recv(pp->xchan[from], &v, -1), "moor_xchan_recv");
    return v;
}

/* Receive, pass on one more: both fibers wait at this one receive (as bench_chan does). */
static void ping_rounds(const struct pinger *me, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        int v = recv_v(me->pp, 1 - me->side);
        send_v(me->pp, me->side, v + 1);
    }
}

static intptr_t pinger_fn(void *arg)
{
    const struct pinger *me = arg;
    struct pingpong *pp = me->pp;
    if (me->side == 0)
        send_v(pp, 0, 0);
    ping_rounds(me, pp->warm);
    if (me->side == 0)
        pp->t0 = now_ns();
    ping_rounds(me, pp->n);
    if (me->side == 0) {
        pp->t1 = now_ns();
    } else if ((uint64_t)recv_v(pp, 0) != 2 * (pp->warm + pp->n)) {
        die("ping-pong: a value was lost or duplicated");
    }
    return 0;
}

/* The returning side on a thread of its own, with its own executor. */
static void *returner_thread(void *arg)
{
    moor_executor *ex = executor_begin();
    moor_fiber *f;
    spawn_checked(&f, pinger_fn, arg);
    join_checked(f);
    moor_executor_free(ex);
    return NULL;
}

/* kind 0: moor_chan, one executor; 1: moor_xchan, one executor; 2: moor_xchan, two threads.
 * The returning fiber starts first, so it already waits when the ball is served. */
static uint64_t bench_pingpong(int kind, uint64_t n)
{
    struct pingpong pp = {.warm = n / 16, .n = n};
    for (int i = 0; i < 2; i++) {
        if (kind == 0)
            check(moor_chan_new(&pp.chan[i], sizeof(int), 0), "moor_chan_new");
        else
            check(moor_xchan_new(&pp.xchan[i], sizeof(int), 0), "moor_xchan_new");
    }
    struct pinger server = {&pp, 0}, returner = {&pp, 1};
    moor_executor *ex = executor_begin();
    pthread_t t;
    moor_fiber *fr = NULL, *fs;
    if (kind == 2) {
        if (pthread_create(&t, NULL, returner_thread, &returner) != 0)
            die("pthread_create");
    } else {
        spawn_checked(&fr, pinger_fn, &returner);
    }
    spawn_checked(&fs, pinger_fn, &server);
    join_checked(fs);
    if (fr)
        join_checked(fr);
    else
        pthread_join(t, NULL);
    moor_executor_free(ex);
    for (int i = 0; i < 2; i++) {
        moor_chan_free(pp.chan[i]);
        moor_xchan_free(pp.xchan[i]);
    }
    return ps_per_op(pp.t0, pp.t1, n);
}

/* ---- raw_thread_round_trip_ns: two threads, a mutex and two condition variables --------- */

struct turns {
    pthread_mutex_t lock;
    pthread_cond_t cond[2];
    int turn;    /* whose turn: 0 or 1 */
    uint64_t n;  /* round trips */
};

static void take_turns(struct turns *t, int me)
{
    pthread_mutex_lock(&t->lock);
    for (uint64_t i = 0; i < t->n; i++) {
        while (t->turn != me)
            pthread_cond_wait(&t->cond[me], &t->lock);
        t->turn = 1 - me;
        pthread_cond_signal(&t->cond[1 - me]);
    }
    pthread_mutex_unlock(&t->lock);
}

static void *turn_taker(void *arg)
{
    take_turns(arg, 1);
    return NULL;
}

static uint64_t bench_raw_thread(uint64_t n)
{
    struct turns t = {.turn = 0, .n = n};
    pthread_mutex_init(&t.lock, NULL);
    pthread_cond_init(&t.cond[0], NULL);
    pthread_cond_init(&t.cond[1], NULL);
    pthread_t other;
    if (pthread_create(&other, NULL, turn_taker, &t) != 0)
        die("pthread_create");
    uint64_t t0 = now_ns();
    take_turns(&t, 0);
    uint64_t t1 = now_ns();
    pthread_join(other, NULL);
    pthread_mutex_destroy(&t.lock);
    pthread_cond_destroy(&t.cond[0]);
    pthread_cond_destroy(&t.cond[1]);
    return ps_per_op(t0, t1, n);
}

/* ---- main ------------------------------------------------------------------------------ */

static uint64_t iters[NFIG];

static void round_fn(uint64_t *r, void *ctx)
{
    (void)ctx;
    r[F_SPIN_1] = bench_shares(1, 0, 1, iters[F_SPIN_1]);
    r[F_SPIN_2] = bench_shares(2, 0, 1, iters[F_SPIN_2]);
    r[F_JUMP_1] = bench_shares(1, 0, 2, iters[F_JUMP_1]);
    r[F_JUMP_2] = bench_shares(2, 0, 2, iters[F_JUMP_2]);
    r[F_YIELD_1] = bench_shares(1, 0, 0, iters[F_YIELD_1]);
    r[F_YIELD_2] = bench_shares(2, 0, 0, iters[F_YIELD_2]);
    r[F_SPAWN_1] = bench_shares(1, 1, 0, iters[F_SPAWN_1]);
    r[F_SPAWN_2] = bench_shares(2, 1, 0, iters[F_SPAWN_2]);
    r[F_SPAWN_2P] = bench_spawn_processes(iters[F_SPAWN_2P]);
    r[F_CHAN] = bench_pingpong(0, iters[F_CHAN]);
    r[F_XCHAN_LOCAL] = bench_pingpong(1, iters[F_XCHAN_LOCAL]);
    r[F_XCHAN] = bench_pingpong(2, iters[F_XCHAN]);
    r[F_RAW_XTHREAD] = bench_raw_thread(iters[F_RAW_XTHREAD]);
}

static ull per_s(uint64_t ps_per_op_)
{
    return ps_per_op_ ? (ull)(1000000000000ull / ps_per_op_) : 0;
}

int main(int argc, char **argv)
{
    const char *scale_arg;
    double scale = bench_scale_arg(argc, argv, &scale_arg);
    iters[F_YIELD_1] = iters[F_YIELD_2] = scaled(YIELD_N, scale);
    iters[F_SPAWN_1] = iters[F_SPAWN_2] = iters[F_SPAWN_2P] = scaled(SPAWN_N, scale);
    iters[F_CHAN] = scaled(CHAN_N, scale);
    iters[F_XCHAN_LOCAL] = scaled(XCHAN_LOCAL_N, scale);
    iters[F_XCHAN] = scaled(XCHAN_N, scale);
    iters[F_SPIN_1] = iters[F_SPIN_2] = scaled(SPIN_N, scale);
    iters[F_RAW_XTHREAD] = scaled(RAW_XTHREAD_N, scale);
    iters[F_JUMP_1] = iters[F_JUMP_2] = scaled(YIELD_N, scale);
    feclearexcept(FE_ALL_EXCEPT);

    struct stats st[NFIG];
    bench_repeat(NFIG, round_fn, NULL, st);

    char b[32];
    bench_print_cpu_model();
    printf("yield_per_s_1: %llu /s\n", per_s(st[F_YIELD_1].median));
    printf("yield_per_s_2: %llu /s\n", per_s(st[F_YIELD_2].median));
    printf("spawn_per_s_1: %llu /s\n", per_s(st[F_SPAWN_1].median));
    printf("spawn_per_s_2: %llu /s\n", per_s(st[F_SPAWN_2].median));
    /* Rates at 2 over rates at 1: time per operation at 1 over time at 2. */
    uint64_t ry_num = st[F_YIELD_1].median, ry_den = st[F_YIELD_2].median;
    uint64_t rs_num = st[F_SPAWN_1].median, rs_den = st[F_SPAWN_2].median;
    printf("cores_scaling_ratio_yield: %s x\n", fmt_ratio(b, sizeof b, ry_num, ry_den));
    printf("cores_scaling_ratio_spawn: %s x\n", fmt_ratio(b, sizeof b, rs_num, rs_den));
    int yield_lower = ry_num * rs_den <= rs_num * ry_den;
    printf("cores_scaling_ratio: %s x\n", yield_lower ? fmt_ratio(b, sizeof b, ry_num, ry_den)
                                                      : fmt_ratio(b, sizeof b, rs_num, rs_den));
    printf("raw_scaling_ratio: %s x\n",
           fmt_ratio(b, sizeof b, st[F_SPIN_1].median, st[F_SPIN_2].median));
    printf("raw_jump_scaling_ratio: %s x\n",
           fmt_ratio(b, sizeof b, st[F_JUMP_1].median, st[F_JUMP_2].median));
    printf("spawn_per_s_2_processes: %llu /s\n", per_s(st[F_SPAWN_2P].median));
    printf("process_scaling_ratio_spawn: %s x\n",
           fmt_ratio(b, sizeof b, st[F_SPAWN_1].median, st[F_SPAWN_2P].median));
    static const char *const trip_keys[] = {"chan_round_trip_ns", "xchan_local_round_trip_ns",
                                            "xchan_round_trip_ns"};
    static const struct bench_ratio trip_ratios[] = {
        {"xchan_local_vs_chan_ratio", 1, 0, 0, ""},
        {"xchan_vs_chan_ratio", 2, 0, 0, ""},
    };
    bench_print_keys(trip_keys, &st[F_CHAN], 3, trip_ratios, 2);
    printf("raw_thread_round_trip_ns: %s ns\n", fmt_ns(b, sizeof b, st[F_RAW_XTHREAD].median));
    printf("xchan_vs_raw_thread_ratio: %s x\n",
           fmt_ratio(b, sizeof b, st[F_XCHAN].median, st[F_RAW_XTHREAD].median));

    bench_print_table(scale_arg, table_keys, st, iters, NFIG);
    uint64_t low_num = yield_lower ? ry_num : rs_num, low_den = yield_lower ? ry_den : rs_den;
    printf("\n%-28s %10s %10s %8s\n", "target", "measured", "limit", "result");
    printf("%-28s %8s x %10s %8s\n", "cores_scaling_ratio", fmt_ratio(b, sizeof b, low_num, low_den),
           ">= 1.80 x", low_num * 100 >= 180 * low_den ? "PASS" : "MISS");
    return 0;
}
