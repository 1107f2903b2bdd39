/* Time for fibers: deadlines from now, and the sleep future. (The clock and the timer heap
 * are timer.c's; a deadline's place in the heap is wait.h's.) */
#include <errno.h>

#include "dump.h"
#include "wait.h"

int64_t moor_deadline_in(int64_t ms)
{
    if (ms < 0)
        return -1;
    int64_t now = moor_now();
    return ms > INT64_MAX - now ? INT64_MAX : now + ms; /* saturates: "never", not negative */
}

/* A sleep is a wait whose deadline is its completion: ready once the time has come, nothing
 * to register but the deadline itself. */
MOOR__WAIT_OP int sleep_ready(moor_future *fut, moor_cx *cx)
{
    (void)cx;
    moor_sleep_future *sf = moor_container_of(fut, moor_sleep_future, base);
    if (moor_now() < sf->deadline.at)
        return 0;
    fut->result = 0;
    return 1;
}

MOOR__WAIT_OP int sleep_park(moor_future *fut, moor_cx *cx)
{
    (void)fut;
    (void)cx;
    return 0;
}

/* Nothing to undo. (A sleep's deadline passing is its completion: sleep_wait's expired
 * result is 0, not -ETIMEDOUT.) */
MOOR__WAIT_OP int sleep_unpark(moor_future *fut)
{
    (void)fut;
    return 0;
}

static const moor__wait_ops sleep_wait = {sleep_ready, sleep_park, sleep_unpark, 0};

static moor_poll sleep_poll(moor_future *fut, moor_cx *cx)
{
    moor_sleep_future *sf = moor_container_of(fut, moor_sleep_future, base);
    return moor__wait_poll(fut, &sf->deadline, cx, &sleep_wait);
}

static moor_poll sleep_cancel(moor_future *fut)
{
    moor_sleep_future *sf = moor_container_of(fut, moor_sleep_future, base);
    return moor__wait_cancel(fut, &sf->deadline, &sleep_wait);
}

static const moor_future_ops sleep_ops = {"sleep", sleep_poll, sleep_cancel};

/* "sleep 120 ms left": the time still to wait (its timer wakes it: never a deadlock). */
static int sleep_describe(const moor_future *fut, char *buf, size_t size)
{
    const moor_sleep_future *sf = moor_container_of(fut, moor_sleep_future, base);
    int64_t left = sf->deadline.at - moor_now();
    moor__fmt out = moor__fmt_init(buf, size);
    moor__fmt_str(&out, "sleep ");
    moor__fmt_i64(&out, left > 0 ? left : 0);
    moor__fmt_str(&out, " ms left");
    return 0;
}

static moor_future_kind sleep_kind = {&sleep_ops, sleep_describe, NULL};

__attribute__((constructor)) static void sleep_kind_register(void)
{
    moor_future_kind_register(&sleep_kind);
}

void moor_sleep_init(moor_sleep_future *sf, int64_t deadline)
{
    moor_future_init(&sf->base, &sleep_ops, 0);
    moor__deadline_init(&sf->deadline, deadline < 0 ? INT64_MAX : deadline);
}

int moor_sleep(int64_t deadline)
{
    moor_sleep_future sf;
    moor_sleep_init(&sf, deadline);
    return (int)moor__wait(&sf.base);
}
