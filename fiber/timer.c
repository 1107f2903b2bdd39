#include "timer.h"

#include <errno.h>
#include <time.h>

#include "alloc.h"
#include "executor.h"
#include "fiber.h"

int64_t moor_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t moor_deadline_in(int64_t ms)
{
    if (ms < 0)
        return -1;
    int64_t now = moor_now();
    return ms > INT64_MAX - now ? INT64_MAX : now + ms; /* saturates: "never", not negative */
}

static inline int before(const moor_timer_node *a, const moor_timer_node *b)
{
    return a->deadline < b->deadline || (a->deadline == b->deadline && a->seq < b->seq);
}

static inline void place(moor__timer_heap *h, size_t i, moor_timer_node *node)
{
    h->nodes[i] = node;
    node->index = i;
}

static void sift_up(moor__timer_heap *h, size_t i, moor_timer_node *node)
{
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(node, h->nodes[parent]))
            break;
        place(h, i, h->nodes[parent]);
        i = parent;
    }
    place(h, i, node);
}

static void sift_down(moor__timer_heap *h, size_t i, moor_timer_node *node)
{
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= h->n)
            break;
        if (child + 1 < h->n && before(h->nodes[child + 1], h->nodes[child]))
            child++;
        if (!before(h->nodes[child], node))
            break;
        place(h, i, h->nodes[child]);
        i = child;
    }
    place(h, i, node);
}

void moor__timer_heap_free(moor__timer_heap *h)
{
    moor__free(h->nodes);
    h->nodes = NULL;
    h->n = h->cap = 0;
}

int moor__timer_add(moor__timer_heap *h, moor_timer_node *node, int64_t deadline,
                    const moor_waker *waker)
{
    if (h->n == h->cap) {
        size_t ncap = h->cap ? h->cap * 2 : 64;
        moor_timer_node **nv = moor__realloc(h->nodes, ncap * sizeof *nv);
        if (!nv)
            return -ENOMEM;
        h->nodes = nv;
        h->cap = ncap;
    }
    node->deadline = deadline;
    node->seq = h->next_seq++;
    node->waker = *waker;
    sift_up(h, h->n++, node);
    return 0;
}

int moor__timer_arm(moor__timer_heap *h, moor_timer_node *node, int64_t deadline,
                    const moor_waker *waker)
{
    if (deadline < 0)
        return 0;
    if (moor__timer_node_queued(node)) {
        node->waker = *waker;
        return 0;
    }
    return moor__timer_add(h, node, deadline, waker);
}

void moor__timer_remove_queued(moor__timer_heap *h, moor_timer_node *node)
{
    size_t i = node->index;
    node->index = SIZE_MAX;
    moor_timer_node *last = h->nodes[--h->n];
    if (last == node)
        return;
    /* Put the last node in the hole and restore the order in whichever direction it breaks. */
    if (i > 0 && before(last, h->nodes[(i - 1) / 2]))
        sift_up(h, i, last);
    else
        sift_down(h, i, last);
}

size_t moor__timer_fire(moor__timer_heap *h, int64_t now)
{
    size_t fired = 0;
    while (h->n && h->nodes[0]->deadline <= now) {
        moor_timer_node *node = h->nodes[0];
        moor__timer_remove(h, node);
        moor_waker_wake(&node->waker);
        fired++;
    }
    return fired;
}

/* ---- the sleep future ------------------------------------------------------------------ */

static moor_poll sleep_poll(moor_future *fut, moor_cx *cx)
{
    moor_sleep_future *sf = moor_container_of(fut, moor_sleep_future, base);
    moor_executor *ex = cx->waker.ex;
    if (moor_now() >= sf->node.deadline) {
        moor__timer_remove(&ex->timers, &sf->node);
        fut->result = 0;
        return MOOR_READY;
    }
    int rc = moor__timer_arm(&ex->timers, &sf->node, sf->node.deadline, &cx->waker);
    if (rc < 0) {
        fut->result = rc;
        return MOOR_READY;
    }
    return MOOR_PENDING;
}

static moor_poll sleep_cancel(moor_future *fut)
{
    moor_sleep_future *sf = moor_container_of(fut, moor_sleep_future, base);
    moor_executor *ex = moor__tls_executor;
    moor__timer_remove(&ex->timers, &sf->node);
    return MOOR_PENDING;
}

static const moor_future_ops sleep_ops = {"sleep", sleep_poll, sleep_cancel};

void moor_sleep_init(moor_sleep_future *sf, int64_t deadline)
{
    moor_future_init(&sf->base, &sleep_ops, 0);
    moor__timer_node_init(&sf->node);
    sf->node.deadline = deadline < 0 ? INT64_MAX : deadline;
}

int moor_sleep(int64_t deadline)
{
    moor_sleep_future sf;
    moor_sleep_init(&sf, deadline);
    return (int)moor__wait(&sf.base);
}
