/* Fiber stacks, carved from large reservations (slabs) and recycled through a per-executor
 * pool. A slab is one mmap (MAP_NORESERVE) holding many stacks of one mapping size, laid end
 * to end; slabs of a size grow geometrically up to a cap, so that a million stacks need a few
 * hundred mappings. Each stack has its own guard at its low end: a MADV_GUARD_INSTALL marker
 * (Linux 6.13+: no mapping of its own) or an mprotect(PROT_NONE) range (two mappings a stack).
 * A stack is never moved or resized while in use.
 *
 *   slab: | guard | stack 0 ... ctl | guard | stack 1 ... ctl | ... not yet carved ... |
 *
 *   base                base + guard                                   base + map_size
 *   | guard: faults      | usable: fiber stack and, near the top, its control block |
 *
 * Freed stacks go back to the pool, reused last-in first-out: `hot` ones (up to hot_max per
 * size) stay resident; beyond that they go `cold` and their memory is given back with
 * MADV_DONTNEED, in batches that coalesce address-contiguous stacks into one call (guard
 * markers survive DONTNEED). A stack stays mapped until the pool is destroyed, so stale
 * pointers into a freed fiber's control block (a waker) read memory that is still there: a
 * block whose memory was given back reads as zeros, which is MOOR__FIBER_FREE, and the
 * generation check turns them away. Destroying the pool unmaps whole slabs. */
#ifndef MOOR_FIBER_STACK_H
#define MOOR_FIBER_STACK_H

#include <stddef.h>
#include <stdint.h>

#include "moor.h"

/* The stacks of one mapping size. `hot` and `cold` hold base addresses. */
typedef struct moor__stack_bucket {
    size_t map_size;
    size_t total;      /* stacks of this size carved: in use or pooled */
    char **hot;        /* resident, reused first */
    size_t nhot, cap_hot;
    char **cold;       /* memory given back, or about to be: the top `untrimmed` are still
                          resident (one batch of MADV_DONTNEED gives them back together) */
    size_t ncold, cap_cold;
    size_t untrimmed;
    char *carve;       /* the next stack of the newest slab not yet handed out; NULL: none */
    char *carve_end;   /* the end of the newest slab */
    char *guarded;     /* stacks of the newest slab below this address have their guard */
    size_t slab_next;  /* stacks the next slab of this size is asked to hold */
} moor__stack_bucket;

/* One reservation: unmapped whole when the pool is destroyed. Its stacks are carved from
 * its base up. When the pool is trimmed and every stack carved from a slab is cold, the slab
 * gives back its page tables too (they hold the guard markers, ~640 bytes a default stack):
 * its guards are removed and the carved range dropped, still mapped and reading zeros. A
 * stack taken from such a slab has its guard installed again. MADVISE mode only. */
/* ASan: the bytes at the top of a stack mapping (control block, its colour's offset, the
 * first frames) that a new fiber clears of redzones old frames left, and that destroying a
 * pool clears before its slabs are unmapped (ASan keeps the poison of unmapped memory, and
 * the next mapping there may be another pool's). */
#define MOOR__ASAN_STACK_TOP (16384u + 2048u)

typedef struct moor__stack_slab {
    char *base;
    size_t len;
    size_t map_size;
    size_t carved;  /* stacks handed out from its base up, in use or pooled */
    size_t trimmed; /* of those, cold with their memory given back */
    uint8_t bare;   /* its page tables were given back: a stack taken from it needs its guard */
    uint8_t empty;  /* since then, no stack of it has been taken */
} moor__stack_slab;

typedef struct moor__stack_pool {
    size_t guard;          /* bytes of guard below each stack, page-rounded */
    size_t hot_max;        /* pooled stacks kept resident, per size */
    moor_guard_mode mode;  /* MOOR_GUARD_MADVISE or MOOR_GUARD_MPROTECT */
    moor__stack_bucket *buckets;
    size_t nbuckets, cap_buckets;
    size_t mapped;         /* stacks carved, in use or pooled */
    moor__stack_slab *slabs; /* sorted by address */
    size_t nslabs, cap_slabs;
    size_t reserved;       /* bytes of address space the slabs hold */
    int trim_due;          /* stacks went cold since the last moor__stack_pool_trim */
} moor__stack_pool;

/* What a pool holds now (for moor_stats and tests). */
typedef struct moor__stack_counts {
    size_t mapped;   /* stacks carved from slabs: in use or pooled */
    size_t hot;      /* pooled and resident */
    size_t cold;     /* pooled, memory given back (or in the batch about to be) */
    size_t slabs;    /* reservations (mmap calls that hold stacks) */
    size_t slabs_bare; /* of those, with every stack cold and their page tables given back */
    size_t reserved; /* bytes of address space the slabs hold, carved or not */
} moor__stack_counts;

/* Cold stacks whose memory is given back in one go: sorted by address, neighbours share one
 * MADV_DONTNEED. The batch stays resident meanwhile (a few hundred KiB at most). */
#define MOOR__STACK_TRIM_BATCH 64u

/* The top bytes of every stack mapping belong to the pool (valgrind's stack id). */
#define MOOR__STACK_RESERVED 16

size_t moor__page_size(void);

/* Set up an empty pool (it maps nothing yet). AUTO takes the environment variable MOOR_GUARD
 * (mprotect, madvise or auto) and, for auto or without it, picks MADVISE where the kernel has
 * MADV_GUARD_INSTALL. Errors: -EINVAL when MADVISE is asked for (by mode or by MOOR_GUARD)
 * and the kernel lacks it. */
int moor__stack_pool_init(moor__stack_pool *pool, size_t guard, size_t hot_max,
                          moor_guard_mode mode);
/* Unmaps every slab. Stacks still in use must have been put back first. */
void moor__stack_pool_destroy(moor__stack_pool *pool);

/* A stack of map_size bytes (guard included, page multiple) at *base. Errors: -ENOMEM (no
 * memory or address space for it, or the process is out of mappings: that is said once per
 * process on stderr, naming vm.max_map_count). The pool is unchanged by a failure. */
int moor__stack_get_slow(moor__stack_pool *pool, size_t map_size, char **base);
void moor__stack_put_slow(moor__stack_pool *pool, char *base, size_t map_size);

/* Give back now the memory of cold stacks still waiting for their batch, and the page tables
 * of slabs whose every stack is cold (after a burst: ~640 bytes a default stack). Costs about
 * 3 us a stack of such slabs (removing their guards, installing them again at reuse): for an
 * idle moment, not for every exit. */
void moor__stack_pool_trim(moor__stack_pool *pool);

/* The executor's idle moment: trim if stacks went cold since the last trim (one load when
 * not). */
static inline void moor__stack_pool_trim_idle(moor__stack_pool *pool)
{
    if (__builtin_expect(pool->trim_due, 0))
        moor__stack_pool_trim(pool);
}

void moor__stack_pool_counts(const moor__stack_pool *pool, moor__stack_counts *out);

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
