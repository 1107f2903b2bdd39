/*
 * moor_redis — hiredis' async API made awaitable: a fiber sends a command and gets its reply
 * as if the call blocked, while the executor serves every other fiber.
 *
 * An example of adapting a callback library with moor_promise (<moor/future.h>), not part of
 * libmoor: it links hiredis (0.14's async API and its libev adapter) and moor. A connection's
 * redisAsyncContext is attached to the executor's own libev loop (moor_executor_loop), so
 * hiredis' callbacks run on the executor's thread, between fibers, and each one only resolves
 * a promise or queues a message: no fiber runs inside hiredis.
 *
 * Sharing. Many fibers of one executor may share one connection: their commands go out in
 * the order they are made and are pipelined (hiredis queues them in its output buffer and
 * writes them together at the loop's next turn); each fiber gets its own reply. A connection
 * belongs to the executor of the thread that made it.
 *
 * Giving up. A call with a deadline, or in a fiber that is cancelled, returns -ETIMEDOUT or
 * -ECANCELED while its command may still be on the wire. The command is not withdrawn (Redis
 * has no way to): it still runs, its reply still comes back in its turn and is freed by the
 * adapter; replies of later commands on the connection are not shifted by it. The callback
 * that receives the late reply touches only the command's promise, never the stack of the
 * fiber that gave up.
 *
 * Connection loss. When hiredis sees the connection fail (the server closed it or crashed, a
 * read or write failed), every command pending on it returns -ECONNRESET (-EPROTO for a
 * protocol error), and so does every later command, at once, without touching the network;
 * a fiber waiting in moor_redis_next_message gets the same code once the messages queued
 * before the loss are drained. moor_redis_error says whether that has happened. moor_redis
 * never reconnects: the caller decides whether and when to, closes the dead connection and
 * makes a new one (commands that were pending may or may not have run on the server).
 *
 * In a fiber:
 *
 *     moor_redis *conn;
 *     int rc = moor_redis_connect("127.0.0.1", 6379, moor_deadline_in(1000), &conn);
 *     if (rc < 0)
 *         return rc;
 *     redisReply *r;
 *     rc = moor_redis_command(conn, moor_deadline_in(100), &r, "INCR %s", key);
 *     if (rc == 0) {
 *         use(r->integer);             (or r->type == REDIS_REPLY_ERROR: Redis said no)
 *         moor_redis_reply_free(r);
 *     }
 *     moor_redis_close(conn);
 *
 * Host names: hiredis resolves the host with a blocking getaddrinfo() inside
 * moor_redis_connect; use a numeric address ("127.0.0.1") to keep the executor unblocked.
 */
#ifndef MOOR_REDIS_H
#define MOOR_REDIS_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <hiredis/hiredis.h>

#include <moor.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A connection: opaque, made by moor_redis_connect, freed by moor_redis_close. */
typedef struct moor_redis moor_redis;

/* Connect to host:port and wait, as if blocking, until the connection is up. May suspend;
 * from plain code it runs the executor meanwhile. Errors: -ECONNREFUSED and other -errno of
 * connect(2), -ETIMEDOUT (the deadline passed first: the attempt is abandoned), -ECANCELED,
 * -ENOMEM (also: the executor has no event loop), -EINVAL (hiredis could not even start:
 * an address it cannot resolve, say). */
int moor_redis_connect(const char *host, int port, int64_t deadline, moor_redis **out);

/* Close the connection and free it; call it before moor_executor_free (the connection's
 * watchers are on the executor's loop). Commands still pending in other fibers return
 * -ECONNABORTED (their replies, if any come, are freed). Never suspends. Misuse (abort, with
 * a message): a fiber is still waiting in moor_redis_next_message on it (the message queue
 * lives in conn). */
void moor_redis_close(moor_redis *conn);

/* 0 while the connection is usable; once it has failed, the error every command now returns
 * (-ECONNRESET, -EPROTO, -ENOMEM). */
int moor_redis_error(const moor_redis *conn);

