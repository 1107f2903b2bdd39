/* moor_redis (examples/redis): hiredis' async API made awaitable, against a real redis-server
 * started on a free loopback port for this program (and one more for the test that kills
 * it). Counts from 100 fibers sharing one connection and from 100 fibers on 100 connections,
 * pub/sub delivery in order, the server killed while commands are pending, a fiber cancelled
 * while its command is on the wire, a deadline shorter than the command, connection errors.
 *
 * Without redis-server (on PATH, or $MOOR_REDIS_SERVER) every case is skipped, saying why. */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "moor.h"

#include "fixture.h"
#include "redis.h"
#include "server.h"

/* The server every case but the kill test uses; started in the group setup. */
static redis_server server;
static int server_rc = -ENOENT;

static int group_setup(void **state)
{
    (void)state;
    server_rc = redis_server_start(&server);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    redis_server_stop(&server);
    return 0;
}

/* Skip the case, visibly, when there is no server to test against. */
#define NEED_SERVER()                                                                         \
    do {                                                                                      \
        if (server_rc < 0) {                                                                  \
            print_message("no redis-server (%s): install redis-server or set "                \
                          "MOOR_REDIS_SERVER; skipped\n", moor_strerror(server_rc));          \
            skip();                                                                           \
        }                                                                                     \
    } while (0)

static int64_t safety(void)
{
    return moor_deadline_in(SAFETY_MS);
}

/* A command whose reply must be an integer: returns it, or LLONG_MIN (and a failed FCHECK). */
static long long command_int(moor_redis *c, const char *what, const char *fmt, const char *arg)
{
    redisReply *r = NULL;
    int rc = moor_redis_command(c, safety(), &r, fmt, arg);
    if (rc < 0 || r->type != REDIS_REPLY_INTEGER) {
        fprintf(stderr, "%s: rc %d (%s), type %d\n", what, rc, moor_strerror(rc),
                rc < 0 ? -1 : r->type);
        FCHECK(!"an integer reply");
        moor_redis_reply_free(r);
        return LLONG_MIN;
    }
    long long v = r->integer;
    moor_redis_reply_free(r);
    return v;
}

static moor_redis *connect_checked(void)
{
    moor_redis *c = NULL;
    int rc = moor_redis_connect("127.0.0.1", server.port, safety(), &c);
    FCHECK(rc == 0);
    return rc == 0 ? c : NULL;
}

/* ---- counts from many fibers --------------------------------------------------------------- */

#define FIBERS 100
#define INCRS 20

typedef struct counter_job {
    moor_redis *conn;    /* shared, or NULL: the fiber connects on its own */
    const char *prefix;  /* key prefix of the case */
    int index;
    int ok;
} counter_job;

/* SET a key of its own, INCR the shared counter INCRS times (the replies a fiber sees must
 * grow: its commands go out in order), then GET its key back: each fiber gets its own
 * replies, not a neighbour's. */
static intptr_t counter_fiber(void *arg)
{
    counter_job *j = arg;
    moor_redis *c = j->conn ? j->conn : connect_checked();
    if (!c)
        return -1;
    char key[64], val[32], counter[64];
    snprintf(key, sizeof key, "%s:key:%d", j->prefix, j->index);
    snprintf(val, sizeof val, "v%d", j->index);
    snprintf(counter, sizeof counter, "%s:counter", j->prefix);
    redisReply *r = NULL;
    FCHECK(moor_redis_command(c, safety(), &r, "SET %s %s", key, val) == 0);
    FCHECK(r && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "OK") == 0);
    moor_redis_reply_free(r);
    long long last = 0;
    for (int i = 0; i < INCRS; i++) {
        long long v = command_int(c, "INCR", "INCR %s", counter);
        FCHECK(v > last);
        last = v;
        if ((i & 3) == 0)
            moor_yield(); /* mix the fibers' commands on the wire */
    }
    r = NULL;
    FCHECK(moor_redis_command(c, safety(), &r, "GET %s", key) == 0);
    FCHECK(r && r->type == REDIS_REPLY_STRING && strcmp(r->str, val) == 0);
    moor_redis_reply_free(r);
    if (!j->conn)
        moor_redis_close(c);
    j->ok = 1;
    return 0;
}

