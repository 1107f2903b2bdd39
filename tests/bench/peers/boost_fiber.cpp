// boost_fiber — the Boost.Fiber peer of bench_switch, bench_chan and bench_scale (issue 17,
// workloads 1-4), written as Boost.Fiber's documentation teaches it: boost::fibers::fiber
// objects launched with the default policy (post), boost::this_fiber::yield, join, the
// unbuffered_channel for capacity 0, this_fiber::sleep_for, and the default round-robin
// scheduler on the one thread that runs main.
//
//   peer                           boost.fiber <version>
//   raw_switch_round_trip_ns       (reference) boost::context::detail::jump_fcontext there and
//                                  back, as bench_switch measures moor's raw reference
//   yield_round_trip_asym_ns       a driver and a worker, two functions yielding at two call
//                                  sites; one yield by each
//   yield_round_trip_ns            two fibers running one function; one yield by each
//   yield_round_trip_fp_asym_ns    the asym figure after each fiber and main have raised a
//                                  different floating-point exception flag (bench_switch's
//                                  "after floating-point work")
//   yield_round_trip_fp_ns         (information) the same in the one-function shape
//   spawn_join_warm_ns             fiber f(fn); f.join(); of an empty fn, default stack
//                                  allocator (fixedsize_stack: malloc, 128 KiB, no guard), its
//                                  cache warm
//   spawn_join_warm_protected_ns   (information) the same with protected_fixedsize_stack, which
//                                  has no cache: mmap + mprotect + munmap each time
//   spawn_join_warm_pooled_ns      (information) the same with pooled_fixedsize_stack, Boost's
//                                  allocator that keeps freed stacks (unguarded)
//   spawn_join_cold_ns             COLD_K fibers spawned, then all joined, each on a fresh
//                                  protected_fixedsize_stack (a guard page, as moor's stacks
//                                  have): the guarded comparison with moor's cold figure
//   spawn_join_cold_default_ns     (information) the same with the default, unguarded stack
//   chan_round_trip_asym_ns        ping-pong of an int over two unbuffered_channel<int>: a
//                                  server that pushes then pops, a returner that pops then
//                                  pushes (two functions)
//   chan_round_trip_ns             the same, both fibers running one function
//   chan1_round_trip_ns            (information) the one-function ping-pong over
//                                  buffered_channel<int>(2), which holds one value (moor's
//                                  capacity 1)
//   sleepers_100k_wall_ms          100,000 fibers each this_fiber::sleep_for(1 s): first spawn
//                                  to last exit (default stacks)
//   sleepers_100k_peak_rss_mib     the process's peak RSS meanwhile (VmHWM, reset before)
//
// Boost.Fiber's unbuffered_channel is a rendezvous in both directions: push() suspends the
// sender until a receiver has taken the value, so a round trip of it has more switches in it
// than a channel whose send returns as soon as a waiting receiver has the value. That is
// Boost's semantics of capacity 0, measured as it is.
//
// Where a yield goes in Boost.Fiber 1.74 (callgrind, two fibers yielding): ~490 instructions
// per yield, against ~35 for the ontop_fcontext jump itself; about 40% of them are
// __tls_get_addr under context::active() (the thread-local active fiber, in a shared
// library), and one yield in two passes through the dispatcher context (scheduler::dispatch,
// remote_ready2ready_, sleep2ready_) on its way to the other fiber. Linking Boost statically
// did not make it faster. raw_switch_round_trip_ns shows that the jump itself costs what it
// costs moor.
//
// Every switch-bound figure is the median of REPS repetitions after one discarded warm-up
// round; a round runs every measurement once, so that a noisy stretch of the machine hits all
// of them alike. The sleepers run SLEEP_REPS times, first, so that the peak RSS is theirs.
// Each figure prints as `key: value unit` and its spread as `key_spread: min..max unit`.
// As in bench_switch, no floating point runs after the scale argument is read except the
// deliberate flag raising: times are integer nanoseconds from steady_clock, per-operation
// figures integer picoseconds.
//
// Usage: boost_fiber [scale]    scale multiplies every iteration count (0.1: a quick run).
#include <boost/context/detail/fcontext.hpp>
#include <boost/fiber/all.hpp>
#include <boost/version.hpp>

