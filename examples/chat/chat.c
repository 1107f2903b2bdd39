/* moor-chat: a multi-user TCP chat server, one fiber per client.
 *
 *   moor-chat [-b ADDR] [-p PORT] [--threads N] [--redis HOST:PORT]
 *                                     default 127.0.0.1:7777; -p 0 picks a free port
 *   nc 127.0.0.1 7777                 then type lines; /nick NAME, /who, /quit
 *
 * Each client has two fibers. Its reader reads lines and hands each one to the other
 * clients' outboxes; its writer drains its own outbox to the socket, several lines per
 * system call. A line is formatted once into a message that every outbox it goes to shares
 * (a reference count), so a line to 10,000 clients is one allocation. Outboxes are bounded:
 * a client with more than 1 MiB unsent is dropped, so a slow reader slows nobody down and
 * the server's memory stays bounded. A scope owns the readers, so shutting down is one
 * moor_scope_close.
 *
 * --threads N: N executors on N threads (moor_threads_run), each with a listener of its own
 * on the same port (MOOR_TCP_REUSEPORT: the kernel spreads the connections). A fiber never
 * leaves its thread, so each executor has a room of its own: its local clients, whose
 * outboxes only its fibers touch. What the executors share is the hub: who is in (nicks,
 * /who, guest numbers) under one lock that no fiber holds across a wait, and an inbox per
 * executor. A line goes to the local clients at once, and a copy of it to every other
 * executor's inbox, whose mailman fiber hands it to its own clients. One sender posts in
 * order and each mailman delivers in order, so every receiver sees each sender's lines in
 * the order they were sent. Posts and arrivals are stamped with the hub's clock, so that a
 * client hears what was said after it came in, and nothing from before. The first executor
 * waits for SIGINT and SIGTERM and stops the others' servers with moor_spawn_remote.
 *
 * --redis HOST:PORT: several moor-chat processes share one room through Redis (cluster.c).
 * One or the other: --redis runs on one executor.
 */
#include <moor.h>

#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "chat.h"
#ifdef MOOR_CHAT_REDIS
#include "cluster.h"
#endif

#ifdef MOOR_CHAT_TEST
/* tests/test_fault.c builds this file into itself to fail allocations on the accept path:
 * main is renamed, and the server's own allocations go through the test's allocator. */
#define main moor_chat_main
int moor_chat_main(int argc, char **argv);
void *moor_chat_malloc(size_t size);
void moor_chat_free(void *ptr);
#define malloc moor_chat_malloc
#define free moor_chat_free
#endif

#define OUTBOX_MAX (1 << 20)    /* unsent bytes beyond which a client is dropped */
#define BATCH (64)              /* messages per writev */
#define LINGER_MS (1000)        /* how long a leaving client's writer may flush */
#define MAX_THREADS (64)        /* --threads */

/* A line as sent, shared by every outbox of one executor it is queued in (another executor
 * gets a copy of its own: the count is not atomic). */
typedef struct msg {
    struct msg *next; /* in an inbox, on its way to another executor */
    uint64_t seq;     /* there: when it was said, on the hub's clock */
    size_t refs;
    size_t len;
    char text[]; /* len bytes, the last one '\n' */
} msg;

typedef struct client {
    struct client *prev, *next;   /* in the room of its executor */
    struct client *hprev, *hnext; /* in the hub, under its lock */
    uint64_t since;             /* when it came in, on the hub's clock: it gets what other
                                   executors' clients said after that, not before */
    unsigned long long ticket;  /* --redis: its join's place (cluster_joins_seen); 0 if it
                                   came in while the room was local only */
    int fd;
    char nick[MAX_NICK + 1];    /* written under the hub's lock: other executors read it */
    msg **box;                  /* the outbox: a ring of `cap` slots, `len` used from `head` */
    size_t cap, head, len;
    size_t bytes;               /* unsent bytes in the outbox and in the writer's hands */
    moor_sem ready;             /* a permit when the empty outbox gets a message */
    int leaving;                /* the writer sends what is queued, then returns */
    int dropped;                /* too slow or gone: everyone stops at once */
    moor_fiber *reader;
} client;

