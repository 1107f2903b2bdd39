/* Mutex, condition variable, semaphore, wait group, one-shot event. They share one future:
 * a waiter in the primitive's FIFO queue that a counterpart completes (hands it the lock or
 * a permit, signals it) and wakes. */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>

#include "assert.h"
#include "dump.h"
#include "wait.h"

typedef struct wait_op wait_op;

struct wait_op {
    moor_future base;
    moor__list *q;
    void *obj;
    /* Take what is waited for now, if it can be had without waiting; non-zero if taken. */
    int (*take_now)(wait_op *op);
    moor_fiber *self;     /* the waiting fiber (becomes the mutex owner on hand-off) */
    moor__waiter waiter;
    moor__deadline deadline;
};

MOOR__WAIT_OP int op_ready(moor_future *fut, moor_cx *cx)
{
    wait_op *op = moor_container_of(fut, wait_op, base);
    /* Done: a counterpart completed it (a lock or permit is now ours). */
    if (moor__waiter_done(&op->waiter) ||
        (op->waiter.state == MOOR__WAITER_IDLE && moor__claim_open(cx) && op->take_now(op))) {
        (void)moor__claim(cx);
        moor__waitq_remove(op->q, &op->waiter);
        fut->result = 0;
        return 1;
    }
    return 0;
}

MOOR__WAIT_OP int op_park(moor_future *fut, moor_cx *cx)
{
    wait_op *op = moor_container_of(fut, wait_op, base);
    moor__waitq_park(op->q, &op->waiter, cx);
    return 0;
}

/* Handed over already: the caller has it (a lock, a permit) and must release it. */
MOOR__WAIT_OP int op_unpark(moor_future *fut)
{
    wait_op *op = moor_container_of(fut, wait_op, base);
    moor__waitq_remove(op->q, &op->waiter);
    if (!moor__waiter_done(&op->waiter))
        return 0;
    fut->result = 0;
    return 1;
}

static const moor__wait_ops op_wait = {op_ready, op_park, op_unpark, -ETIMEDOUT};

static moor_poll wait_poll(moor_future *fut, moor_cx *cx)
{
    wait_op *op = moor_container_of(fut, wait_op, base);
    return moor__wait_poll(fut, &op->deadline, cx, &op_wait);
}

static moor_poll wait_cancel(moor_future *fut)
{
    wait_op *op = moor_container_of(fut, wait_op, base);
    return moor__wait_cancel(fut, &op->deadline, &op_wait);
}

static const moor_future_ops wait_ops = {"sync wait", wait_poll, wait_cancel};

/* The counterpart's side: complete the first waiter that may be completed. */
static wait_op *complete_first(moor__list *q)
{
    moor__waiter *w = moor__waitq_take(q, NULL);
    if (!w)
        return NULL;
    wait_op *op = moor_container_of(w, wait_op, waiter);
    moor__waiter_complete(w);
    moor__wake(&w->waker);
    return op;
}

static void complete_all(moor__list *q)
{
    while (complete_first(q))
        ;
}

static void waiter_unlink(void *arg)
{
    wait_op *op = arg;
    moor__waitq_remove(op->q, &op->waiter);
}

/* Wait for a counterpart. The caller has found that it cannot take what it waits for now:
 * a fiber queues and waits for completion directly; plain code runs the executor on the
 * op as a future (whose first poll tries again). */
static int wait_on(moor__list *q, void *obj, int (*take_now)(wait_op *), int64_t deadline,
                   int cancellable)
{
    wait_op op;
    op.base = (moor_future){.ops = &wait_ops}; /* moor_future_init */
    op.q = q;
    op.obj = obj;
    op.take_now = take_now;
    op.self = moor__self();
    moor__waiter_init(&op.waiter);
    moor__deadline_init(&op.deadline, deadline);
    moor_fiber *f = op.self;
    if (!f)
        return (int)moor__wait_uncancellable(&op.base);
    moor_executor *ex = f->ex;
    moor_cx cx = {{ex, &f->task, f->task.gen}, NULL, NULL};
    moor__waitq_push(q, &op.waiter, &cx);
    return moor__fiber_wait_completion(f, &op.waiter, &op.base, &op.deadline,
                                       waiter_unlink, &op, cancellable);
}

/* ---- mutex ------------------------------------------------------------------------------ */

static int mutex_take(wait_op *op)
{
    moor_mutex *m = op->obj;
    if (m->locked)
        return 0;
    m->locked = 1;
    m->owner = op->self;
    return 1;
}

static int mutex_lock(moor_mutex *m, int64_t deadline, int cancellable)
{
    moor__owner_check(&m->ex, "moor_mutex_lock");
    moor_fiber *self = moor__self();
    if (!m->locked && !m->waiters.head) {
        m->locked = 1;
        m->owner = self;
        moor__coop_spend();
        return 0;
    }
    moor__assert(!self || m->owner != self, "moor_mutex_lock: fiber %" PRIu64 " \"%s\" already holds this mutex",
                 moor_fiber_id(self), moor_fiber_name(self));
    int rc = wait_on(&m->waiters, m, mutex_take, deadline, cancellable);
    if (rc == 0)
        m->owner = self; /* a hand-off sets it too; this covers lock taken on a poll */
    return rc;
}

int moor_mutex_lock(moor_mutex *m, int64_t deadline) { return mutex_lock(m, deadline, 1); }

int moor_mutex_trylock(moor_mutex *m)
{
    moor__owner_check(&m->ex, "moor_mutex_trylock");
    if (m->locked)
        return -EBUSY;
    m->locked = 1;
    m->owner = moor__self();
    return 0;
}