#include <algorithm>
#include <cfenv>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

namespace fibers = boost::fibers;
namespace ctx = boost::context::detail;

namespace {

// Iteration counts at scale 1, as in bench_switch and bench_chan.
constexpr unsigned RAW_N = 2000000;
constexpr unsigned YIELD_N = 1000000;
constexpr unsigned SPAWN_N = 500000;
constexpr unsigned SPAWN_PROT_N = 50000; // each one maps, protects and unmaps a stack
constexpr unsigned COLD_K = 10000;
constexpr unsigned CHAN_N = 1000000;
constexpr int REPS = 11;
constexpr int SLEEP_REPS = 5;
constexpr unsigned SLEEPERS = 100000;

[[noreturn]] void die(const char *msg)
{
    std::fprintf(stderr, "boost_fiber: %s\n", msg);
    std::exit(1);
}

uint64_t now_ns()
{
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::steady_clock::now().time_since_epoch())
                                     .count());
}

uint64_t ps_per_op(uint64_t t0, uint64_t t1, uint64_t n)
{
    return (t1 - t0) * 1000u / n;
}

// ---- floating-point flags, as bench_switch raises them ------------------------------------

volatile double fp_one = 1.0, fp_three = 3.0, fp_zero = 0.0, fp_big = 1e308;
volatile double fp_sink;

enum fp_who { FP_FIBER_A, FP_FIBER_B, FP_MAIN };

// A different flag for each party, checked to be up (never inside a timed loop).
void fp_raise(fp_who who)
{
    static const int expect[] = {FE_INEXACT, FE_DIVBYZERO, FE_OVERFLOW};
    switch (who) {
    case FP_FIBER_A:
        fp_sink = fp_one / fp_three;
        break;
    case FP_FIBER_B:
        fp_sink = fp_one / fp_zero;
        break;
    case FP_MAIN:
        fp_sink = fp_big * fp_big;
        break;
    }
    if (!std::fetestexcept(expect[who]))
        die("floating-point work did not raise its exception flag");
}

// ---- the raw reference: jump_fcontext there and back --------------------------------------

constexpr std::size_t RAW_STACK = 64 * 1024;

[[noreturn]] void raw_entry(ctx::transfer_t t)
{
    for (;;)
        t = ctx::jump_fcontext(t.fctx, nullptr);
}

uint64_t bench_raw(ctx::fcontext_t &c, uint64_t n)
{
    std::feclearexcept(FE_ALL_EXCEPT);
    for (uint64_t i = 0; i < n / 16; i++)
        c = ctx::jump_fcontext(c, nullptr).fctx;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++)
        c = ctx::jump_fcontext(c, nullptr).fctx;
    uint64_t t1 = now_ns();
    return ps_per_op(t0, t1, n);
}

// ---- yield: two functions (driver, worker) and one function -------------------------------

struct yield_run {
    uint64_t warm, n;
    bool fp;
    uint64_t t0 = 0, t1 = 0; // taken by the driver (or fiber A) around its n yields
};

// noinline: the two sides must really suspend at two call sites.
__attribute__((noinline)) void driver(yield_run &r)
{
    for (uint64_t i = 0; i < r.warm; i++)
        boost::this_fiber::yield();
    if (r.fp)
        fp_raise(FP_FIBER_A);
    r.t0 = now_ns();
    for (uint64_t i = 0; i < r.n; i++)
        boost::this_fiber::yield();
    r.t1 = now_ns();
}

__attribute__((noinline)) void worker(yield_run &r)
{
    if (r.fp)
        fp_raise(FP_FIBER_B);
    for (uint64_t i = 0, end = r.warm + r.n; i < end; i++)
        boost::this_fiber::yield();
}

uint64_t bench_yield_asym(uint64_t n, bool fp)
{
    std::feclearexcept(FE_ALL_EXCEPT);
    yield_run r{n / 16, n, fp};
    fibers::fiber d([&r] { driver(r); });
    fibers::fiber w([&r] { worker(r); });
    if (fp)
        fp_raise(FP_MAIN);
    d.join();
    w.join();
    return ps_per_op(r.t0, r.t1, n);
}

