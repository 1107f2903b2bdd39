/* moor-demo: fibers that keep pointers into their own stacks across suspensions, a future
 * that is not a fiber, and a fiber awaited like any other future.
 *
 *   ./moor-demo            (or: ./moor-demo 5 to run five workers)
 */
#include <moor.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A worker fills a buffer on its own stack, one line per turn, yielding in between. The
 * pointer `cursor` points into that buffer and stays valid while other fibers run: the stack
 * never moves. */
static intptr_t worker(void *arg)
{
    int n = (int)(intptr_t)arg;
    char log[256];
    char *cursor = log;
    for (int turn = 0; turn < 3; turn++) {
        cursor += sprintf(cursor, "[%d:%d]", n, turn);
        printf("fiber %llu \"%s\" turn %d, log at %p: %s\n",
               (unsigned long long)moor_fiber_id(moor_self()), moor_fiber_name(moor_self()),
               turn, (void *)log, log);
        moor_yield();
    }
    return (intptr_t)(cursor - log);
}

/* A future that is not a fiber: pending `left` times, waking itself each time, then ready
 * with `value`. The same shape wraps any callback: store the waker, wake it later. */
typedef struct countdown {
    moor_future base;
    int left;
    intptr_t value;
} countdown;

static moor_poll countdown_poll(moor_future *fut, moor_cx *cx)
{
    countdown *c = moor_container_of(fut, countdown, base);
    if (c->left-- > 0) {
        moor_waker_wake(&cx->waker);
        return MOOR_PENDING;
    }
    fut->result = c->value;
    return MOOR_READY;
}

static const moor_future_ops countdown_ops = {"countdown", countdown_poll, NULL};

static intptr_t awaiter(void *arg)
{
    moor_fiber *target = arg;
    countdown c;
    moor_future_init(&c.base, &countdown_ops, 0);
    c.left = 4;
    c.value = 42;
    intptr_t v = moor_await(&c.base);
    intptr_t len = moor_await(moor_fiber_future(target));
    printf("awaiter: countdown gave %ld, worker 0 wrote %ld bytes\n", (long)v, (long)len);
    return 0;
}

int main(int argc, char **argv)
{
    int workers = argc > 1 ? atoi(argv[1]) : 3;
    if (workers < 1 || workers > 1000) {
        fprintf(stderr, "usage: %s [workers 1..1000]\n", argv[0]);
        return 2;
    }
    moor_executor *ex;
    int rc = moor_executor_new(&ex, NULL);
    if (rc < 0) {
        fprintf(stderr, "moor_executor_new: %s\n", moor_strerror(rc));
        return 1;
    }
    moor_fiber **fibers = calloc((size_t)workers, sizeof *fibers);
    for (int i = 0; i < workers; i++) {
        char name[16];
        snprintf(name, sizeof name, "worker-%d", i);
        moor_fiber_attr attr = {.name = name, .stack_size = 64 * 1024};
        rc = moor_spawn(&fibers[i], worker, (void *)(intptr_t)i, &attr);
        if (rc < 0) {
            fprintf(stderr, "moor_spawn: %s\n", moor_strerror(rc));
            return 1;
        }
    }
    moor_fiber *aw;
    moor_spawn(&aw, awaiter, fibers[0], &(moor_fiber_attr){.name = "awaiter"});
    moor_join(aw, NULL);
    for (int i = 0; i < workers; i++) {
        intptr_t len;
        moor_join(fibers[i], &len);
    }
    printf("guard method: %s\n",
           moor_executor_guard(ex) == MOOR_GUARD_MADVISE ? "MADV_GUARD_INSTALL" : "mprotect");
    free(fibers);
    moor_executor_free(ex);
    return 0;
}
