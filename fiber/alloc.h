/* Every allocation moor makes goes through moor__realloc, so that an allocator can be
 * swapped and failures injected in one place. */
#ifndef MOOR_FIBER_ALLOC_H
#define MOOR_FIBER_ALLOC_H

#include <stddef.h>

/* realloc semantics: ptr NULL allocates, size 0 frees (and returns NULL). */
void *moor__realloc(void *ptr, size_t size);

static inline void *moor__alloc(size_t size) { return moor__realloc(NULL, size); }
static inline void moor__free(void *ptr) { (void)moor__realloc(ptr, 0); }

#endif
