/* Names: moor_resolve on c-ares against a real DNS server, and moor_tcp_dial.
 *
 * Each case that needs a server starts its own dnsmasq on a free loopback port (UDP and TCP),
 * serving a hosts file the case writes, and points moor at it with MOOR_DNS_SERVERS (read
 * when an executor's channel is made, so each case's executor gets its own server). The
 * teardown kills and reaps the server whatever happened: no process is left behind. Without
 * dnsmasq those cases are skipped, saying so.
 *
 * Names live under .test, which the server is told is local (--local=/test/): a name it does
 * not have is answered NXDOMAIN, never forwarded. Timing is asserted as a lower bound, and as
 * an upper bound only where the deadline must be honoured, with SAFETY_MS of slack. */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <ares.h>
#include <cmocka.h>

#include "moor.h"
#include "reactor/dns.h"

#include "fixture.h"

#include "dnsmasq.h"

static dns_server srv;

/* cmocka's skip, saying why. */
#define skip_msg(msg)                                                                         \
    do {                                                                                      \
        print_message("%s\n", msg);                                                           \
        skip();                                                                               \
    } while (0)

static void server_stop(void) { dnsmasq_stop(&srv); }

/* Start a server for `hosts` (a hosts file's text; `probe` is a name in it) and point
 * MOOR_DNS_SERVERS at it. Skips the case without dnsmasq. */
static void server_start(const char *hosts, const char *probe)
{
    if (!dnsmasq_installed())
        skip_msg("skipped: " DNSMASQ " is not installed (apt-get install dnsmasq-base)");
    dnsmasq_start(&srv, hosts, probe);
}

static int dns_setup(void **state) { return fixture_setup(state); }

static int dns_teardown(void **state)
{
    server_stop();
    return fixture_teardown(state);
}

#define DNS_TEST(fn) cmocka_unit_test_prestate_setup_teardown(fn, dns_setup, dns_teardown, (void *)#fn)

/* ---- helpers ----------------------------------------------------------------------------- */

static struct addrinfo hints_of(int family)
{
    struct addrinfo h;
    memset(&h, 0, sizeof h);
    h.ai_family = family;
    h.ai_socktype = SOCK_STREAM;
    return h;
}

/* The first address of `family` in res as text, "" if none. */
static const char *addr_text(const struct addrinfo *res, int family, char *buf, size_t len)
{
    buf[0] = '\0';
    for (; res; res = res->ai_next) {
        if (res->ai_family != family)
            continue;
        const void *a = family == AF_INET
                            ? (const void *)&((const struct sockaddr_in *)res->ai_addr)->sin_addr
                            : (const void *)&((const struct sockaddr_in6 *)res->ai_addr)->sin6_addr;
        inet_ntop(family, a, buf, (socklen_t)len);
        break;
    }
    return buf;
}

static int port_of(const struct addrinfo *ai)
{
    return ai->ai_family == AF_INET ? ntohs(((const struct sockaddr_in *)ai->ai_addr)->sin_port)
                                    : ntohs(((const struct sockaddr_in6 *)ai->ai_addr)->sin6_port);
}

static size_t count_family(const struct addrinfo *res, int family)
{
    size_t n = 0;
    for (; res; res = res->ai_next)
        n += res->ai_family == family;
    return n;
}

static const char hosts_basic[] = "127.0.0.7 web.test\n"
                                  "::7 six.test\n"
                                  "10.1.2.3 both.test\n"
                                  "fd00::3 both.test\n";

/* ---- lookups ----------------------------------------------------------------------------- */

