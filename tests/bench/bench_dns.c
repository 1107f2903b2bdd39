/* bench_dns: 1,000 concurrent lookups through c-ares (moor_resolve from 1,000 fibers) against
 * the same 1,000 lookups through getaddrinfo(3) in moor_blocking, both against one dnsmasq.
 *
 * The comparison is honest only if both ask the same server over the same transport. The
 * program starts dnsmasq on a free loopback port (UDP) with a hosts file of 1,000 names
 * under .test (a zone it is told is local, so nothing is ever forwarded), and:
 *
 *  - points moor's channel at it with MOOR_DNS_SERVERS;
 *  - points getaddrinfo at it through glibc's resolver state: resolv.conf cannot name a port,
 *    but each worker thread's `_res` (res_init, then nsaddr_list[0] set to the server, before
 *    every call) can, with RES_NORELOAD so that glibc does not reload resolv.conf over it. Every answer is
 *    checked against the hosts file, so a lookup that went elsewhere would stop the run.
 *
 * Both do the same work per lookup: /etc/hosts first ("files dns" here; c-ares reads the same
 * order), then one A query (AF_INET, SOCK_STREAM). c-ares keeps at most 128 lookups in
 * flight per executor (dns.c); the workers of moor_blocking are the pool's 4 threads by
 * default, so the blocking side runs 4 lookups at a time: that is what a program gets from
 * "just call getaddrinfo in moor_blocking". The figure with 64 workers shows how far more
 * threads take it.
 *
 * Each round runs every measurement once (bench.h), after one warm-up round; the figures are
 * medians of 11 rounds. dns_cares_vs_blocking_ratio is dns_cares_ms / dns_blocking_ms:
 * below 1, c-ares is faster.
 *
 * Usage: bench_dns [scale]   (scale multiplies the number of lookups, 1,000 at 1) */
#define BENCH_NAME "bench_dns"
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <resolv.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

/* Its figures are milliseconds per burst, not nanoseconds per operation: bench.h's printing
 * helpers for the latter go unused here. */
#pragma GCC diagnostic ignored "-Wunused-function"
#include "bench.h"

#define DNSMASQ "/usr/sbin/dnsmasq"
#define LOOKUPS 1000u

static int server_port;
static pid_t server_pid;
static char dir[64], hosts_path[128];
static size_t nlookups;

/* ---- the server -------------------------------------------------------------------------- */

static int free_port(void)
{
    int u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof in;
    if (u < 0 || bind(u, (struct sockaddr *)&in, sizeof in) < 0 ||
        getsockname(u, (struct sockaddr *)&in, &len) < 0)
        die("no free UDP port");
    int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int ok = t >= 0 && bind(t, (struct sockaddr *)&in, sizeof in) == 0;
    close(t);
    close(u);
    return ok ? ntohs(in.sin_port) : 0;
}

static void server_stop(void)
{
    if (server_pid > 0) {
        kill(server_pid, SIGKILL);
        waitpid(server_pid, NULL, 0);
    }
    server_pid = 0;
    unlink(hosts_path);
    rmdir(dir);
}

