/* Misuse checks that stay on in every build: a message that names the misuse, then abort. */
#ifndef MOOR_FIBER_ASSERT_H
#define MOOR_FIBER_ASSERT_H

#include <stdio.h>
#include <stdlib.h>

#define moor__assert(cond, ...)                                                             \
    do {                                                                                    \
        if (__builtin_expect(!(cond), 0)) {                                                 \
            fprintf(stderr, "moor: ");                                                      \
            fprintf(stderr, __VA_ARGS__);                                                   \
            fprintf(stderr, " (%s:%d)\n", __FILE__, __LINE__);                              \
            abort();                                                                        \
        }                                                                                   \
    } while (0)

#endif