static void test_dns_resolve_a_and_aaaa(void **state)
{
    (void)state;
    server_start(hosts_basic, "web.test");
    moor_executor *ex = ex_new();
    char b[INET6_ADDRSTRLEN];
    struct addrinfo *res = NULL;
    struct addrinfo h4 = hints_of(AF_INET), h6 = hints_of(AF_INET6), hu = hints_of(AF_UNSPEC);

    assert_int_equal(moor_resolve("web.test", "80", &h4, moor_deadline_in(SAFETY_MS), &res), 0);
    assert_string_equal(addr_text(res, AF_INET, b, sizeof b), "127.0.0.7");
    assert_int_equal(port_of(res), 80);
    assert_int_equal(res->ai_socktype, SOCK_STREAM);
    moor_resolve_free(res);

    assert_int_equal(moor_resolve("six.test", NULL, &h6, moor_deadline_in(SAFETY_MS), &res), 0);
    assert_string_equal(addr_text(res, AF_INET6, b, sizeof b), "::7");
    moor_resolve_free(res);

    assert_int_equal(moor_resolve("both.test", "443", &hu, moor_deadline_in(SAFETY_MS), &res), 0);
    assert_string_equal(addr_text(res, AF_INET, b, sizeof b), "10.1.2.3");
    assert_string_equal(addr_text(res, AF_INET6, b, sizeof b), "fd00::3");
    assert_int_equal(count_family(res, AF_INET) + count_family(res, AF_INET6), 2);
    moor_resolve_free(res);

    /* The canonical name, when asked for. */
    h4.ai_flags = AI_CANONNAME;
    assert_int_equal(moor_resolve("web.test", NULL, &h4, moor_deadline_in(SAFETY_MS), &res), 0);
    assert_non_null(res->ai_canonname);
    assert_string_equal(res->ai_canonname, "web.test");
    moor_resolve_free(res);
    ex_free(ex);
}

/* From fibers as from plain code. */
static intptr_t resolve_web(void *arg)
{
    (void)arg;
    struct addrinfo h = hints_of(AF_INET), *res = NULL;
    int rc = moor_resolve("web.test", NULL, &h, moor_deadline_in(SAFETY_MS), &res);
    char b[INET6_ADDRSTRLEN];
    FCHECK(rc == 0 && strcmp(addr_text(res, AF_INET, b, sizeof b), "127.0.0.7") == 0);
    moor_resolve_free(res);
    return rc;
}

static void test_dns_resolve_in_fiber(void **state)
{
    (void)state;
    server_start(hosts_basic, "web.test");
    moor_executor *ex = ex_new();
    moor_fiber *f;
    intptr_t rc = -1;
    assert_int_equal(moor_spawn(&f, resolve_web, NULL, NULL), 0);
    assert_int_equal(moor_join(f, &rc), 0);
    assert_int_equal(rc, 0);
    ex_free(ex);
}

static void test_dns_missing_name(void **state)
{
    (void)state;
    server_start(hosts_basic, "web.test");
    moor_executor *ex = ex_new();
    struct addrinfo *res = (struct addrinfo *)&res;
    struct addrinfo hu = hints_of(AF_UNSPEC), h6 = hints_of(AF_INET6);
    assert_int_equal(moor_resolve("nowhere.test", NULL, &hu, moor_deadline_in(SAFETY_MS), &res),
                     MOOR_EAI_NONAME);
    assert_null(res);
    assert_string_equal(moor_strerror(MOOR_EAI_NONAME), "No such host");
    /* The name is there, but has no IPv6 address. */
    int rc = moor_resolve("web.test", NULL, &h6, moor_deadline_in(SAFETY_MS), &res);
    assert_int_equal(rc, MOOR_EAI_NODATA);
    assert_null(res);
    ex_free(ex);
}

/* The server is stopped (SIGSTOP: it holds its port and never answers): the lookup gives up
 * at its deadline, not before, and not long after. */
static void test_dns_timeout_at_deadline(void **state)
{
    (void)state;
    server_start(hosts_basic, "web.test");
    moor_executor *ex = ex_new();
    assert_int_equal(kill(srv.pid, SIGSTOP), 0);
    struct addrinfo h = hints_of(AF_INET), *res = NULL;
    int64_t t0 = moor_now();
    int64_t deadline = t0 + 300;
    assert_int_equal(moor_resolve("web.test", NULL, &h, deadline, &res), -ETIMEDOUT);
    int64_t t1 = moor_now();
    assert_null(res);
    assert_true(t1 >= deadline);
    assert_true(t1 < deadline + SAFETY_MS);
    /* The executor goes with the lookup c-ares still has in flight. */
    ex_free(ex);
}

