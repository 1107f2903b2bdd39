/* Many executors in one process: moor_threads_run gives each thread its index and its own
 * executor, returns every fn's value, reports an executor that could not be made and one
 * that deadlocked without losing the others; work crosses threads through moor_spawn_remote,
 * promises and wakers with every value accounted for; SO_REUSEPORT listeners on one port
 * share the connections; and an object of one executor used from another thread fails its
 * assertion.
 *
 * The threads are real and run under TSan in CI (zero reports). Cases whose failure would
 * leave a thread or an executor behind (an assertion, an executor given up on) run in forked
 * children. */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#include "moor.h"

#include "fixture.h"

#define MAX_THREADS 4

/* ---- indices, results, fibers spawned by fn ------------------------------------------------ */

#define CHILDREN 3

typedef struct basic_run {
    size_t n;
    int seen[MAX_THREADS];             /* atomic: fn ran with this index */
    int children[MAX_THREADS];         /* fibers of thread i that ran (thread i only) */
    moor_executor *exs[MAX_THREADS];   /* each thread's own executor (thread i only) */
    int all_found[MAX_THREADS];        /* moor_thread_executor found every executor */
} basic_run;

static intptr_t basic_child(void *arg)
{
    int *count = arg;
    moor_yield();
    (*count)++; /* the thread's own counter: only its fibers touch it */
    return 0;
}

/* On a moor_blocking worker: a thread of no run. */
static intptr_t worker_index(void *arg)
{
    (void)arg;
    return moor_thread_index() == -1 && moor_thread_executor(0) == NULL;
}

static intptr_t basic_fn(void *arg)
{
    basic_run *b = arg;
    int i = moor_thread_index();
    FCHECK(i >= 0 && (size_t)i < b->n);
    if (i < 0 || (size_t)i >= b->n)
        return -1;
    __atomic_add_fetch(&b->seen[i], 1, __ATOMIC_RELAXED);
    b->exs[i] = moor_executor_current();
    FCHECK(moor_thread_executor((size_t)i) == moor_executor_current());
    int found = 1;
    for (size_t j = 0; j < b->n; j++)
        found &= moor_thread_executor(j) != NULL;
    b->all_found[i] = found;
    FCHECK(moor_thread_executor(b->n) == NULL);
    FCHECK(moor_thread_executor(SIZE_MAX) == NULL);
    for (int k = 0; k < CHILDREN; k++)
        FCHECK(moor_spawn(NULL, basic_child, &b->children[i], NULL) == 0);
    if (i == 0) {
        intptr_t outside = 0;
        FCHECK(moor_blocking(worker_index, NULL, &outside, -1) == 0);
        FCHECK(outside == 1);
    }
    return 1000 + i;
}

static void test_threads_run_indices_and_results(void **state)
{
    (void)state;
    static const size_t ns[] = {1, 2, 4};
    for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
        basic_run b = {.n = ns[k]};
        intptr_t results[MAX_THREADS];
        assert_int_equal(moor_threads_run(b.n, basic_fn, &b, NULL, results), 0);
        for (size_t i = 0; i < b.n; i++) {
            assert_int_equal(results[i], 1000 + (intptr_t)i);
            assert_int_equal(b.seen[i], 1);
            assert_int_equal(b.children[i], CHILDREN);
            assert_true(b.all_found[i]);
            for (size_t j = 0; j < i; j++) /* all alive at once: all distinct */
                assert_ptr_not_equal(b.exs[i], b.exs[j]);
        }
        /* results may be NULL. */
        memset(&b, 0, sizeof b);
        b.n = ns[k];
        assert_int_equal(moor_threads_run(b.n, basic_fn, &b, NULL, NULL), 0);
        for (size_t i = 0; i < b.n; i++)
            assert_int_equal(b.children[i], CHILDREN);
    }
    /* The calling thread is in no run and was given no executor. */
    assert_int_equal(moor_thread_index(), -1);
    assert_null(moor_thread_executor(0));
    assert_null(moor_executor_current());
    assert_int_equal(fiber_failed(), 0);
}

/* The caller's own executor is neither used nor disturbed. */
static void test_threads_run_beside_callers_executor(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    basic_run b = {.n = 2};
    intptr_t results[2];
    assert_int_equal(moor_threads_run(2, basic_fn, &b, NULL, results), 0);
    assert_int_equal(results[0], 1000);
    assert_int_equal(results[1], 1001);
    assert_ptr_not_equal(b.exs[0], ex);
    assert_ptr_not_equal(b.exs[1], ex);
    assert_ptr_equal(moor_executor_current(), ex);
    ex_free(ex);
}

static void test_threads_run_bad_arguments(void **state)
{
    (void)state;
    basic_run b = {.n = 1};
    intptr_t results[1] = {77};
    assert_int_equal(moor_threads_run(0, basic_fn, &b, NULL, results), -EINVAL);
    assert_int_equal(moor_threads_run(1, NULL, &b, NULL, results), -EINVAL);
    assert_int_equal(moor_threads_run((size_t)INT_MAX + 1, basic_fn, &b, NULL, results), -EINVAL);
    assert_int_equal(moor_threads_run(SIZE_MAX, basic_fn, &b, NULL, results), -EINVAL);
    assert_int_equal(results[0], 77); /* nothing ran, nothing written */
    assert_int_equal(b.seen[0], 0);
}

