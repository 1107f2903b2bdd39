/* Futures, wakers and the executor's task loop, on the plain driver (no event loop).
 *
 * Fibers and poll functions record what they see; the test function asserts once they are
 * done (fixture.h). */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

#include "moor.h"

#include "fixture.h"

/* ---- a countdown: PENDING `left` times, waking itself each time, then READY with `value` */

typedef struct countdown {
    moor_future fut;
    int left;       /* PENDING polls still to come */
    int wakes;      /* self-wakes per PENDING poll */
    int polls;
    intptr_t value; /* the output */
} countdown;

static moor_poll countdown_poll(moor_future *self, moor_cx *cx)
{
    countdown *c = moor_container_of(self, countdown, fut);
    c->polls++;
    if (c->left == 0) {
        self->result = c->value;
        return MOOR_READY;
    }
    c->left--;
    for (int i = 0; i < c->wakes; i++)
        moor_waker_wake(&cx->waker);
    return MOOR_PENDING;
}

static const moor_future_ops countdown_ops = {"countdown", countdown_poll, NULL};

static void countdown_init(countdown *c, int n, intptr_t value)
{
    moor_future_init(&c->fut, &countdown_ops, 0);
    c->left = n;
    c->wakes = 1;
    c->polls = 0;
    c->value = value;
}

/* ---- a probe: keeps the waker of its last poll, PENDING until released ------------------ */

typedef struct probe {
    moor_future fut;
    moor_waker waker; /* a copy of cx->waker from the last poll */
    int polls;
    int release;      /* READY (with the poll count) at the next poll once set */
} probe;

static moor_poll probe_poll(moor_future *self, moor_cx *cx)
{
    probe *p = moor_container_of(self, probe, fut);
    p->polls++;
    p->waker = cx->waker;
    if (p->release) {
        self->result = p->polls;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static const moor_future_ops probe_ops = {"probe", probe_poll, NULL};

static void probe_init(probe *p, int release)
{
    memset(p, 0, sizeof *p);
    moor_future_init(&p->fut, &probe_ops, 0);
    p->release = release;
}

/* Run the executor from plain code until a countdown of n self-wakes is done: every task on
 * the run queue gets about n turns meanwhile. */
static void run_for(int n)
{
    countdown tick;
    countdown_init(&tick, n, 0);
    moor_block_on(&tick.fut);
}

/* ---- the countdown as a task, under block_on, and awaited ------------------------------ */

static void test_future_countdown_as_task(void **state)
{
    (void)state;
    static const int counts[] = {0, 1, 5, 100};
    moor_executor *ex = ex_new();
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        countdown c;
        countdown_init(&c, counts[i], 1000 + counts[i]);
        assert_int_equal(moor_spawn_future(&c.fut), 0);
        assert_int_equal(c.polls, 0); /* spawning does not poll */
        assert_int_equal(moor_executor_run(ex), 0);
        assert_true(moor_future_done(&c.fut));
        assert_int_equal(c.fut.result, 1000 + counts[i]);
        assert_int_equal(c.polls, counts[i] + 1);
    }
    ex_free(ex);
}

static void test_future_countdown_block_on(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    countdown c;
    countdown_init(&c, 7, -42);
    assert_int_equal(moor_block_on(&c.fut), -42);
    assert_true(moor_future_done(&c.fut));
    assert_int_equal(c.polls, 8);
    ex_free(ex);
}

struct await_countdown {
    int n;
    int polls;     /* what the countdown saw */
    int done;      /* moor_future_done after the await */
};

static intptr_t await_countdown_fn(void *arg)
{
    struct await_countdown *a = arg;
    countdown c; /* on the fiber's stack: pinned for as long as the fiber waits on it */
    countdown_init(&c, a->n, 4242);
    intptr_t r = moor_await(&c.fut);
    a->polls = c.polls;
    a->done = moor_future_done(&c.fut);
    return r;
}

static void test_future_countdown_awaited_in_fiber(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    struct await_countdown a = {.n = 9};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, await_countdown_fn, &a, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 4242);
    assert_int_equal(a.polls, 10);
    assert_true(a.done);
    ex_free(ex);
}

