/* The reactor around the I/O calls: moor_blocking and its worker pool, spawning and waking
 * from other threads, an executor attached to a libev loop the application runs, and fork
 * (signals have their own file, test_signal.c).
 *
 * Timing is asserted only as a lower bound; progress is counted (ticks of another fiber,
 * callbacks of the application's watchers). Checks inside fibers only record what they see
 * (a fiber returns the line of its first failed check, or 0); the test function asserts once
 * the fibers are joined. Forked children check with CCHECK and exit non-zero on a failure. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <ev.h>

#include "moor.h"

#include "fiber/executor.h"
#include "reactor/reactor.h"

#define FIXTURE_FCHECK_RETURNS
#include "fixture.h"

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

static void stream_pair(int sv[2])
{
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

/* Ping-pong `rounds` one-byte messages over a socketpair between two fibers. */
typedef struct pp {
    int fd;
    int rounds;
    int first; /* writes first */
} pp;

static intptr_t pp_fiber(void *arg)
{
    pp *p = arg;
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    for (int i = 0; i < p->rounds; i++) {
        unsigned char b = (unsigned char)i, got;
        if (p->first)
            FCHECK(moor_write(p->fd, &b, 1, deadline) == 1);
        FCHECK(moor_read(p->fd, &got, 1, deadline) == 1);
        FCHECK(got == b);
        if (!p->first)
            FCHECK(moor_write(p->fd, &b, 1, deadline) == 1);
    }
    return 0;
}

/* ---- moor_blocking -------------------------------------------------------------------------- */

static int blocking_over; /* written by the executor's thread only */
static int slow_done;     /* atomic: a slow fn ran to its end on its worker */

static intptr_t slow_fn(void *arg)
{
    sleep_ms((int)(intptr_t)arg);
    __atomic_add_fetch(&slow_done, 1, __ATOMIC_SEQ_CST);
    return 42;
}

/* A call that blocks its worker until the test lets it go (a byte down a pipe), so that
 * "still running" never depends on how fast the machine is. */
static int gate_pipe[2];
static int gate_done; /* atomic */

static void gate_init(void)
{
    assert_int_equal(pipe(gate_pipe), 0);
    gate_done = 0;
}

static intptr_t gate_fn(void *arg)
{
    char c;
    while (read(gate_pipe[0], &c, 1) < 0 && errno == EINTR)
        ;
    __atomic_add_fetch(&gate_done, 1, __ATOMIC_SEQ_CST);
    return (intptr_t)arg;
}

static void gate_release(int n)
{
    for (int i = 0; i < n; i++)
        assert_int_equal(write(gate_pipe[1], "g", 1), 1);
}

static void gate_fini(void)
{
    close(gate_pipe[0]);
    close(gate_pipe[1]);
}

static intptr_t blocking_caller(void *arg)
{
    (void)arg;
    intptr_t result = -1;
    int64_t start = moor_now();
    int rc = moor_blocking(slow_fn, (void *)(intptr_t)200, &result, moor_deadline_in(SAFETY_MS));
    blocking_over = 1;
    FCHECK(rc == 0);
    FCHECK(result == 42);
    FCHECK(moor_now() >= start + 200);
    return 0;
}

static intptr_t progress_ticker(void *arg)
{
    (void)arg;
    intptr_t ticks = 0;
    while (!blocking_over) {
        if (moor_sleep(moor_deadline_in(5)) != 0)
            return -1;
        ticks++;
    }
    return ticks;
}

static void test_reactor_blocking_others_progress(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    blocking_over = 0;
    slow_done = 0;
    moor_fiber *caller, *ticker;
    assert_int_equal(moor_spawn(&caller, blocking_caller, NULL, NULL), 0);
    assert_int_equal(moor_spawn(&ticker, progress_ticker, NULL, NULL), 0);
    intptr_t r = -1, ticks = -1;
    assert_int_equal(moor_join(caller, &r), 0);
    assert_int_equal(r, 0);
    assert_int_equal(moor_join(ticker, &ticks), 0);
    /* 200 ms of 5 ms sleeps: ~40 ticks on a quiet machine; an fn run inline would allow one. */
    print_message("ticks during a 200 ms blocking call: %ld\n", (long)ticks);
    assert_true(ticks >= 5);
    assert_int_equal(__atomic_load_n(&slow_done, __ATOMIC_SEQ_CST), 1);
    moor_executor_free(ex);
}

