/* Channels across executors (moor_xchan): fibers of executors on different threads send and
 * receive; every value is received exactly once or its send reports failure, under closes,
 * deadlines and cancels that race with the other thread. The threads are a moor_threads_run,
 * or threads that each make their own executor (ex_thread below) where a case needs one
 * started at a given moment. */
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

/* On two executors of a moor_threads_run: thread 0 pings, thread 1 pongs. */
static intptr_t ping_or_pong(void *arg)
{
    return moor_thread_index() == 0 ? pinger(arg) : ponger(arg);
}

static void ping_pong(size_t cap)
{
    pingpong pp = {xchan_new(sizeof(int), cap), xchan_new(sizeof(int), cap), rounds(4000)};
    intptr_t results[2] = {-1, -1};
    assert_int_equal(moor_threads_run(2, ping_or_pong, &pp, NULL, results), 0);
    assert_int_equal(results[0], 0);
    assert_int_equal(results[1], pp.n);
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
    int select;       /* fan-out: receivers wait in selects */
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
    for (;;) {
        if (f->select) {
            moor_xchan_future xf;
            moor_sleep_future sf;
            moor_xchan_recv_init(&xf, f->ch, &v, -1);
            moor_sleep_init(&sf, moor_deadline_in(SAFETY_MS));
            moor_future *futs[] = {&sf.base, &xf.base};
            FCHECK(moor_select(futs, 2, -1) == 1);
            rc = (int)xf.base.result;
        } else {
            rc = moor_xchan_recv(f->ch, &v, -1);
        }
        if (rc != 0)
            break;
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

static void fan_out(size_t cap, int select)
{
    fan f = {.ch = xchan_new(sizeof(int), cap), .n = rounds(6000), .select = select};
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
    fan_out(0, 0);
    fan_out(8, 0);
    fan_out(0, 1); /* receivers in selects, woken by the other thread's sends */
    fan_out(8, 1);
}

/* ---- close while others wait ---------------------------------------------------------------- */

typedef struct closing {
    moor_xchan *ch;
    int send;         /* the waiters send (the channel is full) or receive (it is empty) */
    int select;       /* each waits in a select (with a long sleep beside it) */
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
    closing *c = cf->c;
    int v = 100 + cf->i;
    if (!c->select) {
        c->results[cf->i] = c->send ? moor_xchan_send(c->ch, &v, -1) : moor_xchan_recv(c->ch, &v, -1);
        return 0;
    }
    moor_xchan_future xf;
    moor_sleep_future sf;
    if (c->send)
        moor_xchan_send_init(&xf, c->ch, &v, -1);
    else
        moor_xchan_recv_init(&xf, c->ch, &v, -1);
    moor_sleep_init(&sf, moor_deadline_in(SAFETY_MS));
    moor_future *futs[] = {&xf.base, &sf.base};
    FCHECK(moor_select(futs, 2, -1) == 0);
    c->results[cf->i] = (int)xf.base.result;
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

static void close_wakes_receivers(int select)
{
    closing c = {.ch = xchan_new(sizeof(int), 0), .send = 0, .select = select};
    ex_thread t;
    ex_thread_start(&t, closing_thread, &c);
    assert_true(wait_count(&c.waiting, FIBERS_PER));
    moor_xchan_close(c.ch);
    ex_thread_join(&t);
    for (int i = 0; i < FIBERS_PER; i++)
        assert_int_equal(c.results[i], -EPIPE);
    moor_xchan_free(c.ch);
}

static void test_xchan_close_wakes_receivers(void **state)
{
    (void)state;
    close_wakes_receivers(0);
    close_wakes_receivers(1);
}

static void close_wakes_senders(int select)
{
    closing c = {.ch = xchan_new(sizeof(int), 2), .send = 1, .select = select};
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

static void test_xchan_close_wakes_senders(void **state)
{
    (void)state;
    close_wakes_senders(0);
    close_wakes_senders(1);
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

/* ---- FIFO among waiters of different executors ---------------------------------------------- */

typedef struct queued_op {
    moor_xchan *ch;
    int send;
    int value;   /* to send, or received */
    int rc;
    int *waiting; /* atomic: raised once this one waits */
} queued_op;

static intptr_t queued_op_fn(void *arg)
{
    queued_op *q = arg;
    q->rc = q->send ? moor_xchan_send(q->ch, &q->value, moor_deadline_in(SAFETY_MS))
                    : moor_xchan_recv(q->ch, &q->value, moor_deadline_in(SAFETY_MS));
    return 0;
}

static intptr_t raise_waiting(void *arg)
{
    __atomic_add_fetch(((queued_op *)arg)->waiting, 1, __ATOMIC_RELEASE);
    return 0;
}

/* Its operation first, then (once it waits) the flag: the run queue is FIFO. */
static intptr_t queued_thread(void *arg)
{
    moor_fiber *a, *b;
    FCHECK(moor_spawn(&a, queued_op_fn, arg, NULL) == 0);
    FCHECK(moor_spawn(&b, raise_waiting, arg, NULL) == 0);
    FCHECK(moor_join(a, NULL) == 0);
    FCHECK(moor_join(b, NULL) == 0);
    return 0;
}

/* Three executors queue one after the other (each starts once the one before waits); the
 * counterpart, on a fourth thread, serves them in that order. */
static void fifo_across(int send)
{
    moor_xchan *ch = xchan_new(sizeof(int), 0);
    int waiting = 0;
    queued_op q[3];
    ex_thread t[3];
    for (int i = 0; i < 3; i++) {
        q[i] = (queued_op){ch, send, send ? i : -1, -1, &waiting};
        ex_thread_start(&t[i], queued_thread, &q[i]);
        assert_true(wait_count(&waiting, i + 1));
    }
    moor_executor *ex = ex_new();
    for (int i = 0; i < 3; i++) {
        int v = i;
        if (send) {
            assert_int_equal(moor_xchan_recv(ch, &v, moor_deadline_in(SAFETY_MS)), 0);
            assert_int_equal(v, i);
        } else {
            assert_int_equal(moor_xchan_send(ch, &v, moor_deadline_in(SAFETY_MS)), 0);
        }
    }
    for (int i = 0; i < 3; i++) {
        ex_thread_join(&t[i]);
        assert_int_equal(q[i].rc, 0);
        if (!send)
            assert_int_equal(q[i].value, i);
    }
    ex_free(ex);
    moor_xchan_free(ch);
}

static void test_xchan_fifo_across_executors(void **state)
{
    (void)state;
    fifo_across(0);
    fifo_across(1);
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
    int n;                  /* rounds at least; values 0..4n-1 */
    int stop;               /* atomic: the sender is done */
    int started;            /* atomic: the receiver runs */
    unsigned char *sent;    /* [4n]: the send reported success */
    unsigned char *got;     /* [4n]: times received */
    int sends_ok, recvs_ok;
    int gave_up[2];         /* cancels and timeouts, of the receiver [0] and the sender [1] */
} race;

typedef struct race_op {
    race *r;
    int value;   /* to send, or received */
    int rc;
    int send;
    int select;  /* through a select (with the deadline as a sleep beside it) */
    int64_t deadline;
} race_op;

static intptr_t race_op_fn(void *arg)
{
    race_op *op = arg;
    if (!op->select) {
        op->rc = op->send ? moor_xchan_send(op->r->ch, &op->value, op->deadline)
                          : moor_xchan_recv(op->r->ch, &op->value, op->deadline);
        return 0;
    }
    moor_xchan_future xf;
    moor_sleep_future sf;
    if (op->send)
        moor_xchan_send_init(&xf, op->r->ch, &op->value, -1);
    else
        moor_xchan_recv_init(&xf, op->r->ch, &op->value, -1);
    moor_sleep_init(&sf, op->deadline);
    moor_future *futs[] = {&sf.base, &xf.base};
    int w = moor_select(futs, 2, -1);
    op->rc = w == 1 ? (int)xf.base.result : w == 0 ? -ETIMEDOUT : w;
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
 * first, or the counterpart. One in eight waits 20 ms uncancelled, so that the two sides
 * meet however the threads are scheduled. */
static int race_one(race *r, race_op *op, unsigned seed)
{
    int patient = seed % 8 == 0;
    op->select = seed / 64 % 3 == 0; /* a third through selects */
    op->deadline = moor_now() + (patient ? 20 : (int64_t)(seed / 8 % 2));
    moor_fiber *f, *c = NULL;
    FCHECK(moor_spawn(&f, race_op_fn, op, NULL) == 0);
    canceller cc = {f, (int)(seed / 16 % 4)};
    if (!patient)
        FCHECK(moor_spawn(&c, cancel_fn, &cc, NULL) == 0);
    if (c)
        FCHECK(moor_join(c, NULL) == 0);
    moor_join(f, NULL);
    if (op->rc == -ECANCELED || op->rc == -ETIMEDOUT)
        r->gave_up[op->send]++;
    else
        FCHECK(op->rc == 0);
    return op->rc;
}

static intptr_t race_sender(void *arg)
{
    race *r = arg;
    while (!__atomic_load_n(&r->started, __ATOMIC_ACQUIRE))
        sched_yield();
    /* n rounds, and more (up to 4n) until a tenth of n got through. */
    for (int i = 0; i < 4 * r->n && (i < r->n || r->sends_ok < r->n / 10); i++) {
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
    __atomic_store_n(&r->started, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE)) {
        race_op op = {.r = r, .value = -1, .send = 0};
        seed = seed * 1103515245u + 12345u;
        if (race_one(r, &op, seed >> 9) == 0) {
            FCHECK(op.value >= 0 && op.value < 4 * r->n);
            if (op.value >= 0 && op.value < 4 * r->n)
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
    /* Each round spawns two fibers: under TSan a fiber costs about a millisecond. */
    race r = {.ch = xchan_new(sizeof(int), cap), .n = UNDER_TSAN ? 150 : rounds(3000)};
    r.sent = calloc(4 * (size_t)r.n, 1);
    r.got = calloc(4 * (size_t)r.n, 1);
    assert_true(r.sent && r.got);
    ex_thread a, b;
    ex_thread_start(&a, race_sender, &r);
    ex_thread_start(&b, race_receiver, &r);
    ex_thread_join(&a);
    ex_thread_join(&b);
    for (int i = 0; i < 4 * r.n; i++)
        assert_int_equal(r.got[i], r.sent[i]); /* received exactly once iff sent */
    assert_int_equal(r.sends_ok, r.recvs_ok);
    /* The race was run: some operations completed, some gave up (lower bounds only). */
    assert_true(r.sends_ok > 0);
    assert_true(r.gave_up[0] + r.gave_up[1] > 0);
    print_message("capacity %zu: %d sent; gave up: %d sends, %d receives\n", cap, r.sends_ok,
                  r.gave_up[1], r.gave_up[0]);
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

static intptr_t local_send_one(void *arg)
{
    int one = 1;
    FCHECK(moor_chan_send(arg, &one, -1) == 0);
    return 0;
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

    /* 2. The local channel wins while the xchan receive waits (a fiber of this executor sends
     * once the select waits); the xchan receive is cancelled and takes nothing: the other
     * thread's send (a rendezvous), made after, waits for a receiver, then gets one. */
    int one = 1;
    moor_fiber *local;
    assert_int_equal(moor_spawn(&local, local_send_one, lc, NULL), 0);
    moor_xchan_recv_init(&xf, xc, &xv, -1);
    moor_chan_recv_init(&lf, lc, &lv, -1);
    moor_sleep_init(&sf, moor_deadline_in(SAFETY_MS));
    xv = -1;
    assert_int_equal(moor_select(futs, 3, -1), 1);
    assert_int_equal(moor_join(local, NULL), 0);
    assert_int_equal(lv, one);
    assert_int_equal(xv, -1);
    d = (delayed_send){xc, 42, 0, -1};
    ex_thread_start(&t, delayed_sender, &d);
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

/* Rounds of a select over the xchan and a local channel, both fed at about the same moment:
 * whichever wins, the other's value stays where it was, to be taken by a later round. The
 * sender on the other thread sends plainly, or (capacity 1) through a select of its own that
 * gives up now and then and sends the same value again. */
typedef struct sel_race {
    moor_xchan *xc;
    int n;
    int sender_selects;
    unsigned char *got;
    int retries;
} sel_race;

static intptr_t sel_race_sender(void *arg)
{
    sel_race *r = arg;
    for (int i = 0; i < r->n; i++) {
        if (!r->sender_selects) {
            FCHECK(moor_xchan_send(r->xc, &i, -1) == 0);
            continue;
        }
        for (;;) {
            moor_xchan_future xf;
            moor_sleep_future sf;
            moor_xchan_send_init(&xf, r->xc, &i, -1);
            moor_sleep_init(&sf, moor_deadline_in(1 + i % 2));
            moor_future *futs[] = {&xf.base, &sf.base};
            int w = moor_select(futs, 2, -1);
            if (w == 0) {
                FCHECK(xf.base.result == 0);
                break;
            }
            FCHECK(w == 1);
            r->retries++;
        }
    }
    moor_xchan_close(r->xc);
    return 0;
}

typedef struct local_feed {
    moor_chan *lc;
    int stop;
    int sent;
} local_feed;

static intptr_t local_feeder(void *arg)
{
    local_feed *lf = arg;
    int i = 0;
    while (!lf->stop) {
        for (int k = 0; k < i % 3; k++)
            moor_yield();
        /* Now and then the executor parks: a scheduler that runs one thread at a time
         * (valgrind's) switches to the sender then, rather than at the end of its slice. */
        if (i % 16 == 15)
            moor_sleep(moor_deadline_in(1));
        if (moor_chan_send(lf->lc, &i, -1) != 0)
            break;
        lf->sent++;
        i++;
    }
    return 0;
}

static void sel_race_run(size_t cap, int sender_selects)
{
    moor_executor *ex = ex_new();
    sel_race r = {.xc = xchan_new(sizeof(int), cap), .n = rounds(2000),
                  .sender_selects = sender_selects};
    r.got = calloc((size_t)r.n, 1);
    assert_non_null(r.got);
    local_feed lf = {.stop = 0};
    assert_int_equal(moor_chan_new(&lf.lc, sizeof(int), 1), 0);
    moor_fiber *feeder;
    assert_int_equal(moor_spawn(&feeder, local_feeder, &lf, NULL), 0);
    ex_thread t;
    ex_thread_start(&t, sel_race_sender, &r);
    int xv, lv, local_got = 0, xchan_got = 0;
    for (;;) {
        moor_xchan_future xf;
        moor_chan_future cf;
        xv = -1;
        moor_xchan_recv_init(&xf, r.xc, &xv, -1);
        moor_chan_recv_init(&cf, lf.lc, &lv, -1);
        moor_future *futs[] = {&xf.base, &cf.base};
        int w = moor_select(futs, 2, moor_deadline_in(SAFETY_MS));
        assert_true(w == 0 || w == 1);
        if (w == 1) {
            assert_int_equal(cf.base.result, 0);
            local_got++;
            continue;
        }
        if (xf.base.result == -EPIPE)
            break;
        assert_int_equal(xf.base.result, 0);
        assert_in_range(xv, 0, r.n - 1);
        r.got[xv]++;
        xchan_got++;
    }
    ex_thread_join(&t);
    lf.stop = 1;
    while (moor_chan_try_recv(lf.lc, &lv) == 0) /* the feeder's last ones */
        local_got++;
    moor_chan_close(lf.lc);
    assert_int_equal(moor_join(feeder, NULL), 0);
    while (moor_chan_try_recv(lf.lc, &lv) == 0)
        local_got++;
    assert_int_equal(local_got, lf.sent);
    assert_int_equal(xchan_got, r.n);
    for (int i = 0; i < r.n; i++)
        assert_int_equal(r.got[i], 1);
    print_message("capacity %zu%s: %d local wins, %d sender retries\n", cap,
                  sender_selects ? ", sender in a select" : "", local_got, r.retries);
    moor_chan_free(lf.lc);
    moor_xchan_free(r.xc);
    free(r.got);
    ex_free(ex);
}

static void test_xchan_select_races(void **state)
{
    (void)state;
    sel_race_run(0, 0);
    sel_race_run(1, 0);
    sel_race_run(1, 1);
}

/* Two selects of one executor meet over a rendezvous channel (each claims the other's select
 * on its own thread); a select never pairs its own send with its own receive. */
typedef struct sel_pair {
    moor_xchan *xc;
    int send;
    int value;
    int winner;
} sel_pair;

static intptr_t sel_pair_fn(void *arg)
{
    sel_pair *p = arg;
    moor_xchan_future xf;
    moor_sleep_future sf;
    if (p->send)
        moor_xchan_send_init(&xf, p->xc, &p->value, -1);
    else
        moor_xchan_recv_init(&xf, p->xc, &p->value, -1);
    moor_sleep_init(&sf, moor_deadline_in(SAFETY_MS));
    moor_future *futs[] = {&xf.base, &sf.base};
    p->winner = moor_select(futs, 2, -1);
    FCHECK(xf.base.result == 0);
    return 0;
}

static void test_xchan_select_same_executor(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_xchan *xc = xchan_new(sizeof(int), 0);
    sel_pair rx = {xc, 0, -1, -1}, tx = {xc, 1, 77, -1};
    moor_fiber *a, *b;
    assert_int_equal(moor_spawn(&a, sel_pair_fn, &rx, NULL), 0);
    assert_int_equal(moor_spawn(&b, sel_pair_fn, &tx, NULL), 0);
    assert_int_equal(moor_join(a, NULL), 0);
    assert_int_equal(moor_join(b, NULL), 0);
    assert_int_equal(rx.winner, 0);
    assert_int_equal(tx.winner, 0);
    assert_int_equal(rx.value, 77);
    /* Its own send and receive in one select: they do not pair, the deadline ends it. */
    int out = 5, in = -1;
    moor_xchan_future sf, rf;
    moor_xchan_send_init(&sf, xc, &out, -1);
    moor_xchan_recv_init(&rf, xc, &in, -1);
    moor_future *futs[] = {&sf.base, &rf.base};
    assert_int_equal(moor_select(futs, 2, moor_deadline_in(WAIT_MS)), -ETIMEDOUT);
    assert_int_equal(in, -1);
    assert_int_equal(moor_xchan_try_recv(xc, &in), -EAGAIN); /* nothing left queued */
    moor_xchan_free(xc);
    ex_free(ex);
}

/* ---- values of any size ------------------------------------------------------------------------ */

typedef struct big {
    uint32_t seq;
    unsigned char bytes[300];
    uint32_t sum;
} big;

static intptr_t big_sender(void *arg)
{
    for (uint32_t i = 0; i < 500; i++) {
        big b = {.seq = i, .sum = 0};
        for (size_t k = 0; k < sizeof b.bytes; k++) {
            b.bytes[k] = (unsigned char)(i * 31 + k);
            b.sum += b.bytes[k];
        }
        FCHECK(moor_xchan_send(arg, &b, -1) == 0);
    }
    moor_xchan_close(arg);
    return 0;
}

static void test_xchan_large_values(void **state)
{
    (void)state;
    moor_xchan *ch = xchan_new(sizeof(big), 3);
    ex_thread t;
    ex_thread_start(&t, big_sender, ch);
    moor_executor *ex = ex_new();
    big b;
    uint32_t n = 0;
    while (moor_xchan_recv(ch, &b, -1) == 0) {
        uint32_t sum = 0;
        for (size_t k = 0; k < sizeof b.bytes; k++)
            sum += b.bytes[k];
        assert_int_equal(b.seq, n);
        assert_int_equal(sum, b.sum);
        n++;
    }
    assert_int_equal(n, 500);
    ex_thread_join(&t);
    ex_free(ex);
    moor_xchan_free(ch);
}

/* ---- a thread without an executor ------------------------------------------------------------- */

typedef struct bare {
    moor_xchan *in, *out;  /* the bare thread receives on in, sends on out */
    int rc[6];
    int64_t waited;        /* how long its timed-out receive waited */
} bare;

/* No executor here: waits block the thread. */
static void *bare_thread(void *arg)
{
    bare *b = arg;
    int v = -1;
    int64_t t0 = moor_now();
    b->rc[0] = moor_xchan_recv(b->in, &v, t0 + WAIT_MS); /* nobody sends yet */
    b->waited = moor_now() - t0;
    b->rc[1] = moor_xchan_recv(b->in, &v, -1); /* the fiber's first value */
    b->rc[2] = v == 10 ? 0 : -1;
    v = 20;
    b->rc[3] = moor_xchan_send(b->out, &v, INT64_MAX); /* rendezvous: waits for the fiber */
    v = 21;
    b->rc[4] = moor_xchan_send(b->out, &v, moor_deadline_in(SAFETY_MS));
    b->rc[5] = moor_xchan_recv(b->in, &v, -1); /* closed meanwhile: -EPIPE */
    return NULL;
}

static intptr_t bare_partner(void *arg)
{
    bare *b = arg;
    moor_sleep(moor_deadline_in(2 * WAIT_MS)); /* after the bare thread's timeout */
    int v = 10;
    FCHECK(moor_xchan_send(b->in, &v, -1) == 0);
    for (int want = 20; want <= 21; want++) {
        FCHECK(moor_xchan_recv(b->out, &v, moor_deadline_in(SAFETY_MS)) == 0);
        FCHECK(v == want);
    }
    moor_xchan_close(b->in);
    return 0;
}

static void test_xchan_thread_without_executor(void **state)
{
    (void)state;
    bare b = {xchan_new(sizeof(int), 0), xchan_new(sizeof(int), 0), {0}, 0};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, bare_thread, &b), 0);
    moor_executor *ex = ex_new();
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, bare_partner, &b, NULL), 0);
    assert_int_equal(moor_join(f, NULL), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(b.rc[0], -ETIMEDOUT);
    assert_true(b.waited >= WAIT_MS);
    for (int i = 1; i <= 4; i++)
        assert_int_equal(b.rc[i], 0);
    assert_int_equal(b.rc[5], -EPIPE);
    ex_free(ex);
    moor_xchan_free(b.in);
    moor_xchan_free(b.out);
}

/* ---- the executors and the channel's lifetime ---------------------------------------------------- */

static intptr_t send_three(void *arg)
{
    for (int i = 0; i < 3; i++)
        FCHECK(moor_xchan_send(arg, &i, -1) == 0);
    return 0;
}

/* The executor that made and fed the channel is freed (its thread gone); another uses it on. */
static void test_xchan_outlives_executor(void **state)
{
    (void)state;
    moor_xchan *ch = xchan_new(sizeof(int), 4);
    ex_thread t;
    ex_thread_start(&t, send_three, ch);
    ex_thread_join(&t);
    moor_executor *ex = ex_new();
    for (int i = 0; i < 3; i++) {
        int v = -1;
        assert_int_equal(moor_xchan_recv(ch, &v, -1), 0);
        assert_int_equal(v, i);
    }
    int v;
    assert_int_equal(moor_xchan_recv(ch, &v, moor_deadline_in(1)), -ETIMEDOUT);
    moor_xchan_close(ch);
    ex_free(ex);
    moor_xchan_free(ch); /* from a thread without an executor now */
}

/* A counterpart completes a wait just as the waiter's deadline passes, and the waiter's
 * executor is freed at once, its thread gone: the counterpart's wake (made after it releases
 * the channel's lock) may land on a freed executor, or on the next round's executor that
 * recycled its memory. It must wake nothing, and the value is received iff the send said so. */
typedef struct late {
    moor_xchan *ch;
    int plain;   /* wait from plain code (moor_block_on) rather than a fiber */
    int rc;
    int value;
    int done;    /* atomic */
} late;

static void *late_waiter(void *arg)
{
    late *l = arg;
    moor_executor *ex = NULL;
    FCHECK(moor_executor_new(&ex, NULL) == 0);
    l->value = -1;
    if (l->plain) {
        l->rc = moor_xchan_recv(l->ch, &l->value, moor_deadline_in(1));
    } else {
        race_op op = {.value = -1, .send = 0, .deadline = moor_deadline_in(1)};
        race r = {.ch = l->ch};
        op.r = &r;
        moor_fiber *f;
        FCHECK(moor_spawn(&f, race_op_fn, &op, NULL) == 0);
        FCHECK(moor_join(f, NULL) == 0);
        l->rc = op.rc;
        l->value = op.value;
    }
    moor_executor_free(ex);
    __atomic_store_n(&l->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void test_xchan_wake_after_executor_freed(void **state)
{
    (void)state;
    int n = rounds(400), received = 0;
    for (int i = 0; i < n; i++) {
        late l = {.ch = xchan_new(sizeof(int), 0), .plain = i % 2};
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, late_waiter, &l), 0);
        int sent = 0;
        while (!__atomic_load_n(&l.done, __ATOMIC_ACQUIRE))
            if (moor_xchan_try_send(l.ch, &i) == 0) {
                sent = 1;
                break;
            }
        assert_int_equal(pthread_join(t, NULL), 0);
        if (sent) {
            assert_int_equal(l.rc, 0);
            assert_int_equal(l.value, i);
            received++;
        } else {
            assert_int_equal(l.rc, -ETIMEDOUT);
        }
        moor_xchan_free(l.ch);
    }
    print_message("%d of %d rounds received\n", received, n);
}

/* A wait on an xchan is not a deadlock: another thread may end it. */
static intptr_t dump_then_return(void *arg)
{
    moor_dump(arg);
    return 0;
}

static intptr_t lone_receiver(void *arg)
{
    int v = -1;
    FCHECK(moor_xchan_recv(arg, &v, -1) == 0);
    return v;
}

static intptr_t late_sender(void *arg)
{
    moor_sleep(moor_deadline_in(WAIT_MS));
    int v = 99;
    FCHECK(moor_xchan_send(arg, &v, -1) == 0);
    return 0;
}

static void test_xchan_wait_is_not_deadlock(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_xchan *ch = xchan_new(sizeof(int), 0);
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    assert_non_null(out);
    moor_fiber *rx, *dumper;
    assert_int_equal(moor_spawn(&rx, lone_receiver, ch, NULL), 0);
    assert_int_equal(moor_spawn(&dumper, dump_then_return, out, NULL), 0);
    ex_thread t;
    ex_thread_start(&t, late_sender, ch);
    assert_int_equal(moor_executor_run(ex), 0); /* not -EDEADLK while the receiver waits */
    intptr_t v = 0;
    assert_int_equal(moor_join(rx, &v), 0);
    assert_int_equal(v, 99);
    assert_int_equal(moor_join(dumper, NULL), 0);
    ex_thread_join(&t);
    fclose(out);
    assert_non_null(strstr(text, "waiting on xchan recv 0x"));
    free(text);
    moor_xchan_free(ch);
    ex_free(ex);
}

/* ---- random operations over two channels, three executors and a bare thread ------------------------------------ */

#define RND_THREADS 3
#define RND_FIBERS 4
#define RND_OPS_MAX 600
#define RND_IDS (RND_THREADS * RND_FIBERS + 1) /* the last: a thread without an executor */

typedef struct rnd_state {
    moor_xchan *ch[2];           /* capacity 0 and 2 */
    int ops;                     /* per fiber */
    unsigned char sent[RND_IDS][RND_OPS_MAX]; /* a send reported success */
    unsigned char got[RND_IDS][RND_OPS_MAX];  /* times received; atomic */
    int done_ops[2];             /* atomic: sends and receives that completed */
} rnd_state;

typedef struct rnd_fiber {
    rnd_state *r;
    int id;          /* 0 .. RND_IDS - 1 */
    unsigned seed;
} rnd_fiber;

static unsigned rnd_next(unsigned *seed)
{
    *seed = *seed * 1103515245u + 12345u;
    return *seed >> 8;
}

static void rnd_got(rnd_state *r, uint32_t v)
{
    uint32_t id = v >> 16, seq = v & 0xffff;
    FCHECK(id < RND_IDS && seq < RND_OPS_MAX);
    if (id < RND_IDS && seq < RND_OPS_MAX)
        __atomic_add_fetch(&r->got[id][seq], 1, __ATOMIC_RELAXED);
}

static intptr_t rnd_fiber_fn(void *arg)
{
    rnd_fiber *rf = arg;
    rnd_state *r = rf->r;
    for (int seq = 0; seq < r->ops; seq++) {
        unsigned x = rnd_next(&rf->seed);
        moor_xchan *ch = r->ch[x % 2];
        int64_t deadline = moor_deadline_in((int64_t)(x / 2 % 3)); /* 0, 1 or 2 ms */
        uint32_t out = (uint32_t)rf->id << 16 | (uint32_t)seq, in = 0;
        int rc;
        /* The bare thread has no futures: sends, receives and tries only. */
        switch (x / 8 % (rf->id == RND_IDS - 1 ? 3 : 5)) {
        case 0: /* send */
            rc = moor_xchan_send(ch, &out, deadline);
            FCHECK(rc == 0 || rc == -ETIMEDOUT);
            if (rc == 0)
                r->sent[rf->id][seq] = 1;
            break;
        case 1: /* receive */
            rc = moor_xchan_recv(ch, &in, deadline);
            FCHECK(rc == 0 || rc == -ETIMEDOUT);
            if (rc == 0)
                rnd_got(r, in);
            break;
        case 2: /* try both ways */
            if (moor_xchan_try_send(ch, &out) == 0)
                r->sent[rf->id][seq] = 1;
            if (moor_xchan_try_recv(r->ch[1 - x % 2], &in) == 0)
                rnd_got(r, in);
            break;
        default: { /* a select: send on one, receive on the other (or the same), a timeout */
            moor_xchan_future sf, rf_;
            moor_sleep_future tf;
            moor_xchan_send_init(&sf, ch, &out, -1);
            moor_xchan_recv_init(&rf_, r->ch[x / 64 % 2], &in, -1);
            moor_sleep_init(&tf, deadline);
            moor_future *futs[] = {&sf.base, &rf_.base, &tf.base};
            int w = moor_select(futs, 3, -1);
            FCHECK(w >= 0 && w <= 2);
            if (w == 0 && sf.base.result == 0)
                r->sent[rf->id][seq] = 1;
            if (w == 1 && rf_.base.result == 0)
                rnd_got(r, in);
            break;
        }
        }
    }
    return 0;
}

/* Thread t of the moor_threads_run: RND_FIBERS fibers of random operations. */
static intptr_t rnd_thread_fn(void *arg)
{
    int t = moor_thread_index();
    rnd_fiber rfs[RND_FIBERS];
    moor_fiber *fs[RND_FIBERS];
    for (int i = 0; i < RND_FIBERS; i++) {
        int id = t * RND_FIBERS + i;
        rfs[i] = (rnd_fiber){arg, id, (unsigned)id * 2654435761u + 1};
        FCHECK(moor_spawn(&fs[i], rnd_fiber_fn, &rfs[i], NULL) == 0);
    }
    for (int i = 0; i < RND_FIBERS; i++)
        FCHECK(moor_join(fs[i], NULL) == 0);
    return 0;
}

static void *rnd_bare_thread(void *arg)
{
    rnd_fiber_fn(arg);
    return NULL;
}

static void test_xchan_random_ops(void **state)
{
    (void)state;
    rnd_state *r = calloc(1, sizeof *r);
    assert_non_null(r);
    r->ops = UNDER_VALGRIND ? 100 : UNDER_TSAN ? 200 : RND_OPS_MAX;
    r->ch[0] = xchan_new(sizeof(uint32_t), 0);
    r->ch[1] = xchan_new(sizeof(uint32_t), 2);
    rnd_fiber bare_rf = {r, RND_IDS - 1, 99991};
    pthread_t bare_t;
    assert_int_equal(pthread_create(&bare_t, NULL, rnd_bare_thread, &bare_rf), 0);
    assert_int_equal(moor_threads_run(RND_THREADS, rnd_thread_fn, r, NULL, NULL), 0);
    assert_int_equal(pthread_join(bare_t, NULL), 0);
    /* What the buffered channel still holds was sent: drain it after the close. */
    uint32_t v;
    for (int c = 0; c < 2; c++) {
        moor_xchan_close(r->ch[c]);
        while (moor_xchan_try_recv(r->ch[c], &v) == 0)
            rnd_got(r, v);
        assert_int_equal(moor_xchan_try_recv(r->ch[c], &v), -EPIPE);
    }
    int sent = 0;
    for (int id = 0; id < RND_IDS; id++)
        for (int seq = 0; seq < r->ops; seq++) {
            assert_int_equal(r->got[id][seq], r->sent[id][seq]);
            sent += r->sent[id][seq];
        }
    assert_true(sent > 0);
    print_message("%d values sent and received once each\n", sent);
    moor_xchan_free(r->ch[0]);
    moor_xchan_free(r->ch[1]);
    free(r);
}

/* ---- misuse, in forked children ---------------------------------------------------------------- */

static intptr_t free_it(void *arg)
{
    moor_xchan_free(arg);
    return 0;
}

static void child_free_with_waiter(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_xchan *ch;
    CHILD_REQUIRE(moor_xchan_new(&ch, sizeof(int), 0) == 0);
    moor_fiber *a, *b;
    CHILD_REQUIRE(moor_spawn(&a, lone_receiver, ch, NULL) == 0);
    CHILD_REQUIRE(moor_spawn(&b, free_it, ch, NULL) == 0); /* runs once a waits */
    moor_executor_run(ex);
}

static void child_close_twice(void *arg)
{
    (void)arg;
    moor_xchan *ch;
    CHILD_REQUIRE(moor_xchan_new(&ch, sizeof(int), 0) == 0);
    moor_xchan_close(ch);
    moor_xchan_close(ch);
}

static void child_executor_freed_while_waiting(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_xchan *ch;
    CHILD_REQUIRE(moor_xchan_new(&ch, sizeof(int), 0) == 0);
    moor_fiber *a;
    CHILD_REQUIRE(moor_spawn(&a, lone_receiver, ch, NULL) == 0);
    CHILD_REQUIRE(moor_sleep(moor_deadline_in(1)) == 0); /* a runs, and waits */
    moor_executor_free(ex);
}

static void *cancel_elsewhere(void *arg)
{
    moor_executor *ex;
    if (moor_executor_new(&ex, NULL) == 0)
        moor_future_cancel(arg);
    return NULL;
}

static void child_future_on_two_threads(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_xchan *ch;
    CHILD_REQUIRE(moor_xchan_new(&ch, sizeof(int), 0) == 0);
    int v;
    moor_xchan_future op;
    moor_xchan_recv_init(&op, ch, &v, -1);
    CHILD_REQUIRE(moor_spawn_future(&op.base) == 0);
    CHILD_REQUIRE(moor_sleep(moor_deadline_in(1)) == 0); /* polled once: pending */
    pthread_t t;
    CHILD_REQUIRE(pthread_create(&t, NULL, cancel_elsewhere, &op.base) == 0);
    pthread_join(t, NULL);
}

static void test_xchan_misuse(void **state)
{
    (void)state;
    child_report r;
    child_run(child_free_with_waiter, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_xchan_free: an operation still waits on the channel");
    child_run(child_close_twice, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_xchan_close: the channel is already closed");
    child_run(child_executor_freed_while_waiting, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_executor_free: 1 task(s) still pending");
    child_run(child_future_on_two_threads, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_xchan recv future cancelled on another thread");
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
        TEST(test_xchan_fifo_across_executors),
        TEST(test_xchan_deadlines),
        TEST(test_xchan_cancel_races_counterpart),
        TEST(test_xchan_select_with_local),
        TEST(test_xchan_select_races),
        TEST(test_xchan_select_same_executor),
        TEST(test_xchan_large_values),
        TEST(test_xchan_random_ops),
        TEST(test_xchan_thread_without_executor),
        TEST(test_xchan_outlives_executor),
        TEST(test_xchan_wake_after_executor_freed),
        TEST(test_xchan_wait_is_not_deadlock),
        TEST(test_xchan_misuse),
    };
    return RUN_TESTS(tests);
}
