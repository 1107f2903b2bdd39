/* Channels across executors (moor_xchan): fibers of executors on different threads send and
 * receive; every value is received exactly once or its send reports failure, under closes,
 * deadlines and cancels that race with the other thread. Each thread here makes its own
 * executor (ex_thread below). */
#include <pthread.h>
#include <sched.h>

#include "fixture.h"

/* ---- an executor on a thread of its own -------------------------------------------------- */

/* A thread that makes an executor, runs fn(arg) as its first fiber until every fiber is done,
 * joins it and frees the executor, checking (FCHECK) it left nothing behind. */
typedef struct ex_thread {
    pthread_t thread;
    moor_fiber_fn fn;
    void *arg;
    intptr_t result;
} ex_thread;

static void *ex_thread_main(void *p)
{
    ex_thread *et = p;
    moor_executor *ex = NULL;
    if (moor_executor_new(&ex, NULL) != 0) {
        FCHECK(!"moor_executor_new");
        return NULL;
    }
    moor_fiber *f;
    FCHECK(moor_spawn(&f, et->fn, et->arg, NULL) == 0);
    FCHECK(moor_executor_run(ex) == 0);
    FCHECK(moor_join(f, &et->result) == 0);
    moor_executor_stats st;
    moor_executor_stats_get(ex, &st);
    FCHECK(st.tasks == 0 && st.fibers == 0 && st.timers == 0);
    moor_executor_free(ex);
    return NULL;
}

static void ex_thread_start(ex_thread *et, moor_fiber_fn fn, void *arg)
{
    et->fn = fn;
    et->arg = arg;
    et->result = -1;
    assert_int_equal(pthread_create(&et->thread, NULL, ex_thread_main, et), 0);
}

static intptr_t ex_thread_join(ex_thread *et)
{
    assert_int_equal(pthread_join(et->thread, NULL), 0);
    return et->result;
}

static int rounds(int n) { return UNDER_VALGRIND ? n / 10 : UNDER_TSAN ? n / 4 : n; }

static moor_xchan *xchan_new(size_t elem_size, size_t cap)
{
    moor_xchan *ch = NULL;
    assert_int_equal(moor_xchan_new(&ch, elem_size, cap), 0);
    assert_non_null(ch);
    return ch;
}

/* Spin (yielding the CPU) until *counter reaches n: another thread's fibers are where the
 * test needs them. Bounded by SAFETY_MS, a bug fails rather than hangs. */
static int wait_count(const int *counter, int n)
{
    int64_t end = moor_now() + SAFETY_MS;
    while (__atomic_load_n(counter, __ATOMIC_ACQUIRE) < n) {
        if (moor_now() > end)
            return 0;
        sched_yield();
    }
    return 1;
}

/* ---- creation ----------------------------------------------------------------------------- */

static void test_xchan_new_sizes(void **state)
{
    (void)state;
    moor_xchan *ch = NULL;
    assert_int_equal(moor_xchan_new(&ch, 0, 4), -EINVAL);
    assert_int_equal(moor_xchan_new(&ch, SIZE_MAX, 2), -EINVAL);
    assert_int_equal(moor_xchan_new(&ch, SIZE_MAX / 2 + 1, 2), -EINVAL);
    assert_int_equal(moor_xchan_new(&ch, 1, SIZE_MAX), -ENOMEM); /* no object that large */
    assert_int_equal(moor_xchan_new(&ch, SIZE_MAX, 0), 0);       /* nothing buffered: fine */
    moor_xchan_free(ch);
    moor_xchan_free(NULL);
    /* No executor on this thread: the calls that never wait work. */
    ch = xchan_new(sizeof(int), 2);
    int v = 7, w = 0;
    assert_int_equal(moor_xchan_try_recv(ch, &w), -EAGAIN);
    assert_int_equal(moor_xchan_try_send(ch, &v), 0);
    assert_int_equal(moor_xchan_try_send(ch, &v), 0);
    assert_int_equal(moor_xchan_try_send(ch, &v), -EAGAIN);
    assert_int_equal(moor_xchan_len(ch), 2);
    assert_int_equal(moor_xchan_try_recv(ch, &w), 0);
    assert_int_equal(w, 7);
    moor_xchan_close(ch);
    assert_int_equal(moor_xchan_try_send(ch, &v), -EPIPE);
    assert_int_equal(moor_xchan_try_recv(ch, &w), 0); /* drained after the close */
    assert_int_equal(moor_xchan_try_recv(ch, &w), -EPIPE);
    moor_xchan_free(ch);
}

