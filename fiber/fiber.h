/* A fiber's control block, and how fibers run. The control block lives at the top of the
 * fiber's own stack mapping (see the layout in moor.h), so it is pinned with the stack and
 * costs no allocation of its own. */
#ifndef MOOR_FIBER_FIBER_H
#define MOOR_FIBER_FIBER_H

#include "context.h"
#include "executor.h"

#define MOOR__FIBER_NAME_MAX 32

/* Fiber-to-fiber hand-offs allowed before the run loop gets a turn (to drain remote wakes
 * and, with a reactor, to look at events). */
#define MOOR__HANDOFF_BUDGET 64u

/* Operations a fiber may complete without waiting before the next one yields first (Tokio's
 * cooperative budget): one busy connection cannot starve the others or the timers. */
#define MOOR__COOP_BUDGET 128u

enum moor__fiber_state {
    MOOR__FIBER_FREE = 0, /* released to the pool (a zeroed, trimmed stack reads as this) */
    MOOR__FIBER_LIVE,     /* spawned, its function has not returned */
    MOOR__FIBER_DONE,     /* its function returned; waiting for moor_join unless detached */
};

struct moor_fiber {
    moor_task task;        /* the executor's handle on this fiber */
    moor_future join_fut;  /* completes with the fiber's result (moor_fiber_future) */
    moor__ctx ctx;         /* where the fiber resumes */
    moor_executor *ex;
    moor_fiber_fn fn;
    void *arg;
    intptr_t result;       /* fn's return value, once DONE */
    moor_waker joiner;     /* who waits in join_fut; zeroed when nobody */
    moor_fiber *prev, *next; /* the executor's list of fibers not yet released */
    char *stack_base;      /* the mapping: guard at stack_base, this block at its top */
    size_t map_size;
    size_t stack_size;     /* usable bytes asked for (what an overflow message reports) */
    uint64_t id;
    uint8_t state;         /* enum moor__fiber_state */
    uint8_t detached;      /* released as soon as it finishes */
    uint8_t join_claimed;  /* moor_join was called */
    uint8_t cancelled;     /* moor_cancel was called: waits return -ECANCELED */
    uint8_t remote;        /* spawned from another thread and not started yet */
    uint16_t budget;       /* operations completed at once left before a yield (packed with
                              the flags: the control block stays within 320 bytes) */
    moor_scope *scope;     /* the scope it was spawned into, or NULL */
    moor_fiber *scope_prev, *scope_next; /* its scope's list of running children */
    size_t open_scopes;    /* scopes it opened and has not closed */
    char name[MOOR__FIBER_NAME_MAX];
};

/* Bytes at the top of a stack mapping taken by the control block. Keep it small: a fresh
 * fiber touches all of it, and the bytes past a 64-byte boundary cost spawn time. */
#define MOOR__FIBER_CTL_SIZE \
    ((sizeof(struct moor_fiber) + MOOR__STACK_RESERVED + 63) & ~(size_t)63)

/* The mapping of a fiber stack with `size` usable bytes: guard, stack, control block. */
static inline size_t moor__fiber_map_size(const moor_executor *ex, size_t size)
{
    size_t page = moor__page_size();
    return ex->pool.guard + size + ((MOOR__FIBER_CTL_SIZE + page - 1) & ~(page - 1));
}

/* Spawn a fiber on ex (moor_spawn's body): *out is set on success, detached or not.
 * Errors: -ENOMEM, -EINVAL (a stack size that cannot be mapped). */
int moor__fiber_spawn(moor_executor *ex, moor_fiber **out, moor_fiber_fn fn, void *arg,
                      const moor_fiber_attr *attr, int detached);

/* Defined in scope.c: a child of a scope has returned. */
void moor__scope_child_done(moor_fiber *f);

/* Release a detached fiber that finished (on the stack of whoever runs after it). */
void moor__fiber_reap(moor_executor *ex);