static intptr_t threads_run_in_fiber(void *arg)
{
    basic_run *b = arg;
    return moor_threads_run(1, basic_fn, b, NULL, NULL);
}

static void threads_run_from_fiber_child(void *arg)
{
    (void)arg;
    moor_executor *ex = NULL;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    basic_run b = {.n = 1};
    moor_fiber *f;
    CHILD_REQUIRE(moor_spawn(&f, threads_run_in_fiber, &b, NULL) == 0);
    moor_join(f, NULL);
}

static void test_threads_run_from_a_fiber_asserts(void **state)
{
    (void)state;
    child_report r;
    child_run(threads_run_from_fiber_child, NULL, &r);
    expect_child_signal(&r, SIGABRT, "moor_threads_run: called from a fiber");
}

/* ---- executors that cannot be made --------------------------------------------------------- */

static void test_threads_run_executor_new_fails_everywhere(void **state)
{
    (void)state;
    moor_executor_attr attr = {.stack_size = SIZE_MAX}; /* moor_executor_new: -EINVAL */
    basic_run b = {.n = 3};
    intptr_t results[3] = {1, 1, 1};
    assert_int_equal(moor_threads_run(3, basic_fn, &b, &attr, results), -EINVAL);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(results[i], -EINVAL);
        assert_int_equal(b.seen[i], 0);
    }
}

/* Every allocation made on the thread of index 1 fails: its executor cannot be made
 * (a new executor's stack pool allocates its first bucket), the others run. */
static void *fail_on_thread_1_malloc(size_t size)
{
    return moor_thread_index() == 1 ? NULL : malloc(size);
}

static void *fail_on_thread_1_realloc(void *p, size_t size)
{
    return moor_thread_index() == 1 ? NULL : realloc(p, size);
}

typedef struct partial_run {
    int seen[3];            /* atomic */
    int found_1;            /* atomic: moor_thread_executor(1) was non-NULL somewhere */
} partial_run;

static intptr_t partial_fn(void *arg)
{
    partial_run *p = arg;
    int i = moor_thread_index();
    __atomic_add_fetch(&p->seen[i], 1, __ATOMIC_RELAXED);
    if (moor_thread_executor(1))
        __atomic_store_n(&p->found_1, 1, __ATOMIC_RELAXED);
    FCHECK(moor_thread_executor(0) != NULL && moor_thread_executor(2) != NULL);
    return 10 * i;
}

static void test_threads_run_one_executor_fails(void **state)
{
    (void)state;
    moor_set_allocator(fail_on_thread_1_malloc, fail_on_thread_1_realloc, free);
    partial_run p = {{0}, 0};
    intptr_t results[3] = {1, 1, 1};
    int rc = moor_threads_run(3, partial_fn, &p, NULL, results);
    moor_set_allocator(NULL, NULL, NULL);
    assert_int_equal(rc, -ENOMEM);
    assert_int_equal(results[0], 0);
    assert_int_equal(results[1], -ENOMEM);
    assert_int_equal(results[2], 20);
    assert_int_equal(p.seen[0], 1);
    assert_int_equal(p.seen[1], 0);
    assert_int_equal(p.seen[2], 1);
    assert_int_equal(p.found_1, 0);
}

/* No thread can be started (the default thread stack is made larger than any mapping can
 * be): every thread's error is reported, fn runs nowhere, and the call returns. In a child:
 * the default attributes are the process's. */
static void no_threads_child(void *arg)
{
    (void)arg;
    pthread_attr_t attr;
    CHILD_REQUIRE(pthread_attr_init(&attr) == 0);
    CHILD_REQUIRE(pthread_attr_setstacksize(&attr, (size_t)1 << 46) == 0);
    CHILD_REQUIRE(pthread_setattr_default_np(&attr) == 0);
    basic_run b = {.n = 3};
    intptr_t results[3] = {1, 1, 1};
    int rc = moor_threads_run(3, basic_fn, &b, NULL, results);
    CHILD_REQUIRE(rc == -EAGAIN);
    for (int i = 0; i < 3; i++) {
        CHILD_REQUIRE(results[i] == rc);
        CHILD_REQUIRE(b.seen[i] == 0);
    }
}

static void test_threads_run_threads_cannot_start(void **state)
{
    (void)state;
    if (UNDER_VALGRIND) {
        print_message("skipped under valgrind: it makes thread stacks of its own size\n");
        skip();
    }
    child_report r;
    child_run(no_threads_child, NULL, &r);
    expect_child_ok(&r);
}

/* fn's own negative values are results, not errors of the call. */
static intptr_t negative_fn(void *arg)
{
    (void)arg;
    return -ENOENT - moor_thread_index();
}

static void test_threads_run_negative_results_are_not_errors(void **state)
{
    (void)state;
    intptr_t results[2];
    assert_int_equal(moor_threads_run(2, negative_fn, NULL, NULL, results), 0);
    assert_int_equal(results[0], -ENOENT);
    assert_int_equal(results[1], -ENOENT - 1);
}

