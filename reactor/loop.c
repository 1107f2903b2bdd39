/* The bottom of reactor/: making the reactor (a loop of moor's own, or the application's
 * loop it is attached to), the park/unpark driver on libev, the watchers that run an attached
 * executor from the application's loop, libev's system errors, teardown and fork. What the
 * files above it keep on the reactor they hook into it (reactor.h); this file calls none of
 * them by name. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#endif

#include "fiber/alloc.h"
#include "fiber/assert.h"
#include "reactor.h"

/* ---- the hooks -------------------------------------------------------------------------- */

static int64_t before_look(moor__reactor *r, int64_t timeout_ms)
{
    for (size_t i = 0; i < MOOR__REACTOR_HOOKS; i++) {
        const moor__reactor_hook *h = &r->hooks[i];
        if (h->ops && h->ops->before_look)
            timeout_ms = h->ops->before_look(r, h->self, timeout_ms);
    }
    return timeout_ms;
}

static void on_unpark(struct ev_loop *loop, ev_async *w, int revents)
{
    (void)loop, (void)revents; /* it ends ev_run; the hooks see what it was sent for */
    moor__reactor *r = moor_container_of(w, moor__reactor, unpark);
    for (size_t i = 0; i < MOOR__REACTOR_HOOKS; i++) {
        const moor__reactor_hook *h = &r->hooks[i];
        if (h->ops && h->ops->unparked)
            h->ops->unparked(r, h->self);
    }
}

/* ---- the libev driver ------------------------------------------------------------------ */

static void on_nothing_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop, (void)w, (void)revents;
}

static void ev_park(void *self, int64_t timeout_ms)
{
    moor__reactor *r = self;
    timeout_ms = before_look(r, timeout_ms);
    if (timeout_ms == 0) {
        ev_run(r->loop, EVRUN_NOWAIT);
        return;
    }
    if (timeout_ms > 0) {
        ev_now_update(r->loop);
        ev_timer_set(&r->park_timer, (ev_tstamp)timeout_ms / 1000.0, 0.);
        ev_timer_start(r->loop, &r->park_timer);
    }
    ev_run(r->loop, EVRUN_ONCE);
    if (timeout_ms > 0)
        ev_timer_stop(r->loop, &r->park_timer);
}

static void ev_unpark(void *self)
{
    moor__reactor *r = self;
    ev_async_send(r->loop, &r->unpark);
}

/* Deadlock detection: an application's loop (attached) runs the application's watchers at
 * each park, and so does moor's own loop once handed out (moor_executor_loop): their
 * callbacks may wake any task. */
static int ev_foreign(void *self)
{
    const moor__reactor *r = self;
    return !r->owned;
}

static int ev_shared(void *self)
{
    (void)self;
    return 1;
}

static const moor__driver ev_driver = {ev_park, ev_unpark, ev_foreign};
static const moor__driver ev_shared_driver = {ev_park, ev_unpark, ev_shared};

/* ---- attached to a loop the application runs ------------------------------------------- */

/* Tasks run per turn of the application's loop, so that its own watchers get their turn. */
#define ATTACHED_BUDGET 256u

static void attached_run(moor__reactor *r)
{
    int64_t next;
    int more = moor__executor_tick(r->ex, ATTACHED_BUDGET, &next);
    /* While a task is pending the application's ev_run must not return, whatever it waits
     * on (a timer, a worker, another thread): hold a reference on the loop for them. */
    int pending = r->ex->ntasks > 0;
    if (pending && !r->holds_ref)
        ev_ref(r->loop);
    else if (!pending && r->holds_ref)
        ev_unref(r->loop);
    r->holds_ref = pending;
    /* libev looks at fds right after this prepare watcher: check what is due first. A wait
     * that fails wakes its task, which runs at the next turn (the loop must not block). */
    before_look(r, -1);
    if (more || r->ex->run_head)
        ev_idle_start(r->loop, &r->idle);
    else
        ev_idle_stop(r->loop, &r->idle);
    ev_timer_stop(r->loop, &r->park_timer);
    if (next >= 0) {
        int64_t wait = next - moor_now();
        ev_timer_set(&r->park_timer, wait > 0 ? (ev_tstamp)wait / 1000.0 : 0., 0.);
        ev_timer_start(r->loop, &r->park_timer);
    }
}