/* ---- ping-pong ----------------------------------------------------------------------------- */

typedef struct pingpong {
    moor_xchan *ping, *pong;
    int n;
} pingpong;

static intptr_t pinger(void *arg)
{
    pingpong *pp = arg;
    for (int i = 0; i < pp->n; i++) {
        FCHECK(moor_xchan_send(pp->ping, &i, -1) == 0);
        int v = -1;
        FCHECK(moor_xchan_recv(pp->pong, &v, -1) == 0);
        FCHECK(v == i + 1);
    }
    moor_xchan_close(pp->ping);
    return 0;
}

static intptr_t ponger(void *arg)
{
    pingpong *pp = arg;
    int v, n = 0;
    while (moor_xchan_recv(pp->ping, &v, -1) == 0) {
        FCHECK(v == n);
        v++;
        FCHECK(moor_xchan_send(pp->pong, &v, -1) == 0);
        n++;
    }
    return n;
}

static void ping_pong(size_t cap)
{
    pingpong pp = {xchan_new(sizeof(int), cap), xchan_new(sizeof(int), cap), rounds(4000)};
    ex_thread a, b;
    ex_thread_start(&a, pinger, &pp);
    ex_thread_start(&b, ponger, &pp);
    assert_int_equal(ex_thread_join(&a), 0);
    assert_int_equal(ex_thread_join(&b), pp.n);
    assert_int_equal(fiber_failed(), 0);
    moor_xchan_free(pp.ping);
    moor_xchan_free(pp.pong);
}

static void test_xchan_ping_pong_rendezvous(void **state)
{
    (void)state;
    ping_pong(0);
}

static void test_xchan_ping_pong_buffered(void **state)
{
    (void)state;
    ping_pong(4);
}

/* ---- fan-in and fan-out --------------------------------------------------------------------- */

#define PRODUCERS 3
#define FIBERS_PER 2 /* fibers per executor, each a sender (or receiver) of its own */

typedef struct fan {
    moor_xchan *ch;
    int n;            /* values per sender */
    int id;           /* this thread's index */
    int senders_left; /* atomic: the last to finish closes (fan-in) */
    int *seen;        /* fan-out: times each value was received, [n] */
} fan;

typedef struct fan_fiber {
    fan *f;
    int id;
} fan_fiber;

static intptr_t fan_in_sender(void *arg)
{
    fan_fiber *ff = arg;
    for (int i = 0; i < ff->f->n; i++) {
        uint64_t v = ((uint64_t)ff->id << 32) | (uint64_t)i;
        FCHECK(moor_xchan_send(ff->f->ch, &v, -1) == 0);
    }
    if (__atomic_sub_fetch(&ff->f->senders_left, 1, __ATOMIC_ACQ_REL) == 0)
        moor_xchan_close(ff->f->ch);
    return 0;
}

typedef struct fan_thread {
    fan *shared;
    int id;
} fan_thread;

static intptr_t fan_in_producer(void *arg)
{
    fan_thread *ft = arg;
    fan_fiber ffs[FIBERS_PER];
    moor_fiber *fs[FIBERS_PER];
    for (int i = 0; i < FIBERS_PER; i++) {
        ffs[i] = (fan_fiber){ft->shared, ft->id * FIBERS_PER + i};
        FCHECK(moor_spawn(&fs[i], fan_in_sender, &ffs[i], NULL) == 0);
    }
    for (int i = 0; i < FIBERS_PER; i++)
        FCHECK(moor_join(fs[i], NULL) == 0);
    return 0;
}

static void fan_in(size_t cap)
{
    fan f = {.ch = xchan_new(sizeof(uint64_t), cap), .n = rounds(2000),
             .senders_left = PRODUCERS * FIBERS_PER};
    ex_thread t[PRODUCERS];
    fan_thread ft[PRODUCERS];
    for (int i = 0; i < PRODUCERS; i++) {
        ft[i] = (fan_thread){&f, i};
        ex_thread_start(&t[i], fan_in_producer, &ft[i]);
    }
    /* The consumer: plain code on this thread's executor. */
    moor_executor *ex = ex_new();
    int next[PRODUCERS * FIBERS_PER] = {0};
    int total = 0;
    uint64_t v;
    int rc;
    while ((rc = moor_xchan_recv(f.ch, &v, -1)) == 0) {
        int id = (int)(v >> 32), seq = (int)(uint32_t)v;
        assert_in_range(id, 0, PRODUCERS * FIBERS_PER - 1);
        assert_int_equal(seq, next[id]); /* FIFO per sender, none lost, none twice */
        next[id]++;
        total++;
    }
    assert_int_equal(rc, -EPIPE);
    for (int i = 0; i < PRODUCERS; i++)
        assert_int_equal(ex_thread_join(&t[i]), 0);
    assert_int_equal(total, PRODUCERS * FIBERS_PER * f.n);
    ex_free(ex);
    moor_xchan_free(f.ch);
}

