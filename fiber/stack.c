#include "stack.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#ifdef MOOR_VALGRIND
#include <valgrind/valgrind.h>
#endif

#include "alloc.h"

#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102 /* Linux 6.13; older headers lack it */
#endif

static size_t page_size;
static int guard_install_works;
static pthread_once_t probe_once = PTHREAD_ONCE_INIT;

/* Ask the kernel once whether it has MADV_GUARD_INSTALL: older kernels answer EINVAL. */
static void probe(void)
{
    page_size = (size_t)sysconf(_SC_PAGESIZE);
    void *p = mmap(NULL, 2 * page_size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return;
    guard_install_works = madvise(p, page_size, MADV_GUARD_INSTALL) == 0;
    munmap(p, 2 * page_size);
}

size_t moor__page_size(void)
{
    pthread_once(&probe_once, probe);
    return page_size;
}

int moor__stack_pool_init(moor__stack_pool *pool, size_t guard, size_t hot_max,
                          moor_guard_mode mode)
{
    size_t page = moor__page_size();
    memset(pool, 0, sizeof *pool);
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

static void bucket_unmap_all(moor__stack_bucket *b)
{
    for (size_t i = 0; i < b->nhot; i++) {
        stack_deregister(b->hot[i], b->map_size);
        munmap(b->hot[i], b->map_size);
    }
    for (size_t i = 0; i < b->ncold; i++)
        munmap(b->cold[i], b->map_size);
    moor__free(b->hot);
    moor__free(b->cold);
}

void moor__stack_pool_destroy(moor__stack_pool *pool)
{
    for (size_t i = 0; i < pool->nbuckets; i++)
        bucket_unmap_all(&pool->buckets[i]);
    moor__free(pool->buckets);
    memset(pool, 0, sizeof *pool);
}

static moor__stack_bucket *bucket_find(moor__stack_pool *pool, size_t map_size)
{
    for (size_t i = 0; i < pool->nbuckets; i++)
        if (pool->buckets[i].map_size == map_size)
            return &pool->buckets[i];
    return NULL;
}

static int push(char ***v, size_t *n, size_t *cap, char *base)
{
    if (moor__grow(v, cap, *n + 1, sizeof **v) < 0)
        return -ENOMEM;
    (*v)[(*n)++] = base;
    return 0;
}

static int stack_map(moor__stack_pool *pool, size_t map_size, char **out)
{
    char *base = mmap(NULL, map_size, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (base == MAP_FAILED)
        return -ENOMEM;
    int rc = pool->mode == MOOR_GUARD_MADVISE
                 ? madvise(base, pool->guard, MADV_GUARD_INSTALL)
                 : mprotect(base, pool->guard, PROT_NONE);
    if (rc != 0) {
        /* mprotect splits the mapping: past vm.max_map_count it fails with ENOMEM. */
        munmap(base, map_size);
        return -ENOMEM;
    }
    stack_register(base, map_size, pool->guard);
    pool->mapped++;
    *out = base;
    return 0;
}

int moor__stack_get_slow(moor__stack_pool *pool, size_t map_size, char **base)
{
    moor__stack_bucket *b = bucket_find(pool, map_size);
    if (b && b->nhot) {
        *base = b->hot[--b->nhot];
        return 0;
    }
    if (b && b->ncold) {
        *base = b->cold[--b->ncold];
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
    int rc = stack_map(pool, map_size, base);
    if (rc == 0)
        b->total++;
    return rc;
}

void moor__stack_put_slow(moor__stack_pool *pool, char *base, size_t map_size)
{
    moor__stack_bucket *b = bucket_find(pool, map_size);
    if (b->nhot < pool->hot_max && push(&b->hot, &b->nhot, &b->cap_hot, base) == 0)
        return;
    /* Beyond the high-water mark: give the memory back, all of it. The guard stays installed
     * (guard markers survive MADV_DONTNEED, and an mprotect guard is a separate mapping). */
    stack_deregister(base, map_size);
    madvise(base + pool->guard, map_size - pool->guard, MADV_DONTNEED);
    /* Cannot fail: stack_get reserved a slot in `cold` for every stack it mapped. */
    b->cold[b->ncold++] = base;
}