static void run_counters(const char *prefix, int shared)
{
    moor_executor *ex = ex_new();
    moor_redis *conn = NULL;
    if (shared)
        assert_int_equal(moor_redis_connect("127.0.0.1", server.port, safety(), &conn), 0);
    static counter_job jobs[FIBERS];
    moor_fiber *fibers[FIBERS];
    for (int i = 0; i < FIBERS; i++) {
        jobs[i] = (counter_job){.conn = conn, .prefix = prefix, .index = i};
        assert_int_equal(moor_spawn(&fibers[i], counter_fiber, &jobs[i], NULL), 0);
    }
    for (int i = 0; i < FIBERS; i++) {
        assert_int_equal(moor_join(fibers[i], NULL), 0);
        assert_true(jobs[i].ok);
    }
    /* The exact count, read on a fresh connection. */
    moor_redis *check = NULL;
    assert_int_equal(moor_redis_connect("127.0.0.1", server.port, safety(), &check), 0);
    redisReply *r = NULL;
    assert_int_equal(moor_redis_command(check, safety(), &r, "GET %s:counter", prefix), 0);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_int_equal(atoll(r->str), FIBERS * INCRS);
    moor_redis_reply_free(r);
    moor_redis_close(check);
    if (conn)
        moor_redis_close(conn);
    ex_free(ex);
}

static void test_redis_shared_connection_counts(void **state)
{
    (void)state;
    NEED_SERVER();
    run_counters("shared", 1);
}

static void test_redis_connection_per_fiber_counts(void **state)
{
    (void)state;
    NEED_SERVER();
    run_counters("dedicated", 0);
}

/* ---- replies: types, errors ------------------------------------------------------------------- */

static void test_redis_reply_types(void **state)
{
    (void)state;
    NEED_SERVER();
    moor_executor *ex = ex_new();
    moor_redis *c = NULL;
    assert_int_equal(moor_redis_connect("127.0.0.1", server.port, safety(), &c), 0);
    redisReply *r = NULL;
    /* A binary value with a NUL in it, through %b, and back. */
    assert_int_equal(moor_redis_command(c, safety(), NULL, "DEL types:list types:bin"), 0);
    assert_int_equal(moor_redis_command(c, safety(), NULL, "SET types:bin %b", "a\0b", (size_t)3), 0);
    assert_int_equal(moor_redis_command(c, safety(), &r, "GET types:bin"), 0);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_int_equal(r->len, 3);
    assert_memory_equal(r->str, "a\0b", 3);
    moor_redis_reply_free(r);
    /* An array, through the argv form. */
    const char *push[] = {"RPUSH", "types:list", "one", "two", "three"};
    assert_int_equal(moor_redis_command_argv(c, safety(), &r, 5, push, NULL), 0);
    assert_int_equal(r->type, REDIS_REPLY_INTEGER);
    assert_int_equal(r->integer, 3);
    moor_redis_reply_free(r);
    assert_int_equal(moor_redis_command(c, safety(), &r, "LRANGE types:list 0 -1"), 0);
    assert_int_equal(r->type, REDIS_REPLY_ARRAY);
    assert_int_equal(r->elements, 3);
    assert_string_equal(r->element[0]->str, "one");
    assert_string_equal(r->element[2]->str, "three");
    moor_redis_reply_free(r);
    /* nil, and an error reply, which is a reply (0), not a failure. */
    assert_int_equal(moor_redis_command(c, safety(), &r, "GET types:absent"), 0);
    assert_int_equal(r->type, REDIS_REPLY_NIL);
    moor_redis_reply_free(r);
    assert_int_equal(moor_redis_command(c, safety(), &r, "INCR types:list"), 0);
    assert_int_equal(r->type, REDIS_REPLY_ERROR);
    assert_non_null(strstr(r->str, "WRONGTYPE"));
    moor_redis_reply_free(r);
    /* The connection carries on after an error reply. */
    assert_int_equal(moor_redis_command(c, safety(), &r, "PING"), 0);
    assert_string_equal(r->str, "PONG");
    moor_redis_reply_free(r);
    assert_int_equal(moor_redis_error(c), 0);
    moor_redis_close(c);
    ex_free(ex);
}

