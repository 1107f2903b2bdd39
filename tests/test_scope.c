/* Scopes: closing cancels and reaps 10,000 children, children that return are released at
 * once, waiting without cancelling, deadlines on wait and close (a child that ignores the
 * cancel for a while is still released correctly when it returns), cancellation reaching
 * children blocked in I/O and in locks, nested scopes, several waiters on one scope, and
 * misuse.
 *
 * Checks inside fibers are FCHECKs (fixture.h). Timing is asserted only as a lower bound. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "moor.h"

#include "fixture.h"

/* ---- scaffolding of this file (the shared fixture is in fixture.h) ---------------------- */

/* ---- close cancels 10,000 children ------------------------------------------------------- */

#define MANY_KIDS FIBER_COUNT(10000, 2000) /* all alive at once */

typedef struct many_ctx {
    moor_chan *ch;
    moor_scope scope;
    int alive;
    int started;
    int cancelled_rcs;
    int other_rcs;
    size_t count_before, count_after;
    size_t live_before, live_after;
    int close_rc;
} many_ctx;

static intptr_t many_kid(void *arg)
{
    many_ctx *m = arg;
    m->alive++;
    m->started++;
    int rc;
    if (m->started % 2) {
        rc = moor_sleep(-1);
    } else {
        int v;
        rc = moor_chan_recv(m->ch, &v, -1);
    }
    if (rc == -ECANCELED)
        m->cancelled_rcs++;
    else
        m->other_rcs++;
    m->alive--;
    return rc;
}

static intptr_t many_owner(void *arg)
{
    many_ctx *m = arg;
    moor_executor *ex = moor_executor_current();
    moor_scope_init(&m->scope);
    for (int i = 0; i < MANY_KIDS; i++)
        FCHECK(moor_scope_spawn(&m->scope, many_kid, m, NULL) == 0);
    moor_yield(); /* every child runs once and blocks */
    m->count_before = m->scope.count;
    m->live_before = ex_stats(ex).fibers;
    m->close_rc = moor_scope_close(&m->scope, -1);
    m->count_after = m->scope.count;
    m->live_after = ex_stats(ex).fibers;
    return 0;
}

static void test_scope_close_cancels_10000(void **state)
{
    (void)state;
    moor_executor_attr attr = {.stack_size = 64 * 1024};
    moor_executor *ex = ex_new_attr(&attr);
    many_ctx *m = calloc(1, sizeof *m);
    assert_non_null(m);
    assert_int_equal(moor_chan_new(&m->ch, sizeof(int), 0), 0);
    moor_fiber *owner;
    assert_int_equal(moor_spawn(&owner, many_owner, m, NULL), 0);
    assert_int_equal(moor_join(owner, NULL), 0);
    assert_int_equal(m->count_before, MANY_KIDS);
    assert_int_equal(m->live_before, MANY_KIDS + 1);
    assert_int_equal(m->started, MANY_KIDS);
    assert_int_equal(m->close_rc, 0);
    assert_int_equal(m->count_after, 0);
    assert_int_equal(m->alive, 0);             /* every child returned before close did */
    assert_int_equal(m->live_after, 1);        /* and was released: only the owner is left */
    assert_int_equal(m->cancelled_rcs, MANY_KIDS);
    assert_int_equal(m->other_rcs, 0);
    moor_chan_free(m->ch); /* asserts if a cancelled receiver were still queued */
    free(m);
    ex_free(ex);
}

