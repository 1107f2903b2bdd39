#include "alloc.h"

#include <stdint.h>
#include <stdlib.h>

void *moor__realloc(void *ptr, size_t size)
{
    if (size == 0) {
        free(ptr);
        return NULL;
    }
    /* No object can be that large (pointer differences would overflow); saying so here also
     * spares a sanitizer's allocator, which aborts on such requests instead of failing. */
    if (size > PTRDIFF_MAX)
        return NULL;
    return realloc(ptr, size);
}