__attribute__((noinline)) void yielder(yield_run &r, bool times)
{
    for (uint64_t i = 0; i < r.warm; i++)
        boost::this_fiber::yield();
    if (r.fp)
        fp_raise(times ? FP_FIBER_A : FP_FIBER_B);
    if (times)
        r.t0 = now_ns();
    for (uint64_t i = 0; i < r.n; i++)
        boost::this_fiber::yield();
    if (times)
        r.t1 = now_ns();
}

uint64_t bench_yield(uint64_t n, bool fp)
{
    std::feclearexcept(FE_ALL_EXCEPT);
    yield_run r{n / 16, n, fp};
    fibers::fiber a([&r] { yielder(r, true); });
    fibers::fiber b([&r] { yielder(r, false); });
    if (fp)
        fp_raise(FP_MAIN);
    a.join();
    b.join();
    return ps_per_op(r.t0, r.t1, n);
}

// ---- spawn + run + join --------------------------------------------------------------------

void empty_fn() {}

// Warm: one fiber at a time, so the allocator hands the same stack back each time (malloc's
// free list for fixedsize_stack; protected_fixedsize_stack has no cache and maps anew).
// The allocator is passed by copy, as a program would pass it: copies of a
// pooled_fixedsize_stack share one pool.
template <typename Alloc> uint64_t bench_spawn_warm(uint64_t n, Alloc salloc = Alloc())
{
    for (uint64_t i = 0; i < n / 16; i++) {
        fibers::fiber f(std::allocator_arg, salloc, empty_fn);
        f.join();
    }
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n; i++) {
        fibers::fiber f(std::allocator_arg, salloc, empty_fn);
        f.join();
    }
    uint64_t t1 = now_ns();
    return ps_per_op(t0, t1, n);
}

// Cold: k alive at once, none joined before all are spawned, so none can reuse another's
// stack; the stacks are released when the fiber objects go.
template <typename Alloc> uint64_t bench_spawn_cold(uint64_t k)
{
    std::vector<fibers::fiber> fs;
    fs.reserve(k);
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < k; i++)
        fs.emplace_back(std::allocator_arg, Alloc(), empty_fn);
    for (auto &f : fs)
        f.join();
    uint64_t t1 = now_ns();
    return ps_per_op(t0, t1, k);
}

// ---- channel ping-pong ---------------------------------------------------------------------

template <typename Chan> void push_checked(Chan &ch, int v)
{
    if (ch.push(v) != fibers::channel_op_status::success)
        die("channel push failed");
}

template <typename Chan> int pop_checked(Chan &ch)
{
    int v;
    if (ch.pop(v) != fibers::channel_op_status::success)
        die("channel pop failed");
    return v;
}

struct pingpong {
    uint64_t warm, n;
    uint64_t t0 = 0, t1 = 0; // taken by the serving fiber around its n rounds
};

// One function on both sides: receive, pass on one more; both wait at the one pop.
template <typename Chan>
__attribute__((noinline)) void ping_rounds(Chan &in, Chan &out, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        push_checked(out, pop_checked(in) + 1);
}

template <typename Chan> void pinger(pingpong &pp, Chan &in, Chan &out, bool serves)
{
    if (serves)
        push_checked(out, 0);
    ping_rounds(in, out, pp.warm);
    if (serves)
        pp.t0 = now_ns();
    ping_rounds(in, out, pp.n);
    if (serves)
        pp.t1 = now_ns();
    if (!serves && static_cast<uint64_t>(pop_checked(in)) != 2 * (pp.warm + pp.n))
        die("ping-pong: a value was lost or duplicated");
}

// The other fiber is launched first, so that it already waits in pop when the ball is served.
template <typename Chan> uint64_t bench_pingpong(uint64_t n, std::size_t capacity)
{
    std::feclearexcept(FE_ALL_EXCEPT);
    Chan ab{capacity}, ba{capacity};
    pingpong pp{n / 16, n};
    fibers::fiber b([&] { pinger(pp, ab, ba, false); });
    fibers::fiber a([&] { pinger(pp, ba, ab, true); });
    b.join();
    a.join();
    return ps_per_op(pp.t0, pp.t1, n);
}

