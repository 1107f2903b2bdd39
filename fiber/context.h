/* The one place where moor switches stacks. Every switch between the executor and a fiber
 * goes through moor__switch (or moor__switch_last, when a fiber leaves for good), and every
 * arrival through moor__resume_ret or moor__switch_arrived, so this is where the tools hook
 * in (ASan's fiber annotations, TSan's fiber API) and where the floating-point sticky flags
 * are cleared that would make jump_fcontext's MXCSR reload slow. */
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

/* For the functions every switch, channel operation or spawn runs through: each starts a
 * cache line of its own. Where the linker happens to put them otherwise moves a channel round
 * trip or a spawn + join by 5-10% from one build to the next (measured on the development VM:
 * the same code, built with and without -falign-functions=64, and with and without this on
 * moor_spawn and moor_join), through how their code falls into the CPU's fetch blocks and
 * predictor entries. */
#define MOOR__HOT __attribute__((aligned(64)))

/* A place to resume: the executor's own stack, or a fiber's. */
typedef struct moor__ctx {
    fcontext_t fctx;      /* where to jump to resume it; set each time it switches away */
#ifdef MOOR_ASAN_FIBERS
    const void *stack_lo; /* lowest usable address; the executor's is learnt */
    size_t stack_size;    /* usable bytes from stack_lo */
    void *asan_fake;      /* ASan's fake stack of this context while it is switched away */
#endif
#ifdef MOOR_TSAN_FIBERS
    void *tsan_fiber;     /* TSan's fiber for this context */
#endif
    /* What ontop_fcontext runs on top of it when it is switched to: its entry (which never
     * returns) the first time, then moor__resume_ret, once it has switched away. The
     * entry sets that itself when it arrives (moor__ctx_started), so that a switch writes
     * nothing into the context it goes to. */
    transfer_t (*resume)(transfer_t);
} moor__ctx;

/* ontop_fcontext's function for a context that waits at a switch: records where the context
 * that switched to it resumes (moor__ctx_left), and returns to the resume address on top of
 * the stack (see context.c). */
transfer_t moor__resume_ret(transfer_t t) __attribute__((visibility("hidden")));

/* Floating-point state across switches. jump_fcontext stores the leaving side's MXCSR in
 * its saved frame and loads the arriving side's from its frame. On some CPUs loading a
 * value that differs from the current one costs ~100 ns, and any fiber that does floating
 * point sets sticky exception flags (MXCSR bits 0-5) that make the values differ. So moor
 * clears those flags in every saved frame: the context that arrives clears them in the frame
 * of the one it came from (moor__ctx_left), long before that frame is loaded again, and fresh
 * frames are made clean. Every value loaded then has clean flags, and equals the current one
 * unless the leaving side raised flags since it last arrived or the two really use different
 * rounding modes or masks.
 *
 * Reading the live MXCSR (stmxcsr) would be simpler but costs ~6 ns on some CPUs, as much
 * as half a raw switch; editing the saved frame is a load and a store. Clearing the frame a
 * switch goes to, just before the jump, cost ~2% of a channel round trip more than clearing
 * the one it came from: the jump's own MXCSR load then waits for that store. The frame layout
 * (MXCSR at offset 0 of the frame fctx points to) is Boost's on x86-64 and i386; moor checks
 * it once at startup (moor__fp_frame_check) and, should it ever differ, clears nothing: each
 * context then keeps its own flags, as Boost alone would, and a reload may be slow. */
#if defined(__x86_64__) || defined(__i386__)
#define MOOR__MXCSR_FLAGS 0x3fu
extern int moor__fp_frame_ok __attribute__((visibility("hidden")));

/* Returns whether the saved-frame layout is as expected; sets moor__fp_frame_ok. */
int moor__fp_frame_check(void);

/* Clear the sticky flags in a frame that is not running (one just left, or a fresh one).
 * Written only if some are set: most frames have none, and a store there would sit in the
 * store buffer when a short-lived fiber (spawned, run, joined) jumps back and its MXCSR load
 * reads the frame (measured: 8% of a spawn + join with the store, against none without). */
static inline void moor__fp_clean_frame(fcontext_t frame)
{
    unsigned int *saved_mxcsr = (unsigned int *)frame;
    if (__builtin_expect(*saved_mxcsr & MOOR__MXCSR_FLAGS, 0))
        *saved_mxcsr &= ~MOOR__MXCSR_FLAGS;
}

/* Clean a frame not running now (the one just left, on arrival; a fresh one), if the layout
 * is the one expected. */
static inline void moor__fp_clean_saved(fcontext_t frame)
{
    if (__builtin_expect(moor__fp_frame_ok, 1))
        moor__fp_clean_frame(frame);
}
#else
static inline int moor__fp_frame_check(void) { return 1; }
static inline void moor__fp_clean_saved(fcontext_t frame) { (void)frame; }
#endif

/* TSan and signals. TSan runs an application's signal handler late, at the next call into
 * one of its interceptors, in the fiber that was running when the signal came; with each
 * fiber a TSan fiber of its own, a signal that comes just before a switch waits for that
 * fiber to run again, maybe for ever (a SIGTERM a server never saw: test_chat). So under TSan
 * a switch blocks the signals that come from outside before it leaves (the call delivers any
 * that is pending on the leaving fiber) and the arrival puts the thread's mask back
 * (delivering to the arriving fiber whatever came meanwhile). Two system calls per switch,
 * only in TSan builds. */
