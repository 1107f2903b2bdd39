/* Signals as futures. moor catches a signal with a handler of its own while at least one
 * fiber waits for it, not with libev's signal watchers: libev's ev_signal_stop leaves the
 * signal SIG_DFL for a moment before anyone can put the old disposition back, and a signal
 * arriving then on any thread kills the process, even one the application ignores.
 *
 * A process-wide table, one entry per signal number, says which executor's reactor owns it
 * (one at a time: -EBUSY for the others) and counts its waits:
 *
 *   waits 0 -> 1   sigaction(moor's handler), saving the previous disposition: one call
 *   waits 1 -> 0   sigaction(previous disposition): one call, an atomic swap with nothing
 *                  in between; then the owner is cleared
 *
 * The handler is async-signal-safe: it counts the signal in `caught`, sets its bit in
 * `pending` and sends the owner reactor's `unpark` ev_async. On the owner's thread the
 * async's callback calls this file's `unparked` hook (dispatch), which completes each listed
 * wait that began before the catch (a wait records `caught` as it begins). The waits are
 * listed in the entry and only the owner's thread touches the list.
 *
 * A handler call still running when the owner is cleared may use the owner's reactor: the
 * reactor waits for such calls before it is freed (drain_handlers, the `free` hook), not
 * every last stop, which would wait for a whole time slice whenever such a call was
 * preempted.
 *
 * The hooks are attached to a reactor at its first signal wait, and the process-wide fork
 * hook (after_fork) at the first wait in the process. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>

#include "fiber/assert.h"
#include "fiber/dump.h"
#include "fiber/executor.h"
#include "reactor.h"
#include "fiber/wait.h"

typedef struct signal_future {
    moor_future base;
    moor__node link;   /* in the owner's waits for this signal */
    moor__deadline deadline;
    moor_waker waker;
    unsigned long seq; /* table[signum].caught when the wait began: later catches are its */
    int signum;
    int fired;
    int counted; /* holds a place in table[signum].waiters and its list */
} signal_future;

static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    moor__reactor *owner;     /* atomic: whose fibers wait; NULL while none does */
    size_t waiters;           /* table_lock */
    struct sigaction saved;   /* table_lock: the disposition before the first wait */
    moor__list waits;         /* signal_future.link; the owner's thread only */
    unsigned long caught;     /* atomic: times the handler caught it for an owner */
    int in_handler;           /* atomic: handler calls that may still use the owner */
} table[NSIG];

#define WORD_BITS (8 * sizeof(unsigned long))
/* atomic: a bit per signal caught and not yet dispatched by its owner */
static unsigned long pending[(NSIG + WORD_BITS - 1) / WORD_BITS];

static void on_signal(int signum)
{
    int saved_errno = errno;
    /* Counted before the owner is read, so that a reactor about to be freed can wait for the
     * calls that may have read it. */
    __atomic_add_fetch(&table[signum].in_handler, 1, __ATOMIC_SEQ_CST);
    moor__reactor *r = __atomic_load_n(&table[signum].owner, __ATOMIC_SEQ_CST);
    if (r) {
        __atomic_add_fetch(&table[signum].caught, 1, __ATOMIC_SEQ_CST);
        __atomic_fetch_or(&pending[signum / WORD_BITS], 1ul << (signum % WORD_BITS),
                          __ATOMIC_SEQ_CST);
        ev_async_send(r->loop, &r->unpark); /* async-signal-safe (libev) */
    }
    /* A race as the last wait ends: a call that the kernel began before the swap but that
     * reads the owner after it was cleared drops the signal; one that read the owner but
     * counts the catch only after that wait looked (signal_stop) leaves it to the next wait
     * to begin. Either way no wait reports it twice. */
    __atomic_sub_fetch(&table[signum].in_handler, 1, __ATOMIC_SEQ_CST);
    errno = saved_errno;
}

/* Take a place among the signal's waiters for r's executor, installing moor's handler if it
 * is the first. -EBUSY if another executor has the signal; -errno if sigaction refuses it
 * (the C library keeps a few signals for itself). */
