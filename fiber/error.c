#include "moor.h"

#include <string.h>

/* The largest errno value the kernel returns (its MAX_ERRNO). */
#define ERRNO_MAX 4095u

const char *moor_strerror(int err)
{
    if (err == 0)
        return "Success";
    /* strerrordesc_np returns a static, locale-free string and NULL for unknown values. */
    /* Negated as unsigned: -INT_MIN would overflow. */
    unsigned int e = err < 0 ? 0u - (unsigned int)err : (unsigned int)err;
    const char *s = e <= ERRNO_MAX ? strerrordesc_np((int)e) : NULL;
    return s ? s : "Unknown error";
}
