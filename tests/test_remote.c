/* Other threads and an executor: remote spawns arrive a batch at a time and never map a stack
 * per request at once, a spawn that finds no memory for its stack waits for it, a waker woken
 * from another thread after its executor was freed (or its memory reused) does nothing, and
 * an object of one executor used from another thread fails an assertion that names the
 * misuse.
 *
 * The cases with threads run in forked children (child_run), so that a deadlock or a lost wake
 * fails the test instead of hanging the suite, and run under TSan in CI. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "moor.h"

#include "fixture.h"

/* White-box: the stacks the pool has mapped, and the remote spawns left queued, which the
 * bounds on a burst and on a starved spawn are about. */
#include "fiber/executor.h"

/* ---- a burst of remote spawns --------------------------------------------------------------- */

#ifdef __SANITIZE_THREAD__
#define BURST 4000 /* TSan keeps a shadow per fiber; fewer suffice to show the bound */
#else
#define BURST 20000
#endif
#define BURST_THREADS 2
/* The bound: one batch (executor.c's REMOTE_SPAWN_BATCH) plus the executor's warm stack and a
 * little slack. Today's code maps a stack for every request before the first has run. */
#define BURST_MAX_MAPPED 80

typedef struct burst {
    moor_executor *ex;
    int ran[BURST];          /* executor thread only */
    size_t max_mapped;       /* executor thread only */
    int done;                /* atomic: fibers that ran */
    int spawn_failures;      /* atomic */
} burst;

typedef struct burst_thread {
    burst *b;
    int first, count;
} burst_thread;

static burst the_burst;

static intptr_t burst_fiber(void *arg)
{
    burst *b = &the_burst;
    int i = (int)(intptr_t)arg;
    b->ran[i]++;
    size_t mapped = b->ex->pool.mapped;
    if (mapped > b->max_mapped)
        b->max_mapped = mapped;
    __atomic_add_fetch(&b->done, 1, __ATOMIC_RELEASE);
    return 0;
}

static void *burst_spawner(void *arg)
{
    burst_thread *t = arg;
    for (int i = t->first; i < t->first + t->count; i++)
        if (moor_spawn_remote(t->b->ex, burst_fiber, (void *)(intptr_t)i) != 0)
            __atomic_add_fetch(&t->b->spawn_failures, 1, __ATOMIC_RELAXED);
    return NULL;
}

static void burst_child(void *arg)
{
    (void)arg;
    burst *b = &the_burst;
    CHILD_REQUIRE(moor_executor_new(&b->ex, NULL) == 0);
    pthread_t th[BURST_THREADS];
    burst_thread args[BURST_THREADS];
    for (int i = 0; i < BURST_THREADS; i++) {
        args[i] = (burst_thread){b, i * (BURST / BURST_THREADS), BURST / BURST_THREADS};
        CHILD_REQUIRE(pthread_create(&th[i], NULL, burst_spawner, &args[i]) == 0);
    }
    /* Plain code on the executor's thread: sleeping runs the executor. */
    while (__atomic_load_n(&b->done, __ATOMIC_ACQUIRE) < BURST)
        CHILD_REQUIRE(moor_sleep(moor_deadline_in(1)) == 0);
    for (int i = 0; i < BURST_THREADS; i++)
        CHILD_REQUIRE(pthread_join(th[i], NULL) == 0);
    CHILD_REQUIRE(b->spawn_failures == 0);
    for (int i = 0; i < BURST; i++)
        CHILD_REQUIRE(b->ran[i] == 1);
    if (b->max_mapped > BURST_MAX_MAPPED) {
        fprintf(stderr, "%zu stacks were mapped at once for a burst of %d remote spawns\n",
                b->max_mapped, BURST);
        _exit(CHILD_CHECK_FAILED);
    }
    moor_executor_free(b->ex);
}

static void test_remote_spawn_burst_maps_few_stacks(void **state)
{
    (void)state;
    child_report r;
    child_run(burst_child, NULL, &r);
    expect_child_ok(&r);
}

/* ---- a remote spawn that finds no memory for its stack waits for it ------------------------- */

#define BIG_STACK (256u << 20)

typedef struct starved {
    moor_executor *ex;
    int ran;             /* atomic */
    moor_event hold;
    int pushed;          /* atomic */
} starved;

static starved the_starved;

