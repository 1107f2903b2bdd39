/* Fault injection: moor's allocator (moor_set_allocator) fails the Nth allocation of a
 * scenario, for N = 1, 2, 3, ... until a run completes with no failure injected; in a second
 * mode it fails every allocation from the Nth on. At every N each call must return a clean
 * error (no crash, no assertion, no hang, no value lost), nothing may leak (the count of live
 * blocks is back where it was once the executor is freed; LeakSanitizer checks the rest in
 * the ASan build), and the same executor must work again, in full, once memory is back.
 *
 * Scenarios: spawn (joined, detached, scopes, a new stack size, a future as a task);
 * channels (new, a send and a receive that wait, select, close); promises (resolved from
 * another thread while awaited with a deadline, and before); mutex, condition variable,
 * semaphore, wait group and event waits with deadlines; blocking calls; timers and
 * sleeps; fd waits; DNS (moor_resolve and moor_tcp_dial by name against a dnsmasq of its
 * own, skipped without one, as in test_dns.c: c-ares' allocations are failed too); and the
 * chat server's accept path (examples/chat/chat.c built into this test with its main renamed
 * and its own allocations on this allocator: see the end of the file).
 *
 * The sweeps are short (each scenario makes 5 to 70 allocations), so every N is run in every
 * build, valgrind's included (some 20 s there). FAULT_DEBUG=1 prints each run. */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>

#include <ev.h>

#include "fiber/list.h"

#include "fixture.h"
#include "dnsmasq.h"

/* ---- the counting allocator ---------------------------------------------------------------- */

enum { FAIL_ONE, FAIL_FROM };

/* All atomic: promise resolvers allocate on their own threads. */
static long fail_at;    /* the allocation to fail (1 = the first after arming); 0: none */
static int fail_mode;   /* FAIL_ONE: only the fail_at-th; FAIL_FROM: it and every later one */
static long calls;      /* allocations asked for since arming */
static long injected;   /* failures injected since arming */
static long live;       /* blocks allocated and not freed, whenever they were made */
static size_t only_size; /* if not 0: only allocations of this size count (and fail) */

static int should_fail(size_t size)
{
    long at = __atomic_load_n(&fail_at, __ATOMIC_SEQ_CST);
    if (!at)
        return 0;
    size_t only = __atomic_load_n(&only_size, __ATOMIC_SEQ_CST);
    if (only && size != only)
        return 0;
    long n = __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);
    int mode = __atomic_load_n(&fail_mode, __ATOMIC_SEQ_CST);
    if (mode == FAIL_ONE ? n != at : n < at)
        return 0;
    __atomic_add_fetch(&injected, 1, __ATOMIC_SEQ_CST);
    return 1;
}

static void *fault_malloc(size_t size)
{
    if (should_fail(size))
        return NULL;
    void *p = malloc(size);
    if (p)
        __atomic_add_fetch(&live, 1, __ATOMIC_SEQ_CST);
    return p;
}

static void *fault_realloc(void *ptr, size_t size)
{
    if (should_fail(size))
        return NULL;
    return realloc(ptr, size); /* ptr is never NULL: moor asks malloc for new blocks */
}

static void fault_free(void *ptr)
{
    if (ptr)
        __atomic_sub_fetch(&live, 1, __ATOMIC_SEQ_CST);
    free(ptr);
}

static void arm(long n, int mode)
{
    __atomic_store_n(&calls, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&injected, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&fail_mode, mode, __ATOMIC_SEQ_CST);
    __atomic_store_n(&fail_at, n, __ATOMIC_SEQ_CST);
}

/* Stop failing; the number of failures injected since arm. */
static long disarm(void)
{
    __atomic_store_n(&fail_at, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&only_size, 0, __ATOMIC_SEQ_CST);
    return __atomic_load_n(&injected, __ATOMIC_SEQ_CST);
}

static long live_now(void) { return __atomic_load_n(&live, __ATOMIC_SEQ_CST); }

/* ---- the sweep ----------------------------------------------------------------------------- */

#define FAULT_MAX_N 100000 /* a scenario with more allocations than this is a runaway */

/* The first error of a scenario, checked as it comes: 0 and -ENOMEM are the outcomes a call
 * may have when memory fails (any other is recorded too, and fails the run). Usable in
 * fibers: it never unwinds. */
typedef struct outcome {
    int first;    /* the first error, or 0 */
    int bad;      /* an error other than -ENOMEM (or one the scenario allows) was seen */
    int bad_rc;
    int bad_line;
} outcome;

#define NOTE(o, rc) note_at(o, (int)(rc), 0, __LINE__)
/* As NOTE, and `also` is a clean outcome too (a timeout that is the point of the call). */
#define NOTE_ALSO(o, rc, also) note_at(o, (int)(rc), also, __LINE__)

static int note_at(outcome *o, int rc, int also, int line)
{
    if (rc >= 0 || (also && rc == also))
        return rc;
    if (rc != -ENOMEM && !o->bad) {
        o->bad = 1;
        o->bad_rc = rc;
        o->bad_line = line;
    }
    if (!o->first)
        o->first = rc;
    return rc;
}

