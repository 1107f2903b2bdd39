/* Randomised stress: seeded random mixes of spawn (nested), yield, sleep, channel
 * send/recv/close (buffered and unbuffered, with and without deadlines), select, cancel,
 * scopes, promises (resolved by a fiber, at once, or from another thread) and fd I/O over
 * socketpairs and pipes, across thousands of fibers per round; every result is checked against
 * a model of what must happen:
 *
 *  - every value sent is received exactly once, or its send reported a failure and it is
 *    never received; values a channel still holds at the end are drained and counted;
 *  - on a channel with one receiver (its sink, then the final drain) each sender's values
 *    arrive in the order they were sent;
 *  - -ETIMEDOUT comes no earlier than its deadline, -ECANCELED only in a cancelled fiber, a
 *    cancelled fiber's waits return -ECANCELED unless their result was there, -EPIPE only from
 *    a closed channel (and to a receiver only once its buffer is drained); a select completes
 *    at most one channel operation;
 *  - bytes written to a socketpair or pipe are read back identically; a read under a
 *    moor_close fails with -EBADF;
 *  - every promise value is received by its awaiter or dropped, exactly once;
 *  - every fiber joined returns its own value and -ECANCELED exactly when it was cancelled
 *    before it returned; and at the end of a round the executor holds no task, fiber or timer.
 *
 * The seed comes from MOOR_STRESS_SEED (e.g. MOOR_STRESS_SEED=0x1234) or from the clock, and
 * is printed first and again with any divergence; MOOR_STRESS_MS bounds the run, which repeats
 * rounds until then (at least one). Same seed, same decisions as far as the run is
 * deterministic: each fiber draws from its own generator, seeded from the round's seed and
 * its id, so its choices do not depend on how others interleave; but what a call returns may
 * depend on time (deadlines, sleeps), and the resolver thread runs on its own, so a replay
 * repeats the sequence of decisions, not necessarily every interleaving.
 *
 * A failure prints the seed, the round and what diverged, and fails the test. A round that
 * hangs is ended by a watchdog (MOOR_TEST_WATCHDOG seconds, default 120) that prints the seed.
 * To narrow a failure down, MOOR_STRESS_SKIP=io_stream,cancel leaves those ops out (the other
 * decisions change with it).
 *
 * A round: a few channels (unbuffered and buffered; some "ordered", received only by their
 * sink fiber), hundreds to a couple of thousand top-level workers, each running a random
 * sequence of steps whose mix the round draws, nesting workers of their own (joined, or in
 * scopes) up to the round's cap of fibers; a resolver thread for remote promises; and a
 * closer that closes every channel once the workers are done or stuck on one another.
 *
 * What it found is fixed, each with a reduced test in the module's own file (a select's
 * loser taking a promise's value: test_promise_select_loser_keeps_no_value).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "moor.h"

#include "fixture.h"

/* ---- the generator --------------------------------------------------------------------------- */

/* splitmix64: every seed, 0 included, gives a good sequence. */
static uint64_t next64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

/* Uniform enough below n (n > 0). */
static uint32_t below(uint64_t *s, uint32_t n)
{
    return (uint32_t)(next64(s) % n);
}

static uint64_t mix64(uint64_t x)
{
    return next64(&x);
}

/* ---- the model's state for one round --------------------------------------------------------- */

#define MAX_CHANS 12
#define MAX_LOCAL_CHILDREN 8
#define MAX_SCOPE_CHILDREN 4
#define STACK_SIZE (64 * 1024)
#define PROMISE_BASE ((intptr_t)1 << 20) /* promise values, far from any -errno */
#define IO_CHUNK 2048

/* One message: its id indexes the round's value records; check guards against corruption. */
typedef struct msg {
    uint32_t id;
    uint32_t sender;
    uint32_t seq; /* the sender's count of messages made, from 1 */
    uint32_t check;
} msg;

static uint32_t msg_check(uint32_t id, uint32_t sender, uint32_t seq)
{
    return (uint32_t)mix64(((uint64_t)id << 32) ^ ((uint64_t)sender << 16) ^ seq);
}

enum { V_PENDING, V_SENT, V_FAILED };

typedef struct value_rec {
    uint8_t send;     /* V_PENDING until its send returned */
    uint8_t received; /* times it was received: 0 or 1 */
    uint8_t chan;     /* the channel it was sent on */
} value_rec;

typedef struct chan_model {
    moor_chan *ch;
    size_t cap;
    int ordered;        /* received only by its sink, then by the final drain */
    int closed;         /* set just before moor_chan_close */
    uint32_t *last_seq; /* ordered: per sender, the seq last received (0: none) */
    int64_t close_at;   /* a worker may close it from then on (the closer does at the end) */
} chan_model;

/* Every fiber the round makes has a record here, indexed by its id; the array is made for
 * the round's cap and never moves. */
enum { W_WORKER, W_SCOPED, W_SINK, W_HELPER };

typedef struct worker {
    uint32_t id;
    int kind;
    int depth;
    uint64_t rng;
    moor_fiber *f;     /* W_WORKER and W_SINK: the handle until it is joined, then NULL */
    int returned;      /* its function has returned */
    int cancelled;     /* moor_cancel was called on it before it returned */
    int deadline_join; /* its joiner uses moor_join_deadline, which may cancel it */
    int scope_closing; /* W_SCOPED: its scope is being closed, which cancels it */
    int steps;         /* steps done */
    uint32_t seq;      /* messages made */
    int chan;          /* W_SINK: its channel */
    size_t home;       /* the channel it sends on most */
    int op;            /* the op it is in (for the watchdog's report) */
    int reaping;       /* its steps are done: it joins its children */
    intptr_t result;   /* what it returned */
} worker;

/* The promises of a round: the resolver thread's drop touches `dropped`. */
typedef struct promise_rec {
    int received; /* the awaiter got the value */
    int dropped;  /* atomic: the drop function got it */
} promise_rec;

enum {
    OP_YIELD,
    OP_SLEEP,
    OP_SEND,
    OP_RECV,
    OP_TRY,
    OP_SELECT,
    OP_CLOSE,
    OP_CANCEL,
    OP_SPAWN,
    OP_JOIN,
    OP_SCOPE,
    OP_PROMISE,
    OP_IO_LOOP,
    OP_IO_STREAM,
    OP_IO_CLOSE,
    OP_COUNT
};

static const char *const op_names[OP_COUNT] = {
    "yield", "sleep", "send", "recv", "try", "select", "close", "cancel",
    "spawn", "join", "scope", "promise", "io_loop", "io_stream", "io_close",
};

/* Remote resolves: a queue the resolver thread serves in order, each at its time. */
#define REMOTE_CAP 4096
typedef struct remote_job {
    moor_promise *p;
    intptr_t value;
    int64_t at; /* moor_now() at which to resolve */
} remote_job;

typedef struct remote {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    remote_job jobs[REMOTE_CAP];
    size_t head, count;
    int stop;
} remote;

typedef struct limits {
    uint32_t max_fibers; /* per round, every kind */
    uint32_t top_min, top_span;
    uint32_t steps_max;
    int max_depth;
    uint32_t io_max;     /* bytes of one streamed transfer, at most */
} limits;

typedef struct round_state {
    uint64_t seed;
    unsigned no;
    limits lim;
    moor_executor *ex;
    chan_model chans[MAX_CHANS];
    size_t nchans;
    size_t nunordered;     /* channels anyone may receive from */
    worker *w;
    uint32_t nw;
    value_rec *v;
    uint32_t nv, capv;
    promise_rec *p;
    uint32_t np, capp;
    moor_waitgroup wg;     /* workers that have not finished their steps */
    uint64_t steps_done;   /* steps the workers have ended */
    int closer_done;       /* the closer has closed every channel */
    int helpers[3];        /* helper fibers running: resolvers, stream readers, close waiters */
    unsigned cancel_permille; /* chance that a cancel op cancels */
    unsigned weight[OP_COUNT];
    unsigned total_weight;
    remote rem;
    /* tallies, for the summary and the model */
    uint64_t sent_ok, send_failed, received, cancels, ops[OP_COUNT];
    uint64_t send_errors[5]; /* failed sends by send_error_index */
} round_state;

