#include "alloc.h"

#include "moor.h"

#include <stdint.h>
#include <stdlib.h>

#include "assert.h"

/* The allocator moor_set_allocator installed: libc's until then. Plain variables: they change
 * only while no executor exists (asserted), and a thread that uses moor after that change was
 * started, or synchronised with its starter, after it. */
static void *(*malloc_fn)(size_t) = malloc;
static void *(*realloc_fn)(void *, size_t) = realloc;
static void (*free_fn)(void *) = free;

int moor__executors_alive;

void moor_set_allocator(void *(*m)(size_t), void *(*r)(void *, size_t), void (*f)(void *))
{
    moor__assert((m && r && f) || (!m && !r && !f),
                 "moor_set_allocator: give all three functions, or three NULLs for libc's");
    int alive = __atomic_load_n(&moor__executors_alive, __ATOMIC_SEQ_CST);
    moor__assert(alive == 0,
                 "moor_set_allocator: %d executor(s) exist; the allocator may change only while "
                 "none does (what moor holds is freed with the allocator that made it)",
                 alive);
    malloc_fn = m ? m : malloc;
    realloc_fn = r ? r : realloc;
    free_fn = f ? f : free;
}

void *moor__realloc(void *ptr, size_t size)
{
    if (size == 0) {
        if (ptr)
            free_fn(ptr);
        return NULL;
    }
    /* No object can be that large (pointer differences would overflow); saying so here also
     * spares a sanitizer's allocator, which aborts on such requests instead of failing. */
    if (size > PTRDIFF_MAX)
        return NULL;
    return ptr ? realloc_fn(ptr, size) : malloc_fn(size);
}