/* One scenario: run on the calling thread's executor, everything it made freed or joined
 * when it returns, its outcomes noted in *o. With `full` set no allocation fails, and it
 * checks every result. */
typedef void (*scenario_fn)(outcome *o, int full);

static void sweep(const char *name, scenario_fn run, int mode)
{
    /* A first run with nothing failing warms up what lives on (a recycled executor, c-ares'
     * library state): the count of live blocks after it is the baseline. */
    moor_executor *ex = ex_new();
    outcome o = {0};
    run(&o, 1);
    assert_int_equal(o.first, 0);
    ex_free(ex);
    long base = live_now();
    long n, failed_runs = 0;
    for (n = 1; n < FAULT_MAX_N; n++) {
        outcome armed = {0};
        int64_t started = moor_now();
        arm(n, mode);
        ex = NULL;
        int rc = moor_executor_new(&ex, NULL);
        if (rc == 0)
            run(&armed, 0);
        else
            NOTE(&armed, rc);
        long got = disarm();
        if (armed.bad)
            fail_msg("%s, N = %ld (%s): error %d (%s) at line %d", name, n,
                     mode == FAIL_ONE ? "that allocation fails" : "every allocation from it fails",
                     armed.bad_rc, moor_strerror(armed.bad_rc), armed.bad_line);
        if (got == 0 && armed.first)
            fail_msg("%s, N = %ld: error %d (%s) with no allocation failed", name, n,
                     armed.first, moor_strerror(armed.first));
        if (got && armed.first)
            failed_runs++;
        /* Memory is back: the same executor (or a new one, if it could not be made) does
         * the whole scenario. */
        if (!ex)
            ex = ex_new();
        outcome again = {0};
        if (getenv("FAULT_DEBUG"))
            print_message("%s: N = %ld, %ld failed, first error %d, %lld ms\n", name, n, got,
                          armed.first, (long long)(moor_now() - started));
        run(&again, 1);
        if (again.first)
            fail_msg("%s, N = %ld: the run after the failure got error %d (%s) at line %d", name,
                     n, again.first, moor_strerror(again.first), again.bad_line);
        ex_free(ex);
        if (live_now() != base)
            fail_msg("%s, N = %ld: %ld block(s) leaked", name, n, live_now() - base);
        if (got == 0)
            break;
    }
    assert_true(n < FAULT_MAX_N);
    print_message("%s (%s): %ld runs, %ld of them saw a clean error\n", name,
                  mode == FAIL_ONE ? "Nth fails" : "from the Nth on", n, failed_runs);
}

/* ---- spawn ----------------------------------------------------------------------------------- */

static intptr_t add_one(void *arg) { return (intptr_t)arg + 1; }

static intptr_t count_run(void *arg)
{
    (*(int *)arg)++;
    return 0;
}

static intptr_t yield_kid(void *arg)
{
    moor_yield();
    (*(int *)arg)++;
    return 0;
}

typedef struct scope_run {
    outcome *o;
    int kids_done;
    int kids_spawned;
} scope_run;

/* A fiber opens a scope, spawns three children into it, and closes it with a deadline (whose
 * timer may be refused: the close waits its children out all the same). */
static intptr_t scope_owner(void *arg)
{
    scope_run *s = arg;
    moor_scope scope;
    moor_scope_init(&scope);
    for (int i = 0; i < 3; i++)
        if (NOTE(s->o, moor_scope_spawn(&scope, yield_kid, &s->kids_done, NULL)) == 0)
            s->kids_spawned++;
    FCHECK(moor_scope_close(&scope, moor_deadline_in(SAFETY_MS)) == 0);
    FCHECK(scope.count == 0);
    FCHECK(s->kids_done == s->kids_spawned); /* waited out, every one */
    return 0;
}

typedef struct ready_future {
    moor_future base;
} ready_future;

static moor_poll ready_poll(moor_future *fut, moor_cx *cx)
{
    (void)cx;
    fut->result = 7;
    return MOOR_READY;
}

static const moor_future_ops ready_ops = {"ready", ready_poll, NULL};

typedef struct remote_spawner {
    moor_executor *ex;
    int ran; /* atomic: the fiber ran (on the executor's thread) */
    int rc;
} remote_spawner;

static intptr_t remote_kid(void *arg)
{
    __atomic_store_n(&((remote_spawner *)arg)->ran, 1, __ATOMIC_SEQ_CST);
    return 0;
}

static void *remote_spawn_thread(void *arg)
{
    remote_spawner *r = arg;
    r->rc = moor_spawn_remote(r->ex, remote_kid, r);
    return NULL;
}