static intptr_t sentinel_fn(void *arg)
{
    *(int *)arg += 1;
    return 7;
}

static void test_reactor_blocking_from_plain_code(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    static int calls;
    calls = 0;
    intptr_t result = 0;
    assert_int_equal(moor_blocking(sentinel_fn, &calls, &result, -1), 0);
    assert_int_equal(result, 7);
    assert_int_equal(calls, 1);
    assert_int_equal(moor_blocking(sentinel_fn, &calls, NULL, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(calls, 2);
    moor_executor_free(ex);
}

static intptr_t timed_out_caller(void *arg)
{
    (void)arg;
    intptr_t result = -12345;
    int64_t deadline = moor_deadline_in(50);
    FCHECK(moor_blocking(gate_fn, (void *)1, &result, deadline) == -ETIMEDOUT);
    FCHECK(moor_now() >= deadline);
    FCHECK(result == -12345); /* not written */
    return 0;
}

static void test_reactor_blocking_deadline(void **state)
{
    (void)state;
    gate_init();
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    /* From a fiber that then returns: its stack goes back to the pool while fn runs on. */
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, timed_out_caller, NULL, NULL), 0);
    intptr_t r = -1;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 0);
    /* And from plain code. */
    intptr_t result = -12345;
    int64_t deadline = moor_deadline_in(30);
    assert_int_equal(moor_blocking(gate_fn, (void *)2, &result, deadline), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_int_equal(result, -12345);

    /* The pool still serves while the abandoned calls block two of its workers. */
    static int calls;
    calls = 0;
    assert_int_equal(moor_blocking(sentinel_fn, &calls, &result, moor_deadline_in(SAFETY_MS)), 0);
    assert_int_equal(result, 7);
    assert_int_equal(calls, 1);
    assert_int_equal(__atomic_load_n(&gate_done, __ATOMIC_SEQ_CST), 0);

    /* Let them finish late: freeing the executor waits for the workers, whose completions
     * free the abandoned jobs and touch nothing else (ASan would say). */
    gate_release(2);
    moor_executor_free(ex);
    assert_int_equal(__atomic_load_n(&gate_done, __ATOMIC_SEQ_CST), 2);
    gate_fini();
}

static int never_ran;

static intptr_t must_not_run(void *arg)
{
    (void)arg;
    __atomic_add_fetch(&never_ran, 1, __ATOMIC_SEQ_CST);
    return 0;
}

static intptr_t queued_caller(void *arg)
{
    (void)arg;
    intptr_t result = -5;
    int64_t deadline = moor_deadline_in(40);
    FCHECK(moor_blocking(must_not_run, NULL, &result, deadline) == -ETIMEDOUT);
    FCHECK(moor_now() >= deadline);
    FCHECK(result == -5);
    return 0;
}

static intptr_t gated_caller(void *arg)
{
    intptr_t result = 0;
    FCHECK(moor_blocking(gate_fn, arg, &result, moor_deadline_in(SAFETY_MS)) == 0);
    FCHECK(result == (intptr_t)arg);
    return 0;
}

/* One worker: the second call waits in the queue behind a call that cannot finish, times out
 * there, and never runs. */
static void test_reactor_blocking_queued_timeout(void **state)
{
    (void)state;
    gate_init();
    moor_executor *ex;
    moor_executor_attr attr = {.blocking_threads = 1};
    assert_int_equal(moor_executor_new(&ex, &attr), 0);
    never_ran = 0;
    moor_fiber *a, *b;
    assert_int_equal(moor_spawn(&a, gated_caller, (void *)5, NULL), 0);
    assert_int_equal(moor_spawn(&b, queued_caller, NULL, NULL), 0);
    intptr_t r = -1;
    assert_int_equal(moor_join(b, &r), 0);
    assert_int_equal(r, 0);
    gate_release(1);
    assert_int_equal(moor_join(a, &r), 0);
    assert_int_equal(r, 0);
    moor_executor_free(ex);
    assert_int_equal(__atomic_load_n(&gate_done, __ATOMIC_SEQ_CST), 1);
    assert_int_equal(__atomic_load_n(&never_ran, __ATOMIC_SEQ_CST), 0);
    gate_fini();
}