static round_state R;
static uint64_t run_seed;
static int failures; /* atomic: divergences seen in the run */

/* Print what diverged, with the seed and the round (the first 20 only), and record it. */
__attribute__((format(printf, 4, 5))) static void diverged_at(const worker *w, int line,
                                                               const char *cond,
                                                               const char *fmt, ...)
{
    int n = __atomic_add_fetch(&failures, 1, __ATOMIC_SEQ_CST);
    if (n > 20)
        return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr,
            "stress: DIVERGED (seed 0x%016" PRIx64 ", round %u, fiber %ld, line %d%s%s): %s\n"
            "stress: replay with MOOR_STRESS_SEED=0x%016" PRIx64 "\n",
            run_seed, R.no, w ? (long)w->id : -1L, line, cond ? ": " : "", cond ? cond : "",
            buf, run_seed);
}

#define diverged(w, ...) diverged_at(w, __LINE__, NULL, __VA_ARGS__)

/* Check cond; if it fails, say so with the format's message. */
#define EXPECT(w, cond, ...)                                                                  \
    do {                                                                                      \
        if (!(cond))                                                                          \
            diverged_at(w, __LINE__, #cond, __VA_ARGS__);                                     \
    } while (0)

/* ---- checks shared by every call ------------------------------------------------------------- */

/* Whether anything may have cancelled w: a moor_cancel before it returned, its joiner's
 * moor_join_deadline, or the close of its scope. Helpers are never cancelled. */
static int may_be_cancelled(const worker *w)
{
    return w->cancelled || w->deadline_join || w->scope_closing;
}

/* What every call that waits may return besides its own results: -ETIMEDOUT no earlier than
 * the deadline, -ECANCELED only in a cancelled fiber. Returns 1 if rc was one of those. */
static int check_wait_error(worker *w, long rc, int64_t deadline, const char *what)
{
    if (rc == -ETIMEDOUT) {
        int64_t now = moor_now();
        EXPECT(w, deadline >= 0 && now >= deadline,
               "%s: -ETIMEDOUT at %" PRId64 " before its deadline %" PRId64, what, now, deadline);
        return 1;
    }
    if (rc == -ECANCELED) {
        EXPECT(w, moor_cancelled(), "%s: -ECANCELED in a fiber that is not cancelled", what);
        return 1;
    }
    return 0;
}

/* A deadline for a call: none, passed already, or a few ms away. */
static int64_t pick_deadline(worker *w)
{
    switch (below(&w->rng, 4)) {
    case 0:
        return -1;
    case 1:
        return moor_now() - 1;
    default:
        return moor_deadline_in(below(&w->rng, 4));
    }
}

/* ---- values on channels ---------------------------------------------------------------------- */

static msg new_msg(worker *w, size_t chan)
{
    if (R.nv == R.capv) {
        R.capv = R.capv ? R.capv * 2 : 4096;
        R.v = realloc(R.v, R.capv * sizeof *R.v);
        if (!R.v) {
            fprintf(stderr, "stress: out of memory for the value records\n");
            abort();
        }
    }
    uint32_t id = R.nv++;
    R.v[id] = (value_rec){.send = V_PENDING, .chan = (uint8_t)chan};
    msg m = {.id = id, .sender = w->id, .seq = ++w->seq};
    m.check = msg_check(m.id, m.sender, m.seq);
    return m;
}

/* Failed sends by cause, for the summary: closed, timed out, cancelled, would block, other. */
static int send_error_index(int rc)
{
    return rc == -EPIPE ? 0 : rc == -ETIMEDOUT ? 1 : rc == -ECANCELED ? 2 : rc == -EAGAIN ? 3 : 4;
}

/* The send of m on chan c returned rc (try: from moor_chan_try_send). */
static void sent(worker *w, const chan_model *c, const msg *m, int rc, int64_t deadline,
                 int was_closed, int try)
{
    value_rec *v = &R.v[m->id];
    EXPECT(w, v->send == V_PENDING, "value %u: its send reported twice", m->id);
    if (rc == 0) {
        EXPECT(w, !was_closed, "value %u: sent on a channel closed before the send", m->id);
        v->send = V_SENT;
        R.sent_ok++;
        return;
    }
    v->send = V_FAILED;
    R.send_failed++;
    R.send_errors[send_error_index(rc)]++;
    EXPECT(w, !v->received, "value %u: received, but its send reported %d", m->id, rc);
    if (rc == -EPIPE)
        EXPECT(w, c->closed, "value %u: -EPIPE from a channel that is open", m->id);
    else if (try)
        EXPECT(w, rc == -EAGAIN, "value %u: try_send returned %d", m->id, rc);
    else
        EXPECT(w, check_wait_error(w, rc, deadline, "send"), "value %u: send returned %d",
               m->id, rc);
    if (was_closed)
        EXPECT(w, rc == -EPIPE, "value %u: send on a closed channel returned %d", m->id, rc);
}

/* m came out of chan c (w NULL: the final drain). */
static void got(worker *w, chan_model *c, const msg *m)
{
    size_t ci = (size_t)(c - R.chans);
    if (m->id >= R.nv || m->check != msg_check(m->id, m->sender, m->seq)) {
        diverged(w, "chan %zu: received a corrupt message (id %u sender %u seq %u)", ci, m->id,
                 m->sender, m->seq);
        return;
    }
    value_rec *v = &R.v[m->id];
    R.received++;
    EXPECT(w, v->chan == ci, "value %u: sent on chan %u, received from chan %zu", m->id, v->chan,
           ci);
    EXPECT(w, !v->received, "value %u: received twice", m->id);
    EXPECT(w, v->send != V_FAILED, "value %u: received, but its send had reported failure",
           m->id);
    v->received = 1;
    if (c->ordered) {
        EXPECT(w, m->seq > c->last_seq[m->sender],
               "chan %zu: sender %u's message %u arrived after its message %u", ci, m->sender,
               m->seq, c->last_seq[m->sender]);
        c->last_seq[m->sender] = m->seq;
    }
}

/* A receive from c returned rc (try: from moor_chan_try_recv) without a value. */
static void recv_failed(worker *w, const chan_model *c, int rc, int64_t deadline, int try)
{
    if (rc == -EPIPE) {
        EXPECT(w, c->closed, "recv: -EPIPE from a channel that is open");
        EXPECT(w, moor_chan_len(c->ch) == 0, "recv: -EPIPE with %zu values still buffered",
               moor_chan_len(c->ch));
    } else if (try) {
        EXPECT(w, rc == -EAGAIN, "try_recv returned %d", rc);
    } else {
        EXPECT(w, check_wait_error(w, rc, deadline, "recv"), "recv returned %d", rc);
    }
}

/* Half the time the worker's own channel, so that a sender's values queue up behind each
 * other on one channel, which is what the order check needs. */
static size_t pick_chan(worker *w)
{
    if (below(&w->rng, 2))
        return w->home;
    return below(&w->rng, (uint32_t)R.nchans);
}

/* A channel anyone may receive from: the unordered ones come first. */
static size_t pick_recv_chan(worker *w)
{
    return below(&w->rng, (uint32_t)R.nunordered);
}

static void op_send(worker *w)
{
    size_t ci = pick_chan(w);
    chan_model *c = &R.chans[ci];
    msg m = new_msg(w, ci);
    int64_t deadline = pick_deadline(w);
    int was_closed = c->closed;
    int rc;
    if (below(&w->rng, 2)) {
        rc = moor_chan_send(c->ch, &m, deadline);
    } else {
        moor_chan_future op;
        moor_chan_send_init(&op, c->ch, &m, deadline);
        rc = (int)moor_await(&op.base);
    }
    sent(w, c, &m, rc, deadline, was_closed, 0);
}

static void op_recv(worker *w)
{
    chan_model *c = &R.chans[pick_recv_chan(w)];
    int64_t deadline = pick_deadline(w);
    msg m;
    int rc;
    if (below(&w->rng, 2)) {
        rc = moor_chan_recv(c->ch, &m, deadline);
    } else {
        moor_chan_future op;
        moor_chan_recv_init(&op, c->ch, &m, deadline);
        rc = (int)moor_await(&op.base);
    }
    if (rc == 0)
        got(w, c, &m);
    else
        recv_failed(w, c, rc, deadline, 0);
}

static void op_try(worker *w)
{
    if (below(&w->rng, 2)) {
        size_t ci = pick_chan(w);
        chan_model *c = &R.chans[ci];
        msg m = new_msg(w, ci);
        int was_closed = c->closed;
        sent(w, c, &m, moor_chan_try_send(c->ch, &m), -1, was_closed, 1);
    } else {
        chan_model *c = &R.chans[pick_recv_chan(w)];
        msg m;
        int rc = moor_chan_try_recv(c->ch, &m);
        if (rc == 0)
            got(w, c, &m);
        else
            recv_failed(w, c, rc, -1, 1);
    }
}

/* A select over 2 to 4 channel operations (sends anywhere, receives from unordered channels;
 * one channel may appear twice, both ways), each with or without a deadline of its own, and
 * perhaps a sleep as a timeout, under a deadline of the select's own. */
static void op_select(worker *w)
{
    enum { MAXOPS = 4 };
    moor_chan_future ops[MAXOPS];
    msg out[MAXOPS], in[MAXOPS];
    size_t chan[MAXOPS];
    int is_send[MAXOPS], was_closed[MAXOPS];
    int64_t op_deadline[MAXOPS];
    moor_future *futs[MAXOPS + 1];
    size_t n = 2 + below(&w->rng, MAXOPS - 1);
    for (size_t i = 0; i < n; i++) {
        is_send[i] = (int)below(&w->rng, 2);
        chan[i] = is_send[i] ? pick_chan(w) : pick_recv_chan(w);
        op_deadline[i] = below(&w->rng, 3) ? -1 : pick_deadline(w);
        was_closed[i] = R.chans[chan[i]].closed;
        if (is_send[i]) {
            out[i] = new_msg(w, chan[i]);
            moor_chan_send_init(&ops[i], R.chans[chan[i]].ch, &out[i], op_deadline[i]);
        } else {
            moor_chan_recv_init(&ops[i], R.chans[chan[i]].ch, &in[i], op_deadline[i]);
        }
        futs[i] = &ops[i].base;
    }
    moor_sleep_future timeout;
    size_t nfuts = n;
    int64_t timeout_at = -1;
    if (below(&w->rng, 2)) {
        timeout_at = moor_deadline_in(below(&w->rng, 4));
        moor_sleep_init(&timeout, timeout_at);
        futs[nfuts++] = &timeout.base;
    }
    int64_t deadline = pick_deadline(w);
    int rc = moor_select(futs, nfuts, deadline);

    if (rc < 0)
        EXPECT(w, check_wait_error(w, rc, deadline, "select"), "select returned %d", rc);
    else
        EXPECT(w, (size_t)rc < nfuts && moor_future_done(futs[rc]),
               "select returned %d, not a done future of its %zu", rc, nfuts);
    if (rc >= 0 && (size_t)rc == n)
        EXPECT(w, moor_now() >= timeout_at, "select: its sleep won before its deadline");

    /* Every operation that is done counts, the winner's and any other's; at most one may
     * have moved a value, and only the winner. */
    int moved = 0;
    for (size_t i = 0; i < n; i++) {
        chan_model *c = &R.chans[chan[i]];
        int done = moor_future_done(&ops[i].base);
        int r = done ? (int)ops[i].base.result : -ECANCELED;
        /* A loser may be left done, but only with an output that took nothing (its own
         * deadline, a close): it was ready when another had claimed the select. */
        if (done && r == 0) {
            EXPECT(w, (size_t)rc == i, "select: operation %zu moved a value but %d won", i, rc);
            moved++;
        }
        if (is_send[i]) {
            if (!done) {
                R.v[out[i].id].send = V_FAILED;
                R.send_failed++;
                R.send_errors[4]++;
                EXPECT(w, !R.v[out[i].id].received,
                       "value %u: received, but its send in a select was cancelled", out[i].id);
            } else {
                /* A done send's own deadline or the channel's close are its only errors. */
                EXPECT(w, r == 0 || r == -EPIPE || r == -ETIMEDOUT, "select send output %d", r);
                sent(w, c, &out[i], r, op_deadline[i], was_closed[i], 0);
            }
        } else if (done) {
            EXPECT(w, r == 0 || r == -EPIPE || r == -ETIMEDOUT, "select recv output %d", r);
            if (r == 0)
                got(w, c, &in[i]);
            else
                recv_failed(w, c, r, op_deadline[i], 0);
        }
    }
    EXPECT(w, moved <= 1, "select: %d channel operations completed", moved);
}

static void op_sleep(worker *w)
{
    int64_t deadline = moor_deadline_in(below(&w->rng, 4));
    int rc = moor_sleep(deadline);
    if (rc == 0)
        EXPECT(w, moor_now() >= deadline, "sleep returned before its deadline");
    else
        EXPECT(w, rc == -ECANCELED && moor_cancelled(), "sleep returned %d", rc);
}

/* Close a channel, once its time has come: thousands of workers would otherwise close every
 * channel in the round's first millisecond. */
static void op_close(worker *w)
{
    chan_model *c = &R.chans[pick_chan(w)];
    if (c->closed || moor_now() < c->close_at)
        return;
    c->closed = 1;
    moor_chan_close(c->ch);
}

/* Cancel a fiber of the round that has a handle: a worker (maybe w itself) or a sink. */
static void op_cancel(worker *w)
{
    if (below(&w->rng, 1000) >= R.cancel_permille)
        return;
    for (int tries = 0; tries < 4; tries++) {
        worker *t = &R.w[below(&w->rng, R.nw)];
        if ((t->kind != W_WORKER && t->kind != W_SINK) || !t->f)
            continue;
        if (t->kind == W_SINK && below(&w->rng, 8)) /* a cancelled sink ends its channel's order */
            continue;
        if (!t->returned)
            t->cancelled = 1;
        R.cancels++;
        moor_cancel(t->f);
        return;
    }
}

/* ---- fibers that fibers make ----------------------------------------------------------------- */

static intptr_t worker_fn(void *arg);

static worker *new_worker(worker *parent, int kind, uint64_t salt)
{
    if (R.nw >= R.lim.max_fibers)
        return NULL;
    worker *c = &R.w[R.nw];
    *c = (worker){.id = R.nw, .kind = kind, .depth = parent ? parent->depth + 1 : 0};
    c->rng = mix64(R.seed ^ mix64(c->id) ^ salt);
    c->home = below(&c->rng, (uint32_t)R.nchans);
    R.nw++;
    return c;
}

static const moor_fiber_attr fiber_attr = {.name = "stress", .stack_size = STACK_SIZE};

/* What a worker returns: its id and steps, so that a joiner can tell it got this fiber's. */
static intptr_t expected_result(const worker *w)
{
    return (intptr_t)(((uint64_t)w->id << 20) ^ (uint64_t)w->steps);
}

/* Join a worker or sink spawned with a handle, and check what the join says. */
static void join_checked(worker *w, worker *c, int with_deadline)
{
    intptr_t result = -1;
    int rc;
    int64_t deadline = -1;
    if (with_deadline) {
        deadline = pick_deadline(w);
        c->deadline_join = 1;
        rc = moor_join_deadline(c->f, &result, deadline);
    } else {
        if (w && below(&w->rng, 3) == 0) {
            /* Wait for it through its future, against a sleep: a sleep that wins lets go of
             * the wait, not of the fiber; one way or the other the join below reaps it. */
            moor_future *done = moor_fiber_future(c->f);
            moor_sleep_future sf;
            int64_t timeout_at = moor_deadline_in(below(&w->rng, 4));
            moor_sleep_init(&sf, timeout_at);
            moor_future *futs[2] = {done, &sf.base};
            int src = moor_select(futs, 2, -1);
            if (src == 0)
                EXPECT(w, c->returned && done->result == c->result,
                       "the future of fiber %u: done with %ld (returned %d, with %ld)", c->id,
                       (long)done->result, c->returned, (long)c->result);
            else if (src == 1)
                EXPECT(w, moor_now() >= timeout_at, "select over a fiber: the sleep won early");
            else
                EXPECT(w, src == -ECANCELED && moor_cancelled(),
                       "select over a fiber returned %d", src);
        }
        rc = moor_join(c->f, &result);
    }
    c->f = NULL;
    EXPECT(w, c->returned, "join of fiber %u returned before the fiber did", c->id);
    EXPECT(w, result == c->result, "join of fiber %u: result %ld, the fiber returned %ld",
           c->id, (long)result, (long)c->result);
    if (c->kind == W_WORKER || c->kind == W_SCOPED)
        EXPECT(w, c->result == expected_result(c), "fiber %u returned %ld, expected %ld", c->id,
               (long)c->result, (long)expected_result(c));
    if (!with_deadline) {
        EXPECT(w, rc == (c->cancelled ? -ECANCELED : 0),
               "join of fiber %u returned %d (cancelled before it returned: %d)", c->id, rc,
               c->cancelled);
    } else if (rc == 0) {
        EXPECT(w, !c->cancelled, "join_deadline of cancelled fiber %u returned 0", c->id);
    } else if (rc == -ECANCELED) {
        EXPECT(w, c->cancelled || (w && moor_cancelled()),
               "join_deadline of fiber %u: -ECANCELED, but nobody cancelled it", c->id);
    } else {
        EXPECT(w, rc == -ETIMEDOUT && deadline >= 0 && moor_now() >= deadline,
               "join_deadline of fiber %u returned %d (deadline %" PRId64 ")", c->id, rc,
               deadline);
    }
}

static void op_spawn(worker *w, worker **children, int *nchildren)
{
    if (*nchildren >= MAX_LOCAL_CHILDREN || w->depth >= R.lim.max_depth)
        return;
    worker *c = new_worker(w, W_WORKER, next64(&w->rng));
    if (!c)
        return;
    moor_waitgroup_add(&R.wg, 1);
    int rc = moor_spawn(&c->f, worker_fn, c, &fiber_attr);
    EXPECT(w, rc == 0, "spawn: %d", rc);
    if (rc != 0) {
        moor_waitgroup_done(&R.wg);
        c->kind = W_HELPER; /* never started: nothing may cancel or join it */
        return;
    }
    children[(*nchildren)++] = c;
}

static void op_join(worker *w, worker **children, int *nchildren)
{
    if (!*nchildren)
        return;
    int i = (int)below(&w->rng, (uint32_t)*nchildren);
    join_checked(w, children[i], below(&w->rng, 3) == 0);
    children[i] = children[--*nchildren];
}

/* Open a scope, spawn a few workers into it, maybe let them run, and close it: at once, after
 * a bounded wait, or with a deadline (children still running then are let go and reaped by
 * the executor when they return). */
static void op_scope(worker *w)
{
    if (w->depth >= R.lim.max_depth)
        return;
    moor_scope scope;
    moor_scope_init(&scope);
    worker *kids[MAX_SCOPE_CHILDREN];
    int nkids = 0;
    int want = 1 + (int)below(&w->rng, MAX_SCOPE_CHILDREN);
    for (int i = 0; i < want; i++) {
        worker *c = new_worker(w, W_SCOPED, next64(&w->rng));
        if (!c)
            break;
        moor_waitgroup_add(&R.wg, 1);
        int rc = moor_scope_spawn(&scope, worker_fn, c, &fiber_attr);
        EXPECT(w, rc == 0, "scope_spawn: %d", rc);
        if (rc != 0) {
            moor_waitgroup_done(&R.wg);
            c->kind = W_HELPER;
            break;
        }
        kids[nkids++] = c;
    }
    switch (below(&w->rng, 4)) {
    case 0:
        break;
    case 1:
        moor_yield();
        break;
    default: {
        int64_t deadline = pick_deadline(w);
        int rc = moor_scope_wait(&scope, deadline);
        if (rc == 0)
            EXPECT(w, scope.count == 0, "scope_wait: 0 with %zu children running", scope.count);
        else
            EXPECT(w, check_wait_error(w, rc, deadline, "scope_wait"), "scope_wait returned %d",
                   rc);
        break;
    }
    }
    for (int i = 0; i < nkids; i++)
        kids[i]->scope_closing = 1;
    int64_t deadline = below(&w->rng, 3) ? -1 : moor_deadline_in(below(&w->rng, 3));
    int rc = moor_scope_close(&scope, deadline);
    if (rc == 0) {
        EXPECT(w, scope.count == 0, "scope_close: 0 with %zu children running", scope.count);
        for (int i = 0; i < nkids; i++)
            EXPECT(w, kids[i]->returned, "scope_close: 0, but child %u has not returned",
                   kids[i]->id);
    } else {
        EXPECT(w, rc == -ETIMEDOUT && deadline >= 0 && moor_now() >= deadline,
               "scope_close returned %d (deadline %" PRId64 ")", rc, deadline);
    }
}

/* ---- promises -------------------------------------------------------------------------------- */

static void promise_drop(intptr_t value)
{
    intptr_t i = value - PROMISE_BASE;
    if (i < 0 || (uint32_t)i >= __atomic_load_n(&R.np, __ATOMIC_SEQ_CST)) {
        diverged(NULL, "a promise dropped the value %ld, which no promise was given",
                 (long)value);
        return;
    }
    __atomic_add_fetch(&R.p[i].dropped, 1, __ATOMIC_SEQ_CST);
}

static void *remote_main(void *arg)
{
    remote *rm = arg;
    pthread_mutex_lock(&rm->lock);
    for (;;) {
        if (!rm->count) {
            if (rm->stop)
                break;
            pthread_cond_wait(&rm->cond, &rm->lock);
            continue;
        }
        remote_job job = rm->jobs[rm->head];
        int64_t now = moor_now();
        if (now < job.at) {
            pthread_mutex_unlock(&rm->lock);
            sleep_ms((int)(job.at - now));
            pthread_mutex_lock(&rm->lock);
            continue;
        }
        rm->head = (rm->head + 1) % REMOTE_CAP;
        rm->count--;
        pthread_mutex_unlock(&rm->lock);
        int rc = moor_promise_resolve(job.p, job.value);
        if (rc != 0)
            diverged(NULL, "remote resolve of promise %ld returned %d",
                     (long)(job.value - PROMISE_BASE), rc);
        pthread_mutex_lock(&rm->lock);
    }
    pthread_mutex_unlock(&rm->lock);
    return NULL;
}

/* Hand p to the resolver thread, to be resolved with value after delay_ms; 0 if it could not
 * take it (queue full). */
static int remote_resolve(moor_promise *p, intptr_t value, int64_t delay_ms)
{
    remote *rm = &R.rem;
    pthread_mutex_lock(&rm->lock);
    int ok = rm->count < REMOTE_CAP;
    if (ok) {
        rm->jobs[(rm->head + rm->count) % REMOTE_CAP] =
            (remote_job){.p = p, .value = value, .at = moor_now() + delay_ms};
        rm->count++;
        pthread_cond_signal(&rm->cond);
    }
    pthread_mutex_unlock(&rm->lock);
    return ok;
}

typedef struct local_resolver {
    moor_promise *p;
    intptr_t value;
    int wait; /* 0 resolve at once, 1 after a yield, 2+ after a sleep of wait-2 ms */
} local_resolver;

static intptr_t resolver_fn(void *arg)
{
    local_resolver *lr = arg;
    R.helpers[0]++;
    if (lr->wait == 1)
        moor_yield();
    else if (lr->wait > 1)
        moor_sleep(moor_deadline_in(lr->wait - 2));
    R.helpers[0]--;
    return moor_promise_resolve(lr->p, lr->value);
}

/* A promise resolved at once, by a fiber, or by the resolver thread, and awaited with a
 * deadline or through a select against a sleep. */
static void op_promise(worker *w)
{
    if (R.np >= R.capp)
        return;
    uint32_t idx = R.np;
    intptr_t value = PROMISE_BASE + idx;
    moor_promise *p;
    int rc = moor_promise_new(&p, promise_drop);
    EXPECT(w, rc == 0, "promise_new: %d", rc);
    if (rc)
        return;
    R.p[idx] = (promise_rec){0};
    __atomic_store_n(&R.np, idx + 1, __ATOMIC_SEQ_CST);

    int mode = (int)below(&w->rng, 3);
    local_resolver lr = {.p = p, .value = value, .wait = (int)below(&w->rng, 6)};
    moor_fiber *helper = NULL;
    if (mode == 2 && !remote_resolve(p, value, below(&w->rng, 4)))
        mode = 0;
    if (mode == 0) {
        EXPECT(w, moor_promise_resolve(p, value) == 0, "resolve");
        if (below(&w->rng, 4) == 0)
            EXPECT(w, moor_promise_resolve(p, value + 1) == -EALREADY,
                   "a second resolve was not refused");
    } else if (mode == 1) {
        int src = moor_spawn(&helper, resolver_fn, &lr, &fiber_attr);
        EXPECT(w, src == 0, "spawn of a resolver: %d", src);
        if (src) {
            helper = NULL;
            moor_promise_resolve(p, value);
        }
    }

    intptr_t got_value;
    int received = 0;
    int64_t deadline = pick_deadline(w);
    if (below(&w->rng, 2)) {
        got_value = moor_promise_await(p, deadline);
        received = got_value >= PROMISE_BASE;
        if (!received)
            EXPECT(w, check_wait_error(w, (long)got_value, deadline, "promise_await"),
                   "promise_await returned %ld", (long)got_value);
        if (mode == 0)
            EXPECT(w, received, "promise_await of a resolved promise returned %ld",
                   (long)got_value);
    } else {
        moor_promise_future pf;
        moor_sleep_future sf;
        int64_t timeout_at = moor_deadline_in(below(&w->rng, 4));
        moor_promise_future_init(&pf, p);
        moor_sleep_init(&sf, timeout_at);
        moor_future *futs[2] = {&pf.base, &sf.base};
        int src = moor_select(futs, 2, deadline);
        if (src < 0)
            EXPECT(w, check_wait_error(w, src, deadline, "promise select"),
                   "promise select returned %d", src);
        else if (src == 1)
            EXPECT(w, moor_now() >= timeout_at, "promise select: the sleep won early");
        if (moor_future_done(&pf.base)) {
            /* Only as the winner: a value that lands once the sleep has won stays with the
             * promise, which drops it (test_promise_select_loser_keeps_no_value). */
            EXPECT(w, src == 0, "promise select: the promise is done, %d won", src);
            got_value = pf.base.result;
            received = 1;
        } else {
            EXPECT(w, src != 0, "promise select: won by a promise that is not done");
            got_value = 0;
        }
        moor_promise_drop(p);
    }
    if (received) {
        EXPECT(w, got_value == value, "promise %u: got %ld, resolved with %ld", idx,
               (long)got_value, (long)value);
        R.p[idx].received = 1;
    }
    if (helper) {
        intptr_t hr = -1;
        int jr = moor_join(helper, &hr);
        EXPECT(w, jr == 0 && hr == 0, "resolver fiber: join %d, resolve %ld", jr, (long)hr);
    }
}

/* ---- fd I/O ---------------------------------------------------------------------------------- */

/* A non-blocking socketpair or pipe: fds[0] reads, fds[1] writes. 0, or -errno. */
static int make_pipe(worker *w, int fds[2])
{
    if (below(&w->rng, 2))
        return socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) ? -errno
                                                                                       : 0;
    return pipe2(fds, O_NONBLOCK | O_CLOEXEC) ? -errno : 0;
}

