#include <errno.h>
#include <signal.h>
#include <string.h>

#include "fiber/alloc.h"
#include "fiber/assert.h"
#include "reactor.h"

_Static_assert(sizeof(ev_io) <= sizeof(((moor_io_future *)0)->watcher),
               "moor_io_future.watcher must hold an ev_io");

/* ---- the libev driver ------------------------------------------------------------------ */

static void on_nothing_async(struct ev_loop *loop, ev_async *w, int revents)
{
    (void)loop, (void)revents; /* ends ev_run; signals caught for this executor (signal.c) */
    moor__signal_dispatch(moor_container_of(w, moor__reactor, unpark));
}

static void on_nothing_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)w, (void)revents;
}

static void ev_park(void *self, int64_t timeout_ms)
{
    moor__reactor *r = self;
    if (timeout_ms == 0) {
        ev_run(r->loop, EVRUN_NOWAIT);
        return;
    }
    if (timeout_ms > 0) {
        ev_now_update(r->loop);
        ev_timer_set(&r->park_timer, (ev_tstamp)timeout_ms / 1000.0, 0.);
        ev_timer_start(r->loop, &r->park_timer);
    }
    ev_run(r->loop, EVRUN_ONCE);
    if (timeout_ms > 0)
        ev_timer_stop(r->loop, &r->park_timer);
}

static void ev_unpark(void *self)
{
    moor__reactor *r = self;
    ev_async_send(r->loop, &r->unpark);
}

static const moor__driver ev_driver = {ev_park, ev_unpark};

/* ---- attached to a loop the application runs ------------------------------------------- */

#define ATTACHED_BUDGET 256u

static void attached_run(moor__reactor *r)
{
    int64_t next;
    int more = moor__executor_tick(r->ex, ATTACHED_BUDGET, &next);
    /* While a task is pending the application's ev_run must not return, whatever it waits
     * on (a timer, a worker, another thread): hold a reference on the loop for them. */
    int pending = r->ex->ntasks > 0;
    if (pending && !r->holds_ref)
        ev_ref(r->loop);
    else if (!pending && r->holds_ref)
        ev_unref(r->loop);
    r->holds_ref = pending;
    if (more)
        ev_idle_start(r->loop, &r->idle);
    else
        ev_idle_stop(r->loop, &r->idle);
    ev_timer_stop(r->loop, &r->park_timer);
    if (next >= 0) {
        int64_t wait = next - moor_now();
        ev_timer_set(&r->park_timer, wait > 0 ? (ev_tstamp)wait / 1000.0 : 0., 0.);
        ev_timer_start(r->loop, &r->park_timer);
    }
}

static void on_prepare(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)loop, (void)revents;
    moor__reactor *r = w->data;
    /* A plain-code moor_block_on inside an application callback runs the executor itself;
     * the prepare watcher of that nested ev_run must not run it a second time. */
    if (!r->ex->running)
        attached_run(r);
}

static void on_idle(struct ev_loop *loop, ev_idle *w, int revents)
{
    (void)loop, (void)w, (void)revents; /* while active, the loop does not block */
}

/* ---- lifecycle ------------------------------------------------------------------------- */

static void reactor_free(moor_executor *ex)
{
    moor__reactor *r = ex->reactor;
    moor__signal_reactor_free(r);
    if (r->blocking)
        moor__blocking_pool_free(r->blocking);
    moor__driver_set(ex, NULL, NULL);
    if (r->owned) {
        ev_async_stop(r->loop, &r->unpark);
        ev_loop_destroy(r->loop);
    } else {
        /* Give back the references taken away at attach before stopping those watchers. */
        ev_ref(r->loop);
        ev_async_stop(r->loop, &r->unpark);
        ev_ref(r->loop);
        ev_prepare_stop(r->loop, &r->prepare);
        ev_timer_stop(r->loop, &r->park_timer);
        ev_idle_stop(r->loop, &r->idle);
        if (r->holds_ref)
            ev_unref(r->loop);
    }
    ex->reactor = NULL;
    ex->reactor_free = NULL;
    moor__free(r->fd_hints);
    moor__free(r);
}

static moor__reactor *reactor_new(moor_executor *ex, struct ev_loop *loop)
{
    moor__reactor *r = moor__alloc(sizeof *r);
    if (!r)
        return NULL;
    memset(r, 0, sizeof *r);
    r->owned = loop == NULL;
    r->loop = loop ? loop : ev_loop_new(EVFLAG_AUTO | EVFLAG_NOSIGMASK);
    if (!r->loop) {
        moor__free(r);
        return NULL;
    }
    r->ex = ex;
    ev_async_init(&r->unpark, on_nothing_async);
    ev_async_start(r->loop, &r->unpark);
    ev_timer_init(&r->park_timer, on_nothing_timer, 0., 0.);
    if (!r->owned) {
        /* The application's ev_run must end when nothing is left to do: moor's own async and
         * prepare watchers do not count. Work does: runnable tasks (the idle watcher),
         * pending timers (park_timer) and fibers waiting on fds (their io watchers). */
        ev_unref(r->loop);
        ev_prepare_init(&r->prepare, on_prepare);
        r->prepare.data = r;
        ev_prepare_start(r->loop, &r->prepare);
        ev_unref(r->loop);
        ev_idle_init(&r->idle, on_idle);
        ev_idle_start(r->loop, &r->idle); /* tasks may be queued already */
    }
    ex->reactor = r;
    ex->reactor_free = reactor_free;
    moor__driver_set(ex, &ev_driver, r);
    return r;
}

moor__reactor *moor__reactor_get(moor_executor *ex)
{
    return ex->reactor ? ex->reactor : reactor_new(ex, NULL);
}

int moor_executor_attach(moor_executor *ex, struct ev_loop *loop)
{
    moor__assert(ex == moor__tls_executor,
                 "moor_executor_attach: the executor belongs to another thread");
    moor__assert(loop, "moor_executor_attach: loop is NULL");
    if (ex->reactor)
        return -EBUSY;
    return reactor_new(ex, loop) ? 0 : -ENOMEM;
}

struct ev_loop *moor_executor_loop(moor_executor *ex)
{
    moor__reactor *r = moor__reactor_get(ex);
    return r ? r->loop : NULL;
}

void moor_executor_after_fork(moor_executor *ex)
{
    moor__executor_after_fork(ex);
    moor__signal_after_fork(ex);
    moor__reactor *r = ex->reactor;
    if (!r)
        return;
    ev_loop_fork(r->loop);
    if (r->blocking)
        moor__blocking_pool_after_fork(r->blocking);
}
