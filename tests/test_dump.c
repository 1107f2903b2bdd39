/* Introspection: moor_dump's lines (states, what each wait is on with its argument, how long,
 * the stack and what of it is touched), the SIGQUIT dump of every executor in a forked
 * child, moor_stats' counts, and the description of a user's future kind. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moor.h"

#include "fixture.h"

/* ---- reading a dump ---------------------------------------------------------------------- */

static char dump_text[65536];

/* moor_dump into dump_text. */
static const char *dump_now(void)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&buf, &len);
    assert_non_null(out);
    moor_dump(out);
    fclose(out);
    snprintf(dump_text, sizeof dump_text, "%s", buf);
    free(buf);
    fputs(dump_text, stderr); /* in the test's log */
    return dump_text;
}

/* The line of `text` that names fiber `name` ("\"name\""), or "" (static buffer). */
static const char *fiber_line(const char *text, const char *name)
{
    static char line[512];
    char needle[64];
    snprintf(needle, sizeof needle, "\"%s\"", name);
    return line_with(text, needle, line, sizeof line);
}

#define expect_in(line, needle)                                                               \
    do {                                                                                      \
        if (!strstr((line), (needle)))                                                        \
            fail_msg("expected \"%s\" in the line: %s", (needle), (line));                    \
    } while (0)

/* The number after `key` in line ("for 12 ms" with key "for "), or -1. */
static long number_after(const char *line, const char *key)
{
    const char *p = strstr(line, key);
    return p ? strtol(p + strlen(key), NULL, 10) : -1;
}

/* ---- one of each wait -------------------------------------------------------------------- */

typedef struct zoo {
    moor_chan *rx_chan, *tx_chan, *sel_a, *sel_b;
    moor_mutex held, cond_mutex;
    moor_cond cond;
    moor_event event, gate;
    moor_scope scope;
    int listener;
    int sv[2];
    moor_promise *promise;
    moor_fiber *rx; /* joined by "joiner" */
    moor_fiber *gated; /* joined by the child of "closer"'s scope */
    moor_scope close_scope;
    moor_sleep_future task_sleep;
    char dump[65536];
} zoo;

static intptr_t z_rx(void *arg)
{
    zoo *z = arg;
    int v;
    return moor_chan_recv(z->rx_chan, &v, -1);
}

static intptr_t z_tx(void *arg)
{
    zoo *z = arg;
    int v = 1;
    return moor_chan_send(z->tx_chan, &v, -1);
}

static intptr_t z_sleeper(void *arg)
{
    (void)arg;
    return moor_sleep(moor_deadline_in(10000));
}

static intptr_t z_holder(void *arg)
{
    zoo *z = arg;
    FCHECK(moor_mutex_lock(&z->held, -1) == 0);
    int rc = moor_event_wait(&z->gate, -1);
    moor_mutex_unlock(&z->held);
    return rc;
}

static intptr_t z_locker(void *arg)
{
    zoo *z = arg;
    int rc = moor_mutex_lock(&z->held, -1);
    if (rc == 0)
        moor_mutex_unlock(&z->held);
    return rc;
}

static intptr_t z_condw(void *arg)
{
    zoo *z = arg;
    FCHECK(moor_mutex_lock(&z->cond_mutex, -1) == 0);
    int rc = moor_cond_wait(&z->cond, &z->cond_mutex, -1);
    moor_mutex_unlock(&z->cond_mutex);
    return rc;
}

static intptr_t z_evw(void *arg)
{
    zoo *z = arg;
    return moor_event_wait(&z->event, -1);
}

static intptr_t z_reader(void *arg)
{
    zoo *z = arg;
    char c;
    return moor_read(z->sv[0], &c, 1, -1);
}

static intptr_t z_acceptor(void *arg)
{
    zoo *z = arg;
    return moor_accept(z->listener, NULL, NULL, -1);
}

static intptr_t z_joiner(void *arg)
{
    zoo *z = arg;
    return moor_join(z->rx, NULL);
}

static intptr_t z_selector(void *arg)
{
    zoo *z = arg;
    int x, y;
    moor_chan_future a, b;
    moor_chan_recv_init(&a, z->sel_a, &x, -1);
    moor_chan_recv_init(&b, z->sel_b, &y, -1);
    moor_future *futs[2] = {&a.base, &b.base};
    return moor_select(futs, 2, -1);
}

static intptr_t z_child(void *arg)
{
    zoo *z = arg;
    return moor_event_wait(&z->gate, -1);
}

