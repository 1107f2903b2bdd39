/* Signals as futures, on libev's signal watchers. */
#include <errno.h>
#include <signal.h>

#include "fiber/assert.h"
#include "fiber/fiber.h"
#include "reactor.h"

typedef struct signal_future {
    moor_future base;
    ev_signal watcher;
    moor_timer_node node;
    moor_waker waker;
    int64_t deadline;
    int fired;
} signal_future;

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    signal_future *sf = w->data;
    ev_signal_stop(loop, w);
    sf->fired = 1;
    moor_waker_wake(&sf->waker);
}

static void signal_stop(signal_future *sf, moor_executor *ex)
{
    moor__reactor *r = ex->reactor;
    if (r && ev_is_active(&sf->watcher))
        ev_signal_stop(r->loop, &sf->watcher);
    moor__timer_remove(&ex->timers, &sf->node);
}

static moor_poll signal_poll(moor_future *fut, moor_cx *cx)
{
    signal_future *sf = moor_container_of(fut, signal_future, base);
    moor_executor *ex = cx->waker.ex;
    if (sf->fired || (sf->deadline >= 0 && moor_now() >= sf->deadline)) {
        signal_stop(sf, ex);
        fut->result = sf->fired ? sf->watcher.signum : -ETIMEDOUT;
        return MOOR_READY;
    }
    sf->waker = cx->waker;
    if (!ev_is_active(&sf->watcher)) {
        moor__reactor *r = moor__reactor_get(ex);
        if (!r) {
            fut->result = -ENOMEM;
            return MOOR_READY;
        }
        ev_signal_start(r->loop, &sf->watcher);
    }
    if (moor__timer_arm(&ex->timers, &sf->node, sf->deadline, &cx->waker) < 0) {
        signal_stop(sf, ex);
        fut->result = -ENOMEM;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static moor_poll signal_cancel(moor_future *fut)
{
    signal_future *sf = moor_container_of(fut, signal_future, base);
    signal_stop(sf, moor__tls_executor);
    if (!sf->fired)
        return MOOR_PENDING;
    fut->result = sf->watcher.signum; /* it arrived: do not lose it */
    return MOOR_READY;
}

static const moor_future_ops signal_ops = {"signal", signal_poll, signal_cancel};

int moor_signal_wait(int signum, int64_t deadline)
{
    if (signum <= 0 || signum >= NSIG || signum == SIGKILL || signum == SIGSTOP)
        return -EINVAL;
    signal_future sf;
    moor_future_init(&sf.base, &signal_ops, 0);
    ev_signal_init(&sf.watcher, on_signal, signum);
    sf.watcher.data = &sf;
    moor__timer_node_init(&sf.node);
    sf.waker = (moor_waker){0};
    sf.deadline = deadline;
    sf.fired = 0;
    return (int)moor__wait(&sf.base);
}
