/* moor_resolve: DNS lookups on c-ares, driven by the executor's libev loop.
 *
 * One c-ares channel per executor, made at the first lookup and hung on the reactor with a
 * hook (reactor.h), so that loop.c frees it and re-arms it after a fork without naming this
 * file. c-ares owns its sockets and says through its socket-state callback which of them it
 * wants to read or write: each becomes an ev_io on the reactor's loop, whose callback hands
 * the readiness back (ares_process_fd). c-ares' timeouts (retries, giving up on a server) are
 * the channel's, not any one lookup's, so they are one ev_timer on the same loop, re-armed
 * from ares_timeout after every call into c-ares: the executor's timer heap wakes tasks and
 * there is no task to wake here, only c-ares to call.
 *
 * A lookup's state lives on the heap (dns_query), held by two owners, the c-ares callback
 * and the waiting fiber, and freed by the last to let go:
 *
 *   moor_resolve ──ares_getaddrinfo──> c-ares ... on_addrinfo: result in, wake, release
 *        │                                            │
 *        └── resolve future (on the fiber's stack) ───┴─> dns_query (heap, 2 refs)
 *
 * A fiber that gives up (deadline, cancel) clears the query's waker and lets go; the answer
 * that comes later finds only the query, frees what it carries and the query with it. The
 * fiber's stack is never touched after its call returned. The channel goes (ares_destroy, in
 * the reactor's free hook) with the executor: c-ares then ends every lookup still pending,
 * which frees the queries left behind. */
#include <arpa/inet.h>
#include <ares.h>
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "dns.h"
#include "fiber/alloc.h"
#include "fiber/assert.h"
#include "fiber/executor.h"
#include "fiber/list.h"
#include "fiber/wait.h"
#include "reactor.h"

/* ---- errors ------------------------------------------------------------------------------ */

int moor__dns_error(int status)
{
    switch (status) {
    case ARES_SUCCESS:
        return 0;
    case ARES_ENOTFOUND:
    case ARES_ENONAME: /* AI_NUMERICHOST and the host is not numeric */
        return MOOR_EAI_NONAME;
    case ARES_ENODATA:
        return MOOR_EAI_NODATA;
    case ARES_ESERVFAIL:
    case ARES_EFORMERR: /* the server could not read our query */
    case ARES_ENOTIMP:
    case ARES_EBADRESP: /* we could not read its answer */
        return MOOR_EAI_SERVFAIL;
    case ARES_EREFUSED:
        return MOOR_EAI_REFUSED;
    case ARES_EBADNAME:
    case ARES_EBADQUERY:
    case ARES_EBADSTR:
        return MOOR_EAI_BADNAME;
    case ARES_ESERVICE:
        return MOOR_EAI_SERVICE;
    case ARES_EBADFAMILY:
    case ARES_EBADFLAGS:
    case ARES_EBADHINTS:
        return -EINVAL;
    case ARES_ECONNREFUSED:
        return -ECONNREFUSED;
    case ARES_ETIMEOUT:
        return -ETIMEDOUT;
    case ARES_ENOMEM:
        return -ENOMEM;
    case ARES_EDESTRUCTION:
    case ARES_ECANCELLED:
        return -ECANCELED;
    default: /* ARES_EOF, ARES_EFILE (configuration files), ARES_ENOTINITIALIZED, ... */
        return -EIO;
    }
}

/* ---- results: c-ares' list as a libc-style addrinfo list -------------------------------- */

/* One entry of a result: the addrinfo, its address and its canonical name in one block. */
typedef struct dns_entry {
    struct addrinfo ai;
    struct sockaddr_storage addr;
    char canon[]; /* NUL-terminated, on the first entry when AI_CANONNAME asked for it */
} dns_entry;

