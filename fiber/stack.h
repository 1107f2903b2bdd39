/* Fiber stacks: one mmap'd region each, MAP_NORESERVE, a guard at its low end, never moved
 * or resized while in use. Freed stacks go back to a per-executor pool, reused last-in
 * first-out. A pooled stack stays mapped until the pool is destroyed, so stale pointers into
 * a freed fiber's control block (a waker) read memory that is still there: the generation
 * check then turns them away.
 *
 *   base                base + guard                                   base + map_size
 *   | guard: faults      | usable: fiber stack and, at the top, its control block |
 */
#ifndef MOOR_FIBER_STACK_H
#define MOOR_FIBER_STACK_H

#include <stddef.h>

#include "moor.h"

/* The stacks of one size: `hot` ones are resident and reused first; `cold` ones have had
 * their memory given back with MADV_DONTNEED. Both hold base addresses. */
typedef struct moor__stack_bucket {
    size_t map_size;
    size_t total; /* stacks of this size mapped: in use or pooled */
    char **hot;
    size_t nhot, cap_hot;
    char **cold;
    size_t ncold, cap_cold;
} moor__stack_bucket;

typedef struct moor__stack_pool {
    size_t guard;          /* bytes of guard below each stack, page-rounded */
    size_t hot_max;        /* pooled stacks kept resident, per size */
    moor_guard_mode mode;  /* MOOR_GUARD_MADVISE or MOOR_GUARD_MPROTECT */
    moor__stack_bucket *buckets;
    size_t nbuckets, cap_buckets;
    size_t mapped;         /* stacks mapped, in use or pooled */
} moor__stack_pool;

/* The top bytes of every stack mapping belong to the pool (valgrind's stack id). */
#define MOOR__STACK_RESERVED 16

size_t moor__page_size(void);

/* AUTO picks MADVISE where the kernel has MADV_GUARD_INSTALL. Errors: -EINVAL when MADVISE
 * is asked for and the kernel lacks it. */
int moor__stack_pool_init(moor__stack_pool *pool, size_t guard, size_t hot_max,
                          moor_guard_mode mode);
/* Unmaps every pooled stack. Stacks still in use must have been put back first. */
void moor__stack_pool_destroy(moor__stack_pool *pool);

/* A stack of map_size bytes (guard included, page multiple) at *base. Errors: -ENOMEM. */
int moor__stack_get_slow(moor__stack_pool *pool, size_t map_size, char **base);
void moor__stack_put_slow(moor__stack_pool *pool, char *base, size_t map_size);

/* The common case inline: a hot stack of the first size asked for (the executor's default,
 * which it asks for first) comes from, and goes back to, the top of its LIFO. */
static inline int moor__stack_get(moor__stack_pool *pool, size_t map_size, char **base)
{
    moor__stack_bucket *b = pool->buckets;
    if (__builtin_expect(b && b->map_size == map_size && b->nhot, 1)) {
        *base = b->hot[--b->nhot];
        return 0;
    }
    return moor__stack_get_slow(pool, map_size, base);
}

/* Give a stack back to the pool. */
static inline void moor__stack_put(moor__stack_pool *pool, char *base, size_t map_size)
{
    moor__stack_bucket *b = pool->buckets;
    if (__builtin_expect(b->map_size == map_size && b->nhot < pool->hot_max && b->nhot < b->cap_hot, 1)) {
        b->hot[b->nhot++] = base;
        return;
    }
    moor__stack_put_slow(pool, base, map_size);
}

#endif