static int table_join(int signum, moor__reactor *r)
{
    int rc = 0;
    pthread_mutex_lock(&table_lock);
    moor__reactor *owner = __atomic_load_n(&table[signum].owner, __ATOMIC_RELAXED);
    if (owner && owner != r) {
        rc = -EBUSY;
    } else if (table[signum].waiters++ == 0) {
        /* The owner is set first, so that no signal caught by the new handler is dropped. */
        __atomic_store_n(&table[signum].owner, r, __ATOMIC_SEQ_CST);
        struct sigaction sa;
        sa.sa_handler = on_signal;
        sigfillset(&sa.sa_mask);
        /* On the thread's sigaltstack if it has one (an executor's thread does), so that
         * the handler does not eat into a fiber's stack near its guard. */
        sa.sa_flags = SA_RESTART | SA_ONSTACK;
        if (sigaction(signum, &sa, &table[signum].saved) != 0) {
            rc = -errno;
            table[signum].waiters = 0;
            __atomic_store_n(&table[signum].owner, NULL, __ATOMIC_SEQ_CST);
        }
    }
    pthread_mutex_unlock(&table_lock);
    return rc;
}

/* Give the place back; the last one puts the previous disposition back. */
static void table_leave(int signum)
{
    pthread_mutex_lock(&table_lock);
    if (--table[signum].waiters == 0) {
        /* From here on no new handler call starts, on any thread, and the signal never meets
         * SIG_DFL unless that was its disposition. Calls already running may still use the
         * owner's reactor: drain_handlers waits for them before it can go. */
        sigaction(signum, &table[signum].saved, NULL);
        __atomic_store_n(&table[signum].owner, NULL, __ATOMIC_SEQ_CST);
        __atomic_fetch_and(&pending[signum / WORD_BITS], ~(1ul << (signum % WORD_BITS)),
                           __ATOMIC_SEQ_CST);
    }
    pthread_mutex_unlock(&table_lock);
}

static int caught_since(const signal_future *sf)
{
    return __atomic_load_n(&table[sf->signum].caught, __ATOMIC_SEQ_CST) != sf->seq;
}

static void dispatch(moor__reactor *r, void *self)
{
    (void)self;
    for (size_t w = 0; w < sizeof pending / sizeof pending[0]; w++) {
        unsigned long bits = __atomic_load_n(&pending[w], __ATOMIC_SEQ_CST);
        while (bits) {
            int bit = __builtin_ctzl(bits);
            bits &= bits - 1;
            int signum = (int)(w * WORD_BITS) + bit;
            if (__atomic_load_n(&table[signum].owner, __ATOMIC_SEQ_CST) != r)
                continue; /* another executor's */
            /* Cleared before `caught` is read: a catch counted after that read sets the bit
             * again and sends another async. */
            __atomic_fetch_and(&pending[w], ~(1ul << bit), __ATOMIC_SEQ_CST);
            for (moor__node *n = table[signum].waits.head; n; n = n->next) {
                signal_future *sf = moor_container_of(n, signal_future, link);
                if (!sf->fired && caught_since(sf)) {
                    sf->fired = 1;
                    moor_waker_wake(&sf->waker);
                }
            }
        }
    }
}

static void drain_handlers(moor__reactor *r, void *self);
static void after_fork(moor_executor *ex);

static const moor__reactor_hook_ops signal_hooks = {NULL, dispatch, NULL, drain_handlers};

/* The executor's reactor, with this file's hooks attached. 0 or -errno (moor__reactor_get). */
static int reactor_of(moor_executor *ex, moor__reactor **out)
{
    int rc = moor__reactor_get(ex, out);
    if (rc == 0 && !moor__reactor_hooked(*out, MOOR__REACTOR_HOOK_SIGNAL)) {
        moor__reactor_hook_set(*out, MOOR__REACTOR_HOOK_SIGNAL, &signal_hooks, NULL);
        moor__fork_hook_add(after_fork); /* the same hook again is a no-op */
    }
    return rc;
}

static void signal_stop(signal_future *sf)
{
    if (!sf->counted)
        return;
    /* Off the list before the place is given back: the next owner starts with an empty one. */
    moor__list_remove(&table[sf->signum].waits, &sf->link);
    table_leave(sf->signum);
    /* A signal caught while this wait was listed but not yet dispatched is its too: it is
     * reported, not lost to a cancel or a deadline. */
    if (caught_since(sf))
        sf->fired = 1;
    sf->counted = 0;
}

MOOR__WAIT_OP int signal_ready(moor_future *fut, moor_cx *cx)
{
    (void)cx;
    signal_future *sf = moor_container_of(fut, signal_future, base);
    if (!sf->fired)
        return 0;
    signal_stop(sf);
    fut->result = sf->signum;
    return 1;
}

/* Join the signal's table entry the first time (installing moor's handler if it is the
 * first wait for it), point the wait at the current waker after. */