/* A task that wakes itself twice during one poll is queued once: still n + 1 polls. */
static void test_future_self_wake_twice_polls_once(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    countdown c;
    countdown_init(&c, 5, 1);
    c.wakes = 2;
    assert_int_equal(moor_spawn_future(&c.fut), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(c.polls, 6);

    struct await_countdown a = {.n = 5};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, await_countdown_fn, &a, NULL), 0);
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(a.polls, 6);
    ex_free(ex);
}

/* ---- block_on returns with other tasks left where they are ------------------------------ */

struct busy {
    int turns;
    int target;
};

static intptr_t busy_fn(void *arg)
{
    struct busy *b = arg;
    while (b->turns < b->target) {
        b->turns++;
        moor_yield();
    }
    return b->turns;
}

static void test_future_block_on_leaves_other_tasks(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    struct busy b = {.target = 1000};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, busy_fn, &b, NULL), 0);
    countdown c;
    countdown_init(&c, 10, 5);
    assert_int_equal(moor_block_on(&c.fut), 5);
    /* The fiber ran meanwhile and is suspended, not finished nor lost. */
    assert_true(b.turns >= 1);
    assert_true(b.turns < b.target);
    intptr_t r = 0;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 1000);
    ex_free(ex);
}

/* ---- pinning ----------------------------------------------------------------------------- */

/* PENDING at its first poll, READY (7) at the next. */
typedef struct pend_once {
    moor_future fut;
    int polls;
} pend_once;

static moor_poll pend_once_poll(moor_future *self, moor_cx *cx)
{
    (void)cx;
    pend_once *p = moor_container_of(self, pend_once, fut);
    if (p->polls++ == 0)
        return MOOR_PENDING;
    self->result = 7;
    return MOOR_READY;
}

static const moor_future_ops pend_once_ops = {"pin-probe", pend_once_poll, NULL};

/* Two places for the future; the parent knows their addresses (the child is a fork). */
static pend_once pin_slots[2];

struct pin_move {
    uint32_t flags;
    int cancel_first; /* cancel after the first poll: the copy is then a fresh future */
};

static void pin_move_child(void *arg)
{
    const struct pin_move *pm = arg;
    moor_cx cx;
    memset(&cx, 0, sizeof cx); /* a zeroed waker wakes nothing */
    pend_once *from = &pin_slots[0], *to = &pin_slots[1];
    moor_future_init(&from->fut, &pend_once_ops, pm->flags);
    from->polls = 0;
    CHILD_REQUIRE(moor_future_poll(&from->fut, &cx) == MOOR_PENDING);
    if (pm->cancel_first) {
        moor_future_cancel(&from->fut);
        from->polls = 0;
    }
    memcpy(to, from, sizeof *to);
    memset(from, 0xa5, sizeof *from);
    moor_poll r = moor_future_poll(&to->fut, &cx);
    if (pm->cancel_first) {
        CHILD_REQUIRE(r == MOOR_PENDING);
        r = moor_future_poll(&to->fut, &cx);
    }
    CHILD_REQUIRE(r == MOOR_READY);
    CHILD_REQUIRE(moor_future_done(&to->fut));
    CHILD_REQUIRE(to->fut.result == 7);
}

static void test_future_pin_check_aborts_on_move(void **state)
{
    (void)state;
    struct pin_move pm = {.flags = 0};
    child_report r;
    child_run(pin_move_child, &pm, &r);
    char first[64], now[64];
    snprintf(first, sizeof first, "first polled at %p", (void *)&pin_slots[0].fut);
    snprintf(now, sizeof now, "now at %p", (void *)&pin_slots[1].fut);
    expect_child_signal(&r, SIGABRT, "polled after it moved");
    expect_child_signal(&r, SIGABRT, "\"pin-probe\"");
    expect_child_signal(&r, SIGABRT, first);
    expect_child_signal(&r, SIGABRT, now);
}