static intptr_t cancelled_caller(void *arg)
{
    int *rc = arg;
    intptr_t result = -5;
    *rc = moor_blocking(gate_fn, (void *)9, &result, -1);
    FCHECK(result == -5);
    return 0;
}

static void test_reactor_blocking_cancel(void **state)
{
    (void)state;
    gate_init();
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    int rc = 1;
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, cancelled_caller, &rc, NULL), 0);
    assert_int_equal(moor_sleep(moor_deadline_in(10)), 0); /* f hands its call to a worker */
    assert_int_equal(rc, 1);
    moor_cancel(f);
    intptr_t r = -1;
    assert_int_equal(moor_join(f, &r), -ECANCELED);
    assert_int_equal(r, 0);
    assert_int_equal(rc, -ECANCELED);
    gate_release(1);
    moor_executor_free(ex); /* waits for the worker to finish the abandoned call */
    assert_int_equal(__atomic_load_n(&gate_done, __ATOMIC_SEQ_CST), 1);
    gate_fini();
}

/* ---- spawning from other threads --------------------------------------------------------- */

#define RS_THREADS 4
#define RS_PER_THREAD 10000
#define RS_TOTAL (RS_THREADS * RS_PER_THREAD)

static int rs_ran[RS_TOTAL];      /* executor thread only */
static int rs_count;              /* atomic */
static int rs_spawn_failed;       /* atomic */

typedef struct rs_thread {
    moor_executor *ex;
    int first, n;
} rs_thread;

static intptr_t rs_fiber(void *arg)
{
    rs_ran[(uintptr_t)arg]++;
    __atomic_add_fetch(&rs_count, 1, __ATOMIC_SEQ_CST);
    return 0;
}

static void *rs_spawner(void *arg)
{
    rs_thread *t = arg;
    for (int i = 0; i < t->n; i++)
        if (moor_executor_spawn_remote(t->ex, rs_fiber, (void *)(uintptr_t)(t->first + i)) != 0)
            __atomic_add_fetch(&rs_spawn_failed, 1, __ATOMIC_SEQ_CST);
    return NULL;
}

/* Keeps the executor running until every remote fiber has run (or the safety bound). */
static intptr_t rs_waiter(void *arg)
{
    int total = (int)(intptr_t)arg;
    int64_t give_up = moor_deadline_in(SAFETY_MS);
    while (__atomic_load_n(&rs_count, __ATOMIC_SEQ_CST) < total && moor_now() < give_up)
        FCHECK(moor_sleep(moor_deadline_in(1)) == 0);
    return 0;
}

/* In the child: ends it if the remote fibers stop making progress for a few seconds (a
 * deadlock between the spawning threads and the executor), however slow the machine. */
static int rs_finished; /* atomic */

static void *rs_watchdog(void *arg)
{
    moor_executor *ex = arg;
    uint64_t last = 0;
    int still = 0;
    while (!__atomic_load_n(&rs_finished, __ATOMIC_SEQ_CST)) {
        sleep_ms(250);
        /* Progress: fibers spawned (white-box: the executor's next fiber id; read racily,
         * which is harmless here) and fibers run. */
        uint64_t now = __atomic_load_n(&ex->next_fiber_id, __ATOMIC_RELAXED) +
                       (uint64_t)__atomic_load_n(&rs_count, __ATOMIC_SEQ_CST);
        still = now == last ? still + 1 : 0;
        last = now;
        if (still == 20) {
            fprintf(stderr, "no progress for 5 s: %d remote fibers ran (deadlock?)\n",
                    __atomic_load_n(&rs_count, __ATOMIC_SEQ_CST));
            _exit(101);
        }
    }
    return NULL;
}

