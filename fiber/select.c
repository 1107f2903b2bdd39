/* moor_select and the combinators built from the same pieces: race, join_all, timeout, retry,
 * and a fiber's join with a deadline. Each is a future over caller-owned futures, polled with
 * the waker of whoever polls it, so it works from a fiber (await) and from plain code
 * (block_on) alike. */
#include <errno.h>

#include "assert.h"
#include "dump.h"
#include "future.h"
#include "wait.h"

/* ---- select ------------------------------------------------------------------------------ */

int moor_cx_claim(const moor_cx *cx) { return moor__claim(cx); }

typedef struct select_future {
    moor_future base;
    moor_future **futs;
    size_t n;
    struct moor__claim claim;
    moor__deadline deadline;
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

/* Poll every future (each registers its own wake-up); the first ready one whose slot holds
 * the claim wins, and the others are cancelled. */
MOOR__WAIT_OP int select_ready(moor_future *fut, moor_cx *cx)
{
    select_future *sf = moor_container_of(fut, select_future, base);
    moor_cx inner = {cx->waker, &sf->claim, NULL};
    long win = -1;
    for (size_t i = 0; i < sf->n && win < 0; i++) {
        moor_future *f = sf->futs[i];
        inner.slot = f; /* what f (or a future it wraps) claims the select for */
        /* Done before the select began, or ready now. A future that takes nothing never
         * claimed: its being ready claims the select now, unless another won first. */
        if ((moor__future_done(f) || moor_future_poll(f, &inner) == MOOR_READY) &&
            moor__claim_slot(&sf->claim, f, 1))
            win = (long)i;
    }
    if (win < 0)
        return 0;
    cancel_all_but(sf, win);
    fut->result = win;
    return 1;
}

MOOR__WAIT_OP int select_park(moor_future *fut, moor_cx *cx)
{
    (void)fut;
    (void)cx;
    return 0; /* its futures registered themselves when select_ready polled them */
}

/* Give up: nothing may complete from here on. One of them may have completed in the
 * meantime (a cancel reports it): that one wins rather than its value being lost. */
MOOR__WAIT_OP int select_unpark(moor_future *fut)
{
    select_future *sf = moor_container_of(fut, select_future, base);
    sf->claim.claimed = 1;
    long win = cancel_all_but(sf, -1);
    if (win < 0) {
        sf->claim = (struct moor__claim){0, NULL}; /* as fresh, if polled again */
        return 0;
    }
    fut->result = win;
    return 1;
}

static const moor__wait_ops select_wait = {select_ready, select_park, select_unpark, -ETIMEDOUT};

static moor_poll select_poll(moor_future *fut, moor_cx *cx)
{
    select_future *sf = moor_container_of(fut, select_future, base);
    return moor__wait_poll(fut, &sf->deadline, cx, &select_wait);
}

static moor_poll select_cancel(moor_future *fut)
{
    select_future *sf = moor_container_of(fut, select_future, base);
    return moor__wait_cancel(fut, &sf->deadline, &select_wait);
}

static const moor_future_ops select_ops = {"select", select_poll, select_cancel};

/* Local if every future still pending is: then only tasks of this executor can end it (a
 * deadline of its own is a timer, which the executor sees for itself). */
static int all_local(moor_future *const *futs, size_t n)
{
    size_t pending = 0;
    for (size_t i = 0; i < n; i++) {
        if (futs[i]->state != MOOR__FUTURE_PENDING)
            continue;
        if (moor__future_describe(futs[i], NULL, 0) != MOOR_WAIT_LOCAL)
            return 0;
        pending++;
    }
    return pending > 0; /* none pending: it is about to complete, not stuck */
}

/* "select (3)" */
static int select_describe(const moor_future *fut, char *buf, size_t size)
{
    const select_future *sf = moor_container_of(fut, select_future, base);
    moor__fmt out = moor__fmt_init(buf, size);
    moor__fmt_str(&out, "select (");
    moor__fmt_u64(&out, sf->n);
    moor__fmt_str(&out, ")");
    return all_local(sf->futs, sf->n) ? MOOR_WAIT_LOCAL : 0;
}

static moor_future_kind select_kind = {&select_ops, select_describe, NULL};

__attribute__((constructor)) static void select_kind_register(void)
{
    moor_future_kind_register(&select_kind);
}

int moor_select(moor_future **futs, size_t n, int64_t deadline)
{
    moor__assert(n > 0 && futs, "moor_select: no futures");
    select_future sf;
    moor_future_init(&sf.base, &select_ops, 0);
    sf.futs = futs;
    sf.n = n;
    sf.claim = (struct moor__claim){0, NULL};
    moor__deadline_init(&sf.deadline, deadline);
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

intptr_t moor_await_deadline(moor_future *fut, int64_t deadline)
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
    moor__deadline deadline;
} join_all_future;

MOOR__WAIT_OP int join_all_ready(moor_future *fut, moor_cx *cx)
{
    join_all_future *jf = moor_container_of(fut, join_all_future, base);
    /* Their completions are not wins of any select this one is in: no claim. */
    moor_cx inner = {cx->waker, NULL, NULL};
    size_t left = 0;
    for (size_t i = 0; i < jf->n; i++)
        if (!moor__future_done(jf->futs[i]) &&
            moor_future_poll(jf->futs[i], &inner) == MOOR_PENDING)
            left++;
    if (left)
        return 0;
    fut->result = 0;
    return 1;
}

MOOR__WAIT_OP int join_all_park(moor_future *fut, moor_cx *cx)
{
    (void)fut;
    (void)cx;
    return 0; /* each pending future registered itself when join_all_ready polled it */
}

MOOR__WAIT_OP int join_all_unpark(moor_future *fut)
{
    join_all_future *jf = moor_container_of(fut, join_all_future, base);
    for (size_t i = 0; i < jf->n; i++)
        if (jf->futs[i]->state == MOOR__FUTURE_PENDING)
            (void)moor_future_cancel(jf->futs[i]); /* a completed one keeps its output */
    return 0;
}

static const moor__wait_ops join_all_wait = {join_all_ready, join_all_park, join_all_unpark, -ETIMEDOUT};

static moor_poll join_all_poll(moor_future *fut, moor_cx *cx)
{
    join_all_future *jf = moor_container_of(fut, join_all_future, base);
    return moor__wait_poll(fut, &jf->deadline, cx, &join_all_wait);
}

static moor_poll join_all_cancel(moor_future *fut)
{
    join_all_future *jf = moor_container_of(fut, join_all_future, base);
    return moor__wait_cancel(fut, &jf->deadline, &join_all_wait);
}

static const moor_future_ops join_all_ops = {"join all", join_all_poll, join_all_cancel};

/* "await_all (3)" */
static int join_all_describe(const moor_future *fut, char *buf, size_t size)
{
    const join_all_future *jf = moor_container_of(fut, join_all_future, base);
    moor__fmt out = moor__fmt_init(buf, size);
    moor__fmt_str(&out, "await_all (");
    moor__fmt_u64(&out, jf->n);
    moor__fmt_str(&out, ")");
    return all_local(jf->futs, jf->n) ? MOOR_WAIT_LOCAL : 0;
}

static moor_future_kind join_all_kind = {&join_all_ops, join_all_describe, NULL};

__attribute__((constructor)) static void join_all_kind_register(void)
{
    moor_future_kind_register(&join_all_kind);
}

int moor_await_all(moor_future **futs, size_t n, int64_t deadline)
{
    join_all_future jf;
    moor_future_init(&jf.base, &join_all_ops, 0);
    jf.futs = futs;
    jf.n = n;
    moor__deadline_init(&jf.deadline, deadline);
    return (int)moor__wait(&jf.base);
}

/* ---- retry ------------------------------------------------------------------------------- */

#define BACKOFF_MAX_MS (60 * 1000)

/* Drive attempts and backoffs until one ends it (1) or one is pending (0). Past the deadline
 * it starts nothing new: the wait skeleton then gives up (retry_unpark). */
MOOR__WAIT_OP int retry_ready(moor_future *fut, moor_cx *cx)
{
    moor_retry_future *rf = moor_container_of(fut, moor_retry_future, base);
    for (;;) {
        if (rf->current) {
            if (moor_future_poll(rf->current, cx) == MOOR_PENDING)
                return 0;
            intptr_t r = rf->current->result;
            rf->current = NULL;
            if (r >= 0 || rf->attempt >= rf->attempts) {
                fut->result = r;
                return 1;
            }
            int64_t delay = rf->backoff_ms;
            for (unsigned i = 1; i < rf->attempt && delay < BACKOFF_MAX_MS; i++)
                delay *= 2;
            moor_sleep_init(&rf->pause, moor_now() + (delay < BACKOFF_MAX_MS ? delay : BACKOFF_MAX_MS));
            rf->pausing = 1;
        }
        if (rf->pausing) {
            if (moor_future_poll(&rf->pause.base, cx) == MOOR_PENDING)
                return 0;
            rf->pausing = 0;
        }
        if (moor__deadline_passed(&rf->deadline))
            return 0;
        rf->attempt++;
        rf->current = rf->make(rf->arg, rf->attempt);
        if (!rf->current) {
            fut->result = -ENOMEM;
            return 1;
        }
    }
}

MOOR__WAIT_OP int retry_park(moor_future *fut, moor_cx *cx)
{
    (void)fut;
    (void)cx;
    return 0; /* the attempt or the backoff in flight registered itself */
}

/* Give up on the attempt in flight, unless it made it after all. */
MOOR__WAIT_OP int retry_unpark(moor_future *fut)
{
    moor_retry_future *rf = moor_container_of(fut, moor_retry_future, base);
    if (rf->pausing) {
        moor_future_cancel(&rf->pause.base);
        rf->pausing = 0;
    }
    moor_future *current = rf->current;
    rf->current = NULL;
    if (current && moor_future_cancel(current) == MOOR_READY && current->result >= 0) {
        fut->result = current->result;
        return 1;
    }
    return 0;
}

static const moor__wait_ops retry_wait = {retry_ready, retry_park, retry_unpark, -ETIMEDOUT};

static moor_poll retry_poll(moor_future *fut, moor_cx *cx)
{
    moor_retry_future *rf = moor_container_of(fut, moor_retry_future, base);
    return moor__wait_poll(fut, &rf->deadline, cx, &retry_wait);
}

static moor_poll retry_cancel(moor_future *fut)
{
    moor_retry_future *rf = moor_container_of(fut, moor_retry_future, base);
    return moor__wait_cancel(fut, &rf->deadline, &retry_wait);
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
    rf->current = NULL;
    rf->pausing = 0;
    moor__deadline_init(&rf->deadline, deadline);
}

intptr_t moor_retry(moor_retry_make make, void *arg, unsigned attempts, int64_t backoff_ms,
                    int64_t deadline)
{
    moor_retry_future rf;
    moor_retry_init(&rf, make, arg, attempts, backoff_ms, deadline);
    return moor__wait(&rf.base);
}