/* The room of this thread's executor: its clients. */
static _Thread_local struct {
    client *head;               /* everyone who is in here, in no particular order */
    int closing;                /* shutting down: nobody is told who left */
} room;

/* An executor's inbox: copies of what the clients of other executors said, in order. */
typedef struct inbox {
    msg *head, *tail;
    moor_promise *bell;         /* the mailman's while it waits for mail (the poster who
                                   takes it resolves it), else NULL */
    int lfd;                    /* its listener; -1 once its server has closed it */
} inbox;

/* What every executor shares. Fields below `lock` are read and written under it, by plain
 * code between waits: no fiber holds it across a wait. */
static struct {
    size_t threads;             /* executors: 1 unless --threads; set before any starts */
    pthread_mutex_t lock;
    client *head;               /* everyone, on every executor */
    size_t count;
    unsigned long guests;       /* connections so far, for guest<N> */
    uint64_t clock;             /* ticks at each entry into the room and each post */
    inbox inbox[MAX_THREADS];
} hub = {.lock = PTHREAD_MUTEX_INITIALIZER};

static _Thread_local size_t self;        /* this thread's executor: its index in hub.inbox */
static _Thread_local moor_fiber *server; /* its accept loop, cancelled by a signal */

static const char *bind_addr = "127.0.0.1";
static const char *redis_host;           /* --redis, or NULL */
static int redis_port;
static const moor_fiber_attr client_attr = {.name = "client", .stack_size = 64 * 1024};
static const moor_fiber_attr writer_attr = {.name = "writer", .stack_size = 64 * 1024};
static const moor_fiber_attr mailman_attr = {.name = "mailman", .stack_size = 64 * 1024};

static void hub_lock(void) { pthread_mutex_lock(&hub.lock); }
static void hub_unlock(void) { pthread_mutex_unlock(&hub.lock); }

/* The formatted head, then `len` bytes of body copied as they are (a chat line may hold any
 * byte, NULs too), then '\n'. NULL without memory: the line is not sent. */
static msg *msg_vnew(const char *body, size_t len, const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    int head = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    msg *m = malloc(sizeof *m + (size_t)head + len + 2);
    if (!m)
        return NULL;
    vsnprintf(m->text, (size_t)head + 1, fmt, ap);
    if (len > 0) /* body may be NULL then */
        memcpy(m->text + head, body, len);
    m->text[head + len] = '\n';
    m->len = (size_t)head + len + 1;
    m->refs = 1;
    m->next = NULL;
    return m;
}

static msg *msg_new(const char *body, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    msg *m = msg_vnew(body, len, fmt, ap);
    va_end(ap);
    return m;
}

static void msg_unref(msg *m)
{
    if (m && --m->refs == 0)
        free(m);
}

/* Stop a client now: its reader is cancelled, its writer stops, it gets nothing more. */
static void drop(client *c)
{
    c->dropped = 1;
    moor_cancel(c->reader);
}

/* Queue m in c's outbox, or drop c if that would put it over OUTBOX_MAX. Never waits: a
 * sender never waits for a receiver. */
static void deliver(client *c, msg *m)
{
    if (!m || c->dropped)
        return;
    if (c->bytes + m->len > OUTBOX_MAX) {
        drop(c);
        return;
    }
    if (c->len == c->cap) { /* grow the ring, unwrapping it */
        size_t cap = c->cap ? 2 * c->cap : 16;
        msg **box = malloc(cap * sizeof *box);
        if (!box) {
            drop(c);
            return;
        }
        for (size_t i = 0; i < c->len; i++)
            box[i] = c->box[(c->head + i) % c->cap];
        free(c->box);
        c->box = box, c->cap = cap, c->head = 0;
    }
    c->box[(c->head + c->len++) % c->cap] = m;
    m->refs++;
    c->bytes += m->len;
    if (c->len == 1 && c->ready.permits == 0) /* one permit is enough to wake the writer */
        moor_sem_release(&c->ready);
}

