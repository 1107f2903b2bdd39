#include "moor.h"

#include <string.h>

const char *moor_strerror(int err)
{
    if (err == 0)
        return "Success";
    /* strerrordesc_np returns a static, locale-free string and NULL for unknown values. */
    const char *s = strerrordesc_np(err < 0 ? -err : err);
    return s ? s : "Unknown error";
}