static void test_redis_connect_refused(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int port = redis_server_free_port();
    assert_true(port > 0);
    moor_redis *c = NULL;
    assert_int_equal(moor_redis_connect("127.0.0.1", port, safety(), &c), -ECONNREFUSED);
    assert_null(c);
    ex_free(ex);
}

typedef struct connect_job {
    int port;
    int rc;
} connect_job;

static intptr_t connect_fiber(void *arg)
{
    connect_job *j = arg;
    moor_redis *c = NULL;
    j->rc = moor_redis_connect("127.0.0.1", j->port, safety(), &c);
    if (c)
        moor_redis_close(c);
    return 0;
}

/* A connect that cannot complete (a listener whose accept queue is full drops the SYN, so the
 * handshake hangs) is abandoned at its deadline, no earlier; nothing of it is left behind. */
static void test_redis_connect_deadline(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int lfd = moor_tcp_listen("127.0.0.1", 0, 0);
    assert_true(lfd >= 0);
    int port = moor_socket_port(lfd);
    assert_true(port > 0);
    /* Fill the accept queue: each of these completes its handshake or hangs in it. */
    int fill[4];
    for (int i = 0; i < 4; i++) {
        fill[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        assert_true(fill[i] >= 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int rc = connect(fill[i], (struct sockaddr *)&a, sizeof a);
        assert_true(rc == 0 || errno == EINPROGRESS);
    }
    sleep_ms(50);
    moor_redis *c = NULL;
    int64_t deadline = moor_deadline_in(WAIT_MS);
    assert_int_equal(moor_redis_connect("127.0.0.1", port, deadline, &c), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_null(c);
    /* The same attempt in a fiber that is cancelled: -ECANCELED, promptly. */
    connect_job job = {.port = port};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, connect_fiber, &job, NULL), 0);
    moor_sleep(moor_deadline_in(WAIT_MS));
    int64_t t0 = moor_now();
    moor_cancel(f);
    assert_int_equal(moor_join(f, NULL), -ECANCELED);
    assert_int_equal(job.rc, -ECANCELED);
    assert_true(moor_now() - t0 < SAFETY_MS / 2);
    for (int i = 0; i < 4; i++)
        close(fill[i]);
    assert_int_equal(moor_close(lfd), 0);
    ex_free(ex);
}

/* ---- pub/sub ------------------------------------------------------------------------------------ */

#define MESSAGES 1000

static intptr_t publisher(void *arg)
{
    (void)arg;
    moor_redis *c = connect_checked();
    if (!c)
        return -1;
    for (int i = 0; i < MESSAGES; i++) {
        char payload[32];
        snprintf(payload, sizeof payload, "m%d", i);
        /* One subscriber receives each. */
        FCHECK(command_int(c, "PUBLISH", "PUBLISH pubsub:chan %s", payload) == 1);
        if (i % 100 == 0)
            moor_yield();
    }
    moor_redis_close(c);
    return 0;
}

static void test_redis_pubsub_in_order(void **state)
{
    (void)state;
    NEED_SERVER();
    moor_executor *ex = ex_new();
    moor_redis *sub = NULL;
    assert_int_equal(moor_redis_connect("127.0.0.1", server.port, safety(), &sub), 0);
    moor_redis_message *msg = NULL;
    assert_int_equal(moor_redis_next_message(sub, safety(), &msg), -EINVAL); /* not subscribed */
    assert_int_equal(moor_redis_subscribe(sub, "pubsub:chan", safety()), 0);
    /* The connection is the subscription's now. */
    assert_int_equal(moor_redis_command(sub, safety(), NULL, "PING"), -EBUSY);
    /* Nothing published yet: a wait runs out, no earlier than its deadline. */
    int64_t t0 = moor_now();
    assert_int_equal(moor_redis_next_message(sub, moor_deadline_in(WAIT_MS), &msg), -ETIMEDOUT);
    assert_true(moor_now() - t0 >= WAIT_MS);

    moor_fiber *pub;
    assert_int_equal(moor_spawn(&pub, publisher, NULL, NULL), 0);
    for (int i = 0; i < MESSAGES; i++) {
        char want[32];
        snprintf(want, sizeof want, "m%d", i);
        assert_int_equal(moor_redis_next_message(sub, safety(), &msg), 0);
        assert_string_equal(msg->channel, "pubsub:chan");
        assert_int_equal(msg->len, strlen(want));
        assert_string_equal(msg->payload, want);
        moor_redis_message_free(msg);
    }
    assert_int_equal(moor_join(pub, NULL), 0);
    assert_int_equal(moor_redis_pending(sub), 0);
    moor_redis_close(sub);
    ex_free(ex);
}

/* Messages queued but not taken when the connection is closed are freed with it. */
static void test_redis_pubsub_close_with_messages_queued(void **state)
{
    (void)state;
    NEED_SERVER();
    moor_executor *ex = ex_new();
    moor_redis *sub = NULL, *pub = NULL;
    assert_int_equal(moor_redis_connect("127.0.0.1", server.port, safety(), &sub), 0);
    assert_int_equal(moor_redis_connect("127.0.0.1", server.port, safety(), &pub), 0);
    assert_int_equal(moor_redis_subscribe(sub, "pubsub:queued", safety()), 0);
    for (int i = 0; i < 10; i++)
        assert_int_equal(moor_redis_command(pub, safety(), NULL, "PUBLISH pubsub:queued x"), 0);
    /* PUBLISH returns once the server has queued them to the subscriber; a PING through the
     * publisher is no barrier for the subscriber's socket, so wait for them to arrive. */
    moor_redis_message *msg = NULL;
    assert_int_equal(moor_redis_next_message(sub, safety(), &msg), 0);
    moor_redis_message_free(msg);
    while (moor_redis_pending(sub) < 9)
        moor_sleep(moor_deadline_in(1));
    moor_redis_close(sub);
    moor_redis_close(pub);
    ex_free(ex);
}

/* ---- the server killed while commands are pending --------------------------------------- */

#define KILL_SHARED 20
#define KILL_OWN 20

typedef struct kill_job {
    moor_redis *conn;
    int first_error;   /* the first negative rc it saw */
    int later_error;   /* what a command after that returned */
    int64_t failed_at; /* when it saw its first error */
    long long done;    /* commands that succeeded */
} kill_job;

/* Send INCRs until one fails; then one more, which must fail at once with the same code. */
static intptr_t kill_looper(void *arg)
{
    kill_job *j = arg;
    for (;;) {
        redisReply *r = NULL;
        int rc = moor_redis_command(j->conn, safety(), &r, "INCR kill:counter");
        if (rc < 0) {
            j->first_error = rc;
            j->failed_at = moor_now();
            break;
        }
        moor_redis_reply_free(r);
        j->done++;
    }
    j->later_error = moor_redis_command(j->conn, safety(), NULL, "PING");
    return 0;
}

/* A command that the server would hold for 30 s: pending when the server dies. */
static intptr_t kill_blocked(void *arg)
{
    kill_job *j = arg;
    j->first_error = moor_redis_command(j->conn, safety(), NULL, "BLPOP kill:never 30");
    j->failed_at = moor_now();
    j->later_error = moor_redis_command(j->conn, safety(), NULL, "PING");
    return 0;
}

static intptr_t kill_subscriber(void *arg)
{
    kill_job *j = arg;
    moor_redis_message *msg;
    j->first_error = moor_redis_next_message(j->conn, safety(), &msg);
    j->failed_at = moor_now();
    j->later_error = moor_redis_next_message(j->conn, safety(), &msg);
    return 0;
}

static void test_redis_server_killed_mid_way(void **state)
{
    (void)state;
    NEED_SERVER();
    redis_server doomed;
    assert_int_equal(redis_server_start(&doomed), 0);
    moor_executor *ex = ex_new();
    moor_redis *shared = NULL, *blocked = NULL, *sub = NULL, *own[KILL_OWN];
    assert_int_equal(moor_redis_connect("127.0.0.1", doomed.port, safety(), &shared), 0);
    assert_int_equal(moor_redis_connect("127.0.0.1", doomed.port, safety(), &blocked), 0);
    assert_int_equal(moor_redis_connect("127.0.0.1", doomed.port, safety(), &sub), 0);
    assert_int_equal(moor_redis_subscribe(sub, "kill:chan", safety()), 0);
    for (int i = 0; i < KILL_OWN; i++)
        assert_int_equal(moor_redis_connect("127.0.0.1", doomed.port, safety(), &own[i]), 0);

    enum { N = KILL_SHARED + KILL_OWN + 3 };
    kill_job jobs[N];
    moor_fiber *fibers[N];
    for (int i = 0; i < N; i++) {
        moor_redis *c = i < KILL_SHARED ? shared : i < KILL_SHARED + KILL_OWN
                      ? own[i - KILL_SHARED] : i == N - 3 ? blocked : i == N - 2 ? sub : shared;
        jobs[i] = (kill_job){.conn = c};
        moor_fiber_fn fn = i == N - 3 ? kill_blocked : i == N - 2 ? kill_subscriber
                                                                  : kill_looper;
        assert_int_equal(moor_spawn(&fibers[i], fn, &jobs[i], NULL), 0);
    }
    /* Let the loopers run a while (every one has done some work), then kill the server. */
    for (;;) {
        moor_sleep(moor_deadline_in(10));
        int all = 1;
        for (int i = 0; i < KILL_SHARED + KILL_OWN; i++)
            all &= jobs[i].done > 10;
        if (all)
            break;
    }
    int64_t killed_at = moor_now();
    redis_server_stop(&doomed);
    for (int i = 0; i < N; i++)
        assert_int_equal(moor_join(fibers[i], NULL), 0);
    for (int i = 0; i < N; i++) {
        /* Promptly: far sooner than the commands' deadlines (SAFETY_MS), which they would
         * have run into had anything hung. */
        assert_int_equal(jobs[i].first_error, -ECONNRESET);
        assert_int_equal(jobs[i].later_error, -ECONNRESET);
        assert_true(jobs[i].failed_at - killed_at < SAFETY_MS / 2);
    }
    assert_int_equal(moor_redis_error(shared), -ECONNRESET);
    assert_int_equal(moor_redis_command(shared, safety(), NULL, "PING"), -ECONNRESET);
    assert_int_equal(moor_redis_subscribe(sub, "kill:other", safety()), -ECONNRESET);
    moor_redis_close(shared);
    moor_redis_close(blocked);
    moor_redis_close(sub);
    for (int i = 0; i < KILL_OWN; i++)
        moor_redis_close(own[i]);
    ex_free(ex);
}

/* ---- giving up: cancellation and deadlines ------------------------------------------------ */

typedef struct call {
    moor_redis *conn;
    const char *cmd;
    int rc;
    redisReply *reply;
    int64_t returned_at;
} call;

static intptr_t call_fiber(void *arg)
{
    call *c = arg;
    c->rc = moor_redis_command(c->conn, safety(), &c->reply, c->cmd);
    c->returned_at = moor_now();
    return 0;
}

/* Scribble over a stack the cancelled fiber's frames were on (the pool hands it out again). */
static intptr_t scribble(void *arg)
{
    (void)arg;
    volatile char junk[16384];
    memset((char *)junk, 0xa5, sizeof junk);
    moor_yield();
    return junk[100];
}

/* A fiber cancelled while its BLPOP is pending returns -ECANCELED at once; the reply comes
 * later (the list is pushed to), after the fiber has gone and its stack has been reused, and
 * is freed by the promise; the next command on the connection gets its own reply. */
static void test_redis_cancel_while_pending(void **state)
{
    (void)state;
    NEED_SERVER();
    moor_executor *ex = ex_new();
    moor_redis *c = NULL, *other = NULL;
    assert_int_equal(moor_redis_connect("127.0.0.1", server.port, safety(), &c), 0);
    assert_int_equal(moor_redis_connect("127.0.0.1", server.port, safety(), &other), 0);
    assert_int_equal(moor_redis_command(c, safety(), NULL, "DEL cancel:list"), 0);
    call blpop = {.conn = c, .cmd = "BLPOP cancel:list 10"};
    moor_fiber *f;
    assert_int_equal(moor_spawn(&f, call_fiber, &blpop, NULL), 0);
    moor_sleep(moor_deadline_in(WAIT_MS)); /* on the wire, the server holds it */
    int64_t t0 = moor_now();
    moor_cancel(f);
    assert_int_equal(moor_join(f, NULL), -ECANCELED); /* it was cancelled */
    assert_int_equal(blpop.rc, -ECANCELED);
    assert_null(blpop.reply);
    assert_true(blpop.returned_at - t0 < SAFETY_MS / 2);
    for (int i = 0; i < 4; i++) {
        moor_fiber *s;
        assert_int_equal(moor_spawn(&s, scribble, NULL, NULL), 0);
        assert_int_equal(moor_join(s, NULL), 0);
    }
    /* Now the reply: an array, to the promise alone. */
    redisReply *r = NULL;
    assert_int_equal(moor_redis_command(other, safety(), &r, "RPUSH cancel:list late"), 0);
    assert_int_equal(r->integer, 1);
    moor_redis_reply_free(r);
    assert_int_equal(moor_redis_command(c, safety(), &r, "ECHO mine"), 0);
    assert_int_equal(r->type, REDIS_REPLY_STRING);
    assert_string_equal(r->str, "mine");
    moor_redis_reply_free(r);
    /* The BLPOP did run: the list is empty again. */
    assert_int_equal(moor_redis_command(c, safety(), &r, "LLEN cancel:list"), 0);
    assert_int_equal(r->integer, 0);
    moor_redis_reply_free(r);
    moor_redis_close(other);
    moor_redis_close(c);
    ex_free(ex);
}

/* A deadline shorter than the command: -ETIMEDOUT no earlier than the deadline; the commands
 * queued behind it on the connection still get their own replies, in order, once the server
 * is done with it. */
static void test_redis_deadline_then_replies_in_order(void **state)
{
    (void)state;
    NEED_SERVER();
    moor_executor *ex = ex_new();
    moor_redis *c = NULL;
    assert_int_equal(moor_redis_connect("127.0.0.1", server.port, safety(), &c), 0);
    assert_int_equal(moor_redis_command(c, safety(), NULL, "DEL deadline:list deadline:n"), 0);
    call after[3] = {
        {.conn = c, .cmd = "ECHO first"},
        {.conn = c, .cmd = "INCR deadline:n"},
        {.conn = c, .cmd = "ECHO third"},
    };
    int64_t t0 = moor_now();
    int64_t deadline = moor_deadline_in(5 * WAIT_MS);
    moor_fiber *f[3];
    /* The server holds BLPOP for 1 s, longer than the deadline. */
    redisReply *r = NULL;
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_spawn(&f[i], call_fiber, &after[i], NULL), 0);
    /* The three are spawned first but run only when this call suspends: BLPOP goes out
     * first, they queue behind it. */
    assert_int_equal(moor_redis_command(c, deadline, &r, "BLPOP deadline:list 1"), -ETIMEDOUT);
    assert_true(moor_now() >= deadline);
    assert_null(r);
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    assert_true(after[0].returned_at - t0 >= 900); /* behind the server's 1 s */
    assert_int_equal(after[0].rc, 0);
    assert_string_equal(after[0].reply->str, "first");
    assert_int_equal(after[1].rc, 0);
    assert_int_equal(after[1].reply->type, REDIS_REPLY_INTEGER);
    assert_int_equal(after[1].reply->integer, 1);
    assert_int_equal(after[2].rc, 0);
    assert_string_equal(after[2].reply->str, "third");
    for (int i = 0; i < 3; i++)
        moor_redis_reply_free(after[i].reply);
    moor_redis_close(c);
    ex_free(ex);
}

