/* moor_redis: hiredis' async API over moor promises. See redis.h for the contract.
 *
 * Who touches what. A fiber that sends a command makes a promise, hands it to hiredis as the
 * command's privdata and awaits it. hiredis calls on_reply from the executor's libev loop
 * (between fibers) with the reply, which it frees when on_reply returns: on_reply copies it
 * and resolves the promise with the copy. If the fiber has given up by then, the promise
 * frees the copy with drop_reply; on_reply never learns of it and never needs to. So the only
 * memory a callback touches is the promise (alive until its resolve), the connection
 * (alive until moor_redis_close, which frees hiredis' context first and with it every
 * callback still due) and hiredis' own.
 *
 * Subscriptions are the one place hiredis calls back many times with one privdata (the
 * connection): on_message queues each message in the connection and releases a semaphore
 * permit per message, which moor_redis_next_message acquires.
 */
#include "redis.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>

/* A SUBSCRIBE waiting for the server's confirmation; confirmations come in the order the
 * commands were sent, so they form a FIFO. */
typedef struct pending_sub {
    struct pending_sub *next;
    moor_promise *promise; /* resolver's half: resolved with 0 or an error */
} pending_sub;

/* A queued message: the public part first, so that the whole block is what the caller
 * frees. */
typedef struct queued_msg {
    moor_redis_message msg;
    struct queued_msg *next;
} queued_msg;

struct moor_redis {
    redisAsyncContext *ac; /* NULL once hiredis has freed it (connection lost) or never
                              connected */
    int err;               /* 0, or the error every command now returns */
    int closing;           /* moor_redis_close is freeing the context */
    moor_promise *connecting; /* resolver's half of the connect wait, NULL once resolved */
    /* pub/sub */
    int subscribed;
    pending_sub *subs_head, *subs_tail;
    queued_msg *msgs_head, *msgs_tail;
    size_t msgs_len;
    moor_sem msgs_ready; /* a permit per queued message, plus one once err is set */
    size_t msg_waiters;  /* fibers inside moor_redis_next_message: close must find none */
};

/* ---- errors -------------------------------------------------------------------------- */

/* The code a command returns when hiredis gives it no reply: the context is being freed by
 * moor_redis_close, or hiredis saw the connection fail (its ac->err says how). */
static int loss_code(const moor_redis *conn, const redisAsyncContext *ac)
{
    if (conn->closing)
        return -ECONNABORTED;
    switch (ac->err) {
    case REDIS_ERR_PROTOCOL:
        return -EPROTO;
    case REDIS_ERR_OOM:
        return -ENOMEM;
    default: /* REDIS_ERR_EOF, REDIS_ERR_IO, REDIS_ERR_OTHER */
        return -ECONNRESET;
    }
}

/* The connection has failed (or is being closed): record why, once, and wake whoever waits
 * for the subscription's confirmations or messages. Idempotent. */
static void conn_fail(moor_redis *conn, int code)
{
    if (conn->err)
        return;
    conn->err = code;
    while (conn->subs_head) {
        pending_sub *s = conn->subs_head;
        conn->subs_head = s->next;
        moor_promise_resolve(s->promise, code);
        free(s);
    }
    conn->subs_tail = NULL;
    if (conn->subscribed)
        moor_sem_release(&conn->msgs_ready); /* passed on by each waiter that finds no message */
}

/* ---- replies --------------------------------------------------------------------------- */

/* A reply copied into one allocation: every redisReply node first (the top one at the start,
 * so that free() of it frees all), then the element pointer arrays, then the strings. */
typedef struct reply_size {
    size_t nodes, ptrs, bytes;
} reply_size;

typedef struct reply_cursor {
    redisReply *node;
    redisReply **ptr;
    char *byte;
} reply_cursor;

static void reply_measure(const redisReply *r, reply_size *sz)
{
    sz->nodes++;
    if (r->type == REDIS_REPLY_ARRAY) {
        sz->ptrs += r->elements;
        for (size_t i = 0; i < r->elements; i++)
            reply_measure(r->element[i], sz);
    } else if (r->str) {
        sz->bytes += r->len + 1;
    }
}