static void test_xchan_fan_in(void **state)
{
    (void)state;
    fan_in(0);
    fan_in(8);
}

static intptr_t fan_out_receiver(void *arg)
{
    fan *f = arg;
    int v, last = -1, got = 0, rc;
    while ((rc = moor_xchan_recv(f->ch, &v, -1)) == 0) {
        FCHECK(v > last); /* one sender: its order holds at each receiver */
        FCHECK(v >= 0 && v < f->n);
        last = v;
        __atomic_add_fetch(&f->seen[v], 1, __ATOMIC_RELAXED);
        got++;
    }
    FCHECK(rc == -EPIPE);
    return got;
}

static intptr_t fan_out_consumer(void *arg)
{
    moor_fiber *fs[FIBERS_PER];
    for (int i = 0; i < FIBERS_PER; i++)
        FCHECK(moor_spawn(&fs[i], fan_out_receiver, arg, NULL) == 0);
    intptr_t got = 0;
    for (int i = 0; i < FIBERS_PER; i++) {
        intptr_t r = 0;
        FCHECK(moor_join(fs[i], &r) == 0);
        got += r;
    }
    return got;
}

static void fan_out(size_t cap)
{
    fan f = {.ch = xchan_new(sizeof(int), cap), .n = rounds(6000)};
    f.seen = calloc((size_t)f.n, sizeof *f.seen);
    assert_non_null(f.seen);
    ex_thread t[PRODUCERS];
    for (int i = 0; i < PRODUCERS; i++)
        ex_thread_start(&t[i], fan_out_consumer, &f);
    moor_executor *ex = ex_new(); /* the producer: plain code */
    for (int i = 0; i < f.n; i++)
        assert_int_equal(moor_xchan_send(f.ch, &i, -1), 0);
    moor_xchan_close(f.ch);
    intptr_t total = 0;
    for (int i = 0; i < PRODUCERS; i++)
        total += ex_thread_join(&t[i]);
    assert_int_equal(total, f.n);
    for (int i = 0; i < f.n; i++)
        assert_int_equal(f.seen[i], 1);
    ex_free(ex);
    free(f.seen);
    moor_xchan_free(f.ch);
}

static void test_xchan_fan_out(void **state)
{
    (void)state;
    fan_out(0);
    fan_out(8);
}

/* ---- close while others wait ---------------------------------------------------------------- */

typedef struct closing {
    moor_xchan *ch;
    int send;         /* the waiters send (the channel is full) or receive (it is empty) */
    int waiting;      /* atomic: fibers known to wait */
    int results[FIBERS_PER];
} closing;

typedef struct closing_fiber {
    closing *c;
    int i;
} closing_fiber;

static intptr_t closing_waiter(void *arg)
{
    closing_fiber *cf = arg;
    int v = 100 + cf->i;
    cf->c->results[cf->i] = cf->c->send ? moor_xchan_send(cf->c->ch, &v, -1)
                                        : moor_xchan_recv(cf->c->ch, &v, -1);
    return 0;
}

/* Runs after the waiters (the run queue is FIFO): each has queued itself and suspended. */
static intptr_t closing_count(void *arg)
{
    closing *c = arg;
    __atomic_add_fetch(&c->waiting, FIBERS_PER, __ATOMIC_RELEASE);
    return 0;
}

static intptr_t closing_thread(void *arg)
{
    closing *c = arg;
    closing_fiber cfs[FIBERS_PER];
    moor_fiber *fs[FIBERS_PER + 1];
    for (int i = 0; i < FIBERS_PER; i++) {
        cfs[i] = (closing_fiber){c, i};
        FCHECK(moor_spawn(&fs[i], closing_waiter, &cfs[i], NULL) == 0);
    }
    FCHECK(moor_spawn(&fs[FIBERS_PER], closing_count, c, NULL) == 0);
    for (int i = 0; i <= FIBERS_PER; i++)
        FCHECK(moor_join(fs[i], NULL) == 0);
    return 0;
}