static msg *take(client *c)
{
    msg *m = c->box[c->head];
    c->head = (c->head + 1) % c->cap;
    c->len--;
    return m;
}

/* A message to one client; consumes m. */
static void send_to(client *c, msg *m)
{
    deliver(c, m);
    msg_unref(m);
}

/* A message to everyone in this executor's room but `except` (NULL: everyone); consumes m. */
static void announce_local(client *except, msg *m)
{
    for (client *p = room.head; p; p = p->next)
        if (p != except)
            deliver(p, m);
    msg_unref(m);
}

/* A copy of m to every other executor's inbox, stamped with the hub's clock, their mailmen
 * woken if they sleep. Without memory for a copy, that executor's clients miss the line (as
 * a client is dropped when its outbox cannot grow). */
static void post(const msg *m)
{
    msg *copies[MAX_THREADS];
    moor_promise *bells[MAX_THREADS];
    for (size_t k = 0; k < hub.threads; k++) {
        copies[k] = k == self ? NULL : malloc(sizeof *copies[k] + m->len);
        if (copies[k]) {
            memcpy(copies[k], m, sizeof *copies[k] + m->len);
            copies[k]->refs = 1;
            copies[k]->next = NULL;
        }
    }
    hub_lock();
    uint64_t seq = ++hub.clock;
    for (size_t k = 0; k < hub.threads; k++) {
        inbox *in = &hub.inbox[k];
        bells[k] = NULL;
        if (!copies[k])
            continue;
        copies[k]->seq = seq;
        *(in->tail ? &in->tail->next : &in->head) = copies[k];
        in->tail = copies[k];
        bells[k] = in->bell;
        in->bell = NULL;
    }
    hub_unlock();
    for (size_t k = 0; k < hub.threads; k++)
        if (bells[k])
            moor_promise_resolve(bells[k], 0);
}

/* A message to everyone in the room, on every executor, but `except`; consumes m. */
static void announce(client *except, msg *m)
{
    if (m && hub.threads > 1)
        post(m);
    announce_local(except, m);
}

/* Hand mail to the local clients that were in when it was said, in the order it was
 * posted; consumes it. */
static void hand_out(msg *mail)
{
    for (msg *next; mail; mail = next) {
        next = mail->next;
        for (client *p = room.head; p; p = p->next)
            if (p->since < mail->seq)
                deliver(p, mail);
        msg_unref(mail);
    }
}

/* Hand out what is in this executor's inbox now, without waiting for the mailman: a client
 * that leaves gets first what was said before it left (its /quit may have come in before
 * the mailman's turn). */
static void collect_mail(void)
{
    hub_lock();
    msg *mail = hub.inbox[self].head;
    hub.inbox[self].head = hub.inbox[self].tail = NULL;
    hub_unlock();
    hand_out(mail);
}

/* This executor's mailman: hands what the other executors posted to the local clients, in
 * the order it was posted, until it is cancelled. */
static intptr_t mailman(void *arg)
{
    (void)arg;
    inbox *in = &hub.inbox[self];
    for (;;) {
        moor_promise *bell = NULL;
        int rc = 0;
        hub_lock();
        msg *mail = in->head;
        in->head = in->tail = NULL;
        if (!mail && !moor_cancelled() && (rc = moor_promise_new(&bell, NULL)) == 0)
            in->bell = bell;
        hub_unlock();
        hand_out(mail);
        if (moor_cancelled())
            return 0;
        if (rc < 0) { /* no memory for the bell: look again soon */
            moor_sleep(moor_deadline_in(10));
            continue;
        }
        if (bell && moor_promise_await(bell, -1) == -ECANCELED) {
            /* The resolver's half is still ours if no poster took the bell. */
            hub_lock();
            int mine = in->bell == bell;
            if (mine)
                in->bell = NULL;
            hub_unlock();
            if (mine)
                moor_promise_resolve(bell, 0);
            return 0;
        }
    }
}

static void room_add(client *c)
{
    c->next = room.head;
    if (room.head)
        room.head->prev = c;
    room.head = c;
}

static void room_remove(client *c)
{
    *(c->prev ? &c->prev->next : &room.head) = c->next;
    if (c->next)
        c->next->prev = c->prev;
}

