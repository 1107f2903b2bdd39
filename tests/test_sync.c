/* Synchronisation between fibers: mutex (invariant under 1,000 contending fibers, FIFO
 * hand-off without barging, trylock, deadlines, cancellation), condition variable, semaphore,
 * wait group, one-shot event, and misuse.
 *
 * Checks inside fibers are FCHECKs (fixture.h). Timing is asserted only as a lower bound. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moor.h"

#include "fixture.h"

/* ---- scaffolding of this file (the shared fixture is in fixture.h) ---------------------- */

/* In a fiber returning intptr_t: a wait that should succeed but did not (a bug, or the
 * clean-up after a failed test cancelling it) is noted and the fiber gives up, rather than
 * go on to unlock what it does not hold. */
#define MUST(call)                                                                            \
    do {                                                                                      \
        if ((call) != 0) {                                                                    \
            FCHECK(!#call);                                                                   \
            return 0;                                                                         \
        }                                                                                     \
    } while (0)

/* ---- mutex: an invariant under 1,000 contending fibers -------------------------------------- */

#define MX_FIBERS 1000
#define MX_ROUNDS 5

typedef struct mx_shared {
    moor_mutex m;
    int counter;      /* read, yield, write back + 1: lost updates without the lock */
    int a, b;         /* a == b outside the lock */
    int inside, max_inside;
    int violations;
} mx_shared;

static intptr_t mx_worker(void *arg)
{
    mx_shared *s = arg;
    for (int r = 0; r < MX_ROUNDS; r++) {
        if (moor_mutex_lock(&s->m, moor_deadline_in(SAFETY_MS)) != 0) {
            FCHECK(!"lock failed");
            continue;
        }
        FCHECK(s->m.locked && s->m.owner == moor_self());
        if (++s->inside > s->max_inside)
            s->max_inside = s->inside;
        if (s->a != s->b)
            s->violations++;
        int c = s->counter;
        s->a++;
        moor_yield();
        if (s->a != s->b + 1)
            s->violations++;
        s->counter = c + 1;
        s->b++;
        if (r % 2)
            moor_yield();
        s->inside--;
        moor_mutex_unlock(&s->m);
        if (r % 3 == 0)
            moor_yield();
    }
    return 0;
}

static void test_sync_mutex_invariant_1000(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    mx_shared s = {.m = MOOR_MUTEX_INIT};
    moor_fiber **f = calloc(MX_FIBERS, sizeof *f);
    assert_non_null(f);
    for (int i = 0; i < MX_FIBERS; i++)
        assert_int_equal(moor_spawn(&f[i], mx_worker, &s, NULL), 0);
    for (int i = 0; i < MX_FIBERS; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    free(f);
    assert_int_equal(s.counter, MX_FIBERS * MX_ROUNDS);
    assert_int_equal(s.a, MX_FIBERS * MX_ROUNDS);
    assert_int_equal(s.b, MX_FIBERS * MX_ROUNDS);
    assert_int_equal(s.violations, 0);
    assert_int_equal(s.max_inside, 1);
    assert_int_equal(s.m.locked, 0);
    assert_null(s.m.owner);
    ex_free(ex);
}

/* ---- mutex: FIFO hand-off, no barging ------------------------------------------------------ */

#define HO_WAITERS 10

typedef struct ho_shared {
    moor_mutex m;
    int order[HO_WAITERS + 2];
    int norder;
    int holder_trylock_rc;
    int still_locked_after_unlock; /* counted by each waiter that unlocked with others queued */
} ho_shared;

typedef struct ho_arg {
    ho_shared *s;
    int id;
} ho_arg;

static intptr_t ho_holder(void *arg)
{
    ho_arg *h = arg;
    ho_shared *s = h->s;
    MUST(moor_mutex_lock(&s->m, -1));
    for (int i = 0; i < 4; i++) /* every waiter queues meanwhile */
        moor_yield();
    moor_mutex_unlock(&s->m);
    /* The lock went to the first waiter: no barging back in, not even by trylock. */
    FCHECK(s->m.locked && s->m.owner != moor_self());
    s->holder_trylock_rc = moor_mutex_trylock(&s->m);
    if (moor_mutex_lock(&s->m, moor_deadline_in(SAFETY_MS)) != 0) { /* queues behind all */
        FCHECK(!"lock failed");
        return 0;
    }
    s->order[s->norder++] = h->id;
    moor_mutex_unlock(&s->m);
    return 0;
}

static intptr_t ho_waiter(void *arg)
{
    ho_arg *w = arg;
    ho_shared *s = w->s;
    if (moor_mutex_lock(&s->m, w->id % 2 ? moor_deadline_in(SAFETY_MS) : -1) != 0) {
        FCHECK(!"lock failed");
        return 0;
    }
    FCHECK(s->m.owner == moor_self());
    s->order[s->norder++] = w->id;
    moor_yield();
    moor_mutex_unlock(&s->m);
    if (s->m.locked && s->m.owner != moor_self())
        s->still_locked_after_unlock++;
    /* Try to take it straight back: the next in the queue has it already. */
    if (moor_mutex_trylock(&s->m) == 0) {
        s->order[s->norder++] = 1000 + w->id; /* barged in: recorded as a failure */
        moor_mutex_unlock(&s->m);
    }
    return 0;
}

static void test_sync_mutex_fifo_handoff(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    ho_shared s = {.m = MOOR_MUTEX_INIT};
    ho_arg args[HO_WAITERS + 1];
    moor_fiber *f[HO_WAITERS + 1];
    args[0] = (ho_arg){&s, 100};
    assert_int_equal(moor_spawn(&f[0], ho_holder, &args[0], NULL), 0);
    for (int i = 1; i <= HO_WAITERS; i++) {
        args[i] = (ho_arg){&s, i};
        assert_int_equal(moor_spawn(&f[i], ho_waiter, &args[i], NULL), 0);
    }
    for (int i = 0; i <= HO_WAITERS; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    assert_int_equal(s.holder_trylock_rc, -EBUSY);
    assert_int_equal(s.norder, HO_WAITERS + 1);
    for (int i = 0; i < HO_WAITERS; i++)
        assert_int_equal(s.order[i], i + 1); /* the order they queued in */
    assert_int_equal(s.order[HO_WAITERS], 100); /* the old holder queued behind them */
    assert_int_equal(s.still_locked_after_unlock, HO_WAITERS); /* each handed it on */
    assert_int_equal(s.m.locked, 0);
    ex_free(ex);
}

/* ---- mutex: trylock, deadline, cancellation ------------------------------------------------- */

typedef struct hold_ctx {
    moor_mutex *m;
    moor_event release;
    int released;
} hold_ctx;

static intptr_t holder_fn(void *arg)
{
    hold_ctx *h = arg;
    MUST(moor_mutex_lock(h->m, -1));
    FCHECK(moor_event_wait(&h->release, moor_deadline_in(SAFETY_MS)) == 0);
    h->released = 1;
    moor_mutex_unlock(h->m);
    return 0;
}

typedef struct lock_call {
    moor_mutex *m;
    int64_t deadline;
    int rc;
    int returned;
    int owned;        /* it held the lock on return */
    int64_t returned_at;
} lock_call;

static intptr_t lock_fn(void *arg)
{
    lock_call *c = arg;
    c->rc = moor_mutex_lock(c->m, c->deadline);
    c->returned_at = moor_now();
    c->returned = 1;
    c->owned = c->m->locked && c->m->owner == moor_self();
    if (c->rc == 0)
        moor_mutex_unlock(c->m);
    return c->rc;
}

static void test_sync_mutex_trylock(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_mutex m = MOOR_MUTEX_INIT;
    /* From plain code. */
    assert_int_equal(moor_mutex_trylock(&m), 0);
    assert_true(m.locked);
    assert_int_equal(moor_mutex_trylock(&m), -EBUSY);
    moor_mutex_unlock(&m);
    assert_false(m.locked);
    /* Held by a fiber. */
    hold_ctx h = {&m, MOOR_EVENT_INIT, 0};
    moor_fiber *hf;
    assert_int_equal(moor_spawn(&hf, holder_fn, &h, NULL), 0);
    settle();
    assert_true(m.locked);
    assert_ptr_equal(m.owner, hf);
    assert_int_equal(moor_mutex_trylock(&m), -EBUSY);
    moor_event_set(&h.release);
    assert_int_equal(moor_join(hf, NULL), 0);
    assert_false(m.locked);
    assert_int_equal(moor_mutex_trylock(&m), 0);
    moor_mutex_unlock(&m);
    ex_free(ex);
}

static void test_sync_mutex_lock_deadline(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_mutex m = MOOR_MUTEX_INIT;
    hold_ctx h = {&m, MOOR_EVENT_INIT, 0};
    moor_fiber *hf, *lf;
    assert_int_equal(moor_spawn(&hf, holder_fn, &h, NULL), 0);
    settle();
    /* In a fiber. */
    lock_call c = {&m, moor_deadline_in(WAIT_MS), 1, 0, 0, 0};
    assert_int_equal(moor_spawn(&lf, lock_fn, &c, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(lf, &r), 0);
    assert_int_equal(r, -ETIMEDOUT);
    assert_true(c.returned_at >= c.deadline);
    assert_false(c.owned);
    /* From plain code. */
    int64_t deadline = moor_deadline_in(WAIT_MS);
    assert_int_equal(moor_mutex_lock(&m, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_ptr_equal(m.owner, hf);
    /* Neither timed-out waiter is left queued: the holder's unlock frees the mutex. */
    moor_event_set(&h.release);
    assert_int_equal(moor_join(hf, NULL), 0);
    assert_false(m.locked);
    assert_null(m.owner);
    ex_free(ex);
}

static void test_sync_mutex_cancelled_waiter(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_mutex m = MOOR_MUTEX_INIT;
    hold_ctx h = {&m, MOOR_EVENT_INIT, 0};
    moor_fiber *hf, *cf[2];
    assert_int_equal(moor_spawn(&hf, holder_fn, &h, NULL), 0);
    lock_call c[2] = {{&m, -1, 1, 0, 0, 0}, {&m, moor_deadline_in(SAFETY_MS), 1, 0, 0, 0}};
    for (int i = 0; i < 2; i++)
        assert_int_equal(moor_spawn(&cf[i], lock_fn, &c[i], NULL), 0);
    settle();
    for (int i = 0; i < 2; i++) {
        assert_false(c[i].returned);
        moor_cancel(cf[i]);
    }
    settle(); /* they see the cancel and withdraw */
    for (int i = 0; i < 2; i++) {
        assert_true(c[i].returned);
        assert_int_equal(c[i].rc, -ECANCELED);
        assert_false(c[i].owned);
    }
    /* The unlock does not hand the lock to a cancelled fiber. */
    moor_event_set(&h.release);
    assert_int_equal(moor_join(hf, NULL), 0);
    assert_false(m.locked);
    for (int i = 0; i < 2; i++) {
        intptr_t r = 0;
        assert_int_equal(moor_join(cf[i], &r), -ECANCELED);
        assert_int_equal(r, -ECANCELED);
    }

    /* A lock handed over just before the cancel arrives is kept (and must be unlocked).
     * Plain code holds it and hands it over, so that the waiter cannot run in between. */
    assert_int_equal(moor_mutex_lock(&m, -1), 0);
    c[0] = (lock_call){&m, -1, 1, 0, 0, 0};
    assert_int_equal(moor_spawn(&cf[0], lock_fn, &c[0], NULL), 0);
    settle();
    assert_false(c[0].returned);
    moor_mutex_unlock(&m); /* handed to the waiter */
    assert_true(m.locked);
    assert_ptr_equal(m.owner, cf[0]);
    moor_cancel(cf[0]);
    intptr_t r = 1;
    assert_int_equal(moor_join(cf[0], &r), -ECANCELED);
    assert_int_equal(r, 0);
    assert_true(c[0].owned);
    assert_false(m.locked); /* lock_fn unlocked it */
    ex_free(ex);
}

/* ---- condition variable ------------------------------------------------------------------- */

#define PC_PRODUCERS 3
#define PC_CONSUMERS 3
#define PC_ITEMS 300
#define PC_CAP 4

typedef struct pc_shared {
    moor_mutex m;
    moor_cond not_empty, not_full;
    int q[PC_CAP];
    int head, count;
    int finished;
    int seen[PC_PRODUCERS * PC_ITEMS];
    int consumed;
    int overflow;
} pc_shared;

typedef struct pc_arg {
    pc_shared *s;
    int id;
} pc_arg;

static intptr_t pc_producer(void *arg)
{
    pc_arg *a = arg;
    pc_shared *s = a->s;
    for (int i = 0; i < PC_ITEMS; i++) {
        MUST(moor_mutex_lock(&s->m, -1));
        while (s->count == PC_CAP) {
            if (moor_cond_wait(&s->not_full, &s->m, moor_deadline_in(SAFETY_MS)) != 0) {
                FCHECK(!"cond_wait failed");
                moor_mutex_unlock(&s->m);
                return 0;
            }
        }
        if (s->count >= PC_CAP)
            s->overflow++;
        s->q[(s->head + s->count++) % PC_CAP] = a->id * PC_ITEMS + i;
        moor_cond_signal(&s->not_empty);
        moor_mutex_unlock(&s->m);
        if (i % 7 == 0)
            moor_yield();
    }
    return 0;
}

static intptr_t pc_consumer(void *arg)
{
    pc_arg *a = arg;
    pc_shared *s = a->s;
    for (;;) {
        MUST(moor_mutex_lock(&s->m, -1));
        while (s->count == 0 && !s->finished) {
            if (moor_cond_wait(&s->not_empty, &s->m, -1) != 0) {
                FCHECK(!"cond_wait failed");
                moor_mutex_unlock(&s->m);
                return 0;
            }
        }
        FCHECK(s->m.owner == moor_self());
        if (s->count == 0) {
            moor_mutex_unlock(&s->m);
            return 0;
        }
        int v = s->q[s->head];
        s->head = (s->head + 1) % PC_CAP;
        s->count--;
        if (v >= 0 && v < PC_PRODUCERS * PC_ITEMS)
            s->seen[v]++;
        s->consumed++;
        moor_cond_signal(&s->not_full);
        moor_mutex_unlock(&s->m);
        if (v % 5 == a->id)
            moor_yield();
    }
}

static void test_sync_cond_producer_consumer(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    pc_shared *s = calloc(1, sizeof *s);
    assert_non_null(s);
    s->m = (moor_mutex)MOOR_MUTEX_INIT;
    s->not_empty = (moor_cond)MOOR_COND_INIT;
    s->not_full = (moor_cond)MOOR_COND_INIT;
    pc_arg pa[PC_PRODUCERS], ca[PC_CONSUMERS];
    moor_fiber *pf[PC_PRODUCERS], *cf[PC_CONSUMERS];
    for (int i = 0; i < PC_CONSUMERS; i++) {
        ca[i] = (pc_arg){s, i};
        assert_int_equal(moor_spawn(&cf[i], pc_consumer, &ca[i], NULL), 0);
    }
    for (int i = 0; i < PC_PRODUCERS; i++) {
        pa[i] = (pc_arg){s, i};
        assert_int_equal(moor_spawn(&pf[i], pc_producer, &pa[i], NULL), 0);
    }
    for (int i = 0; i < PC_PRODUCERS; i++)
        assert_int_equal(moor_join(pf[i], NULL), 0);
    /* Plain code ends it: under the lock, then wake every consumer. */
    assert_int_equal(moor_mutex_lock(&s->m, moor_deadline_in(SAFETY_MS)), 0);
    s->finished = 1;
    moor_cond_broadcast(&s->not_empty);
    moor_mutex_unlock(&s->m);
    for (int i = 0; i < PC_CONSUMERS; i++)
        assert_int_equal(moor_join(cf[i], NULL), 0);
    assert_int_equal(s->consumed, PC_PRODUCERS * PC_ITEMS);
    assert_int_equal(s->overflow, 0);
    for (int v = 0; v < PC_PRODUCERS * PC_ITEMS; v++)
        if (s->seen[v] != 1)
            fail_msg("item %d consumed %d times", v, s->seen[v]);
    free(s);
    ex_free(ex);
}

#define CV_WAITERS 5

typedef struct cv_shared {
    moor_mutex m;
    moor_cond c;
    int woken[CV_WAITERS];
    int order[CV_WAITERS];
    int nwoken;
} cv_shared;

typedef struct cv_arg {
    cv_shared *s;
    int id;
    int rc;
} cv_arg;

static intptr_t cv_waiter(void *arg)
{
    cv_arg *a = arg;
    cv_shared *s = a->s;
    MUST(moor_mutex_lock(&s->m, -1));
    a->rc = moor_cond_wait(&s->c, &s->m, a->id % 2 ? moor_deadline_in(SAFETY_MS) : -1);
    FCHECK(s->m.locked && s->m.owner == moor_self());
    s->woken[a->id] = 1;
    s->order[s->nwoken++] = a->id;
    moor_mutex_unlock(&s->m);
    return 0;
}

static int count_woken(const cv_shared *s)
{
    int n = 0;
    for (int i = 0; i < CV_WAITERS; i++)
        n += s->woken[i];
    return n;
}

static void test_sync_cond_signal_one_broadcast_all(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    cv_shared s = {.m = MOOR_MUTEX_INIT, .c = MOOR_COND_INIT};
    cv_arg a[CV_WAITERS];
    moor_fiber *f[CV_WAITERS];
    for (int i = 0; i < CV_WAITERS; i++) {
        a[i] = (cv_arg){&s, i, 1};
        assert_int_equal(moor_spawn(&f[i], cv_waiter, &a[i], NULL), 0);
    }
    settle();
    assert_int_equal(count_woken(&s), 0);
    assert_false(s.m.locked); /* every waiter released the mutex while waiting */
    moor_cond_signal(&s.c);
    settle();
    assert_int_equal(count_woken(&s), 1);
    assert_true(s.woken[0]); /* the one that waited longest */
    moor_cond_signal(&s.c);
    settle();
    assert_int_equal(count_woken(&s), 2);
    assert_true(s.woken[1]);
    moor_cond_broadcast(&s.c);
    settle();
    assert_int_equal(count_woken(&s), CV_WAITERS);
    for (int i = 0; i < CV_WAITERS; i++) {
        assert_int_equal(moor_join(f[i], NULL), 0);
        assert_int_equal(a[i].rc, 0);
        assert_int_equal(s.order[i], i);
    }
    /* A signal with nobody waiting is not remembered. */
    moor_cond_signal(&s.c);
    moor_cond_broadcast(&s.c);
    assert_int_equal(moor_mutex_lock(&s.m, -1), 0);
    int64_t deadline = moor_deadline_in(WAIT_MS);
    assert_int_equal(moor_cond_wait(&s.c, &s.m, deadline), -ETIMEDOUT); /* from plain code */
    assert_true(moor_now() >= deadline);
    assert_true(s.m.locked);
    moor_mutex_unlock(&s.m);
    ex_free(ex);
}

/* cond_wait with a deadline: -ETIMEDOUT, and the mutex held again on return, even when
 * another fiber holds it at the moment the deadline passes. */
typedef struct cvd_shared {
    moor_mutex m;
    moor_cond c;
    int64_t deadline;
    int rc;
    int64_t returned_at;
    int relocked;
    int other_released; /* the other fiber had let go before the waiter returned */
    int saw_release;
} cvd_shared;

static intptr_t cvd_waiter(void *arg)
{
    cvd_shared *s = arg;
    MUST(moor_mutex_lock(&s->m, -1));
    s->rc = moor_cond_wait(&s->c, &s->m, s->deadline);
    s->returned_at = moor_now();
    s->relocked = s->m.locked && s->m.owner == moor_self();
    s->saw_release = s->other_released;
    moor_mutex_unlock(&s->m);
    return 0;
}

static intptr_t cvd_other(void *arg)
{
    cvd_shared *s = arg;
    MUST(moor_mutex_lock(&s->m, -1)); /* free once the waiter waits */
    /* Hold the mutex past the waiter's deadline. */
    FCHECK(moor_sleep(s->deadline + WAIT_MS) == 0);
    s->other_released = 1;
    moor_mutex_unlock(&s->m);
    return 0;
}

static void test_sync_cond_wait_deadline(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    for (int contended = 0; contended < 2; contended++) {
        cvd_shared s = {.m = MOOR_MUTEX_INIT, .c = MOOR_COND_INIT, .rc = 1};
        s.deadline = moor_deadline_in(WAIT_MS);
        moor_fiber *w, *o = NULL;
        assert_int_equal(moor_spawn(&w, cvd_waiter, &s, NULL), 0);
        if (contended)
            assert_int_equal(moor_spawn(&o, cvd_other, &s, NULL), 0);
        assert_int_equal(moor_join(w, NULL), 0);
        if (o)
            assert_int_equal(moor_join(o, NULL), 0);
        assert_int_equal(s.rc, -ETIMEDOUT);
        assert_true(s.returned_at >= s.deadline);
        assert_true(s.relocked);
        assert_int_equal(s.saw_release, contended);
        assert_false(s.m.locked);
    }
    ex_free(ex);
}

/* A fiber cancelled in cond_wait returns -ECANCELED with the mutex held. */
static void test_sync_cond_wait_cancelled(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    cvd_shared s = {.m = MOOR_MUTEX_INIT, .c = MOOR_COND_INIT, .rc = 1, .deadline = -1};
    moor_fiber *w;
    assert_int_equal(moor_spawn(&w, cvd_waiter, &s, NULL), 0);
    settle();
    assert_false(s.m.locked);
    /* Plain code holds the mutex when the cancel arrives: the waiter relocks after it. */
    assert_int_equal(moor_mutex_lock(&s.m, -1), 0);
    moor_cancel(w);
    settle();
    assert_int_equal(s.rc, 1); /* not back yet: waiting for the mutex, uncancellably */
    s.other_released = 1;
    moor_mutex_unlock(&s.m);
    assert_int_equal(moor_join(w, NULL), -ECANCELED);
    assert_int_equal(s.rc, -ECANCELED);
    assert_true(s.relocked);
    assert_true(s.saw_release);
    assert_false(s.m.locked);
    /* A signal now reaches nobody: the cancelled waiter left the queue. */
    moor_cond_signal(&s.c);
    ex_free(ex);
}

/* ---- semaphore ---------------------------------------------------------------------------- */

#define SEM_PERMITS 3
#define SEM_FIBERS 30

typedef struct sem_shared {
    moor_sem s;
    int inside, max_inside;
    int order[16];
    int norder;
} sem_shared;

typedef struct sem_arg {
    sem_shared *sh;
    int id;
    int64_t deadline;
    int rc;
    int returned;
    int64_t returned_at;
} sem_arg;

static intptr_t sem_worker(void *arg)
{
    sem_arg *a = arg;
    sem_shared *sh = a->sh;
    MUST(moor_sem_acquire(&sh->s, a->id % 2 ? moor_deadline_in(SAFETY_MS) : -1));
    if (++sh->inside > sh->max_inside)
        sh->max_inside = sh->inside;
    for (int i = 0; i < 1 + a->id % 3; i++)
        moor_yield();
    sh->inside--;
    moor_sem_release(&sh->s);
    return 0;
}

static void test_sync_sem_bounds_concurrency(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    sem_shared sh = {.s = MOOR_SEM_INIT(SEM_PERMITS)};
    sem_arg a[SEM_FIBERS];
    moor_fiber *f[SEM_FIBERS];
    for (int i = 0; i < SEM_FIBERS; i++) {
        a[i] = (sem_arg){.sh = &sh, .id = i};
        assert_int_equal(moor_spawn(&f[i], sem_worker, &a[i], NULL), 0);
    }
    for (int i = 0; i < SEM_FIBERS; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    assert_int_equal(sh.max_inside, SEM_PERMITS);
    assert_int_equal(sh.inside, 0);
    assert_int_equal(sh.s.permits, SEM_PERMITS);
    ex_free(ex);
}

static intptr_t sem_acquirer(void *arg)
{
    sem_arg *a = arg;
    a->rc = moor_sem_acquire(&a->sh->s, a->deadline);
    a->returned_at = moor_now();
    a->returned = 1;
    if (a->rc == 0)
        a->sh->order[a->sh->norder++] = a->id;
    return a->rc;
}

static void test_sync_sem_fifo_try_deadline_cancel(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    enum { N = 6 };
    sem_shared sh = {.s = MOOR_SEM_INIT(0)};
    sem_arg a[N];
    moor_fiber *f[N];
    for (int i = 0; i < N; i++) {
        a[i] = (sem_arg){.sh = &sh, .id = i, .deadline = i % 2 ? moor_deadline_in(SAFETY_MS) : -1};
        assert_int_equal(moor_spawn(&f[i], sem_acquirer, &a[i], NULL), 0);
    }
    settle();
    /* Each release hands its permit to the longest waiter; nobody barges in. */
    for (int i = 0; i < N; i++) {
        moor_sem_release(&sh.s);
        assert_int_equal(sh.s.permits, 0);
        assert_int_equal(moor_sem_try_acquire(&sh.s), -EAGAIN);
        settle();
        assert_int_equal(sh.norder, i + 1);
        assert_int_equal(sh.order[i], i);
    }
    for (int i = 0; i < N; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);

    /* try_acquire. */
    assert_int_equal(moor_sem_try_acquire(&sh.s), -EAGAIN);
    moor_sem_release(&sh.s);
    moor_sem_release(&sh.s);
    assert_int_equal(sh.s.permits, 2);
    assert_int_equal(moor_sem_try_acquire(&sh.s), 0);
    assert_int_equal(moor_sem_try_acquire(&sh.s), 0);
    assert_int_equal(moor_sem_try_acquire(&sh.s), -EAGAIN);
    assert_int_equal(sh.s.permits, 0);

    /* A deadline, in a fiber and from plain code. */
    sem_arg d = {.sh = &sh, .id = 50, .deadline = moor_deadline_in(WAIT_MS)};
    moor_fiber *df;
    assert_int_equal(moor_spawn(&df, sem_acquirer, &d, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(df, &r), 0);
    assert_int_equal(r, -ETIMEDOUT);
    assert_true(d.returned_at >= d.deadline);
    int64_t deadline = moor_deadline_in(WAIT_MS);
    assert_int_equal(moor_sem_acquire(&sh.s, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);

    /* Cancelled waiters withdraw: the next release is a permit, not a hand-over to them. */
    sem_arg c = {.sh = &sh, .id = 60, .deadline = -1};
    moor_fiber *cf;
    assert_int_equal(moor_spawn(&cf, sem_acquirer, &c, NULL), 0);
    settle();
    moor_cancel(cf);
    assert_int_equal(moor_join(cf, &r), -ECANCELED);
    assert_int_equal(r, -ECANCELED);
    moor_sem_release(&sh.s);
    assert_int_equal(sh.s.permits, 1);
    assert_int_equal(moor_sem_acquire(&sh.s, -1), 0);
    ex_free(ex);
}

/* ---- wait group ----------------------------------------------------------------------------- */

#define WG_WORKERS 50
#define WG_WAITERS 3

typedef struct wg_shared {
    moor_waitgroup wg;
    int done_count;
} wg_shared;

typedef struct wg_arg {
    wg_shared *s;
    int id;
    int rc;
    int saw_done;
    size_t saw_count;
} wg_arg;

static intptr_t wg_worker(void *arg)
{
    wg_arg *a = arg;
    for (int i = 0; i < a->id % 5; i++)
        moor_yield();
    a->s->done_count++;
    moor_waitgroup_done(&a->s->wg);
    return 0;
}

static intptr_t wg_waiter(void *arg)
{
    wg_arg *a = arg;
    a->rc = moor_waitgroup_wait(&a->s->wg, a->id % 2 ? moor_deadline_in(SAFETY_MS) : -1);
    a->saw_done = a->s->done_count;
    a->saw_count = a->s->wg.count;
    return 0;
}

static void test_sync_waitgroup(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    wg_shared s = {.wg = MOOR_WAITGROUP_INIT};
    /* Zero: returns at once. */
    assert_int_equal(moor_waitgroup_wait(&s.wg, -1), 0);
    moor_waitgroup_add(&s.wg, WG_WORKERS);
    assert_int_equal(s.wg.count, WG_WORKERS);
    wg_arg wa[WG_WAITERS], ka[WG_WORKERS];
    moor_fiber *wf[WG_WAITERS], *kf[WG_WORKERS];
    for (int i = 0; i < WG_WAITERS; i++) {
        wa[i] = (wg_arg){.s = &s, .id = i, .rc = 1};
        assert_int_equal(moor_spawn(&wf[i], wg_waiter, &wa[i], NULL), 0);
    }
    for (int i = 0; i < WG_WORKERS; i++) {
        ka[i] = (wg_arg){.s = &s, .id = i};
        assert_int_equal(moor_spawn(&kf[i], wg_worker, &ka[i], NULL), 0);
    }
    for (int i = 0; i < WG_WAITERS; i++) {
        assert_int_equal(moor_join(wf[i], NULL), 0);
        assert_int_equal(wa[i].rc, 0);
        assert_int_equal(wa[i].saw_done, WG_WORKERS); /* not a moment earlier */
        assert_int_equal(wa[i].saw_count, 0);
    }
    for (int i = 0; i < WG_WORKERS; i++)
        assert_int_equal(moor_join(kf[i], NULL), 0);

    /* A deadline: -ETIMEDOUT while the count is not zero, in a fiber and from plain code. */
    moor_waitgroup_add(&s.wg, 1);
    int64_t deadline = moor_deadline_in(WAIT_MS);
    assert_int_equal(moor_waitgroup_wait(&s.wg, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    wg_arg w1 = {.s = &s, .id = 1, .rc = 1};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, wg_waiter, &w1, NULL), 0);
    settle();
    assert_int_equal(w1.rc, 1); /* waiting */
    /* A cancelled waiter withdraws. */
    wg_arg w2 = {.s = &s, .id = 0, .rc = 1};
    moor_fiber *g;
    assert_int_equal(moor_spawn(&g, wg_waiter, &w2, NULL), 0);
    settle();
    moor_cancel(g);
    assert_int_equal(moor_join(g, NULL), -ECANCELED);
    assert_int_equal(w2.rc, -ECANCELED);
    moor_waitgroup_done(&s.wg);
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(w1.rc, 0);
    assert_int_equal(moor_waitgroup_wait(&s.wg, moor_now() - 1), 0); /* zero: at once */
    ex_free(ex);
}

/* ---- event ---------------------------------------------------------------------------------- */

#define EV_WAITERS 10

typedef struct ev_arg {
    moor_event *e;
    int64_t deadline;
    int rc;
    int returned;
    int64_t returned_at;
} ev_arg;

static intptr_t ev_waiter(void *arg)
{
    ev_arg *a = arg;
    a->rc = moor_event_wait(a->e, a->deadline);
    a->returned_at = moor_now();
    a->returned = 1;
    return a->rc;
}

static void test_sync_event(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_event e = MOOR_EVENT_INIT;
    ev_arg a[EV_WAITERS];
    moor_fiber *f[EV_WAITERS];
    for (int i = 0; i < EV_WAITERS; i++) {
        a[i] = (ev_arg){&e, i % 2 ? moor_deadline_in(SAFETY_MS) : -1, 1, 0, 0};
        assert_int_equal(moor_spawn(&f[i], ev_waiter, &a[i], NULL), 0);
    }
    settle();
    for (int i = 0; i < EV_WAITERS; i++)
        assert_false(a[i].returned);
    assert_false(e.set);
    moor_event_set(&e); /* one set releases all of them */
    assert_true(e.set);
    settle();
    for (int i = 0; i < EV_WAITERS; i++) {
        assert_true(a[i].returned);
        assert_int_equal(a[i].rc, 0);
        assert_int_equal(moor_join(f[i], NULL), 0);
    }
    moor_event_set(&e); /* idempotent */
    assert_true(e.set);
    /* After the set, a wait returns at once, even with a deadline already past. */
    assert_int_equal(moor_event_wait(&e, -1), 0);
    assert_int_equal(moor_event_wait(&e, moor_now() - 1), 0);
    ev_arg late = {&e, moor_now() - 1, 1, 0, 0};
    moor_fiber *lf;
    assert_int_equal(moor_spawn(&lf, ev_waiter, &late, NULL), 0);
    assert_int_equal(moor_join(lf, NULL), 0);
    assert_int_equal(late.rc, 0);

    /* A deadline on an event never set, in a fiber and from plain code. */
    moor_event e2 = MOOR_EVENT_INIT;
    ev_arg d = {&e2, moor_deadline_in(WAIT_MS), 1, 0, 0};
    assert_int_equal(moor_spawn(&lf, ev_waiter, &d, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(lf, &r), 0);
    assert_int_equal(r, -ETIMEDOUT);
    assert_true(d.returned_at >= d.deadline);
    int64_t deadline = moor_deadline_in(WAIT_MS);
    assert_int_equal(moor_event_wait(&e2, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    /* Cancelled while waiting. */
    ev_arg c = {&e2, -1, 1, 0, 0};
    assert_int_equal(moor_spawn(&lf, ev_waiter, &c, NULL), 0);
    settle();
    moor_cancel(lf);
    assert_int_equal(moor_join(lf, &r), -ECANCELED);
    assert_int_equal(r, -ECANCELED);
    moor_event_set(&e2); /* nobody left to wake */
    ex_free(ex);
}

/* ---- misuse (forked children) -------------------------------------------------------------- */

static void unlock_unlocked_child(void *arg)
{
    (void)arg;
    moor_mutex m = MOOR_MUTEX_INIT;
    moor_mutex_unlock(&m);
}

static intptr_t lock_and_return(void *arg)
{
    return moor_mutex_lock(arg, -1);
}

static void unlock_not_owner_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    static moor_mutex m = MOOR_MUTEX_INIT;
    moor_fiber *f;
    CHILD_REQUIRE(moor_spawn(&f, lock_and_return, &m, NULL) == 0);
    CHILD_REQUIRE(moor_join(f, NULL) == 0);
    CHILD_REQUIRE(m.locked);
    moor_mutex_unlock(&m); /* plain code, not the fiber that locked it */
}

static intptr_t lock_twice(void *arg)
{
    moor_mutex_lock(arg, -1);
    return moor_mutex_lock(arg, -1);
}

static void relock_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    static moor_mutex m = MOOR_MUTEX_INIT;
    moor_fiber *f;
    moor_fiber_attr attr = {.name = "relocker"};
    CHILD_REQUIRE(moor_spawn(&f, lock_twice, &m, &attr) == 0);
    moor_join(f, NULL);
}

static void wg_done_too_often_child(void *arg)
{
    (void)arg;
    moor_waitgroup wg = MOOR_WAITGROUP_INIT;
    moor_waitgroup_add(&wg, 2);
    moor_waitgroup_done(&wg);
    moor_waitgroup_done(&wg);
    moor_waitgroup_done(&wg);
}

static void test_sync_misuse_asserts(void **state)
{
    (void)state;
    child_report r;
    child_run(unlock_unlocked_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_mutex_unlock: the mutex is not locked");
    child_run(unlock_not_owner_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_mutex_unlock: called by a fiber that does not hold it");
    child_run(relock_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "\"relocker\" already holds this mutex");
    child_run(wg_done_too_often_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_waitgroup_done: called more often than added");
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_sync_mutex_invariant_1000),
        TEST(test_sync_mutex_fifo_handoff),
        TEST(test_sync_mutex_trylock),
        TEST(test_sync_mutex_lock_deadline),
        TEST(test_sync_mutex_cancelled_waiter),
        TEST(test_sync_cond_producer_consumer),
        TEST(test_sync_cond_signal_one_broadcast_all),
        TEST(test_sync_cond_wait_deadline),
        TEST(test_sync_cond_wait_cancelled),
        TEST(test_sync_sem_bounds_concurrency),
        TEST(test_sync_sem_fifo_try_deadline_cancel),
        TEST(test_sync_waitgroup),
        TEST(test_sync_event),
        TEST(test_sync_misuse_asserts),
    };
    return RUN_TESTS(tests);
}
