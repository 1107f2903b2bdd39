/* Introspection (dump.c), below the executor: it reads the executor's structures and calls
 * none of executor.c's functions, so that the run loop can call it. What moor_dump prints,
 * the SIGQUIT dump, deadlock detection, and the registry of future kinds that names a wait
 * with its argument. The formatting helpers below are async-signal-safe (plain stores into a
 * caller's buffer), so that the describe ops of moor's own future types can run in the
 * SIGQUIT handler. */
#ifndef MOOR_FIBER_DUMP_H
#define MOOR_FIBER_DUMP_H

#include <stddef.h>
#include <stdio.h>
#include <stdint.h>

#include "moor.h"

/* A bounded string being built: always NUL-terminated, silently cut at its size. Size 0
 * (buf NULL) writes nothing: a describe asked only whether its wait is local. */
typedef struct moor__fmt {
    char *buf;
    size_t size; /* bytes of buf, the NUL included; 0: nothing is written */
    size_t len;
} moor__fmt;

static inline moor__fmt moor__fmt_init(char *buf, size_t size)
{
    if (size)
        buf[0] = '\0';
    return (moor__fmt){buf, size, 0};
}

void moor__fmt_str(moor__fmt *f, const char *s);
void moor__fmt_u64(moor__fmt *f, uint64_t v);
void moor__fmt_i64(moor__fmt *f, int64_t v);
void moor__fmt_ptr(moor__fmt *f, const void *p); /* 0x... */

/* Describe a pending future into buf: its kind's describe, or its label alone. Returns
 * MOOR_WAIT_LOCAL if only a task of its executor can complete it, else 0. With size 0 (buf
 * NULL) only the answer is wanted: cheaper (an fd wait then makes no system call). */
int moor__future_describe(const moor_future *fut, char *buf, size_t size);

/* Deadlock detection, called by the run loop when nothing is runnable, no timer is queued,
 * nothing came from other threads, no hold and no foreign loop: 1 if every task waits on
 * something local (then no task can ever run again), else 0. */
int moor__deadlocked(moor_executor *ex);

/* The deadlock report on stderr: a first line that says so, then the dump. */
void moor__dump_deadlock(moor_executor *ex);

/* The dump of one executor (moor_dump's body, for the calling thread's). */
void moor__dump_executor(const moor_executor *ex, FILE *out);

/* The live executors, which the SIGQUIT dump walks: an executor is added when it is made and
 * removed when it is freed (moor_executor.live_next links them). */
void moor__live_add(moor_executor *ex);
void moor__live_remove(moor_executor *ex);

#endif
