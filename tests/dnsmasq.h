/* A dnsmasq of the test's own on a free loopback port, serving a hosts file the test writes,
 * with MOOR_DNS_SERVERS pointed at it: what test_dns and test_fault look names up against.
 * Include after fixture.h. */
#ifndef MOOR_TESTS_DNSMASQ_H
#define MOOR_TESTS_DNSMASQ_H

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define DNSMASQ "/usr/sbin/dnsmasq"

typedef struct dns_server {
    pid_t pid; /* 0: none */
    int port;
    char dir[64];
    char hosts[128];
} dns_server;

static int dnsmasq_installed(void) { return access(DNSMASQ, X_OK) == 0; }

/* A free loopback port, for UDP and TCP both (the server may still lose it to a race: the
 * caller tries again). */
static int dnsmasq_free_port(void)
{
    int u = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_true(u >= 0);
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(u, (struct sockaddr *)&in, sizeof in), 0);
    socklen_t len = sizeof in;
    assert_int_equal(getsockname(u, (struct sockaddr *)&in, &len), 0);
    int t = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(t >= 0);
    int ok = bind(t, (struct sockaddr *)&in, sizeof in) == 0;
    close(t);
    close(u);
    return ok ? ntohs(in.sin_port) : 0;
}

/* Does the server answer? One A query for `name`, by hand, waiting up to wait_ms. */
static int dnsmasq_answers(int port, const char *name, int wait_ms)
{
    unsigned char q[300] = {0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0};
    size_t n = 12;
    for (const char *p = name; *p;) {
        size_t l = strcspn(p, ".");
        q[n++] = (unsigned char)l;
        memcpy(q + n, p, l);
        n += l;
        p += l;
        if (*p == '.')
            p++;
    }
    q[n++] = 0;
    q[n++] = 0, q[n++] = 1, q[n++] = 0, q[n++] = 1;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert_true(s >= 0);
    struct sockaddr_in in = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int ok = 0;
    if (sendto(s, q, n, 0, (struct sockaddr *)&in, sizeof in) == (ssize_t)n) {
        struct pollfd pfd = {s, POLLIN, 0};
        unsigned char buf[512];
        ok = poll(&pfd, 1, wait_ms) == 1 && recv(s, buf, sizeof buf, 0) >= 12 &&
             buf[0] == 0x12 && buf[1] == 0x34;
    }
    close(s);
    return ok;
}

static pid_t dnsmasq_spawn(const dns_server *s, int port)
{
    char a_port[32], a_hosts[160];
    snprintf(a_port, sizeof a_port, "--port=%d", port);
    snprintf(a_hosts, sizeof a_hosts, "--addn-hosts=%s", s->hosts);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0), dup2(null, 1), dup2(null, 2);
        /* As root it would drop to "nobody", who may not read the hosts file: it stays. */
        char *argv[] = {DNSMASQ, "--keep-in-foreground", a_port, "--listen-address=127.0.0.1",
                        "--bind-interfaces", "--no-resolv", "--no-hosts", a_hosts,
                        "--local=/test/", "--conf-file=/dev/null", "--pid-file=",
                        "--cache-size=0", geteuid() == 0 ? "--user=root" : NULL, NULL};
        execv(DNSMASQ, argv);
        _exit(127);
    }
    return pid;
}

static void dnsmasq_stop(dns_server *s)
{
    if (s->pid > 0) {
        kill(s->pid, SIGKILL); /* stopped or not */
        while (waitpid(s->pid, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    s->pid = 0;
    if (s->hosts[0])
        unlink(s->hosts);
    if (s->dir[0])
        rmdir(s->dir);
    s->hosts[0] = s->dir[0] = '\0';
    unsetenv("MOOR_DNS_SERVERS");
}

/* Start a server for `hosts` (a hosts file's text) once `probe`, a name in it, is answered,
 * and point MOOR_DNS_SERVERS at it. The caller checks dnsmasq_installed first. */
static void dnsmasq_start(dns_server *s, const char *hosts, const char *probe)
{
    snprintf(s->dir, sizeof s->dir, "/tmp/moor-dns-XXXXXX");
    assert_non_null(mkdtemp(s->dir));
    snprintf(s->hosts, sizeof s->hosts, "%s/hosts", s->dir);
    FILE *f = fopen(s->hosts, "w");
    assert_non_null(f);
    fputs(hosts, f);
    assert_int_equal(fclose(f), 0);
    for (int tries = 0; tries < 5; tries++) {
        int port = dnsmasq_free_port();
        if (!port)
            continue;
        s->pid = dnsmasq_spawn(s, port);
        s->port = port;
        for (int i = 0; i < 200; i++) {
            if (dnsmasq_answers(port, probe, 50)) {
                char env[64];
                snprintf(env, sizeof env, "127.0.0.1:%d", port);
                setenv("MOOR_DNS_SERVERS", env, 1);
                return;
            }
            if (waitpid(s->pid, NULL, WNOHANG) == s->pid)
                break; /* it exited: the port was taken meanwhile */
        }
        kill(s->pid, SIGKILL);
        waitpid(s->pid, NULL, 0);
        s->pid = 0;
    }
    fail_msg("dnsmasq did not start");
}

#endif