/* The byte at offset i of a stream seeded with s. */
static uint8_t pattern(uint64_t s, uint64_t i)
{
    return (uint8_t)(mix64(s + i / 8) >> (i % 8 * 8));
}

/* Write a few bytes and read them back: room and data are there, so every call completes,
 * even in a cancelled fiber and under a deadline that has passed. */
static void op_io_loop(worker *w)
{
    int fds[2];
    int rc = make_pipe(w, fds);
    EXPECT(w, rc == 0, "socketpair/pipe: %d", rc);
    if (rc)
        return;
    unsigned char out[IO_CHUNK], in[IO_CHUNK];
    size_t len = 1 + below(&w->rng, IO_CHUNK);
    uint64_t s = next64(&w->rng);
    for (size_t i = 0; i < len; i++)
        out[i] = pattern(s, i);
    int64_t deadline = pick_deadline(w);
    ssize_t n = moor_write(fds[1], out, len, deadline);
    EXPECT(w, n == (ssize_t)len, "io_loop: write of %zu returned %zd", len, n);
    size_t have = 0;
    while (n == (ssize_t)len && have < len) {
        ssize_t r = moor_read(fds[0], in + have, len - have, deadline);
        EXPECT(w, r > 0, "io_loop: read after %zu of %zu bytes returned %zd", have, len, r);
        if (r <= 0)
            break;
        have += (size_t)r;
    }
    EXPECT(w, n != (ssize_t)len || memcmp(in, out, len) == 0, "io_loop: bytes differ");
    EXPECT(w, moor_close(fds[0]) == 0, "moor_close");
    EXPECT(w, close(fds[1]) == 0, "close");
}