static intptr_t starved_fiber(void *arg)
{
    (void)arg;
    __atomic_add_fetch(&the_starved.ran, 1, __ATOMIC_RELEASE);
    return 0;
}

static intptr_t holder_fiber(void *arg)
{
    (void)arg;
    return moor_event_wait(&the_starved.hold, -1);
}

static void *starved_spawner(void *arg)
{
    (void)arg;
    int rc = moor_spawn_remote(the_starved.ex, starved_fiber, NULL);
    __atomic_store_n(&the_starved.pushed, rc == 0 ? 1 : -1, __ATOMIC_RELEASE);
    return NULL;
}

static size_t address_space_now(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long pages = 0;
    if (f) {
        if (fscanf(f, "%lu", &pages) != 1)
            pages = 0;
        fclose(f);
    }
    return (size_t)pages * (size_t)sysconf(_SC_PAGESIZE);
}

static void starved_child(void *arg)
{
    (void)arg;
    starved *s = &the_starved;
    moor_executor_attr attr = {.stack_size = BIG_STACK};
    CHILD_REQUIRE(moor_executor_new(&s->ex, &attr) == 0);
    /* The executor's one warm stack goes to a fiber that keeps it. */
    moor_fiber *holder;
    CHILD_REQUIRE(moor_spawn(&holder, holder_fiber, NULL, NULL) == 0);
    CHILD_REQUIRE(moor_sleep(moor_deadline_in(1)) == 0);
    /* No room for another big stack from here on. */
    struct rlimit old, low;
    CHILD_REQUIRE(getrlimit(RLIMIT_AS, &old) == 0);
    low = old;
    low.rlim_cur = address_space_now() + BIG_STACK / 4;
    CHILD_REQUIRE(setrlimit(RLIMIT_AS, &low) == 0);
    pthread_t th;
    CHILD_REQUIRE(pthread_create(&th, NULL, starved_spawner, NULL) == 0);
    CHILD_REQUIRE(pthread_join(th, NULL) == 0);
    CHILD_REQUIRE(__atomic_load_n(&s->pushed, __ATOMIC_ACQUIRE) == 1);
    /* It cannot start: it waits (it is neither dropped nor run). */
    for (int i = 0; i < 5; i++)
        CHILD_REQUIRE(moor_sleep(moor_deadline_in(10)) == 0);
    CHILD_REQUIRE(__atomic_load_n(&s->ran, __ATOMIC_ACQUIRE) == 0);
    CHILD_REQUIRE(s->ex->spawns_kept == 1);
    /* Memory again: it starts at the next try. */
    CHILD_REQUIRE(setrlimit(RLIMIT_AS, &old) == 0);
    for (int i = 0; i < 3000 && !__atomic_load_n(&s->ran, __ATOMIC_ACQUIRE); i++)
        CHILD_REQUIRE(moor_sleep(moor_deadline_in(1)) == 0);
    CHILD_REQUIRE(__atomic_load_n(&s->ran, __ATOMIC_ACQUIRE) == 1);
    moor_event_set(&s->hold);
    CHILD_REQUIRE(moor_join(holder, NULL) == 0);
    CHILD_REQUIRE(moor_executor_run(s->ex) == 0);
    CHILD_REQUIRE(__atomic_load_n(&s->ran, __ATOMIC_ACQUIRE) == 1); /* exactly once */
    moor_executor_free(s->ex);
}

static void test_remote_spawn_waits_for_memory(void **state)
{
    (void)state;
    child_report r;
    child_run(starved_child, NULL, &r);
    expect_child_ok(&r);
    /* Said once, with the reason; not once per try. */
    const char *said = strstr(r.err, "waits for memory for its stack");
    if (!said)
        fail_msg("no word on stderr about the waiting spawn: %s", r.err);
    assert_null(strstr(said + 1, "waits for memory for its stack"));
}

/* ---- a waker that outlives its executor -------------------------------------------------- */

/* A plain future that stays pending and hands its waker to the test. */
typedef struct parked {
    moor_future base;
    moor_waker waker;
    int finish;
} parked;

static moor_poll parked_poll(moor_future *fut, moor_cx *cx)
{
    parked *p = moor_container_of(fut, parked, base);
    p->waker = cx->waker;
    if (!p->finish)
        return MOOR_PENDING;
    fut->result = 1;
    return MOOR_READY;
}

