/* moor_select and the combinators built from the same pieces: race, join_all, timeout, retry,
 * and a fiber's join with a deadline. Each is a future over caller-owned futures, polled with
 * the waker of whoever polls it, so it works from a fiber (await) and from plain code
 * (block_on) alike. */
#include <errno.h>

#include "assert.h"
#include "executor.h"
#include "fiber.h"
#include "future.h"
#include "timer.h"

static int arm(moor_timer_node *node, int64_t deadline, const moor_cx *cx)
{
    return moor__timer_arm(&cx->waker.ex->timers, node, deadline, &cx->waker);
}

static void disarm(moor_timer_node *node)
{
    moor__timer_remove(&moor__tls_executor->timers, node);
}

static int expired(int64_t deadline) { return deadline >= 0 && moor_now() >= deadline; }

/* ---- select ------------------------------------------------------------------------------ */

typedef struct select_future {
    moor_future base;
    moor_future **futs;
    size_t n;
    int64_t deadline;
    moor_claim claim;
    moor_timer_node node;
} select_future;

/* Cancel every pending future but `keep`. A cancel that reports the future had completed
 * can only come from the claimed winner (claims let only one complete): return its index. */
static long cancel_all_but(select_future *sf, long keep)
{
    long completed = -1;
    for (size_t i = 0; i < sf->n; i++) {
        if ((long)i == keep || sf->futs[i]->state != MOOR__FUTURE_PENDING)
            continue;
        if (moor_future_cancel(sf->futs[i]) == MOOR_READY && completed < 0)
            completed = (long)i;
    }
    return completed;
}

