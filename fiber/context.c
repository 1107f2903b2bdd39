#include "context.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Why switches resume through ontop_fcontext, and what that does to the return-stack
 * predictor.
 *
 * jump_fcontext is entered with a call (which pushes a return address on the CPU's
 * return-stack predictor) but leaves with an indirect jmp into the other context: the pushed
 * entry is never popped by its own ret. The resumed context's next ret then pops it and is
 * mispredicted, and so is every later ret of that context, each one off by one entry:
 * ~5 ns apiece, two or more per yield round trip, more than the switch itself.
 *
 * ontop_fcontext switches the same way but then jumps to a function with the resumed
 * context's return address on top of its stack: moor__resume_ret, whose ret pops the entry
 * the suspending side pushed, with the resumed side's resume address as its target. The
 * predictor stays in step: that ret is predicted when both sides switched from the same call
 * of moor__switch, and the rets that unwind moor_yield, a channel's wait and so on are
 * predicted whenever the two were suspended from the same call sites. Where they were not
 * (a driver and a worker in different functions), the first ret that differs is
 * mispredicted, once per switch, whatever the runtime (bench_switch's raw asym figure).
 *
 * moor__switch reaches ontop_fcontext by a tail call (a jmp), so a waiting context has no
 * frame in moor__switch and its resume address is just after its call of moor__switch:
 * moor__resume_ret, running on the resumed stack, records where the context that switched
 * can be resumed and cleans its frame's floating-point flags, which would otherwise take
 * moor__switch a frame and a second return. It stays out of line: inlined into its callers
 * (each then calling ontop_fcontext itself) it measured no faster and made them larger. Under
 * ASan and TSan moor__switch keeps its frame and makes a plain call: the sanitizers'
 * hand-over must be finished by code that runs after the jump returns. */
MOOR__HOT transfer_t moor__resume_ret(transfer_t t)
{
    moor__ctx_left(t);
    return t;
}

moor__ctx_template moor__ctx_tmpl;

#ifdef MOOR_TSAN_FIBERS
__thread sigset_t moor__tsan_sigmask;
#endif

/* Build a fresh frame on two stacks at different addresses; if the bytes are the same (no
 * pointer into the stack among them), keep them as the template. Run once, with the
 * thread's default floating-point control settings in force: fibers start with those. */
void moor__ctx_template_init(void)
{
    enum { SPAN = 2 * MOOR__FRAME_MAX };
    /* Zeroed: make_fcontext leaves some slots (registers restored at entry) unwritten. */
    _Alignas(16) unsigned char a[SPAN] = {0}, b[SPAN + 64] = {0};
    unsigned char *top_a = a + SPAN, *top_b = b + SPAN + 64;
    fcontext_t fa = make_fcontext(top_a, SPAN, moor__ctx_no_trampoline);
    fcontext_t fb = make_fcontext(top_b, SPAN + 64, moor__ctx_no_trampoline);
    size_t na = (size_t)(top_a - (unsigned char *)fa), nb = (size_t)(top_b - (unsigned char *)fb);
    if (na != nb || na > MOOR__FRAME_MAX || memcmp(fa, fb, na) != 0)
        return; /* position-dependent: make_fcontext every time */
    memcpy(moor__ctx_tmpl.bytes, fa, na);
#if defined(__x86_64__) || defined(__i386__)
    if (moor__fp_frame_ok) /* checked first (executor.c): fresh fibers start with no flags */
        moor__fp_clean_frame(moor__ctx_tmpl.bytes);
#endif
    moor__ctx_tmpl.size = na;
}

/* make_fcontext's own start path (a jump into a fresh context) is never taken: a fresh
 * context starts with its entry run on top of it (moor__jump). */
void moor__ctx_no_trampoline(transfer_t t)
{
    (void)t;
    abort();
}

MOOR__HOT __attribute__((noinline)) void moor__switch(moor__ctx *from, moor__ctx *to)
{
    moor__switch_leave(from, to, 0);
#if defined(MOOR_ASAN_FIBERS) || defined(MOOR_TSAN_FIBERS)
    transfer_t t = moor__jump(from, to);
    moor__switch_arrived(t, from);
#else
    (void)moor__jump(from, to); /* a tail call: see the top of this file */
#endif
}

#if defined(__x86_64__) || defined(__i386__)
int moor__fp_frame_ok;

static void never_entered(transfer_t t) { (void)t; }

/* make_fcontext stores the current MXCSR at offset 0 of the frame it returns and the x87
 * control word at offset 4, as jump_fcontext does when it leaves a context. Make a context
 * with a recognisable rounding mode in force and look. */
int moor__fp_frame_check(void)
{
    _Alignas(16) unsigned char stack[1024];
    unsigned int saved = _mm_getcsr();
    unsigned int probe = (saved & ~0x6000u) | 0x4000u; /* round up */
    _mm_setcsr(probe);
    fcontext_t ctx = make_fcontext(stack + sizeof stack, sizeof stack, never_entered);
    _mm_setcsr(saved);
    unsigned int *frame = (unsigned int *)ctx;
    int ok = (unsigned char *)ctx >= stack && (unsigned char *)ctx < stack + sizeof stack &&
             frame[0] == probe;
    moor__fp_frame_ok = ok;
    return ok;
}
#endif
