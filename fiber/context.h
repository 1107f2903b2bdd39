/* The one place where moor switches stacks. Every switch between the executor and a fiber
 * goes through moor__switch (or moor__switch_final when a fiber leaves for good), so this is
 * where the tools hook in: ASan's fiber annotations, TSan's fiber API, and the clearing of
 * the floating-point sticky flags that keeps jump_fcontext's MXCSR reload cheap. */
#ifndef MOOR_FIBER_CONTEXT_H
#define MOOR_FIBER_CONTEXT_H

#include <stddef.h>

#include "fcontext.h"

#if defined(__SANITIZE_ADDRESS__)
#define MOOR_ASAN_FIBERS 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOOR_ASAN_FIBERS 1
#endif
#endif

#if defined(__SANITIZE_THREAD__)
#define MOOR_TSAN_FIBERS 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MOOR_TSAN_FIBERS 1
#endif
#endif

#ifdef MOOR_ASAN_FIBERS
#include <sanitizer/asan_interface.h>
#endif
#ifdef MOOR_TSAN_FIBERS
#include <sanitizer/tsan_interface.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

/* A place to resume: the executor's own stack, or a fiber's. */
typedef struct moor__ctx {
    fcontext_t fctx;      /* where to jump to resume it; set each time it switches away */
    const void *stack_lo; /* lowest usable address (ASan); the executor's is learnt */
    size_t stack_size;    /* usable bytes from stack_lo (ASan) */
    void *asan_fake;      /* ASan's fake stack of this context while it is switched away */
    void *tsan_fiber;     /* TSan's fiber for this context */
} moor__ctx;

/* Floating-point state across switches. jump_fcontext stores the leaving side's MXCSR in
 * its saved frame and loads the arriving side's from its frame. On some CPUs loading a
 * value that differs from the current one costs ~100 ns, and any fiber that does floating
 * point sets sticky exception flags (MXCSR bits 0-5) that make the values differ. So before
 * each jump moor clears those flags in the target's saved frame: every value loaded then has
 * clean flags, and equals the current one unless the leaving side raised flags since it last
 * arrived or the two really use different rounding modes or masks.
 *
 * Reading the live MXCSR (stmxcsr) would be simpler but costs ~6 ns on some CPUs, as much
 * as half a raw switch; editing the saved frame is a load and a store. The frame layout
 * (MXCSR at offset 0 of the frame fctx points to) is Boost's on x86-64 and i386; moor checks
 * it once at startup (moor__fp_frame_check) and falls back to stmxcsr if it ever differs. */
#if defined(__x86_64__) || defined(__i386__)
#define MOOR__MXCSR_FLAGS 0x3fu
extern int moor__fp_frame_ok;

/* Returns whether the saved-frame layout is as expected; sets moor__fp_frame_ok. */
int moor__fp_frame_check(void);

static inline void moor__fp_clear_flags(const moor__ctx *to)
{
    if (__builtin_expect(moor__fp_frame_ok, 1)) {
        unsigned int *saved_mxcsr = (unsigned int *)to->fctx;
        *saved_mxcsr &= ~MOOR__MXCSR_FLAGS;
    } else {
        unsigned int csr = _mm_getcsr();
        if (csr & MOOR__MXCSR_FLAGS)
            _mm_setcsr(csr & ~MOOR__MXCSR_FLAGS);
    }
}
#else
static inline int moor__fp_frame_check(void) { return 1; }
static inline void moor__fp_clear_flags(const moor__ctx *to) { (void)to; }
#endif

/* Called first thing on arrival in a context (after a jump returns, or at a fiber's entry):
 * remember where the context we came from can be resumed, and finish the tool hand-over. */
static inline void moor__switch_arrived(transfer_t t, moor__ctx *self)
{
    moor__ctx *from = (moor__ctx *)t.data;
    from->fctx = t.fctx;
#ifdef MOOR_ASAN_FIBERS
    const void *lo;
    size_t size;
    __sanitizer_finish_switch_fiber(self->asan_fake, &lo, &size);
    from->stack_lo = lo;
    from->stack_size = size;
#else
    (void)self;
#endif
}

/* Leave `from` for `to`; returns when something switches back to `from`. */
static inline void moor__switch(moor__ctx *from, moor__ctx *to)
{
    moor__fp_clear_flags(to);
#ifdef MOOR_ASAN_FIBERS
    __sanitizer_start_switch_fiber(&from->asan_fake, to->stack_lo, to->stack_size);
#endif
#ifdef MOOR_TSAN_FIBERS
    __tsan_switch_to_fiber(to->tsan_fiber, 0);
#endif
    transfer_t t = jump_fcontext(to->fctx, from);
    moor__switch_arrived(t, from);
}

/* Leave `from` for the last time: its stack may be reused as soon as `to` runs. */
__attribute__((noreturn)) static inline void moor__switch_final(moor__ctx *from, moor__ctx *to)
{
    moor__fp_clear_flags(to);
#ifdef MOOR_ASAN_FIBERS
    __sanitizer_start_switch_fiber(NULL, to->stack_lo, to->stack_size);
#endif
#ifdef MOOR_TSAN_FIBERS
    __tsan_switch_to_fiber(to->tsan_fiber, 0);
#endif
    jump_fcontext(to->fctx, from);
    __builtin_unreachable();
}

/* Prepare a fresh context on [lo, lo + size) that starts in fn. */
static inline void moor__ctx_make(moor__ctx *ctx, void *lo, size_t size, void (*fn)(transfer_t))
{
    ctx->fctx = make_fcontext((char *)lo + size, size, fn);
    ctx->stack_lo = lo;
    ctx->stack_size = size;
    ctx->asan_fake = NULL;
}

#endif
