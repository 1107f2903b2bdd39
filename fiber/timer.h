/* The executor's timers: a binary min-heap of moor_timer_node, ordered by deadline and then
 * by arrival (seq), so timers with one deadline fire first-come first-served. Nodes live in
 * the futures that wait (pinned), the heap holds pointers to them. */
#ifndef MOOR_FIBER_TIMER_H
#define MOOR_FIBER_TIMER_H

#include <stdint.h>

#include "moor.h"

typedef struct moor__timer_heap {
    moor_timer_node **nodes;
    size_t n, cap;
    uint64_t next_seq;
} moor__timer_heap;

void moor__timer_heap_free(moor__timer_heap *h);

/* Mark a node as in no heap. */
static inline void moor__timer_node_init(moor_timer_node *node) { node->index = SIZE_MAX; }
static inline int moor__timer_node_queued(const moor_timer_node *node)
{
    return node->index != SIZE_MAX;
}

/* Queue `node` to wake `waker` at `deadline`. Errors: -ENOMEM. */
int moor__timer_add(moor__timer_heap *h, moor_timer_node *node, int64_t deadline,
                    const moor_waker *waker);
/* What a waiting future does with its deadline at each pending poll: queue the node the
 * first time, point it at the current waker after. No-op for deadline -1. Errors: -ENOMEM. */
int moor__timer_arm(moor__timer_heap *h, moor_timer_node *node, int64_t deadline,
                    const moor_waker *waker);
void moor__timer_remove_queued(moor__timer_heap *h, moor_timer_node *node);
/* Take a queued node out (no-op, inline, if it is not queued: the common case). */
static inline void moor__timer_remove(moor__timer_heap *h, moor_timer_node *node)
{
    if (moor__timer_node_queued(node))
        moor__timer_remove_queued(h, node);
}
/* Wake and unqueue every node whose deadline is <= now; returns how many. */
size_t moor__timer_fire(moor__timer_heap *h, int64_t now);
/* The earliest deadline, or -1 with no timer queued. */
static inline int64_t moor__timer_next(const moor__timer_heap *h)
{
    return h->n ? h->nodes[0]->deadline : -1;
}

#endif