static intptr_t z_scoper(void *arg)
{
    zoo *z = arg;
    moor_scope_init(&z->scope);
    FCHECK(moor_scope_spawn(&z->scope, z_child, z, NULL) == 0);
    int rc = moor_scope_wait(&z->scope, -1);
    moor_scope_close(&z->scope, -1);
    return rc;
}

/* A child that does not stop when cancelled: it joins "gated" (a join is not cut short). */
static intptr_t z_stubborn(void *arg)
{
    zoo *z = arg;
    return moor_join(z->gated, NULL);
}

static intptr_t z_closer(void *arg)
{
    zoo *z = arg;
    moor_scope_init(&z->close_scope);
    FCHECK(moor_scope_spawn(&z->close_scope, z_stubborn, z, NULL) == 0);
    return moor_scope_close(&z->close_scope, -1);
}

static intptr_t z_signal(void *arg)
{
    (void)arg;
    return moor_signal_wait(SIGUSR2, -1);
}

static intptr_t z_blocker(void *arg)
{
    (void)arg;
    intptr_t r;
    return moor_blocking(slow_fn, (void *)(intptr_t)300, &r, -1);
}

static intptr_t z_promise(void *arg)
{
    zoo *z = arg;
    return moor_promise_await(z->promise, -1);
}

static intptr_t z_done(void *arg)
{
    (void)arg;
    return 0;
}

static intptr_t z_ready(void *arg)
{
    (void)arg;
    return 0;
}

/* Lets every other fiber reach its wait, then dumps (itself running, one fiber ready). */
static intptr_t z_dumper(void *arg)
{
    zoo *z = arg;
    for (int i = 0; i < 10; i++)
        moor_yield();
    moor_fiber *ready;
    moor_fiber_attr attr = {.name = "ready"};
    FCHECK(moor_spawn(&ready, z_ready, NULL, &attr) == 0);
    snprintf(z->dump, sizeof z->dump, "%s", dump_now());
    FCHECK(moor_join(ready, NULL) == 0);
    return 0;
}

typedef struct zoo_fiber {
    const char *name;
    moor_fiber_fn fn;
    moor_fiber *f;
} zoo_fiber;