/* ---- deadlocks -------------------------------------------------------------------------------- */

/* capture_begin/capture_end (fixture.h): the deadlock dumps a run prints are checked. */

typedef struct dead_run {
    int deadlock_mask;      /* the indices whose fn waits for ever */
    int fn_rc[MAX_THREADS]; /* what the wait returned there (thread i only) */
    int child_rc[MAX_THREADS];
    int cleaned[MAX_THREADS];
} dead_run;

typedef struct dead_child {
    moor_chan *ch;
    int *rc;
} dead_child;

static intptr_t dead_child_fn(void *arg)
{
    dead_child *c = arg;
    int v;
    *c->rc = moor_chan_recv(c->ch, &v, -1);
    return 0;
}

static intptr_t dead_fn(void *arg)
{
    dead_run *d = arg;
    int i = moor_thread_index();
    if (!(d->deadlock_mask & (1 << i))) {
        for (int k = 0; k < 10; k++)
            moor_yield();
        return i;
    }
    moor_chan *ch, *ch2;
    FCHECK(moor_chan_new(&ch, sizeof(int), 0) == 0);
    FCHECK(moor_chan_new(&ch2, sizeof(int), 0) == 0);
    /* A child that waits too, and that fn joins in its cleanup: the cancelled fn waits for
     * a cancelled child. */
    dead_child c = {ch2, &d->child_rc[i]};
    moor_fiber *child;
    FCHECK(moor_spawn(&child, dead_child_fn, &c, NULL) == 0);
    int v;
    d->fn_rc[i] = moor_chan_recv(ch, &v, -1); /* nobody sends */
    FCHECK(moor_join(child, NULL) == -ECANCELED);
    moor_chan_free(ch);
    moor_chan_free(ch2);
    d->cleaned[i] = 1;
    return 99;
}

static void test_threads_run_deadlock_in_one_reported(void **state)
{
    (void)state;
    dead_run d = {.deadlock_mask = 1 << 1};
    intptr_t results[3];
    capture_begin();
    int rc = moor_threads_run(3, dead_fn, &d, NULL, results);
    const char *err = capture_end();
    assert_int_equal(rc, -EDEADLK);
    /* The dump names the deadlocked thread's first fiber, and only that executor's. */
    assert_non_null(strstr(err, "moor: deadlock"));
    assert_non_null(strstr(err, "\"thread 1\" waiting on chan recv"));
    assert_null(strstr(err, "\"thread 0\""));
    assert_null(strstr(err, "\"thread 2\""));
    assert_int_equal(results[0], 0);
    assert_int_equal(results[1], -EDEADLK);
    assert_int_equal(results[2], 2);
    /* The deadlocked fibers were cancelled and cleaned up. */
    assert_int_equal(d.fn_rc[1], -ECANCELED);
    assert_int_equal(d.child_rc[1], -ECANCELED);
    assert_int_equal(d.cleaned[1], 1);
    assert_int_equal(fiber_failed(), 0);
}

/* Every thread deadlocked at once: each is found (the wait for the other fns comes only
 * after fn), none hangs. */
static void test_threads_run_deadlock_everywhere_reported(void **state)
{
    (void)state;
    dead_run d = {.deadlock_mask = 3};
    intptr_t results[2];
    capture_begin();
    int rc = moor_threads_run(2, dead_fn, &d, NULL, results);
    const char *err = capture_end();
    assert_int_equal(rc, -EDEADLK);
    assert_non_null(strstr(err, "\"thread 0\" waiting on chan recv"));
    assert_non_null(strstr(err, "\"thread 1\" waiting on chan recv"));
    assert_int_equal(results[0], -EDEADLK);
    assert_int_equal(results[1], -EDEADLK);
    assert_int_equal(d.cleaned[0], 1);
    assert_int_equal(d.cleaned[1], 1);
}

/* A plain task that cancelling cannot end: the executor is given up on (said on stderr),
 * the other thread ends normally, and the call returns. */
static moor_chan *stuck_chan;
static int stuck_value;
static moor_chan_future stuck_op;

static intptr_t stuck_fn(void *arg)
{
    (void)arg;
    if (moor_thread_index() == 0) {
        CHILD_REQUIRE(moor_chan_new(&stuck_chan, sizeof(int), 0) == 0);
        moor_chan_recv_init(&stuck_op, stuck_chan, &stuck_value, -1);
        CHILD_REQUIRE(moor_spawn_future(&stuck_op.base) == 0);
    }
    return 5;
}

static void stuck_child(void *arg)
{
    (void)arg;
    intptr_t results[2];
    CHILD_REQUIRE(moor_threads_run(2, stuck_fn, NULL, NULL, results) == -EDEADLK);
    CHILD_REQUIRE(results[0] == -EDEADLK);
    CHILD_REQUIRE(results[1] == 5);
}

static void test_threads_run_gives_up_on_uncancellable_tasks(void **state)
{
    (void)state;
    child_report r;
    child_run(stuck_child, NULL, &r);
    expect_child_ok(&r);
    assert_non_null(strstr(r.err, "thread 0's executor deadlocked and 1 task(s) could not be "
                                  "cancelled"));
}

/* ---- work across threads: remote spawns, promises, wakers ------------------------------------ */