/* Runs in a forked child, so that a deadlock fails the test instead of hanging the suite. */
static void remote_spawn_run(int with_loop, int per_thread)
{
    moor_executor *ex;
    /* Small stacks: every queued request gets its own stack before any of them runs. */
    moor_executor_attr attr = {.stack_size = 32 * 1024};
    CCHECK(moor_executor_new(&ex, &attr) == 0);
    if (with_loop)
        CCHECK(moor_executor_loop(ex) != NULL);
    int total = RS_THREADS * per_thread;
    memset(rs_ran, 0, sizeof rs_ran);
    rs_count = 0;
    rs_spawn_failed = 0;
    rs_finished = 0;
    pthread_t dog;
    CCHECK(pthread_create(&dog, NULL, rs_watchdog, ex) == 0);
    moor_fiber *waiter;
    CCHECK(moor_spawn(&waiter, rs_waiter, (void *)(intptr_t)total, NULL) == 0);
    pthread_t th[RS_THREADS];
    rs_thread args[RS_THREADS];
    for (int i = 0; i < RS_THREADS; i++) {
        args[i] = (rs_thread){ex, i * per_thread, per_thread};
        CCHECK(pthread_create(&th[i], NULL, rs_spawner, &args[i]) == 0);
    }
    intptr_t r = -1;
    CCHECK(moor_join(waiter, &r) == 0); /* runs the executor meanwhile */
    CCHECK(r == 0);
    for (int i = 0; i < RS_THREADS; i++)
        CCHECK(pthread_join(th[i], NULL) == 0);
    CCHECK(moor_executor_run(ex) == 0); /* whatever is still queued */
    __atomic_store_n(&rs_finished, 1, __ATOMIC_SEQ_CST);
    CCHECK(pthread_join(dog, NULL) == 0);
    CCHECK(rs_spawn_failed == 0);
    if (rs_count != total)
        fprintf(stderr, "%d of %d remote fibers ran\n", rs_count, total);
    CCHECK(rs_count == total);
    for (int i = 0; i < total; i++)
        if (rs_ran[i] != 1) {
            fprintf(stderr, "remote fiber %d ran %d times\n", i, rs_ran[i]);
            CCHECK(rs_ran[i] == 1);
        }
    CCHECK(ex->fibers == NULL); /* detached fibers released themselves */
    moor_executor_free(ex);
}

static void test_reactor_spawn_remote_many(void **state)
{
    (void)state;
    pid_t pid = fork_child(120);
    if (pid == 0) {
        remote_spawn_run(0, RS_PER_THREAD); /* the plain driver: no event loop */
        _exit(0);
    }
    wait_child_ok(pid);
}

static void test_reactor_spawn_remote_to_loop(void **state)
{
    (void)state;
    pid_t pid = fork_child(120);
    if (pid == 0) {
        remote_spawn_run(1, RS_PER_THREAD / 4); /* parked in libev */
        _exit(0);
    }
    wait_child_ok(pid);
}

/* ---- waking from another thread ----------------------------------------------------------- */

typedef struct remote_wait {
    moor_future base;
    int polls;
    int armed;  /* atomic: waker stored */
    int woken;  /* atomic: the other thread says go */
    moor_waker waker;
} remote_wait;

static moor_poll remote_wait_poll(moor_future *fut, moor_cx *cx)
{
    remote_wait *w = moor_container_of(fut, remote_wait, base);
    w->polls++;
    if (__atomic_load_n(&w->woken, __ATOMIC_ACQUIRE)) {
        fut->result = 99;
        return MOOR_READY;
    }
    w->waker = cx->waker;
    __atomic_store_n(&w->armed, 1, __ATOMIC_RELEASE);
    return MOOR_PENDING;
}

static const moor_future_ops remote_wait_ops = {"remote wait", remote_wait_poll, NULL};

static void *waking_thread(void *arg)
{
    remote_wait *w = arg;
    while (!__atomic_load_n(&w->armed, __ATOMIC_ACQUIRE))
        sleep_ms(1);
    sleep_ms(30); /* let the executor park in its loop */
    moor_waker copy = w->waker;
    __atomic_store_n(&w->woken, 1, __ATOMIC_RELEASE);
    moor_waker_wake(&copy);
    moor_waker_wake(&copy); /* twice: queued once */
    return NULL;
}