static void scenario_spawn(outcome *o, int full)
{
    (void)full;
    moor_fiber *f;
    intptr_t r = 0;
    if (NOTE(o, moor_spawn(&f, add_one, (void *)41, NULL)) == 0) {
        assert_int_equal(moor_join(f, &r), 0);
        assert_int_equal(r, 42);
    }
    int ran = 0;
    int detached = NOTE(o, moor_spawn(NULL, count_run, &ran, NULL)) == 0;
    assert_int_equal(moor_executor_run(moor_executor_current()), 0);
    assert_int_equal(ran, detached);

    scope_run s = {.o = o};
    if (NOTE(o, moor_spawn(&f, scope_owner, &s, NULL)) == 0)
        assert_int_equal(moor_join(f, NULL), 0);

    moor_fiber_attr big = {.name = "big", .stack_size = 512 * 1024}; /* a new pool bucket */
    if (NOTE(o, moor_spawn(&f, add_one, (void *)1, &big)) == 0) {
        assert_int_equal(moor_join(f, &r), 0);
        assert_int_equal(r, 2);
    }

    ready_future a;
    moor_future_init(&a.base, &ready_ops, 0);
    if (NOTE(o, moor_spawn_future(&a.base)) == 0) {
        assert_int_equal(moor_executor_run(moor_executor_current()), 0);
        assert_true(moor_future_done(&a.base));
        assert_int_equal(a.base.result, 7);
    }

    /* From another thread: queued (or -ENOMEM to the caller), then started by the run. */
    remote_spawner rs = {.ex = moor_executor_current()};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, remote_spawn_thread, &rs), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(moor_executor_run(rs.ex), 0);
    if (NOTE(o, rs.rc) == 0)
        assert_int_equal(__atomic_load_n(&rs.ran, __ATOMIC_SEQ_CST), 1);
}

static void test_fault_spawn(void **state)
{
    (void)state;
    sweep("spawn", scenario_spawn, FAIL_ONE);
    sweep("spawn", scenario_spawn, FAIL_FROM);
}

/* ---- channels -------------------------------------------------------------------------------- */

/* Two fibers on one channel. Whichever fails first (its deadline's timer refused) closes the
 * channel, so that the other is not left waiting for it. */
typedef struct chan_pair {
    outcome *o;
    moor_chan *ch;
    int closed;
    int value, got;
    int send_rc, recv_rc;
} chan_pair;

static void pair_fail(chan_pair *p)
{
    if (!p->closed) {
        p->closed = 1;
        moor_chan_close(p->ch);
    }
}

static intptr_t pair_recv(void *arg)
{
    chan_pair *p = arg;
    p->recv_rc = NOTE_ALSO(p->o, moor_chan_recv(p->ch, &p->got, moor_deadline_in(SAFETY_MS)), -EPIPE);
    if (p->recv_rc < 0)
        pair_fail(p);
    return 0;
}

static intptr_t pair_send(void *arg)
{
    chan_pair *p = arg;
    moor_yield(); /* the receiver waits first */
    p->send_rc = NOTE_ALSO(p->o, moor_chan_send(p->ch, &p->value, moor_deadline_in(SAFETY_MS)), -EPIPE);
    if (p->send_rc < 0)
        pair_fail(p);
    return 0;
}

/* The receiver selects over the channel and a sleep far off: the channel wins. */
static intptr_t pair_select(void *arg)
{
    chan_pair *p = arg;
    moor_chan_future op;
    moor_sleep_future far;
    moor_chan_recv_init(&op, p->ch, &p->got, -1);
    moor_sleep_init(&far, moor_deadline_in(SAFETY_MS));
    moor_future *futs[] = {&op.base, &far.base};
    int rc = NOTE(p->o, moor_select(futs, 2, moor_deadline_in(SAFETY_MS)));
    if (rc == 0) {
        p->recv_rc = NOTE_ALSO(p->o, op.base.result, -EPIPE);
        if (p->recv_rc < 0)
            pair_fail(p);
    } else if (rc == 1) {
        /* The sleep "won": its timer was refused, and it completed with -ENOMEM. */
        p->recv_rc = NOTE(p->o, far.base.result);
        FCHECK(p->recv_rc == -ENOMEM);
        pair_fail(p);
    } else {
        p->recv_rc = rc;
        pair_fail(p);
    }
    return 0;
}

/* A pair exchanges one value: both succeed with it, or one fails cleanly and the other sees
 * the channel closed (or fails cleanly too). */
static void chan_exchange(outcome *o, int full, moor_fiber_fn receiver)
{
    moor_chan *ch;
    if (NOTE(o, moor_chan_new(&ch, sizeof(int), 0)) < 0)
        return;
    chan_pair p = {.o = o, .ch = ch, .value = 5, .got = -1, .send_rc = 1, .recv_rc = 1};
    moor_fiber *r = NULL, *s = NULL;
    if (NOTE(o, moor_spawn(&r, receiver, &p, NULL)) < 0)
        pair_fail(&p);
    if (NOTE(o, moor_spawn(&s, pair_send, &p, NULL)) < 0)
        pair_fail(&p);
    if (r)
        assert_int_equal(moor_join(r, NULL), 0);
    if (s)
        assert_int_equal(moor_join(s, NULL), 0);
    if (r && s && p.send_rc == 0)
        assert_int_equal(p.recv_rc, 0);
    if (p.recv_rc == 0)
        assert_int_equal(p.got, 5); /* nothing lost, nothing invented */
    if (full)
        assert_true(p.send_rc == 0 && p.recv_rc == 0);
    moor_chan_free(ch);
}