static redisReply *reply_fill(const redisReply *r, reply_cursor *c)
{
    redisReply *out = c->node++;
    *out = (redisReply){.type = r->type, .integer = r->integer, .len = r->len};
    if (r->type == REDIS_REPLY_ARRAY) {
        out->elements = r->elements;
        out->element = r->elements ? c->ptr : NULL;
        c->ptr += r->elements;
        for (size_t i = 0; i < r->elements; i++)
            out->element[i] = reply_fill(r->element[i], c);
    } else if (r->str) {
        out->str = c->byte;
        memcpy(out->str, r->str, r->len);
        out->str[r->len] = '\0';
        c->byte += r->len + 1;
    }
    return out;
}

static redisReply *reply_copy(const redisReply *r)
{
    reply_size sz = {0, 0, 0};
    reply_measure(r, &sz);
    char *block = malloc(sz.nodes * sizeof(redisReply) + sz.ptrs * sizeof(redisReply *) +
                         sz.bytes);
    if (!block)
        return NULL;
    reply_cursor c = {
        .node = (redisReply *)(void *)block,
        .ptr = (redisReply **)(void *)(block + sz.nodes * sizeof(redisReply)),
        .byte = block + sz.nodes * sizeof(redisReply) + sz.ptrs * sizeof(redisReply *),
    };
    return reply_fill(r, &c);
}

void moor_redis_reply_free(redisReply *reply)
{
    free(reply);
}

/* The promise's drop function: a reply that no fiber received. */
static void drop_reply(intptr_t value)
{
    if (value > 0)
        free((void *)value);
}

/* hiredis' reply callback of a plain command: privdata is the command's promise. */
static void on_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    moor_redis *conn = ac->data;
    intptr_t value;
    if (!r) {
        value = loss_code(conn, ac);
    } else {
        redisReply *copy = reply_copy(r);
        value = copy ? (intptr_t)copy : -ENOMEM;
    }
    moor_promise_resolve(privdata, value);
}

/* After hiredis took the command (or refused it, rc < 0): wait for the promise. */
static int await_reply(moor_promise *p, int sent, moor_redis *conn, int64_t deadline,
                       redisReply **reply)
{
    if (sent != REDIS_OK) {
        /* hiredis kept no callback: the promise's two halves are both ours to drop. */
        moor_promise_resolve(p, 0);
        moor_promise_drop(p);
        return conn->err ? conn->err : -EINVAL;
    }
    intptr_t v = moor_promise_await(p, deadline);
    if (v < 0)
        return (int)v;
    if (reply)
        *reply = (redisReply *)v;
    else
        free((void *)v);
    return 0;
}

/* What a command must find before it is sent; 0 if it may go. */
static int command_check(const moor_redis *conn)
{
    if (conn->err)
        return conn->err;
    if (conn->subscribed)
        return -EBUSY;
    return 0;
}

/* Before a command is sent: the connection may take it, and its promise is made. */
static int command_begin(moor_redis *conn, moor_promise **p)
{
    int rc = command_check(conn);
    return rc < 0 ? rc : moor_promise_new(p, drop_reply);
}

int moor_redis_vcommand(moor_redis *conn, int64_t deadline, redisReply **reply,
                        const char *fmt, va_list ap)
{
    moor_promise *p;
    int rc = command_begin(conn, &p);
    if (rc < 0)
        return rc;
    int sent = redisvAsyncCommand(conn->ac, on_reply, p, fmt, ap);
    return await_reply(p, sent, conn, deadline, reply);
}

int moor_redis_command(moor_redis *conn, int64_t deadline, redisReply **reply,
                       const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int rc = moor_redis_vcommand(conn, deadline, reply, fmt, ap);
    va_end(ap);
    return rc;
}

int moor_redis_command_argv(moor_redis *conn, int64_t deadline, redisReply **reply, int argc,
                            const char **argv, const size_t *argvlen)
{
    moor_promise *p;
    int rc = command_begin(conn, &p);
    if (rc < 0)
        return rc;
    int sent = redisAsyncCommandArgv(conn->ac, on_reply, p, argc, argv, argvlen);
    return await_reply(p, sent, conn, deadline, reply);
}