#define JOBS FIBER_COUNT(300, 100)
#define FED FIBER_COUNT(200, 60)

typedef struct cross_run cross_run;

typedef struct job {
    cross_run *run;
    moor_promise *p;    /* made on thread 0, resolved on thread 1 */
    intptr_t input;
} job;

/* A one-shot flag that a fiber awaits and another thread raises, through moor_waker_wake. */
typedef struct flag_future {
    moor_future base;
    int raised;               /* atomic */
    pthread_mutex_t lock;
    moor_waker waker;         /* under lock */
} flag_future;

static moor_poll flag_poll(moor_future *self, moor_cx *cx)
{
    flag_future *f = moor_container_of(self, flag_future, base);
    pthread_mutex_lock(&f->lock);
    f->waker = cx->waker;
    pthread_mutex_unlock(&f->lock);
    if (!__atomic_load_n(&f->raised, __ATOMIC_ACQUIRE))
        return MOOR_PENDING;
    self->result = 1;
    return MOOR_READY;
}

static moor_poll flag_cancel(moor_future *self)
{
    flag_future *f = moor_container_of(self, flag_future, base);
    pthread_mutex_lock(&f->lock);
    f->waker = (moor_waker){0};
    pthread_mutex_unlock(&f->lock);
    return MOOR_PENDING;
}

static const moor_future_ops flag_ops = {"flag", flag_poll, flag_cancel};

static void flag_raise(flag_future *f)
{
    __atomic_store_n(&f->raised, 1, __ATOMIC_RELEASE);
    pthread_mutex_lock(&f->lock);
    moor_waker w = f->waker;
    pthread_mutex_unlock(&f->lock);
    moor_waker_wake(&w);
}

struct cross_run {
    job jobs[JOBS];
    int wrong_thread;         /* atomic: a job ran elsewhere than on thread 1 */
    intptr_t sum;             /* thread 0 only */
    size_t received;          /* thread 0 only */
    moor_promise *back;       /* made on thread 1, resolved from thread 0 */
    int back_ready;           /* atomic: back is there to resolve */
    intptr_t back_value;      /* thread 1 only */
    flag_future flag;         /* awaited on thread 1, raised from thread 0 */
    intptr_t flag_value;      /* thread 1 only */
    int fed;                  /* atomic: fibers the late feeder's spawns ran */
    int feeder_spawn_errors;  /* atomic */
};

static intptr_t square_job(void *arg)
{
    job *j = arg;
    if (moor_thread_index() != 1)
        __atomic_add_fetch(&j->run->wrong_thread, 1, __ATOMIC_RELAXED);
    moor_yield();
    FCHECK(moor_promise_resolve(j->p, j->input * j->input) == 0);
    return 0;
}

static intptr_t fed_fiber(void *arg)
{
    cross_run *c = arg;
    if (moor_thread_index() != 1)
        __atomic_add_fetch(&c->wrong_thread, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&c->fed, 1, __ATOMIC_RELAXED);
    return 0;
}

/* A feeder that goes on after its fn has returned: it took a hold on thread 1's executor
 * while fn still ran, and releases it once it has spawned everything. */
static intptr_t late_feeder(void *arg)
{
    cross_run *c = arg;
    moor_executor *ex1 = moor_thread_executor(1);
    /* Long enough for every fn to have returned and thread 1 to have run out of tasks: only
     * the hold keeps its executor, idle, from ending. */
    moor_sleep(moor_deadline_in(WAIT_MS));
    for (int k = 0; k < FED; k++)
        if (moor_spawn_remote(ex1, fed_fiber, c) != 0)
            __atomic_add_fetch(&c->feeder_spawn_errors, 1, __ATOMIC_RELAXED);
    moor_executor_release(ex1);
    return 0;
}

static intptr_t cross_fn(void *arg)
{
    cross_run *c = arg;
    if (moor_thread_index() == 1) {
        /* The promise thread 0 resolves, and the flag it raises. */
        moor_promise *p;
        FCHECK(moor_promise_new(&p, NULL) == 0);
        c->back = p;
        __atomic_store_n(&c->back_ready, 1, __ATOMIC_RELEASE);
        c->back_value = moor_promise_await(p, moor_deadline_in(SAFETY_MS));
        c->flag_value = moor_await(&c->flag.base);
        return 1;
    }
    moor_executor *ex1 = moor_thread_executor(1);
    FCHECK(ex1 != NULL);
    for (int k = 0; k < JOBS; k++) {
        job *j = &c->jobs[k];
        j->run = c;
        j->input = k;
        FCHECK(moor_promise_new(&j->p, NULL) == 0);
        FCHECK(moor_spawn_remote(ex1, square_job, j) == 0);
    }
    for (int k = 0; k < JOBS; k++) {
        intptr_t v = moor_promise_await(c->jobs[k].p, moor_deadline_in(SAFETY_MS));
        FCHECK(v == (intptr_t)k * k);
        c->sum += v;
        c->received++;
    }
    /* Thread 1's promise: wait until it is there (a yield loop, bounded). */
    int64_t give_up = moor_deadline_in(SAFETY_MS);
    while (!__atomic_load_n(&c->back_ready, __ATOMIC_ACQUIRE) && moor_now() < give_up)
        moor_sleep(moor_deadline_in(1));
    FCHECK(moor_promise_resolve(c->back, 4242) == 0);
    flag_raise(&c->flag);
    /* The late feeder's hold, taken while this fn has not returned. */
    moor_executor_hold(ex1);
    FCHECK(moor_spawn(NULL, late_feeder, c, NULL) == 0);
    return 0;
}

