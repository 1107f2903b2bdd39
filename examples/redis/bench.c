/* moor-redis-bench: N fibers sending INCR through moor_redis, beside redis-benchmark on the
 * same server in the same run.
 *
 *   moor-redis-bench [-c fibers] [-t seconds] [-r runs] [-a|-f] [host:port]
 *
 * The fibers send INCR formatted once, as redis-benchmark does
 * (moor_redis_command_formatted); -a makes them use moor_redis_command_argv, -f the
 * printf-like moor_redis_command, whose formatting in hiredis 0.14 (a character at a time into
 * an sds string) is most of the client's instructions (callgrind).
 *
 * Without host:port it starts its own redis-server on a free loopback port. Each run measures
 *   dedicated  N fibers, each on its own connection, INCR in a loop for t seconds;
 *   reference  redis-benchmark -t incr -c N -P 1 -q, as many requests as the fibers made
 *              (so it runs about as long), its requests per second read from its output;
 *   shared     N fibers sharing one connection: their commands are pipelined automatically.
 * Figures are medians over the runs (ratios: the median of each run's ratio), one
 * `key: value unit` line each (STYLE.md); each run's figures go to stderr as it ends. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "redis.h"
#include "server.h"

#define MAX_FIBERS 4096
#define MAX_RUNS 31

static const char *host = "127.0.0.1";
static int port;
static int nfibers = 50;
static int seconds = 2;
static int runs = 3;

static void check(int rc, const char *what)
{
    if (rc < 0) {
        fprintf(stderr, "moor-redis-bench: %s: %s\n", what, moor_strerror(rc));
        exit(1);
    }
}

typedef struct worker {
    moor_redis *conn;
    int64_t end;
    long long ops;
} worker;

/* How the fibers send INCR: 'p' preformatted (the default, as redis-benchmark does), 'a' argv,
 * 'f' printf-like. */
static int form = 'p';
static const char incr_resp[] = "*2\r\n$4\r\nINCR\r\n$13\r\nbench:counter\r\n";

static intptr_t incr_loop(void *arg)
{
    worker *w = arg;
    static const char *argv[] = {"INCR", "bench:counter"};
    while (moor_now() < w->end) {
        redisReply *r;
        int rc = form == 'f' ? moor_redis_command(w->conn, -1, &r, "INCR bench:counter")
               : form == 'a' ? moor_redis_command_argv(w->conn, -1, &r, 2, argv, NULL)
               : moor_redis_command_formatted(w->conn, -1, &r, incr_resp,
                                              sizeof incr_resp - 1);
        check(rc, "INCR");
        moor_redis_reply_free(r);
        w->ops++;
    }
    return 0;
}

/* Ops per second of nfibers INCR loops, on nfibers connections or one shared. */
static double run_fibers(int shared)
{
    static worker workers[MAX_FIBERS];
    static moor_fiber *fibers[MAX_FIBERS];
    moor_redis *one = NULL;
    if (shared)
        check(moor_redis_connect(host, port, moor_deadline_in(5000), &one), "connect");
    for (int i = 0; i < nfibers; i++) {
        workers[i] = (worker){.conn = one};
        if (!shared)
            check(moor_redis_connect(host, port, moor_deadline_in(5000), &workers[i].conn),
                  "connect");
    }
    int64_t t0 = moor_now();
    for (int i = 0; i < nfibers; i++) {
        workers[i].end = t0 + seconds * 1000;
        check(moor_spawn(&fibers[i], incr_loop, &workers[i], NULL), "spawn");
    }
    long long ops = 0;
    for (int i = 0; i < nfibers; i++) {
        check(moor_join(fibers[i], NULL), "join");
        ops += workers[i].ops;
    }
    int64_t t1 = moor_now();
    for (int i = 0; i < nfibers; i++)
        if (!shared)
            moor_redis_close(workers[i].conn);
    if (one)
        moor_redis_close(one);
    return (double)ops * 1000.0 / (double)(t1 - t0);
}

/* redis-benchmark's requests per second for `requests` INCRs from nfibers clients, or a
 * negative value if it could not be run or read. */