static struct addrinfo *entry_new(int family, int socktype, int protocol,
                                  const struct sockaddr *addr, socklen_t len, const char *canon)
{
    if (len > sizeof(struct sockaddr_storage))
        return NULL;
    size_t clen = canon ? strlen(canon) + 1 : 0;
    dns_entry *e = moor__alloc(sizeof *e + clen);
    if (!e)
        return NULL;
    memset(&e->ai, 0, sizeof e->ai);
    memcpy(&e->addr, addr, len);
    e->ai.ai_family = family;
    e->ai.ai_socktype = socktype;
    e->ai.ai_protocol = protocol;
    e->ai.ai_addrlen = len;
    e->ai.ai_addr = (struct sockaddr *)&e->addr;
    if (canon) {
        memcpy(e->canon, canon, clen);
        e->ai.ai_canonname = e->canon;
    }
    return &e->ai;
}

void moor_resolve_free(struct addrinfo *res)
{
    while (res) {
        struct addrinfo *next = res->ai_next;
        moor__free(moor_container_of(res, dns_entry, ai));
        res = next;
    }
}

/* c-ares' answer as entries of ours; socktype and protocol from the hints where c-ares left
 * them 0. 0 or -ENOMEM (nothing kept). */
static int convert(const struct ares_addrinfo *in, const struct addrinfo *hints,
                   struct addrinfo **out)
{
    struct addrinfo *head = NULL, **tail = &head;
    const char *canon = NULL;
    if (hints->ai_flags & AI_CANONNAME)
        canon = in->cnames && in->cnames->name ? in->cnames->name : in->name;
    for (const struct ares_addrinfo_node *n = in->nodes; n; n = n->ai_next) {
        struct addrinfo *e = entry_new(n->ai_family,
                                       n->ai_socktype ? n->ai_socktype : hints->ai_socktype,
                                       n->ai_protocol ? n->ai_protocol : hints->ai_protocol,
                                       n->ai_addr, (socklen_t)n->ai_addrlen,
                                       head ? NULL : canon);
        if (!e) {
            moor_resolve_free(head);
            return -ENOMEM;
        }
        *tail = e;
        tail = &e->ai_next;
    }
    *out = head;
    return head ? 0 : MOOR_EAI_NODATA;
}

/* A numeric host with a numeric service (or none) needs no channel: 1 with *rc set if it was
 * one (or if only a numeric one would do), 0 to ask c-ares. Other families than the one
 * asked are left to c-ares' rules (AI_V4MAPPED). */
static int resolve_numeric(const char *host, const char *service, const struct addrinfo *hints,
                           struct addrinfo **out, int *rc)
{
    unsigned char any[sizeof(struct in6_addr)];
    if (inet_pton(AF_INET, host, any) != 1 && inet_pton(AF_INET6, host, any) != 1) {
        if (!(hints->ai_flags & AI_NUMERICHOST))
            return 0;
        *rc = MOOR_EAI_NONAME; /* c-ares 1.18 would look it up */
        return 1;
    }
    unsigned long port = 0;
    if (service) {
        char *end;
        if (!*service || *service < '0' || *service > '9')
            return 0;
        port = strtoul(service, &end, 10);
        if (*end || port > 65535)
            return 0;
    }
    struct sockaddr_in in4;
    struct sockaddr_in6 in6;
    memset(&in4, 0, sizeof in4);
    memset(&in6, 0, sizeof in6);
    const struct sockaddr *sa;
    socklen_t len;
    if (inet_pton(AF_INET, host, &in4.sin_addr) == 1) {
        if (hints->ai_family != AF_UNSPEC && hints->ai_family != AF_INET)
            return 0;
        in4.sin_family = AF_INET;
        in4.sin_port = htons((uint16_t)port);
        sa = (const struct sockaddr *)&in4;
        len = sizeof in4;
    } else if (inet_pton(AF_INET6, host, &in6.sin6_addr) == 1) {
        if (hints->ai_family != AF_UNSPEC && hints->ai_family != AF_INET6)
            return 0;
        in6.sin6_family = AF_INET6;
        in6.sin6_port = htons((uint16_t)port);
        sa = (const struct sockaddr *)&in6;
        len = sizeof in6;
    } else {
        return 0;
    }
    *out = entry_new(sa->sa_family, hints->ai_socktype, hints->ai_protocol, sa, len,
                     hints->ai_flags & AI_CANONNAME ? host : NULL);
    *rc = *out ? 0 : -ENOMEM;
    return 1;
}

/* ---- the channel and its watchers -------------------------------------------------------- */