static void test_threads_cross_thread_work_accounted(void **state)
{
    (void)state;
    cross_run *c = calloc(1, sizeof *c);
    assert_non_null(c);
    moor_future_init(&c->flag.base, &flag_ops, 0);
    pthread_mutex_init(&c->flag.lock, NULL);
    intptr_t results[2];
    assert_int_equal(moor_threads_run(2, cross_fn, c, NULL, results), 0);
    assert_int_equal(results[0], 0);
    assert_int_equal(results[1], 1);
    assert_int_equal(c->received, JOBS);
    intptr_t expect = 0;
    for (intptr_t k = 0; k < JOBS; k++)
        expect += k * k;
    assert_int_equal(c->sum, expect);
    assert_int_equal(c->back_value, 4242);
    assert_int_equal(c->flag_value, 1);
    assert_int_equal(c->fed, FED);
    assert_int_equal(c->feeder_spawn_errors, 0);
    assert_int_equal(c->wrong_thread, 0);
    assert_int_equal(fiber_failed(), 0);
    pthread_mutex_destroy(&c->flag.lock);
    free(c);
}

/* A hold and its release racing with the held executor running out of tasks: the release
 * comes at once or after a few turns, with a spawn or without one, over many runs. Every
 * spawn runs, no release is lost (a lost one would hang the run), none is doubled (an
 * assertion). */
#define HOLD_RUNS FIBER_COUNT(200, 40)

typedef struct hold_race {
    int round;
    int fed;                   /* atomic */
    int spawn_errors;          /* atomic */
} hold_race;

static intptr_t hold_fed(void *arg)
{
    hold_race *h = arg;
    __atomic_add_fetch(&h->fed, 1, __ATOMIC_RELAXED);
    return 0;
}

static intptr_t hold_feeder(void *arg)
{
    hold_race *h = arg;
    moor_executor *ex1 = moor_thread_executor(1);
    for (int k = 0; k < h->round % 4; k++)
        moor_yield();
    if (h->round % 2 == 0 && moor_spawn_remote(ex1, hold_fed, h) != 0)
        __atomic_add_fetch(&h->spawn_errors, 1, __ATOMIC_RELAXED);
    moor_executor_release(ex1);
    return 0;
}

static intptr_t hold_fn(void *arg)
{
    hold_race *h = arg;
    if (moor_thread_index() == 0) {
        moor_executor_hold(moor_thread_executor(1));
        FCHECK(moor_spawn(NULL, hold_feeder, h, NULL) == 0);
    }
    return 0;
}

static void test_threads_hold_release_races_the_end(void **state)
{
    (void)state;
    hold_race h = {0, 0, 0};
    int expect = 0;
    for (h.round = 0; h.round < HOLD_RUNS; h.round++) {
        assert_int_equal(moor_threads_run(2, hold_fn, &h, NULL, NULL), 0);
        expect += h.round % 2 == 0;
        assert_int_equal(h.fed, expect);
    }
    assert_int_equal(h.spawn_errors, 0);
    assert_int_equal(fiber_failed(), 0);
}

/* ---- SO_REUSEPORT ------------------------------------------------------------------------------ */

#define CONNS 200

/* Two executors accept on listeners that share a port, a plain thread is the client, and the
 * stop is docs/CORES.md's: a fiber spawned onto each executor closes its listener, which
 * wakes the accepting fiber with -EBADF. */
typedef struct reuse_run {
    int fds[2];                 /* the listeners, one per thread */
    int port;
    moor_executor *exs[2];      /* atomic: published by each fn, good until it returns */
    int accepted[2];            /* thread i only */
    int accept_end[2];          /* thread i only: what ended its accept loop */
    int client_ok;              /* client thread only */
    int client_errors;
    int stop_errors;
} reuse_run;

static intptr_t reuse_conn(void *arg)
{
    int fd = (int)(intptr_t)arg;
    uint32_t v;
    ssize_t n = moor_read(fd, &v, sizeof v, moor_deadline_in(SAFETY_MS));
    FCHECK(n == (ssize_t)sizeof v);
    if (n == (ssize_t)sizeof v) {
        v += 1;
        FCHECK(moor_write_all(fd, &v, sizeof v, NULL, moor_deadline_in(SAFETY_MS)) == sizeof v);
    }
    moor_close(fd);
    return 0;
}

static intptr_t reuse_stop(void *arg)
{
    reuse_run *r = arg;
    FCHECK(moor_close(r->fds[moor_thread_index()]) == 0);
    return 0;
}