static void test_xchan_close_wakes_receivers(void **state)
{
    (void)state;
    closing c = {.ch = xchan_new(sizeof(int), 0), .send = 0};
    ex_thread t;
    ex_thread_start(&t, closing_thread, &c);
    assert_true(wait_count(&c.waiting, FIBERS_PER));
    moor_xchan_close(c.ch);
    ex_thread_join(&t);
    for (int i = 0; i < FIBERS_PER; i++)
        assert_int_equal(c.results[i], -EPIPE);
    moor_xchan_free(c.ch);
}

static void test_xchan_close_wakes_senders(void **state)
{
    (void)state;
    closing c = {.ch = xchan_new(sizeof(int), 2), .send = 1};
    int v = 1, w = 0;
    assert_int_equal(moor_xchan_try_send(c.ch, &v), 0);
    v = 2;
    assert_int_equal(moor_xchan_try_send(c.ch, &v), 0);
    ex_thread t;
    ex_thread_start(&t, closing_thread, &c);
    assert_true(wait_count(&c.waiting, FIBERS_PER));
    moor_xchan_close(c.ch);
    ex_thread_join(&t);
    for (int i = 0; i < FIBERS_PER; i++)
        assert_int_equal(c.results[i], -EPIPE);
    /* What was buffered before the close is still received, nothing else. */
    assert_int_equal(moor_xchan_try_recv(c.ch, &w), 0);
    assert_int_equal(w, 1);
    assert_int_equal(moor_xchan_try_recv(c.ch, &w), 0);
    assert_int_equal(w, 2);
    assert_int_equal(moor_xchan_try_recv(c.ch, &w), -EPIPE);
    moor_xchan_free(c.ch);
}

/* A sender blocked on a full channel, a receiver drains from another thread: the sender's
 * value moves into the freed slot and its send completes; the order holds. */
static intptr_t blocked_sender(void *arg)
{
    moor_xchan *ch = arg;
    for (int i = 0; i < 10; i++)
        FCHECK(moor_xchan_send(ch, &i, -1) == 0);
    return 0;
}

static void test_xchan_full_then_drained(void **state)
{
    (void)state;
    moor_xchan *ch = xchan_new(sizeof(int), 1);
    ex_thread t;
    ex_thread_start(&t, blocked_sender, ch);
    moor_executor *ex = ex_new();
    for (int i = 0; i < 10; i++) {
        int v = -1;
        assert_int_equal(moor_xchan_recv(ch, &v, moor_deadline_in(SAFETY_MS)), 0);
        assert_int_equal(v, i);
    }
    ex_thread_join(&t);
    int v;
    assert_int_equal(moor_xchan_try_recv(ch, &v), -EAGAIN);
    ex_free(ex);
    moor_xchan_free(ch);
}

/* ---- deadlines ------------------------------------------------------------------------------ */

static void test_xchan_deadlines(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_xchan *ch = xchan_new(sizeof(int), 1);
    int v = 5, w = 0;
    /* Already past: a try, then -ETIMEDOUT; a value that is there is still taken. */
    assert_int_equal(moor_xchan_recv(ch, &w, 0), -ETIMEDOUT);
    assert_int_equal(moor_xchan_send(ch, &v, 0), 0);
    assert_int_equal(moor_xchan_send(ch, &v, moor_now() - 1), -ETIMEDOUT); /* full */
    assert_int_equal(moor_xchan_recv(ch, &w, 0), 0);
    assert_int_equal(w, 5);
    /* A short one: never early. */
    int64_t t0 = moor_now();
    assert_int_equal(moor_xchan_recv(ch, &w, t0 + WAIT_MS), -ETIMEDOUT);
    assert_true(moor_now() - t0 >= WAIT_MS);
    assert_int_equal(ex_stats(ex).timers, 0);
    /* Far ones: a timer queued while it waits, gone after; the value arrives from elsewhere. */
    int64_t far[] = {INT64_MAX, INT64_MAX - 1, INT64_MAX / 2};
    for (size_t i = 0; i < sizeof far / sizeof far[0]; i++) {
        ex_thread t;
        ex_thread_start(&t, blocked_sender, ch);
        for (int k = 0; k < 10; k++) {
            assert_int_equal(moor_xchan_recv(ch, &w, far[i]), 0);
            assert_int_equal(w, k);
        }
        ex_thread_join(&t);
        assert_int_equal(ex_stats(ex).timers, 0);
    }
    moor_xchan_free(ch);
    ex_free(ex);
}