static double run_reference(long long requests)
{
    char port_s[16], clients[16], count[32];
    snprintf(port_s, sizeof port_s, "%d", port);
    snprintf(clients, sizeof clients, "%d", nfibers);
    snprintf(count, sizeof count, "%lld", requests);
    int out[2];
    if (pipe(out) < 0)
        return -1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        dup2(out[1], STDOUT_FILENO);
        close(out[0]);
        close(out[1]);
        execlp("redis-benchmark", "redis-benchmark", "-h", host, "-p", port_s, "-t", "incr",
               "-c", clients, "-P", "1", "-n", count, "-q", (char *)NULL);
        _exit(127);
    }
    close(out[1]);
    static char text[65536];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(out[0], text + len, sizeof text - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len == sizeof text - 1)
            len = 0; /* only the end matters */
    }
    text[len] = '\0';
    close(out[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    /* Progress lines end in \r; the result is the last "INCR: <n> requests per second". */
    const char *last = NULL;
    for (const char *p = text; (p = strstr(p, "INCR: ")) != NULL; p++)
        last = p;
    double rps;
    if (!last || sscanf(last, "INCR: %lf requests per second", &rps) != 1 ||
        !strstr(last, "requests per second"))
        return -1;
    return rps;
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

static void usage(void)
{
    fprintf(stderr, "usage: moor-redis-bench [-c fibers] [-t seconds] [-r runs] [-a|-f] [host:port]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int opt;
    while ((opt = getopt(argc, argv, "c:t:r:af")) != -1) {
        switch (opt) {
        case 'a':
        case 'f': form = opt; break;
        case 'c': nfibers = atoi(optarg); break;
        case 't': seconds = atoi(optarg); break;
        case 'r': runs = atoi(optarg); break;
        default: usage();
        }
    }
    if (nfibers < 1 || nfibers > MAX_FIBERS || seconds < 1 || runs < 1 || runs > MAX_RUNS)
        usage();
    redis_server own = {0, 0};
    static char host_buf[256];
    if (optind < argc) {
        const char *colon = strrchr(argv[optind], ':');
        if (!colon || colon == argv[optind] || (size_t)(colon - argv[optind]) >= sizeof host_buf)
            usage();
        memcpy(host_buf, argv[optind], (size_t)(colon - argv[optind]));
        host = host_buf;
        port = atoi(colon + 1);
    } else {
        check(redis_server_start(&own), "starting redis-server");
        port = own.port;
    }

    moor_executor *ex;
    check(moor_executor_new(&ex, NULL), "executor");
    double dedicated[MAX_RUNS], reference[MAX_RUNS], shared[MAX_RUNS];
    for (int r = 0; r < runs; r++) {
        dedicated[r] = run_fibers(0);
        reference[r] = run_reference((long long)(dedicated[r] * seconds));
        shared[r] = run_fibers(1);
        fprintf(stderr, "run %d: dedicated %.0f ops/s, redis-benchmark %.0f ops/s, "
                "shared %.0f ops/s\n", r + 1, dedicated[r], reference[r], shared[r]);
        if (reference[r] < 0) {
            fprintf(stderr, "moor-redis-bench: redis-benchmark could not be run or read\n");
            return 1;
        }
    }
    moor_executor_free(ex);
    redis_server_stop(&own);

    /* Ratios are taken run by run (each pairs measurements made seconds apart, under the same
     * load from the rest of the machine), then their median. */
    double ratio[MAX_RUNS], shared_ratio[MAX_RUNS];
    for (int r = 0; r < runs; r++) {
        ratio[r] = dedicated[r] / reference[r];
        shared_ratio[r] = shared[r] / dedicated[r];
    }
    double rr = median(ratio, runs), sr = median(shared_ratio, runs);
    double d = median(dedicated, runs), ref = median(reference, runs), s = median(shared, runs);
    printf("redis_fibers: %d fibers\n", nfibers);
    printf("redis_dedicated_ops_per_s: %.0f ops/s\n", d);
    printf("redis_benchmark_ops_per_s: %.0f ops/s\n", ref);
    printf("redis_ratio: %.2f x\n", rr);
    printf("redis_shared_ops_per_s: %.0f ops/s\n", s);
    printf("redis_shared_vs_dedicated_ratio: %.2f x\n", sr);
    printf("\n%-34s %12s\n", "INCR, medians of runs", "ops/s");
    printf("%-34s %12.0f\n", "fibers, a connection each", d);
    printf("%-34s %12.0f\n", "redis-benchmark -P 1, same -c", ref);
    printf("%-34s %12.0f\n", "fibers, one shared connection", s);
    return 0;
}