/* The server is gone (killed): nothing listens on its port, and the lookup says so. */
static void test_dns_server_gone(void **state)
{
    (void)state;
    server_start(hosts_basic, "web.test");
    kill(srv.pid, SIGKILL);
    waitpid(srv.pid, NULL, 0);
    srv.pid = 0;
    moor_executor *ex = ex_new();
    struct addrinfo h = hints_of(AF_INET), *res = NULL;
    int rc = moor_resolve("web.test", NULL, &h, moor_deadline_in(SAFETY_MS), &res);
    assert_true(rc == -ECONNREFUSED || rc == -ETIMEDOUT);
    assert_null(res);
    ex_free(ex);
}

/* A fiber cancelled in the middle of its lookup returns -ECANCELED at once; the answer that
 * comes later (the server resumed) lands in the query on the heap, never on the fiber's
 * stack, which is reused by then. ASan and valgrind watch. */
static intptr_t resolve_forever(void *arg)
{
    (void)arg;
    char scribble[512]; /* stack the late answer must not reach */
    memset(scribble, 0x5a, sizeof scribble);
    struct addrinfo h = hints_of(AF_INET), *res = NULL;
    int rc = moor_resolve("web.test", NULL, &h, -1, &res);
    FCHECK(res == NULL);
    return rc + (scribble[7] != 0x5a);
}

static intptr_t use_stack(void *arg)
{
    char big[8192];
    memset(big, 0xa5, sizeof big);
    return big[(intptr_t)arg];
}

static void test_dns_cancel_mid_query(void **state)
{
    (void)state;
    server_start(hosts_basic, "web.test");
    moor_executor *ex = ex_new();
    assert_int_equal(kill(srv.pid, SIGSTOP), 0);
    moor_fiber *f[8];
    for (int i = 0; i < 8; i++)
        assert_int_equal(moor_spawn(&f[i], resolve_forever, NULL, NULL), 0);
    settle();
    for (int i = 0; i < 8; i++)
        moor_cancel(f[i]);
    for (int i = 0; i < 8; i++) {
        intptr_t rc = 0;
        assert_int_equal(moor_join(f[i], &rc), -ECANCELED);
        assert_int_equal(rc, -ECANCELED);
    }
    /* Their stacks go to new fibers; the server answers the old queries now. */
    for (int i = 0; i < 8; i++)
        assert_int_equal(moor_spawn(&f[i], use_stack, (void *)(intptr_t)i, NULL), 0);
    assert_int_equal(kill(srv.pid, SIGCONT), 0);
    /* A fresh lookup on the same channel: by the time it is answered, so are the old ones. */
    struct addrinfo h = hints_of(AF_INET), *res = NULL;
    assert_int_equal(moor_resolve("web.test", NULL, &h, moor_deadline_in(SAFETY_MS), &res), 0);
    moor_resolve_free(res);
    for (int i = 0; i < 8; i++)
        assert_int_equal(moor_join(f[i], NULL), 0);
    ex_free(ex);
}

/* The deadline gives up the same way, and the late answer is dropped the same way. */
static void test_dns_deadline_then_late_answer(void **state)
{
    (void)state;
    server_start(hosts_basic, "web.test");
    moor_executor *ex = ex_new();
    assert_int_equal(kill(srv.pid, SIGSTOP), 0);
    struct addrinfo h = hints_of(AF_INET), *res = NULL;
    assert_int_equal(moor_resolve("web.test", NULL, &h, moor_deadline_in(WAIT_MS), &res),
                     -ETIMEDOUT);
    assert_int_equal(kill(srv.pid, SIGCONT), 0);
    assert_int_equal(moor_resolve("both.test", NULL, &h, moor_deadline_in(SAFETY_MS), &res), 0);
    moor_resolve_free(res);
    ex_free(ex);
}

