#include "moor.h"

#include <string.h>

/* The largest errno value the kernel returns (its MAX_ERRNO). */
#define ERRNO_MAX 4095u

const char *moor_strerror(int err)
{
    if (err == 0)
        return "Success";
    switch (err) { /* moor's own codes, below the errno range (moor.h) */
    case MOOR_EAI_NONAME: return "No such host";
    case MOOR_EAI_NODATA: return "No address of the requested family for host";
    case MOOR_EAI_SERVFAIL: return "DNS server failure";
    case MOOR_EAI_REFUSED: return "DNS server refused the query";
    case MOOR_EAI_BADNAME: return "Malformed host name";
    case MOOR_EAI_SERVICE: return "Unknown service";
    case MOOR_EOF: return "End of stream";
    }
    /* strerrordesc_np returns a static, locale-free string and NULL for unknown values. */
    /* Negated as unsigned: -INT_MIN would overflow. */
    unsigned int e = err < 0 ? 0u - (unsigned int)err : (unsigned int)err;
    const char *s = e <= ERRNO_MAX ? strerrordesc_np((int)e) : NULL;
    return s ? s : "Unknown error";
}
