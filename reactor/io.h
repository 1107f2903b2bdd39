/* The io future and the I/O calls built on it (io.c), for the other files of reactor/. */
#ifndef MOOR_REACTOR_IO_H
#define MOOR_REACTOR_IO_H

#include <stdint.h>

/* Wait until fd is ready, fd having just been used by a system call that returned EAGAIN or
 * EINPROGRESS (it is open: no fcntl). As moor_wait_fd otherwise. */
int moor__wait_fd_open(int fd, int events, int64_t deadline);

#endif
