#include "stack.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#ifdef MOOR_VALGRIND
#include <valgrind/valgrind.h>
#endif

#include "alloc.h"
#include "context.h" /* MOOR_ASAN_FIBERS */

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102 /* Linux 6.13; older headers lack it */
#endif
#ifndef MADV_GUARD_REMOVE
#define MADV_GUARD_REMOVE 103
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
/* The calling thread as a pidfd (PIDFD_SELF, recent kernels; 6.18 has it): process_madvise on
 * our own memory, with no descriptor to keep open nor to go stale across fork. Kernels
 * without it answer EBADF, and guards are installed one madvise at a time. */
#define PIDFD_SELF_THREAD (-10000)

/* Stacks in a bucket's first slab: one, so that an executor running a few fibers reserves
 * no more address space than they need; each next slab holds twice as many as the last, up
 * to SLAB_MAX_BYTES (and at least one stack). 1,000,000 default stacks (328 KiB mappings)
 * take some 330 slabs, which the kernel merges into far fewer mappings when they lie side by
 * side. */
#define SLAB_FIRST 1u
#define SLAB_MAX_BYTES ((size_t)1 << 30)
/* Guards installed by one process_madvise call, ahead of the carving. Installing them in a
 * batch saves a system call per stack: about a quarter of the guard's cost on Linux 6.18
 * (20,000 default stacks: ~2.0 us a stack one madvise each, ~1.5 us in batches of 64 or
 * 1,024). Installing a whole slab's at once would also make the page tables of stacks that
 * are not carved yet. */
#define GUARD_BATCH 64u
/* How close to vm.max_map_count a failed mapping must come to be blamed on it. */
#define MAPS_SLACK 16u

static size_t page_size;
static int guard_install_works;
static int guard_batch_works;
static pthread_once_t probe_once = PTHREAD_ONCE_INIT;
static int maps_reported; /* the out-of-mappings message was printed (once per process) */

static long guard_batch(const struct iovec *iov, size_t n)
{
    return syscall(SYS_process_madvise, PIDFD_SELF_THREAD, iov, n, MADV_GUARD_INSTALL, 0);
}

/* Ask the kernel once whether it has MADV_GUARD_INSTALL (older kernels answer EINVAL) and
 * whether process_madvise takes it for ourselves (PIDFD_SELF_THREAD). */