/* Under the hub's lock. */
static void hub_add(client *c)
{
    c->hnext = hub.head;
    if (hub.head)
        hub.head->hprev = c;
    hub.head = c;
    hub.count++;
}

static void hub_remove(client *c)
{
    *(c->hprev ? &c->hprev->hnext : &hub.head) = c->hnext;
    if (c->hnext)
        c->hnext->hprev = c->hprev;
    hub.count--;
}

/* Who is called name, on any executor, or NULL. Under the hub's lock. */
static client *find(const char *name, size_t len)
{
    for (client *p = hub.head; p; p = p->hnext)
        if (strlen(p->nick) == len && memcmp(p->nick, name, len) == 0)
            return p;
    return NULL;
}

/* The writer: waits for its outbox to fill, sends up to BATCH messages per writev. */
static intptr_t writer(void *arg)
{
    client *c = arg;
    for (;;) {
        while (c->len == 0 && !c->leaving)
            if (moor_sem_acquire(&c->ready, -1) < 0)
                return 0; /* cancelled: the client was dropped */
        if (c->len == 0)
            return 0;     /* leaving, and everything is sent */
        struct iovec iov[BATCH];
        msg *batch[BATCH];
        int n = 0;
        while (n < BATCH && c->len > 0) {
            batch[n] = take(c);
            iov[n] = (struct iovec){batch[n]->text, batch[n]->len};
            n++;
        }
        if (c->len == 0 && c->cap > 1024) { /* give back the ring a burst made big */
            free(c->box);
            c->box = NULL, c->cap = 0, c->head = 0;
        }
        ssize_t rc = moor_writev_all(c->fd, iov, n, NULL, -1);
        for (int i = 0; i < n; i++) {
            c->bytes -= batch[i]->len;
            msg_unref(batch[i]);
        }
        if (rc < 0) { /* reset, or cancelled because dropped: the client is gone */
            if (!c->dropped)
                drop(c);
            return 0;
        }
    }
}

static int by_bytes(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* "* online: " and every nick, on every executor (and every instance), sorted. */
static void who(client *c)
{
    char **remote = NULL;
    size_t nremote = 0;
#ifdef MOOR_CHAT_REDIS
    if (redis_host)
        remote = cluster_who(&nremote);
#endif
    hub_lock();
    size_t n = hub.count + nremote;
    char *names = malloc(hub.count * (MAX_NICK + 1));
    const char **nicks = malloc(n * sizeof *nicks);
    char *list = malloc(n * (MAX_NICK + 1));
    size_t i = 0;
    if (names && nicks && list)
        for (client *p = hub.head; p; p = p->hnext, i++)
            nicks[i] = strcpy(names + i * (MAX_NICK + 1), p->nick);
    hub_unlock();
    if (names && nicks && list) {
        for (size_t j = 0; j < nremote; j++)
            nicks[i++] = remote[j];
        size_t len = 0;
        qsort(nicks, n, sizeof *nicks, by_bytes);
        for (i = 0; i < n; i++)
            len += (size_t)sprintf(list + len, i ? " %s" : "%s", nicks[i]);
        send_to(c, msg_new(list, len, "* online: "));
    }
    free(remote);
    free(names);
    free(nicks);
    free(list);
}

static void nick(client *c, const char *name, size_t len)
{
    int ok = len >= 1 && len <= MAX_NICK;
    for (size_t i = 0; ok && i < len; i++)
        ok = name[i] && strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                               "0123456789_-", name[i]);
    if (!ok) {
        send_to(c, msg_new(NULL, 0, "* error: invalid nick"));
        return;
    }
    /* Taken here first, under the lock, so that no local client can take it meanwhile; then
     * claimed from the other instances, and given back if one of them has it. */
    char old[MAX_NICK + 1];
    hub_lock();
    client *owner = find(name, len);
    if (!owner || owner == c) {
        strcpy(old, c->nick);
        memcpy(c->nick, name, len);
        c->nick[len] = '\0';
    }
    hub_unlock();
    if (owner && owner != c) {
        send_to(c, msg_new(NULL, 0, "* error: nick taken"));
        return;
    }
#ifdef MOOR_CHAT_REDIS
    if (redis_host && cluster_rename(old, c->nick) == 0) {
        hub_lock();
        strcpy(c->nick, old);
        hub_unlock();
        send_to(c, msg_new(NULL, 0, "* error: nick taken"));
        return;
    }
#endif
    send_to(c, msg_new(NULL, 0, "* you are now %s", c->nick));
    announce(c, msg_new(NULL, 0, "* %s is now %s", old, c->nick));
}

