#include "fiber.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "assert.h"

static const char *label_of(const moor_future *fut)
{
    return fut->ops && fut->ops->label ? fut->ops->label : "?";
}

/* ---- running and stopping ------------------------------------------------------------ */

static void fiber_release(moor_executor *ex, moor_fiber *f);

void moor__fiber_reap(moor_executor *ex)
{
    moor_fiber *f = ex->zombie;
    ex->zombie = NULL;
    fiber_release(ex, f);
}

static transfer_t fiber_entry(transfer_t t)
{
    moor_executor *ex = moor__tls_executor;
    moor_fiber *f = ex->current;
    moor__switch_arrived(t, &f->ctx);
    if (ex->zombie)
        moor__fiber_reap(ex);
    if (f->remote) {
        f->remote = 0;
        moor__remote_started(ex);
    }
    f->result = f->fn(f->arg);
    moor__assert(f->open_scopes == 0,
                 "fiber %" PRIu64 " \"%s\" returned with %zu scope(s) still open: close them "
                 "(moor_scope_close) so that no child is forgotten",
                 f->id, moor_fiber_name(f), f->open_scopes);
    if (f->scope)
        moor__scope_child_done(f);

    /* The poll adapter's READY: finish the task, hand the result to the joiner. */
    f->state = MOOR__FIBER_DONE;
    ex->ntasks--; /* moor__task_finish, for a fiber's task */
    f->task.gen = 0;
    f->task.state = MOOR__TASK_FREE;
    if (f->detached) {
        ex->zombie = f; /* not released here: we are still running on its stack */
    } else {
        moor_waker joiner = f->joiner;
        moor__wake(&joiner);
    }
    moor__switch_final(&f->ctx, moor__fiber_next(ex));
}

/* ---- join future ----------------------------------------------------------------------- */

static moor_poll join_poll(moor_future *fut, moor_cx *cx)
{
    moor_fiber *f = moor_container_of(fut, moor_fiber, join_fut);
    if (f->state == MOOR__FIBER_DONE) {
        fut->result = f->result;
        f->joiner = (moor_waker){0};
        return MOOR_READY;
    }
    f->joiner = cx->waker;
    return MOOR_PENDING;
}

static moor_poll join_cancel(moor_future *fut)
{
    moor_fiber *f = moor_container_of(fut, moor_fiber, join_fut);
    f->joiner = (moor_waker){0};
    return MOOR_PENDING; /* the fiber stays joinable: nothing is lost */
}

static const moor_future_ops join_ops = {"join", join_poll, join_cancel};

/* ---- lifecycle ------------------------------------------------------------------------- */

static void list_unlink(moor_executor *ex, moor_fiber *f)
{
    if (f->prev)
        f->prev->next = f->next;
    else
        ex->fibers = f->next;
    if (f->next)
        f->next->prev = f->prev;
}

static void fiber_release(moor_executor *ex, moor_fiber *f)
{
    list_unlink(ex, f);
#ifdef MOOR_TSAN_FIBERS
    __tsan_destroy_fiber(f->ctx.tsan_fiber);
#endif
    f->state = MOOR__FIBER_FREE;
    moor__stack_put(&ex->pool, f->stack_base, f->map_size);
}