/* 1,000 fibers resolve 1,000 names at once on the one channel; each gets its own address. */
#define MANY 1000

static intptr_t resolve_nth(void *arg)
{
    int i = (int)(intptr_t)arg;
    char name[32], want[32], b[INET6_ADDRSTRLEN];
    snprintf(name, sizeof name, "h%d.test", i);
    snprintf(want, sizeof want, "10.9.%d.%d", i / 256, i % 256);
    struct addrinfo h = hints_of(AF_INET), *res = NULL;
    int rc = moor_resolve(name, NULL, &h, moor_deadline_in(SAFETY_MS), &res);
    FCHECK(rc == 0);
    FCHECK(rc != 0 || strcmp(addr_text(res, AF_INET, b, sizeof b), want) == 0);
    moor_resolve_free(res);
    return rc == 0;
}

static void test_dns_many_concurrent(void **state)
{
    (void)state;
    static char hosts[MANY * 32];
    size_t n = 0;
    for (int i = 0; i < MANY; i++)
        n += (size_t)snprintf(hosts + n, sizeof hosts - n, "10.9.%d.%d h%d.test\n", i / 256,
                              i % 256, i);
    server_start(hosts, "h0.test");
    moor_executor *ex = ex_new();
    static moor_fiber *f[MANY];
    for (int i = 0; i < MANY; i++)
        assert_int_equal(moor_spawn(&f[i], resolve_nth, (void *)(intptr_t)i, NULL), 0);
    intptr_t ok = 0;
    for (int i = 0; i < MANY; i++) {
        intptr_t r = 0;
        assert_int_equal(moor_join(f[i], &r), 0);
        ok += r;
    }
    assert_int_equal(ok, MANY);
    ex_free(ex);
}

/* ---- fork ---------------------------------------------------------------------------------- */

/* After fork() the child's executor drops the channel it shares with the parent (its sockets
 * are the parent's too) and makes its own at the next lookup; the parent's goes on. */
static void test_dns_after_fork(void **state)
{
    (void)state;
    server_start(hosts_basic, "web.test");
    moor_executor *ex = ex_new();
    char b[INET6_ADDRSTRLEN];
    struct addrinfo h4 = hints_of(AF_INET), *res = NULL;
    assert_int_equal(moor_resolve("web.test", NULL, &h4, moor_deadline_in(SAFETY_MS), &res), 0);
    moor_resolve_free(res); /* the channel exists now */
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        CCHECK(moor_executor_after_fork(ex) == 0);
        struct addrinfo *r = NULL;
        CCHECK(moor_resolve("six.test", NULL, NULL, moor_deadline_in(SAFETY_MS), &r) == 0);
        CCHECK(strcmp(addr_text(r, AF_INET6, b, sizeof b), "::7") == 0);
        moor_resolve_free(r);
        _exit(0);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_int_equal(moor_resolve("both.test", NULL, &h4, moor_deadline_in(SAFETY_MS), &res), 0);
    assert_string_equal(addr_text(res, AF_INET, b, sizeof b), "10.1.2.3");
    moor_resolve_free(res);
    ex_free(ex);
}

/* ---- without a server ------------------------------------------------------------------- */

/* Point the channel at a port where nothing listens: whatever resolves, resolved without it. */
static void no_server(void)
{
    setenv("MOOR_DNS_SERVERS", "127.0.0.1:1", 1);
}

/* Whether the system's hosts file names localhost: a bare root (debootstrap --variant=minbase)
 * has no /etc/hosts at all, and then localhost is not a name the files know. */
static int hosts_file_has_localhost(void)
{
    FILE *f = fopen("/etc/hosts", "r");
    if (!f)
        return 0;
    char line[512];
    int found = 0;
    while (!found && fgets(line, sizeof line, f))
        found = line[0] != '#' && strstr(line, "127.0.0.1") && strstr(line, "localhost");
    fclose(f);
    return found;
}

