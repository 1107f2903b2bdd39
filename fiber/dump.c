/* Introspection: moor_dump, the SIGQUIT dump, deadlock detection and the registry of future
 * kinds (see dump.h). Everything a dump line is made of is formatted here with plain stores
 * and written with write(2), so the same code serves moor_dump and the signal handler. */
#include "dump.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "executor.h"

/* ---- formatting: async-signal-safe ------------------------------------------------------ */

static void fmt_char(moor__fmt *f, char c)
{
    if (f->len + 1 < f->size) {
        f->buf[f->len++] = c;
        f->buf[f->len] = '\0';
    }
}

void moor__fmt_str(moor__fmt *f, const char *s)
{
    while (*s)
        fmt_char(f, *s++);
}

void moor__fmt_u64(moor__fmt *f, uint64_t v)
{
    char digits[20];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        fmt_char(f, digits[--n]);
}

void moor__fmt_i64(moor__fmt *f, int64_t v)
{
    if (v < 0) {
        fmt_char(f, '-');
        moor__fmt_u64(f, (uint64_t)0 - (uint64_t)v);
    } else {
        moor__fmt_u64(f, (uint64_t)v);
    }
}

void moor__fmt_ptr(moor__fmt *f, const void *p)
{
    uintptr_t v = (uintptr_t)p;
    char digits[2 * sizeof v];
    size_t n = 0;
    do {
        digits[n++] = "0123456789abcdef"[v & 0xf];
        v >>= 4;
    } while (v);
    moor__fmt_str(f, "0x");
    while (n)
        fmt_char(f, digits[--n]);
}

/* ---- future kinds ------------------------------------------------------------------------- */

/* Pushed lock-free, never unlinked: a reader (the signal handler too) walks it without a
 * lock and always sees a well-formed list. */
static moor_future_kind *kinds;