static void wake_from_thread_run(int with_loop)
{
    moor_executor *ex;
    CCHECK(moor_executor_new(&ex, NULL) == 0);
    if (with_loop) {
        CCHECK(moor_executor_loop(ex) != NULL); /* park in libev, not on the condition variable */
        CCHECK(ex->reactor != NULL);
    }
    remote_wait w;
    memset(&w, 0, sizeof w);
    moor_future_init(&w.base, &remote_wait_ops, 0);
    pthread_t th;
    CCHECK(pthread_create(&th, NULL, waking_thread, &w) == 0);
    CCHECK(moor_block_on(&w.base) == 99);
    CCHECK(pthread_join(th, NULL) == 0);
    CCHECK(moor_executor_run(ex) == 0); /* a second queued wake would poll it again */
    CCHECK(w.polls == 2);
    CCHECK((ex->reactor != NULL) == with_loop);
    moor_executor_free(ex);
}

static void test_reactor_wake_from_thread(void **state)
{
    (void)state;
    pid_t pid = fork_child(20);
    if (pid == 0) {
        wake_from_thread_run(1);
        _exit(0);
    }
    wait_child_ok(pid);
}

/* The same without an event loop: the executor parks on its condition variable. */
static void test_reactor_wake_from_thread_plain_driver(void **state)
{
    (void)state;
    pid_t pid = fork_child(5);
    if (pid == 0) {
        wake_from_thread_run(0);
        _exit(0);
    }
    wait_child_ok(pid);
}

/* ---- an event loop the application owns --------------------------------------------------- */

/* A fiber that says when it has returned: the join future is done only once polled, so it
 * cannot tell whether a fiber finished inside the application's ev_run. */
typedef struct tracked {
    moor_fiber_fn fn;
    void *arg;
    int finished;
} tracked;

static intptr_t tracked_fn(void *arg)
{
    tracked *t = arg;
    intptr_t r = t->fn(t->arg);
    t->finished = 1;
    return r;
}

#define APP_TICKS 5

typedef struct app {
    ev_timer timer;
    ev_io io;
    int pipefd[2];
    int timer_calls, io_calls;
} app;

static void app_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    app *a = w->data;
    a->timer_calls++;
    char b = 'x';
    if (write(a->pipefd[1], &b, 1) != 1)
        abort();
    if (a->timer_calls == APP_TICKS)
        ev_timer_stop(loop, w);
}

static void app_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    app *a = w->data;
    char b;
    while (read(a->pipefd[0], &b, 1) == 1)
        a->io_calls++;
    if (a->io_calls == APP_TICKS)
        ev_io_stop(loop, w);
}

static intptr_t attached_sleeper(void *arg)
{
    (void)arg;
    int64_t start = moor_now();
    for (int i = 0; i < 5; i++) {
        int64_t d = moor_deadline_in(10);
        FCHECK(moor_sleep(d) == 0);
        FCHECK(moor_now() >= d);
    }
    FCHECK(moor_now() >= start + 50);
    return 0;
}

