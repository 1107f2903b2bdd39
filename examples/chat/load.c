/* moor-chat-load: many chat clients against a moor-chat, one fiber per client.
 *
 *   moor-chat-load [-h HOST] [-p PORT[,PORT...]] [-c CLIENTS] [-t TALKERS] [-m LINES]
 *                  [-r RATE] [-w WINDOW] [-k CONNECTING] [-d DRAIN_MS]
 *
 * Defaults: 127.0.0.1:7777, 100 clients, all of them talking, 1,000 lines each, at full speed
 * (-r 0); -r R sends R lines per second per talker. The first TALKERS clients talk, the others
 * only listen; every client reads everything. With several ports (moor-chat instances that
 * share one room through Redis), client i connects to the (i mod n)th.
 *
 * Flow control: a talker keeps at most WINDOW (64) of its lines on their way, a line being on
 * its way until every other client has it (-w 0: no limit). Without it, talkers at full speed
 * outrun the readers (all of them on this one thread) and the server drops the clients that
 * fall more than its 1 MiB outbox behind, as it is meant to; with it, a receiver is at most
 * TALKERS x WINDOW lines behind (100 x 64 lines of ~30 bytes: some 200 KB).
 *
 * A run has three phases:
 *  1. connect: every client connects (at most CONNECTING handshakes in flight, 256 by
 *     default, so that the server's listen backlog never overflows into SYN retries) and
 *     reads its "* welcome" line. connect_all_ms runs from the first connect to the last
 *     welcome. Every client reads all the while, so the O(n^2) "joined" lines never pile up.
 *  2. settle: the joins are let through before anything is measured. The server queues a
 *     client's "joined" line to everyone before it sends that client's welcome, and each
 *     receiver's queue is FIFO; so once every welcome is in, client 0 sends a line "s",
 *     client 1 sends one too when client 0's reaches it, and a client has seen every
 *     "joined" line once an "s" reaches it (client 0 gets client 1's). settle_ms is that
 *     wait. (Not "/who": with 10,000 clients its answer is longer than a client's buffer.)
 *  3. talk: the talkers send their lines, "<id> <seq> <send time, CLOCK_MONOTONIC ns>", and
 *     every receiver checks each sender's sequence and takes the latency of each line it
 *     gets. It ends when every line has reached every other client, or DRAIN_MS (10 s)
 *     after the last line was sent.
 *
 * Figures, one `key: value unit` line each: delivered_lines_per_s counts the deliveries (a
 * line to 99 others is 99) over the talk phase, from its start to the last delivery. lost
 * is the deliveries that never came: (line, receiver) pairs, summed; reordered counts lines
 * that came after a later line of the same sender. Exit status 1 if either is not zero, or
 * if the server dropped a client (disconnected), 2 for bad usage.
 *
 * The tool runs on one thread, as the server does: on the 2-core machine each gets a core.
 * A latency is taken when the receiving fiber parses the line, so it includes the time the
 * tool itself takes to get to it.
 */
#include <moor.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define READ_BUF (16 * 1024) /* per client; 10,000 of them */
#define PHASE_MS (300 * 1000) /* connecting or settling longer than this is a failure */

typedef struct client {
    int id;            /* 0 .. clients-1; ids below talkers talk */
    int fd;            /* -1 until connected */
    int welcomed, settled;
    uint32_t *next;    /* per talker: one past the highest sequence number seen */
    uint32_t *got;     /* per talker: lines received */
    moor_fiber *reader;
} client;

#define MAX_PORTS 16

static struct {
    const char *host;
    int port[MAX_PORTS];
    int nports;
    int clients, talkers;
    long lines;        /* per talker */
    double rate;       /* lines/s per talker; 0: as fast as the socket takes them */
    int connecting;    /* handshakes in flight at most */
    int drain_ms;
    int window;        /* lines per talker on their way at most; 0: no limit */
} opt = {"127.0.0.1", {7777}, 1, 100, -1, 1000, 0, 256, 10000, 64};

/* The window of each talker: how many clients have each line still on its way (a ring of
 * `window` counts), and the first line not yet everywhere. */
typedef struct flow {
    uint32_t *count;
    long acked;
    int waiting;
    moor_event room;   /* set when the talker waits and its oldest line is everywhere */
} flow;
static flow *flows;