static void test_dump_states_and_waits(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    static zoo z;
    memset(&z, 0, sizeof z);
    z.held = (moor_mutex)MOOR_MUTEX_INIT;
    z.cond_mutex = (moor_mutex)MOOR_MUTEX_INIT;
    z.cond = (moor_cond)MOOR_COND_INIT;
    z.event = (moor_event)MOOR_EVENT_INIT;
    z.gate = (moor_event)MOOR_EVENT_INIT;
    assert_int_equal(moor_chan_new(&z.rx_chan, sizeof(int), 0), 0);
    assert_int_equal(moor_chan_new(&z.tx_chan, sizeof(int), 0), 0);
    assert_int_equal(moor_chan_new(&z.sel_a, sizeof(int), 0), 0);
    assert_int_equal(moor_chan_new(&z.sel_b, sizeof(int), 0), 0);
    z.listener = moor_tcp_listen("127.0.0.1", 0, 4);
    assert_true(z.listener >= 0);
    stream_pair(z.sv);
    assert_int_equal(moor_promise_new(&z.promise, NULL), 0);
    moor_sleep_init(&z.task_sleep, moor_deadline_in(200));
    assert_int_equal(moor_spawn_future(&z.task_sleep.base), 0);

    zoo_fiber fibers[] = {
        {"rx", z_rx, NULL},         {"tx", z_tx, NULL},           {"sleeper", z_sleeper, NULL},
        {"holder", z_holder, NULL}, {"locker", z_locker, NULL},   {"condw", z_condw, NULL},
        {"evw", z_evw, NULL},       {"reader", z_reader, NULL},   {"acceptor", z_acceptor, NULL},
        {"joiner", z_joiner, NULL}, {"selector", z_selector, NULL}, {"scoper", z_scoper, NULL},
        {"sig", z_signal, NULL},    {"blocker", z_blocker, NULL}, {"promised", z_promise, NULL},
        {"gated", z_child, NULL},   {"closer", z_closer, NULL},
        {"done", z_done, NULL},     {"dumper", z_dumper, NULL},
    };
    size_t n = sizeof fibers / sizeof fibers[0];
    for (size_t i = 0; i < n; i++) {
        moor_fiber_attr attr = {.name = fibers[i].name};
        assert_int_equal(moor_spawn(&fibers[i].f, fibers[i].fn, &z, &attr), 0);
        if (i == 0)
            z.rx = fibers[0].f;
        if (strcmp(fibers[i].name, "gated") == 0)
            z.gated = fibers[i].f;
    }
    /* Run until the dumper has dumped (it returns then). */
    moor_fiber *dumper = fibers[n - 1].f;
    assert_int_equal(moor_join(dumper, NULL), 0);
    fibers[n - 1].f = NULL;
    const char *d = z.dump;
    char want[128];

    expect_in(d, "moor: executor ");
    expect_in(fiber_line(d, "dumper"), "running");
    expect_in(fiber_line(d, "ready"), "ready");
    expect_in(fiber_line(d, "done"), "done (not joined)");
    snprintf(want, sizeof want, "waiting on chan recv %p for ", (void *)z.rx_chan);
    expect_in(fiber_line(d, "rx"), want);
    snprintf(want, sizeof want, "waiting on chan send %p", (void *)z.tx_chan);
    expect_in(fiber_line(d, "tx"), want);
    expect_in(fiber_line(d, "sleeper"), "waiting on sleep ");
    long left = number_after(fiber_line(d, "sleeper"), "sleep ");
    assert_true(left > 0 && left <= 10000);
    expect_in(fiber_line(d, "sleeper"), " ms left for ");
    snprintf(want, sizeof want, "waiting on event %p", (void *)&z.gate);
    expect_in(fiber_line(d, "holder"), want);
    snprintf(want, sizeof want, "waiting on mutex %p", (void *)&z.held);
    expect_in(fiber_line(d, "locker"), want);
    snprintf(want, sizeof want, "waiting on cond %p", (void *)&z.cond);
    expect_in(fiber_line(d, "condw"), want);
    snprintf(want, sizeof want, "waiting on event %p", (void *)&z.event);
    expect_in(fiber_line(d, "evw"), want);
    snprintf(want, sizeof want, "waiting on read fd %d ", z.sv[0]);
    expect_in(fiber_line(d, "reader"), want);
    snprintf(want, sizeof want, "waiting on accept fd %d ", z.listener);
    expect_in(fiber_line(d, "acceptor"), want);
    snprintf(want, sizeof want, "waiting on join fiber %llu ",
             (unsigned long long)moor_fiber_id(z.rx));
    expect_in(fiber_line(d, "joiner"), want);
    expect_in(fiber_line(d, "selector"), "waiting on select (2) ");
    snprintf(want, sizeof want, "waiting on scope wait %p", (void *)&z.scope);
    expect_in(fiber_line(d, "scoper"), want);
    snprintf(want, sizeof want, "waiting on signal %d ", SIGUSR2);
    expect_in(fiber_line(d, "sig"), want);
    expect_in(fiber_line(d, "blocker"), "waiting on blocking call ");
    expect_in(fiber_line(d, "promised"), "waiting on promise ");
    snprintf(want, sizeof want, "waiting on scope close %p", (void *)&z.close_scope);
    expect_in(fiber_line(d, "closer"), want);
    snprintf(want, sizeof want, "\"fiber\" waiting on join fiber %llu ",
             (unsigned long long)moor_fiber_id(z.gated));
    expect_in(d, want);
    /* The scope's child is unnamed: "fiber", waiting on the gate. */
    snprintf(want, sizeof want, "\"fiber\" waiting on event %p", (void *)&z.gate);
    expect_in(d, want);
    /* The plain task: its future, and what it is. */
    snprintf(want, sizeof want, "task %p waiting on sleep ", (void *)&z.task_sleep.base);
    expect_in(d, want);
    /* Every fiber line has its stack: the executor's default, 256 KiB. */
    expect_in(fiber_line(d, "rx"), ", stack 256 KiB, touched ");
    assert_true(number_after(fiber_line(d, "rx"), "touched ") >= 4);

    /* Clean up: everything is cancelled, the gate opened, the promise resolved. */
    moor_event_set(&z.gate);
    for (size_t i = 0; i < n - 1; i++)
        moor_cancel(fibers[i].f);
    for (size_t i = 1; i < n - 1; i++) /* not rx nor gated: other fibers join them */
        if (fibers[i].f != z.gated)
            (void)moor_join(fibers[i].f, NULL);
    assert_int_equal(moor_promise_resolve(z.promise, 1), 0);
    assert_int_equal(moor_executor_run(ex), 0); /* the plain task's sleep */
    moor_chan_free(z.rx_chan);
    moor_chan_free(z.tx_chan);
    moor_chan_free(z.sel_a);
    moor_chan_free(z.sel_b);
    moor_close(z.listener);
    moor_close(z.sv[0]);
    close(z.sv[1]);
    ex_free(ex);
}

