/* Deadlock detection: when every task waits on something only another task of the executor
 * could complete, moor_executor_run, moor_block_on (and the plain-code waits built on it) and
 * a plain moor_join return -EDEADLK with the dump on stderr; and the executor can be cleaned
 * up after. The other half matters more: what can still be woken from outside (an fd, a
 * thread that wakes a user future, a promise's resolver, a remote spawn under a hold, the
 * application's watchers on the loop) is never called a deadlock.
 *
 * stderr is captured into a temporary file around each call that may report. */
#include <errno.h>
#include <arpa/inet.h>
#include <ev.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moor.h"

#include "fixture.h"

/* ---- a channel nobody else holds -------------------------------------------------------------- */

static intptr_t recv_fiber(void *arg)
{
    int v;
    return moor_chan_recv(arg, &v, -1);
}

static void test_deadlock_chan_nobody_sends(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch;
    assert_int_equal(moor_chan_new(&ch, sizeof(int), 0), 0);
    moor_fiber *f;
    moor_fiber_attr attr = {.name = "lonely"};
    assert_int_equal(moor_spawn(&f, recv_fiber, ch, &attr), 0);

    capture_begin();
    int rc = moor_executor_run(ex);
    const char *err = capture_end();
    assert_int_equal(rc, -EDEADLK);
    assert_non_null(strstr(err, "moor: deadlock"));
    char want[64], line[256];
    snprintf(want, sizeof want, "chan recv %p", (void *)ch);
    line_with(err, "\"lonely\"", line, sizeof line);
    assert_non_null(strstr(line, "waiting on"));
    assert_non_null(strstr(line, want));

    /* The program cleans up: the stuck fiber is cancelled, runs its cleanup and returns. */
    moor_cancel(f);
    assert_int_equal(moor_executor_run(ex), 0);
    intptr_t result = 0;
    assert_int_equal(moor_join(f, &result), -ECANCELED);
    assert_int_equal(result, -ECANCELED);
    moor_chan_free(ch);
    ex_free(ex);
}

/* From plain code, a receive on a channel nobody sends on fails instead of hanging, and
 * leaves no waiter behind (the channel can be freed). */
static void test_deadlock_plain_chan_recv(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch;
    assert_int_equal(moor_chan_new(&ch, sizeof(int), 1), 0);
    int v;
    capture_begin();
    int rc = moor_chan_recv(ch, &v, -1);
    const char *err = capture_end();
    assert_int_equal(rc, -EDEADLK);
    assert_non_null(strstr(err, "block_on"));
    assert_non_null(strstr(err, "chan recv"));
    /* It works again once there is something to receive. */
    int one = 1;
    assert_int_equal(moor_chan_try_send(ch, &one), 0);
    assert_int_equal(moor_chan_recv(ch, &v, -1), 0);
    assert_int_equal(v, 1);
    moor_chan_free(ch);
    ex_free(ex);
}

/* ---- two mutexes locked in opposite orders ------------------------------------------------ */

typedef struct crossed {
    moor_mutex a, b;
    int rc_second[2];
} crossed;

static intptr_t lock_ab(void *arg)
{
    crossed *c = arg;
    FCHECK(moor_mutex_lock(&c->a, -1) == 0);
    moor_yield(); /* the other takes b meanwhile */
    c->rc_second[0] = moor_mutex_lock(&c->b, -1);
    if (c->rc_second[0] == 0)
        moor_mutex_unlock(&c->b);
    moor_mutex_unlock(&c->a);
    return 0;
}

static intptr_t lock_ba(void *arg)
{
    crossed *c = arg;
    FCHECK(moor_mutex_lock(&c->b, -1) == 0);
    moor_yield();
    c->rc_second[1] = moor_mutex_lock(&c->a, -1);
    if (c->rc_second[1] == 0)
        moor_mutex_unlock(&c->a);
    moor_mutex_unlock(&c->b);
    return 0;
}

static void crossed_start(crossed *c, moor_fiber **f1, moor_fiber **f2)
{
    *c = (crossed){.a = MOOR_MUTEX_INIT, .b = MOOR_MUTEX_INIT};
    moor_fiber_attr a1 = {.name = "ab"}, a2 = {.name = "ba"};
    assert_int_equal(moor_spawn(f1, lock_ab, c, &a1), 0);
    assert_int_equal(moor_spawn(f2, lock_ba, c, &a2), 0);
}

static void crossed_finish(crossed *c, moor_fiber *f1, moor_fiber *f2)
{
    moor_cancel(f1);
    assert_int_equal(moor_join(f1, NULL), -ECANCELED);
    /* With ab's lock of b given up it releases a, which ba then gets. */
    assert_int_equal(moor_join(f2, NULL), 0);
    assert_int_equal(c->rc_second[0], -ECANCELED);
    assert_int_equal(c->rc_second[1], 0);
}

