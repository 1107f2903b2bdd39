/* bench_scale — fibers by the hundred thousand and the million: what starting them costs,
 * what they hold while suspended, what is left once they have gone.
 *
 *   page_fault_ns            reference: the first write to a fresh page, one page every stack
 *                            mapping apart (what a new fiber's control block costs the kernel)
 *   spawn_cold_ns            spawn + run + join of an empty fiber, COLD_N alive at once, every
 *                            stack carved fresh (a new executor each repetition)
 *   spawn_cold_vs_page_fault_ratio   the two above
 *   sleepers_100k_wall_ms    100,000 fibers each sleeping 1 s: first spawn to last exit
 *                            (_spawn_ms: to the last spawn; _cpu_ms: the process's CPU time)
 *   sleepers_100k_peak_rss_mib       the process's peak RSS meanwhile (VmHWM, reset before;
 *                            _growth_mib: less the RSS before the first spawn)
 *   executor_free_ms         moor_executor_free after those 100,000 (no trim before it)
 *   spawn_all_ms             N fibers (argv[1], default 100000) spawned and suspended (each
 *                            waits on one moor_event): first spawn to the last one waiting
 *   spawn_rate_per_s         N / spawn_all_ms
 *   rss_per_fiber_kib        (VmRSS while they wait - VmRSS before) / N
 *   pte_per_fiber_kib        the same for VmPTE (page tables)
 *   mappings                 lines of /proc/self/maps while they wait
 *   wake_all_ms              set the event: until every fiber has returned
 *   *_cpu_ms                 the CPU time of the phase: on a shared machine, what it cost
 *                            as opposed to how long it waited for a core
 *   rss_after_burst_kib      VmRSS once they have all returned, less VmRSS before (and
 *                            pte_: VmPTE, the page tables, which hold the guard markers)
 *   trim_ms                  moor__stack_pool_trim then (what an idle moment would call):
 *                            gives back the page tables of slabs whose stacks are all cold;
 *                            rss_after_trim_kib, pte_after_trim_kib after it
 *   executor_free_n_ms       moor_executor_free after the N, after the trim
 *
 * Times are medians of REPS_COLD repetitions where a repetition is cheap (the cold spawn and
 * its reference); the large runs are made once. Run it alone (taskset -c 1 helps on a busy
 * machine): it measures the kernel as much as moor.
 *
 * Usage: bench_scale [fibers]    (default 100000; 1000000 needs about 5 GiB of memory)
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define BENCH_NAME "bench_scale"
/* Its figures are mostly milliseconds and KiB of whole runs: bench.h's repetition and table
 * helpers go unused here. */
#pragma GCC diagnostic ignored "-Wunused-function"
#include "bench.h"
#include "fiber/executor.h"
#include "moor.h"

#define COLD_N 10000u
#define REPS_COLD 7
#define SLEEPERS 100000u
#define SLEEP_MS 1000

/* ---- /proc ------------------------------------------------------------------------------ */

/* A "Key:   123 kB" line of /proc/self/status, in KiB; -1 if missing. */
static long status_kib(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    size_t klen = strlen(key);
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, klen) == 0 && line[klen] == ':') {
            v = strtol(line + klen + 1, NULL, 10);
            break;
        }
    fclose(f);
    return v;
}

static long mappings_now(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    long n = 0;
    int ch;
    if (!f)
        return -1;
    while ((ch = getc(f)) != EOF)
        n += ch == '\n';
    fclose(f);
    return n;
}

/* Reset VmHWM to the current RSS (proc(5): clear_refs, 5). */
static void peak_rss_reset(void)
{
    int fd = open("/proc/self/clear_refs", O_WRONLY);
    if (fd < 0 || write(fd, "5", 1) != 1)
        fprintf(stderr, BENCH_NAME ": cannot reset the peak RSS: %s\n", strerror(errno));
    if (fd >= 0)
        close(fd);
}

/* CPU time of the process: on a machine shared with other work, what a phase cost us as
 * opposed to how long it waited for a core. */
static uint64_t cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static uint64_t median(uint64_t *v, size_t n)
{
    qsort(v, n, sizeof *v, cmp_u64);
    return v[n / 2];
}

static moor_executor *executor_begin(void)
{
    moor_executor *ex;
    check(moor_executor_new(&ex, NULL), "moor_executor_new");
    return ex;
}

/* ---- the reference: first touch of fresh pages ----------------------------------------- */

