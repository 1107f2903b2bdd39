/* Fairness: a task whose calls keep completing without waiting (a channel that is never
 * empty, a free mutex, an fd that always has data) spends a budget of such operations
 * (executor.h's MOOR__COOP_BUDGET, Tokio's 128); when it is spent, the next one yields first. A
 * busy fiber therefore cannot starve the others or the timers.
 *
 * Counted, not timed: a flood runs until a 10 ms sleeper has woken, with a generous cap on its
 * operations; without the budget the sleeper never wakes during the flood and the cap ends it.
 * Beside it a fiber counts its turns: it must get about one per budget spent. */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "moor.h"

#include "fixture.h"

/* White-box: the budget, MOOR__COOP_BUDGET, sets how many turns the counter must get. */
#include "fiber/executor.h"

/* A flood makes at least FLOOD_MIN operations and goes on until the sleeper has woken, up to
 * FLOOD_CAP (a flood that reaches it starved the timer). */
#define FLOOD_MIN 100000u
#define FLOOD_CAP 20000000u

enum flood_kind { FLOOD_CHAN, FLOOD_MUTEX, FLOOD_SEM, FLOOD_READ, FLOOD_WRITE };

typedef struct flood {
    enum flood_kind kind;
    moor_chan *ch;
    moor_mutex m;
    moor_sem sem;
    int fds[2];
    unsigned long ops;        /* operations the flood made */
    unsigned long ops_at_wake; /* ...when the sleeper woke */
    int flooding;             /* the flood is running */
    int slept;                /* the sleeper has woken */
    int woke_during_flood;
    unsigned long turns;      /* the counter's turns while the flood ran */
    int errors;
} flood;

static int flood_op(flood *f)
{
    int v = 1;
    char byte;
    switch (f->kind) {
    case FLOOD_CHAN: /* capacity 1: take the value and put it back, never waiting */
        return moor_chan_recv(f->ch, &v, -1) == 0 && moor_chan_send(f->ch, &v, -1) == 0;
    case FLOOD_MUTEX:
        if (moor_mutex_lock(&f->m, -1) != 0)
            return 0;
        moor_mutex_unlock(&f->m);
        return 1;
    case FLOOD_SEM:
        if (moor_sem_acquire(&f->sem, -1) != 0)
            return 0;
        moor_sem_release(&f->sem);
        return 1;
    case FLOOD_READ: /* one byte of a socket whose peer keeps it full (flood_refill) */
        return moor_read(f->fds[0], &byte, 1, -1) == 1;
    case FLOOD_WRITE: /* into a socket with room: the reader side is drained as we go */
        if (moor_write(f->fds[0], "x", 1, -1) != 1)
            return 0;
        return read(f->fds[1], &byte, 1) == 1;
    }
    return 0;
}

static intptr_t flooder(void *arg)
{
    flood *f = arg;
    f->flooding = 1;
    while ((!f->slept || f->ops < FLOOD_MIN) && f->ops < FLOOD_CAP) {
        if (!flood_op(f)) {
            f->errors++;
            break;
        }
        f->ops++;
        if (f->kind == FLOOD_READ && f->ops % 1024 == 0) {
            char buf[1024];
            memset(buf, 'y', sizeof buf);
            if (write(f->fds[1], buf, sizeof buf) != (ssize_t)sizeof buf)
                f->errors++;
        }
    }
    f->flooding = 0;
    return 0;
}

static intptr_t counter(void *arg)
{
    flood *f = arg;
    while (!f->flooding && !f->slept)
        moor_yield();
    while (f->flooding) {
        f->turns++;
        moor_yield();
    }
    return 0;
}

static intptr_t sleeper(void *arg)
{
    flood *f = arg;
    /* The 10 ms start once the flood runs: under valgrind starting the flooder alone can take
     * longer than that (the timer then fires before the flood it is meant to cut into). */
    while (!f->flooding)
        moor_yield();
    FCHECK(moor_sleep(moor_deadline_in(10)) == 0);
    f->woke_during_flood = f->flooding;
    f->ops_at_wake = f->ops;
    f->slept = 1;
    return 0;
}