static intptr_t reuse_fn(void *arg)
{
    reuse_run *r = arg;
    int i = moor_thread_index();
    __atomic_store_n(&r->exs[i], moor_executor_current(), __ATOMIC_RELEASE);
    for (;;) {
        int c = moor_accept(r->fds[i], NULL, NULL, moor_deadline_in(SAFETY_MS));
        if (c < 0) {
            r->accept_end[i] = c;
            return 0;
        }
        r->accepted[i]++;
        FCHECK(moor_spawn(NULL, reuse_conn, (void *)(intptr_t)c, NULL) == 0);
    }
}

static void *reuse_client(void *arg)
{
    reuse_run *r = arg;
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)r->port)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = SAFETY_MS / 1000};
    for (uint32_t k = 0; k < CONNS; k++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        uint32_t back = 0;
        if (fd < 0) {
            r->client_errors++;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (connect(fd, (struct sockaddr *)&sin, sizeof sin) == 0 &&
            write(fd, &k, sizeof k) == (ssize_t)sizeof k &&
            read(fd, &back, sizeof back) == (ssize_t)sizeof back && back == k + 1)
            r->client_ok++;
        else
            r->client_errors++;
        close(fd);
    }
    /* Stop both: each fn runs until its listener is closed, so its executor is up. */
    for (int i = 0; i < 2; i++) {
        moor_executor *ex;
        while (!(ex = __atomic_load_n(&r->exs[i], __ATOMIC_ACQUIRE)))
            nanosleep(&(struct timespec){0, 1000000}, NULL);
        if (moor_spawn_remote(ex, reuse_stop, r) != 0)
            r->stop_errors++;
    }
    return NULL;
}

static void test_threads_reuseport_spreads_connections(void **state)
{
    (void)state;
    reuse_run r = {.fds = {-1, -1}};
    /* The pattern: port 0 once, then the others on the port it got. */
    r.fds[0] = moor_tcp_listen_opt("127.0.0.1", 0, 256, MOOR_TCP_REUSEPORT);
    assert_true(r.fds[0] >= 0);
    r.port = moor_socket_port(r.fds[0]);
    assert_true(r.port > 0);
    r.fds[1] = moor_tcp_listen_opt("127.0.0.1", r.port, 256, MOOR_TCP_REUSEPORT);
    assert_true(r.fds[1] >= 0);
    assert_int_equal(moor_socket_port(r.fds[1]), r.port);
    /* Without the flag the port is taken. */
    assert_int_equal(moor_tcp_listen_opt("127.0.0.1", r.port, 16, 0), -EADDRINUSE);
    assert_int_equal(moor_tcp_listen("127.0.0.1", r.port, 16), -EADDRINUSE);

    pthread_t client;
    assert_int_equal(pthread_create(&client, NULL, reuse_client, &r), 0);
    intptr_t results[2];
    int rc = moor_threads_run(2, reuse_fn, &r, NULL, results);
    pthread_join(client, NULL);
    assert_int_equal(rc, 0);
    assert_int_equal(r.client_errors, 0);
    assert_int_equal(r.client_ok, CONNS);
    assert_int_equal(r.stop_errors, 0);
    assert_int_equal(r.accept_end[0], -EBADF);
    assert_int_equal(r.accept_end[1], -EBADF);
    assert_int_equal(r.accepted[0] + r.accepted[1], CONNS);
    /* The kernel hashes each connection's ports: 200 all on one side would be a 2^-199
     * chance, or a listener that is not sharing. */
    assert_true(r.accepted[0] > 0);
    assert_true(r.accepted[1] > 0);
    assert_int_equal(fiber_failed(), 0);
}

/* What docs/CORES.md says of closing one listener of a group: the connections queued on it
 * are reset (unless the kernel migrates them, net.ipv4.tcp_migrate_req), the others' are
 * still accepted. No executor: plain accept4 on the non-blocking listeners. */
#define QUEUED 24

static int migrate_req(void)
{
    FILE *f = fopen("/proc/sys/net/ipv4/tcp_migrate_req", "r");
    int v = 0;
    if (f) {
        if (fscanf(f, "%d", &v) != 1)
            v = 0;
        fclose(f);
    }
    return v;
}