static void test_deadlock_mutex_order_block_on(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    crossed c;
    moor_fiber *f1, *f2;
    crossed_start(&c, &f1, &f2);
    capture_begin();
    intptr_t rc = moor_block_on(moor_fiber_future(f1));
    const char *err = capture_end();
    assert_int_equal(rc, -EDEADLK);
    char want_a[64], want_b[64], line[256];
    snprintf(want_a, sizeof want_a, "mutex %p", (void *)&c.a);
    snprintf(want_b, sizeof want_b, "mutex %p", (void *)&c.b);
    assert_non_null(strstr(line_with(err, "\"ab\"", line, sizeof line), want_b));
    assert_non_null(strstr(line_with(err, "\"ba\"", line, sizeof line), want_a));
    crossed_finish(&c, f1, f2);
    ex_free(ex);
}

static void test_deadlock_mutex_order_run(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    crossed c;
    moor_fiber *f1, *f2;
    crossed_start(&c, &f1, &f2);
    capture_begin();
    int rc = moor_executor_run(ex);
    const char *err = capture_end();
    assert_int_equal(rc, -EDEADLK);
    assert_non_null(strstr(err, "moor: deadlock"));
    /* Asked again, it says so again: nothing changed. */
    capture_begin();
    rc = moor_executor_run(ex);
    (void)capture_end();
    assert_int_equal(rc, -EDEADLK);
    crossed_finish(&c, f1, f2);
    ex_free(ex);
}

/* ---- a join, a select and a plain join ------------------------------------------------------ */

static intptr_t event_fiber(void *arg)
{
    return moor_event_wait(arg, -1);
}

static intptr_t join_fiber(void *arg)
{
    return moor_join(arg, NULL);
}

static void test_deadlock_join_and_plain_join(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_event e = MOOR_EVENT_INIT;
    moor_fiber *waiter, *joiner;
    assert_int_equal(moor_spawn(&waiter, event_fiber, &e, NULL), 0);
    assert_int_equal(moor_spawn(&joiner, join_fiber, waiter, NULL), 0);
    capture_begin();
    int rc = moor_join(joiner, NULL); /* from plain code */
    const char *err = capture_end();
    assert_int_equal(rc, -EDEADLK);
    char want[64];
    snprintf(want, sizeof want, "join fiber %llu", (unsigned long long)moor_fiber_id(waiter));
    assert_non_null(strstr(err, want));
    snprintf(want, sizeof want, "event %p", (void *)&e);
    assert_non_null(strstr(err, want));
    /* The handle is still good: set the event and join for real. */
    moor_event_set(&e);
    intptr_t result = -1;
    assert_int_equal(moor_join(joiner, &result), 0);
    assert_int_equal(result, 0);
    ex_free(ex);
}

typedef struct two_chans {
    moor_chan *a, *b;
    moor_future *other; /* a third branch, or NULL */
} two_chans;

static intptr_t select_fiber(void *arg)
{
    two_chans *t = arg;
    int x, y;
    moor_chan_future ra, rb;
    moor_chan_recv_init(&ra, t->a, &x, -1);
    moor_chan_recv_init(&rb, t->b, &y, -1);
    moor_future *futs[3] = {&ra.base, &rb.base, t->other};
    return moor_select(futs, t->other ? 3 : 2, -1);
}

static void test_deadlock_select_of_local_waits(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    two_chans t = {NULL, NULL, NULL};
    assert_int_equal(moor_chan_new(&t.a, sizeof(int), 0), 0);
    assert_int_equal(moor_chan_new(&t.b, sizeof(int), 0), 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, select_fiber, &t, NULL), 0);
    capture_begin();
    int rc = moor_executor_run(ex);
    const char *err = capture_end();
    assert_int_equal(rc, -EDEADLK);
    assert_non_null(strstr(err, "select (2)"));
    moor_cancel(f);
    assert_int_equal(moor_join(f, NULL), -ECANCELED);
    moor_chan_free(t.a);
    moor_chan_free(t.b);
    ex_free(ex);
}

/* ---- what is not a deadlock ---------------------------------------------------------------- */

/* A user future whose waker goes to another thread, which wakes it later. */
typedef struct remote_gate {
    moor_future base;
    int open;           /* atomic */
    moor_waker waker;   /* under lock */
    pthread_mutex_t lock;
    pthread_t thread;
    int started;
} remote_gate;

static void *gate_opener(void *arg)
{
    remote_gate *g = arg;
    sleep_ms(50);
    pthread_mutex_lock(&g->lock);
    __atomic_store_n(&g->open, 1, __ATOMIC_SEQ_CST);
    moor_waker w = g->waker;
    pthread_mutex_unlock(&g->lock);
    moor_waker_wake(&w);
    return NULL;
}