static void server_start(void)
{
    if (access(DNSMASQ, X_OK) != 0)
        die(DNSMASQ " is not installed (apt-get install dnsmasq-base)");
    snprintf(dir, sizeof dir, "/tmp/moor-bench-dns-XXXXXX");
    if (!mkdtemp(dir))
        die("mkdtemp");
    snprintf(hosts_path, sizeof hosts_path, "%s/hosts", dir);
    FILE *f = fopen(hosts_path, "w");
    if (!f)
        die("cannot write the hosts file");
    for (size_t i = 0; i < nlookups; i++)
        fprintf(f, "10.%zu.%zu.%zu h%zu.test\n", i >> 16 & 255, i >> 8 & 255, i & 255, i);
    fclose(f);
    for (int tries = 0; tries < 5 && !server_pid; tries++) {
        int port = free_port();
        if (!port)
            continue;
        char a_port[32], a_hosts[160];
        snprintf(a_port, sizeof a_port, "--port=%d", port);
        snprintf(a_hosts, sizeof a_hosts, "--addn-hosts=%s", hosts_path);
        fflush(NULL);
        pid_t pid = fork();
        if (pid < 0)
            die("fork");
        if (pid == 0) {
            int null = open("/dev/null", O_RDWR);
            dup2(null, 0), dup2(null, 1), dup2(null, 2);
            char *argv[] = {DNSMASQ, "--keep-in-foreground", a_port,
                            "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv",
                            "--no-hosts", a_hosts, "--local=/test/", "--conf-file=/dev/null",
                            "--pid-file=", "--cache-size=0",
                            geteuid() == 0 ? "--user=root" : NULL, NULL};
            execv(DNSMASQ, argv);
            _exit(127);
        }
        /* Up when a UDP socket is bound there: bind fails while dnsmasq holds the port. */
        for (int i = 0; i < 500; i++) {
            usleep(10000);
            if (waitpid(pid, NULL, WNOHANG) == pid)
                break;
            int u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
            struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                     .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
            int taken = bind(u, (struct sockaddr *)&in, sizeof in) < 0 && errno == EADDRINUSE;
            close(u);
            if (taken) {
                server_pid = pid;
                server_port = port;
                break;
            }
        }
        if (!server_pid) {
            kill(pid, SIGKILL);
            waitpid(pid, NULL, 0);
        }
    }
    if (!server_pid)
        die("dnsmasq did not start");
    atexit(server_stop);
    char env[64];
    snprintf(env, sizeof env, "127.0.0.1:%d", server_port);
    setenv("MOOR_DNS_SERVERS", env, 1);
}

/* ---- one lookup, both ways ------------------------------------------------------------- */

static void name_of(size_t i, char *name, size_t len) { snprintf(name, len, "h%zu.test", i); }

static int answer_is(const struct addrinfo *res, size_t i)
{
    if (!res || res->ai_family != AF_INET)
        return 0;
    uint32_t a = ntohl(((const struct sockaddr_in *)res->ai_addr)->sin_addr.s_addr);
    return a == (10u << 24 | (uint32_t)(i >> 16 & 255) << 16 | (uint32_t)(i >> 8 & 255) << 8 |
                 (uint32_t)(i & 255));
}

static const struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM};

static intptr_t cares_one(void *arg)
{
    size_t i = (size_t)(uintptr_t)arg;
    char name[32];
    name_of(i, name, sizeof name);
    struct addrinfo *res;
    check(moor_resolve(name, NULL, &hints, moor_deadline_in(30000), &res), "moor_resolve");
    if (!answer_is(res, i))
        die("moor_resolve gave a wrong address");
    moor_resolve_free(res);
    return 0;
}

/* On a worker thread: its resolver state pointed at the server, then getaddrinfo. */
static intptr_t gai_job(void *arg)
{
    size_t i = (size_t)(uintptr_t)arg;
    /* Every time: glibc was seen to reload its configuration over the change between two
     * calls on one thread, RES_NORELOAD or not; res_init costs a read of resolv.conf, about
     * what c-ares spends reading /etc/hosts on every lookup. */
    res_init();
    /* Without it glibc reloads resolv.conf over the change whenever the file looks changed. */
    _res.options |= RES_NORELOAD;
    _res.nscount = 1;
    _res.nsaddr_list[0].sin_family = AF_INET;
    _res.nsaddr_list[0].sin_port = htons((uint16_t)server_port);
    _res.nsaddr_list[0].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    char name[32];
    name_of(i, name, sizeof name);
    struct addrinfo *res;
    int rc = getaddrinfo(name, NULL, &hints, &res);
    if (rc != 0)
        return -1000 - rc;
    int ok = answer_is(res, i);
    freeaddrinfo(res);
    return ok ? 0 : -1;
}