/* ---- cancels and deadlines racing with the other thread --------------------------------------- */

typedef struct race {
    moor_xchan *ch;
    int n;                  /* values 0..n-1 */
    int stop;               /* atomic: the sender is done */
    unsigned char *sent;    /* [n]: the send reported success */
    unsigned char *got;     /* [n]: times received */
    int sends_ok, recvs_ok, cancels, timeouts;
} race;

typedef struct race_op {
    race *r;
    int value;   /* to send, or received */
    int rc;
    int send;
    int64_t deadline;
} race_op;

static intptr_t race_op_fn(void *arg)
{
    race_op *op = arg;
    op->rc = op->send ? moor_xchan_send(op->r->ch, &op->value, op->deadline)
                      : moor_xchan_recv(op->r->ch, &op->value, op->deadline);
    return 0;
}

/* Yield a few times (how many varies), then cancel the operation's fiber. */
typedef struct canceller {
    moor_fiber *victim;
    int yields;
} canceller;

static intptr_t cancel_fn(void *arg)
{
    canceller *c = arg;
    for (int i = 0; i < c->yields; i++)
        moor_yield();
    moor_cancel(c->victim);
    return 0;
}

/* One operation, with a deadline of 0-1 ms and a cancel after 0-3 yields: whichever comes
 * first, or the counterpart. */
static int race_one(race *r, race_op *op, unsigned seed)
{
    op->deadline = moor_now() + (int64_t)(seed % 2);
    moor_fiber *f, *c;
    FCHECK(moor_spawn(&f, race_op_fn, op, NULL) == 0);
    canceller cc = {f, (int)(seed / 2 % 4)};
    FCHECK(moor_spawn(&c, cancel_fn, &cc, NULL) == 0);
    FCHECK(moor_join(c, NULL) == 0);
    moor_join(f, NULL);
    if (op->rc == -ECANCELED)
        r->cancels++;
    else if (op->rc == -ETIMEDOUT)
        r->timeouts++;
    else
        FCHECK(op->rc == 0);
    return op->rc;
}

static intptr_t race_sender(void *arg)
{
    race *r = arg;
    for (int i = 0; i < r->n; i++) {
        race_op op = {.r = r, .value = i, .send = 1};
        if (race_one(r, &op, (unsigned)i * 2654435761u >> 7) == 0) {
            r->sent[i] = 1;
            r->sends_ok++;
        }
    }
    __atomic_store_n(&r->stop, 1, __ATOMIC_RELEASE);
    return 0;
}

static intptr_t race_receiver(void *arg)
{
    race *r = arg;
    unsigned seed = 12345;
    while (!__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE)) {
        race_op op = {.r = r, .value = -1, .send = 0};
        seed = seed * 1103515245u + 12345u;
        if (race_one(r, &op, seed >> 9) == 0) {
            FCHECK(op.value >= 0 && op.value < r->n);
            if (op.value >= 0 && op.value < r->n)
                r->got[op.value]++;
            r->recvs_ok++;
        }
    }
    /* What the ring still holds was sent: take it. */
    int v;
    while (moor_xchan_try_recv(r->ch, &v) == 0) {
        r->got[v]++;
        r->recvs_ok++;
    }
    return 0;
}

static void race_run(size_t cap)
{
    race r = {.ch = xchan_new(sizeof(int), cap), .n = rounds(3000)};
    r.sent = calloc((size_t)r.n, 1);
    r.got = calloc((size_t)r.n, 1);
    assert_true(r.sent && r.got);
    ex_thread a, b;
    ex_thread_start(&a, race_sender, &r);
    ex_thread_start(&b, race_receiver, &r);
    ex_thread_join(&a);
    ex_thread_join(&b);
    for (int i = 0; i < r.n; i++)
        assert_int_equal(r.got[i], r.sent[i]); /* received exactly once iff sent */
    assert_int_equal(r.sends_ok, r.recvs_ok);
    /* The race was run: some operations completed, some gave up (lower bounds only). */
    assert_true(r.sends_ok > 0);
    assert_true(r.cancels + r.timeouts > 0);
    print_message("capacity %zu: %d sent, %d cancels, %d timeouts\n", cap, r.sends_ok, r.cancels,
                  r.timeouts);
    free(r.sent);
    free(r.got);
    moor_xchan_free(r.ch);
}

