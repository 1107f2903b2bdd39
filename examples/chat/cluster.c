/* moor-chat --redis HOST:PORT: one room over several moor-chat processes, through Redis.
 *
 * Each instance has a random id and two connections (moor_redis, examples/redis): one for
 * commands, one subscribed to the room's channel. Every event of a local client is one
 * message on the channel, "<id> <kind> <nick>[ <rest>]":
 *
 *   L nick text       a line (any bytes)        J nick      joined
 *   N old new         a nick change             Q nick      left
 *
 * Each instance delivers to its local clients the messages of every other id, never its own
 * (its clients heard those already). A client's events are published from its reader, one
 * at a time, on the one command connection, and the one subscriber connection receives them
 * in the order Redis took them: so each receiver sees each sender's lines in order.
 *
 * Keys (all under "moor-chat:"), changed only by the Lua scripts below, each atomic:
 *
 *   nick:<nick>       the id that holds the nick: SET NX with a TTL of TTL_S seconds,
 *                     renewed by every heartbeat; given back (DEL if still ours) on leave
 *   members:<id>      the nicks of instance id's clients (for /who and for its wake)
 *   instance:<id>     alive: a heartbeat key, TTL_S seconds, renewed every BEAT_MS
 *   instances         the ids that have registered and not been swept
 *   guests            the guest<N> counter, over every instance
 *
 * An instance that dies stops renewing: its heartbeat key and its nicks expire, and the next
 * heartbeat of any survivor (the sweep is in the heartbeat script, so exactly one survivor
 * does it) publishes a `Q` for each of its members, in its name. So its clients are `left`
 * for everyone else within TTL_S + BEAT_MS.
 *
 * When Redis goes (a command fails, the subscription ends), the instance says so on stderr
 * and to its clients, serves them as a room of its own, and tries again with a backoff. Back,
 * it registers again: its clients' nicks are claimed anew (a nick another instance took
 * meanwhile is exchanged for a fresh guest name), and if the others had taken it for dead,
 * its clients join again in their eyes. What was said while the room was split stays on its
 * side.
 *
 * The scripts touch keys they do not declare (fine on one Redis server, not on a cluster).
 */
#include <moor.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "redis.h"

#include "chat.h"
#include "cluster.h"

#define CHANNEL "moor-chat:room"
#define ID_LEN (16)
#define TTL_S "3"               /* seconds: heartbeat and nick keys live this long unrenewed */
#define BEAT_MS (1000)          /* renewal, and the sweep for dead instances */
#define COMMAND_MS (2000)       /* a command that takes longer: Redis is taken as gone */
#define CONNECT_MS (1000)
#define BACKOFF_MIN_MS (100)
#define BACKOFF_MAX_MS (2000)

static struct {
    const char *host;
    int port;
    char id[ID_LEN + 1];
    moor_redis *cmd;            /* commands and publishes; NULL while the link is down */
    moor_redis *sub;            /* subscribed to CHANNEL; NULL while down */
    int up;                     /* cmd and sub are there: events are published */
    unsigned gen;               /* counts connections: a failure of an older one is old news */
    int fail;                   /* the error that ended the current connection, or 0 */
    int stopping;
    unsigned long long joins_sent; /* lua_join scripts sent (cluster_join's tickets) */
    unsigned long long joins_seen; /* their J messages that have come back */
    moor_sem kick;              /* the link's fiber looks again: a failure, or the stop */
    moor_event started;         /* the first attempt to connect is over */
    moor_fiber *link;
} cl;

static const moor_fiber_attr link_attr = {.name = "redis link", .stack_size = 64 * 1024};
static const moor_fiber_attr listener_attr = {.name = "redis listener", .stack_size = 64 * 1024};

/* Give a client's instance a new guest name: the script's way, also used by REGISTER. */
#define LUA_NEW_GUEST                                                                         \
    "local function new_guest(id, ttl)\n"                                                    \
    "  while true do\n"                                                                      \
    "    local n = redis.call('INCR', 'moor-chat:guests')\n"                                 \
    "    if redis.call('SET', 'moor-chat:nick:guest' .. n, id, 'NX', 'EX', ttl) then\n"      \
    "      return n\n"                                                                       \
    "    end\n"                                                                              \
    "  end\n"                                                                                \
    "end\n"