static client *clients;
static moor_sem connect_slots;

static struct {
    int welcomed, settled, disconnected;
    moor_event all_welcomed, all_settled, all_delivered;
    uint64_t sent, delivered, expected, reordered, unknown;
    int64_t t0_ns, last_delivery_ns;
} run = {.all_welcomed = MOOR_EVENT_INIT, .all_settled = MOOR_EVENT_INIT,
         .all_delivered = MOOR_EVENT_INIT};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(int id, const char *what, int err)
{
    fprintf(stderr, "moor-chat-load: client %d: %s: %s\n", id, what, moor_strerror(err));
    exit(1);
}

/* ---- latency histogram: log-linear buckets, 128 per power of two (under 1% error) ------ */

#define SUB_BITS 7
#define SUB (1 << SUB_BITS)
static uint64_t hist[2 * SUB + 64 * SUB];
static uint64_t hist_n;

static size_t bucket_of(uint64_t v)
{
    if (v < 2 * SUB)
        return (size_t)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - SUB_BITS;
    return (size_t)(shift + 1) * SUB + (size_t)((v >> shift) & (SUB - 1));
}

/* The middle of bucket i, in ns. */
static double bucket_mid(size_t i)
{
    if (i < 2 * SUB)
        return (double)i;
    int shift = (int)(i / SUB) - 1;
    uint64_t low = (uint64_t)(SUB + i % SUB) << shift;
    return (double)low + (double)((uint64_t)1 << shift) / 2;
}

static double percentile_ms(double p)
{
    if (hist_n == 0)
        return 0;
    uint64_t rank = (uint64_t)(p * (double)hist_n + 0.999999), seen = 0;
    if (rank == 0)
        rank = 1;
    for (size_t i = 0; i < sizeof hist / sizeof hist[0]; i++)
        if ((seen += hist[i]) >= rank)
            return bucket_mid(i) / 1e6;
    return 0;
}

/* ---- receiving ---------------------------------------------------------------------------- */

/* Parse a decimal number at *p and the one space or end after it; -1 if there is none. */
static int64_t number(const char **p, const char *end)
{
    const char *s = *p;
    int64_t v = 0;
    if (s == end || *s < '0' || *s > '9')
        return -1;
    while (s < end && *s >= '0' && *s <= '9')
        v = v * 10 + (*s++ - '0');
    if (s < end && *s++ != ' ')
        return -1;
    *p = s;
    return v;
}

static void settled(client *c)
{
    if (c->settled++)
        return;
    if (++run.settled == opt.clients)
        moor_event_set(&run.all_settled);
}

/* A talker's line "<id> <seq> <ns>", as another client sent it. */
static void received(client *c, const char *body, const char *end)
{
    int64_t t = now_ns();
    int64_t id = number(&body, end), seq = number(&body, end), sent = number(&body, end);
    if (id < 0 || id >= opt.talkers || id == c->id || seq < 0 || seq >= opt.lines || sent < 0) {
        run.unknown++;
        return;
    }
    if ((uint32_t)seq < c->next[id])
        run.reordered++; /* a later line of this sender came first (or this one twice) */
    else
        c->next[id] = (uint32_t)seq + 1;
    c->got[id]++;
    if (opt.window) {
        flow *f = &flows[id];
        f->count[seq % opt.window]++;
        while (f->acked < opt.lines &&
               f->count[f->acked % opt.window] == (uint32_t)opt.clients - 1) {
            f->count[f->acked++ % opt.window] = 0;
            if (f->waiting)
                moor_event_set(&f->room);
        }
    }
    hist[bucket_of((uint64_t)(t > sent ? t - sent : 0))]++;
    hist_n++;
    run.last_delivery_ns = t;
    if (++run.delivered == run.expected)
        moor_event_set(&run.all_delivered);
}

