/* Stack overflow diagnosis. A fiber that runs past the bottom of its stack touches its guard
 * and gets SIGSEGV; with the stack exhausted the handler can only run on an alternate signal
 * stack, which every executor thread gets. The handler names the fiber and aborts; a fault
 * anywhere else goes to whatever handled SIGSEGV before moor. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "executor.h"

#define ALTSTACK_SIZE (64u * 1024u)

static struct sigaction previous;

/* The executor of this thread, as the handler needs it: set at its thread init. */
static __thread moor_executor *thread_executor __attribute__((tls_model("initial-exec")));
static int installed;
static pthread_once_t install_once = PTHREAD_ONCE_INIT;

/* Async-signal-safe formatting: the handler may use nothing but write(). */
static size_t put_str(char *buf, size_t at, size_t cap, const char *s)
{
    while (*s && at < cap)
        buf[at++] = *s++;
    return at;
}

static size_t put_u64(char *buf, size_t at, size_t cap, uint64_t v)
{
    char digits[20];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && at < cap)
        buf[at++] = digits[--n];
    return at;
}

static void chain(int sig, siginfo_t *info, void *uctx)
{
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, uctx);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    } else {
        /* Default action: return with SIG_DFL in place and the fault happens again. */
        signal(sig, SIG_DFL);
    }
}

static int in_guard(const moor_executor *ex, const moor_fiber *f, const char *addr)
{
    return addr >= f->stack_base && addr < f->stack_base + ex->pool.guard;
}

/* The fiber whose guard holds addr. Usually the current one; but a fault inside a switch
 * happens on the leaving fiber's stack after the executor already names the next one as
 * current, so look at every live fiber then. Reads only: safe in a signal handler. */
static moor_fiber *guard_owner(const moor_executor *ex, const char *addr)
{
    if (ex->current && in_guard(ex, ex->current, addr))
        return ex->current;
    for (const moor__node *n = ex->fibers.head; n; n = n->next) {
        moor_fiber *f = moor_container_of(n, moor_fiber, link);
        if (in_guard(ex, f, addr))
            return f;
    }
    return NULL;
}

static void on_segv(int sig, siginfo_t *info, void *uctx)
{
    moor_executor *ex = thread_executor;
    moor_fiber *f = ex ? guard_owner(ex, info->si_addr) : NULL;
    if (!f) {
        chain(sig, info, uctx);
        return;
    }
    char msg[160];
    size_t n = 0;
    n = put_str(msg, n, sizeof msg, "moor: fiber ");
    n = put_u64(msg, n, sizeof msg, f->id);
    n = put_str(msg, n, sizeof msg, " \"");
    n = put_str(msg, n, sizeof msg, f->name[0] ? f->name : "fiber");
    n = put_str(msg, n, sizeof msg, "\" overflowed its ");
    n = put_u64(msg, n, sizeof msg, moor__fiber_stack_size(ex, f) / 1024);
    n = put_str(msg, n, sizeof msg, " KiB stack\n");
    ssize_t w = write(STDERR_FILENO, msg, n);
    (void)w;
    abort();
}

static void install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    installed = sigaction(SIGSEGV, &sa, &previous) == 0;
}

int moor__overflow_thread_init(moor_executor *ex)
{
    pthread_once(&install_once, install);
    if (!installed)
        return -errno;
    stack_t current;
    if (sigaltstack(NULL, &current) == 0 && !(current.ss_flags & SS_DISABLE)) {
        thread_executor = ex;
        return 0; /* the thread has one already: use it */
    }
    void *mem = mmap(NULL, ALTSTACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    if (mem == MAP_FAILED)
        return -ENOMEM;
    stack_t ss = {.ss_sp = mem, .ss_size = ALTSTACK_SIZE, .ss_flags = 0};
    if (sigaltstack(&ss, NULL) != 0) {
        int err = errno;
        munmap(mem, ALTSTACK_SIZE);
        return -err;
    }
    ex->altstack = mem;
    thread_executor = ex;
    return 0;
}

void moor__overflow_thread_fini(moor_executor *ex)
{
    thread_executor = NULL;
    if (!ex->altstack)
        return;
    stack_t ss = {.ss_sp = NULL, .ss_size = 0, .ss_flags = SS_DISABLE};
    sigaltstack(&ss, NULL);
    munmap(ex->altstack, ALTSTACK_SIZE);
    ex->altstack = NULL;
}