static void probe(void)
{
    page_size = (size_t)sysconf(_SC_PAGESIZE);
    void *p = mmap(NULL, 2 * page_size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return;
    guard_install_works = madvise(p, page_size, MADV_GUARD_INSTALL) == 0;
#ifdef MOOR_VALGRIND
    /* Valgrind does not know process_madvise: it would warn of every call. */
    int batch_allowed = !RUNNING_ON_VALGRIND;
#else
    int batch_allowed = 1;
#endif
    if (guard_install_works && batch_allowed) {
        struct iovec iov = {(char *)p + page_size, page_size};
        guard_batch_works = guard_batch(&iov, 1) == (long)page_size;
    }
    munmap(p, 2 * page_size);
}

size_t moor__page_size(void)
{
    pthread_once(&probe_once, probe);
    return page_size;
}

/* MOOR_GUARD=mprotect|madvise|auto, for executors whose attribute says AUTO. */
static moor_guard_mode guard_from_env(void)
{
    const char *v = getenv("MOOR_GUARD");
    if (v && strcmp(v, "mprotect") == 0)
        return MOOR_GUARD_MPROTECT;
    if (v && strcmp(v, "madvise") == 0)
        return MOOR_GUARD_MADVISE;
    return MOOR_GUARD_AUTO;
}

int moor__stack_pool_init(moor__stack_pool *pool, size_t guard, size_t hot_max,
                          moor_guard_mode mode)
{
    size_t page = moor__page_size();
    memset(pool, 0, sizeof *pool);
    if (mode == MOOR_GUARD_AUTO)
        mode = guard_from_env();
    if (mode == MOOR_GUARD_AUTO)
        mode = guard_install_works ? MOOR_GUARD_MADVISE : MOOR_GUARD_MPROTECT;
    if (mode == MOOR_GUARD_MADVISE && !guard_install_works)
        return -EINVAL;
    pool->mode = mode;
    pool->guard = (guard + page - 1) / page * page;
    pool->hot_max = hot_max;
    return 0;
}

/* Valgrind knows a stack by the id it gave at registration, kept in the reserved bytes at the
 * top of the mapping (MOOR__STACK_RESERVED). Only stacks in use or hot are registered: a cold
 * stack gives back every page, the top one too, so it is deregistered when it goes cold and
 * registered again when it is taken. */
static void stack_register(char *base, size_t map_size, size_t guard)
{
#ifdef MOOR_VALGRIND
    unsigned id = VALGRIND_STACK_REGISTER(base + guard, base + map_size);
    memcpy(base + map_size - sizeof id, &id, sizeof id);
#else
    (void)base, (void)map_size, (void)guard;
#endif
}

static void stack_deregister(char *base, size_t map_size)
{
#ifdef MOOR_VALGRIND
    unsigned id;
    memcpy(&id, base + map_size - sizeof id, sizeof id);
    VALGRIND_STACK_DEREGISTER(id);
#else
    (void)base, (void)map_size;
#endif
}

void moor__stack_pool_destroy(moor__stack_pool *pool)
{
    for (size_t i = 0; i < pool->nbuckets; i++) {
        moor__stack_bucket *b = &pool->buckets[i];
        for (size_t j = 0; j < b->nhot; j++)
            stack_deregister(b->hot[j], b->map_size);
        moor__free(b->hot);
        moor__free(b->cold);
    }
#ifdef MOOR_ASAN_FIBERS
    /* Leave no poison behind in the tops of the stacks that ran (see MOOR__ASAN_STACK_TOP). */
    for (size_t i = 0; i < pool->nslabs; i++) {
        const moor__stack_slab *s = &pool->slabs[i];
        size_t span = s->map_size - pool->guard;
        if (span > MOOR__ASAN_STACK_TOP)
            span = MOOR__ASAN_STACK_TOP;
        for (size_t k = 0; k < s->carved; k++)
            __asan_unpoison_memory_region(s->base + (k + 1) * s->map_size - span, span);
    }
#endif
    /* Slabs side by side (kept sorted) go in one munmap: the kernel merged them into one
     * mapping, and unmapping part of a mapping splits it, which fails at vm.max_map_count. */
    for (size_t i = 0; i < pool->nslabs;) {
        char *lo = pool->slabs[i].base, *hi = lo + pool->slabs[i].len;
        for (i++; i < pool->nslabs && pool->slabs[i].base == hi; i++)
            hi += pool->slabs[i].len;
        munmap(lo, (size_t)(hi - lo));
    }
    moor__free(pool->buckets);
    moor__free(pool->slabs);
    memset(pool, 0, sizeof *pool);
}

static moor__stack_bucket *bucket_find(moor__stack_pool *pool, size_t map_size)
{
    for (size_t i = 0; i < pool->nbuckets; i++)
        if (pool->buckets[i].map_size == map_size)
            return &pool->buckets[i];
    return NULL;
}

/* ---- running out of mappings ----------------------------------------------------------- */

static long read_long(const char *path)
{
    char buf[32];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    return strtol(buf, NULL, 10);
}

/* Lines of /proc/self/maps: the mappings the process has; 0 if it cannot be read. Reads
 * with a buffer on the stack: no allocation, no mapping (we may be out of both). */
static size_t count_mappings(void)
{
    char buf[4096];
    size_t lines = 0;
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; i++)
            lines += buf[i] == '\n';
    close(fd);
    return lines;
}