/* moor_spawn's body, inlined there (the hot path) and into moor__fiber_spawn. */
static inline __attribute__((always_inline)) int
fiber_spawn(moor_executor *ex, moor_fiber **out, moor_fiber_fn fn, void *arg,
            const moor_fiber_attr *attr, int detached)
{
    size_t size = ex->stack_size;
    size_t map_size = ex->stack_map_size;
    if (attr && attr->stack_size) {
        size_t page = moor__page_size();
        /* Rounding and the mapping's sum must not wrap to a small stack. */
        if (attr->stack_size > SIZE_MAX / 2 - ex->pool.guard - 4 * page)
            return -EINVAL;
        size = (attr->stack_size + page - 1) & ~(page - 1);
        map_size = moor__fiber_map_size(ex, size);
    }
    char *base;
    int rc = moor__stack_get(&ex->pool, map_size, &base);
    if (rc < 0)
        return rc;

    /* The control block at the very top; the stack grows down from just below it. Every
     * field is set here (a pooled stack holds the previous fiber's values). */
    moor_fiber *f = (moor_fiber *)(base + map_size - MOOR__FIBER_CTL_SIZE);
    f->ex = ex;
    f->fn = fn;
    f->arg = arg;
    f->result = 0;
    f->joiner = (moor_waker){0};
    f->stack_base = base;
    f->map_size = map_size;
    f->stack_size = size;
    f->id = ex->next_fiber_id++;
    f->state = MOOR__FIBER_LIVE;
    f->detached = (uint8_t)detached;
    f->join_claimed = 0;
    f->cancelled = 0;
    f->remote = 0;
    f->budget = MOOR__COOP_BUDGET;
    f->scope = NULL;
    f->open_scopes = 0;
    f->name[0] = '\0'; /* empty: the default name, "fiber" (moor_fiber_name) */
    if (attr && attr->name) {
        size_t len = 0;
        while (len < sizeof f->name - 1 && attr->name[len]) {
            f->name[len] = attr->name[len];
            len++;
        }
        f->name[len] = '\0';
    }

    char *lo = base + ex->pool.guard;
#ifdef MOOR_ASAN_FIBERS
    {
        /* A previous fiber's frames that never returned left their redzones poisoned, and
         * this fiber's locals would look like overflows. Those are its first frames and its
         * last switch, at the top of the stack (every deeper frame returned): clearing the
         * top is enough, and touches 2 KiB of shadow rather than the whole stack's. */
        size_t top = (size_t)((char *)f - lo) < 16384 ? (size_t)((char *)f - lo) : 16384;
        __asan_unpoison_memory_region((char *)f - top, top);
    }
#endif
    moor__ctx_make(&f->ctx, lo, (size_t)((char *)f - lo), fiber_entry);
#ifdef MOOR_TSAN_FIBERS
    f->ctx.tsan_fiber = __tsan_create_fiber(0);
#endif
    f->join_fut = (moor_future){.ops = &join_ops}; /* moor_future_init, inline */

    f->prev = NULL;
    f->next = ex->fibers;
    if (ex->fibers)
        ex->fibers->prev = f;
    ex->fibers = f;

    f->task.kind = MOOR__TASK_FIBER; /* its task is in the control block: no allocation */
    moor__task_start(ex, &f->task, NULL);
    *out = f;
    return 0;
}

int moor_spawn(moor_fiber **out, moor_fiber_fn fn, void *arg, const moor_fiber_attr *attr)
{
    moor_executor *ex = moor__tls_executor;
    moor__assert(ex, "moor_spawn: no executor on this thread (call moor_executor_new first)");
    moor__assert(fn, "moor_spawn: fn is NULL");
    moor_fiber *f;
    int rc = fiber_spawn(ex, &f, fn, arg, attr, out == NULL);
    if (rc == 0 && out)
        *out = f;
    return rc;
}

int moor__fiber_spawn(moor_executor *ex, moor_fiber **out, moor_fiber_fn fn, void *arg,
                      const moor_fiber_attr *attr, int detached)
{
    return fiber_spawn(ex, out, fn, arg, attr, detached);
}

void moor__fibers_release_all(moor_executor *ex)
{
    while (ex->fibers)
        fiber_release(ex, ex->fibers);
}

static void check_handle(const moor_fiber *f, const char *what)
{
    moor__assert(f && f->state != MOOR__FIBER_FREE,
                 "%s: fiber %p was already joined (or is not a fiber)", what, (const void *)f);
    moor__assert(f->ex == moor__tls_executor, "%s: fiber %" PRIu64 " belongs to another thread",
                 what, f->id);
}

static int fiber_is_done(const void *f)
{
    return ((const moor_fiber *)f)->state == MOOR__FIBER_DONE;
}

int moor_join(moor_fiber *f, intptr_t *result)
{
    check_handle(f, "moor_join");
    moor__assert(!f->detached, "moor_join: fiber %" PRIu64 " \"%s\" is detached", f->id, moor_fiber_name(f));
    moor__assert(!f->join_claimed, "moor_join: fiber %" PRIu64 " \"%s\" joined twice", f->id,
                 moor_fiber_name(f));
    moor__assert(f != f->ex->current, "moor_join: fiber %" PRIu64 " \"%s\" joins itself", f->id,
                 moor_fiber_name(f));
    f->join_claimed = 1;
    moor_fiber *self = f->ex->current;
    if (f->state != MOOR__FIBER_DONE && self) {
        /* What awaiting join_fut would do, without the generic poll around it. Not cut
         * short by cancellation: a cancelled fiber must still be able to reap its children. */
        while (f->state != MOOR__FIBER_DONE) {
            f->joiner = (moor_waker){f->ex, &self->task, self->task.gen};
            moor__fiber_suspend(self);
        }
        f->joiner = (moor_waker){0};
    } else if (f->state != MOOR__FIBER_DONE) {
        /* From plain code: run the executor until the fiber has returned. Not a block_on of
         * join_fut, which would need a task slot, and so could fail for want of memory. */
        moor__assert(!f->ex->running, "moor_join from inside a poll: the executor is running");
        moor__executor_run_until(f->ex, fiber_is_done, f);
    }
    if (result)
        *result = f->result;
    int rc = f->cancelled ? -ECANCELED : 0;
    fiber_release(f->ex, f);
    return rc;
}