// unbuffered_channel takes no capacity.
template <> uint64_t bench_pingpong<fibers::unbuffered_channel<int>>(uint64_t n, std::size_t)
{
    using Chan = fibers::unbuffered_channel<int>;
    std::feclearexcept(FE_ALL_EXCEPT);
    Chan ab, ba;
    pingpong pp{n / 16, n};
    fibers::fiber b([&] { pinger(pp, ab, ba, false); });
    fibers::fiber a([&] { pinger(pp, ba, ab, true); });
    b.join();
    a.join();
    return ps_per_op(pp.t0, pp.t1, n);
}

using chan0 = fibers::unbuffered_channel<int>;

__attribute__((noinline)) int serve_rounds(chan0 &in, chan0 &out, uint64_t n)
{
    int v = 0;
    for (uint64_t i = 0; i < n; i++) {
        push_checked(out, v);
        v = pop_checked(in) + 1;
    }
    return v;
}

__attribute__((noinline)) void return_rounds(chan0 &in, chan0 &out, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++) {
        int v = pop_checked(in);
        push_checked(out, v + 1);
    }
}

uint64_t bench_pingpong_asym(uint64_t n)
{
    std::feclearexcept(FE_ALL_EXCEPT);
    chan0 ab, ba;
    pingpong pp{n / 16, n};
    fibers::fiber b([&] { return_rounds(ab, ba, pp.warm + pp.n); });
    fibers::fiber a([&] {
        serve_rounds(ba, ab, pp.warm);
        pp.t0 = now_ns();
        int v = serve_rounds(ba, ab, pp.n);
        pp.t1 = now_ns();
        if (static_cast<uint64_t>(v) != 2 * pp.n)
            die("asymmetric ping-pong: a value was lost or duplicated");
    });
    b.join();
    a.join();
    return ps_per_op(pp.t0, pp.t1, n);
}

// ---- 100,000 sleepers -------------------------------------------------------------------------

// A "Key:   123 kB" line of /proc/self/status, in KiB; -1 if missing.
long status_kib(const char *key)
{
    FILE *f = std::fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    long v = -1;
    std::size_t klen = std::strlen(key);
    while (std::fgets(line, sizeof line, f))
        if (std::strncmp(line, key, klen) == 0 && line[klen] == ':') {
            v = std::strtol(line + klen + 1, nullptr, 10);
            break;
        }
    std::fclose(f);
    return v;
}

// Reset VmHWM to the current RSS (proc(5): clear_refs, 5).
void peak_rss_reset()
{
    int fd = open("/proc/self/clear_refs", O_WRONLY);
    if (fd < 0 || write(fd, "5", 1) != 1)
        std::fprintf(stderr, "boost_fiber: cannot reset the peak RSS\n");
    if (fd >= 0)
        close(fd);
}

struct sleep_result {
    uint64_t wall_ns;
    long hwm_kib;
};

// Detached fibers, as a program that fires and forgets would write it; main waits on a
// condition variable for the last one (fibers::condition_variable: main is a fiber too).
sleep_result bench_sleepers()
{
    fibers::mutex m;
    fibers::condition_variable cv;
    unsigned done = 0;
    peak_rss_reset();
    uint64_t t0 = now_ns();
    for (unsigned i = 0; i < SLEEPERS; i++)
        fibers::fiber([&] {
            boost::this_fiber::sleep_for(std::chrono::seconds(1));
            std::unique_lock<fibers::mutex> lk(m);
            if (++done == SLEEPERS)
                cv.notify_one();
        }).detach();
    {
        std::unique_lock<fibers::mutex> lk(m);
        cv.wait(lk, [&] { return done == SLEEPERS; });
    }
    uint64_t t1 = now_ns();
    return {t1 - t0, status_kib("VmHWM")};
}

// ---- statistics and printing -------------------------------------------------------------

struct stats {
    uint64_t median, min, max;
};

stats stats_of(std::vector<uint64_t> v)
{
    std::sort(v.begin(), v.end());
    return {v[v.size() / 2], v.front(), v.back()};
}

