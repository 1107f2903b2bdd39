/* Boost.Context's fcontext, from the system's libboost_context (linked as boost_context).
 * The library exports these three functions with C linkage; this is their only declaration
 * in moor. The names and types are Boost's own (boost/context/detail/fcontext.hpp). */
#ifndef MOOR_FIBER_FCONTEXT_H
#define MOOR_FIBER_FCONTEXT_H

#include <stddef.h>

typedef void *fcontext_t;

typedef struct transfer_t {
    fcontext_t fctx; /* the context that jumped here, to resume it later */
    void *data;      /* the value passed to jump_fcontext */
} transfer_t;

transfer_t jump_fcontext(fcontext_t const to, void *vp);
fcontext_t make_fcontext(void *sp, size_t size, void (*fn)(transfer_t));
transfer_t ontop_fcontext(fcontext_t const to, void *vp, transfer_t (*fn)(transfer_t));

#endif