/* A socket c-ares wants watched. */
typedef struct dns_socket {
    ev_io watcher; /* data: the resolver */
    moor__node link;
} dns_socket;

/* An executor's resolver: the hook's self. */
typedef struct dns_resolver {
    moor__reactor *r;
    ares_channel channel; /* NULL until the first lookup, and after a fork */
    ev_timer timer;       /* c-ares' next timeout; active only while c-ares has one */
    moor__list sockets;   /* dns_socket.link: one per socket c-ares has open and watched */
    moor_sem inflight;    /* permits for lookups in c-ares: MAX_INFLIGHT at most */
    int starved;          /* a socket went unwatched for want of memory: see sock_state */
} dns_resolver;

/* Every watcher of the resolver is unreferenced (as loop.c's own are): an attached
 * application's ev_run must not keep running for an idle c-ares socket. A lookup in flight
 * keeps it running anyway, through its waiting task. */
static void watch_start(struct ev_loop *loop, ev_io *w)
{
    ev_io_start(loop, w);
    ev_unref(loop);
}

static void watch_stop(struct ev_loop *loop, ev_io *w)
{
    if (!ev_is_active(w))
        return;
    ev_ref(loop);
    ev_io_stop(loop, w);
}

static void timer_stop(dns_resolver *d)
{
    if (!ev_is_active(&d->timer))
        return;
    ev_ref(d->r->loop);
    ev_timer_stop(d->r->loop, &d->timer);
}

/* After every call into c-ares: its next timeout, if it has one, on the loop. */
static void timer_rearm(dns_resolver *d)
{
    struct timeval tv;
    timer_stop(d);
    if (d->starved) /* at once: on_timeout drops the channel */
        tv = (struct timeval){0, 0};
    else if (!d->channel || !ares_timeout(d->channel, NULL, &tv))
        return;
    struct ev_loop *loop = d->r->loop;
    ev_now_update(loop);
    ev_timer_set(&d->timer, (ev_tstamp)tv.tv_sec + (ev_tstamp)tv.tv_usec / 1e6, 0.);
    ev_timer_start(loop, &d->timer);
    ev_unref(loop);
}

static void on_socket(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    dns_resolver *d = w->data;
    ares_socket_t fd = w->fd;
    /* The callback may close the socket and free w (sock_state): w is not touched after. */
    ares_process_fd(d->channel, revents & EV_READ ? fd : ARES_SOCKET_BAD,
                    revents & EV_WRITE ? fd : ARES_SOCKET_BAD);
    timer_rearm(d);
}

static void channel_destroy(dns_resolver *d);

static void on_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)revents;
    dns_resolver *d = w->data;
    ev_ref(loop); /* it stopped itself: give back what timer_rearm took */
    if (d->starved) {
        channel_destroy(d); /* its lookups fail with -ENOMEM (on_addrinfo) */
        return;
    }
    ares_process_fd(d->channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD);
    timer_rearm(d);
}

static dns_socket *socket_find(dns_resolver *d, ares_socket_t fd)
{
    for (moor__node *n = d->sockets.head; n; n = n->next) {
        dns_socket *s = moor_container_of(n, dns_socket, link);
        if (s->watcher.fd == fd)
            return s;
    }
    return NULL;
}

static void socket_drop(dns_resolver *d, dns_socket *s)
{
    watch_stop(d->r->loop, &s->watcher);
    moor__list_remove(&d->sockets, &s->link);
    moor__free(s);
}

/* c-ares' socket-state callback: watch fd for what it wants, or stop (it is about to close
 * it). Without memory for a watcher the socket would go unwatched, and every lookup on it,
 * now or later, wait for c-ares' timeout: instead the channel is starved, and dropped at the
 * next turn of the loop (on_timeout, from timer_rearm: not inside c-ares), its lookups
 * failing with -ENOMEM; the next lookup makes a new one. */