/* The poll adapter. To the executor a fiber is one more future: polling it is resuming the
 * fiber (moor__fiber_resume), its PENDING is the fiber suspending in an await, its READY is
 * the fiber's function returning (the output goes to join_fut). The adapter is inlined rather
 * than called through an ops table because it sits next to the context switch: after a jump
 * returns, every frame that is unwound costs a mispredicted return (the jump's call left the
 * return-stack predictor out of step), so the run loop must not sit frames above the switch.
 *
 * A fiber that stops does its task's bookkeeping itself and hands off directly to the next
 * fiber on the run queue, without passing through the run loop: a yield round trip between
 * two fibers is then two jumps, not four. */
static inline void moor__fiber_resume(moor_executor *ex, moor_fiber *f)
{
    int saved_errno = *ex->errno_ptr;
    ex->current = f;
    moor__switch(&ex->ctx, &f->ctx);
    *ex->errno_ptr = saved_errno;
    if (ex->zombie)
        moor__fiber_reap(ex);
}

/* Called by a fiber that stops running: where to switch to. The next fiber on the run queue
 * (made running and current), or the executor's own context when the queue is empty, starts
 * with a plain future, has remote wakes waiting or the hand-off budget is spent. */
static inline moor__ctx *moor__fiber_next(moor_executor *ex)
{
    moor_task *t = ex->run_head;
    if (t && t->kind == MOOR__TASK_FIBER && ex->handoffs_left &&
        !__atomic_load_n(&ex->remote_pending, __ATOMIC_RELAXED)) {
        ex->handoffs_left--;
        moor__runq_pop(ex);
        t->state = MOOR__TASK_RUNNING;
        moor_fiber *next = (moor_fiber *)(void *)t; /* task is the first member */
        ex->current = next;
        return &next->ctx;
    }
    ex->current = NULL;
    return &ex->ctx;
}

/* The poll adapter's PENDING: the running fiber stops until its task is woken and picked
 * again, handing off to the next fiber if there is one. */
static inline void moor__fiber_suspend(moor_fiber *f)
{
    moor_executor *ex = f->ex;
    int saved_errno = *ex->errno_ptr;
    moor__task_pending(ex, &f->task);
    moor__ctx *to = moor__fiber_next(ex);
    if (to != &f->ctx) /* a lone yielding fiber may pick itself */
        moor__switch(&f->ctx, to);
    if (ex->zombie)
        moor__fiber_reap(ex);
    *ex->errno_ptr = saved_errno;
}

/* Out of line: the budget is spent; let every other runnable task run once first. */
void moor__coop_yield(moor_executor *ex);

/* Count one operation that completed without waiting (an I/O call with data or room, a
 * channel value that was there, a free lock); when the calling task's budget is spent, yield
 * before returning, which refills it. (Waits do not refill it: that would cost a store on
 * every switch, and a fiber that also waits yields at most once per 128 such operations.) In plain code (no fiber) the executor's own budget is spent, and a turn of
 * the executor is run instead. Cheap: a thread-local load, a decrement and a branch. */
static inline void moor__coop_spend(void)
{
    moor_executor *ex = moor__tls_executor;
    if (!ex)
        return;
    moor_fiber *f = ex->current;
    if (__builtin_expect(f ? --f->budget == 0 : --ex->plain_budget == 0, 0))
        moor__coop_yield(ex);
}

/* Await in a fiber, block_on in plain code: how every call that can wait waits. */
intptr_t moor__wait(moor_future *fut);
/* The same, but not cut short if the calling fiber is cancelled (relocking a mutex after a
 * condition wait, closing a scope). */
intptr_t moor__wait_uncancellable(moor_future *fut);

/* What a blocking call does in a fiber once it has queued a waiter that a counterpart will
 * complete: suspend until *completed is set (then return *result), the deadline passes
 * (-ETIMEDOUT) or the fiber is cancelled (-ECANCELED, unless it completed meanwhile);
 * unlink(arg) takes the waiter out when giving up. The same as awaiting the operation's
 * future, without the generic poll around it: this is the path every channel and lock wait
 * in a fiber takes. Errors: -ENOMEM (no room for the deadline's timer). */
int moor__fiber_wait_completion(moor_fiber *f, const int *completed, const intptr_t *result,
                                int64_t deadline, moor_timer_node *node,
                                void (*unlink)(void *arg), void *arg, int cancellable);

#endif