/* ---- time waited, and the stack touched ---------------------------------------------------- */

typedef struct deep {
    moor_event first, second;
} deep;

__attribute__((noinline)) static void touch_deep(size_t bytes)
{
    volatile char buf[512 * 1024];
    for (size_t i = 0; i < bytes && i < sizeof buf; i += 1024)
        buf[i] = (char)i;
    (void)buf[0];
}

static intptr_t deep_fiber(void *arg)
{
    deep *d = arg;
    FCHECK(moor_event_wait(&d->first, -1) == 0);
    touch_deep(512 * 1024);
    FCHECK(moor_event_wait(&d->second, -1) == 0);
    return 0;
}

static void run_for(int ms)
{
    moor_sleep_future s;
    moor_sleep_init(&s, moor_deadline_in(ms));
    assert_int_equal(moor_block_on(&s.base), 0);
}

static void test_dump_stack_touched_and_time_waited(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    deep d = {MOOR_EVENT_INIT, MOOR_EVENT_INIT};
    moor_fiber *f;
    /* A stack of a size nothing else uses: a fresh mapping, nothing touched before. */
    moor_fiber_attr attr = {.name = "deep", .stack_size = 1024 * 1024};
    assert_int_equal(moor_spawn(&f, deep_fiber, &d, &attr), 0);
    run_for(120);
    const char *line = fiber_line(dump_now(), "deep");
    expect_in(line, ", stack 1024 KiB, touched ");
    long before = number_after(line, "touched ");
    long waited = number_after(line, " for ");
    assert_true(before >= 4 && before < 256);
    assert_true(waited >= 100); /* a lower bound only */

    moor_event_set(&d.first);
    run_for(10);
    line = fiber_line(dump_now(), "deep");
    long after = number_after(line, "touched ");
    assert_true(after >= 512);
    assert_true(after <= 1024 + 4);
    assert_true(after > before);
    assert_true(number_after(line, " for ") < 10000);

    moor_event_set(&d.second);
    assert_int_equal(moor_join(f, NULL), 0);
    ex_free(ex);
}

/* No executor: nothing to say, and no crash. */
static void test_dump_without_executor(void **state)
{
    (void)state;
    assert_null(moor_executor_current());
    assert_string_equal(dump_now(), "");
    moor_executor_stats st = moor_stats();
    assert_int_equal(st.fibers, 0);
    assert_int_equal(st.switches, 0);
}

/* ---- a user's kind ---------------------------------------------------------------------------- */

typedef struct gate {
    moor_future base;
    int number;
    int open;
    moor_waker waker;
} gate;

static moor_poll gate_poll(moor_future *fut, moor_cx *cx)
{
    gate *g = moor_container_of(fut, gate, base);
    if (g->open) {
        fut->result = g->number;
        return MOOR_READY;
    }
    g->waker = cx->waker;
    return MOOR_PENDING;
}

static const moor_future_ops gate_ops = {"gate", gate_poll, NULL};
static const moor_future_ops plain_gate_ops = {"plain gate", gate_poll, NULL};

static int gate_describe(const moor_future *fut, char *buf, size_t size)
{
    const gate *g = moor_container_of(fut, gate, base);
    snprintf(buf, size, "gate %d", g->number);
    return 0;
}

static moor_future_kind gate_kind = {&gate_ops, gate_describe, NULL};

static intptr_t gate_fiber(void *arg)
{
    return moor_await(arg);
}

static void test_dump_user_kind(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_future_kind_register(&gate_kind);
    gate g1 = {.number = 5}, g2 = {.number = 6};
    moor_future_init(&g1.base, &gate_ops, 0);
    moor_future_init(&g2.base, &plain_gate_ops, 0);
    moor_fiber *f1, *f2;
    moor_fiber_attr a1 = {.name = "described"}, a2 = {.name = "labelled"};
    assert_int_equal(moor_spawn(&f1, gate_fiber, &g1.base, &a1), 0);
    assert_int_equal(moor_spawn(&f2, gate_fiber, &g2.base, &a2), 0);
    run_for(10);
    const char *d = dump_now();
    expect_in(fiber_line(d, "described"), "waiting on gate 5 for ");
    expect_in(fiber_line(d, "labelled"), "waiting on plain gate for "); /* no kind: the label */
    g1.open = g2.open = 1;
    moor_waker_wake(&g1.waker);
    moor_waker_wake(&g2.waker);
    intptr_t r;
    assert_int_equal(moor_join(f1, &r), 0);
    assert_int_equal(r, 5);
    assert_int_equal(moor_join(f2, &r), 0);
    assert_int_equal(r, 6);
    ex_free(ex);
}