typedef struct stream_reader {
    worker *w; /* the writer, for reports */
    int fd;
    uint64_t seed;
    uint64_t rng;
} stream_reader;

/* Read to the end of the stream in chunks of random sizes, checking every byte; return the
 * bytes read, or -1 after a wrong one. */
static intptr_t stream_reader_fn(void *arg)
{
    stream_reader *sr = arg;
    R.helpers[1]++;
    unsigned char buf[IO_CHUNK];
    uint64_t total = 0;
    intptr_t result = 0;
    for (;;) {
        size_t want = 1 + below(&sr->rng, IO_CHUNK);
        ssize_t r = moor_read(sr->fd, buf, want, -1);
        if (r == 0)
            break;
        if (r < 0) {
            diverged(sr->w, "io_stream: read after %" PRIu64 " bytes returned %zd", total, r);
            result = -1;
            break;
        }
        for (ssize_t i = 0; i < r; i++) {
            if (buf[i] != pattern(sr->seed, total + (uint64_t)i)) {
                diverged(sr->w, "io_stream: byte %" PRIu64 " differs",
                         total + (uint64_t)i);
                result = -1;
                break;
            }
        }
        if (result < 0)
            break;
        total += (uint64_t)r;
        if (below(&sr->rng, 16) == 0)
            moor_yield();
    }
    moor_close(sr->fd);
    R.helpers[1]--;
    return result < 0 ? -1 : (intptr_t)total;
}