/* A mapping or a guard failed with ENOMEM. If the process is at vm.max_map_count, say so
 * once per process: the limit, what the process has, what would be needed, and the way out
 * that needs no mapping per stack. Nothing is said about plain memory exhaustion. */
static void check_out_of_mappings(const moor__stack_pool *pool)
{
    if (__atomic_load_n(&maps_reported, __ATOMIC_RELAXED))
        return;
    long max = read_long("/proc/sys/vm/max_map_count");
    size_t maps = count_mappings();
    if (max <= 0 || maps == 0 || maps + MAPS_SLACK < (size_t)max)
        return;
    if (__atomic_exchange_n(&maps_reported, 1, __ATOMIC_RELAXED))
        return;
    /* Twice the stacks mapped now: mprotect guards cost two mappings a stack. */
    int per_stack = pool->mode == MOOR_GUARD_MPROTECT;
    size_t need = maps + (per_stack ? 2 * pool->mapped : maps);
    fprintf(stderr,
            "moor: out of memory mappings for fiber stacks: this process has %zu mappings and "
            "vm.max_map_count (/proc/sys/vm/max_map_count) is %ld%s; for twice the %zu stacks "
            "mapped now, raise it to about %zu (sysctl -w vm.max_map_count=%zu). Linux 6.13+ "
            "guards stacks with MADV_GUARD_INSTALL, which needs no mapping per stack. moor_spawn "
            "returns -ENOMEM meanwhile.\n",
            maps, max,
            per_stack ? " (stacks are guarded with mprotect: 2 mappings each)" : "",
            pool->mapped, need, need);
}

/* ---- slabs and guards ------------------------------------------------------------------ */

/* The slab that holds the stack at base. */
static moor__stack_slab *slab_of(moor__stack_pool *pool, const char *base)
{
    size_t lo = 0, hi = pool->nslabs;
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (pool->slabs[mid].base <= base)
            lo = mid;
        else
            hi = mid;
    }
    return &pool->slabs[lo];
}

/* A new slab for b, as large as it can be had: halved until the mapping succeeds (a low
 * RLIMIT_AS, strict overcommit), down to one stack. */
