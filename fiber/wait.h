/* The building blocks of every future that waits: a deadline in the executor's timer heap,
 * FIFO wait queues of waiters that a counterpart completes, the claim that lets only one of
 * a select's futures take anything, and the one poll skeleton they all follow
 * (moor__wait_poll). Channels, locks, scopes, sleeps, select, promises, fds, signals and the
 * blocking pool are each a moor__wait_ops over these. */
#ifndef MOOR_FIBER_WAIT_H
#define MOOR_FIBER_WAIT_H

#include "assert.h"
#include "executor.h"
#include "list.h"
#include "timer.h"

/* ---- deadlines ------------------------------------------------------------------------- */

/* A deadline at `at` (absolute ms; -1: none), in no heap. */
static inline void moor__deadline_init(moor__deadline *dl, int64_t at)
{
    dl->at = at;
    dl->index = SIZE_MAX;
    dl->waker = (moor_waker){0};
}

/* Has it passed? Never for -1; reads the clock only when there is a deadline. */
static inline int moor__deadline_passed(const moor__deadline *dl)
{
    return dl->at >= 0 && moor_now() >= dl->at;
}

/* At each pending poll of a future with a deadline: queue it the first time (in the heap of
 * the waker's executor), point it at the current waker after. No-op for -1. Errors: -ENOMEM. */
static inline int moor__deadline_arm(moor__deadline *dl, const moor_waker *waker)
{
    if (dl->at < 0)
        return 0;
    dl->waker = *waker;
    if (moor__timer_queued(dl))
        return 0;
    return moor__timer_add(&waker->ex->timers, dl);
}

/* Take it out of its heap, if it is in one. It knows its executor (its waker's), so a cancel
 * op needs nothing else to disarm it. */
static inline void moor__deadline_disarm(moor__deadline *dl)
{
    if (moor__timer_queued(dl))
        moor__timer_remove(&dl->waker.ex->timers, dl);
}

/* ---- the select claim ------------------------------------------------------------------ */

/* A select's one-winner token (moor_cx.claim): the first of its futures to take something
 * claims it for its slot (the select's own future it was polled for); the others then see it
 * claimed and neither take nor complete. */
struct moor__claim {
    int claimed;
    const void *winner; /* the slot that won */
};

/* The one claim test. May the future polled for `slot` of the select behind c take
 * something? With claim set, it also claims the select for the slot if nobody has. Outside a
 * select (c NULL) always yes. */
static inline int moor__claim_slot(struct moor__claim *c, const void *slot, int claim)
{
    if (!c)
        return 1;
    if (c->claimed)
        return c->winner == slot;
    if (claim) {
        c->claimed = 1;
        c->winner = slot;
    }
    return 1;
}

/* For a future about to take something: look (moor__claim_open) before it has secured what it
 * takes, claim (moor__claim) once it has. cx NULL: a plain call, outside any select. */
static inline int moor__claim_open(const moor_cx *cx)
{
    return !cx || moor__claim_slot(cx->claim, cx->slot, 0);
}

static inline int moor__claim(const moor_cx *cx)
{
    return !cx || moor__claim_slot(cx->claim, cx->slot, 1);
}

/* ---- wait queues ----------------------------------------------------------------------- */

static inline moor__waiter *moor__waiter_of(moor__node *n)
{
    return moor_container_of(n, moor__waiter, node);
}

/* Where a waiter is: not queued (before its first park, or after it gave up or its select was
 * won elsewhere), queued, or taken off its queue by a counterpart that completed its operation
 * (the result is set then). DONE is the completion itself: the waiting side keeps no flag of
 * its own, and the completing side writes one word into the waiter for both. */
enum { MOOR__WAITER_IDLE, MOOR__WAITER_QUEUED, MOOR__WAITER_DONE };

static inline void moor__waiter_init(moor__waiter *w) { w->state = MOOR__WAITER_IDLE; }

static inline int moor__waiter_done(const moor__waiter *w)
{
    return w->state == MOOR__WAITER_DONE;
}

/* w, taken off its queue by a counterpart (moor__waitq_take), is done: its operation is
 * complete (the caller sets the result and wakes it). */
static inline void moor__waiter_complete(moor__waiter *w) { w->state = MOOR__WAITER_DONE; }

/* Queue w at the back, to be completed for the task and select slot of cx. */
static inline void moor__waitq_push(moor__list *q, moor__waiter *w, const moor_cx *cx)
{
    w->waker = cx->waker;
    w->claim = cx->claim;
    w->slot = cx->slot;
    moor__list_push(q, &w->node);
    w->state = MOOR__WAITER_QUEUED;
}

/* A pending poll of a waiting future (never a done one): queue its waiter the first time,
 * refresh its waker and claim after. */