static void test_xchan_cancel_races_counterpart(void **state)
{
    (void)state;
    race_run(0);
    race_run(1);
}

/* ---- select on the local side ----------------------------------------------------------------- */

typedef struct delayed_send {
    moor_xchan *ch;
    int value;
    int64_t after_ms;
    int rc;
} delayed_send;

static intptr_t delayed_sender(void *arg)
{
    delayed_send *d = arg;
    moor_sleep(moor_deadline_in(d->after_ms));
    d->rc = moor_xchan_send(d->ch, &d->value, moor_deadline_in(SAFETY_MS));
    return 0;
}

static intptr_t receive_one(void *arg)
{
    int v = -1;
    FCHECK(moor_xchan_recv(arg, &v, moor_deadline_in(SAFETY_MS)) == 0);
    return v;
}

static void test_xchan_select_with_local(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_xchan *xc = xchan_new(sizeof(int), 0);
    moor_chan *lc;
    assert_int_equal(moor_chan_new(&lc, sizeof(int), 1), 0);
    int xv = -1, lv = -1;
    moor_xchan_future xf;
    moor_chan_future lf;
    moor_sleep_future sf;
    moor_future *futs[] = {&xf.base, &lf.base, &sf.base};

    /* 1. The other thread's send wins. */
    delayed_send d = {xc, 41, 10, -1};
    ex_thread t;
    ex_thread_start(&t, delayed_sender, &d);
    moor_xchan_recv_init(&xf, xc, &xv, -1);
    moor_chan_recv_init(&lf, lc, &lv, -1);
    moor_sleep_init(&sf, moor_deadline_in(SAFETY_MS));
    assert_int_equal(moor_select(futs, 3, -1), 0);
    assert_int_equal(xf.base.result, 0);
    assert_int_equal(xv, 41);
    ex_thread_join(&t);
    assert_int_equal(d.rc, 0);

    /* 2. The local channel wins; the xchan receive is cancelled and takes nothing: the
     * other thread's send (a rendezvous) is still waiting for a receiver, then gets one. */
    d = (delayed_send){xc, 42, 0, -1};
    int one = 1;
    assert_int_equal(moor_chan_try_send(lc, &one), 0);
    ex_thread_start(&t, delayed_sender, &d);
    moor_xchan_recv_init(&xf, xc, &xv, -1);
    moor_chan_recv_init(&lf, lc, &lv, -1);
    moor_sleep_init(&sf, moor_deadline_in(SAFETY_MS));
    xv = -1;
    assert_int_equal(moor_select(futs, 3, -1), 1);
    assert_int_equal(lv, 1);
    assert_int_equal(xv, -1);
    assert_int_equal(moor_xchan_recv(xc, &xv, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(xv, 42);
    ex_thread_join(&t);
    assert_int_equal(d.rc, 0);

    /* 3. The timeout wins: nothing queued on the channel after. */
    moor_xchan_recv_init(&xf, xc, &xv, -1);
    moor_chan_recv_init(&lf, lc, &lv, -1);
    moor_sleep_init(&sf, moor_deadline_in(WAIT_MS));
    assert_int_equal(moor_select(futs, 3, -1), 2);
    /* 4. A send future in a select, the receiver on another thread. */
    int xs = 43;
    moor_xchan_send_init(&xf, xc, &xs, -1);
    moor_chan_recv_init(&lf, lc, &lv, -1);
    moor_sleep_init(&sf, moor_deadline_in(SAFETY_MS));
    ex_thread_start(&t, receive_one, xc);
    assert_int_equal(moor_select(futs, 3, -1), 0);
    assert_int_equal(xf.base.result, 0);
    assert_int_equal(ex_thread_join(&t), 43);
    moor_chan_free(lc);
    moor_xchan_free(xc);
    ex_free(ex);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_xchan_new_sizes),
        TEST(test_xchan_ping_pong_rendezvous),
        TEST(test_xchan_ping_pong_buffered),
        TEST(test_xchan_fan_in),
        TEST(test_xchan_fan_out),
        TEST(test_xchan_close_wakes_receivers),
        TEST(test_xchan_close_wakes_senders),
        TEST(test_xchan_full_then_drained),
        TEST(test_xchan_deadlines),
        TEST(test_xchan_cancel_races_counterpart),
        TEST(test_xchan_select_with_local),
    };
    return RUN_TESTS(tests);
}