MOOR__WAIT_OP int signal_park(moor_future *fut, moor_cx *cx)
{
    signal_future *sf = moor_container_of(fut, signal_future, base);
    sf->waker = cx->waker;
    if (sf->counted)
        return 0;
    moor__reactor *r;
    int rc = reactor_of(cx->waker.ex, &r);
    if (rc == 0) {
        /* Read before moor's handler may be installed: whatever it catches is this wait's. */
        sf->seq = __atomic_load_n(&table[sf->signum].caught, __ATOMIC_SEQ_CST);
        rc = table_join(sf->signum, r);
    }
    if (rc < 0)
        return rc;
    moor__list_push_front(&table[sf->signum].waits, &sf->link);
    sf->counted = 1;
    return 0;
}

/* Given up on: but a signal that arrived meanwhile is reported, not lost. */
MOOR__WAIT_OP int signal_unpark(moor_future *fut)
{
    signal_future *sf = moor_container_of(fut, signal_future, base);
    signal_stop(sf);
    if (!sf->fired)
        return 0;
    fut->result = sf->signum;
    return 1;
}

static const moor__wait_ops signal_wait = {signal_ready, signal_park, signal_unpark, -ETIMEDOUT};

static moor_poll signal_poll(moor_future *fut, moor_cx *cx)
{
    signal_future *sf = moor_container_of(fut, signal_future, base);
    return moor__wait_poll(fut, &sf->deadline, cx, &signal_wait);
}

static moor_poll signal_cancel(moor_future *fut)
{
    signal_future *sf = moor_container_of(fut, signal_future, base);
    return moor__wait_cancel(fut, &sf->deadline, &signal_wait);
}

static const moor_future_ops signal_ops = {"signal", signal_poll, signal_cancel};

/* "signal 15": it comes from outside, never local. */
static int signal_describe(const moor_future *fut, char *buf, size_t size)
{
    const signal_future *sf = moor_container_of(fut, signal_future, base);
    moor__fmt out = moor__fmt_init(buf, size);
    moor__fmt_str(&out, "signal ");
    moor__fmt_i64(&out, sf->signum);
    return 0;
}

static moor_future_kind signal_kind = {&signal_ops, signal_describe, NULL};

__attribute__((constructor)) static void signal_kind_register(void)
{
    moor_future_kind_register(&signal_kind);
}

int moor_signal_wait(int signum, int64_t deadline)
{
    if (signum <= 0 || signum >= NSIG || signum == SIGKILL || signum == SIGSTOP)
        return -EINVAL;
    signal_future sf;
    moor_future_init(&sf.base, &signal_ops, 0);
    sf.link = (moor__node){NULL, NULL};
    moor__deadline_init(&sf.deadline, deadline);
    sf.waker = (moor_waker){0};
    sf.seq = 0;
    sf.signum = signum;
    sf.fired = 0;
    sf.counted = 0;
    return (int)moor__wait(&sf.base);
}

static void drain_handlers(moor__reactor *r, void *self)
{
    (void)self;
    /* r waits for no signal now, so no entry names it and no handler call that starts can
     * reach it. One that read it earlier has counted itself in in_handler since before the
     * owner was cleared: seeing each count at zero once is enough. Calls are short and never
     * block; this waits only if one is running (or preempted) right now. */
    for (int signum = 1; signum < NSIG; signum++) {
        moor__assert(__atomic_load_n(&table[signum].owner, __ATOMIC_SEQ_CST) != r,
                     "moor_executor_free: signal %d is still waited for", signum);
        while (__atomic_load_n(&table[signum].in_handler, __ATOMIC_SEQ_CST))
            sched_yield();
    }
}

static void after_fork(moor_executor *ex)
{
    /* Another thread of the parent may have held it at the fork. */
    pthread_mutex_init(&table_lock, NULL);
    moor__reactor *mine = moor__part_get(ex, MOOR__PART_REACTOR);
    for (int signum = 1; signum < NSIG; signum++) {
        /* Handler calls on threads that did not cross the fork never end here. */
        table[signum].in_handler = 0;
        moor__reactor *owner = table[signum].owner;
        if (!owner || owner == mine)
            continue; /* free, or waited for by fibers that came along */
        /* Waited for by another executor, whose thread and fibers stayed in the parent: the
         * signal is free in the child, with the disposition it had before those waits. */
        sigaction(signum, &table[signum].saved, NULL);
        table[signum].owner = NULL;
        table[signum].waiters = 0;
        table[signum].waits = (moor__list){NULL, NULL};
        pending[signum / WORD_BITS] &= ~(1ul << (signum % WORD_BITS));
    }
}