static void sock_state(void *data, ares_socket_t fd, int readable, int writable)
{
    dns_resolver *d = data;
    dns_socket *s = socket_find(d, fd);
    if (!readable && !writable) {
        if (s)
            socket_drop(d, s);
        return;
    }
    int events = (readable ? EV_READ : 0) | (writable ? EV_WRITE : 0);
    if (!s) {
        s = moor__alloc(sizeof *s);
        if (!s) {
            d->starved = 1;
            return;
        }
        ev_io_init(&s->watcher, on_socket, fd, events);
        s->watcher.data = d;
        moor__list_push(&d->sockets, &s->link);
    } else {
        watch_stop(d->r->loop, &s->watcher);
        ev_io_set(&s->watcher, fd, events);
    }
    watch_start(d->r->loop, &s->watcher);
}

/* Lookups in c-ares at once, per executor; more wait their turn (with their deadline). A
 * burst of queries all sent at once overflows the server's receive buffer as surely as ours:
 * a thousand at once against dnsmasq lose a few, and each loss costs its lookup c-ares'
 * whole retry timeout (5 s). */
#define MAX_INFLIGHT 128

/* The receive buffer asked for the channel's sockets (bytes). */
#define RECEIVE_BUFFER (1 << 20)

static pthread_once_t library_once = PTHREAD_ONCE_INIT;
static int library_status;

/* c-ares allocates through moor's allocator (moor_set_allocator). c-ares may ask for 0 bytes,
 * which moor__realloc would take for a free: it gets 1.
 *
 * c-ares does not always report its allocation failures: when one of the two queries of an
 * AF_UNSPEC lookup fails for memory, the lookup ends with the other's status ("no address of
 * that family", say), a false answer. So the failures on this thread (the only one that
 * calls into the executor's channel) are counted, and a lookup that failed while the count
 * moved reports -ENOMEM (see on_addrinfo). */
static __thread unsigned long ares_alloc_failures;

static void *ares_alloc(size_t size)
{
    void *p = moor__alloc(size ? size : 1);
    if (!p)
        ares_alloc_failures++;
    return p;
}

static void *ares_grow(void *ptr, size_t size)
{
    void *p = moor__realloc(ptr, size ? size : 1);
    if (!p)
        ares_alloc_failures++;
    return p;
}

static void ares_release(void *ptr) { moor__free(ptr); }

static void library_init(void)
{
    library_status = ares_library_init_mem(ARES_LIB_INIT_ALL, ares_alloc, ares_release, ares_grow);
}

static int channel_new(dns_resolver *d)
{
    pthread_once(&library_once, library_init);
    if (library_status != ARES_SUCCESS)
        return moor__dns_error(library_status);
    struct ares_options o;
    memset(&o, 0, sizeof o);
    o.sock_state_cb = sock_state;
    o.sock_state_cb_data = d;
    /* All the executor's lookups share one UDP socket per server: a burst of answers (a
     * thousand fibers resolving at once) overflows the default receive buffer, and each
     * answer dropped costs its lookup c-ares' whole retry timeout (5 s). The kernel caps it
     * at net.core.rmem_max. */
    o.socket_receive_buffer_size = RECEIVE_BUFFER;
    int status = ares_init_options(&d->channel, &o,
                                   ARES_OPT_SOCK_STATE_CB | ARES_OPT_SOCK_RCVBUF);
    if (status != ARES_SUCCESS) {
        d->channel = NULL;
        return moor__dns_error(status);
    }
    const char *servers = getenv("MOOR_DNS_SERVERS");
    if (servers && *servers) {
        status = ares_set_servers_ports_csv(d->channel, servers);
        if (status != ARES_SUCCESS) {
            ares_destroy(d->channel);
            d->channel = NULL;
            return status == ARES_ENOMEM ? -ENOMEM : -EINVAL;
        }
    }
    return 0;
}

/* The channel goes; c-ares ends the lookups still pending (their callbacks run now, with
 * ARES_EDESTRUCTION) and closes its sockets, telling sock_state. */
static void channel_destroy(dns_resolver *d)
{
    if (d->channel)
        ares_destroy(d->channel);
    d->channel = NULL;
    while (d->sockets.head) /* none should be left; c-ares told of each */
        socket_drop(d, moor_container_of(d->sockets.head, dns_socket, link));
    timer_stop(d);
    d->starved = 0;
}