// Picoseconds as nanoseconds with one decimal, rounded.
std::string fmt_ns(uint64_t ps)
{
    unsigned long long tenths = (ps + 50) / 100;
    char b[32];
    std::snprintf(b, sizeof b, "%llu.%llu", tenths / 10, tenths % 10);
    return b;
}

// Nanoseconds as milliseconds with one decimal.
std::string fmt_ms(uint64_t ns)
{
    char b[32];
    std::snprintf(b, sizeof b, "%llu.%llu", static_cast<unsigned long long>(ns / 1000000),
                  static_cast<unsigned long long>(ns / 100000 % 10));
    return b;
}

enum figure {
    RAW,
    YIELD_ASYM,
    YIELD,
    YIELD_FP_ASYM,
    YIELD_FP,
    SPAWN_WARM,
    SPAWN_WARM_PROT,
    SPAWN_WARM_POOLED,
    SPAWN_COLD,
    SPAWN_COLD_DEFAULT,
    CHAN_ASYM,
    CHAN,
    CHAN1,
    NFIGURES
};

const char *const figure_key[NFIGURES] = {
    "raw_switch_round_trip_ns",     "yield_round_trip_asym_ns",
    "yield_round_trip_ns",          "yield_round_trip_fp_asym_ns",
    "yield_round_trip_fp_ns",       "spawn_join_warm_ns",
    "spawn_join_warm_protected_ns", "spawn_join_warm_pooled_ns",
    "spawn_join_cold_ns",
    "spawn_join_cold_default_ns",   "chan_round_trip_asym_ns",
    "chan_round_trip_ns",           "chan1_round_trip_ns",
};

struct counts {
    uint64_t raw, yield, spawn, spawn_prot, cold, chan;
};

void round_all(uint64_t *r, const counts &n, ctx::fcontext_t &raw)
{
    r[RAW] = bench_raw(raw, n.raw);
    r[YIELD_ASYM] = bench_yield_asym(n.yield, false);
    r[YIELD] = bench_yield(n.yield, false);
    r[YIELD_FP_ASYM] = bench_yield_asym(n.yield, true);
    r[YIELD_FP] = bench_yield(n.yield, true);
    std::feclearexcept(FE_ALL_EXCEPT);
    r[SPAWN_WARM] = bench_spawn_warm<fibers::default_stack>(n.spawn);
    r[SPAWN_WARM_PROT] = bench_spawn_warm<fibers::protected_fixedsize_stack>(n.spawn_prot);
    r[SPAWN_WARM_POOLED] = bench_spawn_warm<fibers::pooled_fixedsize_stack>(n.spawn);
    r[SPAWN_COLD] = bench_spawn_cold<fibers::protected_fixedsize_stack>(n.cold);
    r[SPAWN_COLD_DEFAULT] = bench_spawn_cold<fibers::default_stack>(n.cold);
    r[CHAN_ASYM] = bench_pingpong_asym(n.chan);
    r[CHAN] = bench_pingpong<chan0>(n.chan, 0);
    r[CHAN1] = bench_pingpong<fibers::buffered_channel<int>>(n.chan, 2);
}

uint64_t scaled(unsigned base, double scale)
{
    auto n = static_cast<uint64_t>(static_cast<double>(base) * scale);
    return n ? n : 1;
}

} // namespace

