#include "alloc.h"

#include <stdlib.h>

void *moor__realloc(void *ptr, size_t size)
{
    if (size == 0) {
        free(ptr);
        return NULL;
    }
    return realloc(ptr, size);
}
