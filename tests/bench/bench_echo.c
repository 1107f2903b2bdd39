/* bench_echo: a TCP echo server written with moor (a fiber per connection, moor_read and
 * moor_write_all) against the same server written as raw libev callbacks, both driven by one
 * load client: 100 connections doing 64-byte ping-pong over 127.0.0.1.
 *
 * Each server runs in a child process of its own (one core), the client in this process
 * (the other core) with plain epoll, so the client costs both servers the same. Rounds
 * alternate between the servers; the figures are medians over the rounds.
 *
 *   bench_echo [seconds-per-round] [rounds]      (defaults: 2 and 5)
 *
 * With --external, no server is started: the same load client drives a server that is
 * already listening at HOST:PORT (a peer's, such as tests/bench/peers/go/echo), one round
 * after another, and prints echo_external_msgs_per_s (the median) and its spread. Pin that
 * server to one core and this program to the other (taskset) to keep the layout above.
 *
 *   bench_echo --external HOST:PORT [seconds-per-round] [rounds]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <netdb.h>
#include <moor.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CONNECTIONS 100
#define MSG 64
#define MAX_ROUNDS 31

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int listen_any(int *port)
{
    int fd = moor_tcp_listen("127.0.0.1", 0, 1024);
    if (fd < 0) {
        fprintf(stderr, "listen: %s\n", moor_strerror(fd));
        exit(1);
    }
    *port = moor_socket_port(fd);
    return fd;
}

/* ---- the moor server ------------------------------------------------------------------- */

static intptr_t moor_conn(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char buf[4096];
    for (;;) {
        ssize_t n = moor_read(fd, buf, sizeof buf, -1);
        if (n <= 0 || moor_write_all(fd, buf, (size_t)n, NULL, -1) < 0)
            break;
    }
    moor_close(fd);
    return 0;
}

static void moor_server(int lfd)
{
    moor_executor *ex;
    if (moor_executor_new(&ex, NULL) < 0)
        exit(1);
    for (;;) {
        int c = moor_accept(lfd, NULL, NULL, -1);
        if (c < 0)
            continue;
        int one = 1;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (moor_spawn(NULL, moor_conn, (void *)(intptr_t)c, &(moor_fiber_attr){.stack_size = 32 * 1024}) < 0)
            moor_close(c);
    }
}

/* ---- the raw libev server -------------------------------------------------------------- */

typedef struct conn {
    ev_io r, w;
    char buf[4096];
    size_t pending, off; /* bytes not yet written back */
} conn;

static void conn_close(struct ev_loop *loop, conn *c)
{
    ev_io_stop(loop, &c->r);
    ev_io_stop(loop, &c->w);
    close(c->r.fd);
    free(c);
}

/* Write what is pending; returns -1 if the connection is gone. */
static int flush(struct ev_loop *loop, conn *c)
{
    while (c->off < c->pending) {
        ssize_t n = write(c->r.fd, c->buf + c->off, c->pending - c->off);
        if (n < 0) {
            if (errno == EAGAIN) {
                ev_io_stop(loop, &c->r);
                ev_io_start(loop, &c->w);
                return 0;
            }
            return -1;
        }
        c->off += (size_t)n;
    }
    c->pending = c->off = 0;
    ev_io_stop(loop, &c->w);
    ev_io_start(loop, &c->r);
    return 0;
}

static void on_read(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    conn *c = (conn *)w;
    ssize_t n = read(w->fd, c->buf, sizeof c->buf);
    if (n < 0 && errno == EAGAIN)
        return;
    if (n <= 0) {
        conn_close(loop, c);
        return;
    }
    c->pending = (size_t)n;
    c->off = 0;
    if (flush(loop, c) < 0)
        conn_close(loop, c);
}

static void on_write(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    conn *c = (conn *)((char *)w - offsetof(conn, w));
    if (flush(loop, c) < 0)
        conn_close(loop, c);
}

static void on_accept(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)revents;
    for (;;) {
        int fd = accept4(w->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        ev_io_init(&c->r, on_read, fd, EV_READ);
        ev_io_init(&c->w, on_write, fd, EV_WRITE);
        ev_io_start(loop, &c->r);
    }
}

static void libev_server(int lfd)
{
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    ev_io lw;
    ev_io_init(&lw, on_accept, lfd, EV_READ);
    ev_io_start(loop, &lw);
    ev_run(loop, 0);
}

/* ---- the load client ------------------------------------------------------------------- */

typedef struct client {
    int fd;
    size_t got;
} client;

static int client_connect(const struct sockaddr_in *sa)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    for (int tries = 0; connect(fd, (const struct sockaddr *)sa, sizeof *sa) < 0; tries++) {
        if (tries > 100) {
            perror("client connect");
            exit(1);
        }
        usleep(10000);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    return fd;
}