/* ---- stats ------------------------------------------------------------------------------------ */

static intptr_t yielder(void *arg)
{
    for (int i = 0; i < (int)(intptr_t)arg; i++)
        moor_yield();
    return 0;
}

static intptr_t event_waiter(void *arg)
{
    return moor_event_wait(arg, -1);
}

/* Reads the executor's switch count around one yield to a partner that only yields back:
 * from inside a run of hand-offs, the count already includes them. */
static intptr_t switch_counter(void *arg)
{
    uint64_t *seen = arg;
    for (int i = 0; i < 3; i++) {
        uint64_t before = moor_stats().switches;
        moor_yield();
        seen[i] = moor_stats().switches - before;
    }
    return 0;
}

static void test_dump_stats_counts_hand_offs(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    uint64_t seen[3] = {0};
    moor_fiber *counter, *partner;
    assert_int_equal(moor_spawn(&counter, switch_counter, seen, NULL), 0);
    assert_int_equal(moor_spawn(&partner, yielder, (void *)(intptr_t)10, NULL), 0);
    assert_int_equal(moor_join(counter, NULL), 0);
    assert_int_equal(moor_join(partner, NULL), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(seen[i], 2); /* to the partner and back */
    moor_executor_free(ex);
}

/* 64 takes and puts back of a value: 128 operations that complete at once, one budget. */
static intptr_t budget_spender(void *arg)
{
    moor_chan *ch = arg;
    int v;
    for (int i = 0; i < 64; i++)
        if (moor_chan_recv(ch, &v, -1) != 0 || moor_chan_send(ch, &v, -1) != 0)
            return -1;
    return 0;
}

/* A fiber that spends its budget yields to the run loop (to look at events), not as a
 * hand-off: the switch count stays exact, the hand-offs it did not make uncounted. */
static void test_dump_stats_counts_budget_yields(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_chan *ch;
    int v = 1;
    assert_int_equal(moor_chan_new(&ch, sizeof v, 1), 0);
    assert_int_equal(moor_chan_try_send(ch, &v), 0);
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, budget_spender, ch, NULL), 0);
    intptr_t r = -2;
    assert_int_equal(moor_join(f, &r), 0);
    assert_int_equal(r, 0);
    /* Its first resume, and the one after its budget yield. */
    assert_int_equal(moor_stats().switches, 2);
    moor_chan_free(ch);
    ex_free(ex);
}

static void test_dump_stats_counts(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_executor_stats st = moor_stats();
    assert_int_equal(st.fibers_alive, 0);
    assert_int_equal(st.switches, 0);
    assert_int_equal(st.guard, moor_executor_guard(ex));
    assert_true(st.stacks_mapped >= 1); /* the executor warms its pool with one */
    assert_int_equal(st.stacks_pooled, st.stacks_mapped);

    moor_fiber *a, *b, *w;
    moor_event e = MOOR_EVENT_INIT;
    assert_int_equal(moor_spawn(&a, yielder, (void *)(intptr_t)100, NULL), 0);
    assert_int_equal(moor_spawn(&b, yielder, (void *)(intptr_t)100, NULL), 0);
    assert_int_equal(moor_spawn(&w, event_waiter, &e, NULL), 0);
    st = moor_stats();
    assert_int_equal(st.fibers_alive, 3);
    assert_int_equal(st.fibers, 3);
    assert_int_equal(st.stacks_mapped - st.stacks_pooled, 3);
    assert_int_equal(moor_join(a, NULL), 0);
    assert_int_equal(moor_join(b, NULL), 0);
    st = moor_stats();
    assert_int_equal(st.fibers_alive, 1);
    /* 101 resumes of each yielder (the first run and 100 yields), one of the waiter: exactly,
     * whether a resume came from the run loop or as a hand-off between fibers. */
    assert_int_equal(st.switches, 203);
    uint64_t wakeups = st.wakeups;
    moor_event_set(&e);
    st = moor_stats();
    assert_int_equal(st.wakeups, wakeups + 1);
    assert_int_equal(moor_join(w, NULL), 0);
    st = moor_stats();
    assert_int_equal(st.fibers_alive, 0);
    assert_int_equal(st.fibers, 0);
    assert_int_equal(st.stacks_pooled, st.stacks_mapped);
    ex_free(ex);
}

