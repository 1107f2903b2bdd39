/* moor-chat: a multi-user TCP chat server, one fiber per client.
 *
 *   moor-chat [-b ADDR] [-p PORT]     default 127.0.0.1:7777; -p 0 picks a free port
 *   nc 127.0.0.1 7777                 then type lines; /nick NAME, /who, /quit
 *
 * Each client has two fibers. Its reader reads lines and hands each one to the other
 * clients' outboxes; its writer drains its own outbox to the socket, several lines per
 * system call. A line is formatted once into a message that every outbox it goes to shares
 * (a reference count), so a line to 10,000 clients is one allocation. Outboxes are bounded:
 * a client with more than 1 MiB unsent is dropped, so a slow reader slows nobody down and
 * the server's memory stays bounded. A scope owns the readers, so shutting down is one
 * moor_scope_close.
 */
#include <moor.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

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

#define MAX_LINE (4096)         /* longest line accepted, without its newline */
#define MAX_NICK (32)
#define OUTBOX_MAX (1 << 20)    /* unsent bytes beyond which a client is dropped */
#define BATCH (64)              /* messages per writev */
#define LINGER_MS (1000)        /* how long a leaving client's writer may flush */

/* A line as sent, shared by every outbox it is queued in. */
typedef struct msg {
    size_t refs;
    size_t len;
    char text[]; /* len bytes, the last one '\n' */
} msg;

typedef struct client {
    struct client *prev, *next; /* in the room */
    int fd;
    char nick[MAX_NICK + 1];
    msg **box;                  /* the outbox: a ring of `cap` slots, `len` used from `head` */
    size_t cap, head, len;
    size_t bytes;               /* unsent bytes in the outbox and in the writer's hands */
    moor_sem ready;             /* a permit when the empty outbox gets a message */
    int leaving;                /* the writer sends what is queued, then returns */
    int dropped;                /* too slow or gone: everyone stops at once */
    moor_fiber *reader;
} client;

static struct {
    client *head;               /* everyone who is in, in no particular order */
    size_t count;
    unsigned long guests;       /* connections so far, for guest<N> */
    int closing;                /* shutting down: nobody is told who left */
} room;

static const char *bind_addr = "127.0.0.1";
static moor_fiber *server;      /* the accept loop, cancelled by a signal */
static const moor_fiber_attr client_attr = {.name = "client", .stack_size = 64 * 1024};
static const moor_fiber_attr writer_attr = {.name = "writer", .stack_size = 64 * 1024};

/* The formatted head, then `len` bytes of body copied as they are (a chat line may hold any
 * byte, NULs too), then '\n'. NULL without memory: the line is not sent. */