/* Ping-pong on every connection for `seconds`; returns messages (round trips) per second. */
static double load(const struct sockaddr_in *sa, double seconds)
{
    static const char msg[MSG] = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde";
    client cl[CONNECTIONS];
    int ep = epoll_create1(EPOLL_CLOEXEC);
    for (int i = 0; i < CONNECTIONS; i++) {
        cl[i].fd = client_connect(sa);
        cl[i].got = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &cl[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, cl[i].fd, &ev);
        if (write(cl[i].fd, msg, MSG) != MSG) {
            perror("client write");
            exit(1);
        }
    }
    int64_t warm_until = now_ns() + 300000000;
    int64_t start = 0, end = 0;
    long count = 0;
    struct epoll_event evs[CONNECTIONS];
    for (;;) {
        int n = epoll_wait(ep, evs, CONNECTIONS, 1000);
        int64_t t = now_ns();
        if (!start && t >= warm_until) {
            start = t;
            end = t + (int64_t)(seconds * 1e9);
            count = 0;
        }
        if (start && t >= end)
            break;
        for (int i = 0; i < n; i++) {
            client *c = evs[i].data.ptr;
            char buf[MSG];
            ssize_t r = read(c->fd, buf, MSG - c->got);
            if (r <= 0) {
                if (r < 0 && errno == EAGAIN)
                    continue;
                fprintf(stderr, "client: server closed the connection\n");
                exit(1);
            }
            c->got += (size_t)r;
            if (c->got == MSG) {
                c->got = 0;
                count++;
                if (write(c->fd, msg, MSG) != MSG) {
                    perror("client write");
                    exit(1);
                }
            }
        }
    }
    double rate = (double)count / ((double)(now_ns() - start) / 1e9);
    for (int i = 0; i < CONNECTIONS; i++)
        close(cl[i].fd);
    close(ep);
    return rate;
}

static double run_round(int use_moor, double seconds)
{
    int port;
    int lfd = listen_any(&port);
    pid_t pid = fork();
    if (pid == 0) {
        if (use_moor)
            moor_server(lfd);
        else
            libev_server(lfd);
        _exit(0);
    }
    close(lfd);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    double rate = load(&sa, seconds);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return rate;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* HOST:PORT (IPv4; HOST a name or a dotted quad) into *sa; -1 if it does not resolve. */
static int parse_host_port(const char *arg, struct sockaddr_in *sa)
{
    char host[256];
    const char *colon = strrchr(arg, ':');
    if (!colon || colon == arg || (size_t)(colon - arg) >= sizeof host || !colon[1])
        return -1;
    memcpy(host, arg, (size_t)(colon - arg));
    host[colon - arg] = '\0';
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    if (getaddrinfo(host, colon + 1, &hints, &res) != 0)
        return -1;
    memcpy(sa, res->ai_addr, sizeof *sa);
    freeaddrinfo(res);
    return 0;
}

/* --external: rounds against a server someone else started; no ratio, nothing alternates. */
static int run_external(int argc, char **argv)
{
    struct sockaddr_in sa;
    double seconds = argc > 3 ? atof(argv[3]) : 2.0;
    int rounds = argc > 4 ? atoi(argv[4]) : 5;
    if (argc < 3 || argc > 5 || seconds <= 0 || rounds < 1 || rounds > MAX_ROUNDS) {
        fprintf(stderr, "usage: %s --external HOST:PORT [seconds-per-round > 0] [rounds 1..%d]\n",
                argv[0], MAX_ROUNDS);
        return 2;
    }
    if (parse_host_port(argv[2], &sa) < 0) {
        fprintf(stderr, "%s: cannot resolve \"%s\" (want HOST:PORT)\n", argv[0], argv[2]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    double e[MAX_ROUNDS];
    for (int i = 0; i < rounds; i++) {
        e[i] = load(&sa, seconds);
        fprintf(stderr, "round %d: external %.0f msgs/s\n", i + 1, e[i]);
    }
    double em = median(e, rounds); /* sorts e */
    printf("echo_external_msgs_per_s: %.0f msgs/s\n", em);
    printf("echo_external_msgs_per_s_spread: %.0f..%.0f msgs/s\n", e[0], e[rounds - 1]);
    printf("\n%d connections, %d-byte ping-pong to %s, %d rounds of %.1f s, median\n",
           CONNECTIONS, MSG, argv[2], rounds, seconds);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--external") == 0)
        return run_external(argc, argv);
    double seconds = argc > 1 ? atof(argv[1]) : 2.0;
    int rounds = argc > 2 ? atoi(argv[2]) : 5;
    if (seconds <= 0 || rounds < 1 || rounds > MAX_ROUNDS) {
        fprintf(stderr, "usage: %s [seconds-per-round > 0] [rounds 1..%d]\n", argv[0], MAX_ROUNDS);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    double m[MAX_ROUNDS], l[MAX_ROUNDS], ratio[MAX_ROUNDS];
    for (int i = 0; i < rounds; i++) {
        /* Alternate which goes first, so that drift on the machine hits both alike. */
        if (i % 2) {
            m[i] = run_round(1, seconds);
            l[i] = run_round(0, seconds);
        } else {
            l[i] = run_round(0, seconds);
            m[i] = run_round(1, seconds);
        }
        ratio[i] = m[i] / l[i];
        fprintf(stderr, "round %d: moor %.0f msgs/s, libev %.0f msgs/s, ratio %.3f\n", i + 1,
                m[i], l[i], ratio[i]);
    }
    double mm = median(m, rounds), lm = median(l, rounds), rm = median(ratio, rounds);
    printf("echo_moor_msgs_per_s: %.0f msgs/s\n", mm);
    printf("echo_libev_msgs_per_s: %.0f msgs/s\n", lm);
    printf("echo_ratio: %.3f x\n", rm);
    printf("\n%d connections, %d-byte ping-pong over 127.0.0.1, %d rounds of %.1f s, medians;\n"
           "echo_ratio is the median of the per-round ratios (target >= 0.95: %s)\n",
           CONNECTIONS, MSG, rounds, seconds, rm >= 0.95 ? "PASS" : "MISS");
    return 0;
}
