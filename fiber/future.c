#include <stdio.h>
#include <stdlib.h>

#include "assert.h"
#include "future.h"
#include "moor.h"


void moor_future_init(moor_future *fut, const moor_future_ops *ops, uint32_t flags)
{
    fut->ops = ops;
    fut->data = NULL;
    fut->result = 0;
    fut->flags = flags;
    fut->state = MOOR__FUTURE_INIT;
    fut->pinned_at = NULL;
}

void moor__pin_violation(const moor_future *fut, const char *what)
{
    fprintf(stderr,
            "moor: future \"%s\" %s after it moved: first polled at %p, now at %p "
            "(a pending future must not move; set MOOR_UNPIN if this type allows it)\n",
            fut->ops && fut->ops->label ? fut->ops->label : "?", what,
            (const void *)fut->pinned_at, (const void *)fut);
    abort();
}

void moor__poll_after_done(const moor_future *fut)
{
    moor__assert(0, "future \"%s\" at %p polled again after it returned READY",
                 fut->ops && fut->ops->label ? fut->ops->label : "?", (const void *)fut);
    abort();
}

moor_poll moor_future_poll(moor_future *fut, moor_cx *cx) { return moor__future_poll(fut, cx); }

moor_poll moor_future_cancel(moor_future *fut)
{
    if (fut->state == MOOR__FUTURE_DONE)
        return MOOR_READY;
    if (fut->state != MOOR__FUTURE_PENDING)
        return MOOR_PENDING;
    moor__pin_check(fut, "cancelled");
    if (fut->ops->cancel && fut->ops->cancel(fut) == MOOR_READY) {
        fut->state = MOOR__FUTURE_DONE; /* it had completed: its output stands */
        return MOOR_READY;
    }
    fut->state = MOOR__FUTURE_INIT;
    fut->pinned_at = NULL;
    return MOOR_PENDING;
}

int moor_future_done(const moor_future *fut) { return moor__future_done(fut); }