static void on_prepare(struct ev_loop *loop, ev_prepare *w, int revents)
{
    (void)loop, (void)revents;
    moor__reactor *r = w->data;
    /* A plain-code moor_block_on inside an application callback runs the executor itself;
     * the prepare watcher of that nested ev_run must not run it a second time. */
    if (!r->ex->running)
        attached_run(r);
}

static void on_idle(struct ev_loop *loop, ev_idle *w, int revents)
{
    (void)loop, (void)w, (void)revents; /* while active, the loop does not block */
}

/* ---- libev's system errors -------------------------------------------------------------- */

/* libev reports a system call it cannot do without (making its async pipe, epoll_create after
 * fork, epoll_wait) through one process-wide callback, whose default prints and aborts, and
 * some callers retry at once if it returns. moor's callback does the same as the default,
 * unless the calling thread has armed a guard around a libev call that fails before it has
 * changed anything: then it jumps back to the guard with errno. */
static __thread jmp_buf *syserr_guard;
static __thread int syserr_errno;

static void on_syserr(const char *msg)
{
    jmp_buf *guard = syserr_guard;
    if (guard) {
        syserr_errno = errno;
        syserr_guard = NULL;
        longjmp(*guard, 1);
    }
    perror(msg);
    abort();
}

static void syserr_install(void) { ev_set_syserr_cb(on_syserr); }

/* ev_async_start makes the loop's async pipe (eventfd, else a pipe) if it has none yet; that
 * is its only system call, and it fails before anything is started. 0 or -errno. */
static int async_start(struct ev_loop *loop, ev_async *w)
{
    jmp_buf guard;
    if (setjmp(guard))
        return -(syserr_errno ? syserr_errno : EMFILE);
    syserr_guard = &guard;
    ev_async_start(loop, w);
    syserr_guard = NULL;
    return 0;
}

/* ---- lifecycle ------------------------------------------------------------------------- */

static void reactor_free(moor_executor *ex, void *self)
{
    moor__reactor *r = self;
    for (size_t i = MOOR__REACTOR_HOOKS; i-- > 0;) {
        const moor__reactor_hook *h = &r->hooks[i];
        if (h->ops && h->ops->free)
            h->ops->free(r, h->self);
    }
    moor__driver_set(ex, NULL, NULL);
    if (r->owned) {
        ev_async_stop(r->loop, &r->unpark);
        ev_loop_destroy(r->loop);
    } else {
        /* Give back the references taken away at attach before stopping those watchers. */
        ev_ref(r->loop);
        ev_async_stop(r->loop, &r->unpark);
        ev_ref(r->loop);
        ev_prepare_stop(r->loop, &r->prepare);
        ev_timer_stop(r->loop, &r->park_timer);
        ev_idle_stop(r->loop, &r->idle);
        if (r->holds_ref)
            ev_unref(r->loop);
    }
    moor__part_set(ex, MOOR__PART_REACTOR, NULL, NULL);
    moor__free(r);
}

/* epoll explicitly where there is epoll: if epoll_create fails (EMFILE), making the loop
 * fails with it, instead of libev falling back to poll() quietly. */
#ifdef __linux__
#define LOOP_FLAGS (EVBACKEND_EPOLL | EVFLAG_NOSIGMASK)
#else
#define LOOP_FLAGS (EVFLAG_AUTO | EVFLAG_NOSIGMASK)
#endif

static int reactor_fork_check(moor_executor *ex, void *self);
static void reactor_after_fork(moor_executor *ex, void *self);
static const moor__part_ops reactor_part = {reactor_fork_check, reactor_after_fork, reactor_free};