static intptr_t wait_closed(void *arg)
{
    int got;
    return moor_chan_recv(arg, &got, -1);
}

static intptr_t close_later(void *arg)
{
    moor_yield();
    moor_chan_close(arg);
    return 0;
}

static void scenario_chan(outcome *o, int full)
{
    chan_exchange(o, full, pair_recv);
    chan_exchange(o, full, pair_select);

    /* Close wakes a waiting receiver with -EPIPE. */
    moor_chan *ch;
    if (NOTE(o, moor_chan_new(&ch, sizeof(int), 2)) < 0)
        return;
    moor_fiber *w, *c;
    int waiting = NOTE(o, moor_spawn(&w, wait_closed, ch, NULL)) == 0;
    if (NOTE(o, moor_spawn(&c, close_later, ch, NULL)) == 0)
        assert_int_equal(moor_join(c, NULL), 0);
    else
        moor_chan_close(ch);
    if (waiting) {
        intptr_t r;
        assert_int_equal(moor_join(w, &r), 0);
        assert_int_equal(r, -EPIPE);
    }
    moor_chan_free(ch);
}

static void test_fault_chan(void **state)
{
    (void)state;
    sweep("channels", scenario_chan, FAIL_ONE);
    sweep("channels", scenario_chan, FAIL_FROM);
}

/* ---- promises -------------------------------------------------------------------------------- */

typedef struct resolver {
    moor_promise *p;
    int delay_ms;
} resolver;

static void *resolve_thread(void *arg)
{
    resolver *r = arg;
    if (r->delay_ms)
        sleep_ms(r->delay_ms); /* the awaiter is (most likely) parked by then: a remote wake */
    FCHECK(moor_promise_resolve(r->p, 42) == 0);
    return NULL;
}

/* Await a promise another thread resolves, with a deadline far off: the value comes back long
 * before it (a lost wake would wait it out), or the wait fails cleanly (its timer refused). */
static void promise_round(outcome *o, int delay_ms)
{
    resolver r = {.delay_ms = delay_ms};
    if (NOTE(o, moor_promise_new(&r.p, NULL)) < 0)
        return;
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, resolve_thread, &r), 0);
    if (!delay_ms)
        sleep_ms(2); /* resolved before the await, most likely */
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    intptr_t v = NOTE(o, moor_promise_await(r.p, deadline));
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_true(v == 42 || v == -ENOMEM);
    assert_true(moor_now() < deadline);
}

static intptr_t promise_fiber(void *arg)
{
    promise_round(arg, 5);
    return 0;
}

static void scenario_promise(outcome *o, int full)
{
    (void)full;
    promise_round(o, 5); /* from plain code */
    promise_round(o, 0);
    moor_fiber *f;
    if (NOTE(o, moor_spawn(&f, promise_fiber, o, NULL)) == 0)
        assert_int_equal(moor_join(f, NULL), 0);
}

static void test_fault_promise(void **state)
{
    (void)state;
    sweep("promises", scenario_promise, FAIL_ONE);
    sweep("promises", scenario_promise, FAIL_FROM);
}

typedef struct awaiter {
    moor_promise *p;
    int64_t deadline;
    intptr_t value;
} awaiter;

static intptr_t await_fiber(void *arg)
{
    awaiter *a = arg;
    a->value = moor_promise_await(a->p, a->deadline);
    return 0;
}

/* A resolve from another thread wakes an awaiter that is parked, while no allocation
 * succeeds: queueing the wake for the executor's thread finds no memory. The wake is not lost
 * (nor does it fail an assertion): the value comes back at once, not at the deadline. */
static void test_fault_remote_wake_without_memory(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    awaiter a = {.deadline = moor_deadline_in(SAFETY_MS), .value = 1};
    assert_int_equal(moor_promise_new(&a.p, NULL), 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, await_fiber, &a, NULL), 0);
    settle(); /* it waits, its deadline armed */
    resolver r = {.p = a.p};
    arm(1, FAIL_FROM);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, resolve_thread, &r), 0);
    assert_int_equal(moor_join(f, NULL), 0); /* needs no memory */
    long got = disarm();
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_true(got > 0); /* the wake's queue could not grow */
    assert_int_equal(a.value, 42);
    assert_true(moor_now() < a.deadline);
    ex_free(ex);
}

/* ---- synchronisation ------------------------------------------------------------------------ */

/* Every wait has a deadline, whose timer may be refused (-ENOMEM): each side goes on
 * regardless, so nobody is left waiting for the other. */
typedef struct sync_run {
    outcome *o;
    moor_mutex m;
    moor_cond c;
    moor_sem s;
    moor_waitgroup wg;
    moor_event ev;
    int ready;
    int locked_seen; /* the waiter held the lock while `ready` was set: 1, else 0 */
} sync_run;