/* Send a command (hiredis' printf-like format: "SET %s %b", key, val, vallen) and wait for
 * its reply. On success returns 0 and stores in *reply a copy that the caller owns and frees
 * with moor_redis_reply_free (not freeReplyObject: the copy is one allocation). A Redis error
 * reply ("WRONGTYPE ...") is a reply: 0, with (*reply)->type == REDIS_REPLY_ERROR.
 * reply may be NULL when the reply does not matter (it is freed).
 * Errors: -ETIMEDOUT, -ECANCELED (the command may still run; see "Giving up"), -ECONNRESET or
 * -EPROTO (the connection failed, before or while the command was pending), -ECONNABORTED
 * (moor_redis_close while pending), -EBUSY (the connection is subscribed: it takes no plain
 * commands), -EINVAL (hiredis refused the command: a bad format), -ENOMEM.
 * May suspend the calling fiber; from plain code it runs the executor. */
int moor_redis_command(moor_redis *conn, int64_t deadline, redisReply **reply,
                       const char *fmt, ...);
int moor_redis_vcommand(moor_redis *conn, int64_t deadline, redisReply **reply,
                        const char *fmt, va_list ap);
/* The same with the arguments as an array (argvlen NULL: each is a C string). */
int moor_redis_command_argv(moor_redis *conn, int64_t deadline, redisReply **reply, int argc,
                            const char **argv, const size_t *argvlen);

/* The same with a command already in Redis' wire format (RESP), as redisFormatCommand or
 * redisFormatCommandArgv make it: a program that sends one command many times formats it
 * once (hiredis 0.14's formatting costs thousands of instructions a command). cmd is copied
 * before the call suspends. */
int moor_redis_command_formatted(moor_redis *conn, int64_t deadline, redisReply **reply,
                                 const char *cmd, size_t len);

/* Free a reply from moor_redis_command. NULL is fine. */
void moor_redis_reply_free(redisReply *reply);

/* ------------------------------------------------------------------------------------------
 * Pub/sub. A connection that subscribes is dedicated to it from then on (Redis allows only
 * (P)SUBSCRIBE-family commands on it; here plain commands return -EBUSY). The messages of
 * all its channels are queued in the connection, in the order the server sent them, until a
 * fiber takes them with moor_redis_next_message: none is dropped, so a subscriber that falls
 * behind costs memory (moor_redis_pending says how much is waiting).
 * ---------------------------------------------------------------------------------------- */

/* A published message: one allocation holding both strings (NUL-terminated as well as
 * counted), owned by the caller, freed with moor_redis_message_free. */
typedef struct moor_redis_message {
    char *channel;      /* read-only */
    size_t channel_len; /* read-only */
    char *payload;      /* read-only */
    size_t len;         /* read-only: payload's length */
} moor_redis_message;

/* Subscribe conn to a channel and wait until the server has confirmed it: every message
 * published after that is delivered. May be called again for more channels (their messages
 * share the one queue; msg->channel tells them apart). Errors as moor_redis_command but
 * -EBUSY. On -ETIMEDOUT or -ECANCELED the subscription may still take effect. May suspend. */
int moor_redis_subscribe(moor_redis *conn, const char *channel, int64_t deadline);

/* Take the next message of a subscribed connection, waiting for one until the deadline.
 * Returns 0 with *msg set; -ETIMEDOUT, -ECANCELED (no message is lost: it stays queued);
 * the connection's error once it has failed and its queue is drained; -EINVAL if conn has
 * not subscribed. May suspend. Several fibers may wait: each message goes to one of them, in
 * the order they began to wait. */
int moor_redis_next_message(moor_redis *conn, int64_t deadline, moor_redis_message **msg);

/* Messages queued in conn, not yet taken. */
size_t moor_redis_pending(const moor_redis *conn);

void moor_redis_message_free(moor_redis_message *msg);

#ifdef __cplusplus
}
#endif

#endif /* MOOR_REDIS_H */