static const moor_future_ops parked_ops = {"parked", parked_poll, NULL};

typedef struct late_wake {
    moor_waker waker;
    int go;              /* atomic: 1 = wake now, 2 = stop */
    int woken;           /* atomic: wakes made */
} late_wake;

static void *late_waker(void *arg)
{
    late_wake *lw = arg;
    for (;;) {
        int go = __atomic_load_n(&lw->go, __ATOMIC_ACQUIRE);
        if (go == 2)
            break;
        if (go == 1) {
            moor_waker_wake(&lw->waker);
            __atomic_add_fetch(&lw->woken, 1, __ATOMIC_RELEASE);
            __atomic_store_n(&lw->go, 0, __ATOMIC_RELEASE);
        }
        sched_yield();
    }
    return NULL;
}

static void wake_from_thread(late_wake *lw)
{
    int before = __atomic_load_n(&lw->woken, __ATOMIC_ACQUIRE);
    __atomic_store_n(&lw->go, 1, __ATOMIC_RELEASE);
    while (__atomic_load_n(&lw->woken, __ATOMIC_ACQUIRE) == before)
        sched_yield();
}

static void late_wake_child(void *arg)
{
    (void)arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    parked p = {.finish = 0};
    moor_future_init(&p.base, &parked_ops, 0);
    CHILD_REQUIRE(moor_spawn_future(&p.base) == 0);
    CHILD_REQUIRE(moor_sleep(moor_deadline_in(1)) == 0); /* polled: the waker is in p */
    late_wake lw = {.waker = p.waker};
    p.finish = 1;
    moor_waker_wake(&p.waker);
    CHILD_REQUIRE(moor_executor_run(ex) == 0);
    CHILD_REQUIRE(moor_future_done(&p.base) && p.base.result == 1);
    pthread_t th;
    CHILD_REQUIRE(pthread_create(&th, NULL, late_waker, &lw) == 0);
    moor_executor_free(ex); /* the task's slot is freed with it */

    /* Woken from another thread with no executor alive: nothing happens. */
    wake_from_thread(&lw);
    /* The memory reused by a new executor (freed executors are recycled, last first): the
     * old waker is from an earlier life and is dropped, from this thread and the other. */
    moor_executor *again;
    CHILD_REQUIRE(moor_executor_new(&again, NULL) == 0);
    CHILD_REQUIRE(again == ex);
    wake_from_thread(&lw);
    moor_waker_wake(&lw.waker);
    CHILD_REQUIRE(moor_sleep(moor_deadline_in(2)) == 0);
    CHILD_REQUIRE(again->ntasks == 0);
    __atomic_store_n(&lw.go, 2, __ATOMIC_RELEASE);
    CHILD_REQUIRE(pthread_join(th, NULL) == 0);
    moor_executor_free(again);
    /* A remote spawn onto a freed executor is refused, not queued for nobody. */
    CHILD_REQUIRE(moor_spawn_remote(again, starved_fiber, NULL) == -ESRCH);
}

static void test_remote_wake_after_executor_freed(void **state)
{
    (void)state;
    child_report r;
    child_run(late_wake_child, NULL, &r);
    expect_child_ok(&r);
}

/* ---- objects of one executor used from another thread ------------------------------------- */

enum misuse {
    MISUSE_EVENT_SET,
    MISUSE_MUTEX_LOCK,
    MISUSE_SEM_RELEASE,
    MISUSE_COND_SIGNAL,
    MISUSE_WAITGROUP_DONE,
    MISUSE_CHAN_SEND,
    MISUSE_CHAN_TRY_RECV,
    MISUSE_SCOPE_SPAWN,
    MISUSE_FD_WAIT,
    NMISUSES
};

static const char *const misuse_call[NMISUSES] = {
    "moor_event_set",        "moor_mutex_lock", "moor_sem_release",   "moor_cond_signal",
    "moor_waitgroup_done",   "moor_chan_send",  "moor_chan_try_recv", "moor_scope_spawn",
    "wait on fd",
};

typedef struct misuse_ctx {
    enum misuse which;
    int foreign_has_executor;
    moor_event e;
    moor_mutex m;
    moor_sem s;
    moor_cond c;
    moor_waitgroup wg;
    moor_chan *ch;
    moor_scope scope;
    moor_io_future io; /* pending on the owner's loop */
    int fds[2];
} misuse_ctx;