static void run_flood(enum flood_kind kind)
{
    moor_executor *ex = ex_new();
    flood f;
    memset(&f, 0, sizeof f);
    f.kind = kind;
    f.m = (moor_mutex)MOOR_MUTEX_INIT;
    f.sem = (moor_sem)MOOR_SEM_INIT(1);
    int v = 7;
    assert_int_equal(moor_chan_new(&f.ch, sizeof v, 1), 0);
    assert_int_equal(moor_chan_try_send(f.ch, &v), 0);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, f.fds), 0);
    if (kind == FLOOD_READ) {
        char buf[4096];
        memset(buf, 'x', sizeof buf);
        for (int i = 0; i < 8; i++)
            assert_int_equal(write(f.fds[1], buf, sizeof buf), (ssize_t)sizeof buf);
    }
    moor_fiber *a, *b, *c;
    assert_int_equal(moor_spawn(&c, sleeper, &f, NULL), 0);
    assert_int_equal(moor_spawn(&b, counter, &f, NULL), 0);
    assert_int_equal(moor_spawn(&a, flooder, &f, NULL), 0);
    assert_int_equal(moor_join(a, NULL), 0);
    assert_int_equal(moor_join(b, NULL), 0);
    assert_int_equal(moor_join(c, NULL), 0);
    print_message("flood %d: %lu operations, %lu at the sleeper's wake, counter %lu turns\n",
                  (int)kind, f.ops, f.ops_at_wake, f.turns);
    assert_int_equal(f.errors, 0);
    assert_true(f.woke_during_flood); /* the timer fired while the flood ran */
    assert_true(f.ops < FLOOD_CAP);
    /* One turn for the counter per budget the flood spent, give or take one. */
    unsigned long per_op = kind == FLOOD_CHAN ? 2 : 1; /* locks and acquires count, not releases */
    assert_true(f.turns + 1 >= f.ops * per_op / MOOR__COOP_BUDGET);
    moor_chan_free(f.ch);
    close(f.fds[0]);
    close(f.fds[1]);
    ex_free(ex);
}

static void test_coop_channel_never_empty(void **state)
{
    (void)state;
    run_flood(FLOOD_CHAN);
}

static void test_coop_free_mutex(void **state)
{
    (void)state;
    run_flood(FLOOD_MUTEX);
}

static void test_coop_free_semaphore(void **state)
{
    (void)state;
    run_flood(FLOOD_SEM);
}

static void test_coop_socket_always_has_data(void **state)
{
    (void)state;
    run_flood(FLOOD_READ);
}

static void test_coop_socket_always_has_room(void **state)
{
    (void)state;
    run_flood(FLOOD_WRITE);
}

/* Plain code (no fiber) calling operations that never wait lets the executor's fibers run
 * once per budget spent. */
static intptr_t plain_counter(void *arg)
{
    unsigned long *turns = arg;
    for (;;) {
        ++*turns;
        moor_yield();
        if (moor_cancelled())
            return 0;
    }
}

static void test_coop_plain_code_lets_fibers_run(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch;
    int v = 1;
    assert_int_equal(moor_chan_new(&ch, sizeof v, 1), 0);
    assert_int_equal(moor_chan_try_send(ch, &v), 0);
    unsigned long turns = 0;
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, plain_counter, &turns, NULL), 0);
    const unsigned long rounds = 100000;
    for (unsigned long i = 0; i < rounds; i++) {
        assert_int_equal(moor_chan_recv(ch, &v, -1), 0);
        assert_int_equal(moor_chan_send(ch, &v, -1), 0);
    }
    assert_true(turns + 1 >= 2 * rounds / MOOR__COOP_BUDGET);
    moor_cancel(f);
    assert_int_equal(moor_join(f, NULL), -ECANCELED);
    moor_chan_free(ch);
    ex_free(ex);
}

/* An fd that becomes readable while a busy fiber runs is looked at soon: when the fiber spends
 * its budget, or 64 hand-offs pass, the run loop looks at events if it has not for
 * MOOR__EVENTS_LATENCY_NS. The busy fiber writes the fd's byte after its 100th step (ops), and
 * its reader records how many steps the busy one had made when it woke. */
typedef struct fd_wake {
    moor_chan *ch;
    int fds[2];
    unsigned long ops, ops_at_read;
    int read_done, errors;
} fd_wake;

#define FD_WAKE_AFTER 100u

/* One step of a busy fiber done; the fd's byte goes out after the FD_WAKE_AFTER-th. */
static void fd_wake_step(fd_wake *w)
{
    if (++w->ops == FD_WAKE_AFTER && write(w->fds[1], "r", 1) != 1)
        w->errors++;
}

static intptr_t fd_reader(void *arg)
{
    fd_wake *w = arg;
    char c;
    if (moor_read(w->fds[0], &c, 1, -1) != 1)
        w->errors++;
    w->ops_at_read = w->ops;
    w->read_done = 1;
    return 0;
}

/* A plain task that is always runnable until the reader has woken: its poll wakes it again. */
typedef struct spinning_future {
    moor_future base;
    fd_wake *w;
} spinning_future;

static moor_poll spinning_poll(moor_future *fut, moor_cx *cx)
{
    spinning_future *s = (spinning_future *)fut;
    if (s->w->read_done) {
        fut->result = 0;
        return MOOR_READY;
    }
    moor_waker_wake(&cx->waker);
    return MOOR_PENDING;
}

static moor_poll spinning_cancel(moor_future *fut)
{
    (void)fut;
    return MOOR_READY;
}