static void test_reactor_attach_app_loop(void **state)
{
    (void)state;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    assert_non_null(loop);
    app a;
    memset(&a, 0, sizeof a);
    assert_int_equal(pipe(a.pipefd), 0);
    assert_int_equal(fcntl(a.pipefd[0], F_SETFL, O_NONBLOCK), 0);
    ev_timer_init(&a.timer, app_timer_cb, 0.01, 0.01);
    a.timer.data = &a;
    ev_timer_start(loop, &a.timer);
    ev_io_init(&a.io, app_io_cb, a.pipefd[0], EV_READ);
    a.io.data = &a;
    ev_io_start(loop, &a.io);

    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    assert_int_equal(moor_executor_attach(ex, loop), 0);
    assert_int_equal(moor_executor_attach(ex, loop), -EBUSY);
    assert_ptr_equal(moor_executor_loop(ex), loop);

    int sv[2];
    stream_pair(sv);
    pp p0 = {sv[0], 50, 1}, p1 = {sv[1], 50, 0};
    tracked t[3] = {{attached_sleeper, NULL, 0}, {pp_fiber, &p0, 0}, {pp_fiber, &p1, 0}};
    moor_fiber *f[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_spawn(&f[i], tracked_fn, &t[i], NULL), 0);

    ev_run(loop, 0); /* returns once the app's watchers and the fibers are all done */

    assert_int_equal(a.timer_calls, APP_TICKS);
    assert_int_equal(a.io_calls, APP_TICKS);
    /* Whether they finished inside ev_run; checked after cleaning up, since joining from
     * plain code would finish them itself. */
    int finished[3] = {t[0].finished, t[1].finished, t[2].finished};
    for (int i = 0; i < 3; i++) {
        intptr_t r = -1;
        assert_int_equal(moor_join(f[i], &r), 0);
        assert_int_equal(r, 0);
    }
    assert_int_equal(ex->ntasks, 0);

    /* Work spawned later runs in a later ev_run. */
    tracked later = {attached_sleeper, NULL, 0};
    moor_fiber *g;
    assert_int_equal(moor_spawn(&g, tracked_fn, &later, NULL), 0);
    ev_run(loop, 0);
    int later_done = later.finished;
    intptr_t r = -1;
    assert_int_equal(moor_join(g, &r), 0);
    assert_int_equal(r, 0);

    moor_executor_free(ex);
    /* moor's watchers are gone and their references given back: the loop is the app's. */
    assert_int_equal(ev_run(loop, EVRUN_NOWAIT), 0);
    ev_loop_destroy(loop);
    close(sv[0]);
    close(sv[1]);
    close(a.pipefd[0]);
    close(a.pipefd[1]);
    if (!finished[0] || !finished[1] || !finished[2] || !later_done)
        fail_msg("ev_run returned before its fibers were done: sleeper %s, ping-pong %s/%s, "
                 "later sleeper %s",
                 finished[0] ? "done" : "NOT DONE", finished[1] ? "done" : "NOT DONE",
                 finished[2] ? "done" : "NOT DONE", later_done ? "done" : "NOT DONE");
}

static void test_reactor_attach_busy(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    assert_non_null(moor_executor_loop(ex)); /* it has its own loop now */
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    assert_non_null(loop);
    assert_int_equal(moor_executor_attach(ex, loop), -EBUSY);
    ev_loop_destroy(loop);
    moor_executor_free(ex);
}

static intptr_t attached_blocking(void *arg)
{
    (void)arg;
    intptr_t result = 0;
    FCHECK(moor_blocking(slow_fn, (void *)(intptr_t)100, &result, -1) == 0);
    FCHECK(result == 42);
    return 0;
}

/* A fiber waiting for a worker thread is work too: the application's ev_run must not return
 * while it waits. */
static void test_reactor_attach_waits_for_blocking_call(void **state)
{
    (void)state;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    assert_non_null(loop);
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    assert_int_equal(moor_executor_attach(ex, loop), 0);
    slow_done = 0;
    tracked t = {attached_blocking, NULL, 0};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, tracked_fn, &t, NULL), 0);
    ev_run(loop, 0);
    int done_in_run = t.finished;
    intptr_t r = -1;
    assert_int_equal(moor_join(f, &r), 0); /* finishes it from plain code if ev_run did not */
    assert_int_equal(r, 0);
    moor_executor_free(ex);
    ev_loop_destroy(loop);
    if (!done_in_run)
        fail_msg("ev_run returned while a fiber was still waiting in moor_blocking");
}

/* ---- fork --------------------------------------------------------------------------------- */

static int roundtrip(int rounds)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
        return -1;
    pp p0 = {sv[0], rounds, 1}, p1 = {sv[1], rounds, 0};
    moor_fiber *a, *b;
    intptr_t ra = -1, rb = -1;
    if (moor_spawn(&a, pp_fiber, &p0, NULL) || moor_spawn(&b, pp_fiber, &p1, NULL))
        return -1;
    moor_join(a, &ra);
    moor_join(b, &rb);
    close(sv[0]);
    close(sv[1]);
    return ra == 0 && rb == 0 ? 0 : -1;
}