static intptr_t sync_waiter(void *arg)
{
    sync_run *r = arg;
    int64_t dl = moor_deadline_in(SAFETY_MS);
    if (NOTE(r->o, moor_mutex_lock(&r->m, dl)) == 0) { /* the signaller holds it */
        while (!r->ready && NOTE(r->o, moor_cond_wait(&r->c, &r->m, dl)) == 0)
            ;
        FCHECK(r->m.locked); /* locked again, whatever the wait returned */
        r->locked_seen = r->ready;
        moor_mutex_unlock(&r->m);
    }
    (void)NOTE(r->o, moor_sem_acquire(&r->s, dl));
    (void)NOTE(r->o, moor_event_wait(&r->ev, dl));
    moor_waitgroup_done(&r->wg);
    return 0;
}

static intptr_t sync_signaller(void *arg)
{
    sync_run *r = arg;
    moor_mutex_lock(&r->m, -1); /* free: no wait */
    moor_yield();               /* the waiter queues for the lock */
    r->ready = 1;
    moor_cond_signal(&r->c);
    moor_mutex_unlock(&r->m);
    moor_sem_release(&r->s);
    moor_event_set(&r->ev);
    (void)NOTE(r->o, moor_waitgroup_wait(&r->wg, moor_deadline_in(SAFETY_MS)));
    return 0;
}

static void scenario_sync(outcome *o, int full)
{
    sync_run r = {.o = o, .m = MOOR_MUTEX_INIT, .c = MOOR_COND_INIT, .s = MOOR_SEM_INIT(0),
                  .wg = MOOR_WAITGROUP_INIT, .ev = MOOR_EVENT_INIT};
    moor_waitgroup_add(&r.wg, 1);
    moor_fiber *s, *w;
    if (NOTE(o, moor_spawn(&s, sync_signaller, &r, NULL)) < 0)
        return;
    if (NOTE(o, moor_spawn(&w, sync_waiter, &r, NULL)) == 0) {
        assert_int_equal(moor_join(w, NULL), 0);
    } else {
        moor_waitgroup_done(&r.wg);
    }
    assert_int_equal(moor_join(s, NULL), 0);
    assert_int_equal(r.wg.count, 0);
    if (full)
        assert_int_equal(r.locked_seen, 1);
}

static void test_fault_sync(void **state)
{
    (void)state;
    sweep("sync", scenario_sync, FAIL_ONE);
    sweep("sync", scenario_sync, FAIL_FROM);
}

/* ---- blocking calls -------------------------------------------------------------------------- */

/* The worker pool is made, its first thread's handle stored, and the worker's wake queued
 * from its thread: any of it may fail, and the call says so (-ENOMEM), or runs fn in full. */
static void scenario_blocking(outcome *o, int full)
{
    int runs = 0;
    intptr_t result = 0;
    int rc = NOTE(o, moor_blocking(sentinel_fn, &runs, &result, moor_deadline_in(SAFETY_MS)));
    if (rc == 0)
        assert_true(runs == 1 && result == 7);
    else
        assert_int_equal(runs, 0);
    if (full)
        assert_int_equal(rc, 0);
}

static void test_fault_blocking(void **state)
{
    (void)state;
    sweep("blocking calls", scenario_blocking, FAIL_ONE);
    sweep("blocking calls", scenario_blocking, FAIL_FROM);
}

/* ---- timers and sleeps ----------------------------------------------------------------------- */

static intptr_t sleeper(void *arg)
{
    return moor_sleep(moor_deadline_in((int64_t)(intptr_t)arg));
}

/* More sleepers than the timer heap's first capacity (16): it grows again, by realloc. */
#define SLEEPERS 20

static void scenario_timer(outcome *o, int full)
{
    (void)full;
    moor_fiber *f[SLEEPERS];
    int ok[SLEEPERS];
    for (int i = 0; i < SLEEPERS; i++)
        ok[i] = NOTE(o, moor_spawn(&f[i], sleeper, (void *)(intptr_t)(1 + i % 3), NULL)) == 0;
    for (int i = 0; i < SLEEPERS; i++) {
        intptr_t r;
        if (!ok[i])
            continue;
        assert_int_equal(moor_join(f[i], &r), 0);
        assert_true(NOTE(o, r) == 0 || r == -ENOMEM);
    }
    int64_t start = moor_now();
    intptr_t r = NOTE(o, moor_sleep(moor_deadline_in(2)));
    if (r == 0)
        assert_true(moor_now() >= start + 2);
    /* A future that never completes, bounded by a deadline. */
    moor_future never;
    moor_future_init(&never, &never_ops, 0);
    r = NOTE_ALSO(o, moor_await_deadline(&never, moor_deadline_in(3)), -ETIMEDOUT);
    assert_true(r == -ETIMEDOUT || r == -ENOMEM);
}

static void test_fault_timer(void **state)
{
    (void)state;
    sweep("timers", scenario_timer, FAIL_ONE);
    sweep("timers", scenario_timer, FAIL_FROM);
}

/* ---- fd waits -------------------------------------------------------------------------------- */