/* In a forked child: the channel's sockets are the parent's too, and the answers to its
 * lookups would go to whichever process reads first. The child drops it (its lookups in
 * flight fail with -ECANCELED) and makes a new one at its next lookup. */
static void dns_after_fork(moor__reactor *r, void *self)
{
    (void)r;
    channel_destroy(self);
}

static void dns_free(moor__reactor *r, void *self)
{
    (void)r;
    channel_destroy(self);
    moor__free(self);
}

static const moor__reactor_hook_ops dns_hooks = {NULL, NULL, dns_after_fork, dns_free};

/* The executor's resolver, its channel made. 0 or -errno/MOOR_EAI_ code. */
static int resolver_get(moor_executor *ex, dns_resolver **out)
{
    moor__reactor *r;
    int rc = moor__reactor_get(ex, &r);
    if (rc < 0)
        return rc;
    dns_resolver *d = moor__reactor_hook_self(r, MOOR__REACTOR_HOOK_DNS);
    if (!moor__reactor_hooked(r, MOOR__REACTOR_HOOK_DNS)) {
        d = moor__alloc(sizeof *d);
        if (!d)
            return -ENOMEM;
        memset(d, 0, sizeof *d);
        d->r = r;
        d->inflight = (moor_sem)MOOR_SEM_INIT(MAX_INFLIGHT);
        ev_timer_init(&d->timer, on_timeout, 0., 0.);
        d->timer.data = d;
        moor__reactor_hook_set(r, MOOR__REACTOR_HOOK_DNS, &dns_hooks, d);
    }
    if (d->starved) /* a socket went unwatched, and the loop has not dropped it yet */
        channel_destroy(d);
    if (!d->channel && (rc = channel_new(d)) < 0)
        return rc;
    *out = d;
    return 0;
}

/* ---- a lookup ---------------------------------------------------------------------------- */

/* A lookup's state, shared by c-ares' callback and the waiting call (see the top). */
typedef struct dns_query {
    int refs;      /* 2 at the start: the callback's and the call's */
    int done;      /* the callback ran: status and result are set */
    int status;    /* 0 or a moor error code */
    struct addrinfo *result; /* owned by the query until the call takes it */
    moor_waker waker; /* the waiting task; zeroed once the call gave up */
    moor_sem *inflight; /* its permit, given back when c-ares is done with it */
    const int *starved; /* its resolver's: a lookup ended by the channel's drop failed for memory */
    unsigned long alloc_failures; /* ares_alloc_failures when it began */
    struct addrinfo hints;
} dns_query;

static void query_release(dns_query *q)
{
    if (--q->refs > 0)
        return;
    moor_resolve_free(q->result);
    moor__free(q);
}

static void on_addrinfo(void *arg, int status, int timeouts, struct ares_addrinfo *res)
{
    (void)timeouts;
    dns_query *q = arg;
    q->status = moor__dns_error(status);
    if (status == ARES_EDESTRUCTION && *q->starved)
        q->status = -ENOMEM;
    else if (status != ARES_SUCCESS && status != ARES_EDESTRUCTION &&
             status != ARES_ECANCELLED && ares_alloc_failures != q->alloc_failures)
        q->status = -ENOMEM; /* c-ares may have lost its own -ENOMEM (see ares_alloc) */
    if (status == ARES_SUCCESS && res)
        q->status = convert(res, &q->hints, &q->result);
    if (res)
        ares_freeaddrinfo(res);
    q->done = 1;
    moor_sem_release(q->inflight);
    moor_waker_wake(&q->waker);
    query_release(q);
}

typedef struct resolve_future {
    moor_future base;
    moor__deadline deadline;
    dns_query *q;
} resolve_future;

MOOR__WAIT_OP int resolve_ready(moor_future *fut, moor_cx *cx)
{
    (void)cx;
    dns_query *q = moor_container_of(fut, resolve_future, base)->q;
    if (!q->done)
        return 0;
    fut->result = q->status;
    return 1;
}

MOOR__WAIT_OP int resolve_park(moor_future *fut, moor_cx *cx)
{
    moor_container_of(fut, resolve_future, base)->q->waker = cx->waker;
    return 0;
}