/* ARGV: id, ttl. A new guest<N> claimed for id, in its members, its join published. */
static const char lua_join[] =
    LUA_NEW_GUEST
    "local id = ARGV[1]\n"
    "local n = new_guest(id, ARGV[2])\n"
    "redis.call('SADD', 'moor-chat:members:' .. id, 'guest' .. n)\n"
    "redis.call('PUBLISH', '" CHANNEL "', id .. ' J guest' .. n)\n"
    "return n\n";

/* ARGV: id, old, new, ttl. 1 with the nick moved, or 0 if another instance holds new. */
static const char lua_rename[] =
    "local id, old, new = ARGV[1], ARGV[2], ARGV[3]\n"
    "local cur = redis.call('GET', 'moor-chat:nick:' .. new)\n"
    "if cur and cur ~= id then return 0 end\n"
    "redis.call('SET', 'moor-chat:nick:' .. new, id, 'EX', ARGV[4])\n"
    "local mk = 'moor-chat:members:' .. id\n"
    "redis.call('SREM', mk, old)\n"
    "redis.call('SADD', mk, new)\n"
    "if old ~= new and redis.call('GET', 'moor-chat:nick:' .. old) == id then\n"
    "  redis.call('DEL', 'moor-chat:nick:' .. old)\n"
    "end\n"
    "redis.call('PUBLISH', '" CHANNEL "', id .. ' N ' .. old .. ' ' .. new)\n"
    "return 1\n";

/* ARGV: id, nick. The nick given back, its leave published. */
static const char lua_leave[] =
    "local id, nick = ARGV[1], ARGV[2]\n"
    "redis.call('SREM', 'moor-chat:members:' .. id, nick)\n"
    "if redis.call('GET', 'moor-chat:nick:' .. nick) == id then\n"
    "  redis.call('DEL', 'moor-chat:nick:' .. nick)\n"
    "end\n"
    "redis.call('PUBLISH', '" CHANNEL "', id .. ' Q ' .. nick)\n"
    "return 1\n";

/* ARGV: id, ttl, guests, then every local nick. Registers id as alive with exactly these
 * members, each nick claimed for it; a nick another instance holds is exchanged for a new
 * guest name. If the others had taken id for dead (its heartbeat expired), its old members
 * leave and the new ones join, in the others' eyes. The guest counter goes up to `guests`
 * (the highest this instance has seen: a Redis that restarted empty starts from there).
 * Returns {old1, new1, old2, new2, ...}: the exchanged names. */
static const char lua_register[] =
    LUA_NEW_GUEST
    "local id, ttl = ARGV[1], ARGV[2]\n"
    "local guests = tonumber(ARGV[3])\n"
    "if (tonumber(redis.call('GET', 'moor-chat:guests')) or 0) < guests then\n"
    "  redis.call('SET', 'moor-chat:guests', guests)\n"
    "end\n"
    "local ik, mk = 'moor-chat:instance:' .. id, 'moor-chat:members:' .. id\n"
    "local alive = redis.call('EXISTS', ik) == 1\n"
    "if not alive then\n"
    "  for _, nick in ipairs(redis.call('SMEMBERS', mk)) do\n"
    "    redis.call('PUBLISH', '" CHANNEL "', id .. ' Q ' .. nick)\n"
    "  end\n"
    "end\n"
    "redis.call('DEL', mk)\n"
    "redis.call('SET', ik, '1', 'EX', ttl)\n"
    "redis.call('SADD', 'moor-chat:instances', id)\n"
    "local out = {}\n"
    "for i = 4, #ARGV do\n"
    "  local nick = ARGV[i]\n"
    "  local cur = redis.call('GET', 'moor-chat:nick:' .. nick)\n"
    "  if cur and cur ~= id then\n"
    "    nick = 'guest' .. new_guest(id, ttl)\n"
    "    out[#out + 1] = ARGV[i]\n"
    "    out[#out + 1] = nick\n"
    "  else\n"
    "    redis.call('SET', 'moor-chat:nick:' .. nick, id, 'EX', ttl)\n"
    "  end\n"
    "  redis.call('SADD', mk, nick)\n"
    "  if not alive then\n"
    "    redis.call('PUBLISH', '" CHANNEL "', id .. ' J ' .. nick)\n"
    "  end\n"
    "end\n"
    "return out\n";