static void line(client *c, const char *s, size_t n)
{
    const char *end = s + n;
    if (n >= 2 && s[0] == '*' && s[1] == ' ') { /* from the server: welcome, joined, left */
        if (n > 10 && memcmp(s, "* welcome ", 10) == 0 && !c->welcomed) {
            c->welcomed = 1;
            moor_sem_release(&connect_slots);
            if (++run.welcomed == opt.clients)
                moor_event_set(&run.all_welcomed);
        }
        return; /* "* guestN joined" and "* guestN left" need nothing */
    }
    const char *colon = memchr(s, ':', n); /* "<nick>: <body>" */
    if (!colon || colon + 2 > end) {
        run.unknown++;
        return;
    }
    const char *body = colon + 2;
    if (end - body == 1 && body[0] == 's') {
        if (c->id == 1 && !c->settled) { /* client 0 learns it has every join from this */
            ssize_t rc = moor_write_all(c->fd, "s\n", 2, NULL, -1);
            if (rc < 0)
                die(c->id, "write", (int)rc);
        }
        settled(c);
    } else
        received(c, body, end);
}

/* A client's reader: connect, then read every line until cancelled. */
static intptr_t client_run(void *arg)
{
    client *c = arg;
    moor_sem_acquire(&connect_slots, -1);
    c->fd = moor_tcp_connect(opt.host, opt.port[c->id % opt.nports], moor_deadline_in(60000));
    if (c->fd < 0)
        die(c->id, "connect", c->fd);
    moor_reader r;
    if (moor_reader_init(&r, c->fd, READ_BUF) < 0)
        die(c->id, "reader", -ENOMEM);
    for (;;) {
        const char *s;
        ssize_t n = moor_read_line(&r, &s, 0, NULL, -1);
        if (n == -ECANCELED || moor_cancelled())
            break; /* the run is over */
        if (n == -EMSGSIZE) {
            run.unknown++;
            continue;
        }
        if (n < 0) { /* the server closed this connection: it dropped us */
            fprintf(stderr, "moor-chat-load: client %d: disconnected: %s\n", c->id,
                    moor_strerror((int)n));
            run.disconnected++;
            if (!c->welcomed)
                exit(1); /* the connect phase would never end */
            break;
        }
        line(c, s, (size_t)n);
    }
    moor_reader_free(&r);
    return 0;
}

/* ---- talking ------------------------------------------------------------------------------ */

/* A talker: its lines, each stamped just before its write; at a fixed rate, talkers start
 * spread over one period so that their lines do not all go out in the same millisecond. */
static intptr_t talk(void *arg)
{
    client *c = arg;
    int64_t period = opt.rate > 0 ? (int64_t)(1e9 / opt.rate) : 0;
    int64_t start = run.t0_ns + period * c->id / opt.talkers;
    for (long seq = 0; seq < opt.lines; seq++) {
        flow *f = &flows[c->id];
        if (opt.window && seq - f->acked >= opt.window) {
            /* A line that never comes would hold the window shut: wait as long as the
             * drain, then go on (and the run reports it lost). */
            f->room = (moor_event)MOOR_EVENT_INIT;
            f->waiting = 1;
            moor_event_wait(&f->room, moor_deadline_in(opt.drain_ms));
            f->waiting = 0;
        }
        if (period) {
            int64_t wait = start + seq * period - now_ns();
            if (wait > 0)
                moor_sleep(moor_deadline_in((wait + 999999) / 1000000));
        }
        char body[64];
        int len = snprintf(body, sizeof body, "%d %ld %lld", c->id, seq, (long long)now_ns());
        struct iovec iov[2] = {{body, (size_t)len}, {"\n", 1}};
        ssize_t rc = moor_writev_all(c->fd, iov, 2, NULL, -1);
        if (rc < 0) {
            fprintf(stderr, "moor-chat-load: client %d: write: %s\n", c->id,
                    moor_strerror((int)rc));
            return 0; /* its reader reports the disconnection */
        }
        run.sent++;
    }
    return 0;
}

/* ---- the run ------------------------------------------------------------------------------ */

static void usage(void)
{
    fprintf(stderr, "usage: moor-chat-load [-h HOST] [-p PORT[,PORT...]] [-c CLIENTS] "
                    "[-t TALKERS] [-m LINES] [-r RATE] [-w WINDOW] [-k CONNECTING] "
                    "[-d DRAIN_MS]\n");
    exit(2);
}

static long arg_long(const char *s, long min, long max)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < min || v > max)
        usage();
    return v;
}