typedef struct io_pair {
    outcome *o;
    int fd;
    char buf[8];
    ssize_t got;
} io_pair;

static intptr_t io_reader(void *arg)
{
    io_pair *p = arg;
    p->got = NOTE(p->o, moor_read(p->fd, p->buf, sizeof p->buf, moor_deadline_in(SAFETY_MS)));
    return 0;
}

static intptr_t io_writer(void *arg)
{
    io_pair *p = arg;
    moor_yield(); /* the reader waits first */
    FCHECK(write(p->fd, "ping", 4) == 4);
    return 0;
}

static void scenario_io(outcome *o, int full)
{
    int sv[2];
    stream_pair(sv);
    io_pair rd = {.o = o, .fd = sv[0], .got = 1}, wr = {.o = o, .fd = sv[1]};
    moor_fiber *r, *w;
    int reading = NOTE(o, moor_spawn(&r, io_reader, &rd, NULL)) == 0;
    if (NOTE(o, moor_spawn(&w, io_writer, &wr, NULL)) == 0)
        assert_int_equal(moor_join(w, NULL), 0);
    else
        assert_int_equal(write(sv[1], "ping", 4), 4);
    if (reading) {
        assert_int_equal(moor_join(r, NULL), 0);
        assert_true(rd.got == 4 || rd.got == -ENOMEM);
        if (rd.got == 4)
            assert_memory_equal(rd.buf, "ping", 4);
        if (full)
            assert_int_equal(rd.got, 4);
    }
    assert_true(NOTE(o, moor_wait_fd(sv[1], MOOR_WRITABLE, moor_deadline_in(SAFETY_MS))) == 0 ||
                o->first == -ENOMEM);
    assert_int_equal(moor_close(sv[0]), 0);
    assert_int_equal(moor_close(sv[1]), 0);
}

static void test_fault_io(void **state)
{
    (void)state;
    sweep("fd waits", scenario_io, FAIL_ONE);
    sweep("fd waits", scenario_io, FAIL_FROM);
}

/* ---- DNS ------------------------------------------------------------------------------------- */

/* A dnsmasq on a free loopback port serving two names (tests/dnsmasq.h, as test_dns.c). */
static dns_server dns;

static void dns_stop(void) { dnsmasq_stop(&dns); }

/* 0 without dnsmasq. */
static int dns_start(void)
{
    if (!dnsmasq_installed())
        return 0;
    dnsmasq_start(&dns, "10.1.2.3 fault.test\n127.0.0.1 dial.test\n", "fault.test");
    return 1;
}

#define DNS_ARMED_MS 500

/* Each run makes a new executor, so its c-ares channel is made again too: c-ares' own
 * allocations are failed in turn with moor's. */
static void scenario_dns(outcome *o, int full)
{
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    struct addrinfo *res = NULL;
    /* c-ares takes an answer it finds no memory to read for a lost one, and asks again after
     * its timeout (5 s): a short deadline ends such a lookup with -ETIMEDOUT, a clean error
     * too when memory fails. Nothing else may time out. */
    int64_t deadline = moor_deadline_in(full ? SAFETY_MS : DNS_ARMED_MS);
    int rc = full ? NOTE(o, moor_resolve("fault.test", "80", &hints, deadline, &res))
                  : NOTE_ALSO(o, moor_resolve("fault.test", "80", &hints, deadline, &res), -ETIMEDOUT);
    if (rc == 0) {
        assert_non_null(res);
        const struct sockaddr_in *in = (const struct sockaddr_in *)res->ai_addr;
        assert_int_equal(in->sin_family, AF_INET);
        assert_int_equal(ntohl(in->sin_addr.s_addr), 0x0a010203);
        assert_int_equal(ntohs(in->sin_port), 80);
    } else {
        assert_null(res);
    }
    if (full)
        assert_int_equal(rc, 0);
    moor_resolve_free(res);

    /* Connecting by name: a lookup, then the attempts' block. */
    int lfd = moor_tcp_listen("127.0.0.1", 0, 16);
    assert_true(lfd >= 0);
    deadline = moor_deadline_in(full ? SAFETY_MS : DNS_ARMED_MS);
    int fd = full ? NOTE(o, moor_tcp_dial("dial.test", moor_socket_port(lfd), deadline))
                  : NOTE_ALSO(o, moor_tcp_dial("dial.test", moor_socket_port(lfd), deadline),
                              -ETIMEDOUT);
    if (fd >= 0)
        assert_int_equal(moor_close(fd), 0);
    if (full)
        assert_true(fd >= 0);
    assert_int_equal(moor_close(lfd), 0);
}

static void test_fault_dns(void **state)
{
    (void)state;
    if (!dns_start()) {
        print_message("skipped: " DNSMASQ " is not installed (apt-get install dnsmasq-base)\n");
        skip();
    }
    sweep("DNS", scenario_dns, FAIL_ONE);
    sweep("DNS", scenario_dns, FAIL_FROM);
}