/* moor_redis_close with commands pending in other fibers: they return -ECONNABORTED. */
static void test_redis_close_with_commands_pending(void **state)
{
    (void)state;
    NEED_SERVER();
    moor_executor *ex = ex_new();
    moor_redis *c = NULL;
    assert_int_equal(moor_redis_connect("127.0.0.1", server.port, safety(), &c), 0);
    call calls[3] = {
        {.conn = c, .cmd = "BLPOP close:never 10"},
        {.conn = c, .cmd = "PING"},
        {.conn = c, .cmd = "PING"},
    };
    moor_fiber *f[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(moor_spawn(&f[i], call_fiber, &calls[i], NULL), 0);
    moor_sleep(moor_deadline_in(WAIT_MS));
    moor_redis_close(c);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(moor_join(f[i], NULL), 0);
        assert_int_equal(calls[i].rc, -ECONNABORTED);
    }
    ex_free(ex);
}

static intptr_t wait_message(void *arg)
{
    moor_redis_message *msg;
    return moor_redis_next_message(arg, safety(), &msg);
}

static void close_under_waiter(void *arg)
{
    (void)arg;
    moor_executor *ex = NULL;
    CHILD_REQUIRE(moor_executor_new(&ex, NULL) == 0);
    moor_redis *c = NULL;
    CHILD_REQUIRE(moor_redis_connect("127.0.0.1", server.port, safety(), &c) == 0);
    CHILD_REQUIRE(moor_redis_subscribe(c, "misuse:chan", safety()) == 0);
    moor_fiber *f;
    CHILD_REQUIRE(moor_spawn(&f, wait_message, c, NULL) == 0);
    moor_sleep(moor_deadline_in(WAIT_MS));
    moor_redis_close(c); /* aborts */
}

/* Closing a connection that a fiber waits on for a message is misuse, said and aborted. */
static void test_redis_close_under_message_waiter_aborts(void **state)
{
    (void)state;
    NEED_SERVER();
    child_report r;
    child_run(close_under_waiter, NULL, &r);
    expect_child_signal(&r, SIGABRT, "still wait in moor_redis_next_message");
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_redis_shared_connection_counts),
        TEST(test_redis_connection_per_fiber_counts),
        TEST(test_redis_reply_types),
        TEST(test_redis_connect_refused),
        TEST(test_redis_connect_deadline),
        TEST(test_redis_pubsub_in_order),
        TEST(test_redis_pubsub_close_with_messages_queued),
        TEST(test_redis_server_killed_mid_way),
        TEST(test_redis_cancel_while_pending),
        TEST(test_redis_deadline_then_replies_in_order),
        TEST(test_redis_close_with_commands_pending),
        TEST(test_redis_close_under_message_waiter_aborts),
    };
    fixture_filter();
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