static msg *msg_new(const char *body, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int head = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    msg *m = malloc(sizeof *m + (size_t)head + len + 2);
    if (!m)
        return NULL;
    va_start(ap, fmt);
    vsnprintf(m->text, (size_t)head + 1, fmt, ap);
    va_end(ap);
    if (len > 0) /* body may be NULL then */
        memcpy(m->text + head, body, len);
    m->text[head + len] = '\n';
    m->len = (size_t)head + len + 1;
    m->refs = 1;
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

/* A message to everyone in the room but `except` (NULL: everyone); consumes m. */
static void announce(client *except, msg *m)
{
    for (client *p = room.head; p; p = p->next)
        if (p != except)
            deliver(p, m);
    msg_unref(m);
}

static void room_add(client *c)
{
    c->next = room.head;
    if (room.head)
        room.head->prev = c;
    room.head = c;
    room.count++;
}

static void room_remove(client *c)
{
    *(c->prev ? &c->prev->next : &room.head) = c->next;
    if (c->next)
        c->next->prev = c->prev;
    room.count--;
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

/* Who is called name, or NULL. */
static client *find(const char *name, size_t len)
{
    for (client *p = room.head; p; p = p->next)
        if (strlen(p->nick) == len && memcmp(p->nick, name, len) == 0)
            return p;
    return NULL;
}

static int by_bytes(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* "* online: " and every nick, sorted. */
static void who(client *c)
{
    const char **nicks = malloc(room.count * sizeof *nicks);
    char *list = malloc(room.count * (MAX_NICK + 1));
    if (nicks && list) {
        size_t n = 0, len = 0;
        for (client *p = room.head; p; p = p->next)
            nicks[n++] = p->nick;
        qsort(nicks, n, sizeof *nicks, by_bytes);
        for (size_t i = 0; i < n; i++)
            len += (size_t)sprintf(list + len, i ? " %s" : "%s", nicks[i]);
        send_to(c, msg_new(list, len, "* online: "));
    }
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
    client *owner = find(name, len);
    if (owner && owner != c) {
        send_to(c, msg_new(NULL, 0, "* error: nick taken"));
        return;
    }
    char old[MAX_NICK + 1];
    strcpy(old, c->nick);
    memcpy(c->nick, name, len);
    c->nick[len] = '\0';
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

/* A client's reader: the whole life of a connection. The client lives on this fiber's
 * stack, which never moves: the room and the writer point into it until it returns. */
static intptr_t client_run(void *arg)
{
    client c = {.fd = (int)(intptr_t)arg, .ready = MOOR_SEM_INIT(0), .reader = moor_self()};
    moor_reader r;
    moor_fiber *w;
    do /* guest<N>, N counting connections; a name someone took with /nick is skipped */
        snprintf(c.nick, sizeof c.nick, "guest%lu", ++room.guests);
    while (find(c.nick, strlen(c.nick)));
    /* Without memory for any of these the connection is closed: a client is served in full,
     * starting with its name, or not at all. */
    msg *welcome = msg_new(NULL, 0, "* welcome %s", c.nick);
    if (!welcome) {
        moor_close(c.fd);
        return 0;
    }
    if (moor_reader_init(&r, c.fd, MAX_LINE + 2) < 0) { /* room for "\r\n" */
        msg_unref(welcome);
        moor_reader_free(&r);
        moor_close(c.fd);
        return 0;
    }
    if (moor_spawn(&w, writer, &c, &writer_attr) < 0) {
        msg_unref(welcome);
        moor_reader_free(&r);
        moor_close(c.fd);
        return 0;
    }
    room_add(&c);
    send_to(&c, welcome); /* or, without memory for its outbox, c is dropped */
    announce(&c, msg_new(NULL, 0, "* %s joined", c.nick));

    /* A flooder's lines come out of its buffer without waiting, but each spends moor's
     * cooperative budget: after 128 of them the others run, so nobody waits long behind it. */
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

    room_remove(&c);
    if (!room.closing)
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

/* Wait for one signal, then stop the server. */
static intptr_t stop_on(void *arg)
{
    if (moor_signal_wait((int)(intptr_t)arg, -1) >= 0)
        moor_cancel(server);
    return 0;
}

/* Accept until a signal cancels this fiber, then tell everyone and close the scope. */
static intptr_t serve(void *arg)
{
    int lfd = (int)(intptr_t)arg;
    moor_scope signals, clients;
    moor_scope_init(&signals);
    moor_scope_init(&clients);
    if (moor_scope_spawn(&signals, stop_on, (void *)(intptr_t)SIGINT, NULL) < 0 ||
        moor_scope_spawn(&signals, stop_on, (void *)(intptr_t)SIGTERM, NULL) < 0) {
        fprintf(stderr, "moor-chat: no memory to wait for signals\n"); /* nothing could stop it */
        moor_scope_close(&signals, -1);
        moor_close(lfd);
        return 1;
    }
    moor_yield(); /* the signal waits begin before anyone learns the port */
    printf("listening on %s:%d\n", bind_addr, moor_socket_port(lfd));
    fflush(stdout);

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
    room.closing = 1;
    announce(NULL, msg_new(NULL, 0, "* server shutting down"));
    moor_scope_close(&clients, moor_deadline_in(2 * LINGER_MS));
    moor_scope_close(&signals, -1);
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: moor-chat [-b ADDR] [-p PORT]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int port = 7777, opt;
    while ((opt = getopt(argc, argv, "b:p:")) != -1) {
        char *end;
        if (opt == 'b')
            bind_addr = optarg;
        else if (opt == 'p' && (port = (int)strtol(optarg, &end, 10), !*end && *optarg))
            continue;
        else
            usage();
    }
    if (optind != argc || port < 0 || port > 65535)
        usage();
    memset(&room, 0, sizeof room); /* main may run more than once in a process (the test) */

    /* One descriptor per client: allow as many as the hard limit does. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN); /* a write to a reset connection is an error, not a death */

    moor_executor *ex;
    int rc = moor_executor_new(&ex, NULL);
    int lfd = rc < 0 ? rc : moor_tcp_listen(bind_addr, port, SOMAXCONN);
    if (lfd < 0) {
        fprintf(stderr, "moor-chat: %s:%d: %s\n", bind_addr, port, moor_strerror(lfd));
        return 1;
    }
    /* Chat lines are small and latency matters; accepted sockets inherit this. */
    setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &(int){1}, sizeof(int));
    if ((rc = moor_spawn(&server, serve, (void *)(intptr_t)lfd, NULL)) < 0) {
        fprintf(stderr, "moor-chat: %s\n", moor_strerror(rc));
        return 1;
    }
    intptr_t failed = 0;
    moor_join(server, &failed); /* -ECANCELED: a signal stopped it, as it should */
    moor_executor_free(ex);
    return failed ? 1 : 0;
}
