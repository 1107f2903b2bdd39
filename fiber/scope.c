/* Scopes: a list of running children, released as they return; closing cancels what is
 * left and waits for the list to empty. */
#include <errno.h>
#include <inttypes.h>

#include "assert.h"
#include "fiber.h"
#include "timer.h"
#include "waitq.h"

void moor_scope_init(moor_scope *scope)
{
    scope->ex = moor__tls_executor;
    scope->children = NULL;
    scope->count = 0;
    scope->waiters = (moor_waitq){NULL, NULL};
    scope->owner = moor_self();
    scope->closed = 0;
    if (scope->owner)
        scope->owner->open_scopes++;
}

int moor_scope_spawn(moor_scope *scope, moor_fiber_fn fn, void *arg, const moor_fiber_attr *attr)
{
    moor__owner_check(&scope->ex, "moor_scope_spawn");
    moor__assert(scope->closed <= 0, "moor_scope_spawn: the scope is closed");
    moor_fiber *f;
    int rc = moor_spawn(&f, fn, arg, attr);
    if (rc < 0)
        return rc;
    f->detached = 1; /* the scope, not a join, is what keeps track of it */
    f->scope = scope;
    f->scope_prev = NULL;
    f->scope_next = scope->children;
    if (scope->children)
        scope->children->scope_prev = f;
    scope->children = f;
    scope->count++;
    if (scope->closed < 0) /* being closed: it starts cancelled, so the close can finish */
        moor_cancel(f);
    return 0;
}

/* A future that is ready once the scope has no running child. The scope completes its
 * waiters itself (takes them off its queue and sets their result) rather than only waking
 * them: the scope may be gone by the time a woken waiter runs. */
typedef struct empty_future {
    moor_future base;
    moor_scope *scope;
    int64_t deadline;
    int completed;        /* the scope took it off its queue; result set */
    moor_waiter waiter;
    moor_timer_node node;
} empty_future;

static void complete_waiters(moor_scope *scope, intptr_t result)
{
    moor_waiter *w;
    while ((w = moor__waitq_take(&scope->waiters, NULL))) {
        empty_future *ef = moor_container_of(w, empty_future, waiter);
        ef->completed = 1;
        ef->base.result = result;
        moor__wake(&w->waker);
    }
}

void moor__scope_child_done(moor_fiber *f)
{
    moor_scope *scope = f->scope;
    if (f->scope_prev)
        f->scope_prev->scope_next = f->scope_next;
    else
        scope->children = f->scope_next;
    if (f->scope_next)
        f->scope_next->scope_prev = f->scope_prev;
    f->scope = NULL;
    if (--scope->count == 0)
        complete_waiters(scope, 0);
}

static moor_poll empty_poll(moor_future *fut, moor_cx *cx)
{
    empty_future *ef = moor_container_of(fut, empty_future, base);
    moor_executor *ex = cx->waker.ex;
    if (ef->completed) {
        moor__timer_remove(&ex->timers, &ef->node);
        return MOOR_READY; /* result set by the scope */
    }
    if (ef->scope->count == 0 || (ef->deadline >= 0 && moor_now() >= ef->deadline)) {
        moor__timer_remove(&ex->timers, &ef->node);
        moor__waitq_remove(&ef->scope->waiters, &ef->waiter);
        fut->result = ef->scope->count == 0 ? 0 : -ETIMEDOUT;
        return MOOR_READY;
    }
    moor__waitq_park(&ef->scope->waiters, &ef->waiter, cx);
    if (moor__timer_arm(&ex->timers, &ef->node, ef->deadline, &cx->waker) < 0)
        ef->deadline = moor_now(); /* cannot time the wait: give up at the next poll */
    return MOOR_PENDING;
}

static moor_poll empty_cancel(moor_future *fut)
{
    empty_future *ef = moor_container_of(fut, empty_future, base);
    moor__timer_remove(&moor__tls_executor->timers, &ef->node);
    if (ef->completed)
        return MOOR_READY;
    moor__waitq_remove(&ef->scope->waiters, &ef->waiter);
    return MOOR_PENDING;
}

static const moor_future_ops empty_ops = {"scope", empty_poll, empty_cancel};

static int wait_empty(moor_scope *scope, int64_t deadline, int cancellable)
{
    if (scope->count == 0)
        return 0;
    empty_future ef;
    moor_future_init(&ef.base, &empty_ops, 0);
    ef.scope = scope;
    ef.deadline = deadline;
    ef.completed = 0;
    ef.waiter.queued = 0;
    moor__timer_node_init(&ef.node);
    return (int)(cancellable ? moor__wait(&ef.base) : moor__wait_uncancellable(&ef.base));
}

int moor_scope_wait(moor_scope *scope, int64_t deadline)
{
    moor__owner_check(&scope->ex, "moor_scope_wait");
    return wait_empty(scope, deadline, 1);
}

int moor_scope_close(moor_scope *scope, int64_t deadline)
{
    moor__owner_check(&scope->ex, "moor_scope_close");
    moor__assert(!scope->closed, "moor_scope_close: the scope is already closed");
    scope->closed = -1; /* closing: children spawned from now on start cancelled */
    for (moor_fiber *f = scope->children; f; f = f->scope_next)
        moor_cancel(f);
    int rc = wait_empty(scope, deadline, 0);
    if (rc < 0) {
        /* Still running at the deadline: they are cancelled, detached and released when
         * they return; the scope lets go of them, and of the fibers waiting for them. */
        for (moor_fiber *f = scope->children; f; f = f->scope_next)
            f->scope = NULL;
        scope->children = NULL;
        scope->count = 0;
        complete_waiters(scope, -EPIPE);
    }
    scope->closed = 1;
    if (scope->owner) {
        moor__assert(scope->owner->open_scopes > 0, "moor_scope_close: scope bookkeeping broken");
        scope->owner->open_scopes--;
    }
    return rc;
}