static void test_dns_etc_hosts_localhost(void **state)
{
    (void)state;
    if (!hosts_file_has_localhost()) {
        print_message("skipped: /etc/hosts does not name localhost on this system\n");
        skip();
    }
    no_server();
    moor_executor *ex = ex_new();
    char b[INET6_ADDRSTRLEN];
    struct addrinfo h = hints_of(AF_INET), *res = NULL;
    assert_int_equal(moor_resolve("localhost", "22", &h, moor_deadline_in(SAFETY_MS), &res), 0);
    assert_string_equal(addr_text(res, AF_INET, b, sizeof b), "127.0.0.1");
    assert_int_equal(port_of(res), 22);
    moor_resolve_free(res);
    ex_free(ex);
}

static void test_dns_numeric_host(void **state)
{
    (void)state;
    no_server();
    moor_executor *ex = ex_new();
    char b[INET6_ADDRSTRLEN];
    struct addrinfo *res = NULL;
    assert_int_equal(moor_resolve("192.0.2.1", "8080", NULL, 0, &res), 0);
    assert_string_equal(addr_text(res, AF_INET, b, sizeof b), "192.0.2.1");
    assert_int_equal(port_of(res), 8080);
    assert_null(res->ai_next);
    moor_resolve_free(res);
    assert_int_equal(moor_resolve("2001:db8::1", NULL, NULL, 0, &res), 0);
    assert_string_equal(addr_text(res, AF_INET6, b, sizeof b), "2001:db8::1");
    moor_resolve_free(res);
    /* A service name goes through c-ares, still without a query; it needs the services
     * database (/etc/services: Debian's netbase, which .ci/deps installs). */
    if (getservbyname("http", "tcp")) {
        assert_int_equal(moor_resolve("192.0.2.1", "http", NULL, moor_deadline_in(SAFETY_MS), &res),
                         0);
        assert_int_equal(port_of(res), 80);
        moor_resolve_free(res);
    } else {
        print_message("no services database (/etc/services): the service-name check is left out\n");
    }
    /* Not numeric, when only numeric will do. */
    struct addrinfo h = hints_of(AF_UNSPEC);
    h.ai_flags = AI_NUMERICHOST;
    assert_int_equal(moor_resolve("web.test", NULL, &h, moor_deadline_in(SAFETY_MS), &res),
                     MOOR_EAI_NONAME);
    ex_free(ex);
}

static void test_dns_bad_arguments(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    struct addrinfo *res = NULL, h = hints_of(AF_UNIX);
    assert_int_equal(moor_resolve(NULL, "80", NULL, -1, &res), -EINVAL);
    assert_int_equal(moor_resolve("localhost", NULL, &h, -1, &res), -EINVAL);
    h = hints_of(AF_INET);
    h.ai_flags = 0x40000000;
    assert_int_equal(moor_resolve("localhost", NULL, &h, -1, &res), -EINVAL);
    assert_int_equal(moor_tcp_dial(NULL, 80, -1), -EINVAL);
    assert_int_equal(moor_tcp_dial("localhost", 70000, -1), -EINVAL);
    ex_free(ex);

    /* A server list c-ares cannot read: the channel is not made. */
    setenv("MOOR_DNS_SERVERS", "not a server list", 1);
    ex = ex_new();
    assert_int_equal(moor_resolve("example.test", NULL, NULL, -1, &res), -EINVAL);
    ex_free(ex);
    unsetenv("MOOR_DNS_SERVERS");
}

