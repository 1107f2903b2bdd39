#include "context.h"

#include <stdint.h>

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