static void parse(int argc, char **argv)
{
    int o;
    while ((o = getopt(argc, argv, "h:p:c:t:m:r:w:k:d:")) != -1) {
        switch (o) {
        case 'h': opt.host = optarg; break;
        case 'p': {
            opt.nports = 0;
            for (char *tok = strtok(optarg, ","); tok; tok = strtok(NULL, ",")) {
                if (opt.nports == MAX_PORTS)
                    usage();
                opt.port[opt.nports++] = (int)arg_long(tok, 1, 65535);
            }
            if (opt.nports == 0)
                usage();
            break;
        }
        case 'c': opt.clients = (int)arg_long(optarg, 1, 1000000); break;
        case 't': opt.talkers = (int)arg_long(optarg, 0, 1000000); break;
        case 'm': opt.lines = arg_long(optarg, 0, UINT32_MAX); break;
        case 'r': {
            char *end;
            opt.rate = strtod(optarg, &end);
            if (!*optarg || *end || !(opt.rate >= 0 && opt.rate <= 1e9))
                usage();
            break;
        }
        case 'w': opt.window = (int)arg_long(optarg, 0, 1 << 20); break;
        case 'k': opt.connecting = (int)arg_long(optarg, 1, 1000000); break;
        case 'd': opt.drain_ms = (int)arg_long(optarg, 0, 3600000); break;
        default: usage();
        }
    }
    if (optind != argc)
        usage();
    if (opt.talkers < 0 || opt.talkers > opt.clients)
        opt.talkers = opt.clients;
}

static intptr_t drive(void *arg)
{
    (void)arg;
    static const moor_fiber_attr reader_attr = {.name = "client", .stack_size = 64 * 1024};
    static const moor_fiber_attr talker_attr = {.name = "talker", .stack_size = 64 * 1024};

    /* 1. connect */
    int64_t t = now_ns();
    for (int i = 0; i < opt.clients; i++) {
        int rc = moor_spawn(&clients[i].reader, client_run, &clients[i], &reader_attr);
        if (rc < 0)
            die(i, "spawn", rc);
    }
    if (moor_event_wait(&run.all_welcomed, moor_deadline_in(PHASE_MS)) < 0) {
        fprintf(stderr, "moor-chat-load: connect: %d of %d clients welcomed\n", run.welcomed,
                opt.clients);
        exit(1);
    }
    double connect_ms = (double)(now_ns() - t) / 1e6;

    /* 2. settle: an "s" reaches a client after every "joined" line it was sent */
    t = now_ns();
    int rc = 0;
    if (opt.clients == 1)
        settled(&clients[0]); /* nobody has joined after it */
    else if ((rc = (int)moor_write_all(clients[0].fd, "s\n", 2, NULL, -1)) < 0)
        die(0, "write", rc);
    if (moor_event_wait(&run.all_settled, moor_deadline_in(PHASE_MS)) < 0) {
        fprintf(stderr, "moor-chat-load: settle: %d of %d clients settled\n", run.settled,
                opt.clients);
        exit(1);
    }
    double settle_ms = (double)(now_ns() - t) / 1e6;

    /* 3. talk, then drain */
    run.expected = (uint64_t)opt.talkers * (uint64_t)opt.lines * (uint64_t)(opt.clients - 1);
    run.t0_ns = run.last_delivery_ns = now_ns();
    moor_fiber **talkers = calloc((size_t)opt.talkers + 1, sizeof *talkers);
    if (!talkers)
        die(-1, "talkers", -ENOMEM);
    for (int i = 0; i < opt.talkers; i++)
        if ((rc = moor_spawn(&talkers[i], talk, &clients[i], &talker_attr)) < 0)
            die(i, "spawn", rc);
    for (int i = 0; i < opt.talkers; i++)
        moor_join(talkers[i], NULL);
    double send_s = (double)(now_ns() - run.t0_ns) / 1e9;
    free(talkers);
    if (run.expected > 0)
        moor_event_wait(&run.all_delivered, moor_deadline_in(opt.drain_ms));

    double talk_s = (double)(run.last_delivery_ns - run.t0_ns) / 1e9;
    uint64_t lost = 0;
    for (int i = 0; i < opt.clients; i++)
        for (int s = 0; s < opt.talkers; s++)
            if (s != i && clients[i].got[s] < (uint32_t)opt.lines)
                lost += (uint32_t)opt.lines - clients[i].got[s];

    printf("clients: %d clients\n", opt.clients);
    printf("talkers: %d clients\n", opt.talkers);
    printf("rate: %g lines/s per talker (0: full speed)\n", opt.rate);
    printf("window: %d lines per talker (0: none)\n", opt.window);
    printf("lines_sent: %llu lines\n", (unsigned long long)run.sent);
    printf("lines_delivered: %llu lines\n", (unsigned long long)run.delivered);
    printf("delivered_lines_per_s: %.0f lines/s\n",
           talk_s > 0 ? (double)run.delivered / talk_s : 0);
    printf("sent_lines_per_s: %.0f lines/s\n", send_s > 0 ? (double)run.sent / send_s : 0);
    printf("talk_s: %.3f s\n", talk_s);
    printf("latency_p50_ms: %.3f ms\n", percentile_ms(0.50));
    printf("latency_p99_ms: %.3f ms\n", percentile_ms(0.99));
    printf("latency_max_ms: %.3f ms\n", percentile_ms(1.0));
    printf("connect_all_ms: %.1f ms\n", connect_ms);
    printf("settle_ms: %.1f ms\n", settle_ms);
    printf("lost: %llu deliveries\n", (unsigned long long)lost);
    printf("reordered: %llu lines\n", (unsigned long long)run.reordered);
    printf("disconnected: %d clients\n", run.disconnected);
    if (run.unknown)
        printf("unparsed: %llu lines\n", (unsigned long long)run.unknown);
    fflush(stdout);

    for (int i = 0; i < opt.clients; i++)
        moor_cancel(clients[i].reader);
    for (int i = 0; i < opt.clients; i++) {
        moor_join(clients[i].reader, NULL);
        moor_close(clients[i].fd);
    }
    return lost || run.reordered || run.disconnected ? 1 : 0;
}