/* Every c-ares status has a code, and every code a name. */
static void test_dns_error_codes(void **state)
{
    (void)state;
    assert_int_equal(moor__dns_error(ARES_SUCCESS), 0);
    assert_int_equal(moor__dns_error(ARES_ENOTFOUND), MOOR_EAI_NONAME);
    assert_int_equal(moor__dns_error(ARES_ENODATA), MOOR_EAI_NODATA);
    assert_int_equal(moor__dns_error(ARES_ESERVFAIL), MOOR_EAI_SERVFAIL);
    assert_int_equal(moor__dns_error(ARES_EREFUSED), MOOR_EAI_REFUSED);
    assert_int_equal(moor__dns_error(ARES_EBADNAME), MOOR_EAI_BADNAME);
    assert_int_equal(moor__dns_error(ARES_ESERVICE), MOOR_EAI_SERVICE);
    assert_int_equal(moor__dns_error(ARES_ETIMEOUT), -ETIMEDOUT);
    assert_int_equal(moor__dns_error(ARES_ECONNREFUSED), -ECONNREFUSED);
    assert_int_equal(moor__dns_error(ARES_ENOMEM), -ENOMEM);
    assert_int_equal(moor__dns_error(ARES_EDESTRUCTION), -ECANCELED);
    for (int s = 1; s <= ARES_ESERVICE; s++) {
        int code = moor__dns_error(s);
        assert_true(code < 0);
        assert_string_not_equal(moor_strerror(code), "Unknown error");
    }
    assert_true(MOOR_EAI_NONAME < -4095);
}

/* ---- dialling by name ------------------------------------------------------------------- */

static intptr_t accept_one(void *arg)
{
    int lfd = (int)(intptr_t)arg;
    int c = moor_accept(lfd, NULL, NULL, moor_deadline_in(SAFETY_MS));
    FCHECK(c >= 0);
    if (c < 0)
        return c;
    char x = 'k';
    FCHECK(moor_write(c, &x, 1, moor_deadline_in(SAFETY_MS)) == 1);
    moor_close(c);
    return 0;
}

static void dial_and_check(const char *host, int port, int lfd)
{
    moor_fiber *acc;
    assert_int_equal(moor_spawn(&acc, accept_one, (void *)(intptr_t)lfd, NULL), 0);
    int fd = moor_tcp_dial(host, port, moor_deadline_in(SAFETY_MS));
    assert_true(fd >= 0);
    char x = 0;
    assert_int_equal(moor_read(fd, &x, 1, moor_deadline_in(SAFETY_MS)), 1);
    assert_int_equal(x, 'k');
    assert_int_equal(moor_close(fd), 0);
    assert_int_equal(moor_join(acc, NULL), 0);
}

static void test_dns_dial_by_name(void **state)
{
    (void)state;
    server_start("127.0.0.1 svc.test\n", "svc.test");
    moor_executor *ex = ex_new();
    int lfd = moor_tcp_listen("127.0.0.1", 0, 16);
    assert_true(lfd >= 0);
    int port = moor_socket_port(lfd);
    dial_and_check("svc.test", port, lfd);
    /* Numeric: no lookup. */
    dial_and_check("127.0.0.1", port, lfd);
    /* A name that does not exist. */
    assert_int_equal(moor_tcp_dial("gone.test", port, moor_deadline_in(SAFETY_MS)),
                     MOOR_EAI_NONAME);
    moor_close(lfd);
    ex_free(ex);
}

/* A name with two addresses, of which only one has a listener: the other attempt is refused
 * (or, without IPv6, cannot even be made), and the dial wins on the one that listens,
 * whichever order the addresses come in. */
static void test_dns_dial_second_address(void **state)
{
    (void)state;
    server_start("::1 two.test\n127.0.0.1 two.test\n127.0.0.1 probe.test\n", "probe.test");
    moor_executor *ex = ex_new();
    int lfd = moor_tcp_listen("127.0.0.1", 0, 16);
    assert_true(lfd >= 0);
    int port = moor_socket_port(lfd);
    struct addrinfo h = hints_of(AF_UNSPEC), *res = NULL;
    assert_int_equal(moor_resolve("two.test", NULL, &h, moor_deadline_in(SAFETY_MS), &res), 0);
    assert_int_equal(count_family(res, AF_INET6), 1);
    assert_int_equal(count_family(res, AF_INET), 1);
    moor_resolve_free(res);
    dial_and_check("two.test", port, lfd);
    moor_close(lfd);
    /* No address listens: the last attempt's error. */
    int rc = moor_tcp_dial("two.test", port, moor_deadline_in(SAFETY_MS));
    assert_true(rc == -ECONNREFUSED || rc == -EAFNOSUPPORT || rc == -EADDRNOTAVAIL ||
                rc == -ENETUNREACH);
    ex_free(ex);
}

