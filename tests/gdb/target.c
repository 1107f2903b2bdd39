/* The program test_gdb.sh points gdb at: fibers stopped in known places, so that the script's
 * listing and backtraces can be checked against what the program did.
 *
 * Main thread, in the order the executor runs them:
 *   "reader"  waiting: reader_outer -> reader_inner -> moor_chan_recv (nobody ever sends)
 *   "sleeper" waiting: sleeper_nap -> moor_sleep (a minute)
 *   "quick"   done: returned at once, not joined yet
 *   "yielder" ready: yielder_spin -> moor_yield, back on the run queue behind "stopper"
 *   "stopper" running: spawns "fresh", then stops the process in stop_here
 *   "fresh"   ready: spawned and never started
 * Thread "moor-t2", its own executor:
 *   "t2-waiter" waiting: t2_wait_outer -> t2_wait_inner -> moor_chan_recv (an hour's deadline)
 * Thread "plain", which never had an executor.
 *
 * How it stops, by argv[1]: "trap" raises SIGTRAP (for a run under gdb); "pause" prints
 * "ready <pid> <guard>" on stdout and waits for a signal (for gdb to attach, or gcore); "abort"
 * aborts (for the kernel's core dump). Either way the stop happens with the thread "moor-t2"
 * parked and its fiber suspended. The program is killed where it stands: nothing is freed.
 * argv[2], if given, is the guard of the stacks of both executors: "madvise" or "mprotect" (gdb's
 * gcore cannot read a mapping with MADV_GUARD_INSTALL guards in it). */
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "moor.h"

static moor_chan *never;    /* main thread: nobody sends on it */
static moor_chan *t2_never; /* thread moor-t2's */
static sem_t t2_parked;     /* posted once t2-waiter has suspended */
static sem_t plain_started;
static const char *mode;
static moor_executor_attr attr = {.guard = MOOR_GUARD_AUTO};
static volatile intptr_t sink; /* keeps the calls below out of tail position */

#define NOINLINE __attribute__((noinline, noclone))

static void must(int rc, const char *what)
{
    if (rc < 0) {
        fprintf(stderr, "target: %s: %s\n", what, strerror(-rc));
        exit(2);
    }
}

static NOINLINE int reader_inner(void)
{
    int v = 0;
    int rc = moor_chan_recv(never, &v, -1);
    sink += v;
    return rc;
}

static NOINLINE int reader_outer(void)
{
    int rc = reader_inner();
    sink += rc;
    return rc;
}

static intptr_t reader(void *arg)
{
    (void)arg;
    return reader_outer();
}

static NOINLINE int sleeper_nap(void)
{
    int rc = moor_sleep(moor_now() + 60000);
    sink += rc;
    return rc;
}

static intptr_t sleeper(void *arg)
{
    (void)arg;
    return sleeper_nap();
}

static intptr_t quick(void *arg)
{
    (void)arg;
    return 7;
}

static NOINLINE void yielder_spin(void)
{
    for (;;) {
        moor_yield();
        sink++;
    }
}

static intptr_t yielder(void *arg)
{
    (void)arg;
    yielder_spin();
    return 0;
}

static intptr_t fresh(void *arg)
{
    (void)arg;
    return 0;
}

/* Where the process stops, in the running fiber. */
static NOINLINE void stop_here(void)
{
    if (strcmp(mode, "trap") == 0) {
        raise(SIGTRAP);
    } else if (strcmp(mode, "abort") == 0) {
        abort();
    } else {
        printf("ready %d %s\n", (int)getpid(),
               moor_executor_guard(moor_executor_current()) == MOOR_GUARD_MADVISE ? "madvise"
                                                                                 : "mprotect");
        fflush(stdout);
        for (;;)
            pause();
    }
    sink++;
}

