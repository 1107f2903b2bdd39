/* Internal view of a future's state (moor_future.state). */
#ifndef MOOR_FIBER_FUTURE_H
#define MOOR_FIBER_FUTURE_H

#include "moor.h"

enum moor__future_state {
    MOOR__FUTURE_INIT = 0, /* never polled, or cancelled (a cancelled future is as if fresh) */
    MOOR__FUTURE_PENDING,  /* returned PENDING at least once */
    MOOR__FUTURE_DONE,     /* returned READY; result holds its output */
};

static inline int moor__future_done(const moor_future *fut)
{
    return fut->state == MOOR__FUTURE_DONE;
}

#endif