int moor_redis_command_formatted(moor_redis *conn, int64_t deadline, redisReply **reply,
                                 const char *cmd, size_t len)
{
    moor_promise *p;
    int rc = command_begin(conn, &p);
    if (rc < 0)
        return rc;
    int sent = redisAsyncFormattedCommand(conn->ac, on_reply, p, cmd, len);
    return await_reply(p, sent, conn, deadline, reply);
}

/* ---- connecting and closing -------------------------------------------------------------- */

static void on_connect(const redisAsyncContext *ac, int status)
{
    moor_redis *conn = ac->data;
    /* On failure hiredis calls us with errno still that of the socket error, then frees the
     * context as soon as we return (without a disconnect callback: it never connected). */
    int code = 0;
    if (status != REDIS_OK) {
        code = errno > 0 ? -errno : -ECONNREFUSED;
        conn->ac = NULL;
        conn->err = code;
    }
    if (conn->connecting) {
        moor_promise_resolve(conn->connecting, code);
        conn->connecting = NULL;
    }
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    (void)status;
    moor_redis *conn = ac->data;
    conn_fail(conn, loss_code(conn, ac));
    conn->ac = NULL; /* hiredis frees it when we return */
}

int moor_redis_connect(const char *host, int port, int64_t deadline, moor_redis **out)
{
    struct ev_loop *loop = moor_executor_loop(moor_executor_current());
    if (!loop)
        return -ENOMEM;
    moor_redis *conn = calloc(1, sizeof *conn);
    if (!conn)
        return -ENOMEM;
    conn->msgs_ready = (moor_sem)MOOR_SEM_INIT(0);
    moor_promise *wait;
    int rc = moor_promise_new(&wait, NULL);
    if (rc < 0) {
        free(conn);
        return rc;
    }
    redisAsyncContext *ac = redisAsyncConnect(host, port);
    if (!ac || ac->err || redisLibevAttach(loop, ac) != REDIS_OK) {
        rc = !ac ? -ENOMEM : ac->err == REDIS_ERR_IO && errno > 0 ? -errno
                           : ac->err ? -EINVAL : -ENOMEM;
        if (ac)
            redisAsyncFree(ac);
        /* Never awaited, never handed out: both halves are ours. */
        moor_promise_resolve(wait, 0);
        moor_promise_drop(wait);
        free(conn);
        return rc;
    }
    ac->data = conn;
    conn->ac = ac;
    conn->connecting = wait;
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    redisAsyncSetConnectCallback(ac, on_connect); /* starts the write watcher that sees it */

    rc = (int)moor_promise_await(wait, deadline);
    if (rc == 0) {
        *out = conn;
        return 0;
    }
    /* Refused (on_connect saw it; hiredis has freed the context), or we gave up: abandon the
     * attempt. Once the context is freed no connect callback can come, so the resolver's
     * half, if on_connect has not dropped it, is ours to drop. */
    if (conn->ac) {
        conn->closing = 1;
        redisAsyncFree(conn->ac);
    }
    if (conn->connecting)
        moor_promise_resolve(conn->connecting, 0);
    free(conn);
    return rc;
}

void moor_redis_close(moor_redis *conn)
{
    if (conn->msg_waiters) {
        fprintf(stderr, "moor_redis_close: %zu fibers still wait in moor_redis_next_message on "
                "this connection\n", conn->msg_waiters);
        abort();
    }
    if (conn->ac) {
        conn->closing = 1;
        /* Runs every callback still due with no reply (on_reply resolves its promise with
         * -ECONNABORTED, on_message fails the subscription), then on_disconnect. */
        redisAsyncFree(conn->ac);
        conn->ac = NULL;
    }
    conn_fail(conn, -ECONNABORTED);
    while (conn->msgs_head) {
        queued_msg *q = conn->msgs_head;
        conn->msgs_head = q->next;
        free(q);
    }
    free(conn);
}

int moor_redis_error(const moor_redis *conn)
{
    return conn->err;
}

/* ---- pub/sub ------------------------------------------------------------------------------ */