#ifdef MOOR_TSAN_FIBERS
#include <pthread.h>
#include <signal.h>

extern __thread sigset_t moor__tsan_sigmask __attribute__((visibility("hidden")));

/* Every signal that comes from outside; not the ones a fault raises in the thread itself (a
 * blocked SIGSEGV kills the process without its handler: moor's overflow report). */
static inline void moor__tsan_signals_hold(void)
{
    sigset_t async;
    sigfillset(&async);
    sigdelset(&async, SIGSEGV);
    sigdelset(&async, SIGBUS);
    sigdelset(&async, SIGFPE);
    sigdelset(&async, SIGILL);
    sigdelset(&async, SIGTRAP);
    sigdelset(&async, SIGSYS);
    sigdelset(&async, SIGABRT);
    pthread_sigmask(SIG_BLOCK, &async, &moor__tsan_sigmask);
}

static inline void moor__tsan_signals_release(void)
{
    pthread_sigmask(SIG_SETMASK, &moor__tsan_sigmask, NULL);
}
#endif

/* On arrival in a context (in moor__resume_ret, or moor__switch_arrived): remember where the
 * context we came from can be resumed, and clean its frame's floating-point flags. The stack
 * it left is still mapped: whoever releases a finished fiber's stack runs after this. */
static inline void moor__ctx_left(transfer_t t)
{
    moor__ctx *from = (moor__ctx *)t.data;
    from->fctx = t.fctx;
    moor__fp_clean_saved(t.fctx);
}

/* Called first thing on arrival in a context where moor__resume_ret did not run (at a
 * fiber's entry; after moor__jump returns in a sanitizer build): moor__ctx_left, and finish
 * the tools' hand-over. */
static inline void moor__switch_arrived(transfer_t t, moor__ctx *self)
{
    moor__ctx_left(t);
#ifdef MOOR_TSAN_FIBERS
    moor__tsan_signals_release();
#endif
#ifdef MOOR_ASAN_FIBERS
    moor__ctx *from = (moor__ctx *)t.data;
    const void *lo;
    size_t size;
    __sanitizer_finish_switch_fiber(self->asan_fake, &lo, &size);
    from->stack_lo = lo;
    from->stack_size = size;
#else
    (void)self;
#endif
}

/* Leave `from` for `to`; returns when something switches back to `from`. A context that
 * waits, waits at its call of this (see context.c). */
void moor__switch(moor__ctx *from, moor__ctx *to);

/* Resume a context that waits at a switch, or start a fresh one by running its entry on top
 * of its stack; either way through ontop_fcontext (see context.c). */
static inline transfer_t moor__jump(moor__ctx *from, moor__ctx *to)
{
    return ontop_fcontext(to->fctx, from, to->resume);
}

/* First thing in a fresh context's entry, with moor__switch_arrived: from now on it is
 * resumed where it waits, at a switch. */
static inline void moor__ctx_started(moor__ctx *self)
{
    self->resume = moor__resume_ret;
}

/* What every switch does before its jump, in moor__switch and moor__switch_last alike: tell
 * ASan and TSan which stack runs next (for_good: `from` is never resumed, ASan may forget its
 * stack); under TSan, hold signals until the arrival. */
static inline __attribute__((always_inline)) void moor__switch_leave(moor__ctx *from,
                                                                    moor__ctx *to, int for_good)
{
#ifdef MOOR_ASAN_FIBERS
    __sanitizer_start_switch_fiber(for_good ? NULL : &from->asan_fake, to->stack_lo,
                                   to->stack_size);
#else
    (void)from;
    (void)to;
    (void)for_good;
#endif
#ifdef MOOR_TSAN_FIBERS
    moor__tsan_signals_hold();
    __tsan_switch_to_fiber(to->tsan_fiber, 0);
#endif
}

/* Leave `from` for the last time: its stack may be reused once `to` has arrived (which writes
 * into `from`'s context and, maybe, its saved frame: moor__ctx_left). To be used as
 * `return moor__switch_last(...)` at the end of a context's entry function, so that the
 * compiler makes the jump a tail call: the context then leaves without a call, as it came in
 * without one (ontop_fcontext jumps to the entry), and everything it did in between was
 * balanced calls and returns. The return-stack predictor holds exactly what it held when the
 * context was entered, which is what the context that entered it expects on its return: a
 * fiber spawned and joined (or run by the executor) hands back with every return predicted.
 * Through a call of moor__switch instead, the call would leave an entry that the resumed
 * side pops as its own, mispredicting (see context.c).
 *
 * moor__jump's call is written out here: called inline, gcc 12 copies the pair it returns
 * and makes a plain call. Without the tail call (an unoptimised build) it is still
 * correct: the pushed return address is never used. */
static inline __attribute__((always_inline)) transfer_t moor__switch_last(moor__ctx *from,
                                                                          moor__ctx *to)
{
    moor__switch_leave(from, to, 1);
    return ontop_fcontext(to->fctx, from, to->resume);
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
        moor__fp_clean_saved(ctx->fctx); /* the template's were cleaned once */
    }
    ctx->resume = entry;
#ifdef MOOR_ASAN_FIBERS
    ctx->stack_lo = lo;
    ctx->stack_size = size;
    ctx->asan_fake = NULL;
#endif
}

#endif
