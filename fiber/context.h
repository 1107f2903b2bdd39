/* The one place where moor switches stacks. Every switch between the executor and a fiber
 * goes through moor__switch (moor__switch_final too, when a fiber leaves for good), so this is
 * where the tools hook in: ASan's fiber annotations, TSan's fiber API, and the clearing of
 * the floating-point sticky flags that keeps jump_fcontext's MXCSR reload cheap. */
#ifndef MOOR_FIBER_CONTEXT_H
#define MOOR_FIBER_CONTEXT_H

#include <stddef.h>
#include <stdint.h>

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
    transfer_t (*entry)(transfer_t); /* run on top of it at its first switch (never returns) */
    int started;          /* it has run: it waits inside moor__switch, not at its entry */
    int finished;         /* it switches away for the last time (ASan forgets its stack) */
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
extern int moor__fp_frame_ok __attribute__((visibility("hidden")));

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

/* Leave `from` for `to`; returns when something switches back to `from`. Out of line on
 * purpose, see context.c: every context that waits, waits at the one call in here. */
void moor__switch(moor__ctx *from, moor__ctx *to);

/* Resume a context that waits in moor__switch, or start a fresh one by running its entry on
 * top of its stack; either way through the same ontop_fcontext call (see context.c). */
static inline transfer_t moor__jump(moor__ctx *from, moor__ctx *to)
{
    extern transfer_t moor__resume_ret(transfer_t t) __attribute__((visibility("hidden")));
    transfer_t (*fn)(transfer_t) = to->started ? moor__resume_ret : to->entry;
    to->started = 1;
    return ontop_fcontext(to->fctx, from, fn);
}

/* Leave `from` for the last time: its stack may be reused as soon as `to` runs. Through
 * moor__switch like every switch, so that the return-stack predictor stays in step. */
__attribute__((noreturn)) static inline void moor__switch_final(moor__ctx *from, moor__ctx *to)
{
    from->finished = 1;
    moor__switch(from, to);
    __builtin_unreachable();
}

/* A fresh context's initial frame, as make_fcontext builds it (registers to restore, the
 * floating-point control words, Boost's trampoline), when it is the same bytes whatever the
 * stack: then spawning copies it instead of calling make_fcontext, whose stmxcsr alone costs
 * several ns on some CPUs. Set up once by moor__ctx_template_init. */
#define MOOR__FRAME_MAX 128
typedef struct moor__ctx_template {
    size_t size; /* bytes below the 16-aligned top; 0: call make_fcontext each time */
    _Alignas(16) unsigned char bytes[MOOR__FRAME_MAX];
} moor__ctx_template;

extern moor__ctx_template moor__ctx_tmpl __attribute__((visibility("hidden")));
void moor__ctx_template_init(void) __attribute__((visibility("hidden")));
void moor__ctx_no_trampoline(transfer_t t) __attribute__((visibility("hidden")));

/* Prepare a fresh context on [lo, lo + size) that starts in `entry`, which receives the
 * transfer from whoever switched to it first and must never return. */
static inline void moor__ctx_make(moor__ctx *ctx, void *lo, size_t size,
                                  transfer_t (*entry)(transfer_t))
{
    char *top = (char *)(((uintptr_t)lo + size) & ~(uintptr_t)15);
    if (__builtin_expect(moor__ctx_tmpl.size == 64, 1)) { /* Boost's x86-64 frame: inline */
        __builtin_memcpy(top - 64, moor__ctx_tmpl.bytes, 64);
        ctx->fctx = top - 64;
    } else if (moor__ctx_tmpl.size != 0) {
        __builtin_memcpy(top - moor__ctx_tmpl.size, moor__ctx_tmpl.bytes, moor__ctx_tmpl.size);
        ctx->fctx = top - moor__ctx_tmpl.size;
    } else {
        ctx->fctx = make_fcontext((char *)lo + size, size, moor__ctx_no_trampoline);
    }
    ctx->entry = entry;
    ctx->stack_lo = lo;
    ctx->stack_size = size;
    ctx->asan_fake = NULL;
    ctx->started = 0;
    ctx->finished = 0;
}

#endif