static void test_threads_reuseport_close_resets_only_its_queue(void **state)
{
    (void)state;
    int a = moor_tcp_listen_opt("127.0.0.1", 0, 64, MOOR_TCP_REUSEPORT);
    assert_true(a >= 0);
    int port = moor_socket_port(a);
    int b = moor_tcp_listen_opt("127.0.0.1", port, 64, MOOR_TCP_REUSEPORT);
    assert_true(b >= 0);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int clients[QUEUED];
    for (int k = 0; k < QUEUED; k++) {
        clients[k] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(clients[k] >= 0);
        struct timeval tv = {.tv_sec = SAFETY_MS / 1000};
        setsockopt(clients[k], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        /* The handshake completes in the kernel: queued, not accepted. */
        assert_int_equal(connect(clients[k], (struct sockaddr *)&sin, sizeof sin), 0);
    }
    assert_int_equal(moor_close(a), 0);
    /* b's queue: accept and answer each. */
    int on_b = 0;
    for (;;) {
        int c = accept4(b, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
            break;
        }
        assert_int_equal(write(c, "b", 1), 1);
        close(c);
        on_b++;
    }
    int answered = 0, reset = 0;
    for (int k = 0; k < QUEUED; k++) {
        char ch;
        ssize_t n = read(clients[k], &ch, 1);
        if (n == 1 && ch == 'b')
            answered++;
        else if (n < 0 && errno == ECONNRESET)
            reset++;
        close(clients[k]);
    }
    assert_int_equal(answered, on_b);
    if (migrate_req()) {
        print_message("net.ipv4.tcp_migrate_req is set: a's queue moved to b\n");
        assert_int_equal(answered, QUEUED);
    } else {
        assert_int_equal(answered + reset, QUEUED);
        /* Both queues had some: 24 on one side would be a 2^-23 chance. */
        assert_true(reset > 0);
        assert_true(answered > 0);
    }
    assert_int_equal(moor_close(b), 0);
}

static void test_threads_listen_opt_flags(void **state)
{
    (void)state;
    assert_int_equal(moor_tcp_listen_opt("127.0.0.1", 0, 16, 2), -EINVAL);
    assert_int_equal(moor_tcp_listen_opt("127.0.0.1", 0, 16, ~0u), -EINVAL);
    assert_int_equal(moor_tcp_listen_opt("127.0.0.1", 0, 16, MOOR_TCP_REUSEPORT | 0x80000000u),
                     -EINVAL);
    /* Bad addresses and ports as moor_tcp_listen. */
    assert_int_equal(moor_tcp_listen_opt("not an address", 0, 16, MOOR_TCP_REUSEPORT), -EINVAL);
    assert_int_equal(moor_tcp_listen_opt("127.0.0.1", 65536, 16, MOOR_TCP_REUSEPORT), -EINVAL);
    assert_int_equal(moor_tcp_listen_opt("127.0.0.1", -1, 16, MOOR_TCP_REUSEPORT), -EINVAL);
    /* Port 0 twice: a port each. */
    int a = moor_tcp_listen_opt("127.0.0.1", 0, 16, MOOR_TCP_REUSEPORT);
    int b = moor_tcp_listen_opt("127.0.0.1", 0, 16, MOOR_TCP_REUSEPORT);
    assert_true(a >= 0 && b >= 0);
    assert_int_not_equal(moor_socket_port(a), moor_socket_port(b));
    /* IPv6 too, where the machine has it. */
    int c = moor_tcp_listen_opt("::1", 0, 16, MOOR_TCP_REUSEPORT);
    if (c >= 0) {
        int d = moor_tcp_listen_opt("::1", moor_socket_port(c), 16, MOOR_TCP_REUSEPORT);
        assert_true(d >= 0);
        moor_close(d);
        moor_close(c);
    }
    moor_close(a);
    moor_close(b);
    /* The plain listener does not share. */
    int e = moor_tcp_listen("127.0.0.1", 0, 16);
    assert_true(e >= 0);
    assert_int_equal(moor_tcp_listen_opt("127.0.0.1", moor_socket_port(e), 16,
                                         MOOR_TCP_REUSEPORT), -EADDRINUSE);
    moor_close(e);
}

/* ---- a graceful stop on a signal, as docs/CORES.md describes ------------------------------ */

typedef struct stop_run {
    int fds[2];
    int stopped;          /* atomic: the run returned */
    int accept_end[2];    /* thread i only */
    int signalled;        /* thread 0 only: what moor_signal_wait returned */
    int spawn_errors;     /* thread 0 only */
} stop_run;

static intptr_t stop_listener(void *arg)
{
    stop_run *s = arg;
    CHILD_REQUIRE(moor_close(s->fds[moor_thread_index()]) == 0);
    return 0;
}

static intptr_t stop_on_signal(void *arg)
{
    stop_run *s = arg;
    s->signalled = moor_signal_wait(SIGUSR1, moor_deadline_in(SAFETY_MS));
    for (size_t j = 0; j < 2; j++)
        if (moor_spawn_remote(moor_thread_executor(j), stop_listener, s) != 0)
            s->spawn_errors++;
    return 0;
}

/* SIGUSR1, for pthread_sigmask. */
static sigset_t usr1_set(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    return set;
}

static intptr_t stop_fn(void *arg)
{
    stop_run *s = arg;
    sigset_t usr1 = usr1_set();
    pthread_sigmask(SIG_UNBLOCK, &usr1, NULL); /* the raiser's signals come to the executors */
    int i = moor_thread_index();
    if (i == 0)
        CHILD_REQUIRE(moor_spawn(NULL, stop_on_signal, s, NULL) == 0);
    for (;;) {
        int c = moor_accept(s->fds[i], NULL, NULL, moor_deadline_in(SAFETY_MS));
        if (c < 0) {
            s->accept_end[i] = c;
            return 0;
        }
        moor_close(c);
    }
}

/* Until the run has stopped: a signal sent before the wait began is ignored (SIG_IGN). */
static void *stop_raiser(void *arg)
{
    stop_run *s = arg;
    while (!__atomic_load_n(&s->stopped, __ATOMIC_ACQUIRE)) {
        kill(getpid(), SIGUSR1);
        nanosleep(&(struct timespec){0, 5000000}, NULL);
    }
    return NULL;
}

static void stop_child(void *arg)
{
    (void)arg;
    signal(SIGUSR1, SIG_IGN);
    stop_run s = {.fds = {-1, -1}};
    s.fds[0] = moor_tcp_listen_opt("127.0.0.1", 0, 16, MOOR_TCP_REUSEPORT);
    CHILD_REQUIRE(s.fds[0] >= 0);
    s.fds[1] = moor_tcp_listen_opt("127.0.0.1", moor_socket_port(s.fds[0]), 16,
                                   MOOR_TCP_REUSEPORT);
    CHILD_REQUIRE(s.fds[1] >= 0);
    /* Only the executors' threads take SIGUSR1 (stop_fn unblocks it; the raiser and they
     * inherit this block): the main thread waits in moor_threads_run's join meanwhile, and
     * valgrind cannot always grow its stack for a handler there ("Can't extend stack ...
     * during signal delivery"). */
    sigset_t usr1 = usr1_set();
    CHILD_REQUIRE(pthread_sigmask(SIG_BLOCK, &usr1, NULL) == 0);
    pthread_t raiser;
    CHILD_REQUIRE(pthread_create(&raiser, NULL, stop_raiser, &s) == 0);
    intptr_t results[2];
    int rc = moor_threads_run(2, stop_fn, &s, NULL, results);
    __atomic_store_n(&s.stopped, 1, __ATOMIC_RELEASE);
    pthread_join(raiser, NULL);
    CHILD_REQUIRE(rc == 0);
    CHILD_REQUIRE(s.signalled == SIGUSR1);
    CHILD_REQUIRE(s.spawn_errors == 0);
    CHILD_REQUIRE(s.accept_end[0] == -EBADF);
    CHILD_REQUIRE(s.accept_end[1] == -EBADF);
}

static void test_threads_stop_on_a_signal(void **state)
{
    (void)state;
    child_report r;
    child_run(stop_child, NULL, &r);
    expect_child_ok(&r);
}

/* ---- a local-only object from another executor's thread ------------------------------------ */

typedef struct misuse_run {
    int kind;            /* 0: a channel, 1: a mutex */
    moor_chan *ch;
    moor_mutex m;
    int bound;           /* atomic: thread 0 has used the object */
    int misused;         /* atomic: thread 1 came back from its use (it should not) */
} misuse_run;

static intptr_t misuse_fn(void *arg)
{
    misuse_run *m = arg;
    int v = 1;
    if (moor_thread_index() == 0) {
        if (m->kind == 0)
            CHILD_REQUIRE(moor_chan_try_send(m->ch, &v) == 0);
        else
            CHILD_REQUIRE(moor_mutex_trylock(&m->m) == 0);
        __atomic_store_n(&m->bound, 1, __ATOMIC_RELEASE);
        /* The child should end with the other thread's abort; if not, end too. */
        while (!__atomic_load_n(&m->misused, __ATOMIC_ACQUIRE))
            moor_sleep(moor_deadline_in(5));
        return 0;
    }
    while (!__atomic_load_n(&m->bound, __ATOMIC_ACQUIRE))
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    if (m->kind == 0)
        moor_chan_try_recv(m->ch, &v);
    else
        moor_mutex_trylock(&m->m);
    __atomic_store_n(&m->misused, 1, __ATOMIC_RELEASE);
    return 0;
}

static void misuse_child(void *arg)
{
    misuse_run m = {.kind = (int)(intptr_t)arg, .m = MOOR_MUTEX_INIT};
    CHILD_REQUIRE(moor_chan_new(&m.ch, sizeof(int), 1) == 0); /* no executor here: unbound */
    moor_threads_run(2, misuse_fn, &m, NULL, NULL);
    CHILD_REQUIRE(!"the misuse was not caught");
}

static void test_threads_local_object_from_another_thread_asserts(void **state)
{
    (void)state;
    child_report r;
    child_run(misuse_child, (void *)0, &r);
    expect_child_signal(&r, SIGABRT,
                        "moor_chan_try_recv: called from another thread than the one whose "
                        "executor owns it");
    child_run(misuse_child, (void *)1, &r);
    expect_child_signal(&r, SIGABRT,
                        "moor_mutex_trylock: called from another thread than the one whose "
                        "executor owns it");
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_threads_run_indices_and_results),
        TEST(test_threads_run_beside_callers_executor),
        TEST(test_threads_run_bad_arguments),
        TEST(test_threads_run_from_a_fiber_asserts),
        TEST(test_threads_run_executor_new_fails_everywhere),
        TEST(test_threads_run_one_executor_fails),
        TEST(test_threads_run_threads_cannot_start),
        TEST(test_threads_run_negative_results_are_not_errors),
        TEST(test_threads_run_deadlock_in_one_reported),
        TEST(test_threads_run_deadlock_everywhere_reported),
        TEST(test_threads_run_gives_up_on_uncancellable_tasks),
        TEST(test_threads_cross_thread_work_accounted),
        TEST(test_threads_hold_release_races_the_end),
        TEST(test_threads_reuseport_spreads_connections),
        TEST(test_threads_reuseport_close_resets_only_its_queue),
        TEST(test_threads_listen_opt_flags),
        TEST(test_threads_stop_on_a_signal),
        TEST(test_threads_local_object_from_another_thread_asserts),
    };
    return RUN_TESTS(tests);
}