/* ARGV: id, ttl. Renews id's heartbeat and nicks, and sweeps the instances whose heartbeat
 * expired (their members leave, their nicks go). 1, or 0 if id itself had expired (it must
 * register again). */
static const char lua_heartbeat[] =
    "local id, ttl = ARGV[1], ARGV[2]\n"
    "local ik, mk = 'moor-chat:instance:' .. id, 'moor-chat:members:' .. id\n"
    "if redis.call('EXISTS', ik) == 0 then return 0 end\n"
    "redis.call('SET', ik, '1', 'EX', ttl)\n"
    "for _, nick in ipairs(redis.call('SMEMBERS', mk)) do\n"
    "  redis.call('SET', 'moor-chat:nick:' .. nick, id, 'EX', ttl)\n"
    "end\n"
    "for _, other in ipairs(redis.call('SMEMBERS', 'moor-chat:instances')) do\n"
    "  if redis.call('EXISTS', 'moor-chat:instance:' .. other) == 0 then\n"
    "    redis.call('SREM', 'moor-chat:instances', other)\n"
    "    local omk = 'moor-chat:members:' .. other\n"
    "    for _, nick in ipairs(redis.call('SMEMBERS', omk)) do\n"
    "      if redis.call('GET', 'moor-chat:nick:' .. nick) == other then\n"
    "        redis.call('DEL', 'moor-chat:nick:' .. nick)\n"
    "      end\n"
    "      redis.call('PUBLISH', '" CHANNEL "', other .. ' Q ' .. nick)\n"
    "    end\n"
    "    redis.call('DEL', omk)\n"
    "  end\n"
    "end\n"
    "return 1\n";

/* ARGV: id. The nicks of every other live instance. */
static const char lua_who[] =
    "local out = {}\n"
    "for _, other in ipairs(redis.call('SMEMBERS', 'moor-chat:instances')) do\n"
    "  if other ~= ARGV[1] and redis.call('EXISTS', 'moor-chat:instance:' .. other) == 1 then\n"
    "    for _, nick in ipairs(redis.call('SMEMBERS', 'moor-chat:members:' .. other)) do\n"
    "      out[#out + 1] = nick\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return out\n";

/* ARGV: id. Leaving for good: every member leaves, the nicks and the keys go. */
static const char lua_bye[] =
    "local id = ARGV[1]\n"
    "local mk = 'moor-chat:members:' .. id\n"
    "for _, nick in ipairs(redis.call('SMEMBERS', mk)) do\n"
    "  if redis.call('GET', 'moor-chat:nick:' .. nick) == id then\n"
    "    redis.call('DEL', 'moor-chat:nick:' .. nick)\n"
    "  end\n"
    "  redis.call('PUBLISH', '" CHANNEL "', id .. ' Q ' .. nick)\n"
    "end\n"
    "redis.call('DEL', mk, 'moor-chat:instance:' .. id)\n"
    "redis.call('SREM', 'moor-chat:instances', id)\n"
    "return 1\n";

/* The link's fiber must look: the connection of generation gen failed with err. */
static void link_failed(unsigned gen, int err)
{
    if (gen != cl.gen || !cl.up || cl.fail)
        return;
    cl.fail = err;
    moor_sem_release(&cl.kick);
}

/* A command on the link, argv form. A failure of the connection (not of this fiber's wait:
 * -ECANCELED) ends the link, which the link's fiber then reconnects; an error reply is
 * -EPROTO for the caller only. -ENOTCONN while the room is local only. */
static int command_argv(redisReply **reply, int argc, const char **argv, const size_t *lens)
{
    if (!cl.up)
        return -ENOTCONN;
    unsigned gen = cl.gen;
    redisReply *r = NULL;
    int rc = moor_redis_command_argv(cl.cmd, moor_deadline_in(COMMAND_MS), &r, argc, argv,
                                     lens);
    if (rc < 0) {
        if (rc != -ECANCELED)
            link_failed(gen, rc);
        return rc;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        fprintf(stderr, "moor-chat: redis said: %s\n", r->str);
        moor_redis_reply_free(r);
        return -EPROTO;
    }
    if (reply)
        *reply = r;
    else
        moor_redis_reply_free(r);
    return 0;
}