static uint64_t page_fault_ps(size_t stride)
{
    size_t len = (size_t)COLD_N * stride;
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (m == MAP_FAILED)
        die("mmap failed");
    madvise(m, len, MADV_NOHUGEPAGE);
    uint64_t t0 = now_ns();
    for (size_t i = 0; i < COLD_N; i++)
        ((volatile char *)m)[(i + 1) * stride - 64] = 1;
    uint64_t t1 = now_ns();
    munmap(m, len);
    return ps_per_op(t0, t1, COLD_N);
}

/* ---- cold spawn ------------------------------------------------------------------------- */

static intptr_t empty_fn(void *arg)
{
    return (intptr_t)arg;
}

static uint64_t spawn_cold_ps(moor_fiber **fibers)
{
    moor_executor *ex = executor_begin();
    moor_fiber *warm; /* the executor's pre-mapped stack: not a cold one */
    spawn_checked(&warm, empty_fn, NULL);
    uint64_t t0 = now_ns();
    for (size_t i = 0; i < COLD_N; i++)
        spawn_checked(&fibers[i], empty_fn, NULL);
    for (size_t i = 0; i < COLD_N; i++)
        join_checked(fibers[i]);
    uint64_t t1 = now_ns();
    join_checked(warm);
    moor_executor_free(ex);
    return ps_per_op(t0, t1, COLD_N);
}

/* ---- 100,000 sleepers ---------------------------------------------------------------------- */

static uint64_t sleepers_done;

static intptr_t sleeper_fn(void *arg)
{
    (void)arg;
    check(moor_sleep(moor_deadline_in(SLEEP_MS)), "moor_sleep");
    sleepers_done++;
    return 0;
}

/* ---- N suspended -------------------------------------------------------------------------- */

struct crowd {
    size_t n;
    moor_event go;
    size_t started, finished;
    uint64_t t_spawn0, t_spawned, t_woken;
    uint64_t cpu_spawn0, cpu_spawned, cpu_woken;
    long rss, pte, maps; /* while they all wait */
};

static intptr_t waiter_fn(void *arg)
{
    struct crowd *c = arg;
    c->started++;
    check(moor_event_wait(&c->go, -1), "moor_event_wait");
    c->finished++;
    return 0;
}

static intptr_t crowd_driver(void *arg)
{
    struct crowd *c = arg;
    c->t_spawn0 = now_ns();
    c->cpu_spawn0 = cpu_ns();
    for (size_t i = 0; i < c->n; i++)
        check(moor_spawn(NULL, waiter_fn, c, NULL), "moor_spawn");
    while (c->started < c->n)
        moor_yield(); /* the run queue is FIFO: every fiber spawned runs before we are back */
    c->t_spawned = now_ns();
    c->cpu_spawned = cpu_ns();
    c->rss = status_kib("VmRSS");
    c->pte = status_kib("VmPTE");
    c->maps = mappings_now();
    uint64_t t0 = now_ns(), cpu0 = cpu_ns();
    moor_event_set(&c->go);
    while (c->finished < c->n)
        moor_yield();
    c->t_woken = now_ns() - t0;
    c->cpu_woken = cpu_ns() - cpu0;
    return 0;
}

static unsigned long parse_count(int argc, char **argv)
{
    if (argc > 2) {
        fprintf(stderr, "usage: %s [fibers]   (default 100000)\n", argv[0]);
        exit(2);
    }
    if (argc < 2)
        return 100000;
    char *end;
    unsigned long n = strtoul(argv[1], &end, 10);
    if (end == argv[1] || *end != '\0' || n == 0 || n > 100000000) {
        fprintf(stderr, "%s: fibers must be a count in [1, 100000000], not \"%s\"\n", argv[0],
                argv[1]);
        exit(2);
    }
    return n;
}

static void print_ms(const char *key, uint64_t ns)
{
    printf("%s: %llu.%llu ms\n", key, (ull)(ns / 1000000), (ull)(ns / 100000 % 10));
}

/* KiB per fiber with two decimals, from a difference in KiB. */
static void print_kib_per(const char *key, long before, long after, size_t n)
{
    long d = after - before;
    if (d < 0)
        d = 0;
    ull hundredths = (ull)d * 100 / n;
    printf("%s: %llu.%02llu KiB\n", key, hundredths / 100, hundredths % 100);
}

