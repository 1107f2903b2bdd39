/* The reactor: an executor's libev loop and what hangs off it. It installs itself as the
 * executor's driver (park/unpark) when something first needs a loop, or when the
 * application attaches the executor to a loop it runs. */
#ifndef MOOR_REACTOR_REACTOR_H
#define MOOR_REACTOR_REACTOR_H

#include <ev.h>

#include "fiber/executor.h"

typedef struct moor__blocking_pool moor__blocking_pool;

typedef struct moor__reactor {
    struct ev_loop *loop;
    moor_executor *ex;
    int owned;            /* moor made the loop (and destroys it) */
    ev_async unpark;      /* other threads end a park, or wake an attached executor */
    ev_timer park_timer;  /* bounds a park by the next timer deadline */
    ev_prepare prepare;   /* attached: run tasks before the loop blocks */
    ev_idle idle;         /* attached: keeps the loop from blocking while tasks are runnable */
    int holds_ref;        /* attached: one loop reference held while any task is pending */
    int64_t accept_backoff_until; /* after EMFILE/ENFILE, accepts wait until then (ms) */
    uint8_t *fd_hints;    /* per fd: MOOR__FD_* readiness hints (io.c) */
    size_t nfd_hints;
    moor__blocking_pool *blocking;
} moor__reactor;

/* Readiness hints: a short read on a stream means the receive buffer was emptied, so the
 * next read would fail with EAGAIN; a short write, that the send buffer is full. The next
 * call then waits for readiness first instead of paying a system call to learn it. */
#define MOOR__FD_DRAINED 0x1u
#define MOOR__FD_FULL 0x2u
/* moor made this fd (accept, connect, listen) and is told of its close (moor_close). */
#define MOOR__FD_OWNED 0x4u
/* ...and it is registered with the loop's backend since moor made it: a wait can start its
 * watcher without making libev register the fd again (an epoll_ctl per wait otherwise). */
#define MOOR__FD_LIVE 0x8u

/* The flags byte of fd (NULL if the table cannot grow). */
uint8_t *moor__reactor_fd(moor__reactor *r, int fd);
/* moor made fd: its state starts afresh, owned. */
void moor__reactor_fd_new(int fd);

/* The executor's reactor in *out, made with a loop of its own if it has none. 0, or -EMFILE,
 * -ENFILE (no descriptor for the loop), -ENOMEM. */
int moor__reactor_make(moor_executor *ex, moor__reactor **out);

static inline int moor__reactor_get(moor_executor *ex, moor__reactor **out)
{
    if (__builtin_expect(ex->reactor != NULL, 1)) {
        *out = ex->reactor;
        return 0;
    }
    return moor__reactor_make(ex, out);
}

/* Blocking pool teardown and fork handling (blocking.c). */
void moor__blocking_pool_free(moor__blocking_pool *pool);
void moor__blocking_pool_after_fork(moor__blocking_pool *pool);

#endif