/* EVAL script 0 args...: up to 3 string arguments. */
static int eval(redisReply **reply, const char *script, int nargs, const char *a0,
                const char *a1, const char *a2, const char *a3)
{
    const char *argv[] = {"EVAL", script, "0", a0, a1, a2, a3};
    return command_argv(reply, 3 + nargs, argv, NULL);
}

/* ---- events from the channel ---------------------------------------------------------- */

static int valid_nick(const char *s, size_t len)
{
    if (len < 1 || len > MAX_NICK)
        return 0;
    for (size_t i = 0; i < len; i++)
        if (!s[i] || !strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                             "0123456789_-", s[i]))
            return 0;
    return 1;
}

/* One message of the channel: delivered to the local clients unless it is ours. Anything
 * malformed (the channel is open to any Redis client) is ignored. */
static void dispatch(const char *p, size_t len)
{
    if (len < ID_LEN + 4 || p[ID_LEN] != ' ' || p[ID_LEN + 2] != ' ')
        return;
    char kind = p[ID_LEN + 1];
    const char *who = p + ID_LEN + 3, *end = p + len;
    const char *space = memchr(who, ' ', (size_t)(end - who));
    size_t wlen = (size_t)((space ? space : end) - who);
    const char *rest = space ? space + 1 : end;
    size_t rlen = (size_t)(end - rest);
    if (memcmp(p, cl.id, ID_LEN) == 0) {
        if (kind == 'J' && cl.joins_seen < cl.joins_sent)
            cl.joins_seen++; /* one of ours is in, for the others' news from now on */
        return;
    }
    if (!valid_nick(who, wlen))
        return;
    char nick[MAX_NICK + 1];
    memcpy(nick, who, wlen);
    nick[wlen] = '\0';
    unsigned long g;
    if (kind == 'J' && sscanf(nick, "guest%lu", &g) == 1)
        chat_guest_seen(g); /* so that a name made here while the room is split is new */
    if (kind == 'L' && space && rlen >= 1 && rlen <= MAX_LINE)
        chat_remote_line(nick, rest, rlen);
    else if (kind == 'J' && !space)
        chat_remote_notice("%s joined", nick);
    else if (kind == 'Q' && !space)
        chat_remote_notice("%s left", nick);
    else if (kind == 'N' && space && valid_nick(rest, rlen))
        chat_remote_notice("%s is now %.*s", nick, (int)rlen, rest);
}

/* The subscriber: takes the channel's messages in order until it is cancelled or the
 * connection fails. */
static intptr_t listener(void *arg)
{
    moor_redis *sub = arg;
    unsigned gen = cl.gen;
    for (;;) {
        moor_redis_message *m;
        int rc = moor_redis_next_message(sub, -1, &m);
        if (rc < 0) {
            if (rc != -ECANCELED)
                link_failed(gen, rc);
            return 0;
        }
        dispatch(m->payload, m->len);
        moor_redis_message_free(m);
    }
}

/* ---- the link ------------------------------------------------------------------------------ */

/* Register with every local nick (see lua_register), and rename the local clients whose
 * nick another instance took. */
static int enroll(void)
{
    size_t n;
    char **nicks = chat_local_nicks(&n);
    const char **argv = malloc((6 + n) * sizeof *argv);
    if (!nicks || !argv) {
        free(nicks);
        free(argv);
        return -ENOMEM;
    }
    char guests[32];
    snprintf(guests, sizeof guests, "%lu", chat_guests());
    argv[0] = "EVAL", argv[1] = lua_register, argv[2] = "0", argv[3] = cl.id;
    argv[4] = TTL_S, argv[5] = guests;
    for (size_t i = 0; i < n; i++)
        argv[6 + i] = nicks[i];
    redisReply *r = NULL;
    int rc = command_argv(&r, (int)(6 + n), argv, NULL);
    free(argv);
    free(nicks);
    if (rc < 0)
        return rc;
    for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i + 1 < r->elements; i += 2) {
        const redisReply *old = r->element[i], *now = r->element[i + 1];
        if (old->type == REDIS_REPLY_STRING && now->type == REDIS_REPLY_STRING) {
            unsigned long g;
            if (sscanf(now->str, "guest%lu", &g) == 1)
                chat_guest_seen(g);
            chat_renamed(old->str, now->str);
        }
    }
    moor_redis_reply_free(r);
    return 0;
}