/* Stream up to io_max bytes to a reader fiber (more than the pipe holds: both wait on each
 * other), close the write end for its end of stream, and check it read all that was written
 * (a timeout or a cancel of the writer stops it part-way: the reader must see that much). */
static void op_io_stream(worker *w)
{
    int fds[2];
    int rc = make_pipe(w, fds);
    EXPECT(w, rc == 0, "socketpair/pipe: %d", rc);
    if (rc)
        return;
    stream_reader sr = {.w = w, .fd = fds[0], .seed = next64(&w->rng), .rng = next64(&w->rng)};
    moor_fiber *reader;
    rc = moor_spawn(&reader, stream_reader_fn, &sr, &fiber_attr);
    EXPECT(w, rc == 0, "spawn of a reader: %d", rc);
    if (rc) {
        close(fds[0]);
        close(fds[1]);
        return;
    }
    /* Mostly a few KiB; one in eight more than a pipe or a socket buffer holds. */
    uint64_t len = 1 + below(&w->rng, below(&w->rng, 8) ? 8192 : R.lim.io_max);
    int64_t deadline = below(&w->rng, 4) ? -1 : moor_deadline_in(below(&w->rng, 5));
    uint64_t total = 0;
    unsigned char buf[IO_CHUNK];
    while (total < len) {
        size_t chunk = 1 + below(&w->rng, IO_CHUNK);
        if (chunk > len - total)
            chunk = (size_t)(len - total);
        for (size_t i = 0; i < chunk; i++)
            buf[i] = pattern(sr.seed, total + i);
        size_t written = 0;
        ssize_t n = moor_write_all(fds[1], buf, chunk, &written, deadline);
        if (n < 0) {
            EXPECT(w, check_wait_error(w, n, deadline, "write_all"), "write_all returned %zd",
                   n);
            EXPECT(w, written < chunk, "write_all failed with all %zu bytes written", chunk);
            total += written;
            break;
        }
        EXPECT(w, n == (ssize_t)chunk && written == chunk, "write_all of %zu returned %zd",
               chunk, n);
        total += chunk;
    }
    EXPECT(w, moor_close(fds[1]) == 0, "moor_close of the write end");
    intptr_t got_bytes = -2;
    rc = moor_join(reader, &got_bytes);
    EXPECT(w, rc == 0 && got_bytes == (intptr_t)total,
           "io_stream: wrote %" PRIu64 " bytes, the reader read %ld (join %d)", total,
           (long)got_bytes, rc);
}