static int reactor_new(moor_executor *ex, struct ev_loop *loop, moor__reactor **out)
{
    static pthread_once_t syserr_once = PTHREAD_ONCE_INIT;
    pthread_once(&syserr_once, syserr_install);
    moor__reactor *r = moor__alloc(sizeof *r);
    if (!r)
        return -ENOMEM;
    memset(r, 0, sizeof *r);
    r->owned = loop == NULL;
    if (r->owned) {
        errno = 0;
        loop = ev_loop_new(LOOP_FLAGS);
        if (!loop) {
            int err = errno ? errno : ENOMEM;
            moor__free(r);
            return -err;
        }
    }
    r->loop = loop;
    r->ex = ex;
    ev_async_init(&r->unpark, on_unpark);
    int rc = async_start(r->loop, &r->unpark);
    if (rc < 0) {
        if (r->owned)
            ev_loop_destroy(r->loop);
        moor__free(r);
        return rc;
    }
    ev_timer_init(&r->park_timer, on_nothing_timer, 0., 0.);
    if (!r->owned) {
        /* The application's ev_run must end when nothing is left to do: moor's own async and
         * prepare watchers do not count. Work does: runnable tasks (the idle watcher),
         * pending timers (park_timer) and fibers waiting on fds (their io watchers). */
        ev_unref(r->loop);
        ev_prepare_init(&r->prepare, on_prepare);
        r->prepare.data = r;
        ev_prepare_start(r->loop, &r->prepare);
        ev_unref(r->loop);
        ev_idle_init(&r->idle, on_idle);
        ev_idle_start(r->loop, &r->idle); /* tasks may be queued already */
    }
    moor__part_set(ex, MOOR__PART_REACTOR, &reactor_part, r);
    moor__driver_set(ex, &ev_driver, r);
    *out = r;
    return 0;
}

int moor__reactor_make(moor_executor *ex, moor__reactor **out)
{
    moor__reactor *r = moor__part_get(ex, MOOR__PART_REACTOR);
    return r ? (*out = r, 0) : reactor_new(ex, NULL, out);
}

int moor_executor_attach(moor_executor *ex, struct ev_loop *loop)
{
    moor__assert(ex == moor__tls_executor,
                 "moor_executor_attach: the executor belongs to another thread");
    moor__assert(loop, "moor_executor_attach: loop is NULL");
    if (moor__part_get(ex, MOOR__PART_REACTOR))
        return -EBUSY;
    moor__reactor *r;
    return reactor_new(ex, loop, &r);
}

struct ev_loop *moor_executor_loop(moor_executor *ex)
{
    moor__reactor *r;
    if (moor__reactor_get(ex, &r) < 0)
        return NULL;
    if (ex->driver != &ev_shared_driver)
        moor__driver_set(ex, &ev_shared_driver, r); /* its watchers may be the application's */
    return r->loop;
}

/* Whether a descriptor can be made now for libev's new async pipe (an eventfd on Linux). */
static int fd_available(void)
{
#ifdef __linux__
    int fd = eventfd(0, EFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    close(fd);
#else
    int p[2];
    if (pipe(p) < 0)
        return -errno;
    close(p[0]);
    close(p[1]);
#endif
    return 0;
}

static int reactor_fork_check(moor_executor *ex, void *self)
{
    (void)ex;
    moor__reactor *r = self;
    /* libev re-arms a forked loop at its next ev_run: a new epoll fd in place of the old one
     * (closed first), and a new async pipe, which needs a free descriptor; without one it
     * aborts. The child has one thread now: what is free now stays free until the ev_run
     * in reactor_after_fork, which re-arms the loop at once. */
    return r->owned ? fd_available() : 0;
}

static void reactor_after_fork(moor_executor *ex, void *self)
{
    (void)ex;
    moor__reactor *r = self;
    /* The loop registers every watched fd again: the hooks make sure first that no wait is
     * still on a closed one. */
    for (size_t i = 0; i < MOOR__REACTOR_HOOKS; i++) {
        const moor__reactor_hook *h = &r->hooks[i];
        if (h->ops && h->ops->after_fork)
            h->ops->after_fork(r, h->self);
    }
    ev_loop_fork(r->loop);
    if (r->owned)
        ev_run(r->loop, EVRUN_NOWAIT);
}
