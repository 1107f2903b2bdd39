/* A throwaway redis-server for moor_redis' test and bench: started on a free loopback port,
 * with persistence off, as a child process; stopped with a signal and reaped. Plain blocking
 * code, run before and after the executor's work. Header-only: each program that includes it
 * gets its own copy of these static functions. */
#ifndef MOOR_REDIS_SERVER_H
#define MOOR_REDIS_SERVER_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef struct redis_server {
    pid_t pid;  /* 0 when not running */
    int port;
} redis_server;

/* The redis-server binary: $MOOR_REDIS_SERVER, else the first on PATH, else NULL. */
__attribute__((unused)) static const char *redis_server_path(void)
{
    static char found[4096];
    const char *env = getenv("MOOR_REDIS_SERVER");
    if (env && *env)
        return access(env, X_OK) == 0 ? env : NULL;
    const char *path = getenv("PATH");
    if (!path || !*path)
        path = "/usr/local/bin:/usr/bin:/bin";
    while (*path) {
        size_t n = strcspn(path, ":");
        if (n > 0 && n + sizeof "/redis-server" < sizeof found) {
            memcpy(found, path, n);
            memcpy(found + n, "/redis-server", sizeof "/redis-server");
            if (access(found, X_OK) == 0)
                return found;
        }
        path += n + (path[n] == ':');
    }
    return NULL;
}

/* A loopback port the kernel says is free now (it may be taken again before the server
 * binds it: the start retries with another). */
static int redis_server_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int port = -EADDRNOTAVAIL;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* 1 if something on 127.0.0.1:port answers PING with +PONG. Blocking, with a short
 * receive timeout. */
static int redis_server_answers(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    struct timeval tv = {0, 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    char buf[16] = {0};
    int ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
             write(fd, "PING\r\n", 6) == 6 && read(fd, buf, sizeof buf - 1) >= 5 &&
             memcmp(buf, "+PONG", 5) == 0;
    close(fd);
    return ok;
}

static void redis_server_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0)
        ;
}

/* Stop the server (SIGKILL: it saves nothing anyway) and reap it. Idempotent. */
__attribute__((unused)) static void redis_server_stop(redis_server *s)
{
    if (s->pid <= 0)
        return;
    kill(s->pid, SIGKILL);
    while (waitpid(s->pid, NULL, 0) < 0 && errno == EINTR)
        ;
    s->pid = 0;
}

/* Start a redis-server on 127.0.0.1:port and wait (up to some 10 s) until it answers:
 * 0, -ENOENT (no redis-server binary), -EADDRINUSE (it died: the port is taken, say), or
 * -ETIMEDOUT / -errno. (A test that kills the server starts it again where it was.) */
__attribute__((unused)) static int redis_server_start_on(redis_server *s, int port)
{
    const char *bin = redis_server_path();
    s->pid = 0;
    if (!bin)
        return -ENOENT;
    char port_s[16];
    snprintf(port_s, sizeof port_s, "%d", port);
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, STDIN_FILENO);
            dup2(null, STDOUT_FILENO);
        }
        execl(bin, bin, "--port", port_s, "--bind", "127.0.0.1", "--save", "",
              "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning",
              (char *)NULL);
        _exit(127);
    }
    s->pid = pid;
    s->port = port;
    for (int waited = 0; waited < 10000; waited += 10) {
        if (redis_server_answers(port))
            return 0;
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) { /* died: port taken, say */
            s->pid = 0;
            return -EADDRINUSE;
        }
        redis_server_sleep_ms(10);
    }
    redis_server_stop(s);
    return -ETIMEDOUT;
}

/* Start a redis-server on a free loopback port and wait (up to some 10 s) until it answers.
 * Returns 0, -ENOENT (no redis-server binary), or -ETIMEDOUT / -errno. */
__attribute__((unused)) static int redis_server_start(redis_server *s)
{
    int rc = -ETIMEDOUT;
    for (int attempt = 0; attempt < 5; attempt++) {
        int port = redis_server_free_port();
        if (port < 0)
            return port;
        if ((rc = redis_server_start_on(s, port)) != -EADDRINUSE)
            return rc;
    }
    return rc;
}

#endif /* MOOR_REDIS_SERVER_H */