static void test_reactor_fork(void **state)
{
    (void)state;
    moor_executor *ex;
    assert_int_equal(moor_executor_new(&ex, NULL), 0);
    /* The parent's loop and blocking pool are in use before the fork. */
    assert_int_equal(roundtrip(10), 0);
    static int calls;
    calls = 0;
    assert_int_equal(moor_blocking(sentinel_fn, &calls, NULL, -1), 0);

    pid_t pid = fork_child(20);
    if (pid == 0) {
        moor_executor_after_fork(ex);
        CCHECK(roundtrip(20) == 0);
        int64_t d = moor_deadline_in(20);
        CCHECK(moor_sleep(d) == 0);
        CCHECK(moor_now() >= d);
        intptr_t result = 0;
        CCHECK(moor_blocking(sentinel_fn, &calls, &result, moor_deadline_in(SAFETY_MS)) == 0);
        CCHECK(result == 7);
        moor_executor_free(ex);
        _exit(0);
    }
    wait_child_ok(pid);
    /* The parent's reactor is untouched by the child's. */
    assert_int_equal(roundtrip(10), 0);
    assert_int_equal(moor_blocking(sentinel_fn, &calls, NULL, -1), 0);
    assert_int_equal(calls, 2);
    moor_executor_free(ex);
}

static int inflight_rc[2];

static intptr_t inflight_caller(void *arg)
{
    int i = (int)(intptr_t)arg;
    intptr_t result = 0;
    inflight_rc[i] = moor_blocking(gate_fn, (void *)42, &result, -1);
    return result;
}

/* "Blocking calls in flight in the parent's workers fail with -ECANCELED in the child": the
 * one running on the (only) worker and the one queued behind it. */
static void test_reactor_fork_blocking_in_flight(void **state)
{
    (void)state;
    gate_init();
    moor_executor *ex;
    moor_executor_attr attr = {.blocking_threads = 1};
    assert_int_equal(moor_executor_new(&ex, &attr), 0);
    inflight_rc[0] = inflight_rc[1] = 1;
    moor_fiber *f[2];
    assert_int_equal(moor_spawn(&f[0], inflight_caller, (void *)0, NULL), 0);
    assert_int_equal(moor_spawn(&f[1], inflight_caller, (void *)1, NULL), 0);
    assert_int_equal(moor_sleep(moor_deadline_in(30)), 0); /* one runs, one is queued */
    assert_int_equal(inflight_rc[0], 1);
    assert_int_equal(inflight_rc[1], 1);

    pid_t pid = fork_child(5);
    if (pid == 0) {
        moor_executor_after_fork(ex);
        intptr_t r;
        CCHECK(moor_join(f[1], &r) == 0);
        CCHECK(inflight_rc[1] == -ECANCELED);
        CCHECK(moor_join(f[0], &r) == 0);
        CCHECK(inflight_rc[0] == -ECANCELED);
        _exit(0);
    }
    /* The parent's own calls complete normally once let go. */
    gate_release(2);
    for (int i = 0; i < 2; i++) {
        intptr_t r = 0;
        assert_int_equal(moor_join(f[i], &r), 0);
        assert_int_equal(r, 42);
        assert_int_equal(inflight_rc[i], 0);
    }
    moor_executor_free(ex);
    gate_fini();
    wait_child_ok(pid);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        TEST(test_reactor_blocking_others_progress),
        TEST(test_reactor_blocking_from_plain_code),
        TEST(test_reactor_blocking_deadline),
        TEST(test_reactor_blocking_queued_timeout),
        TEST(test_reactor_blocking_cancel),
        TEST(test_reactor_spawn_remote_many),
        TEST(test_reactor_spawn_remote_to_loop),
        TEST(test_reactor_wake_from_thread),
        TEST(test_reactor_wake_from_thread_plain_driver),
        TEST(test_reactor_attach_app_loop),
        TEST(test_reactor_attach_busy),
        TEST(test_reactor_attach_waits_for_blocking_call),
        TEST(test_reactor_fork),
        TEST(test_reactor_fork_blocking_in_flight),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
