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
    int64_t accept_backoff_until; /* after EMFILE/ENFILE, accepts wait until then (ms) */
    moor__blocking_pool *blocking;
} moor__reactor;

/* The executor's reactor, made with a loop of its own if it has none. NULL on ENOMEM. */
moor__reactor *moor__reactor_get(moor_executor *ex);

/* Blocking pool teardown and fork handling (blocking.c). */
void moor__blocking_pool_free(moor__blocking_pool *pool);
void moor__blocking_pool_after_fork(moor__blocking_pool *pool);

#endif