/* One line from c. Returns -1 when c asked to leave. */
static int handle(client *c, const char *line, size_t len)
{
    if (len == 0)
        return 0;
    if (line[0] != '/') {
        announce(c, msg_new(line, len, "%s: ", c->nick));
#ifdef MOOR_CHAT_REDIS
        if (redis_host)
            cluster_line(c->nick, line, len);
#endif
        return 0;
    }
    const char *space = memchr(line, ' ', len);
    size_t cmd = space ? (size_t)(space - line) : len;
    if (cmd == 5 && memcmp(line, "/quit", 5) == 0)
        return -1;
    if (cmd == 4 && memcmp(line, "/who", 4) == 0)
        who(c);
    else if (cmd == 5 && memcmp(line, "/nick", 5) == 0)
        space ? nick(c, space + 1, len - cmd - 1) : nick(c, "", 0);
    else
        send_to(c, msg_new(NULL, 0, "* error: unknown command"));
    return 0;
}

/* Name a new client and put it in the hub: guest<N>, N counting connections (over every
 * instance with --redis), a name someone took with /nick skipped. */
static void enter(client *c)
{
    int named = -1;
    char stale[MAX_NICK + 1] = "";
#ifdef MOOR_CHAT_REDIS
    if (redis_host)
        named = cluster_join(c->nick, sizeof c->nick, &c->ticket);
#endif
    if (named < 0)
        c->ticket = 0;
    hub_lock();
    if (named == 0 && find(c->nick, strlen(c->nick))) {
        /* A local client took that name while the room was split: it keeps it, and the
         * newcomer's claim is given back below. */
        strcpy(stale, c->nick);
        named = -1;
    }
    if (named < 0)
        do
            snprintf(c->nick, sizeof c->nick, "guest%lu", ++hub.guests);
        while (find(c->nick, strlen(c->nick)));
    hub_add(c);
    c->since = ++hub.clock;
    hub_unlock();
#ifdef MOOR_CHAT_REDIS
    if (stale[0])
        cluster_leave(stale);
#else
    (void)stale;
#endif
}

/* Take c out of the hub (and the other instances' rooms). */
static void leave(client *c)
{
    hub_lock();
    hub_remove(c);
    hub_unlock();
#ifdef MOOR_CHAT_REDIS
    if (redis_host)
        cluster_leave(c->nick);
#endif
}

/* A client's reader: the whole life of a connection. The client lives on this fiber's
 * stack, which never moves: the room, the hub and the writer point into it until it
 * returns. */
