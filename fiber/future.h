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

/* The C form of Pin: a future that has returned PENDING may have handed its own address to
 * a waker source (a watcher embedded in it, a list of waiters, the timer heap); moving it
 * would leave them pointing at the old copy. Checked on every poll and cancel of a pending
 * future, in every build: a load, a compare and a branch (bench_switch's pin_check_ns). */
__attribute__((noinline, noreturn, cold)) void moor__pin_violation(const moor_future *fut,
                                                                   const char *what);

static inline void moor__pin_check(const moor_future *fut, const char *what)
{
    if (__builtin_expect(fut->pinned_at != fut, 0) && !(fut->flags & MOOR_UNPIN))
        moor__pin_violation(fut, what);
}

/* The body of moor_future_poll, inline for moor_await: the assert on a finished future, the
 * pin check, the call, the state. */
__attribute__((noinline, noreturn, cold)) void moor__poll_after_done(const moor_future *fut);

static inline moor_poll moor__future_poll(moor_future *fut, moor_cx *cx)
{
    if (__builtin_expect(fut->state == MOOR__FUTURE_DONE, 0))
        moor__poll_after_done(fut);
    if (fut->state == MOOR__FUTURE_PENDING)
        moor__pin_check(fut, "polled");
    moor_poll r = fut->ops->poll(fut, cx);
    if (r == MOOR_READY) {
        fut->state = MOOR__FUTURE_DONE;
    } else if (fut->state == MOOR__FUTURE_INIT) {
        fut->state = MOOR__FUTURE_PENDING;
        fut->pinned_at = fut;
    }
    return r;
}

#endif