/* The same from plain code (a scope with no owning fiber). */
static void test_scope_close_from_plain_code(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    many_ctx m = {0};
    assert_int_equal(moor_chan_new(&m.ch, sizeof(int), 0), 0);
    moor_scope_init(&m.scope);
    for (int i = 0; i < 100; i++)
        assert_int_equal(moor_scope_spawn(&m.scope, many_kid, &m, NULL), 0);
    assert_int_equal(m.scope.count, 100);
    settle();
    assert_int_equal(m.alive, 100);
    assert_int_equal(moor_scope_close(&m.scope, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(m.scope.count, 0);
    assert_int_equal(m.alive, 0);
    assert_int_equal(m.cancelled_rcs, 100);
    assert_int_equal(ex_stats(ex).fibers, 0);
    /* Closing a scope whose children have all returned: 0 at once. */
    moor_scope s2;
    moor_scope_init(&s2);
    assert_int_equal(moor_scope_spawn(&s2, yield_n, (void *)2, NULL), 0);
    settle();
    assert_int_equal(s2.count, 0);
    assert_int_equal(moor_scope_close(&s2, moor_now() - 1), 0);
    moor_chan_free(m.ch);
    ex_free(ex);
}

/* ---- children that finish early are released at once ------------------------------------ */

#define EARLY_KIDS 8

typedef struct early_ctx {
    moor_scope scope;
    size_t counts[EARLY_KIDS + 4];
    size_t lives[EARLY_KIDS + 4];
    int nsamples;
    int close_rc;
} early_ctx;

static intptr_t early_owner(void *arg)
{
    early_ctx *e = arg;
    moor_executor *ex = moor_executor_current();
    moor_scope_init(&e->scope);
    for (intptr_t i = 0; i < EARLY_KIDS; i++)
        FCHECK(moor_scope_spawn(&e->scope, yield_n, (void *)i, NULL) == 0);
    FCHECK(e->scope.count == EARLY_KIDS);
    /* Child i returns after i yields: sample after each round. */
    while (e->nsamples < EARLY_KIDS + 4) {
        moor_yield();
        e->counts[e->nsamples] = e->scope.count;
        e->lives[e->nsamples] = ex_stats(ex).fibers;
        e->nsamples++;
    }
    e->close_rc = moor_scope_close(&e->scope, -1);
    return 0;
}

static void test_scope_children_released_early(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    early_ctx e = {0};
    moor_fiber *owner;
    assert_int_equal(moor_spawn(&owner, early_owner, &e, NULL), 0);
    assert_int_equal(moor_join(owner, NULL), 0);
    assert_int_equal(e.close_rc, 0);
    for (int i = 0; i < e.nsamples; i++) {
        /* Every child that has returned is gone from the executor too (+1: the owner). */
        assert_int_equal(e.lives[i], e.counts[i] + 1);
        if (i > 0)
            assert_true(e.counts[i] <= e.counts[i - 1]);
    }
    assert_true(e.counts[0] < EARLY_KIDS);  /* the first ones returned in round one */
    assert_true(e.counts[0] > 0);           /* and not all of them */
    assert_int_equal(e.counts[e.nsamples - 1], 0); /* all returned without a close */
    ex_free(ex);
}

/* ---- wait ----------------------------------------------------------------------------------- */

typedef struct wait_kid {
    int64_t sleep_until;
    moor_event *release;
    int linger; /* yields after the wait, before returning */
    int rc;
    int was_cancelled;
    int returned;
} wait_kid;

static intptr_t wait_kid_fn(void *arg)
{
    wait_kid *k = arg;
    if (k->release)
        k->rc = moor_event_wait(k->release, -1);
    else
        k->rc = moor_sleep(k->sleep_until);
    k->was_cancelled = moor_cancelled();
    for (int i = 0; i < k->linger; i++)
        moor_yield();
    k->returned = 1;
    return 0;
}

typedef struct wait_owner_ctx {
    wait_kid kids[4];
    moor_event release;
    int wait_rc, wait_rc2, timed_rc, close_rc;
    int64_t deadline, timed_out_at, waited_until;
    size_t count_at_timeout;
} wait_owner_ctx;

static intptr_t wait_owner(void *arg)
{
    wait_owner_ctx *w = arg;
    moor_scope scope;
    moor_scope_init(&scope);
    int64_t until = moor_deadline_in(WAIT_MS);
    for (int i = 0; i < 3; i++) {
        w->kids[i] = (wait_kid){.sleep_until = until};
        FCHECK(moor_scope_spawn(&scope, wait_kid_fn, &w->kids[i], NULL) == 0);
    }
    /* Without cancelling: every child finishes its sleep. */
    w->wait_rc = moor_scope_wait(&scope, -1);
    w->waited_until = moor_now();
    FCHECK(scope.count == 0);

    /* A deadline while a child is still blocked: -ETIMEDOUT, the child left alone. */
    w->kids[3] = (wait_kid){.release = &w->release};
    FCHECK(moor_scope_spawn(&scope, wait_kid_fn, &w->kids[3], NULL) == 0);
    w->deadline = moor_deadline_in(WAIT_MS);
    w->timed_rc = moor_scope_wait(&scope, w->deadline);
    w->timed_out_at = moor_now();
    w->count_at_timeout = scope.count;
    moor_event_set(&w->release);
    w->wait_rc2 = moor_scope_wait(&scope, moor_deadline_in(SAFETY_MS));
    w->close_rc = moor_scope_close(&scope, -1);
    return 0;
}

static void test_scope_wait_without_cancelling(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    wait_owner_ctx w = {.release = MOOR_EVENT_INIT};
    moor_fiber *owner;
    assert_int_equal(moor_spawn(&owner, wait_owner, &w, NULL), 0);
    assert_int_equal(moor_join(owner, NULL), 0);
    assert_int_equal(w.wait_rc, 0);
    assert_true(w.waited_until >= w.kids[0].sleep_until);
    for (int i = 0; i < 4; i++) {
        assert_true(w.kids[i].returned);
        assert_int_equal(w.kids[i].rc, 0);         /* finished normally */
        assert_false(w.kids[i].was_cancelled);     /* neither wait cancelled anything */
    }
    assert_int_equal(w.timed_rc, -ETIMEDOUT);
    assert_true(w.timed_out_at >= w.deadline);
    assert_int_equal(w.count_at_timeout, 1);
    assert_int_equal(w.wait_rc2, 0);
    assert_int_equal(w.close_rc, 0);
    ex_free(ex);
}

/* From plain code, and a waiter that is cancelled (the children keep running). */
typedef struct scope_waiter {
    moor_scope *scope;
    int64_t deadline;
    int rc;
    int returned;
} scope_waiter;

static intptr_t scope_waiter_fn(void *arg)
{
    scope_waiter *w = arg;
    w->rc = moor_scope_wait(w->scope, w->deadline);
    w->returned = 1;
    return w->rc;
}

static void test_scope_wait_plain_code_and_cancelled_waiter(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_event release = MOOR_EVENT_INIT;
    moor_scope scope;
    moor_scope_init(&scope);
    wait_kid k = {.release = &release};
    assert_int_equal(moor_scope_spawn(&scope, wait_kid_fn, &k, NULL), 0);
    int64_t deadline = moor_deadline_in(WAIT_MS);
    assert_int_equal(moor_scope_wait(&scope, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_int_equal(scope.count, 1);

    scope_waiter w = {&scope, -1, 1, 0};
    moor_fiber *wf;
    assert_int_equal(moor_spawn(&wf, scope_waiter_fn, &w, NULL), 0);
    settle();
    assert_false(w.returned);
    moor_cancel(wf);
    assert_int_equal(moor_join(wf, NULL), -ECANCELED);
    assert_int_equal(w.rc, -ECANCELED);
    assert_false(k.returned); /* the child keeps running */
    assert_int_equal(scope.count, 1);

    moor_event_set(&release);
    assert_int_equal(moor_scope_wait(&scope, -1), 0);
    assert_true(k.returned);
    assert_int_equal(k.rc, 0);
    assert_false(k.was_cancelled);
    assert_int_equal(moor_scope_close(&scope, -1), 0);
    ex_free(ex);
}

/* Two fibers wait on one scope, or one waits while another closes it: every one of them
 * returns once the children have. Counted in scheduling rounds, not time: a waiter left
 * behind is cancelled so that the test can end, then reported. */
static void test_scope_several_waiters(void **state)
{
    (void)state;
    static const char *const what[2] = {"two fibers in moor_scope_wait",
                                        "a fiber in moor_scope_wait while the scope is closed"};
    int stuck[2] = {0, 0};
    for (int variant = 0; variant < 2; variant++) {
        moor_executor *ex = ex_new();
        moor_event release = MOOR_EVENT_INIT;
        moor_scope scope;
        moor_scope_init(&scope);
        wait_kid k = {.release = &release, .linger = 3}; /* the waits start before it ends */
        assert_int_equal(moor_scope_spawn(&scope, wait_kid_fn, &k, NULL), 0);
        scope_waiter w[2] = {{&scope, -1, 1, 0}, {&scope, -1, 1, 0}};
        moor_fiber *wf[2];
        int nwaiters = variant == 0 ? 2 : 1;
        for (int i = 0; i < nwaiters; i++)
            assert_int_equal(moor_spawn(&wf[i], scope_waiter_fn, &w[i], NULL), 0);
        settle();
        if (variant == 0)
            moor_event_set(&release); /* the child returns: both waits are over */
        else /* the close cancels the child */
            assert_int_equal(moor_scope_close(&scope, moor_deadline_in(SAFETY_MS)), 0);
        settle();
        for (int i = 0; i < nwaiters; i++) {
            if (!w[i].returned) {
                stuck[variant]++;
                moor_cancel(wf[i]); /* so that the test can end */
            }
        }
        for (int i = 0; i < nwaiters; i++)
            moor_join(wf[i], NULL);
        if (variant == 0)
            assert_int_equal(moor_scope_close(&scope, -1), 0);
        ex_free(ex);
        for (int i = 0; i < nwaiters && !stuck[variant]; i++)
            assert_int_equal(w[i].rc, 0);
    }
    for (int variant = 0; variant < 2; variant++)
        if (stuck[variant])
            print_message("%s: %d waiter(s) never woke after the last child returned\n",
                          what[variant], stuck[variant]);
    assert_int_equal(stuck[0] + stuck[1], 0);
}

/* ---- close with a deadline and a child that ignores the cancel ------------------------- */

#define STUBBORN_MS 200

typedef struct stubborn_ctx {
    int64_t start;
    int stubborn_done;
    int stubborn_saw_cancel;
    unsigned long spins;
    wait_kid polite;
    int close_rc;
    int64_t close_deadline, close_returned_at;
    size_t count_after;
    size_t live_after;
} stubborn_ctx;

static intptr_t stubborn_fn(void *arg)
{
    stubborn_ctx *s = arg;
    /* CPU work with yields that never looks at the cancel. */
    while (moor_now() < s->start + STUBBORN_MS) {
        moor_yield();
        s->spins++;
    }
    s->stubborn_saw_cancel = moor_cancelled();
    s->stubborn_done = 1;
    return 0;
}

static intptr_t stubborn_owner(void *arg)
{
    stubborn_ctx *s = arg;
    moor_scope scope; /* on this fiber's stack, gone when it returns */
    moor_scope_init(&scope);
    s->polite = (wait_kid){.sleep_until = -1};
    FCHECK(moor_scope_spawn(&scope, stubborn_fn, s, NULL) == 0);
    FCHECK(moor_scope_spawn(&scope, wait_kid_fn, &s->polite, NULL) == 0);
    moor_yield();
    s->close_deadline = moor_deadline_in(WAIT_MS);
    s->close_rc = moor_scope_close(&scope, s->close_deadline);
    s->close_returned_at = moor_now();
    s->count_after = scope.count;
    s->live_after = ex_stats(moor_executor_current()).fibers;
    return 0;
}

static void test_scope_close_deadline_stubborn_child(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    stubborn_ctx s = {.start = moor_now()};
    moor_fiber *owner;
    assert_int_equal(moor_spawn(&owner, stubborn_owner, &s, NULL), 0);
    assert_int_equal(moor_join(owner, NULL), 0);
    assert_int_equal(s.close_rc, -ETIMEDOUT);
    assert_true(s.close_returned_at >= s.close_deadline);
    assert_int_equal(s.count_after, 0);    /* the scope let go of it */
    assert_true(s.polite.returned);        /* the cooperative child was reaped */
    assert_int_equal(s.polite.rc, -ECANCELED);
    if (!s.stubborn_done) {
        /* Still running: owner + stubborn child at the close, now only the child. */
        assert_int_equal(s.live_after, 2);
        assert_int_equal(ex_stats(ex).fibers, 1);
    }
    /* Run the executor until the stubborn child returns: it is released then (its scope
     * is long gone with the owner's stack). */
    assert_int_equal(moor_executor_run(ex), 0);
    assert_true(s.stubborn_done);
    assert_true(s.stubborn_saw_cancel); /* it had been cancelled */
    assert_true(moor_now() >= s.start + STUBBORN_MS);
    assert_int_equal(ex_stats(ex).fibers, 0);
    ex_free(ex);
}

/* A fiber waiting in moor_scope_wait when the scope's close times out is woken (-EPIPE: the
 * scope let go of its children) and taken off the scope's queue at once: the scope lives on
 * its owner's stack, gone as soon as the owner returns. */
typedef struct abandoned_ctx {
    int release;          /* the stubborn child returns once this is set */
    moor_scope *scope;    /* on the owner's stack */
    int wait_rc, wait_returned;
    int close_rc;
} abandoned_ctx;

static intptr_t ignores_cancel(void *arg)
{
    abandoned_ctx *a = arg;
    while (!a->release)
        moor_yield();
    return 0;
}

static intptr_t abandoned_waiter(void *arg)
{
    abandoned_ctx *a = arg;
    a->wait_rc = moor_scope_wait(a->scope, moor_deadline_in(SAFETY_MS));
    a->wait_returned = 1;
    return 0;
}

static intptr_t abandoning_owner(void *arg)
{
    abandoned_ctx *a = arg;
    moor_scope scope;
    moor_scope_init(&scope);
    a->scope = &scope;
    FCHECK(moor_scope_spawn(&scope, ignores_cancel, a, NULL) == 0);
    moor_fiber *w;
    FCHECK(moor_spawn(&w, abandoned_waiter, a, NULL) == 0);
    moor_yield(); /* the waiter is queued on the scope */
    a->close_rc = moor_scope_close(&scope, moor_deadline_in(WAIT_MS));
    a->scope = NULL;
    /* The waiter was completed by the close: it returns without looking at the scope. */
    FCHECK(moor_join(w, NULL) == 0);
    memset(&scope, 0xdb, sizeof scope); /* what a reused stack would hold */
    return 0;
}

static void test_scope_close_timeout_wakes_waiters(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    abandoned_ctx a = {.wait_rc = 1};
    moor_fiber *owner;
    assert_int_equal(moor_spawn(&owner, abandoning_owner, &a, NULL), 0);
    assert_int_equal(moor_join(owner, NULL), 0);
    assert_int_equal(a.close_rc, -ETIMEDOUT);
    assert_true(a.wait_returned);
    assert_int_equal(a.wait_rc, -EPIPE); /* woken by the close, not its own deadline */
    a.release = 1;
    assert_int_equal(moor_executor_run(ex), 0);
    ex_free(ex);
}

/* ---- cancellation reaches children blocked in I/O and in locks ------------------------- */

typedef struct blocked_ctx {
    int fd;
    moor_mutex *m;
    moor_sem *sem;
    moor_chan *full;
    moor_event *never;
    int rcs[5];
    int got_lock;
} blocked_ctx;

typedef struct blocked_arg {
    blocked_ctx *c;
    int which;
} blocked_arg;

static intptr_t blocked_kid(void *arg)
{
    blocked_arg *a = arg;
    blocked_ctx *c = a->c;
    char buf[8];
    int v = 1;
    switch (a->which) {
    case 0:
        c->rcs[0] = (int)moor_read(c->fd, buf, sizeof buf, -1);
        break;
    case 1:
        c->rcs[1] = moor_mutex_lock(c->m, -1);
        if (c->rcs[1] == 0) {
            c->got_lock = 1;
            moor_mutex_unlock(c->m);
        }
        break;
    case 2:
        c->rcs[2] = moor_sem_acquire(c->sem, moor_deadline_in(SAFETY_MS));
        break;
    case 3:
        c->rcs[3] = moor_chan_send(c->full, &v, -1);
        break;
    default:
        c->rcs[4] = moor_event_wait(c->never, -1);
        break;
    }
    return 0;
}

static void test_scope_cancel_reaches_io_and_locks(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    moor_mutex m = MOOR_MUTEX_INIT;
    moor_sem sem = MOOR_SEM_INIT(0);
    moor_event never = MOOR_EVENT_INIT;
    moor_chan *full;
    assert_int_equal(moor_chan_new(&full, sizeof(int), 1), 0);
    int one = 1;
    assert_int_equal(moor_chan_try_send(full, &one), 0);
    assert_int_equal(moor_mutex_lock(&m, -1), 0); /* plain code holds it throughout */

    blocked_ctx c = {sv[0], &m, &sem, full, &never, {1, 1, 1, 1, 1}, 0};
    blocked_arg args[5];
    moor_scope scope;
    moor_scope_init(&scope);
    for (int i = 0; i < 5; i++) {
        args[i] = (blocked_arg){&c, i};
        assert_int_equal(moor_scope_spawn(&scope, blocked_kid, &args[i], NULL), 0);
    }
    settle();
    assert_int_equal(scope.count, 5); /* all blocked */
    assert_int_equal(moor_scope_close(&scope, moor_deadline_in(SAFETY_MS)), 0);
    for (int i = 0; i < 5; i++)
        if (c.rcs[i] != -ECANCELED)
            fail_msg("child %d returned %d, not -ECANCELED", i, c.rcs[i]);
    assert_false(c.got_lock);
    /* Nothing is left waiting: the lock, a permit and a channel slot are not handed to the
     * cancelled children, and bytes written now stay unread. */
    moor_mutex_unlock(&m);
    assert_false(m.locked);
    moor_sem_release(&sem);
    assert_int_equal(sem.permits, 1);
    int v;
    assert_int_equal(moor_chan_try_recv(full, &v), 0);
    assert_int_equal(moor_chan_try_recv(full, &v), -EAGAIN);
    assert_int_equal(write(sv[1], "x", 1), 1);
    char b;
    assert_int_equal(read(sv[0], &b, 1), 1);
    moor_chan_free(full);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

/* ---- nested scopes: a cancelled child closes its own scope ---------------------------------- */

#define GRANDKIDS 20

typedef struct nest_ctx {
    int grand_cancelled;
    int inner_close_rc;
    int child_sleep_rc;
} nest_ctx;

static intptr_t grandkid(void *arg)
{
    nest_ctx *n = arg;
    if (moor_sleep(-1) == -ECANCELED)
        n->grand_cancelled++;
    return 0;
}

static intptr_t nested_child(void *arg)
{
    nest_ctx *n = arg;
    moor_scope inner;
    moor_scope_init(&inner);
    for (int i = 0; i < GRANDKIDS; i++)
        FCHECK(moor_scope_spawn(&inner, grandkid, n, NULL) == 0);
    n->child_sleep_rc = moor_sleep(-1); /* until cancelled by the outer close */
    /* Cancelled, it still reaps its own children: close is not cut short. */
    n->inner_close_rc = moor_scope_close(&inner, -1);
    return 0;
}

static void test_scope_nested_cancellation(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    nest_ctx n = {0, 1, 1};
    moor_scope outer;
    moor_scope_init(&outer);
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_scope_spawn(&outer, nested_child, &n, NULL), 0);
    settle();
    assert_int_equal(outer.count, 3);
    assert_int_equal(ex_stats(ex).fibers, 3 + 3 * GRANDKIDS);
    assert_int_equal(moor_scope_close(&outer, -1), 0);
    assert_int_equal(n.child_sleep_rc, -ECANCELED);
    assert_int_equal(n.inner_close_rc, 0);
    assert_int_equal(n.grand_cancelled, 3 * GRANDKIDS);
    assert_int_equal(ex_stats(ex).fibers, 0);
    ex_free(ex);
}

/* ---- a child spawned into the scope while it is being closed ---------------------------- */

typedef struct late_ctx {
    moor_scope *scope;
    int late_spawn_rc;
    int late_started;
    int late_saw_cancel;
    int late_sleep_rc;
} late_ctx;

static intptr_t late_child(void *arg)
{
    late_ctx *l = arg;
    l->late_started = 1;
    l->late_saw_cancel = moor_cancelled();
    /* Bounded, so that the test ends either way: a cancelled sleep returns at once. */
    l->late_sleep_rc = moor_sleep(moor_deadline_in(4 * WAIT_MS));
    return 0;
}

static intptr_t cleanup_spawner(void *arg)
{
    late_ctx *l = arg;
    FCHECK(moor_sleep(-1) == -ECANCELED); /* until the close cancels it */
    /* Its clean-up hands work to a new child of the same scope, which the close must not
     * leave running uncancelled (the scope is not closed yet: this is not misuse). */
    l->late_spawn_rc = moor_scope_spawn(l->scope, late_child, l, NULL);
    return 0;
}

static void test_scope_close_cancels_children_spawned_while_closing(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_scope scope;
    moor_scope_init(&scope);
    late_ctx l = {&scope, 1, 0, 0, 1};
    assert_int_equal(moor_scope_spawn(&scope, cleanup_spawner, &l, NULL), 0);
    settle();
    assert_int_equal(moor_scope_close(&scope, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(l.late_spawn_rc, 0);
    assert_true(l.late_started);
    assert_int_equal(scope.count, 0);
    ex_free(ex);
    assert_true(l.late_saw_cancel);
    assert_int_equal(l.late_sleep_rc, -ECANCELED);
}

/* ---- misuse (forked children) -------------------------------------------------------------- */

static intptr_t open_scope_and_return(void *arg)
{
    moor_scope *s = arg;
    moor_scope_init(s);
    return 0;
}

static void open_scope_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    static moor_scope s;
    moor_fiber *f;
    moor_fiber_attr attr = {.name = "forgetful"};
    CHILD_REQUIRE(moor_spawn(&f, open_scope_and_return, &s, &attr) == 0);
    moor_join(f, NULL);
}

static void spawn_into_closed_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_scope s;
    moor_scope_init(&s);
    CHILD_REQUIRE(moor_scope_close(&s, -1) == 0);
    moor_scope_spawn(&s, yield_n, NULL, NULL);
}

static void close_twice_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_scope s;
    moor_scope_init(&s);
    CHILD_REQUIRE(moor_scope_close(&s, -1) == 0);
    moor_scope_close(&s, -1);
}

static void test_scope_misuse_asserts(void **state)
{
    (void)state;
    child_report r;
    child_run(open_scope_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "scope");
    expect_child_signal(&r, SIGABRT, "\"forgetful\" returned with 1 scope(s) still open");
    child_run(spawn_into_closed_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_scope_spawn: the scope is closed");
    child_run(close_twice_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_scope_close: the scope is already closed");
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_scope_close_cancels_10000),
        TEST(test_scope_close_from_plain_code),
        TEST(test_scope_children_released_early),
        TEST(test_scope_wait_without_cancelling),
        TEST(test_scope_wait_plain_code_and_cancelled_waiter),
        TEST(test_scope_several_waiters),
        TEST(test_scope_close_deadline_stubborn_child),
        TEST(test_scope_close_timeout_wakes_waiters),
        TEST(test_scope_cancel_reaches_io_and_locks),
        TEST(test_scope_nested_cancellation),
        TEST(test_scope_close_cancels_children_spawned_while_closing),
        TEST(test_scope_misuse_asserts),
    };
    return RUN_TESTS(tests);
}