int main(int argc, char **argv)
{
    parse(argc, argv);

    /* One descriptor per client: allow as many as the hard limit does. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)opt.clients + 16) {
        fprintf(stderr, "moor-chat-load: %d clients need more descriptors than "
                        "RLIMIT_NOFILE allows (%llu)\n", opt.clients,
                (unsigned long long)rl.rlim_cur);
        return 1;
    }

    clients = calloc((size_t)opt.clients, sizeof *clients);
    /* Two counters per (receiver, talker); at 10,000 x 100 that is 8 MB. */
    uint32_t *counts = calloc((size_t)opt.clients * (size_t)opt.talkers * 2 + 1,
                              sizeof *counts);
    if (!clients || !counts) {
        fprintf(stderr, "moor-chat-load: out of memory\n");
        return 1;
    }
    for (int i = 0; i < opt.clients; i++) {
        clients[i].id = i;
        clients[i].fd = -1;
        clients[i].next = counts + (size_t)i * (size_t)opt.talkers * 2;
        clients[i].got = clients[i].next + opt.talkers;
    }
    flows = calloc((size_t)opt.talkers + 1, sizeof *flows);
    uint32_t *rings = calloc((size_t)opt.talkers * (size_t)opt.window + 1, sizeof *rings);
    if (!flows || !rings) {
        fprintf(stderr, "moor-chat-load: out of memory\n");
        return 1;
    }
    for (int i = 0; i < opt.talkers; i++)
        flows[i].count = rings + (size_t)i * (size_t)opt.window;
    connect_slots = (moor_sem)MOOR_SEM_INIT((size_t)opt.connecting);

    moor_executor *ex;
    int rc = moor_executor_new(&ex, &(moor_executor_attr){.stack_size = 64 * 1024});
    moor_fiber *driver;
    if (rc < 0 || (rc = moor_spawn(&driver, drive, NULL, NULL)) < 0) {
        fprintf(stderr, "moor-chat-load: %s\n", moor_strerror(rc));
        return 1;
    }
    intptr_t status;
    moor_join(driver, &status);
    moor_executor_free(ex);
    free(counts);
    free(rings);
    free(flows);
    free(clients);
    return (int)status;
}