/* A pending sleep (in the executor's timer heap) copied elsewhere and cancelled there: the
 * cancel would take the copy out of the heap at the original's index and corrupt it, so that
 * an unrelated sleeper never wakes. The pin check catches it at the cancel, as at a poll. */
static moor_sleep_future sleep_slots[2];

static void pin_move_cancel_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_sleep_future other;
    moor_sleep_init(&other, moor_deadline_in(20));
    moor_sleep_init(&sleep_slots[0], moor_deadline_in(60000));
    moor_cx cx = {{ex, NULL, 0}, NULL, NULL};
    CHILD_REQUIRE(moor_future_poll(&other.base, &cx) == MOOR_PENDING);
    CHILD_REQUIRE(moor_future_poll(&sleep_slots[0].base, &cx) == MOOR_PENDING);
    memcpy(&sleep_slots[1], &sleep_slots[0], sizeof sleep_slots[0]);
    (void)moor_future_cancel(&sleep_slots[1].base); /* must abort here */
    _exit(0);
}

static void test_future_pin_check_catches_cancel_of_moved(void **state)
{
    (void)state;
    child_report r;
    child_run(pin_move_cancel_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "\"sleep\" cancelled after it moved");
}

static void test_future_unpin_may_move(void **state)
{
    (void)state;
    struct pin_move pm = {.flags = MOOR_UNPIN};
    child_report r;
    child_run(pin_move_child, &pm, &r);
    expect_child_ok(&r);
}

static void test_future_cancelled_future_may_move(void **state)
{
    (void)state;
    struct pin_move pm = {.flags = 0, .cancel_first = 1};
    child_report r;
    child_run(pin_move_child, &pm, &r);
    expect_child_ok(&r);
}

/* ---- stale wakers ------------------------------------------------------------------------ */