/* Both connections, subscribed and registered. */
static int link_open(void)
{
    moor_redis *cmd = NULL, *sub = NULL;
    int rc = moor_redis_connect(cl.host, cl.port, moor_deadline_in(CONNECT_MS), &cmd);
    if (rc == 0)
        rc = moor_redis_connect(cl.host, cl.port, moor_deadline_in(CONNECT_MS), &sub);
    if (rc == 0)
        rc = moor_redis_subscribe(sub, CHANNEL, moor_deadline_in(CONNECT_MS));
    if (rc == 0) {
        /* Up before the registration goes out: clients' events from now on follow it on the
         * same connection. */
        cl.cmd = cmd, cl.sub = sub, cl.gen++, cl.fail = 0, cl.up = 1;
        rc = enroll();
        if (rc == 0 && cl.fail)
            rc = cl.fail;
        if (rc < 0) {
            cl.up = 0, cl.cmd = cl.sub = NULL;
            cl.joins_seen = cl.joins_sent; /* joins made meanwhile: no J will come */
        }
    }
    if (rc < 0) {
        if (sub)
            moor_redis_close(sub);
        if (cmd)
            moor_redis_close(cmd);
    }
    return rc;
}

static intptr_t link_run(void *arg)
{
    (void)arg;
    int64_t backoff = BACKOFF_MIN_MS;
    int down = 0; /* the clients have been told that the room is local only */
    while (!cl.stopping) {
        int rc = link_open();
        moor_event_set(&cl.started);
        if (rc < 0) {
            if (!down)
                fprintf(stderr, "moor-chat: redis %s:%d: %s: the room is local only for now; "
                        "trying again\n", cl.host, cl.port, moor_strerror(rc));
            down = 1;
            moor_sem_acquire(&cl.kick, moor_deadline_in(backoff)); /* or stopped */
            backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
            continue;
        }
        if (down) {
            fprintf(stderr, "moor-chat: redis %s:%d is back: the room is shared again\n",
                    cl.host, cl.port);
            chat_notice("the room is shared again (redis is back)");
        }
        down = 0, backoff = BACKOFF_MIN_MS;
        moor_fiber *lst = NULL;
        if (moor_spawn(&lst, listener, cl.sub, &listener_attr) < 0)
            cl.fail = -ENOMEM;
        int64_t next = moor_deadline_in(BEAT_MS);
        while (!cl.stopping && !cl.fail) {
            if (moor_sem_acquire(&cl.kick, next) == 0)
                continue; /* a failure or the stop: look */
            redisReply *r = NULL;
            if (eval(&r, lua_heartbeat, 2, cl.id, TTL_S, NULL, NULL) == 0) {
                if (r->type == REDIS_REPLY_INTEGER && r->integer == 0)
                    enroll(); /* taken for dead (a long stall): join again */
                moor_redis_reply_free(r);
            }
            next = moor_deadline_in(BEAT_MS);
        }
        if (lst) {
            moor_cancel(lst);
            moor_join(lst, NULL);
        }
        /* What came before the loss is delivered still (the command connection may have
         * failed first). */
        moor_redis_message *m;
        while (moor_redis_pending(cl.sub) > 0 && moor_redis_next_message(cl.sub, 0, &m) == 0) {
            dispatch(m->payload, m->len);
            moor_redis_message_free(m);
        }
        if (cl.stopping && !cl.fail)
            eval(NULL, lua_bye, 1, cl.id, NULL, NULL, NULL);
        rc = cl.fail;
        cl.up = 0;
        cl.joins_seen = cl.joins_sent; /* no J of the old link comes any more */
        moor_redis_close(cl.sub);
        moor_redis_close(cl.cmd);
        cl.sub = cl.cmd = NULL;
        if (!cl.stopping) {
            fprintf(stderr, "moor-chat: lost redis %s:%d (%s): the room is local only now; "
                    "reconnecting\n", cl.host, cl.port, moor_strerror(rc));
            chat_notice("the room is local only now (lost the connection to redis)");
            down = 1;
        }
    }
    return 0;
}

