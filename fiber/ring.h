/* The buffer of a channel (moor_chan, moor_xchan): `cap` slots of `elem_size` bytes, `count`
 * values in them from slot `head` on. Helpers only: each channel keeps the fields in its own
 * struct and serialises its own access. */
#ifndef MOOR_FIBER_RING_H
#define MOOR_FIBER_RING_H

#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "alloc.h"

/* Check a channel's sizes and allocate its ring (none for a rendezvous channel, cap 0):
 * 0, -EINVAL (a zero element size, or a ring whose size wraps), -ENOMEM. */
static inline int moor__ring_alloc(size_t elem_size, size_t cap, unsigned char **ring)
{
    if (elem_size == 0 || (cap && elem_size > SIZE_MAX / cap))
        return -EINVAL;
    *ring = NULL;
    if (cap && !(*ring = moor__alloc(elem_size * cap)))
        return -ENOMEM;
    return 0;
}

/* The slot i places after head (head < cap, i <= cap: one wrap at most, so no division). */
static inline size_t moor__ring_at(size_t head, size_t i, size_t cap)
{
    size_t at = head + i;
    return at >= cap ? at - cap : at;
}

/* Copy a value; the common sizes inline, not through a libc call. */
static inline void moor__copy_elem(void *dst, const void *src, size_t size)
{
    switch (size) {
    case 4:
        memcpy(dst, src, 4);
        break;
    case 8:
        memcpy(dst, src, 8);
        break;
    case 16:
        memcpy(dst, src, 16);
        break;
    default:
        memcpy(dst, src, size);
    }
}

#endif