void moor_mutex_unlock(moor_mutex *m)
{
    moor__owner_check(&m->ex, "moor_mutex_unlock");
    moor__assert(m->locked, "moor_mutex_unlock: the mutex is not locked");
    moor__assert(m->owner == moor__self(), "moor_mutex_unlock: called by a fiber that does not hold it");
    /* FIFO hand-off: the lock stays locked and passes to the first waiter. */
    wait_op *next = m->waiters.head ? complete_first(&m->waiters) : NULL;
    if (next) {
        m->owner = next->self;
        return;
    }
    m->locked = 0;
    m->owner = NULL;
}

/* ---- condition variable ---------------------------------------------------------------- */

static int never_now(wait_op *op)
{
    (void)op;
    return 0;
}

int moor_cond_wait(moor_cond *c, moor_mutex *m, int64_t deadline)
{
    moor__owner_check(&c->ex, "moor_cond_wait");
    moor_mutex_unlock(m);
    int rc = wait_on(&c->waiters, c, never_now, deadline, 1);
    /* Locked again whatever happened, as the caller expects, even when cancelled. */
    int lrc = mutex_lock(m, -1, 0);
    moor__assert(lrc == 0, "moor_cond_wait: relocking failed: %s", moor_strerror(lrc));
    return rc;
}

void moor_cond_signal(moor_cond *c)
{
    moor__owner_check(&c->ex, "moor_cond_signal");
    complete_first(&c->waiters);
}

void moor_cond_broadcast(moor_cond *c)
{
    moor__owner_check(&c->ex, "moor_cond_broadcast");
    complete_all(&c->waiters);
}

/* ---- semaphore ------------------------------------------------------------------------- */

static int sem_take(wait_op *op)
{
    moor_sem *s = op->obj;
    if (!s->permits)
        return 0;
    s->permits--;
    return 1;
}

int moor_sem_acquire(moor_sem *s, int64_t deadline)
{
    moor__owner_check(&s->ex, "moor_sem_acquire");
    if (s->permits && !s->waiters.head) {
        s->permits--;
        moor__coop_spend();
        return 0;
    }
    return wait_on(&s->waiters, s, sem_take, deadline, 1);
}

int moor_sem_try_acquire(moor_sem *s)
{
    moor__owner_check(&s->ex, "moor_sem_try_acquire");
    if (!s->permits || s->waiters.head)
        return -EAGAIN;
    s->permits--;
    return 0;
}

void moor_sem_release(moor_sem *s)
{
    moor__owner_check(&s->ex, "moor_sem_release");
    if (!complete_first(&s->waiters)) /* a waiter gets the permit directly */
        s->permits++;
}

/* ---- wait group ------------------------------------------------------------------------ */

static int wg_zero(wait_op *op) { return ((moor_waitgroup *)op->obj)->count == 0; }

void moor_waitgroup_add(moor_waitgroup *wg, size_t n)
{
    moor__owner_check(&wg->ex, "moor_waitgroup_add");
    moor__assert(n <= SIZE_MAX - wg->count, "moor_waitgroup_add: the count overflows");
    wg->count += n;
}

void moor_waitgroup_done(moor_waitgroup *wg)
{
    moor__owner_check(&wg->ex, "moor_waitgroup_done");
    moor__assert(wg->count > 0, "moor_waitgroup_done: called more often than added");
    if (--wg->count == 0)
        complete_all(&wg->waiters);
}

int moor_waitgroup_wait(moor_waitgroup *wg, int64_t deadline)
{
    moor__owner_check(&wg->ex, "moor_waitgroup_wait");
    if (wg->count == 0) {
        moor__coop_spend();
        return 0;
    }
    return wait_on(&wg->waiters, wg, wg_zero, deadline, 1);
}

/* ---- one-shot event -------------------------------------------------------------------- */

static int event_is_set(wait_op *op) { return ((moor_event *)op->obj)->set; }

void moor_event_set(moor_event *e)
{
    moor__owner_check(&e->ex, "moor_event_set");
    if (e->set)
        return;
    e->set = 1;
    complete_all(&e->waiters);
}

int moor_event_wait(moor_event *e, int64_t deadline)
{
    moor__owner_check(&e->ex, "moor_event_wait");
    if (e->set) {
        moor__coop_spend();
        return 0;
    }
    return wait_on(&e->waiters, e, event_is_set, deadline, 1);
}

/* ---- describing a wait (moor_dump, deadlock detection) ------------------------------------ */

/* "mutex 0x...", "cond 0x...": each primitive is one executor's, so only its tasks can
 * complete a wait on it. */
static int wait_describe(const moor_future *fut, char *buf, size_t size)
{
    const wait_op *op = moor_container_of(fut, wait_op, base);
    const char *what = op->take_now == mutex_take  ? "mutex "
                       : op->take_now == never_now ? "cond "
                       : op->take_now == sem_take  ? "sem "
                       : op->take_now == wg_zero   ? "waitgroup "
                       : op->take_now == event_is_set ? "event "
                                                      : "sync wait ";
    moor__fmt out = moor__fmt_init(buf, size);
    moor__fmt_str(&out, what);
    moor__fmt_ptr(&out, op->obj);
    return MOOR_WAIT_LOCAL;
}

static moor_future_kind wait_kind = {&wait_ops, wait_describe, NULL};

__attribute__((constructor)) static void wait_kind_register(void)
{
    moor_future_kind_register(&wait_kind);
}