static moor_poll select_poll(moor_future *fut, moor_cx *cx)
{
    select_future *sf = moor_container_of(fut, select_future, base);
    moor_cx inner = {cx->waker, &sf->claim, NULL};
    long win = -1;
    for (size_t i = 0; i < sf->n && win < 0; i++) {
        moor_future *f = sf->futs[i];
        inner.slot = f; /* what f (or a future it wraps) claims the select for */
        if (moor__future_done(f)) {
            /* Done before the select began, or a non-taking future that finished while
             * another won: the first is ready now, the second has lost. */
            if (!sf->claim.claimed) {
                sf->claim.claimed = 1;
                sf->claim.winner = f;
            }
            if (sf->claim.winner == f)
                win = (long)i;
            continue;
        }
        if (moor_future_poll(f, &inner) == MOOR_READY) {
            if (!sf->claim.claimed) { /* a future that takes nothing won: close the select */
                sf->claim.claimed = 1;
                sf->claim.winner = f;
            }
            if (sf->claim.winner == f)
                win = (long)i;
        }
    }
    if (win < 0 && expired(sf->deadline)) {
        sf->claim.claimed = 1; /* nothing may complete from here on */
        win = cancel_all_but(sf, -1);
        disarm(&sf->node);
        fut->result = win >= 0 ? win : -ETIMEDOUT;
        return MOOR_READY;
    }
    if (win >= 0) {
        cancel_all_but(sf, win);
        disarm(&sf->node);
        fut->result = win;
        return MOOR_READY;
    }
    if (arm(&sf->node, sf->deadline, cx) < 0) {
        sf->claim.claimed = 1;
        win = cancel_all_but(sf, -1);
        fut->result = win >= 0 ? win : -ENOMEM;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static moor_poll select_cancel(moor_future *fut)
{
    select_future *sf = moor_container_of(fut, select_future, base);
    disarm(&sf->node);
    sf->claim.claimed = 1;
    long win = cancel_all_but(sf, -1);
    if (win < 0) {
        sf->claim = (moor_claim){0, NULL};
        return MOOR_PENDING;
    }
    fut->result = win; /* one of them had completed: report it rather than lose it */
    return MOOR_READY;
}

static const moor_future_ops select_ops = {"select", select_poll, select_cancel};

int moor_select(moor_future **futs, size_t n, int64_t deadline)
{
    moor__assert(n > 0 && futs, "moor_select: no futures");
    select_future sf;
    moor_future_init(&sf.base, &select_ops, 0);
    sf.futs = futs;
    sf.n = n;
    sf.deadline = deadline;
    sf.claim = (moor_claim){0, NULL};
    moor__timer_node_init(&sf.node);
    return (int)moor__wait(&sf.base);
}

intptr_t moor_race(moor_future **futs, size_t n, size_t *winner, int64_t deadline)
{
    int i = moor_select(futs, n, deadline);
    if (i < 0)
        return i;
    if (winner)
        *winner = (size_t)i;
    return futs[i]->result;
}

intptr_t moor_timeout(moor_future *fut, int64_t deadline)
{
    int i = moor_select(&fut, 1, deadline);
    return i < 0 ? i : fut->result;
}

/* ---- a fiber's join with a deadline ------------------------------------------------------ */

int moor_join_deadline(moor_fiber *f, intptr_t *result, int64_t deadline)
{
    moor_future *done = moor_fiber_future(f); /* checks the handle */
    int rc = moor_select(&done, 1, deadline);
    if (rc >= 0)
        return moor_join(f, result);
    /* Out of time, or the caller was cancelled (or no room for the timer): the child is
     * cancelled too, and reaped. */
    moor_cancel(f);
    (void)moor_join(f, result);
    return rc;
}

/* ---- join_all ---------------------------------------------------------------------------- */

typedef struct join_all_future {
    moor_future base;
    moor_future **futs;
    size_t n;
    int64_t deadline;
    moor_timer_node node;
} join_all_future;

static void cancel_pending(moor_future **futs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (futs[i]->state == MOOR__FUTURE_PENDING)
            (void)moor_future_cancel(futs[i]); /* a completed one keeps its output */
}

static moor_poll join_all_poll(moor_future *fut, moor_cx *cx)
{
    join_all_future *jf = moor_container_of(fut, join_all_future, base);
    moor_cx inner = {cx->waker, NULL, NULL};
    size_t left = 0;
    for (size_t i = 0; i < jf->n; i++)
        if (!moor__future_done(jf->futs[i]) &&
            moor_future_poll(jf->futs[i], &inner) == MOOR_PENDING)
            left++;
    if (left == 0 || expired(jf->deadline)) {
        disarm(&jf->node);
        if (left)
            cancel_pending(jf->futs, jf->n);
        fut->result = left ? -ETIMEDOUT : 0;
        return MOOR_READY;
    }
    if (arm(&jf->node, jf->deadline, cx) < 0) {
        cancel_pending(jf->futs, jf->n);
        fut->result = -ENOMEM;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static moor_poll join_all_cancel(moor_future *fut)
{
    join_all_future *jf = moor_container_of(fut, join_all_future, base);
    disarm(&jf->node);
    cancel_pending(jf->futs, jf->n);
    return MOOR_PENDING;
}

static const moor_future_ops join_all_ops = {"join all", join_all_poll, join_all_cancel};

int moor_join_all(moor_future **futs, size_t n, int64_t deadline)
{
    join_all_future jf;
    moor_future_init(&jf.base, &join_all_ops, 0);
    jf.futs = futs;
    jf.n = n;
    jf.deadline = deadline;
    moor__timer_node_init(&jf.node);
    return (int)moor__wait(&jf.base);
}

/* ---- retry ------------------------------------------------------------------------------- */

#define BACKOFF_MAX_MS (60 * 1000)

static moor_poll retry_poll(moor_future *fut, moor_cx *cx)
{
    moor_retry_future *rf = moor_container_of(fut, moor_retry_future, base);
    for (;;) {
        if (expired(rf->deadline)) {
            if (rf->current && moor_future_cancel(rf->current) == MOOR_READY &&
                rf->current->result >= 0) {
                fut->result = rf->current->result; /* it made it after all */
            } else {
                fut->result = -ETIMEDOUT;
            }
            if (rf->pausing)
                moor_future_cancel(&rf->pause.base);
            disarm(&rf->node);
            return MOOR_READY;
        }
        if (rf->current) {
            if (moor_future_poll(rf->current, cx) == MOOR_PENDING)
                break;
            intptr_t r = rf->current->result;
            rf->current = NULL;
            if (r >= 0 || rf->attempt >= rf->attempts) {
                disarm(&rf->node);
                fut->result = r;
                return MOOR_READY;
            }
            int64_t delay = rf->backoff_ms;
            for (unsigned i = 1; i < rf->attempt && delay < BACKOFF_MAX_MS; i++)
                delay *= 2;
            moor_sleep_init(&rf->pause, moor_now() + (delay < BACKOFF_MAX_MS ? delay : BACKOFF_MAX_MS));
            rf->pausing = 1;
        }
        if (rf->pausing) {
            if (moor_future_poll(&rf->pause.base, cx) == MOOR_PENDING)
                break;
            rf->pausing = 0;
        }
        rf->attempt++;
        rf->current = rf->make(rf->arg, rf->attempt);
        if (!rf->current) {
            disarm(&rf->node);
            fut->result = -ENOMEM;
            return MOOR_READY;
        }
    }
    if (arm(&rf->node, rf->deadline, cx) < 0) {
        if (rf->current)
            moor_future_cancel(rf->current);
        if (rf->pausing)
            moor_future_cancel(&rf->pause.base);
        fut->result = -ENOMEM;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static moor_poll retry_cancel(moor_future *fut)
{
    moor_retry_future *rf = moor_container_of(fut, moor_retry_future, base);
    disarm(&rf->node);
    if (rf->pausing) {
        moor_future_cancel(&rf->pause.base);
        rf->pausing = 0;
    }
    if (rf->current && moor_future_cancel(rf->current) == MOOR_READY &&
        rf->current->result >= 0) {
        fut->result = rf->current->result;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static const moor_future_ops retry_ops = {"retry", retry_poll, retry_cancel};

void moor_retry_init(moor_retry_future *rf, moor_retry_make make, void *arg, unsigned attempts,
                     int64_t backoff_ms, int64_t deadline)
{
    moor__assert(make && attempts > 0, "moor_retry_init: needs a make function and attempts > 0");
    moor_future_init(&rf->base, &retry_ops, 0);
    rf->make = make;
    rf->arg = arg;
    rf->attempts = attempts;
    rf->attempt = 0;
    rf->backoff_ms = backoff_ms > 0 ? backoff_ms : 0;
    rf->deadline = deadline;
    rf->current = NULL;
    rf->pausing = 0;
    moor__timer_node_init(&rf->node);
}

intptr_t moor_retry(moor_retry_make make, void *arg, unsigned attempts, int64_t backoff_ms,
                    int64_t deadline)
{
    moor_retry_future rf;
    moor_retry_init(&rf, make, arg, attempts, backoff_ms, deadline);
    return moor__wait(&rf.base);
}