static intptr_t nothing(void *arg)
{
    (void)arg;
    return 0;
}

static void *foreign_thread(void *arg)
{
    misuse_ctx *c = arg;
    moor_executor *own = NULL;
    if (c->foreign_has_executor && moor_executor_new(&own, NULL) != 0)
        return NULL;
    int v = 1;
    switch (c->which) {
    case MISUSE_EVENT_SET:
        moor_event_set(&c->e);
        break;
    case MISUSE_MUTEX_LOCK:
        (void)moor_mutex_lock(&c->m, -1);
        break;
    case MISUSE_SEM_RELEASE:
        moor_sem_release(&c->s);
        break;
    case MISUSE_COND_SIGNAL:
        moor_cond_signal(&c->c);
        break;
    case MISUSE_WAITGROUP_DONE:
        moor_waitgroup_done(&c->wg);
        break;
    case MISUSE_CHAN_SEND:
        (void)moor_chan_send(c->ch, &v, -1);
        break;
    case MISUSE_CHAN_TRY_RECV:
        (void)moor_chan_try_recv(c->ch, &v);
        break;
    case MISUSE_SCOPE_SPAWN:
        (void)moor_scope_spawn(&c->scope, nothing, NULL, NULL);
        break;
    case MISUSE_FD_WAIT: {
        moor_cx cx = {{own, NULL, 0}, NULL, NULL};
        (void)moor_future_poll(&c->io.base, &cx);
        break;
    }
    case NMISUSES:
        break;
    }
    return NULL; /* not reached: the call must have failed its assertion */
}

static void misuse_child(void *arg)
{
    misuse_ctx *c = arg;
    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    /* Each object is used once on this executor's thread: it belongs to it from then on. */
    c->e = (moor_event)MOOR_EVENT_INIT;
    CHILD_REQUIRE(moor_event_wait(&c->e, 0) == -ETIMEDOUT);
    c->m = (moor_mutex)MOOR_MUTEX_INIT;
    CHILD_REQUIRE(moor_mutex_trylock(&c->m) == 0);
    moor_mutex_unlock(&c->m);
    c->s = (moor_sem)MOOR_SEM_INIT(0);
    moor_sem_release(&c->s);
    c->c = (moor_cond)MOOR_COND_INIT;
    moor_cond_broadcast(&c->c);
    c->wg = (moor_waitgroup)MOOR_WAITGROUP_INIT;
    moor_waitgroup_add(&c->wg, 1);
    CHILD_REQUIRE(moor_chan_new(&c->ch, sizeof(int), 4) == 0);
    int v = 0;
    CHILD_REQUIRE(moor_chan_try_recv(c->ch, &v) == -EAGAIN);
    moor_scope_init(&c->scope);
    CHILD_REQUIRE(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, c->fds) == 0);
    moor_io_init(&c->io, c->fds[0], MOOR_READABLE, -1);
    moor_cx cx = {{ex, NULL, 0}, NULL, NULL};
    CHILD_REQUIRE(moor_future_poll(&c->io.base, &cx) == MOOR_PENDING);
    pthread_t th;
    CHILD_REQUIRE(pthread_create(&th, NULL, foreign_thread, c) == 0);
    CHILD_REQUIRE(pthread_join(th, NULL) == 0);
    fprintf(stderr, "%s from another thread was not caught\n", misuse_call[c->which]);
}

static void test_remote_objects_refuse_foreign_threads(void **state)
{
    (void)state;
    for (int has = 0; has <= 1; has++) {
        for (int i = 0; i < NMISUSES; i++) {
            misuse_ctx c = {.which = (enum misuse)i, .foreign_has_executor = has};
            child_report r;
            child_run(misuse_child, &c, &r);
            char expect[128];
            if (i == MISUSE_FD_WAIT)
                snprintf(expect, sizeof expect, "polled from another thread");
            else
                snprintf(expect, sizeof expect, "moor: %s: called from another thread",
                         misuse_call[i]);
            expect_child_signal(&r, SIGABRT, expect);
        }
    }
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_remote_spawn_burst_maps_few_stacks),
        TEST(test_remote_spawn_waits_for_memory),
        TEST(test_remote_wake_after_executor_freed),
        TEST(test_remote_objects_refuse_foreign_threads),
    };
    return RUN_TESTS(tests);
}
