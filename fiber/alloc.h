/* Every allocation moor makes goes through moor__realloc, which calls the allocator that
 * moor_set_allocator installed (libc's by default): one place to swap it and to inject
 * failures. */
#ifndef MOOR_FIBER_ALLOC_H
#define MOOR_FIBER_ALLOC_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* realloc semantics: ptr NULL allocates, size 0 frees (and returns NULL). */
void *moor__realloc(void *ptr, size_t size);

/* Executors alive in the process (atomic): moor_set_allocator asserts there are none. */
extern int moor__executors_alive;

static inline void *moor__alloc(size_t size) { return moor__realloc(NULL, size); }
static inline void moor__free(void *ptr) { (void)moor__realloc(ptr, 0); }

/* The capacity every growing array starts with. */
#define MOOR__GROW_FIRST 16u

/* Make room for `need` elements of `size` (> 0) bytes in the array whose pointer is at
 * `items` (a T **) and whose capacity is *cap: the capacity doubles, from MOOR__GROW_FIRST.
 * 0, or -ENOMEM (no memory, or a size that would overflow), the array unchanged. */
static inline int moor__grow(void *items, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return 0;
    size_t ncap = *cap ? *cap : MOOR__GROW_FIRST;
    while (ncap < need) {
        if (ncap > SIZE_MAX / 2)
            return -ENOMEM;
        ncap *= 2;
    }
    if (ncap > SIZE_MAX / size)
        return -ENOMEM;
    void *old;
    memcpy(&old, items, sizeof old); /* items points at a T *, not at a void * */
    void *nv = moor__realloc(old, ncap * size);
    if (!nv)
        return -ENOMEM;
    memcpy(items, &nv, sizeof nv);
    *cap = ncap;
    return 0;
}

#endif