/* ---- SIGQUIT -------------------------------------------------------------------------------- */

typedef struct other_thread {
    moor_executor *ex;
    int up;                /* atomic */
    moor_event stop;
} other_thread;

static intptr_t other_waiter(void *arg)
{
    other_thread *o = arg;
    return moor_event_wait(&o->stop, -1);
}

static intptr_t other_stopper(void *arg)
{
    other_thread *o = arg;
    moor_event_set(&o->stop);
    return 0;
}

static void *other_main(void *arg)
{
    other_thread *o = arg;
    CHILD_REQUIRE(moor_executor_new(&o->ex, NULL) == 0);
    moor_fiber_attr attr = {.name = "elsewhere"};
    CHILD_REQUIRE(moor_spawn(NULL, other_waiter, o, &attr) == 0);
    moor_executor_hold(o->ex); /* the main thread will feed it a stopper */
    __atomic_store_n(&o->up, 1, __ATOMIC_SEQ_CST);
    CHILD_REQUIRE(moor_executor_run(o->ex) == 0);
    moor_executor_free(o->ex);
    return NULL;
}

static intptr_t quit_waiter(void *arg)
{
    int v;
    return moor_chan_recv(arg, &v, -1);
}

static void sigquit_child(void *arg)
{
    (void)arg;
    CHILD_REQUIRE(moor_dump_on_sigquit() == 0);
    /* Another thread's executor too, read while it runs: a race by design (best effort),
     * which TSan would rightly report; under TSan only this thread's executor is dumped. */
    static other_thread o;
    o.stop = (moor_event)MOOR_EVENT_INIT;
    pthread_t th;
    if (!UNDER_TSAN) {
        CHILD_REQUIRE(pthread_create(&th, NULL, other_main, &o) == 0);
        while (!__atomic_load_n(&o.up, __ATOMIC_SEQ_CST))
            sleep_ms(1);
        sleep_ms(50); /* its fiber reaches its wait */
    }

    moor_executor *ex;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_chan *ch;
    CHILD_REQUIRE(moor_chan_new(&ch, sizeof(int), 0) == 0);
    moor_fiber *f;
    moor_fiber_attr attr = {.name = "quitter"};
    CHILD_REQUIRE(moor_spawn(&f, quit_waiter, ch, &attr) == 0);
    run_for(10);
    CHILD_REQUIRE(raise(SIGQUIT) == 0);
    /* The process goes on: clean up both executors. */
    moor_cancel(f);
    CHILD_REQUIRE(moor_join(f, NULL) == -ECANCELED);
    moor_chan_free(ch);
    if (!UNDER_TSAN) {
        CHILD_REQUIRE(moor_spawn_remote(o.ex, other_stopper, &o) == 0);
        moor_executor_release(o.ex);
        CHILD_REQUIRE(pthread_join(th, NULL) == 0);
    }
    moor_executor_free(ex);
    fprintf(stderr, "child: done\n");
}

static void test_dump_sigquit_prints_every_executor(void **state)
{
    (void)state;
    child_report r;
    child_run(sigquit_child, NULL, &r);
    expect_child_ok(&r);
    if (!strstr(r.err, "moor: SIGQUIT") || !strstr(r.err, "\"quitter\" waiting on chan recv") ||
        (!UNDER_TSAN && !strstr(r.err, "\"elsewhere\" waiting on event")) ||
        !strstr(r.err, "child: done")) {
        child_describe(&r);
        fail_msg("the SIGQUIT dump is missing a line");
    }
    /* Two executors, two headers. */
    const char *p = strstr(r.err, "moor: executor ");
    assert_non_null(p);
    if (!UNDER_TSAN)
        assert_non_null(strstr(p + 1, "moor: executor "));
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_dump_states_and_waits),
        TEST(test_dump_stack_touched_and_time_waited),
        TEST(test_dump_without_executor),
        TEST(test_dump_user_kind),
        TEST(test_dump_stats_counts),
        TEST(test_dump_stats_counts_hand_offs),
        TEST(test_dump_stats_counts_budget_yields),
        TEST(test_dump_sigquit_prints_every_executor),
    };
    return RUN_TESTS(tests);
}
