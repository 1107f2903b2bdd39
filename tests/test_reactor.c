/* The reactor around the I/O calls: spawning and waking from other threads, an executor
 * attached to a libev loop the application runs, and fork. moor_blocking and its worker pool
 * are tested in test_blocking.c, signals in test_signal.c.
 *
 * Timing is asserted only as a lower bound; progress is counted (ticks of another fiber,
 * callbacks of the application's watchers). Checks inside fibers are FCHECKs (fixture.h).
 * Forked children check with CCHECK and exit non-zero on a failure. */
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

#include "fixture.h"

/* White-box: moor__part_get tells whether the reactor was made (no public call says). */
#include "fiber/executor.h"

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

/* ---- spawning from other threads --------------------------------------------------------- */

#define RS_THREADS 4
#define RS_PER_THREAD FIBER_COUNT(10000, 1000)
#define RS_TOTAL (RS_THREADS * RS_PER_THREAD)

static int rs_ran[RS_TOTAL];      /* executor thread only */
static int rs_count;              /* atomic */
static int rs_pushed;             /* atomic: spawn requests the executor accepted */
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
        if (moor_spawn_remote(t->ex, rs_fiber, (void *)(uintptr_t)(t->first + i)) != 0)
            __atomic_add_fetch(&rs_spawn_failed, 1, __ATOMIC_SEQ_CST);
        else
            __atomic_add_fetch(&rs_pushed, 1, __ATOMIC_SEQ_CST);
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
    (void)arg;
    int last = 0;
    int still = 0;
    while (!__atomic_load_n(&rs_finished, __ATOMIC_SEQ_CST)) {
        sleep_ms(250);
        /* Progress: requests queued and fibers run. Spawns are started a batch at a time, so
         * a stalled executor stops the second count within one batch. (Not the executor's
         * own fiber count: that is the executor thread's alone, and TSan rightly calls
         * reading it from here a race.) */
        int now = __atomic_load_n(&rs_pushed, __ATOMIC_SEQ_CST) +
                  __atomic_load_n(&rs_count, __ATOMIC_SEQ_CST);
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
    rs_pushed = 0;
    rs_spawn_failed = 0;
    rs_finished = 0;
    pthread_t dog;
    CCHECK(pthread_create(&dog, NULL, rs_watchdog, NULL) == 0);
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
    CCHECK(ex_stats(ex).fibers == 0); /* detached fibers released themselves */
    moor_executor_free(ex);
}

static void test_reactor_spawn_remote_many(void **state)
{
    (void)state;
    pid_t pid = fork_child(120);
    if (pid == 0) {
        remote_spawn_run(0, RS_PER_THREAD); /* the plain driver: no event loop */
        child_exit();
    }
    wait_child_ok(pid);
}

static void test_reactor_spawn_remote_to_loop(void **state)
{
    (void)state;
    pid_t pid = fork_child(120);
    if (pid == 0) {
        remote_spawn_run(1, RS_PER_THREAD / 4); /* parked in libev */
        child_exit();
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
        CCHECK(moor__part_get(ex, MOOR__PART_REACTOR) != NULL);
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
    CCHECK((moor__part_get(ex, MOOR__PART_REACTOR) != NULL) == with_loop);
    moor_executor_free(ex);
}

static void test_reactor_wake_from_thread(void **state)
{
    (void)state;
    pid_t pid = fork_child(20);
    if (pid == 0) {
        wake_from_thread_run(1);
        child_exit();
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
        child_exit();
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

    moor_executor *ex = ex_new();
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
    assert_int_equal(ex_stats(ex).tasks, 0);

    /* Work spawned later runs in a later ev_run. */
    tracked later = {attached_sleeper, NULL, 0};
    moor_fiber *g;
    assert_int_equal(moor_spawn(&g, tracked_fn, &later, NULL), 0);
    ev_run(loop, 0);
    int later_done = later.finished;
    intptr_t r = -1;
    assert_int_equal(moor_join(g, &r), 0);
    assert_int_equal(r, 0);

    ex_free(ex);
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
    moor_executor *ex = ex_new();
    assert_non_null(moor_executor_loop(ex)); /* it has its own loop now */
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    assert_non_null(loop);
    assert_int_equal(moor_executor_attach(ex, loop), -EBUSY);
    ev_loop_destroy(loop);
    ex_free(ex);
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
    moor_executor *ex = ex_new();
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
    ex_free(ex);
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
    moor_executor *ex = ex_new();
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
        /* TSan refuses to start a thread in the child of a multi-threaded fork (it dies,
         * "not supported"), and the child's blocking pool must start its own. */
        if (!UNDER_TSAN) {
            intptr_t result = 0;
            CCHECK(moor_blocking(sentinel_fn, &calls, &result, moor_deadline_in(SAFETY_MS)) == 0);
            CCHECK(result == 7);
        }
        ex_free(ex);
        child_exit();
    }
    wait_child_ok(pid);
    if (UNDER_TSAN)
        print_message("under TSan the child does not start a blocking pool after the fork\n");
    /* The parent's reactor is untouched by the child's. */
    assert_int_equal(roundtrip(10), 0);
    assert_int_equal(moor_blocking(sentinel_fn, &calls, NULL, -1), 0);
    assert_int_equal(calls, 2);
    ex_free(ex);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        TEST(test_reactor_spawn_remote_many),
        TEST(test_reactor_spawn_remote_to_loop),
        TEST(test_reactor_wake_from_thread),
        TEST(test_reactor_wake_from_thread_plain_driver),
        TEST(test_reactor_attach_app_loop),
        TEST(test_reactor_attach_busy),
        TEST(test_reactor_attach_waits_for_blocking_call),
        TEST(test_reactor_fork),
    };
    return RUN_TESTS(tests);
}