static moor_poll gate_poll(moor_future *fut, moor_cx *cx)
{
    remote_gate *g = moor_container_of(fut, remote_gate, base);
    pthread_mutex_lock(&g->lock);
    int open = __atomic_load_n(&g->open, __ATOMIC_SEQ_CST);
    g->waker = cx->waker;
    pthread_mutex_unlock(&g->lock);
    if (open) {
        fut->result = 7;
        return MOOR_READY;
    }
    if (!g->started) {
        g->started = 1;
        assert_int_equal(pthread_create(&g->thread, NULL, gate_opener, g), 0);
    }
    return MOOR_PENDING;
}

static const moor_future_ops gate_ops = {"remote gate", gate_poll, NULL};

static intptr_t gate_fiber(void *arg)
{
    return moor_await(arg);
}

static void test_deadlock_not_user_future_woken_elsewhere(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    remote_gate g = {.open = 0, .started = 0};
    pthread_mutex_init(&g.lock, NULL);
    moor_future_init(&g.base, &gate_ops, 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, gate_fiber, &g.base, NULL), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    intptr_t result = 0;
    assert_int_equal(moor_join(f, &result), 0);
    assert_int_equal(result, 7);
    pthread_join(g.thread, NULL);
    pthread_mutex_destroy(&g.lock);
    ex_free(ex);
}

/* A type that declares itself local, and is stuck: a deadlock. */
static moor_poll stuck_poll(moor_future *fut, moor_cx *cx)
{
    (void)fut, (void)cx;
    return MOOR_PENDING;
}

static moor_poll stuck_cancel(moor_future *fut)
{
    (void)fut;
    return MOOR_PENDING;
}

static const moor_future_ops stuck_ops = {"stuck", stuck_poll, stuck_cancel};

static int stuck_describe(const moor_future *fut, char *buf, size_t size)
{
    (void)fut;
    snprintf(buf, size, "stuck (local)");
    return MOOR_WAIT_LOCAL;
}

static moor_future_kind stuck_kind = {&stuck_ops, stuck_describe, NULL};

static void test_deadlock_user_kind_declared_local(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_future_kind_register(&stuck_kind);
    moor_future_kind_register(&stuck_kind); /* again: a no-op */
    moor_future fut;
    moor_future_init(&fut, &stuck_ops, 0);
    capture_begin();
    intptr_t rc = moor_block_on(&fut);
    const char *err = capture_end();
    assert_int_equal(rc, -EDEADLK);
    assert_non_null(strstr(err, "stuck (local)"));
    assert_false(moor_future_done(&fut)); /* cancelled: as if fresh */
    ex_free(ex);
}

static void *resolve_later(void *arg)
{
    sleep_ms(50);
    moor_promise_resolve(arg, 42);
    return NULL;
}

static void test_deadlock_not_promise_with_resolver_out(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_promise *p;
    assert_int_equal(moor_promise_new(&p, NULL), 0);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, resolve_later, p), 0);
    assert_int_equal(moor_promise_await(p, -1), 42); /* from plain code: block_on */
    pthread_join(th, NULL);
    ex_free(ex);
}

/* A true idle server: one fiber in accept on a listening socket, one reading a socket pair,
 * no timer anywhere. Another thread connects and writes after a while; both complete. */
typedef struct idle_server {
    int listener;
    int port;
    int sv[2];
    int accepted, got;
} idle_server;

static intptr_t acceptor(void *arg)
{
    idle_server *s = arg;
    int fd = moor_accept(s->listener, NULL, NULL, -1);
    FCHECK(fd >= 0);
    if (fd >= 0) {
        s->accepted = 1;
        moor_close(fd);
    }
    return 0;
}

static intptr_t reader(void *arg)
{
    idle_server *s = arg;
    char c;
    FCHECK(moor_read(s->sv[0], &c, 1, -1) == 1);
    s->got = c;
    return 0;
}

static void *client(void *arg)
{
    idle_server *s = arg;
    sleep_ms(80);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s->port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        abort();
    char c = 'x';
    if (write(s->sv[1], &c, 1) != 1)
        abort();
    sleep_ms(20);
    close(fd);
    return NULL;
}

static void test_deadlock_not_idle_server(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    idle_server s = {0};
    s.listener = moor_tcp_listen("127.0.0.1", 0, 16);
    assert_true(s.listener >= 0);
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    assert_int_equal(getsockname(s.listener, (struct sockaddr *)&sa, &len), 0);
    s.port = ntohs(sa.sin_port);
    stream_pair(s.sv);
    moor_fiber *a, *r;
    assert_int_equal(moor_spawn(&a, acceptor, &s, NULL), 0);
    assert_int_equal(moor_spawn(&r, reader, &s, NULL), 0);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, client, &s), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    pthread_join(th, NULL);
    assert_int_equal(moor_join(a, NULL), 0);
    assert_int_equal(moor_join(r, NULL), 0);
    assert_int_equal(s.accepted, 1);
    assert_int_equal(s.got, 'x');
    moor_close(s.listener);
    moor_close(s.sv[0]);
    close(s.sv[1]);
    ex_free(ex);
}