moor_future *moor_fiber_future(moor_fiber *f)
{
    check_handle(f, "moor_fiber_future");
    moor__assert(!f->detached, "moor_fiber_future: fiber %" PRIu64 " \"%s\" is detached", f->id,
                 moor_fiber_name(f));
    return &f->join_fut;
}

intptr_t moor_await(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    moor_fiber *f = ex ? ex->current : NULL;
    moor__assert(f, "moor_await(\"%s\") called outside a fiber; plain code uses moor_block_on",
                 label_of(fut));
    moor_cx cx = {{ex, &f->task, f->task.gen}, NULL, NULL};
    if (moor_future_poll(fut, &cx) == MOOR_READY) {
        moor__coop_spend(); /* ready at once: it counts against the budget */
        return fut->result;
    }
    for (;;) {
        /* Polled before the cancel is looked at: a result that is there without waiting is
         * returned even in a cancelled fiber, as is a wait that completed before the cancel
         * arrived (its cancel op reports it). */
        if (__builtin_expect(f->cancelled, 0))
            return moor_future_cancel(fut) == MOOR_READY ? fut->result : -ECANCELED;
        moor__fiber_suspend(f);
        if (moor_future_poll(fut, &cx) == MOOR_READY)
            return fut->result;
    }
}

int moor__fiber_wait_completion(moor_fiber *f, const int *completed, const intptr_t *result,
                                int64_t deadline, moor_timer_node *node,
                                void (*unlink)(void *arg), void *arg, int cancellable)
{
    moor_executor *ex = f->ex;
    if (deadline >= 0) {
        moor_waker self = {ex, &f->task, f->task.gen};
        if (moor__timer_add(&ex->timers, node, deadline, &self) < 0) {
            unlink(arg);
            return -ENOMEM;
        }
    }
    for (;;) {
        if (cancellable && f->cancelled) {
            unlink(arg);
            break;
        }
        moor__fiber_suspend(f);
        if (*completed)
            break;
        if (deadline >= 0 && moor_now() >= deadline) {
            unlink(arg);
            break;
        }
    }
    if (moor__timer_node_queued(node))
        moor__timer_remove(&ex->timers, node);
    if (*completed)
        return (int)*result; /* even when cancelled or late: it happened, do not lose it */
    return cancellable && f->cancelled ? -ECANCELED : -ETIMEDOUT;
}

intptr_t moor__wait(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    return ex && ex->current ? moor_await(fut) : moor_block_on(fut);
}

intptr_t moor__wait_uncancellable(moor_future *fut)
{
    moor_executor *ex = moor__tls_executor;
    moor_fiber *f = ex ? ex->current : NULL;
    if (!f)
        return moor_block_on(fut);
    moor_cx cx = {{ex, &f->task, f->task.gen}, NULL, NULL};
    while (moor_future_poll(fut, &cx) == MOOR_PENDING)
        moor__fiber_suspend(f);
    return fut->result;
}

void moor_cancel(moor_fiber *f)
{
    check_handle(f, "moor_cancel");
    if (f->state != MOOR__FIBER_LIVE || f->cancelled)
        return;
    f->cancelled = 1;
    /* Wake it so that the wait it is in sees the flag. */
    moor_waker w = {f->ex, &f->task, f->task.gen};
    moor_waker_wake(&w);
}

int moor_cancelled(void)
{
    moor_fiber *f = moor_self();
    return f && f->cancelled;
}

void moor__coop_yield(moor_executor *ex)
{
    moor_fiber *f = ex->current;
    if (f) {
        f->budget = MOOR__COOP_BUDGET;
        f->task.state = MOOR__TASK_NOTIFIED; /* to the back of the run queue */
        moor__fiber_suspend(f);
        return;
    }
    ex->plain_budget = MOOR__COOP_BUDGET;
    if (!ex->running)
        moor__executor_turn(ex);
}

void moor_yield(void)
{
    moor_executor *ex = moor__tls_executor;
    moor_fiber *f = ex ? ex->current : NULL;
    moor__assert(f, "moor_yield called outside a fiber");
    /* Woken while running: the executor puts it at the back of the run queue. */
    f->task.state = MOOR__TASK_NOTIFIED;
    moor__fiber_suspend(f);
}

moor_fiber *moor_self(void)
{
    moor_executor *ex = moor__tls_executor;
    return ex ? ex->current : NULL;
}

uint64_t moor_fiber_id(const moor_fiber *f) { return f->id; }

const char *moor_fiber_name(const moor_fiber *f) { return f->name[0] ? f->name : "fiber"; }