static intptr_t blocking_one(void *arg)
{
    intptr_t r = -1;
    check(moor_blocking(gai_job, arg, &r, moor_deadline_in(30000)), "moor_blocking");
    if (r != 0) {
        fprintf(stderr, BENCH_NAME ": getaddrinfo failed (%ld): is it asking dnsmasq?\n",
                (long)r);
        exit(1);
    }
    return 0;
}

/* ---- the rounds ---------------------------------------------------------------------------- */

static moor_fiber **fibers;

/* nlookups fibers run fn at once; wall time in ns until all are joined. */
static uint64_t burst(moor_fiber_fn fn)
{
    uint64_t t0 = now_ns();
    for (size_t i = 0; i < nlookups; i++)
        spawn_checked(&fibers[i], fn, (void *)(uintptr_t)i);
    for (size_t i = 0; i < nlookups; i++)
        join_checked(fibers[i]);
    return now_ns() - t0;
}

/* A figure in an executor of its own (one per thread at a time), warmed up by an untimed
 * burst first: the channel is made and the workers are started before the timed burst, as
 * in a program that has been running. */
static uint64_t in_executor(size_t threads, moor_fiber_fn fn)
{
    moor_executor_attr attr = {.blocking_threads = threads};
    moor_executor *ex;
    check(moor_executor_new(&ex, &attr), "moor_executor_new");
    burst(fn);
    uint64_t ns = burst(fn);
    moor_executor_free(ex);
    return ns;
}

static void round_fn(uint64_t *r, void *ctx)
{
    (void)ctx;
    r[0] = in_executor(0, cares_one);
    r[1] = in_executor(0, blocking_one);
    r[2] = in_executor(64, blocking_one);
}

static const char *fmt_ms(char *buf, size_t len, uint64_t ns)
{
    ull tenths = (ns + 50000) / 100000;
    snprintf(buf, len, "%llu.%llu", tenths / 10, tenths % 10);
    return buf;
}

int main(int argc, char **argv)
{
    const char *scale_arg;
    double scale = bench_scale_arg(argc, argv, &scale_arg);
    nlookups = scaled(LOOKUPS, scale);
    if (nlookups > (1u << 24))
        die("at most 16M lookups");
    fibers = calloc(nlookups, sizeof *fibers);
    if (!fibers)
        die("out of memory");
    server_start();

    static const char *const keys[] = {"dns_cares_ms", "dns_blocking_ms", "dns_blocking_64_ms"};
    enum { NFIG = 3 };
    struct stats st[NFIG];
    bench_repeat(NFIG, round_fn, NULL, st);

    char b[32];
    for (int i = 0; i < NFIG; i++)
        printf("%s: %s ms\n", keys[i], fmt_ms(b, sizeof b, st[i].median));
    printf("dns_cares_vs_blocking_ratio: %s x\n", fmt_ratio(b, sizeof b, st[0].median, st[1].median));
    printf("dns_cares_vs_blocking_64_ratio: %s x\n",
           fmt_ratio(b, sizeof b, st[0].median, st[2].median));
    bench_print_cpu_model();

    char b1[32], b2[32], b3[32];
    printf("\n%zu concurrent lookups per figure; %d repetitions, median shown, after one warm-up"
           " round; scale %s\n", nlookups, REPS, scale_arg);
    printf("%-24s %10s %10s %10s\n", "figure (ms)", "median", "min", "max");
    static const char *const what[] = {"c-ares, 1 channel", "getaddrinfo, 4 workers",
                                       "getaddrinfo, 64 workers"};
    for (int i = 0; i < NFIG; i++)
        printf("%-24s %10s %10s %10s\n", what[i], fmt_ms(b1, sizeof b1, st[i].median),
               fmt_ms(b2, sizeof b2, st[i].min), fmt_ms(b3, sizeof b3, st[i].max));
    free(fibers);
    return 0;
}
