/* Scopes: a list of running children, released as they return; closing cancels what is
 * left and waits for the list to empty. The scope hears of a child's return through the
 * child's exit hook, so it never writes a fiber's fields. */
#include <errno.h>

#include "assert.h"
#include "dump.h"
#include "wait.h"

void moor_scope_init(moor_scope *scope)
{
    scope->ex = moor__tls_executor;
    scope->children = (moor__list){NULL, NULL};
    scope->count = 0;
    scope->waiters = (moor__list){NULL, NULL};
    scope->owner = moor__self();
    scope->closed = 0;
    if (scope->owner)
        moor__fiber_scopes(scope->owner, +1);
}

/* A future that is ready once the scope has no running child. The scope completes its
 * waiters itself (takes them off its queue and sets their result) rather than only waking
 * them: the scope may be gone by the time a woken waiter runs. */
typedef struct empty_future {
    moor_future base;
    moor_scope *scope;
    int closing;          /* moor_scope_close's wait, not moor_scope_wait's (moor_dump) */
    moor__waiter waiter;
    moor__deadline deadline;
} empty_future;

static void complete_waiters(moor_scope *scope, intptr_t result)
{
    moor__waiter *w;
    while ((w = moor__waitq_take(&scope->waiters, NULL))) {
        empty_future *ef = moor_container_of(w, empty_future, waiter);
        moor__waiter_complete(w);
        ef->base.result = result;
        moor__wake(&w->waker);
    }
}

/* A child's exit hook: it has returned. */
static void child_done(moor__exit_hook *hook)
{
    moor_scope *scope = hook->arg;
    moor__list_remove(&scope->children, &hook->node);
    moor__fiber_on_exit(moor__exit_hook_fiber(hook), NULL, NULL);
    if (--scope->count == 0)
        complete_waiters(scope, 0);
}

int moor_scope_spawn(moor_scope *scope, moor_fiber_fn fn, void *arg, const moor_fiber_attr *attr)
{
    moor__owner_check(&scope->ex, "moor_scope_spawn");
    moor__assert(scope->closed <= 0, "moor_scope_spawn: the scope is closed");
    moor__assert(fn, "moor_scope_spawn: fn is NULL");
    moor__assert(scope->ex, "moor_scope_spawn: no executor on this thread");
    moor_fiber *f;
    /* Detached: the scope, not a join, is what keeps track of it. */
    int rc = moor__fiber_spawn(scope->ex, &f, fn, arg, attr, 1);
    if (rc < 0)
        return rc;
    moor__list_push_front(&scope->children, &moor__fiber_on_exit(f, child_done, scope)->node);
    scope->count++;
    if (scope->closed < 0) /* being closed: it starts cancelled, so the close can finish */
        moor_cancel(f);
    return 0;
}

MOOR__WAIT_OP int empty_ready(moor_future *fut, moor_cx *cx)
{
    (void)cx;
    empty_future *ef = moor_container_of(fut, empty_future, base);
    if (moor__waiter_done(&ef->waiter))
        return 1; /* result set by the scope */
    if (ef->scope->count)
        return 0;
    moor__waitq_remove(&ef->scope->waiters, &ef->waiter);
    fut->result = 0;
    return 1;
}

MOOR__WAIT_OP int empty_park(moor_future *fut, moor_cx *cx)
{
    empty_future *ef = moor_container_of(fut, empty_future, base);
    moor__waitq_park(&ef->scope->waiters, &ef->waiter, cx);
    return 0;
}

MOOR__WAIT_OP int empty_unpark(moor_future *fut)
{
    empty_future *ef = moor_container_of(fut, empty_future, base);
    if (moor__waiter_done(&ef->waiter))
        return 1;
    moor__waitq_remove(&ef->scope->waiters, &ef->waiter);
    return 0;
}

static const moor__wait_ops empty_wait = {empty_ready, empty_park, empty_unpark, -ETIMEDOUT};

static moor_poll empty_poll(moor_future *fut, moor_cx *cx)
{
    empty_future *ef = moor_container_of(fut, empty_future, base);
    return moor__wait_poll(fut, &ef->deadline, cx, &empty_wait);
}

static moor_poll empty_cancel(moor_future *fut)
{
    empty_future *ef = moor_container_of(fut, empty_future, base);
    return moor__wait_cancel(fut, &ef->deadline, &empty_wait);
}

static const moor_future_ops empty_ops = {"scope", empty_poll, empty_cancel};

/* "scope close 0x...": only the scope's children, fibers of this executor, can end it. */
static int empty_describe(const moor_future *fut, char *buf, size_t size)
{
    const empty_future *ef = moor_container_of(fut, empty_future, base);
    moor__fmt out = moor__fmt_init(buf, size);
    moor__fmt_str(&out, ef->closing ? "scope close " : "scope wait ");
    moor__fmt_ptr(&out, ef->scope);
    return MOOR_WAIT_LOCAL;
}

static moor_future_kind empty_kind = {&empty_ops, empty_describe, NULL};

__attribute__((constructor)) static void empty_kind_register(void)
{
    moor_future_kind_register(&empty_kind);
}

static int wait_empty(moor_scope *scope, int64_t deadline, int cancellable)
{
    if (scope->count == 0)
        return 0;
    empty_future ef;
    moor_future_init(&ef.base, &empty_ops, 0);
    ef.scope = scope;
    ef.closing = !cancellable;
    moor__waiter_init(&ef.waiter);
    moor__deadline_init(&ef.deadline, deadline);
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
    for (moor__node *n = scope->children.head; n; n = n->next)
        moor_cancel(moor__exit_hook_fiber(moor_container_of(n, moor__exit_hook, node)));
    int rc = wait_empty(scope, deadline, 0);
    if (rc == -ENOMEM) /* no room to time the wait: the children are cancelled, wait them out */
        rc = wait_empty(scope, -1, 0);
    if (rc < 0) {
        /* Still running at the deadline: they are cancelled, detached and released when
         * they return; the scope lets go of them, and of the fibers waiting for them. */
        moor__node *n;
        while ((n = moor__list_pop(&scope->children)))
            moor__fiber_on_exit(moor__exit_hook_fiber(moor_container_of(n, moor__exit_hook, node)),
                                NULL, NULL);
        scope->count = 0;
        complete_waiters(scope, -EPIPE);
    }
    scope->closed = 1;
    if (scope->owner)
        moor__fiber_scopes(scope->owner, -1);
    return rc;
}
