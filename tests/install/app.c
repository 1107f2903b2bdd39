/* Install test: an outside program that sees only the installed <moor.h> and library.
 *
 * Two fibers pass a token back and forth: "ping" may only advance it when it is even, "pong"
 * only when it is odd, and each yields while it is not its turn. Neither can finish unless
 * moor_yield really switches to the other one, so a broken install (wrong library, broken
 * context switch) shows up as a wrong value, not a pass. Each fiber returns how many times it
 * advanced the token; the two results must add up to the final token, 42.
 */
#include <moor.h>
#include <stdio.h>
#include <string.h>

#define ROUNDS 21           /* per fiber: 2 * 21 = 42 */
#define MAX_IDLE_YIELDS 1000 /* a fiber that never gets its turn gives up instead of spinning */

static const char *const names[2] = {"ping", "pong"};
static int token; /* advanced by ping when even, by pong when odd */

static intptr_t player(void *arg)
{
    const int parity = (int)(intptr_t)arg; /* 0 for ping, 1 for pong */
    int moves = 0;
    int idle = 0;
    char trail[ROUNDS]; /* lives on this fiber's stack across every yield */

    if (moor_self() == NULL || strcmp(moor_fiber_name(moor_self()), names[parity]) != 0)
        return -1000;
    while (moves < ROUNDS) {
        if (token % 2 == parity) {
            trail[moves] = (char)('a' + parity);
            token++;
            moves++;
            idle = 0;
        } else if (++idle > MAX_IDLE_YIELDS) {
            return -2000 - moves;
        }
        moor_yield();
    }
    for (int i = 0; i < ROUNDS; i++)
        if (trail[i] != 'a' + parity)
            return -3000;
    return moves;
}

int main(void)
{
    moor_executor *ex = NULL;
    int rc = moor_executor_new(&ex, NULL);
    if (rc < 0) {
        fprintf(stderr, "moor_executor_new: %s\n", moor_strerror(rc));
        return 1;
    }
    if (moor_executor_current() != ex || moor_self() != NULL) {
        fprintf(stderr, "moor_executor_current/moor_self wrong outside a fiber\n");
        return 1;
    }

    moor_fiber_attr ping_attr = {.name = names[0]};
    moor_fiber_attr pong_attr = {.name = names[1], .stack_size = 64 * 1024};
    moor_fiber *a = NULL, *b = NULL;
    if ((rc = moor_spawn(&a, player, (void *)(intptr_t)0, &ping_attr)) < 0 ||
        (rc = moor_spawn(&b, player, (void *)(intptr_t)1, &pong_attr)) < 0) {
        fprintf(stderr, "moor_spawn: %s\n", moor_strerror(rc));
        return 1;
    }
    if (moor_fiber_id(a) == moor_fiber_id(b)) {
        fprintf(stderr, "fibers share id %llu\n", (unsigned long long)moor_fiber_id(a));
        return 1;
    }

    intptr_t ra = -1, rb = -1;
    if (moor_join(a, &ra) != 0 || moor_join(b, &rb) != 0) {
        fprintf(stderr, "moor_join failed\n");
        return 1;
    }
    moor_executor_free(ex);

    if (ra != ROUNDS || rb != ROUNDS || token != 2 * ROUNDS) {
        fprintf(stderr, "moor install FAILED: ping=%ld pong=%ld token=%d\n", (long)ra, (long)rb,
                token);
        return 1;
    }
    printf("moor install ok: %ld\n", (long)(ra + rb));
    return 0;
}