/* reactor/dns.c's watcher of a c-ares socket, as it lays it out. */
typedef struct dns_socket_layout {
    ev_io watcher;
    moor__node link;
} dns_socket_layout;

/* c-ares opens its socket to the server, and its watcher finds no memory: the lookup fails
 * with -ENOMEM at once (it used to wait for c-ares' timeout with the socket unwatched, 5 s a
 * try, and so did every later lookup on that socket), and the next lookup on the same
 * executor, memory back, gets a new channel and its answer. The DNS sweep lets lookups time
 * out (c-ares drops an answer it has no memory to read, and asks again after its timeout),
 * so this one fails only allocations of the watcher's size, in turn: none may time out. */
static void test_fault_dns_socket_unwatched(void **state)
{
    (void)state;
    if (!dns_start()) {
        print_message("skipped: " DNSMASQ " is not installed (apt-get install dnsmasq-base)\n");
        skip();
    }
    long n;
    moor_executor *ex = ex_new();
    for (n = 1; n < FAULT_MAX_N; n++) {
        struct addrinfo *res = NULL;
        int64_t deadline = moor_deadline_in(SAFETY_MS);
        __atomic_store_n(&only_size, sizeof(dns_socket_layout), __ATOMIC_SEQ_CST);
        arm(n, FAIL_ONE);
        int rc = moor_resolve("fault.test", NULL, NULL, deadline, &res);
        long got = disarm();
        assert_true(rc == 0 || (got && rc == -ENOMEM));
        assert_true(moor_now() < deadline);
        moor_resolve_free(res);
        assert_int_equal(moor_resolve("fault.test", NULL, NULL, moor_deadline_in(SAFETY_MS), &res), 0);
        moor_resolve_free(res);
        if (!got)
            break;
        /* A new executor for the next N: the channel is made again, its socket opened. */
        ex_free(ex);
        ex = ex_new();
    }
    ex_free(ex);
    assert_true(n >= 2); /* the socket's watcher was among them */
}

static int dns_teardown(void **state)
{
    dns_stop();
    return fixture_teardown(state);
}

/* ---- the chat server's accept path ------------------------------------------------------------ */

/* examples/chat/chat.c, built into this test with MOOR_CHAT_TEST: its main, and its own
 * allocations routed here, counted and failed with moor's. */
int moor_chat_main(int argc, char **argv);
void *moor_chat_malloc(size_t size);
void moor_chat_free(void *ptr);
void *moor_chat_malloc(size_t size) { return fault_malloc(size); }
void moor_chat_free(void *ptr) { fault_free(ptr); }

#define CHAT_WAIT_MS 10000 /* a line the server owes a client: a bound, not a timing */
#define CHAT_SPARE_FDS 64

typedef struct chat_run {
    int port;
    long n;
    int mode;
    long injected;
    int b_served;     /* B got its welcome (else its connection was closed) */
    int server_done;  /* atomic: moor_chat_main returned */
} chat_run;

static int chat_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    FCHECK(fd >= 0);
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&in, sizeof in) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The next line from fd, without its '\n', one byte at a time (the test reads little):
 * its length, 0 at the end of the stream or on a reset, -1 if nothing came within wait_ms. */
static int chat_line(int fd, char *buf, size_t size, int wait_ms)
{
    size_t len = 0;
    for (;;) {
        struct pollfd pfd = {fd, POLLIN, 0};
        if (poll(&pfd, 1, wait_ms) != 1)
            return -1;
        char ch;
        ssize_t n = read(fd, &ch, 1);
        if (n <= 0)
            return 0;
        if (ch == '\n') {
            buf[len] = '\0';
            return (int)len;
        }
        if (len + 1 < size)
            buf[len++] = ch;
    }
}

/* Read lines from fd until one starts with `prefix` (others, as joins, may come between):
 * 1, or 0 if the connection was closed first, or -1 if nothing came. */
static int chat_wait_for(int fd, const char *prefix)
{
    char line[256];
    int n;
    while ((n = chat_line(fd, line, sizeof line, CHAT_WAIT_MS)) > 0)
        if (strncmp(line, prefix, strlen(prefix)) == 0)
            return 1;
    return n;
}

/* The same, for a line that must come. */
static int chat_expect(int fd, const char *prefix)
{
    int rc = chat_wait_for(fd, prefix);
    if (rc != 1)
        fprintf(stderr, "chat: expected \"%s...\", got %s\n", prefix,
                rc == 0 ? "a closed connection" : "nothing");
    return rc == 1;
}

static void chat_send(int fd, const char *line)
{
    FCHECK(write(fd, line, strlen(line)) == (ssize_t)strlen(line));
}

/* The clients, on a thread of their own: A is in the room before allocations fail; B
 * connects while they fail, and is served or closed; then A, B if it was served, and a new
 * client C are served in full. Then SIGTERM stops the server. */
