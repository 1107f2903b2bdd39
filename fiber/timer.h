/* The executor's timers: a binary min-heap of moor__deadline, ordered by time and then by
 * arrival (seq), so that deadlines at one time fire first-come first-served. The deadlines
 * live in the futures that wait (pinned); the heap holds pointers to them. A pure heap: what
 * a due deadline does is the caller's (moor__timer_fire's callback). The monotonic clock,
 * moor_now, is defined beside it. */
#ifndef MOOR_FIBER_TIMER_H
#define MOOR_FIBER_TIMER_H

#include <stdint.h>

#include "moor.h"

typedef struct moor__timer_heap {
    moor__deadline **nodes;
    size_t n, cap;
    uint64_t next_seq;
} moor__timer_heap;

void moor__timer_heap_free(moor__timer_heap *h);

/* The monotonic clock in nanoseconds; moor_now() is it in milliseconds. */
uint64_t moor__now_ns(void);

/* Whether dl is in a heap (index is SIZE_MAX when it is not). */
static inline int moor__timer_queued(const moor__deadline *dl) { return dl->index != SIZE_MAX; }

/* Queue dl, to come due at dl->at. Errors: -ENOMEM. */
int moor__timer_add(moor__timer_heap *h, moor__deadline *dl);
/* Take a queued dl out. */
void moor__timer_remove(moor__timer_heap *h, moor__deadline *dl);
/* Unqueue every deadline that is due at `now` (at <= now), earliest first, and pass each to
 * fire (which may queue or remove others). Returns how many fired. */
size_t moor__timer_fire(moor__timer_heap *h, int64_t now, void (*fire)(moor__deadline *dl));
/* The earliest deadline, or -1 with none queued. */
static inline int64_t moor__timer_next(const moor__timer_heap *h)
{
    return h->n ? h->nodes[0]->at : -1;
}

#endif