static const moor_future_ops spinning_ops = {"spinning", spinning_poll, spinning_cancel};

/* Run busy(w) beside the reader, and beside a spinning plain task if asked; returns the busy
 * fiber's steps between the write and the reader's wake. */
static unsigned long fd_wake_run(moor_fiber_fn busy, int with_plain_task)
{
    moor_executor *ex = ex_new();
    fd_wake w;
    memset(&w, 0, sizeof w);
    int v = 7;
    assert_int_equal(moor_chan_new(&w.ch, sizeof v, 1), 0);
    assert_int_equal(moor_chan_try_send(w.ch, &v), 0);
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, w.fds), 0);
    moor_fiber *r, *b;
    assert_int_equal(moor_spawn(&r, fd_reader, &w, NULL), 0);
    assert_int_equal(moor_spawn(&b, busy, &w, NULL), 0);
    spinning_future spin = {.w = &w};
    moor_future_init(&spin.base, &spinning_ops, 0);
    if (with_plain_task)
        assert_int_equal(moor_spawn_future(&spin.base), 0);
    assert_int_equal(moor_join(b, NULL), 0);
    assert_int_equal(moor_join(r, NULL), 0);
    if (with_plain_task) /* it finishes at its next poll, the reader having woken */
        assert_int_equal(moor_executor_run(ex), 0);
    assert_int_equal(w.errors, 0);
    assert_true(w.read_done && w.ops_at_read >= FD_WAKE_AFTER);
    moor_chan_free(w.ch);
    close(w.fds[0]);
    close(w.fds[1]);
    ex_free(ex);
    return w.ops_at_read - FD_WAKE_AFTER;
}

/* fd_wake_run, and the bound on the steps (`what`) the reader may wake after. */
static void fd_wake_expect(moor_fiber_fn busy, int with_plain_task, const char *what,
                           unsigned long bound)
{
    unsigned long steps = fd_wake_run(busy, with_plain_task);
    print_message("the reader woke %lu %s after the write\n", steps, what);
    assert_true(steps <= bound);
}

/* Work for `us` microseconds. */
static void spin_us(unsigned us)
{
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do
        clock_gettime(CLOCK_MONOTONIC, &t);
    while ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) < (long)us * 1000);
}

/* A flood of a channel that is never empty, 2 us of work per step (a take and a put back, and
 * a spin): the budget (128 operations, 64 steps) runs out every ~130 us, and each time the
 * run loop gets its turn and looks at events if 100 us have passed, so the reader wakes
 * within a few budgets. Were a budget yield a hand-off, the run loop would get its turn only
 * after 64 of them (4,096 steps); before the look, after 64 such turns (262,144 steps). */
static intptr_t chan_flooder(void *arg)
{
    fd_wake *w = arg;
    int v;
    while (!w->read_done && w->ops < FLOOD_CAP) {
        if (moor_chan_recv(w->ch, &v, -1) != 0 || moor_chan_send(w->ch, &v, -1) != 0) {
            w->errors++;
            break;
        }
        spin_us(2);
        fd_wake_step(w);
    }
    return 0;
}

static void test_coop_fd_seen_during_flood(void **state)
{
    (void)state;
    fd_wake_expect(chan_flooder, 0, "steps", 1024);
}

/* The same beside a plain task that is always runnable: the flood's budget yields go to the
 * run loop, which then polls the plain task, and the look at events must not wait for a
 * hand-off to be refused (a plain task at the head of the queue refuses none): about 2,000
 * steps when it did. */
static void test_coop_fd_seen_during_flood_beside_a_plain_task(void **state)
{
    (void)state;
    fd_wake_expect(chan_flooder, 1, "steps", 1024);
}

/* A fiber that keeps yielding, with 20 us of work between its yields and nothing else to run:
 * every 64 of its hand-offs (to itself) the run loop gets its turn and, 1.3 ms having passed,
 * looks at events. Without the look it did once per 64 turns: after up to 4,096 yields. */
static intptr_t yield_spinner(void *arg)
{
    fd_wake *w = arg;
    while (!w->read_done && w->ops < 20000) {
        spin_us(20);
        moor_yield();
        fd_wake_step(w);
    }
    return 0;
}

static void test_coop_fd_seen_between_yields(void **state)
{
    (void)state;
    fd_wake_expect(yield_spinner, 0, "yields", 200);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_coop_channel_never_empty),
        TEST(test_coop_free_mutex),
        TEST(test_coop_free_semaphore),
        TEST(test_coop_socket_always_has_data),
        TEST(test_coop_socket_always_has_room),
        TEST(test_coop_plain_code_lets_fibers_run),
        TEST(test_coop_fd_seen_during_flood),
        TEST(test_coop_fd_seen_during_flood_beside_a_plain_task),
        TEST(test_coop_fd_seen_between_yields),
    };
    return RUN_TESTS(tests);
}