static void *chat_clients(void *arg)
{
    chat_run *c = arg;
    int a = -1;
    for (int i = 0; i < 500 && a < 0; i++) {
        a = chat_connect(c->port);
        if (a < 0)
            sleep_ms(10);
    }
    FCHECK(a >= 0);
    FCHECK(chat_expect(a, "* welcome guest1"));

    /* Descriptors in between, so that the server's fd table must grow for B's. */
    int spare[CHAT_SPARE_FDS];
    for (int i = 0; i < CHAT_SPARE_FDS; i++)
        FCHECK((spare[i] = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0);

    arm(c->n, c->mode);
    int b = chat_connect(c->port); /* the backlog takes it, whatever the server does */
    FCHECK(b >= 0);
    char line[256];
    /* Answered while allocations still fail: a welcome or a closed connection, never
     * silence (nor a wait for memory to come back). */
    int n = chat_line(b, line, sizeof line, CHAT_WAIT_MS);
    c->injected = disarm();
    FCHECK(n >= 0);
    int welcomed = n > 0 && strncmp(line, "* welcome ", 10) == 0;
    FCHECK(n == 0 || welcomed);
    if (welcomed) {
        /* Served, or closed now: memory may have failed after the welcome (its fd could not
         * be watched), and then the server lets it go. */
        chat_send(b, "/who\n");
        int rc = chat_wait_for(b, "* online: ");
        FCHECK(rc >= 0);
        c->b_served = rc == 1;
    }
    if (c->b_served) {
        char hello[300];
        snprintf(hello, sizeof hello, "%s: hello from b", line + 10);
        chat_send(b, "hello from b\n");
        FCHECK(chat_expect(a, hello));
    }
    for (int i = 0; i < CHAT_SPARE_FDS; i++)
        close(spare[i]);
    chat_send(a, "/who\n");
    FCHECK(chat_expect(a, "* online: "));
    int cl = chat_connect(c->port);
    FCHECK(cl >= 0);
    FCHECK(chat_expect(cl, "* welcome "));
    close(cl);
    close(b);
    close(a);
    while (!__atomic_load_n(&c->server_done, __ATOMIC_SEQ_CST)) {
        kill(getpid(), SIGTERM); /* SIG_IGN but while the server waits for it */
        sleep_ms(20);
    }
    return NULL;
}

static int chat_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&in, sizeof in), 0);
    socklen_t len = sizeof in;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&in, &len), 0);
    close(fd);
    return ntohs(in.sin_port);
}

/* One server from start to stop, with the Nth allocation of B's connection failing (n 0:
 * none). Returns the failures injected. */
static long chat_once(long n, int mode, int *b_served)
{
    chat_run c = {.port = chat_free_port(), .n = n, .mode = mode};
    char port[16];
    snprintf(port, sizeof port, "%d", c.port);
    char *argv[] = {"moor-chat", "-p", port, NULL};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, chat_clients, &c), 0);
    optind = 1;
    int rc = moor_chat_main(3, argv);
    __atomic_store_n(&c.server_done, 1, __ATOMIC_SEQ_CST);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(rc, 0);
    assert_int_equal(fiber_failed(), 0);
    *b_served = c.b_served;
    return c.injected;
}

static void chat_sweep(int mode)
{
    int served;
    (void)chat_once(0, mode, &served); /* warm-up: the baseline of live blocks after it */
    assert_true(served);
    long base = live_now(), n, closed = 0;
    for (n = 1; n < FAULT_MAX_N; n++) {
        long got = chat_once(n, mode, &served);
        closed += !served;
        if (live_now() != base)
            fail_msg("chat, N = %ld: %ld block(s) leaked", n, live_now() - base);
        if (got == 0) {
            assert_true(served);
            break;
        }
    }
    assert_true(n < FAULT_MAX_N);
    print_message("chat accept path (%s): %ld runs, the new client closed in %ld\n",
                  mode == FAIL_ONE ? "Nth fails" : "from the Nth on", n, closed);
}

static void test_fault_chat_accept(void **state)
{
    (void)state;
    /* A SIGTERM that comes while the server does not wait for it is ignored. */
    signal(SIGTERM, SIG_IGN);
    chat_sweep(FAIL_ONE);
    chat_sweep(FAIL_FROM);
    signal(SIGTERM, SIG_DFL);
}

int main(void)
{
    child_signals_save();
    /* Before any executor: everything moor allocates is counted. */
    moor_set_allocator(fault_malloc, fault_realloc, fault_free);
    const struct CMUnitTest tests[] = {
        TEST(test_fault_spawn),
        TEST(test_fault_chan),
        TEST(test_fault_promise),
        TEST(test_fault_remote_wake_without_memory),
        TEST(test_fault_sync),
        TEST(test_fault_blocking),
        TEST(test_fault_timer),
        TEST(test_fault_io),
        cmocka_unit_test_prestate_setup_teardown(test_fault_dns, fixture_setup, dns_teardown,
                                                 (void *)"test_fault_dns"),
        cmocka_unit_test_prestate_setup_teardown(test_fault_dns_socket_unwatched, fixture_setup,
                                                 dns_teardown,
                                                 (void *)"test_fault_dns_socket_unwatched"),
        TEST(test_fault_chat_accept),
    };
    return RUN_TESTS(tests);
}