static inline void moor__waitq_park(moor__list *q, moor__waiter *w, const moor_cx *cx)
{
    if (w->state != MOOR__WAITER_QUEUED) {
        moor__waitq_push(q, w, cx);
    } else {
        w->waker = cx->waker;
        w->claim = cx->claim;
        w->slot = cx->slot;
    }
}

/* Give up waiting: take w off q if it is there (a done waiter stays done). */
static inline void moor__waitq_remove(moor__list *q, moor__waiter *w)
{
    if (w->state != MOOR__WAITER_QUEUED)
        return;
    moor__list_remove(q, &w->node);
    w->state = MOOR__WAITER_IDLE;
}

/* Take w, the first waiter of q and no select's, off it as done: for a counterpart that
 * completes w's operation and has no claim to look at. */
static inline void moor__waitq_complete_first(moor__list *q, moor__waiter *w)
{
    moor__list_unlink_head(q, &w->node);
    moor__waiter_complete(w);
}

/* The first waiter that may still be completed, taken off the queue with its select claimed
 * for its slot; waiters whose select was won elsewhere are dropped from the queue (their
 * select cancels them). Waiters of the taker's own select (`mine`, NULL for none) are passed
 * over: a select must not pair its send with its own receive. NULL if none. The taker
 * completes the operation and says so with moor__waiter_complete. */
static inline moor__waiter *moor__waitq_take(moor__list *q, const struct moor__claim *mine)
{
    moor__node *next;
    for (moor__node *n = q->head; n; n = next) {
        next = n->next;
        moor__waiter *w = moor__waiter_of(n);
        if (mine && w->claim == mine)
            continue;
        moor__waitq_remove(q, w);
        if (moor__claim_slot(w->claim, w->slot, 1))
            return w;
    }
    return NULL;
}

/* ---- the poll of a waiting future ------------------------------------------------------ */

/* How a waiting future's ops are declared: inlined into moor__wait_poll with it, so that the
 * skeleton costs no call (their address in the ops table is only a constant to it). */
#define MOOR__WAIT_OP static inline __attribute__((always_inline))

/* What makes a future a waiting one. Each op gets the future itself (recover the outer
 * struct with moor_container_of). */
typedef struct moor__wait_ops {
    /* Done? 1 if it has completed (a counterpart or an event completed it) or can complete
     * now without waiting (it takes what it waits for, claiming cx's select first): result
     * set. 0 to wait. */
    int (*ready)(moor_future *fut, moor_cx *cx);
    /* Register to be woken by cx->waker (queue a waiter, start a watcher), or refresh the
     * registration's waker. 0, or -errno: the wait fails with it. */
    int (*park)(moor_future *fut, moor_cx *cx);
    /* Undo park (no-op if nothing is registered). 1 if the future turns out to have completed
     * meanwhile (result set: what a counterpart handed over must not be lost), else 0; -1 if
     * it cannot be given up now (it started something that must finish, as a blocking call
     * whose function runs): it stays registered and the wait goes on without its deadline. */
    int (*unpark)(moor_future *fut);
    /* What the future completes with when its deadline passes: -ETIMEDOUT, or 0 for a
     * sleep (whose deadline is its completion). */
    intptr_t expired;
} moor__wait_ops;

/* The poll every waiting future makes: done? the deadline passed? register, arm the
 * deadline. Inlined with ops known, so it costs no indirect call. */
static inline __attribute__((always_inline)) moor_poll
moor__wait_poll(moor_future *fut, moor__deadline *dl, moor_cx *cx, const moor__wait_ops *ops)
{
    if (ops->ready(fut, cx)) {
        moor__deadline_disarm(dl);
        return MOOR_READY;
    }
    intptr_t err = ops->expired;
    if (!moor__deadline_passed(dl)) {
        err = ops->park(fut, cx);
        if (err == 0)
            err = moor__deadline_arm(dl, &cx->waker);
        if (err == 0)
            return MOOR_PENDING;
    }
    int undone = ops->unpark(fut);
    moor__deadline_disarm(dl);
    if (undone < 0) {
        dl->at = -1; /* cannot be given up: wait on, unbounded */
        return MOOR_PENDING;
    }
    if (!undone)
        fut->result = err;
    return MOOR_READY;
}

/* The cancel op of a waiting future. */
static inline moor_poll moor__wait_cancel(moor_future *fut, moor__deadline *dl,
                                          const moor__wait_ops *ops)
{
    moor__deadline_disarm(dl);
    int undone = ops->unpark(fut);
    moor__assert(undone >= 0, "future \"%s\" dropped while it cannot be given up (it started "
                              "something that must finish, which may still use its memory)",
                 fut->ops->label);
    return undone ? MOOR_READY : MOOR_PENDING;
}

#endif
