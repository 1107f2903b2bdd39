/* The reactor (loop.c): an executor's libev loop, the bottom of reactor/. It installs itself
 * as the executor's driver (park/unpark) when something first needs a loop, or when the
 * application attaches the executor to a loop it runs.
 *
 * The files above it (fd.c, signal.c, dns.c) hang their state on it through hooks they
 * attach when they first use it; loop.c calls the hooks at its turns without knowing whose
 * they are, so it calls none of those files by name. */
#ifndef MOOR_REACTOR_REACTOR_H
#define MOOR_REACTOR_REACTOR_H

#include <ev.h>

#include "fiber/executor.h"

typedef struct moor__reactor moor__reactor;

/* What a file above loop.c needs done at the reactor's turns. Each hook may be NULL; self is
 * what the file attached with them. */
typedef struct moor__reactor_hook_ops {
    /* Before libev looks at fds: at each park (timeout_ms is the park's, -1 for none), and
     * attached, in the prepare watcher just before the application's loop looks (-1).
     * Returns the timeout to park with: timeout_ms, or 0 if it woke a task. */
    int64_t (*before_look)(moor__reactor *r, void *self, int64_t timeout_ms);
    /* The unpark async fired: another thread, or a signal handler, sent it. */
    void (*unparked)(moor__reactor *r, void *self);
    /* In a forked child, before the loop registers its fds again. */
    void (*after_fork)(moor__reactor *r, void *self);
    /* At the reactor's teardown, while its loop still runs; in the reverse order of the ids. */
    void (*free)(moor__reactor *r, void *self);
} moor__reactor_hook_ops;

/* The hooks, in the order they are called (and the reverse of their freeing). */
enum moor__reactor_hook_id {
    MOOR__REACTOR_HOOK_FD = 0, /* fd.c: the fd table and its check list */
    MOOR__REACTOR_HOOK_SIGNAL, /* signal.c: the signals caught for this reactor */
    MOOR__REACTOR_HOOK_DNS,    /* dns.c: the c-ares channel, its sockets and timer */
    MOOR__REACTOR_HOOKS
};

typedef struct moor__reactor_hook {
    const moor__reactor_hook_ops *ops; /* NULL: not attached */
    void *self;
} moor__reactor_hook;

struct moor__reactor {
    struct ev_loop *loop;
    moor_executor *ex;
    int owned;            /* moor made the loop (and destroys it) */
    ev_async unpark;      /* other threads end a park, or wake an attached executor; signal
                             handlers send it too (signal.c) */
    ev_timer park_timer;  /* bounds a park by the next timer deadline */
    ev_prepare prepare;   /* attached: run tasks before the loop blocks */
    ev_idle idle;         /* attached: keeps the loop from blocking while tasks are runnable */
    int holds_ref;        /* attached: one loop reference held while any task is pending */
    moor__reactor_hook hooks[MOOR__REACTOR_HOOKS];
    int64_t accept_backoff_until; /* socket.c: after EMFILE/ENFILE, accepts wait until then
                                     (ms); 0 if they need not */
};

/* The executor's reactor in *out, made with a loop of its own if it has none. 0, or -EMFILE,
 * -ENFILE (no descriptor for the loop), -ENOMEM. */
int moor__reactor_make(moor_executor *ex, moor__reactor **out);

static inline int moor__reactor_get(moor_executor *ex, moor__reactor **out)
{
    moor__reactor *r = moor__part_get(ex, MOOR__PART_REACTOR);
    if (__builtin_expect(r != NULL, 1)) {
        *out = r;
        return 0;
    }
    return moor__reactor_make(ex, out);
}

/* Attach a file's hooks (once, at its first use of r). */
static inline void moor__reactor_hook_set(moor__reactor *r, enum moor__reactor_hook_id id,
                                          const moor__reactor_hook_ops *ops, void *self)
{
    r->hooks[id] = (moor__reactor_hook){ops, self};
}

static inline int moor__reactor_hooked(const moor__reactor *r, enum moor__reactor_hook_id id)
{
    return r->hooks[id].ops != NULL;
}

static inline void *moor__reactor_hook_self(const moor__reactor *r, enum moor__reactor_hook_id id)
{
    return r->hooks[id].self;
}

#endif