static intptr_t stopper(void *arg)
{
    (void)arg;
    must(moor_spawn(NULL, fresh, NULL, &(moor_fiber_attr){.name = "fresh"}), "spawn fresh");
    stop_here();
    return 0;
}

static NOINLINE int t2_wait_inner(void)
{
    int v = 0;
    /* With a deadline: a wait with a timer queued is never taken for a deadlock. */
    int rc = moor_chan_recv(t2_never, &v, moor_now() + 3600 * 1000);
    sink += v;
    return rc;
}

static NOINLINE int t2_wait_outer(void)
{
    int rc = t2_wait_inner();
    sink += rc;
    return rc;
}

static intptr_t t2_waiter(void *arg)
{
    (void)arg;
    return t2_wait_outer();
}

/* Runs after t2-waiter has suspended: the executor runs its fibers in order. */
static intptr_t t2_signal(void *arg)
{
    (void)arg;
    sem_post(&t2_parked);
    return 0;
}

static void *t2_main(void *arg)
{
    (void)arg;
    moor_executor *ex;
    must(moor_executor_new(&ex, &attr), "executor t2");
    must(moor_chan_new(&t2_never, sizeof(int), 0), "chan t2");
    must(moor_spawn(NULL, t2_waiter, NULL, &(moor_fiber_attr){.name = "t2-waiter"}), "spawn t2");
    must(moor_spawn(NULL, t2_signal, NULL, &(moor_fiber_attr){.name = "t2-signal"}), "spawn t2");
    moor_executor_run(ex); /* never returns: t2-waiter waits for ever */
    return NULL;
}

static void *plain_main(void *arg)
{
    (void)arg;
    sem_post(&plain_started);
    for (;;)
        pause();
    return NULL;
}

int main(int argc, char **argv)
{
    int usage = argc < 2 || argc > 3 ||
                (strcmp(argv[1], "trap") != 0 && strcmp(argv[1], "pause") != 0 &&
                 strcmp(argv[1], "abort") != 0);
    if (!usage && argc == 3) {
        if (strcmp(argv[2], "madvise") == 0)
            attr.guard = MOOR_GUARD_MADVISE;
        else if (strcmp(argv[2], "mprotect") == 0)
            attr.guard = MOOR_GUARD_MPROTECT;
        else
            usage = 1;
    }
    if (usage) {
        fprintf(stderr, "usage: %s trap|pause|abort [madvise|mprotect]\n", argv[0]);
        return 2;
    }
    mode = argv[1];
    sem_init(&t2_parked, 0, 0);
    sem_init(&plain_started, 0, 0);
    pthread_t t2, plain;
    if (pthread_create(&t2, NULL, t2_main, NULL) != 0 ||
        pthread_create(&plain, NULL, plain_main, NULL) != 0) {
        fprintf(stderr, "target: pthread_create failed\n");
        return 2;
    }
    pthread_setname_np(t2, "moor-t2");
    pthread_setname_np(plain, "plain");
    sem_wait(&t2_parked);
    sem_wait(&plain_started);

    moor_executor *ex;
    must(moor_executor_new(&ex, &attr), "executor");
    must(moor_chan_new(&never, sizeof(int), 0), "chan");
    moor_fiber *quick_f;
    must(moor_spawn(NULL, reader, NULL, &(moor_fiber_attr){.name = "reader"}), "spawn reader");
    must(moor_spawn(NULL, sleeper, NULL, &(moor_fiber_attr){.name = "sleeper"}), "spawn sleeper");
    must(moor_spawn(&quick_f, quick, NULL, &(moor_fiber_attr){.name = "quick"}), "spawn quick");
    must(moor_spawn(NULL, yielder, NULL, &(moor_fiber_attr){.name = "yielder"}), "spawn yielder");
    must(moor_spawn(NULL, stopper, NULL, &(moor_fiber_attr){.name = "stopper"}), "spawn stopper");
    moor_executor_run(ex); /* stops in stop_here; the test kills the process there */
    return 1;
}