static intptr_t client_run(void *arg)
{
    client c = {.fd = (int)(intptr_t)arg, .ready = MOOR_SEM_INIT(0), .reader = moor_self()};
    moor_reader r;
    moor_fiber *w;
    /* Without memory for any of these the connection is closed: a client is served in full,
     * starting with its name, or not at all. */
    if (moor_reader_init(&r, c.fd, MAX_LINE + 2) < 0) { /* room for "\r\n" */
        moor_reader_free(&r);
        moor_close(c.fd);
        return 0;
    }
    if (moor_spawn(&w, writer, &c, &writer_attr) < 0) {
        moor_reader_free(&r);
        moor_close(c.fd);
        return 0;
    }
    enter(&c);
    msg *welcome = msg_new(NULL, 0, "* welcome %s", c.nick);
    if (welcome) {
        room_add(&c);
        send_to(&c, welcome); /* or, without memory for its outbox, c is dropped */
        announce(&c, msg_new(NULL, 0, "* %s joined", c.nick));

        /* A flooder's lines come out of its buffer without waiting, but each spends moor's
         * cooperative budget: after 128 of them the others run, so nobody waits long behind
         * it. */
        for (;;) {
            const char *line;
            ssize_t n = moor_read_line(&r, &line, 0, NULL, -1);
            if (moor_cancelled())
                break; /* dropped, or shutting down */
            if (n == -EMSGSIZE || n > MAX_LINE) {
                send_to(&c, msg_new(NULL, 0, "* error: line too long"));
                break;
            }
            if (n < 0 || handle(&c, line, (size_t)n) < 0)
                break; /* MOOR_EOF, a reset, /quit */
        }
        if (hub.threads > 1)
            collect_mail();
        room_remove(&c);
    } else {
        c.dropped = 1;
    }
    leave(&c);
    if (welcome && !room.closing)
        announce(NULL, msg_new(NULL, 0, "* %s left", c.nick));
    c.leaving = 1;
    moor_sem_release(&c.ready);
    if (c.dropped)
        moor_cancel(w);
    /* Let the writer flush, within LINGER_MS; if this fiber was cancelled (shutdown), the
     * writer is cancelled too and sends only what the socket takes without waiting. */
    moor_join_deadline(w, NULL, moor_deadline_in(LINGER_MS));
    while (c.len)
        msg_unref(take(&c));
    free(c.box);
    moor_reader_free(&r);
    moor_close(c.fd);
    return 0;
}

/* On another executor: stop its server. */
static intptr_t stop_here(void *arg)
{
    (void)arg;
    moor_cancel(server);
    return 0;
}

/* Wait for one signal, then stop the servers of every executor. The others' handles are
 * good: this is the first executor's server (moor_threads_run's fn), which has not
 * returned. One whose thread could not run its server (NULL) has nothing to stop. */
static intptr_t stop_on(void *arg)
{
    if (moor_signal_wait((int)(intptr_t)arg, -1) < 0)
        return 0;
    for (size_t k = 1; k < hub.threads; k++) {
        moor_executor *ex = moor_thread_executor(k);
        if (ex)
            moor_spawn_remote(ex, stop_here, NULL);
    }
    moor_cancel(server);
    return 0;
}

/* An executor's server: accept until a signal cancels this fiber, then tell everyone here
 * and close the scope. The first executor waits for the signals and says where it listens. */
static intptr_t serve(void *arg)
{
    int lfd = (int)(intptr_t)arg;
    moor_scope helpers, clients;
    moor_scope_init(&helpers);
    moor_scope_init(&clients);
    const char *failed = NULL;
    if (self == 0 &&
        (moor_scope_spawn(&helpers, stop_on, (void *)(intptr_t)SIGINT, NULL) < 0 ||
         moor_scope_spawn(&helpers, stop_on, (void *)(intptr_t)SIGTERM, NULL) < 0))
        failed = "no memory to wait for signals"; /* nothing could stop it */
    else if (hub.threads > 1 && moor_scope_spawn(&helpers, mailman, NULL, &mailman_attr) < 0)
        failed = "no memory for the mailman";
#ifdef MOOR_CHAT_REDIS
    else if (redis_host && cluster_start(redis_host, redis_port) < 0)
        failed = "no memory for the link to redis";
#endif
    if (failed) {
        fprintf(stderr, "moor-chat: %s\n", failed);
        moor_scope_close(&helpers, -1);
        moor_close(lfd);
        hub.inbox[self].lfd = -1;
        return 1;
    }
    if (self == 0) {
        moor_yield(); /* the signal waits begin before anyone learns the port */
        printf("listening on %s:%d\n", bind_addr, moor_socket_port(lfd));
        fflush(stdout);
    }

    /* A cancelled fiber still gets what is there without waiting: check, or a stream of
     * connections would keep it accepting. */
    while (!moor_cancelled()) {
        int fd = moor_accept(lfd, NULL, NULL, -1);
        if (fd >= 0 && moor_scope_spawn(&clients, client_run, (void *)(intptr_t)fd,
                                        &client_attr) < 0)
            moor_close(fd);
        /* fd < 0: cancelled, or out of descriptors (moor waits 100 ms before the next try) */
    }
    moor_close(lfd);
    hub.inbox[self].lfd = -1;
    room.closing = 1;
    announce_local(NULL, msg_new(NULL, 0, "* server shutting down"));
    moor_scope_close(&clients, moor_deadline_in(2 * LINGER_MS));
#ifdef MOOR_CHAT_REDIS
    if (redis_host)
        cluster_stop();
#endif
    moor_scope_close(&helpers, -1);
    return 0;
}