typedef struct close_waiter {
    int fd;
    int started;
} close_waiter;

static intptr_t close_waiter_fn(void *arg)
{
    close_waiter *cw = arg;
    char c;
    cw->started = 1;
    R.helpers[2]++;
    ssize_t rc = moor_read(cw->fd, &c, 1, -1);
    R.helpers[2]--;
    return rc;
}

/* A fiber waits to read from a socket that gets no data; moor_close of the fd wakes it with
 * -EBADF. */
static void op_io_close(worker *w)
{
    int fds[2];
    int rc = make_pipe(w, fds);
    EXPECT(w, rc == 0, "socketpair/pipe: %d", rc);
    if (rc)
        return;
    close_waiter cw = {.fd = fds[0]};
    moor_fiber *f;
    rc = moor_spawn(&f, close_waiter_fn, &cw, &fiber_attr);
    EXPECT(w, rc == 0, "spawn of a waiter: %d", rc);
    if (rc) {
        close(fds[0]);
        close(fds[1]);
        return;
    }
    /* Once it has started it waits in its read: it sets the flag and reads at once. */
    while (!cw.started)
        moor_yield();
    EXPECT(w, moor_close(fds[0]) == 0, "moor_close under a waiter");
    intptr_t result = 0;
    rc = moor_join(f, &result);
    EXPECT(w, rc == 0 && result == -EBADF, "a read under moor_close returned %ld (join %d)",
           (long)result, rc);
    close(fds[1]);
}

/* ---- the fibers of a round ------------------------------------------------------------------- */

static int pick_op(worker *w)
{
    uint32_t x = below(&w->rng, R.total_weight);
    for (int op = 0; op < OP_COUNT; op++) {
        if (x < R.weight[op])
            return op;
        x -= R.weight[op];
    }
    return OP_YIELD;
}

/* A worker: a random sequence of steps, then it joins the children it still has. */
static intptr_t worker_fn(void *arg)
{
    worker *w = arg;
    worker *children[MAX_LOCAL_CHILDREN];
    int nchildren = 0;
    int steps = 1 + (int)below(&w->rng, R.lim.steps_max);
    for (int i = 0; i < steps; i++) {
        EXPECT(w, !moor_cancelled() || may_be_cancelled(w),
               "cancelled, but nothing cancelled it (step %d)", i);
        if (w->kind == W_WORKER && w->cancelled)
            EXPECT(w, moor_cancelled(), "moor_cancel was called, but it is not cancelled");
        /* A cancelled fiber's waits that have to wait return -ECANCELED at once. */
        if (moor_cancelled() && below(&w->rng, 4) == 0) {
            int64_t deadline = moor_deadline_in(SAFETY_MS);
            int rc = moor_sleep(deadline);
            EXPECT(w, rc == -ECANCELED, "a long sleep in a cancelled fiber returned %d", rc);
        }
        int op = pick_op(w);
        R.ops[op]++;
        w->op = op;
        switch (op) {
        case OP_YIELD: moor_yield(); break;
        case OP_SLEEP: op_sleep(w); break;
        case OP_SEND: op_send(w); break;
        case OP_RECV: op_recv(w); break;
        case OP_TRY: op_try(w); break;
        case OP_SELECT: op_select(w); break;
        case OP_CLOSE: op_close(w); break;
        case OP_CANCEL: op_cancel(w); break;
        case OP_SPAWN: op_spawn(w, children, &nchildren); break;
        case OP_JOIN: op_join(w, children, &nchildren); break;
        case OP_SCOPE: op_scope(w); break;
        case OP_PROMISE: op_promise(w); break;
        case OP_IO_LOOP: op_io_loop(w); break;
        case OP_IO_STREAM: op_io_stream(w); break;
        case OP_IO_CLOSE: op_io_close(w); break;
        }
        w->steps++;
        R.steps_done++;
    }
    moor_waitgroup_done(&R.wg);
    w->op = OP_JOIN;
    w->reaping = 1;
    while (nchildren)
        op_join(w, children, &nchildren);
    w->result = expected_result(w);
    w->returned = 1;
    return w->result;
}

/* The one receiver of an ordered channel, until the channel is closed and drained or the
 * sink is cancelled (then the final drain takes the rest). */
static intptr_t sink_fn(void *arg)
{
    worker *w = arg;
    chan_model *c = &R.chans[w->chan];
    for (;;) {
        if (moor_cancelled()) {
            EXPECT(w, w->cancelled, "sink cancelled, but nothing cancelled it");
            break;
        }
        msg m;
        int rc;
        int64_t deadline = -1;
        switch (below(&w->rng, 4)) {
        case 0:
            deadline = pick_deadline(w);
            rc = moor_chan_recv(c->ch, &m, deadline);
            break;
        case 1: {
            moor_chan_future op;
            moor_sleep_future sf;
            int64_t timeout_at = moor_deadline_in(below(&w->rng, 4));
            moor_chan_recv_init(&op, c->ch, &m, -1);
            moor_sleep_init(&sf, timeout_at);
            moor_future *futs[2] = {&op.base, &sf.base};
            int src = moor_select(futs, 2, -1);
            EXPECT(w, src == 0 || src == 1 || src == -ECANCELED, "sink select: %d", src);
            if (src == -ECANCELED)
                EXPECT(w, moor_cancelled(), "sink select: -ECANCELED, not cancelled");
            if (src == 1)
                EXPECT(w, moor_now() >= timeout_at, "sink select: the sleep won early");
            if (!moor_future_done(&op.base) && src == 1)
                continue; /* the sleep won */
            rc = moor_future_done(&op.base) ? (int)op.base.result : -ECANCELED;
            break;
        }
        case 2:
            /* A slow receiver: the buffer fills, senders queue up behind it. */
            moor_sleep(moor_deadline_in(below(&w->rng, 3)));
            continue;
        default:
            rc = moor_chan_try_recv(c->ch, &m);
            if (rc == -EAGAIN) {
                moor_yield();
                continue;
            }
            break;
        }
        if (rc == 0) {
            got(w, c, &m);
            continue;
        }
        recv_failed(w, c, rc, deadline, 0);
        if (rc == -EPIPE)
            break;
    }
    w->result = (intptr_t)w->id;
    w->returned = 1;
    return w->result;
}