/* Given up on: the answer is dropped when it comes, unless it came already. */
MOOR__WAIT_OP int resolve_unpark(moor_future *fut)
{
    dns_query *q = moor_container_of(fut, resolve_future, base)->q;
    q->waker = (moor_waker){0};
    if (!q->done)
        return 0;
    fut->result = q->status;
    return 1;
}

static const moor__wait_ops resolve_wait = {resolve_ready, resolve_park, resolve_unpark,
                                            -ETIMEDOUT};

static moor_poll resolve_poll(moor_future *fut, moor_cx *cx)
{
    resolve_future *rf = moor_container_of(fut, resolve_future, base);
    return moor__wait_poll(fut, &rf->deadline, cx, &resolve_wait);
}

static moor_poll resolve_cancel(moor_future *fut)
{
    resolve_future *rf = moor_container_of(fut, resolve_future, base);
    return moor__wait_cancel(fut, &rf->deadline, &resolve_wait);
}

static const moor_future_ops resolve_ops = {"resolve", resolve_poll, resolve_cancel};

/* The AI_ flags c-ares knows, in its own bits; -1 for any other. */
static int ares_flags(int flags)
{
    static const struct {
        int ai, ares;
    } map[] = {
        {AI_CANONNAME, ARES_AI_CANONNAME}, {AI_NUMERICHOST, ARES_AI_NUMERICHOST},
        {AI_NUMERICSERV, ARES_AI_NUMERICSERV}, {AI_PASSIVE, ARES_AI_PASSIVE},
        {AI_V4MAPPED, ARES_AI_V4MAPPED}, {AI_ALL, ARES_AI_ALL},
        {AI_ADDRCONFIG, ARES_AI_ADDRCONFIG},
    };
    int out = 0;
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        if (flags & map[i].ai) {
            out |= map[i].ares;
            flags &= ~map[i].ai;
        }
    }
    return flags ? -1 : out;
}

int moor_resolve(const char *host, const char *service, const struct addrinfo *hints,
                 int64_t deadline, struct addrinfo **result)
{
    moor__assert(result, "moor_resolve: result is NULL");
    *result = NULL;
    struct addrinfo h;
    memset(&h, 0, sizeof h);
    h.ai_family = AF_UNSPEC;
    if (hints) {
        h.ai_flags = hints->ai_flags;
        h.ai_family = hints->ai_family;
        h.ai_socktype = hints->ai_socktype;
        h.ai_protocol = hints->ai_protocol;
    }
    int flags = ares_flags(h.ai_flags);
    if (!host || flags < 0 ||
        (h.ai_family != AF_UNSPEC && h.ai_family != AF_INET && h.ai_family != AF_INET6))
        return -EINVAL;
    int rc;
    if (resolve_numeric(host, service, &h, result, &rc))
        return rc;

    moor_executor *ex = moor__tls_executor;
    moor__assert(ex, "moor_resolve: no executor on this thread");
    dns_resolver *d;
    rc = resolver_get(ex, &d);
    if (rc < 0)
        return rc;
    rc = moor_sem_acquire(&d->inflight, deadline);
    if (rc < 0)
        return rc;
    dns_query *q = moor__alloc(sizeof *q);
    if (!q) {
        moor_sem_release(&d->inflight);
        return -ENOMEM;
    }
    memset(q, 0, sizeof *q);
    q->refs = 2;
    q->inflight = &d->inflight;
    q->starved = &d->starved;
    q->alloc_failures = ares_alloc_failures;
    q->hints = h;
    struct ares_addrinfo_hints ah = {flags, h.ai_family, h.ai_socktype, h.ai_protocol};
    /* The callback may run before this returns (/etc/hosts, a bad name, no memory). */
    ares_getaddrinfo(d->channel, host, service, &ah, on_addrinfo, q);
    timer_rearm(d);

    resolve_future rf;
    moor_future_init(&rf.base, &resolve_ops, 0);
    moor__deadline_init(&rf.deadline, deadline);
    rf.q = q;
    rc = (int)moor__wait(&rf.base);
    if (q->done && rc == 0) {
        *result = q->result;
        q->result = NULL;
    }
    query_release(q);
    return rc;
}