/* --threads N: the server of executor i of moor_threads_run, its first fiber. */
static intptr_t serve_thread(void *arg)
{
    (void)arg;
    self = (size_t)moor_thread_index();
    server = moor_self();
    return serve((void *)(intptr_t)hub.inbox[self].lfd);
}

/* ---- what cluster.c asks of the room ------------------------------------------------------ */

#ifdef MOOR_CHAT_REDIS
/* To the local clients that were in when another instance's client said it; consumes m. */
static void announce_remote(msg *m)
{
    unsigned long long seen = cluster_joins_seen();
    for (client *p = room.head; p; p = p->next)
        if (p->ticket <= seen)
            deliver(p, m);
    msg_unref(m);
}

void chat_remote_line(const char *nick, const char *text, size_t len)
{
    announce_remote(msg_new(text, len, "%s: ", nick));
}

void chat_remote_notice(const char *fmt, ...)
{
    char text[2 * MAX_NICK + 64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    announce_remote(msg_new(NULL, 0, "* %s", text));
}
#endif

void chat_notice(const char *fmt, ...)
{
    char text[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    announce_local(NULL, msg_new(NULL, 0, "* %s", text));
}

char **chat_local_nicks(size_t *count)
{
    hub_lock();
    size_t n = hub.count;
    char **out = malloc(n * sizeof *out + n * (MAX_NICK + 1) + 1);
    if (out) {
        char *names = (char *)(out + n);
        size_t i = 0;
        for (client *p = hub.head; p; p = p->hnext, i++)
            out[i] = strcpy(names + i * (MAX_NICK + 1), p->nick);
    }
    hub_unlock();
    *count = out ? n : 0;
    return out;
}

void chat_renamed(const char *old, const char *now)
{
    hub_lock();
    client *c = find(old, strlen(old));
    if (c)
        snprintf(c->nick, sizeof c->nick, "%s", now);
    hub_unlock();
    if (c)
        announce_local(NULL, msg_new(NULL, 0, "* %s is now %s (another instance had that name "
                                     "while the room was split)", old, now));
}

void chat_guest_seen(unsigned long n)
{
    hub_lock();
    if (hub.guests < n)
        hub.guests = n;
    hub_unlock();
}

unsigned long chat_guests(void)
{
    hub_lock();
    unsigned long n = hub.guests;
    hub_unlock();
    return n;
}

/* ---- main ------------------------------------------------------------------------------- */

static void usage(const char *why)
{
    if (why)
        fprintf(stderr, "moor-chat: %s\n", why);
    fprintf(stderr, "usage: moor-chat [-b ADDR] [-p PORT] [--threads N] [--redis HOST:PORT]\n");
    exit(2);
}

/* A number in [lo, hi], all of s, or -1. */
static long number(const char *s, long lo, long hi)
{
    char *end;
    long v = strtol(s, &end, 10);
    return *s && !*end && v >= lo && v <= hi ? v : -1;
}

int main(int argc, char **argv)
{
    enum { OPT_THREADS = 256, OPT_REDIS };
    static const struct option longs[] = {{"threads", required_argument, NULL, OPT_THREADS},
                                           {"redis", required_argument, NULL, OPT_REDIS},
                                           {NULL, 0, NULL, 0}};
    static char redis_addr[256];
    long port = 7777, threads = 1;
    int opt;
    redis_host = NULL;
    while ((opt = getopt_long(argc, argv, "b:p:", longs, NULL)) != -1) {
        if (opt == 'b') {
            bind_addr = optarg;
        } else if (opt == 'p') {
            if ((port = number(optarg, 0, 65535)) < 0)
                usage("-p: a port from 0 to 65535");
        } else if (opt == OPT_THREADS) {
            if ((threads = number(optarg, 1, MAX_THREADS)) < 0)
                usage("--threads: from 1 to 64");
        } else if (opt == OPT_REDIS) {
            char *colon = strrchr(optarg, ':');
            if (!colon || colon == optarg || strlen(optarg) >= sizeof redis_addr ||
                (redis_port = (int)number(colon + 1, 1, 65535)) < 0)
                usage("--redis: HOST:PORT");
            memcpy(redis_addr, optarg, (size_t)(colon - optarg));
            redis_addr[colon - optarg] = '\0';
            redis_host = redis_addr;
        } else {
            usage(NULL);
        }
    }
    if (optind != argc)
        usage(NULL);
#ifndef MOOR_CHAT_REDIS
    if (redis_host)
        usage("--redis: this moor-chat was built without hiredis");
#endif
    if (redis_host && threads > 1)
        usage("--redis and --threads: one or the other");
    /* main may run more than once in a process (the test): start from nothing. */
    memset(&room, 0, sizeof room);
    hub_lock();
    hub.threads = (size_t)threads;
    hub.head = NULL, hub.count = 0, hub.guests = 0, hub.clock = 0;
    memset(hub.inbox, 0, sizeof hub.inbox);
    hub_unlock();

    /* One descriptor per client: allow as many as the hard limit does. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN); /* a write to a reset connection is an error, not a death */
    /* Ctrl-\ (SIGQUIT) prints what every fiber waits on, and the server goes on; without it
     * the server still runs, so a failure is not worth a word. */
    (void)moor_dump_on_sigquit();

    /* The listeners, all on one port (the first one's, with -p 0): the kernel spreads the
     * connections over them. */
    for (long k = 0; k < threads; k++) {
        int fd = moor_tcp_listen_opt(bind_addr, (int)port, SOMAXCONN,
                                     threads > 1 ? MOOR_TCP_REUSEPORT : 0);
        if (fd >= 0 && k == 0)
            port = moor_socket_port(fd);
        if (fd < 0) {
            fprintf(stderr, "moor-chat: %s:%ld: %s\n", bind_addr, port, moor_strerror(fd));
            while (k-- > 0)
                close(hub.inbox[k].lfd);
            return 1;
        }
        /* Chat lines are small and latency matters; accepted sockets inherit this. */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &(int){1}, sizeof(int));
        hub.inbox[k].lfd = fd;
    }

    int failed = 0;
    if (threads == 1) { /* the executor of this thread */
        moor_executor *ex;
        int rc = moor_executor_new(&ex, NULL);
        if (rc >= 0 && (rc = moor_spawn(&server, serve, (void *)(intptr_t)hub.inbox[0].lfd,
                                        NULL)) < 0)
            moor_executor_free(ex);
        if (rc < 0) {
            fprintf(stderr, "moor-chat: %s\n", moor_strerror(rc));
            close(hub.inbox[0].lfd);
            return 1;
        }
        intptr_t result = 0;
        moor_join(server, &result); /* -ECANCELED: a signal stopped it, as it should */
        moor_executor_free(ex);
        failed = result != 0;
    } else { /* an executor on each of `threads` threads of their own */
        intptr_t results[MAX_THREADS];
        int rc = moor_threads_run((size_t)threads, serve_thread, NULL, NULL, results);
        if (rc < 0)
            fprintf(stderr, "moor-chat: %s\n", moor_strerror(rc));
        for (long k = 0; k < threads; k++) {
            failed |= rc < 0 || results[k] != 0;
            if (hub.inbox[k].lfd >= 0) /* its thread could not serve */
                close(hub.inbox[k].lfd);
        }
    }
    /* Mail posted to executors that had already stopped. */
    for (long k = 0; k < threads; k++)
        for (msg *m = hub.inbox[k].head, *next; m; m = next) {
            next = m->next;
            free(m);
        }
    return failed ? 1 : 0;
}