static int open_fds(void)
{
    int n = 0;
    for (int fd = 0; fd < 1024; fd++)
        n += fcntl(fd, F_GETFD) >= 0;
    return n;
}

/* The first address hangs (a listener whose backlog is full: its SYNs go unanswered), the
 * second listens: the second attempt starts 250 ms after the first, wins, and the first is
 * closed. The addresses come IPv6 first here (c-ares sorts ::1 before 127.0.0.1, RFC 6724);
 * if they do not, only the win is checked. */
static void test_dns_dial_after_attempt_delay(void **state)
{
    (void)state;
    server_start("::1 slow.test\n127.0.0.1 slow.test\n127.0.0.1 probe.test\n", "probe.test");
    moor_executor *ex = ex_new();
    int hang = moor_tcp_listen("::1", 0, 0);
    if (hang < 0) {
        ex_free(ex);
        skip_msg("skipped: no IPv6 loopback here");
    }
    int port = moor_socket_port(hang);
    int lfd = moor_tcp_listen("127.0.0.1", port, 16);
    if (lfd < 0) {
        moor_close(hang);
        ex_free(ex);
        skip_msg("skipped: the port taken on ::1 is in use on 127.0.0.1");
    }
    /* One connection fills the backlog of 0; the next ones hang. */
    int fill = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_in6 in6 = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port),
                               .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    connect(fill, (struct sockaddr *)&in6, sizeof in6);
    sleep_ms(20);

    struct addrinfo h = hints_of(AF_UNSPEC), *res = NULL;
    assert_int_equal(moor_resolve("slow.test", NULL, &h, moor_deadline_in(SAFETY_MS), &res), 0);
    int v6_first = res->ai_family == AF_INET6;
    moor_resolve_free(res);

    int before = open_fds();
    int64_t t0 = moor_now();
    int fd = moor_tcp_dial("slow.test", port, moor_deadline_in(SAFETY_MS));
    int64_t t1 = moor_now();
    assert_true(fd >= 0);
    struct sockaddr_storage peer;
    socklen_t len = sizeof peer;
    assert_int_equal(getpeername(fd, (struct sockaddr *)&peer, &len), 0);
    assert_int_equal(peer.ss_family, AF_INET);
    if (v6_first)
        assert_true(t1 - t0 >= 250);
    else
        print_message("addresses came IPv4 first: the attempt delay was not exercised\n");
    /* The winner is the one new descriptor: the hanging attempt was closed. */
    assert_int_equal(open_fds(), before + 1);
    moor_close(fd);
    close(fill);
    moor_close(lfd);
    moor_close(hang);
    ex_free(ex);
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        DNS_TEST(test_dns_resolve_a_and_aaaa),
        DNS_TEST(test_dns_resolve_in_fiber),
        DNS_TEST(test_dns_missing_name),
        DNS_TEST(test_dns_timeout_at_deadline),
        DNS_TEST(test_dns_server_gone),
        DNS_TEST(test_dns_cancel_mid_query),
        DNS_TEST(test_dns_deadline_then_late_answer),
        DNS_TEST(test_dns_many_concurrent),
        DNS_TEST(test_dns_after_fork),
        DNS_TEST(test_dns_etc_hosts_localhost),
        DNS_TEST(test_dns_numeric_host),
        DNS_TEST(test_dns_bad_arguments),
        DNS_TEST(test_dns_error_codes),
        DNS_TEST(test_dns_dial_by_name),
        DNS_TEST(test_dns_dial_second_address),
        DNS_TEST(test_dns_dial_after_attempt_delay),
    };
    return RUN_TESTS(tests);
}
