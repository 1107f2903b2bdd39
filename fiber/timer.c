#include "timer.h"

#include <errno.h>
#include <time.h>

#include "alloc.h"

uint64_t moor__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int64_t moor_now(void) { return (int64_t)(moor__now_ns() / 1000000u); }

static inline int before(const moor__deadline *a, const moor__deadline *b)
{
    return a->at < b->at || (a->at == b->at && a->seq < b->seq);
}

static inline void place(moor__timer_heap *h, size_t i, moor__deadline *dl)
{
    h->nodes[i] = dl;
    dl->index = i;
}

static void sift_up(moor__timer_heap *h, size_t i, moor__deadline *dl)
{
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(dl, h->nodes[parent]))
            break;
        place(h, i, h->nodes[parent]);
        i = parent;
    }
    place(h, i, dl);
}

static void sift_down(moor__timer_heap *h, size_t i, moor__deadline *dl)
{
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= h->n)
            break;
        if (child + 1 < h->n && before(h->nodes[child + 1], h->nodes[child]))
            child++;
        if (!before(h->nodes[child], dl))
            break;
        place(h, i, h->nodes[child]);
        i = child;
    }
    place(h, i, dl);
}

void moor__timer_heap_free(moor__timer_heap *h)
{
    moor__free(h->nodes);
    h->nodes = NULL;
    h->n = h->cap = 0;
}

int moor__timer_add(moor__timer_heap *h, moor__deadline *dl)
{
    if (moor__grow(&h->nodes, &h->cap, h->n + 1, sizeof *h->nodes) < 0)
        return -ENOMEM;
    dl->seq = h->next_seq++;
    sift_up(h, h->n++, dl);
    return 0;
}

void moor__timer_remove(moor__timer_heap *h, moor__deadline *dl)
{
    size_t i = dl->index;
    dl->index = SIZE_MAX;
    moor__deadline *last = h->nodes[--h->n];
    if (last == dl)
        return;
    /* Put the last one in the hole and restore the order in whichever direction it breaks. */
    if (i > 0 && before(last, h->nodes[(i - 1) / 2]))
        sift_up(h, i, last);
    else
        sift_down(h, i, last);
}

size_t moor__timer_fire(moor__timer_heap *h, int64_t now, void (*fire)(moor__deadline *dl))
{
    size_t fired = 0;
    while (h->n && h->nodes[0]->at <= now) {
        moor__deadline *dl = h->nodes[0];
        moor__timer_remove(h, dl);
        fire(dl);
        fired++;
    }
    return fired;
}