int main(int argc, char **argv)
{
    size_t n = parse_count(argc, argv);
    bench_print_cpu_model();

    /* The 100,000 sleepers first: the process's peak RSS is theirs. */
    {
        moor_executor *ex = executor_begin();
        peak_rss_reset();
        long rss0 = status_kib("VmRSS");
        uint64_t t0 = now_ns(), cpu0 = cpu_ns();
        for (size_t i = 0; i < SLEEPERS; i++)
            check(moor_spawn(NULL, sleeper_fn, NULL, NULL), "moor_spawn");
        uint64_t t_spawned = now_ns();
        check(moor_executor_run(ex), "moor_executor_run");
        uint64_t t1 = now_ns(), cpu1 = cpu_ns();
        if (sleepers_done != SLEEPERS)
            die("a sleeper did not finish");
        long hwm = status_kib("VmHWM");
        uint64_t f0 = now_ns();
        moor_executor_free(ex);
        uint64_t f1 = now_ns();
        print_ms("sleepers_100k_wall_ms", t1 - t0);
        print_ms("sleepers_100k_spawn_ms", t_spawned - t0);
        print_ms("sleepers_100k_cpu_ms", cpu1 - cpu0);
        printf("sleepers_100k_peak_rss_mib: %ld MiB\n", (hwm + 512) / 1024);
        printf("sleepers_100k_peak_rss_growth_mib: %ld MiB\n", (hwm - rss0 + 512) / 1024);
        print_ms("executor_free_ms", f1 - f0);
    }

    /* Cold spawn, and the page fault it cannot avoid, in turns. */
    {
        moor_fiber **fibers = malloc(COLD_N * sizeof *fibers);
        if (!fibers)
            die("out of memory");
        moor_executor *ex = executor_begin();
        size_t stride = ex->stack_map_size;
        moor_executor_free(ex);
        uint64_t cold[REPS_COLD], fault[REPS_COLD];
        spawn_cold_ps(fibers); /* warm-up: the allocator, the code */
        for (int r = 0; r < REPS_COLD; r++) {
            fault[r] = page_fault_ps(stride);
            cold[r] = spawn_cold_ps(fibers);
        }
        free(fibers);
        uint64_t c = median(cold, REPS_COLD), f = median(fault, REPS_COLD);
        char b[32];
        printf("spawn_cold_ns: %s ns\n", fmt_ns(b, sizeof b, c));
        printf("page_fault_ns: %s ns\n", fmt_ns(b, sizeof b, f));
        printf("spawn_cold_vs_page_fault_ratio: %s x\n", fmt_ratio(b, sizeof b, c, f));
    }

    /* N fibers suspended at once. */
    {
        moor_executor *ex = executor_begin();
        long rss0 = status_kib("VmRSS"), pte0 = status_kib("VmPTE");
        struct crowd c = {.n = n, .go = MOOR_EVENT_INIT};
        moor_fiber *driver;
        spawn_checked(&driver, crowd_driver, &c);
        join_checked(driver);
        long rss1 = status_kib("VmRSS"), pte1 = status_kib("VmPTE");
        moor__stack_counts counts;
        moor__stack_pool_counts(&ex->pool, &counts);
        moor_guard_mode guard = moor_executor_guard(ex);
        /* What an idle moment's trim gives back on top: the page tables of empty slabs. */
        uint64_t tr0 = now_ns();
        moor__stack_pool_trim(&ex->pool);
        uint64_t tr1 = now_ns();
        long rss2 = status_kib("VmRSS"), pte2 = status_kib("VmPTE");
        uint64_t f0 = now_ns();
        moor_executor_free(ex);
        uint64_t f1 = now_ns();
        uint64_t spawn_ns = c.t_spawned - c.t_spawn0;
        printf("fibers: %zu\n", n);
        print_ms("spawn_all_ms", spawn_ns);
        print_ms("spawn_all_cpu_ms", c.cpu_spawned - c.cpu_spawn0);
        printf("spawn_rate_per_s: %llu /s\n", (ull)((uint64_t)n * 1000000000u / spawn_ns));
        print_kib_per("rss_per_fiber_kib", rss0, c.rss, n);
        print_kib_per("pte_per_fiber_kib", pte0, c.pte, n);
        printf("mappings: %ld\n", c.maps);
        printf("slabs: %zu\n", counts.slabs);
        printf("reserved_gib: %zu GiB\n", (counts.reserved + (1u << 29)) >> 30);
        print_ms("wake_all_ms", c.t_woken);
        print_ms("wake_all_cpu_ms", c.cpu_woken);
        printf("rss_after_burst_kib: %ld KiB\n", rss1 - rss0);
        printf("pte_after_burst_kib: %ld KiB\n", pte1 - pte0);
        print_ms("trim_ms", tr1 - tr0);
        printf("rss_after_trim_kib: %ld KiB\n", rss2 - rss0);
        printf("pte_after_trim_kib: %ld KiB\n", pte2 - pte0);
        print_ms("executor_free_n_ms", f1 - f0);
        printf("guard: %s\n", guard == MOOR_GUARD_MPROTECT ? "mprotect" : "madvise");
    }
    return 0;
}