void moor_future_kind_register(moor_future_kind *kind)
{
    moor_future_kind *head = __atomic_load_n(&kinds, __ATOMIC_ACQUIRE);
    for (;;) {
        for (const moor_future_kind *k = head; k; k = k->next)
            if (k == kind)
                return;
        kind->next = head;
        if (__atomic_compare_exchange_n(&kinds, &head, kind, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return;
    }
}

/* The kind registered for ops, the first registered if several were (the list is LIFO). */
static const moor_future_kind *kind_of(const moor_future_ops *ops)
{
    const moor_future_kind *found = NULL;
    for (const moor_future_kind *k = __atomic_load_n(&kinds, __ATOMIC_ACQUIRE); k; k = k->next)
        if (k->ops == ops)
            found = k;
    return found;
}

int moor__future_describe(const moor_future *fut, char *buf, size_t size)
{
    moor__fmt out = moor__fmt_init(buf, size);
    const moor_future_ops *ops = fut->ops;
    if (!ops) {
        moor__fmt_str(&out, "?");
        return 0;
    }
    const moor_future_kind *k = kind_of(ops);
    if (k && k->describe) {
        int local = k->describe(fut, buf, size);
        if (size)
            buf[size - 1] = '\0'; /* whatever the describe did */
        return local == MOOR_WAIT_LOCAL ? MOOR_WAIT_LOCAL : 0;
    }
    moor__fmt_str(&out, ops->label ? ops->label : "?");
    return 0;
}

/* ---- deadlock detection ----------------------------------------------------------------- */

#define DESC_MAX 96

/* Does the idle task t wait on something only a task of its executor can complete? A fiber's
 * wait is the future it suspended on (NULL: unknown, so not local); a plain task's is its
 * own future. */
static int waits_locally(const moor_task *t)
{
    return t->fut && moor__future_describe(t->fut, NULL, 0) == MOOR_WAIT_LOCAL;
}

/* 1 if t can never run again on its own: it waits, on something local. Otherwise t is
 * remembered as the executor's hint, looked at first the next time. */
static int task_stuck(moor_executor *ex, moor_task *t)
{
    if (t->state == MOOR__TASK_IDLE && waits_locally(t))
        return 1;
    ex->live_hint = t;
    return 0;
}

int moor__deadlocked(moor_executor *ex)
{
    if (ex->ntasks == 0)
        return 0; /* nothing waits: the run is over, not stuck */
    /* A server has most of its fibers in non-local waits (fds): the one found last time
     * usually still is, and the walk below is skipped. */
    moor_task *hint = ex->live_hint;
    if (hint && hint->state != MOOR__TASK_FREE && !task_stuck(ex, hint))
        return 0;
    for (moor__node *n = ex->fibers.head; n; n = n->next) {
        moor_fiber *f = moor_container_of(n, moor_fiber, link);
        if (f->state == MOOR__FIBER_LIVE && !task_stuck(ex, &f->task))
            return 0;
    }
    for (size_t c = 0; c < ex->ntask_chunks; c++) {
        moor_task *slab = ex->task_chunks[c];
        for (size_t i = 0; i < MOOR__TASKS_PER_CHUNK; i++)
            if (slab[i].state != MOOR__TASK_FREE && !task_stuck(ex, &slab[i]))
                return 0;
    }
    if (ex->block_on_task.state != MOOR__TASK_FREE && !task_stuck(ex, &ex->block_on_task))
        return 0;
    ex->live_hint = NULL;
    return 1;
}

/* ---- the dump ----------------------------------------------------------------------------- */

#define LINE_MAX_ 256

/* Where lines go: a stdio stream (moor_dump), or an fd written with write(2) (signals). */
typedef struct sink {
    FILE *file;
    int fd;
} sink;

static void emit(const sink *s, moor__fmt *line)
{
    /* A cut line still ends its line. */
    if (line->len + 1 >= line->size)
        line->buf[line->len - 1] = '\n';
    else
        moor__fmt_str(line, "\n");
    if (s->file) {
        fputs(line->buf, s->file);
        return;
    }
    const char *p = line->buf;
    size_t left = line->len;
    while (left) {
        ssize_t n = write(s->fd, p, left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        p += n;
        left -= (size_t)n;
    }
}

/* How much of a stack's mapping above its guard is resident: from the lowest resident page
 * to the top of the mapping (where the control block and the first frames are). */
static size_t stack_touched(const moor_executor *ex, const moor_fiber *f)
{
    size_t page = moor__page_size();
    char *lo = f->stack_base + ex->pool.guard;
    char *hi = f->stack_base + f->map_size;
    unsigned char vec[256];
    for (char *p = lo; p < hi;) {
        size_t pages = (size_t)(hi - p) / page;
        if (pages > sizeof vec)
            pages = sizeof vec;
        if (mincore(p, pages * page, vec) < 0)
            return 0;
        for (size_t i = 0; i < pages; i++)
            if (vec[i] & 1)
                return (size_t)(hi - (p + i * page));
        p += pages * page;
    }
    return 0;
}

static const char *task_state(const moor_task *t)
{
    switch (t->state) {
    case MOOR__TASK_IDLE:
        return "waiting";
    case MOOR__TASK_RUNNING:
        return "running";
    case MOOR__TASK_SCHEDULED:
    case MOOR__TASK_NOTIFIED:
        return "ready";
    default:
        return "?";
    }
}

/* " waiting on <what> for <ms> ms" or " ready" ... */
static void fmt_task(moor__fmt *line, const moor_task *t, uint32_t now)
{
    moor__fmt_str(line, " ");
    moor__fmt_str(line, task_state(t));
    if (t->state != MOOR__TASK_IDLE)
        return;
    if (t->fut) {
        char desc[DESC_MAX];
        moor__future_describe(t->fut, desc, sizeof desc);
        moor__fmt_str(line, " on ");
        moor__fmt_str(line, desc);
    }
    moor__fmt_str(line, " for ");
    moor__fmt_u64(line, (uint32_t)(now - t->since));
    moor__fmt_str(line, " ms");
}

static void dump_fiber(const sink *s, const moor_executor *ex, const moor_fiber *f, uint32_t now)
{
    char buf[LINE_MAX_];
    moor__fmt line = moor__fmt_init(buf, sizeof buf);
    moor__fmt_str(&line, "  fiber ");
    moor__fmt_u64(&line, f->id);
    moor__fmt_str(&line, " \"");
    moor__fmt_str(&line, f->name[0] ? f->name : "fiber"); /* as moor_fiber_name */
    moor__fmt_str(&line, "\"");
    if (f->state == MOOR__FIBER_DONE)
        moor__fmt_str(&line, f->detached ? " done" : " done (not joined)");
    else
        fmt_task(&line, &f->task, now);
    if (f->cancelled)
        moor__fmt_str(&line, " (cancelled)");
    moor__fmt_str(&line, ", stack ");
    moor__fmt_u64(&line, moor__fiber_stack_size(ex, f) / 1024);
    moor__fmt_str(&line, " KiB, touched ");
    moor__fmt_u64(&line, stack_touched(ex, f) / 1024);
    moor__fmt_str(&line, " KiB");
    emit(s, &line);
}

static void dump_task(const sink *s, const moor_task *t, const char *what, uint32_t now)
{
    char buf[LINE_MAX_];
    moor__fmt line = moor__fmt_init(buf, sizeof buf);
    moor__fmt_str(&line, "  ");
    moor__fmt_str(&line, what);
    moor__fmt_str(&line, " ");
    moor__fmt_ptr(&line, t->fut);
    fmt_task(&line, t, now);
    emit(s, &line);
}

/* Bounds on what a dump walks: in a signal handler another thread may be changing the lists
 * under it, and a torn list must not loop forever. */
#define DUMP_FIBERS_MAX 10000000u

static void dump_executor(const sink *s, const moor_executor *ex)
{
    uint32_t now = (uint32_t)moor_now();
    size_t nfibers = 0;
    for (const moor__node *n = ex->fibers.head; n && nfibers < DUMP_FIBERS_MAX; n = n->next)
        nfibers++;
    char buf[LINE_MAX_];
    moor__fmt line = moor__fmt_init(buf, sizeof buf);
    moor__fmt_str(&line, "moor: executor ");
    moor__fmt_ptr(&line, ex);
    moor__fmt_str(&line, ": ");
    moor__fmt_u64(&line, ex->ntasks);
    moor__fmt_str(&line, " tasks, ");
    moor__fmt_u64(&line, nfibers);
    moor__fmt_str(&line, " fibers, ");
    moor__fmt_u64(&line, ex->timers.n);
    moor__fmt_str(&line, " timers, ");
    moor__fmt_u64(&line, moor__switches(ex));
    moor__fmt_str(&line, " switches, ");
    moor__fmt_u64(&line, ex->wakeups);
    moor__fmt_str(&line, " wakeups");
    emit(s, &line);
    size_t seen = 0;
    for (const moor__node *n = ex->fibers.head; n && seen < DUMP_FIBERS_MAX; n = n->next, seen++) {
        const moor_fiber *f = moor_container_of(n, moor_fiber, link);
        if (f->state != MOOR__FIBER_FREE)
            dump_fiber(s, ex, f, now);
    }
    void **chunks = ex->task_chunks;
    size_t nchunks = ex->ntask_chunks;
    for (size_t c = 0; chunks && c < nchunks; c++) {
        const moor_task *slab = chunks[c];
        for (size_t i = 0; i < MOOR__TASKS_PER_CHUNK; i++)
            if (slab[i].state != MOOR__TASK_FREE && slab[i].fut)
                dump_task(s, &slab[i], "task", now);
    }
    if (ex->block_on_task.state != MOOR__TASK_FREE && ex->block_on_task.fut)
        dump_task(s, &ex->block_on_task, "block_on", now);
}

void moor__dump_executor(const moor_executor *ex, FILE *out)
{
    dump_executor(&(sink){out, -1}, ex);
    fflush(out);
}

void moor__dump_deadlock(moor_executor *ex)
{
    fprintf(stderr, "moor: deadlock: every task waits on something only another task of this "
                    "executor could complete, and none can run (all fibers are asleep)\n");
    dump_executor(&(sink){stderr, -1}, ex);
    fflush(stderr);
}

/* ---- SIGQUIT -------------------------------------------------------------------------------- */

/* The live executors, for the SIGQUIT dump (on_sigquit): pushed at new, unlinked at
 * free under live_lock; the signal handler walks it without the lock, which is safe because
 * an executor's memory is never given back. */
static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static moor_executor *live_head;

void moor__live_add(moor_executor *ex)
{
    pthread_mutex_lock(&live_lock);
    ex->live_next = live_head;
    __atomic_store_n(&live_head, ex, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&live_lock);
}

void moor__live_remove(moor_executor *ex)
{
    pthread_mutex_lock(&live_lock);
    for (moor_executor **p = &live_head; *p; p = &(*p)->live_next) {
        if (*p == ex) {
            __atomic_store_n(p, ex->live_next, __ATOMIC_RELEASE);
            break;
        }
    }
    pthread_mutex_unlock(&live_lock);
}



static void on_sigquit(int signum)
{
    (void)signum;
    static int busy; /* a second SIGQUIT from another thread during a dump: skip it */
    if (__atomic_exchange_n(&busy, 1, __ATOMIC_ACQUIRE))
        return;
    int saved_errno = errno;
    sink s = {NULL, STDERR_FILENO};
    char buf[LINE_MAX_];
    moor__fmt line = moor__fmt_init(buf, sizeof buf);
    moor__fmt_str(&line, "moor: SIGQUIT: dump of every executor (read while they run: best "
                         "effort)");
    emit(&s, &line);
    for (moor_executor *ex = __atomic_load_n(&live_head, __ATOMIC_ACQUIRE); ex;
         ex = __atomic_load_n(&ex->live_next, __ATOMIC_ACQUIRE))
        if (__atomic_load_n(&ex->alive, __ATOMIC_RELAXED))
            dump_executor(&s, ex);
    errno = saved_errno;
    __atomic_store_n(&busy, 0, __ATOMIC_RELEASE);
}

int moor_dump_on_sigquit(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigquit;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART | SA_ONSTACK;
    return sigaction(SIGQUIT, &sa, NULL) < 0 ? -errno : 0;
}
