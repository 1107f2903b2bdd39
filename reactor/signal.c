/* Signals as futures, on libev's signal watchers. A signal can be caught in one loop at a
 * time (libev), so a process-wide table says which executor has it, counts its waiters and
 * keeps the disposition it had before the first of them: the last one to stop puts it back
 * (libev would leave SIG_DFL). */
#include <errno.h>
#include <pthread.h>
#include <signal.h>

#include "fiber/fiber.h"
#include "reactor.h"

static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    moor_executor *owner;
    size_t waiters;
    struct sigaction saved;
} table[NSIG];

typedef struct signal_future {
    moor_future base;
    ev_signal watcher;
    moor_timer_node node;
    moor_waker waker;
    int64_t deadline;
    int fired;
    int counted; /* holds a place in table[signum].waiters */
} signal_future;

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)loop, (void)revents;
    signal_future *sf = w->data;
    /* Left active until the future completes: a second signal meanwhile is caught, not
     * delivered to a default disposition. */
    sf->fired = 1;
    moor_waker_wake(&sf->waker);
}

/* Take a place among the signal's waiters on `ex`. -EBUSY if another executor has it. */
static int table_join(int signum, moor_executor *ex)
{
    int rc = 0;
    pthread_mutex_lock(&table_lock);
    if (table[signum].owner && table[signum].owner != ex) {
        rc = -EBUSY;
    } else {
        if (table[signum].waiters++ == 0) {
            sigaction(signum, NULL, &table[signum].saved);
            table[signum].owner = ex;
        }
    }
    pthread_mutex_unlock(&table_lock);
    return rc;
}

static void signal_stop(signal_future *sf, moor_executor *ex)
{
    moor__timer_remove(&ex->timers, &sf->node);
    if (!sf->counted)
        return;
    int signum = sf->watcher.signum;
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, signum);
    pthread_sigmask(SIG_BLOCK, &block, &old); /* none may arrive between libev's reset and ours */
    ev_signal_stop(((moor__reactor *)ex->reactor)->loop, &sf->watcher);
    pthread_mutex_lock(&table_lock);
    if (--table[signum].waiters == 0) {
        sigaction(signum, &table[signum].saved, NULL);
        table[signum].owner = NULL;
    }
    pthread_mutex_unlock(&table_lock);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    sf->counted = 0;
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
    if (!sf->counted) {
        moor__reactor *r;
        int rc = moor__reactor_get(ex, &r);
        if (rc == 0)
            rc = table_join(sf->watcher.signum, ex);
        if (rc < 0) {
            fut->result = rc;
            return MOOR_READY;
        }
        sf->counted = 1;
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
    sf.counted = 0;
    return (int)moor__wait(&sf.base);
}