/* Once every worker has done its steps, or once no step has ended for STALL_MS (the workers
 * left all wait on channels, with no deadline, for one another), close the channels still
 * open: that ends every wait on them. */
#define STALL_MS 20

static intptr_t closer_fn(void *arg)
{
    (void)arg;
    uint64_t last = UINT64_MAX;
    for (;;) {
        int rc = moor_waitgroup_wait(&R.wg, moor_deadline_in(STALL_MS));
        if (rc == 0)
            break;
        EXPECT((worker *)NULL, rc == -ETIMEDOUT, "closer: waitgroup_wait returned %d", rc);
        if (R.steps_done == last)
            break;
        last = R.steps_done;
    }
    for (size_t i = 0; i < R.nchans; i++) {
        if (!R.chans[i].closed) {
            R.chans[i].closed = 1;
            moor_chan_close(R.chans[i].ch);
        }
    }
    R.closer_done = 1;
    return 0;
}

/* ---- a round --------------------------------------------------------------------------------- */

static limits run_limits(void)
{
    limits l = {.max_fibers = 3000, .top_min = 300, .top_span = 1200, .steps_max = 40,
                .max_depth = 4, .io_max = 256 * 1024};
#ifdef MOOR_TEST_ASAN
    /* ASan makes a round some three times slower: smaller rounds, more of them. */
    l.max_fibers = 2000;
    l.top_min = 200;
    l.top_span = 800;
#endif
    if (UNDER_TSAN) { /* a fiber costs TSan a thread's state: about a millisecond to make */
        l.max_fibers = 400;
        l.top_min = 60;
        l.top_span = 140;
    }
    if (UNDER_VALGRIND) {
        l.max_fibers = 800;
        l.top_min = 100;
        l.top_span = 200;
        l.steps_max = 20;
        l.io_max = 96 * 1024;
    }
    return l;
}

/* MOOR_STRESS_SKIP names ops this run leaves out ("io_stream,cancel"), to narrow down a
 * failure; the decisions of the others change with it. */
static int op_skipped(int op)
{
    const char *skip = getenv("MOOR_STRESS_SKIP");
    size_t len = strlen(op_names[op]);
    for (const char *s = skip; s && (s = strstr(s, op_names[op])); s += len)
        if ((s == skip || s[-1] == ',') && (s[len] == ',' || s[len] == '\0'))
            return 1;
    return 0;
}

/* The watchdog's message, written ahead so that the handler only calls write(). */
static char watchdog_msg[256];
static size_t watchdog_len;

/* A hung round: say so with the seed, then what is still running and where, so that the
 * replay can be aimed (snprintf in a handler: the thread is parked in the executor, not in
 * stdio or malloc, and the process ends here anyway). */
static void watchdog(int sig)
{
    (void)sig;
    static char buf[8192];
    ssize_t n = write(STDERR_FILENO, watchdog_msg, watchdog_len);
    size_t len = 0;
#define WD(...)                                                                               \
    do {                                                                                      \
        if (len < sizeof buf)                                                                 \
            len += (size_t)snprintf(buf + len, sizeof buf - len, __VA_ARGS__);                \
    } while (0)
    WD("stress: closer %s; workers with steps left %zu; steps done %" PRIu64
       "; helpers running: %d resolvers, %d stream readers, %d close waiters; remote queue %zu\n",
       R.closer_done ? "done" : "waiting", R.wg.count, R.steps_done, R.helpers[0],
       R.helpers[1], R.helpers[2], R.rem.count);
    for (size_t i = 0; i < R.nchans; i++)
        WD("stress: chan %zu: cap %zu%s, %s, %zu buffered\n", i, R.chans[i].cap,
           R.chans[i].ordered ? " (ordered)" : "", R.chans[i].closed ? "closed" : "open",
           moor_chan_len(R.chans[i].ch));
    /* First the fibers that wait on something else than their children, then the others. */
    int shown = 0;
    for (uint32_t k = 0; k < 2 * R.nw && shown < 30; k++) {
        const worker *w = &R.w[k % R.nw];
        int parent = w->reaping || w->op == OP_SCOPE || w->op == OP_JOIN;
        if (w->returned || w->kind == W_HELPER || parent != (k >= R.nw))
            continue;
        shown++;
        WD("stress: fiber %u (%s, depth %d) not returned: %s %s, step %d%s\n", w->id,
           w->kind == W_WORKER ? "worker" : w->kind == W_SCOPED ? "scoped" : "sink", w->depth,
           w->reaping ? "reaping its children," : "in",
           w->reaping ? "" : w->kind == W_SINK ? "its receive loop" : op_names[w->op],
           w->steps, w->cancelled ? ", cancelled" : "");
    }
#undef WD
    n = write(STDERR_FILENO, buf, len < sizeof buf ? len : sizeof buf - 1);
    (void)n;
    _exit(EXIT_FAILURE);
}

static unsigned watchdog_s(void)
{
    const char *env = getenv("MOOR_TEST_WATCHDOG");
    long s = env ? strtol(env, NULL, 10) : 0;
    return s > 0 ? (unsigned)s : (UNDER_VALGRIND ? 600 : 120);
}