/* A fiber waits on a channel that only a fiber spawned from another thread will feed: the
 * program says so with a hold. */
typedef struct fed {
    moor_executor *ex;
    moor_chan *ch;
} fed;

static intptr_t feeder(void *arg)
{
    int v = 5;
    return moor_chan_send(arg, &v, -1);
}

static void *remote_feeder(void *arg)
{
    fed *d = arg;
    sleep_ms(50);
    if (moor_spawn_remote(d->ex, feeder, d->ch) != 0)
        abort();
    moor_executor_release(d->ex);
    return NULL;
}

static void test_deadlock_not_while_held(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    fed d = {ex, NULL};
    assert_int_equal(moor_chan_new(&d.ch, sizeof(int), 0), 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, recv_fiber, d.ch, NULL), 0);
    moor_executor_hold(ex);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, remote_feeder, &d), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    pthread_join(th, NULL);
    intptr_t result = -1;
    assert_int_equal(moor_join(f, &result), 0);
    assert_int_equal(result, 0);
    moor_chan_free(d.ch);
    ex_free(ex);
}

/* The application's own watcher on the executor's loop feeds the channel from a callback. */
static moor_chan *timer_chan;

static void on_app_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)w, (void)revents;
    int v = 9;
    FCHECK(moor_chan_try_send(timer_chan, &v) == 0);
}

static void test_deadlock_not_with_application_watchers(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    assert_int_equal(moor_chan_new(&timer_chan, sizeof(int), 1), 0);
    struct ev_loop *loop = moor_executor_loop(ex);
    assert_non_null(loop);
    ev_timer t;
    ev_timer_init(&t, on_app_timer, 0.05, 0.);
    ev_timer_start(loop, &t);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, recv_fiber, timer_chan, NULL), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(moor_join(f, NULL), 0);
    moor_chan_free(timer_chan);
    ex_free(ex);
}

/* A hold released from another thread without feeding anything: the parked executor looks
 * again and reports the deadlock it could not report while held. */
static void *release_later(void *arg)
{
    sleep_ms(50);
    moor_executor_release(arg);
    return NULL;
}

static void test_deadlock_reported_after_release(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch;
    assert_int_equal(moor_chan_new(&ch, sizeof(int), 0), 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, recv_fiber, ch, NULL), 0);
    moor_executor_hold(ex);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, release_later, ex), 0);
    capture_begin();
    int rc = moor_executor_run(ex);
    (void)capture_end();
    pthread_join(th, NULL);
    assert_int_equal(rc, -EDEADLK);
    moor_cancel(f);
    assert_int_equal(moor_join(f, NULL), -ECANCELED);
    moor_chan_free(ch);
    ex_free(ex);
}

/* A plain task (moor_spawn_future) counts like a fiber, and gets its line. */
static void test_deadlock_plain_task(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch;
    assert_int_equal(moor_chan_new(&ch, sizeof(int), 1), 0);
    int v = 0;
    moor_chan_future op;
    moor_chan_recv_init(&op, ch, &v, -1);
    assert_int_equal(moor_spawn_future(&op.base), 0);
    capture_begin();
    int rc = moor_executor_run(ex);
    const char *err = capture_end();
    assert_int_equal(rc, -EDEADLK);
    char want[96];
    snprintf(want, sizeof want, "task %p waiting on chan recv %p", (void *)&op.base, (void *)ch);
    assert_non_null(strstr(err, want));
    /* A plain task ends when its future completes: feed it. */
    int three = 3;
    assert_int_equal(moor_chan_try_send(ch, &three), 0);
    assert_int_equal(moor_executor_run(ex), 0);
    assert_true(moor_future_done(&op.base));
    assert_int_equal(v, 3);
    moor_chan_free(ch);
    ex_free(ex);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_deadlock_chan_nobody_sends),
        TEST(test_deadlock_plain_chan_recv),
        TEST(test_deadlock_mutex_order_block_on),
        TEST(test_deadlock_mutex_order_run),
        TEST(test_deadlock_join_and_plain_join),
        TEST(test_deadlock_select_of_local_waits),
        TEST(test_deadlock_not_user_future_woken_elsewhere),
        TEST(test_deadlock_user_kind_declared_local),
        TEST(test_deadlock_not_promise_with_resolver_out),
        TEST(test_deadlock_not_idle_server),
        TEST(test_deadlock_not_while_held),
        TEST(test_deadlock_not_with_application_watchers),
        TEST(test_deadlock_reported_after_release),
        TEST(test_deadlock_plain_task),
    };
    return RUN_TESTS(tests);
}