static int slab_new(moor__stack_pool *pool, moor__stack_bucket *b)
{
    if (moor__grow(&pool->slabs, &pool->cap_slabs, pool->nslabs + 1, sizeof *pool->slabs) < 0)
        return -ENOMEM;
    size_t cap = SLAB_MAX_BYTES / b->map_size ? SLAB_MAX_BYTES / b->map_size : 1;
    size_t n = b->slab_next ? b->slab_next : SLAB_FIRST;
    if (n > cap)
        n = cap;
    char *base;
    for (;;) {
        base = mmap(NULL, n * b->map_size, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
        if (base != MAP_FAILED)
            break;
        if (n == 1) {
            check_out_of_mappings(pool);
            return -ENOMEM;
        }
        n /= 2;
    }
    size_t len = n * b->map_size;
    /* A slab is large enough for transparent huge pages, which would make a stack's first
     * touch cost 2 MiB (Linux 6.7+ already excludes MAP_STACK mappings). */
    madvise(base, len, MADV_NOHUGEPAGE);
    size_t at = pool->nslabs;
    while (at > 0 && pool->slabs[at - 1].base > base)
        at--;
    memmove(&pool->slabs[at + 1], &pool->slabs[at], (pool->nslabs - at) * sizeof *pool->slabs);
    pool->slabs[at] = (moor__stack_slab){.base = base, .len = len, .map_size = b->map_size};
    pool->nslabs++;
    pool->reserved += len;
    b->carve = b->guarded = base;
    b->carve_end = base + len;
    /* A failed halving sticks: the next slab starts from what could be had. */
    b->slab_next = 2 * n < cap ? 2 * n : cap;
    return 0;
}

/* Install the guards of the next stacks of b's slab: a batch ahead where process_madvise
 * takes MADV_GUARD_INSTALL, else the next stack's alone. */
static int guards_install(moor__stack_pool *pool, moor__stack_bucket *b)
{
    size_t left = (size_t)(b->carve_end - b->guarded) / b->map_size;
    if (pool->mode == MOOR_GUARD_MPROTECT) {
        /* Splits the mapping in two more: past vm.max_map_count this fails with ENOMEM. */
        if (mprotect(b->guarded, pool->guard, PROT_NONE) != 0) {
            check_out_of_mappings(pool);
            return -ENOMEM;
        }
        b->guarded += b->map_size;
        return 0;
    }
    if (guard_batch_works && left > 1) {
        struct iovec iov[GUARD_BATCH];
        size_t n = left < GUARD_BATCH ? left : GUARD_BATCH;
        for (size_t i = 0; i < n; i++)
            iov[i] = (struct iovec){b->guarded + i * b->map_size, pool->guard};
        if (guard_batch(iov, n) == (long)(n * pool->guard)) {
            b->guarded += n * b->map_size;
            return 0;
        }
        /* Partly done, or refused (no memory for page tables): one at a time, which says. */
    }
    if (madvise(b->guarded, pool->guard, MADV_GUARD_INSTALL) != 0)
        return -ENOMEM;
    b->guarded += b->map_size;
    return 0;
}

/* The next stack of b's newest slab, with its guard; a new slab when that one is used up. */
static int carve(moor__stack_pool *pool, moor__stack_bucket *b, char **base)
{
    if (b->carve == b->carve_end) {
        int rc = slab_new(pool, b);
        if (rc < 0)
            return rc;
    }
    if (b->carve == b->guarded) {
        int rc = guards_install(pool, b);
        if (rc < 0)
            return rc;
    }
    *base = b->carve;
    b->carve += b->map_size;
    moor__stack_slab *slab = slab_of(pool, *base);
    slab->carved++;
    slab->empty = 0;
    return 0;
}

/* ---- the pool -------------------------------------------------------------------------- */

/* Every stack carved from the slab is cold and given back: give back the page tables as well.
 * DONTNEED frees a page table once nothing is left in it (Linux 6.14+, PT_RECLAIM), and
 * guard markers are something: remove them first. The range stays mapped and reads zeros;
 * stacks not carved yet keep the guards installed ahead of them. Not done as stacks are
 * freed, only when the pool is trimmed: removing the guards and installing them again costs
 * about 3 us a stack here (bench_scale), half the cost of a cold spawn. */
static void slab_bare(const moor__stack_pool *pool, moor__stack_slab *slab)
{
    if (pool->mode != MOOR_GUARD_MADVISE)
        return; /* mprotect guards are mappings, not page table entries */
    size_t len = slab->carved * slab->map_size;
    if (madvise(slab->base, len, MADV_GUARD_REMOVE) != 0)
        return; /* the guards are still there: the stacks stay as they are */
    slab->bare = 1;
    slab->empty = 1;
    madvise(slab->base, len, MADV_DONTNEED);
}

static int by_address(const void *a, const void *b)
{
    const char *x = *(char *const *)a, *y = *(char *const *)b;
    return (x > y) - (x < y);
}

/* Give back the memory of b's untrimmed cold stacks: sorted by address, so that stacks side
 * by side in a slab (freed in any order) go in one MADV_DONTNEED. The range covers the
 * guards between them: guard markers survive DONTNEED, and an mprotect guard has nothing to
 * give back. Zeroed, a control block reads as a free fiber. */
static void bucket_trim(moor__stack_pool *pool, moor__stack_bucket *b)
{
    char **v = b->cold + b->ncold - b->untrimmed;
    size_t n = b->untrimmed;
    b->untrimmed = 0;
    qsort(v, n, sizeof *v, by_address);
    for (size_t i = 0; i < n;) {
        size_t j = i + 1;
        while (j < n && v[j] == v[j - 1] + b->map_size)
            j++;
        char *lo = v[i] + pool->guard, *hi = v[j - 1] + b->map_size;
        madvise(lo, (size_t)(hi - lo), MADV_DONTNEED);
        i = j;
    }
    for (size_t i = 0; i < n; i++)
        slab_of(pool, v[i])->trimmed++;
}

void moor__stack_pool_trim(moor__stack_pool *pool)
{
    pool->trim_due = 0;
    for (size_t i = 0; i < pool->nbuckets; i++)
        if (pool->buckets[i].untrimmed)
            bucket_trim(pool, &pool->buckets[i]);
    for (size_t i = 0; i < pool->nslabs; i++) {
        moor__stack_slab *slab = &pool->slabs[i];
        if (slab->carved && slab->trimmed == slab->carved && !slab->empty)
            slab_bare(pool, slab);
    }
}

int moor__stack_get_slow(moor__stack_pool *pool, size_t map_size, char **base)
{
    moor__stack_bucket *b = bucket_find(pool, map_size);
    if (b && b->nhot) {
        *base = b->hot[--b->nhot];
        return 0;
    }
    if (b && b->ncold) {
        /* The untrimmed ones are on top: still resident, cheaper to take. */
        char *cold = b->cold[b->ncold - 1];
        if (b->untrimmed) {
            b->untrimmed--;
        } else {
            moor__stack_slab *slab = slab_of(pool, cold);
            /* Its slab gave back its page tables, guards included, once: put the guard back
             * (again, harmlessly, if this stack had it back already). */
            if (slab->bare && madvise(cold, pool->guard, MADV_GUARD_INSTALL) != 0)
                return -ENOMEM;
            slab->trimmed--;
            slab->empty = 0;
        }
        b->ncold--;
        *base = cold;
        stack_register(*base, map_size, pool->guard);
        return 0;
    }
    if (!b) {
        /* Make the bucket now so that putting the stack back can never fail for want of one. */
        if (moor__grow(&pool->buckets, &pool->cap_buckets, pool->nbuckets + 1,
                       sizeof *pool->buckets) < 0)
            return -ENOMEM;
        b = &pool->buckets[pool->nbuckets++];
        memset(b, 0, sizeof *b);
        b->map_size = map_size;
    }
    /* Reserve a pool slot for this stack too, for the same reason. */
    if (moor__grow(&b->cold, &b->cap_cold, b->total + 1, sizeof *b->cold) < 0)
        return -ENOMEM;
    int rc = carve(pool, b, base);
    if (rc < 0)
        return rc;
    stack_register(*base, map_size, pool->guard);
    b->total++;
    pool->mapped++;
    return 0;
}

void moor__stack_put_slow(moor__stack_pool *pool, char *base, size_t map_size)
{
    moor__stack_bucket *b = bucket_find(pool, map_size);
    if (b->nhot < pool->hot_max &&
        moor__grow(&b->hot, &b->cap_hot, b->nhot + 1, sizeof *b->hot) == 0) {
        b->hot[b->nhot++] = base;
        return;
    }
    /* Beyond the high-water mark: the memory goes back, with the next batch. */
    stack_deregister(base, map_size);
    /* Cannot fail: stack_get reserved a slot in `cold` for every stack it carved. */
    b->cold[b->ncold++] = base;
    pool->trim_due = 1;
    if (++b->untrimmed >= MOOR__STACK_TRIM_BATCH)
        bucket_trim(pool, b);
}

void moor__stack_pool_counts(const moor__stack_pool *pool, moor__stack_counts *out)
{
    *out = (moor__stack_counts){.mapped = pool->mapped, .slabs = pool->nslabs,
                                .reserved = pool->reserved};
    for (size_t i = 0; i < pool->nslabs; i++)
        out->slabs_bare += pool->slabs[i].empty;
    for (size_t i = 0; i < pool->nbuckets; i++) {
        out->hot += pool->buckets[i].nhot;
        out->cold += pool->buckets[i].ncold;
    }
}