static void test_future_stale_waker_of_plain_task(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();

    probe old;
    probe_init(&old, 1); /* READY at its first poll */
    assert_int_equal(moor_spawn_future(&old.fut), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_true(moor_future_done(&old.fut));
    moor_waker stale = old.waker;

    /* Waking it with nothing else around: run has nothing to do and returns. */
    moor_waker_wake(&stale);
    assert_int_equal(moor_executor_run(ex), 0);

    /* A new task in the slot the old one left (slots are reused last-in first-out). */
    probe fresh;
    probe_init(&fresh, 0);
    assert_int_equal(moor_spawn_future(&fresh.fut), 0);
    run_for(3);
    assert_int_equal(fresh.polls, 1);
    assert_ptr_equal(fresh.waker.task, stale.task); /* white-box: the slot was reused */

    moor_waker_wake(&stale);
    moor_waker_wake(&stale);
    run_for(3);
    assert_int_equal(fresh.polls, 1); /* the stale wakes did not reach the new task */

    fresh.release = 1;
    moor_waker_wake(&fresh.waker);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(fresh.polls, 2);
    assert_int_equal(fresh.fut.result, 2);
    ex_free(ex);
}

static intptr_t await_probe_fn(void *arg) { return moor_await(arg); }

static void test_future_stale_waker_of_fiber(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();

    /* A fiber that hands out its waker (through a probe it awaits) and returns. */
    probe grab;
    probe_init(&grab, 1);
    moor_fiber *old;
    assert_int_equal(moor_spawn(&old, await_probe_fn, &grab.fut, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(old, &r), 0);
    assert_int_equal(r, 1);
    moor_waker stale = grab.waker;

    moor_waker_wake(&stale);
    assert_int_equal(moor_executor_run(ex), 0);

    /* A new fiber on the stack the old one left: same control block, same task. */
    probe wait;
    probe_init(&wait, 0);
    moor_fiber *fresh;
    assert_int_equal(moor_spawn(&fresh, await_probe_fn, &wait.fut, NULL), 0);
    assert_ptr_equal(fresh, old); /* the pool reuses the last stack freed */
    run_for(3);
    assert_int_equal(wait.polls, 1);
    assert_ptr_equal(wait.waker.task, stale.task);

    moor_waker_wake(&stale);
    moor_waker_wake(&stale);
    run_for(3);
    assert_int_equal(wait.polls, 1);

    wait.release = 1;
    moor_waker_wake(&wait.waker);
    assert_int_equal(moor_join(fresh, &r), 0);
    assert_int_equal(r, 2);
    assert_int_equal(wait.polls, 2);
    ex_free(ex);
}

/* ---- waking twice queues once ---------------------------------------------------------- */

struct double_waker {
    probe *target;
    probe *bystander;   /* another pending task */
    int polls_in_row;   /* the target's polls after two wakes in a row (and a few yields) */
    int polls_apart;    /* the same after two wakes with another task queued in between */
};

static void yield_until_polled(const probe *p, int polls)
{
    for (int i = 0; i < 100 && p->polls < polls; i++)
        moor_yield();
}

static intptr_t double_wake_fn(void *arg)
{
    struct double_waker *d = arg;
    yield_until_polled(d->target, 1);
    yield_until_polled(d->bystander, 1);

    moor_waker w = d->target->waker;
    moor_waker_wake(&w);
    moor_waker_wake(&w);
    for (int i = 0; i < 5; i++)
        moor_yield();
    d->polls_in_row = d->target->polls;

    /* Woken again while queued, with another task queued behind it: still queued once. */
    w = d->target->waker;
    moor_waker_wake(&w);
    moor_waker_wake(&d->bystander->waker);
    moor_waker_wake(&w);
    for (int i = 0; i < 5; i++)
        moor_yield();
    d->polls_apart = d->target->polls;

    d->target->release = 1;
    d->bystander->release = 1;
    moor_waker_wake(&d->target->waker);
    moor_waker_wake(&d->bystander->waker);
    return 0;
}

static void test_future_wake_twice_queues_once(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();

    /* The pending future as a task of its own. */
    probe p, b;
    probe_init(&p, 0);
    probe_init(&b, 0);
    assert_int_equal(moor_spawn_future(&p.fut), 0);
    assert_int_equal(moor_spawn_future(&b.fut), 0);
    struct double_waker d = {.target = &p, .bystander = &b};
    moor_fiber *w;
    assert_int_equal(moor_spawn(&w, double_wake_fn, &d, NULL), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(moor_join(w, NULL), 0);
    assert_int_equal(d.polls_in_row, 2);
    assert_int_equal(d.polls_apart, 3);
    assert_int_equal(p.polls, 4); /* and once more after the release */
    assert_int_equal(b.polls, 3);
    assert_true(moor_future_done(&p.fut));

    /* The pending future awaited by a fiber: the fiber's task is woken twice. */
    probe q;
    probe_init(&q, 0);
    probe_init(&b, 0);
    moor_fiber *awaiter;
    assert_int_equal(moor_spawn(&awaiter, await_probe_fn, &q.fut, NULL), 0);
    assert_int_equal(moor_spawn_future(&b.fut), 0);
    d = (struct double_waker){.target = &q, .bystander = &b};
    assert_int_equal(moor_spawn(&w, double_wake_fn, &d, NULL), 0);
    intptr_t r = 0;
    assert_int_equal(moor_join(awaiter, &r), 0);
    assert_int_equal(moor_join(w, NULL), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(d.polls_in_row, 2);
    assert_int_equal(d.polls_apart, 3);
    assert_int_equal(r, 4);
    assert_int_equal(b.polls, 3);
    ex_free(ex);
}

/* ---- cancel ---------------------------------------------------------------------------- */

typedef struct cancellable {
    moor_future fut;
    int polls;     /* since it was (re)started */
    int cancels;
    int completed; /* set: it has in fact completed when cancelled (a value was handed over) */
} cancellable;

static moor_poll cancellable_poll(moor_future *self, moor_cx *cx)
{
    (void)cx;
    cancellable *c = moor_container_of(self, cancellable, fut);
    if (++c->polls < 2)
        return MOOR_PENDING;
    self->result = 100 + c->polls;
    return MOOR_READY;
}

static moor_poll cancellable_cancel(moor_future *self)
{
    cancellable *c = moor_container_of(self, cancellable, fut);
    c->cancels++;
    c->polls = 0; /* what a real cancel does: drop its progress */
    if (c->completed) {
        self->result = 555;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static const moor_future_ops cancellable_ops = {"cancellable", cancellable_poll,
                                                cancellable_cancel};

static void test_future_cancel(void **state)
{
    (void)state;
    moor_cx cx;
    memset(&cx, 0, sizeof cx);
    cancellable c = {0};
    moor_future_init(&c.fut, &cancellable_ops, 0);

    /* Never polled: nothing to undo. */
    assert_int_equal(moor_future_cancel(&c.fut), MOOR_PENDING);
    assert_int_equal(c.cancels, 0);

    assert_int_equal(moor_future_poll(&c.fut, &cx), MOOR_PENDING);
    assert_int_equal(moor_future_cancel(&c.fut), MOOR_PENDING);
    assert_int_equal(c.cancels, 1);
    assert_int_equal(moor_future_cancel(&c.fut), MOOR_PENDING); /* already cancelled */
    assert_int_equal(c.cancels, 1);
    assert_false(moor_future_done(&c.fut));

    /* Polled again from scratch: pending again, so cancellable again. */
    assert_int_equal(moor_future_poll(&c.fut, &cx), MOOR_PENDING);
    assert_int_equal(moor_future_cancel(&c.fut), MOOR_PENDING);
    assert_int_equal(c.cancels, 2);

    assert_int_equal(moor_future_poll(&c.fut, &cx), MOOR_PENDING);
    assert_int_equal(moor_future_poll(&c.fut, &cx), MOOR_READY);
    assert_true(moor_future_done(&c.fut));
    assert_int_equal(c.fut.result, 102);
    /* Done: nothing to undo, and the output stands. */
    assert_int_equal(moor_future_cancel(&c.fut), MOOR_READY);
    assert_int_equal(c.cancels, 2);
    assert_true(moor_future_done(&c.fut));
    assert_int_equal(c.fut.result, 102);

    /* A future without a cancel op can be cancelled too. */
    pend_once p = {0};
    moor_future_init(&p.fut, &pend_once_ops, 0);
    assert_int_equal(moor_future_poll(&p.fut, &cx), MOOR_PENDING);
    assert_int_equal(moor_future_cancel(&p.fut), MOOR_PENDING);
    assert_false(moor_future_done(&p.fut));
}

/* A cancel op that reports the future had in fact completed: it counts as done, with the
 * output the op stored. */
static void test_future_cancel_of_completed_future(void **state)
{
    (void)state;
    moor_cx cx;
    memset(&cx, 0, sizeof cx);
    cancellable c = {.completed = 1};
    moor_future_init(&c.fut, &cancellable_ops, 0);
    assert_int_equal(moor_future_poll(&c.fut, &cx), MOOR_PENDING);
    assert_int_equal(moor_future_cancel(&c.fut), MOOR_READY);
    assert_int_equal(c.cancels, 1);
    assert_true(moor_future_done(&c.fut));
    assert_int_equal(c.fut.result, 555);
    assert_int_equal(moor_future_cancel(&c.fut), MOOR_READY); /* done: the op is not called */
    assert_int_equal(c.cancels, 1);
}

static void poll_done_child(void *arg)
{
    (void)arg;
    moor_cx cx;
    memset(&cx, 0, sizeof cx);
    pend_once p = {0};
    moor_future_init(&p.fut, &pend_once_ops, 0);
    CHILD_REQUIRE(moor_future_poll(&p.fut, &cx) == MOOR_PENDING);
    CHILD_REQUIRE(moor_future_poll(&p.fut, &cx) == MOOR_READY);
    moor_future_poll(&p.fut, &cx);
}

static void test_future_poll_after_ready_asserts(void **state)
{
    (void)state;
    child_report r;
    child_run(poll_done_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "polled again after it returned READY");
}

/* ---- wakes from another thread --------------------------------------------------------- */

typedef struct remote {
    moor_future fut;
    moor_waker waker;
    pthread_t thread;
    int started;
    int fired;       /* atomic: set by the thread before it wakes */
    int polls;
    long delay_ns;
} remote;

static void *remote_thread(void *arg)
{
    remote *r = arg;
    if (r->delay_ns) {
        struct timespec ts = {0, r->delay_ns};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
    __atomic_store_n(&r->fired, 1, __ATOMIC_RELEASE);
    moor_waker_wake(&r->waker);
    return NULL;
}

static moor_poll remote_poll(moor_future *self, moor_cx *cx)
{
    remote *r = moor_container_of(self, remote, fut);
    r->polls++;
    if (__atomic_load_n(&r->fired, __ATOMIC_ACQUIRE)) {
        self->result = 1;
        return MOOR_READY;
    }
    if (!r->started) {
        r->waker = cx->waker; /* before the thread exists: it reads its own copy later */
        r->started = 1;
        if (pthread_create(&r->thread, NULL, remote_thread, r) != 0)
            abort();
    }
    return MOOR_PENDING;
}

static const moor_future_ops remote_ops = {"remote", remote_poll, NULL};

static void remote_init(remote *r, long delay_ns)
{
    memset(r, 0, sizeof *r);
    moor_future_init(&r->fut, &remote_ops, 0);
    r->delay_ns = delay_ns;
}

/* The wakes from other threads run in a forked child: a lost wake or a deadlock there is
 * reported by the watchdog (fixture.h) instead of hanging the whole suite. */
static void remote_wake_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);

    /* The executor has nothing to run and parks; the thread's wake ends the park. */
    remote r;
    remote_init(&r, 20 * 1000 * 1000);
    CHILD_REQUIRE(moor_spawn_future(&r.fut) == 0);
    CHILD_REQUIRE(moor_executor_run(ex) == 0);
    CHILD_REQUIRE(moor_future_done(&r.fut));
    CHILD_REQUIRE(r.polls == 2);
    CHILD_REQUIRE(pthread_join(r.thread, NULL) == 0);

    /* No delay: the wake races the poll's return and the park. It must never be lost. */
    for (int i = 0; i < 500; i++) {
        remote_init(&r, 0);
        CHILD_REQUIRE(moor_spawn_future(&r.fut) == 0);
        CHILD_REQUIRE(moor_executor_run(ex) == 0);
        CHILD_REQUIRE(moor_future_done(&r.fut));
        CHILD_REQUIRE(r.polls == 2);
        CHILD_REQUIRE(pthread_join(r.thread, NULL) == 0);
    }
    moor_executor_free(ex);
}

static void test_future_wake_from_another_thread(void **state)
{
    (void)state;
    child_report r;
    child_run(remote_wake_child, NULL, &r);
    expect_child_ok(&r);
}

/* A fiber that only yields keeps the run queue non-empty; a wake from another thread must
 * still get through (the run loop drains remote wakes between fiber hand-offs). */
struct spinner {
    remote *r;
    long spins;
};

static intptr_t spin_until_done(void *arg)
{
    struct spinner *s = arg;
    while (!moor_future_done(&s->r->fut)) {
        s->spins++;
        moor_yield();
    }
    return 0;
}

static void busy_remote_wake_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    remote r;
    remote_init(&r, 5 * 1000 * 1000);
    CHILD_REQUIRE(moor_spawn_future(&r.fut) == 0);
    struct spinner s1 = {.r = &r}, s2 = {.r = &r};
    moor_fiber *f1, *f2;
    CHILD_REQUIRE(moor_spawn(&f1, spin_until_done, &s1, NULL) == 0);
    CHILD_REQUIRE(moor_spawn(&f2, spin_until_done, &s2, NULL) == 0);
    CHILD_REQUIRE(moor_executor_run(ex) == 0);
    CHILD_REQUIRE(moor_future_done(&r.fut));
    CHILD_REQUIRE(r.polls == 2);
    CHILD_REQUIRE(s1.spins > 0 && s2.spins > 0);
    CHILD_REQUIRE(moor_join(f1, NULL) == 0);
    CHILD_REQUIRE(moor_join(f2, NULL) == 0);
    CHILD_REQUIRE(pthread_join(r.thread, NULL) == 0);
    moor_executor_free(ex);
}

static void test_future_remote_wake_while_fibers_busy(void **state)
{
    (void)state;
    child_report r;
    child_run(busy_remote_wake_child, NULL, &r);
    expect_child_ok(&r);
}

/* ---- executors: one per thread ----------------------------------------------------------- */

static void *other_thread_executor(void *arg)
{
    (void)arg;
    moor_executor *ex;
    if (moor_executor_current() != NULL)
        return (void *)1;
    if (moor_executor_new(&ex, NULL) != 0)
        return (void *)2;
    countdown c;
    countdown_init(&c, 3, 9);
    intptr_t r = moor_block_on(&c.fut);
    moor_executor_free(ex);
    return r == 9 ? NULL : (void *)3;
}

static void test_future_executor_one_per_thread(void **state)
{
    (void)state;
    assert_null(moor_executor_current());
    moor_executor *ex, *again = NULL;
    ex = ex_new();
    assert_ptr_equal(moor_executor_current(), ex);
    assert_int_equal(moor_executor_new(&again, NULL), -EEXIST);
    assert_null(again);

    pthread_t t;
    void *ret = (void *)-1;
    assert_int_equal(pthread_create(&t, NULL, other_thread_executor, NULL), 0);
    assert_int_equal(pthread_join(t, &ret), 0);
    assert_null(ret);

    ex_free(ex);
    assert_null(moor_executor_current());
    ex = ex_new(); /* free makes room for a new one */
    ex_free(ex);
}

/* ---- errors ------------------------------------------------------------------------------ */

static void test_future_strerror(void **state)
{
    (void)state;
    const char *s = moor_strerror(-ETIMEDOUT);
    assert_non_null(s);
    assert_non_null(strstr(s, "timed out"));
    assert_non_null(strstr(moor_strerror(-ECANCELED), "anceled"));
    assert_non_null(strstr(moor_strerror(-ENOMEM), "memory"));
    static const int unknown[] = {-123456, 123456, -4096, INT_MAX, INT_MIN + 1};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        s = moor_strerror(unknown[i]);
        assert_non_null(s);
        assert_true(s[0] != '\0');
    }
}

/* INT_MIN has no negation in int: in a child, so that a sanitizer report there fails only
 * this test. */
static void strerror_int_min_child(void *arg)
{
    (void)arg;
    const char *s = moor_strerror(INT_MIN);
    CHILD_REQUIRE(s != NULL && s[0] != '\0');
}

static void test_future_strerror_int_min(void **state)
{
    (void)state;
    child_report r;
    child_run(strerror_int_min_child, NULL, &r);
    expect_child_ok(&r);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_future_countdown_as_task),
        TEST(test_future_countdown_block_on),
        TEST(test_future_countdown_awaited_in_fiber),
        TEST(test_future_self_wake_twice_polls_once),
        TEST(test_future_block_on_leaves_other_tasks),
        TEST(test_future_pin_check_aborts_on_move),
        TEST(test_future_pin_check_catches_cancel_of_moved),
        TEST(test_future_unpin_may_move),
        TEST(test_future_cancelled_future_may_move),
        TEST(test_future_stale_waker_of_plain_task),
        TEST(test_future_stale_waker_of_fiber),
        TEST(test_future_wake_twice_queues_once),
        TEST(test_future_cancel),
        TEST(test_future_cancel_of_completed_future),
        TEST(test_future_poll_after_ready_asserts),
        TEST(test_future_wake_from_another_thread),
        TEST(test_future_remote_wake_while_fibers_busy),
        TEST(test_future_executor_one_per_thread),
        TEST(test_future_strerror),
        TEST(test_future_strerror_int_min),
    };
    return RUN_TESTS(tests);
}