int main(int argc, char **argv)
{
    const char *scale_arg = "1";
    double scale = 1.0;
    if (argc > 2) {
        std::fprintf(stderr, "usage: %s [scale]   (scale multiplies iteration counts)\n",
                     argv[0]);
        return 2;
    }
    if (argc == 2) {
        char *end;
        scale_arg = argv[1];
        scale = std::strtod(scale_arg, &end);
        if (end == scale_arg || *end != '\0' || !(scale > 0.0) || scale > 1000.0) {
            std::fprintf(stderr, "%s: scale must be a number in (0, 1000], not \"%s\"\n",
                         argv[0], scale_arg);
            return 2;
        }
    }
    const counts n{scaled(RAW_N, scale),        scaled(YIELD_N, scale), scaled(SPAWN_N, scale),
                   scaled(SPAWN_PROT_N, scale), scaled(COLD_K, scale),  scaled(CHAN_N, scale)};
    if (2 * (n.chan + n.chan / 16) > INT32_MAX)
        die("scale too large for int-valued messages");
    std::feclearexcept(FE_ALL_EXCEPT); // the last floating point until the deliberate kind

    std::printf("peer: boost.fiber %d.%d.%d\n", BOOST_VERSION / 100000, BOOST_VERSION / 100 % 1000,
                BOOST_VERSION % 100);
    std::fflush(stdout);

    // The sleepers first: the process's peak RSS is theirs.
    std::vector<uint64_t> sleep_wall;
    std::vector<uint64_t> sleep_hwm;
    for (int i = 0; i < SLEEP_REPS; i++) {
        sleep_result s = bench_sleepers();
        sleep_wall.push_back(s.wall_ns);
        sleep_hwm.push_back(static_cast<uint64_t>(s.hwm_kib));
    }

    void *raw_stack = mmap(nullptr, RAW_STACK, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (raw_stack == MAP_FAILED)
        die("mmap of the raw context's stack failed");
    ctx::fcontext_t raw = ctx::make_fcontext(static_cast<char *>(raw_stack) + RAW_STACK,
                                             RAW_STACK, raw_entry);

    std::vector<uint64_t> results[NFIGURES];
    for (int round = -1; round < REPS; round++) {
        uint64_t r[NFIGURES];
        round_all(r, n, raw);
        if (round >= 0)
            for (int i = 0; i < NFIGURES; i++)
                results[i].push_back(r[i]);
    }
    std::feclearexcept(FE_ALL_EXCEPT);

    stats st[NFIGURES];
    for (int i = 0; i < NFIGURES; i++) {
        st[i] = stats_of(results[i]);
        std::printf("%s: %s ns\n", figure_key[i], fmt_ns(st[i].median).c_str());
        std::printf("%s_spread: %s..%s ns\n", figure_key[i], fmt_ns(st[i].min).c_str(),
                    fmt_ns(st[i].max).c_str());
    }
    stats sw = stats_of(sleep_wall), sh = stats_of(sleep_hwm);
    std::printf("sleepers_100k_wall_ms: %s ms\n", fmt_ms(sw.median).c_str());
    std::printf("sleepers_100k_wall_ms_spread: %s..%s ms\n", fmt_ms(sw.min).c_str(),
                fmt_ms(sw.max).c_str());
    std::printf("sleepers_100k_peak_rss_mib: %llu MiB\n",
                static_cast<unsigned long long>((sh.median + 512) / 1024));
    std::printf("sleepers_100k_peak_rss_mib_spread: %llu..%llu MiB\n",
                static_cast<unsigned long long>((sh.min + 512) / 1024),
                static_cast<unsigned long long>((sh.max + 512) / 1024));
    std::printf("default_stack: fixedsize_stack (malloc, %zu KiB, no guard page)\n",
                boost::context::stack_traits::default_size() / 1024);

    const uint64_t iters[NFIGURES] = {n.raw,   n.yield, n.yield, n.yield,
                                      n.yield, n.spawn, n.spawn_prot, n.spawn,
                                      n.cold,  n.cold,  n.chan,  n.chan, n.chan};
    std::printf("\n%d repetitions, median shown, after one warm-up round; scale %s\n", REPS,
                scale_arg);
    std::printf("%-30s %10s %10s %10s %8s %10s\n", "figure (ns)", "median", "min", "max",
                "spread", "iterations");
    for (int i = 0; i < NFIGURES; i++) {
        unsigned long long spread =
            st[i].median ? (st[i].max - st[i].min) * 100 / st[i].median : 0;
        std::printf("%-30s %10s %10s %10s %7llu%% %10llu\n", figure_key[i],
                    fmt_ns(st[i].median).c_str(), fmt_ns(st[i].min).c_str(),
                    fmt_ns(st[i].max).c_str(), spread,
                    static_cast<unsigned long long>(iters[i]));
    }
    munmap(raw_stack, RAW_STACK); // its context is never resumed again
    return 0;
}