static void run_round(unsigned no)
{
    memset(&R, 0, sizeof R);
    R.no = no;
    R.seed = mix64(run_seed ^ ((uint64_t)no << 32));
    R.lim = run_limits();
    uint64_t rng = R.seed;

    watchdog_len = (size_t)snprintf(watchdog_msg, sizeof watchdog_msg,
                                    "stress: round %u still running after %u s: hung "
                                    "(seed 0x%016" PRIx64 ", replay with "
                                    "MOOR_STRESS_SEED=0x%016" PRIx64 ")\n",
                                    no, watchdog_s(), run_seed, run_seed);
    alarm(watchdog_s());

    /* What this round does most: every op gets a random weight; closing and cancelling stay
     * rarer (a channel closes no sooner than its close_at; some rounds cancel nothing). */
    for (int op = 0; op < OP_COUNT; op++)
        R.weight[op] = 1 + below(&rng, 10);
    R.weight[OP_CLOSE] = 1;
    R.weight[OP_CANCEL] = 1;
    static const unsigned cancel_rates[] = {0, 30, 100, 400};
    R.cancel_permille = cancel_rates[below(&rng, 4)];
    R.weight[OP_IO_STREAM] = below(&rng, 3);
    for (int op = 0; op < OP_COUNT; op++)
        if (op_skipped(op))
            R.weight[op] = 0;
    R.weight[OP_YIELD] += 1; /* never all zero */
    for (int op = 0; op < OP_COUNT; op++)
        R.total_weight += R.weight[op];

    moor_executor_attr attr = {.stack_size = STACK_SIZE};
    R.ex = ex_new_attr(&attr);

    R.w = calloc(R.lim.max_fibers, sizeof *R.w);
    R.capp = R.lim.max_fibers * 4;
    R.p = calloc(R.capp, sizeof *R.p);
    assert_non_null(R.w);
    assert_non_null(R.p);

    /* Channels: unbuffered and buffered; the unordered ones first, then those with a sink. */
    static const size_t caps[] = {0, 0, 1, 2, 8, 64};
    R.nchans = 2 + below(&rng, MAX_CHANS - 1);
    size_t nordered = 1 + below(&rng, (uint32_t)(R.nchans / 2));
    R.nunordered = R.nchans - nordered;
    for (size_t i = 0; i < R.nchans; i++) {
        chan_model *c = &R.chans[i];
        c->cap = caps[below(&rng, sizeof caps / sizeof caps[0])];
        c->ordered = i >= R.nunordered;
        assert_int_equal(moor_chan_new(&c->ch, sizeof(msg), c->cap), 0);
        if (c->ordered) {
            c->last_seq = calloc(R.lim.max_fibers, sizeof *c->last_seq);
            assert_non_null(c->last_seq);
        }
    }

    pthread_mutex_init(&R.rem.lock, NULL);
    pthread_cond_init(&R.rem.cond, NULL);
    assert_int_equal(pthread_create(&R.rem.thread, NULL, remote_main, &R.rem), 0);

    R.wg = (moor_waitgroup)MOOR_WAITGROUP_INIT;
    for (size_t i = 0; i < R.nchans; i++)
        R.chans[i].close_at = below(&rng, 3) ? INT64_MAX : moor_deadline_in(below(&rng, 1000));

    worker **top = calloc(R.lim.max_fibers, sizeof *top);
    assert_non_null(top);
    uint32_t ntop = 0;
    for (size_t i = R.nunordered; i < R.nchans; i++) {
        worker *s = new_worker(NULL, W_SINK, i);
        s->chan = (int)i;
        assert_int_equal(moor_spawn(&s->f, sink_fn, s, &fiber_attr), 0);
        top[ntop++] = s;
    }
    uint32_t nworkers = R.lim.top_min + below(&rng, R.lim.top_span);
    for (uint32_t i = 0; i < nworkers; i++) {
        worker *w = new_worker(NULL, W_WORKER, 0);
        moor_waitgroup_add(&R.wg, 1);
        assert_int_equal(moor_spawn(&w->f, worker_fn, w, &fiber_attr), 0);
        top[ntop++] = w;
    }
    moor_fiber *closer;
    assert_int_equal(moor_spawn(&closer, closer_fn, NULL, &fiber_attr), 0);

    /* Plain code joins the top-level fibers, running the executor meanwhile. */
    for (uint32_t i = 0; i < ntop; i++)
        join_checked(NULL, top[i], 0);
    free(top);
    assert_int_equal(moor_join(closer, NULL), 0);
    /* Children of scopes whose close timed out may still run. */
    assert_int_equal(moor_executor_run(R.ex), 0);

    /* Drain what the channels still hold (all closed now), then free them. */
    for (size_t i = 0; i < R.nchans; i++) {
        chan_model *c = &R.chans[i];
        msg m;
        int rc;
        while ((rc = moor_chan_try_recv(c->ch, &m)) == 0)
            got(NULL, c, &m);
        EXPECT((worker *)NULL, rc == -EPIPE && c->closed,
               "chan %zu: %d after its drain at the end of the round", i, rc);
        moor_chan_free(c->ch);
        free(c->last_seq);
    }

    /* Let the resolver thread finish what it was given. */
    pthread_mutex_lock(&R.rem.lock);
    R.rem.stop = 1;
    pthread_cond_signal(&R.rem.cond);
    pthread_mutex_unlock(&R.rem.lock);
    assert_int_equal(pthread_join(R.rem.thread, NULL), 0);
    pthread_mutex_destroy(&R.rem.lock);
    pthread_cond_destroy(&R.rem.cond);

    /* The model: every value received once or its send failed; every promise value received
     * or dropped, once; every fiber returned. */
    uint64_t pending = 0, lost = 0;
    for (uint32_t i = 0; i < R.nv; i++) {
        if (R.v[i].send == V_PENDING)
            pending++;
        else if (R.v[i].send == V_SENT && !R.v[i].received)
            lost++;
    }
    EXPECT((worker *)NULL, pending == 0, "%" PRIu64 " values whose send never returned", pending);
    EXPECT((worker *)NULL, lost == 0, "%" PRIu64 " values sent and never received", lost);
    EXPECT((worker *)NULL, R.received == R.sent_ok,
           "received %" PRIu64 " values, sends that succeeded %" PRIu64, R.received, R.sent_ok);
    for (uint32_t i = 0; i < R.np; i++) {
        int n = R.p[i].received + __atomic_load_n(&R.p[i].dropped, __ATOMIC_SEQ_CST);
        EXPECT((worker *)NULL, n == 1, "promise %u: received %d, dropped %d", i, R.p[i].received,
               R.p[i].dropped);
    }
    for (uint32_t i = 0; i < R.nw; i++)
        EXPECT((worker *)NULL, R.w[i].kind == W_HELPER || R.w[i].returned,
               "fiber %u never returned", i);

    moor_executor_stats st = ex_stats(R.ex);
    EXPECT((worker *)NULL, st.tasks == 0 && st.fibers == 0 && st.timers == 0,
           "the executor holds %zu tasks, %zu fibers, %zu timers at the end", st.tasks,
           st.fibers, st.timers);
    if (st.tasks == 0)
        moor_executor_free(R.ex);
    alarm(0);
    free(R.v);
    free(R.p);
    free(R.w);
}

static int64_t env_ms(const char *name, int64_t dflt)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return dflt;
    char *end;
    long long v = strtoll(s, &end, 10);
    return *end || v < 0 ? dflt : (int64_t)v;
}

static void test_stress_random(void **state)
{
    (void)state;
    const char *s = getenv("MOOR_STRESS_SEED");
    if (s && *s) {
        char *end;
        run_seed = strtoull(s, &end, 0);
        if (*end)
            fail_msg("MOOR_STRESS_SEED=%s is not a number", s);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        run_seed = mix64(((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^
                         ((uint64_t)getpid() << 40));
    }
    int64_t run_ms = env_ms("MOOR_STRESS_MS", UNDER_VALGRIND ? 1500 : UNDER_TSAN ? 2000 : 2500);
    printf("stress seed: 0x%016" PRIx64 ", replay with MOOR_STRESS_SEED=0x%016" PRIx64
           " (MOOR_STRESS_MS=%" PRId64 ")\n",
           run_seed, run_seed, run_ms);
    fflush(stdout);

    signal(SIGALRM, watchdog);
    int64_t start = moor_now();
    unsigned rounds = 0;
    uint64_t fibers = 0, values = 0, received = 0, promises = 0, cancels = 0;
    uint64_t ops[OP_COUNT] = {0}, send_errors[5] = {0};
    do {
        run_round(rounds);
        rounds++;
        fibers += R.nw;
        values += R.nv;
        received += R.received;
        promises += R.np;
        cancels += R.cancels;
        for (int op = 0; op < OP_COUNT; op++)
            ops[op] += R.ops[op];
        for (int i = 0; i < 5; i++)
            send_errors[i] += R.send_errors[i];
        if (__atomic_load_n(&failures, __ATOMIC_SEQ_CST))
            break;
    } while (moor_now() - start < run_ms);
    signal(SIGALRM, SIG_DFL);

    printf("stress: %u rounds in %" PRId64 " ms: %" PRIu64 " fibers, %" PRIu64 " values (%" PRIu64
           " received), %" PRIu64 " promises, %" PRIu64 " cancels;",
           rounds, moor_now() - start, fibers, values, received, promises, cancels);
    for (int op = 0; op < OP_COUNT; op++)
        printf(" %s %" PRIu64, op_names[op], ops[op]);
    printf("\nstress: failed sends: %" PRIu64 " closed, %" PRIu64 " timed out, %" PRIu64
           " cancelled, %" PRIu64 " would block, %" PRIu64 " lost a select\n",
           send_errors[0], send_errors[1], send_errors[2], send_errors[3], send_errors[4]);
    int n = __atomic_load_n(&failures, __ATOMIC_SEQ_CST);
    if (n)
        fail_msg("%d divergences in round %u (seed 0x%016" PRIx64
                 ", replay with MOOR_STRESS_SEED=0x%016" PRIx64 ")",
                 n, rounds - 1, run_seed, run_seed);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_stress_random),
    };
    return RUN_TESTS(tests);
}
