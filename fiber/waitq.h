/* FIFO wait queues of moor_waiter, and the claim protocol of select (see moor_claim). */
#ifndef MOOR_FIBER_WAITQ_H
#define MOOR_FIBER_WAITQ_H

#include "moor.h"

static inline void moor__waitq_push(moor_waitq *q, moor_waiter *w, const moor_cx *cx)
{
    w->waker = cx->waker;
    w->claim = cx->claim;
    w->slot = cx->slot;
    w->next = NULL;
    w->prev = q->tail;
    if (q->tail)
        q->tail->next = w;
    else
        q->head = w;
    q->tail = w;
    w->queued = 1;
}

/* A pending poll of a waiting future: queue its waiter the first time, refresh its waker
 * and claim after. */
static inline void moor__waitq_park(moor_waitq *q, moor_waiter *w, const moor_cx *cx)
{
    if (!w->queued) {
        moor__waitq_push(q, w, cx);
    } else {
        w->waker = cx->waker;
        w->claim = cx->claim;
        w->slot = cx->slot;
    }
}

static inline void moor__waitq_remove(moor_waitq *q, moor_waiter *w)
{
    if (!w->queued)
        return;
    if (w->prev)
        w->prev->next = w->next;
    else
        q->head = w->next;
    if (w->next)
        w->next->prev = w->prev;
    else
        q->tail = w->prev;
    w->queued = 0;
}

/* May a future polled with cx take something? Not if its select was won by another slot.
 * moor__claim_open only looks; moor__claim claims the select for cx's slot. */
static inline int moor__claim_open(const moor_cx *cx)
{
    const moor_claim *c = cx->claim;
    return !c || !c->claimed || c->winner == cx->slot;
}

static inline int moor__claim(const moor_cx *cx)
{
    moor_claim *c = cx->claim;
    if (!c)
        return 1;
    if (c->claimed)
        return c->winner == cx->slot;
    c->claimed = 1;
    c->winner = cx->slot;
    return 1;
}

/* The first waiter that may still be completed, taken off the queue and its select claimed
 * for its slot; waiters whose select was won elsewhere are dropped from the queue (their
 * select cancels them). Waiters of the taker's own select (`mine`, NULL for none) are passed
 * over: a select must not pair its send with its own receive. NULL if none. */
static inline moor_waiter *moor__waitq_take(moor_waitq *q, const moor_claim *mine)
{
    moor_waiter *next;
    for (moor_waiter *w = q->head; w; w = next) {
        next = w->next;
        if (mine && w->claim == mine)
            continue;
        moor__waitq_remove(q, w);
        if (w->claim) {
            if (w->claim->claimed && w->claim->winner != w->slot)
                continue;
            w->claim->claimed = 1;
            w->claim->winner = w->slot;
        }
        return w;
    }
    return NULL;
}

#endif
