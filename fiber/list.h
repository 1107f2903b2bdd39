/* An intrusive doubly linked list: the node lives in the listed object (a fiber, a waiter, a
 * wait), so linking costs no allocation and unlinking is O(1). NULL-terminated at both ends,
 * and all-zero is an empty list, so it can sit in structs initialised with {0}. The types are in moor.h (private
 * layouts), as caller-owned structs embed them. */
#ifndef MOOR_FIBER_LIST_H
#define MOOR_FIBER_LIST_H

#include "moor.h" /* moor__node, moor__list: embedded in public structs */

static inline void moor__list_push(moor__list *l, moor__node *n)
{
    n->next = NULL;
    n->prev = l->tail;
    if (l->tail)
        l->tail->next = n;
    else
        l->head = n;
    l->tail = n;
}

static inline void moor__list_push_front(moor__list *l, moor__node *n)
{
    n->prev = NULL;
    n->next = l->head;
    if (l->head)
        l->head->prev = n;
    else
        l->tail = n;
    l->head = n;
}

static inline void moor__list_remove(moor__list *l, moor__node *n)
{
    if (n->prev)
        n->prev->next = n->next;
    else
        l->head = n->next;
    if (n->next)
        n->next->prev = n->prev;
    else
        l->tail = n->prev;
    n->prev = n->next = NULL;
}

/* Unlink n, the first node of l: moor__list_remove for the head, in fewer steps. n's own links
 * are left as they were, so only a list whose owner tracks membership itself (a waiter's
 * `queued`) may use it. */
static inline void moor__list_unlink_head(moor__list *l, moor__node *n)
{
    l->head = n->next;
    if (n->next)
        n->next->prev = NULL;
    else
        l->tail = NULL;
}

static inline moor__node *moor__list_pop(moor__list *l)
{
    moor__node *n = l->head;
    if (n)
        moor__list_remove(l, n);
    return n;
}

#endif