static void make_id(char *out)
{
    unsigned char raw[ID_LEN / 2];
    if (getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) {
        uint64_t x = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15u ^ (uint64_t)getpid();
        memcpy(raw, &x, sizeof raw);
    }
    for (size_t i = 0; i < sizeof raw; i++)
        sprintf(out + 2 * i, "%02x", raw[i]);
}

unsigned long long cluster_joins_seen(void)
{
    return cl.joins_seen;
}

/* ---- what chat.c calls ------------------------------------------------------------------- */

int cluster_start(const char *host, int port)
{
    memset(&cl, 0, sizeof cl);
    cl.host = host, cl.port = port;
    cl.kick = (moor_sem)MOOR_SEM_INIT(0);
    cl.started = (moor_event)MOOR_EVENT_INIT;
    make_id(cl.id);
    int rc = moor_spawn(&cl.link, link_run, NULL, &link_attr);
    if (rc < 0)
        return rc;
    moor_event_wait(&cl.started, -1);
    return 0;
}

void cluster_stop(void)
{
    cl.stopping = 1;
    moor_sem_release(&cl.kick);
    moor_join(cl.link, NULL); /* not cut short if the caller is cancelled */
    cl.link = NULL;
}

int cluster_join(char *nick, size_t size, unsigned long long *ticket)
{
    if (!cl.up)
        return -ENOTCONN;
    /* Counted as sent before it is: a failure that may have kept it from Redis fails the
     * link (below), which reaches every ticket. */
    *ticket = ++cl.joins_sent;
    unsigned gen = cl.gen;
    redisReply *r = NULL;
    int rc = eval(&r, lua_join, 2, cl.id, TTL_S, NULL, NULL);
    if (rc < 0) {
        if (rc != -ECANCELED) /* a cancelled call was sent all the same */
            link_failed(gen, rc == -ENOTCONN ? -ECONNRESET : rc);
        return rc;
    }
    if (r->type != REDIS_REPLY_INTEGER) {
        moor_redis_reply_free(r);
        return -EPROTO;
    }
    snprintf(nick, size, "guest%lld", r->integer);
    chat_guest_seen((unsigned long)r->integer);
    moor_redis_reply_free(r);
    return 0;
}

void cluster_line(const char *nick, const char *text, size_t len)
{
    if (!cl.up)
        return;
    char head[ID_LEN + MAX_NICK + 8];
    int h = snprintf(head, sizeof head, "%s L %s ", cl.id, nick);
    char *payload = malloc((size_t)h + len);
    if (!payload)
        return; /* the other instances miss this line, as a dropped client misses all */
    memcpy(payload, head, (size_t)h);
    memcpy(payload + h, text, len);
    const char *argv[] = {"PUBLISH", CHANNEL, payload};
    const size_t lens[] = {7, sizeof CHANNEL - 1, (size_t)h + len};
    command_argv(NULL, 3, argv, lens);
    free(payload);
}

int cluster_rename(const char *old, const char *now)
{
    redisReply *r = NULL;
    int rc = eval(&r, lua_rename, 4, cl.id, old, now, TTL_S);
    if (rc < 0)
        return rc;
    rc = r->type == REDIS_REPLY_INTEGER ? (int)r->integer : -EPROTO;
    moor_redis_reply_free(r);
    return rc;
}

void cluster_leave(const char *nick)
{
    eval(NULL, lua_leave, 2, cl.id, nick, NULL, NULL);
}

char **cluster_who(size_t *count)
{
    *count = 0;
    redisReply *r = NULL;
    if (eval(&r, lua_who, 1, cl.id, NULL, NULL, NULL) < 0)
        return NULL;
    size_t n = r->type == REDIS_REPLY_ARRAY ? r->elements : 0;
    char **out = malloc(n * sizeof *out + n * (MAX_NICK + 1) + 1);
    if (out) {
        char *names = (char *)(out + n);
        for (size_t i = 0; i < n; i++) {
            const redisReply *e = r->element[i];
            size_t len = e->type == REDIS_REPLY_STRING && e->len <= MAX_NICK ? e->len : 0;
            out[(*count)++] = memcpy(names + i * (MAX_NICK + 1), e->str ? e->str : "", len);
            names[i * (MAX_NICK + 1) + len] = '\0';
        }
    }
    moor_redis_reply_free(r);
    return out;
}