static int is_kind(const redisReply *r, const char *kind)
{
    size_t n = strlen(kind);
    return r->type == REDIS_REPLY_STRING && r->len == n && memcmp(r->str, kind, n) == 0;
}

static void queue_message(moor_redis *conn, const redisReply *chan, const redisReply *payload)
{
    queued_msg *q = malloc(sizeof *q + chan->len + 1 + payload->len + 1);
    if (!q) {
        conn_fail(conn, -ENOMEM); /* a lost message must not pass unnoticed */
        return;
    }
    char *text = (char *)(q + 1);
    q->msg.channel = text;
    q->msg.channel_len = chan->len;
    memcpy(text, chan->str, chan->len);
    text[chan->len] = '\0';
    q->msg.payload = text + chan->len + 1;
    q->msg.len = payload->len;
    memcpy(q->msg.payload, payload->str, payload->len);
    q->msg.payload[payload->len] = '\0';
    q->next = NULL;
    if (conn->msgs_tail)
        conn->msgs_tail->next = q;
    else
        conn->msgs_head = q;
    conn->msgs_tail = q;
    conn->msgs_len++;
    moor_sem_release(&conn->msgs_ready);
}

/* hiredis' callback for every reply on a subscribed channel (privdata is the connection):
 * the confirmation of a SUBSCRIBE, then each message; NULL when the context goes. */
static void on_message(redisAsyncContext *ac, void *r, void *privdata)
{
    moor_redis *conn = privdata;
    const redisReply *reply = r;
    if (!reply) {
        conn_fail(conn, loss_code(conn, ac));
        return;
    }
    if (reply->type != REDIS_REPLY_ARRAY || reply->elements < 3)
        return;
    if (is_kind(reply->element[0], "message")) {
        if (!conn->err)
            queue_message(conn, reply->element[1], reply->element[2]);
    } else if (is_kind(reply->element[0], "subscribe")) {
        pending_sub *s = conn->subs_head;
        if (!s)
            return;
        conn->subs_head = s->next;
        if (!conn->subs_head)
            conn->subs_tail = NULL;
        moor_promise_resolve(s->promise, 0);
        free(s);
    }
}

int moor_redis_subscribe(moor_redis *conn, const char *channel, int64_t deadline)
{
    if (conn->err)
        return conn->err;
    pending_sub *s = malloc(sizeof *s);
    if (!s)
        return -ENOMEM;
    int rc = moor_promise_new(&s->promise, NULL);
    if (rc < 0) {
        free(s);
        return rc;
    }
    moor_promise *p = s->promise;
    if (redisAsyncCommand(conn->ac, on_message, conn, "SUBSCRIBE %s", channel) != REDIS_OK) {
        moor_promise_resolve(p, 0);
        moor_promise_drop(p);
        free(s);
        return -EINVAL;
    }
    conn->subscribed = 1;
    s->next = NULL;
    if (conn->subs_tail)
        conn->subs_tail->next = s;
    else
        conn->subs_head = s;
    conn->subs_tail = s;
    return (int)moor_promise_await(p, deadline);
}

int moor_redis_next_message(moor_redis *conn, int64_t deadline, moor_redis_message **msg)
{
    if (!conn->subscribed)
        return -EINVAL;
    if (!conn->msgs_head && conn->err)
        return conn->err;
    conn->msg_waiters++;
    int rc = moor_sem_acquire(&conn->msgs_ready, deadline);
    conn->msg_waiters--;
    if (rc < 0)
        return rc;
    queued_msg *q = conn->msgs_head;
    if (!q) {
        /* The permit was the failure's: pass it on to the next waiter. */
        moor_sem_release(&conn->msgs_ready);
        return conn->err;
    }
    conn->msgs_head = q->next;
    if (!conn->msgs_head)
        conn->msgs_tail = NULL;
    conn->msgs_len--;
    *msg = &q->msg;
    return 0;
}

size_t moor_redis_pending(const moor_redis *conn)
{
    return conn->msgs_len;
}

void moor_redis_message_free(moor_redis_message *msg)
{
    free(msg); /* the start of its queued_msg block */
}
