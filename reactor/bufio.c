/* Buffered I/O on top of io.c's calls: moor_writev_all, and the reader (moor_reader) that hands
 * out lines and exact runs of bytes from a buffer of fixed size, as Go's bufio.Reader does.
 * Every wait here is moor_read's or moor_writev's: they try the system call first, wait on
 * EAGAIN, spend the cooperative budget and see a cancel. This file only keeps the buffer.
 *
 * A reader's buffer between two calls:
 *
 *     buf              start              end                buf + cap
 *      | consumed bytes  | buffered bytes  | room for a read  |
 *
 * A read fills [end, cap) in one system call. When the line looked for (up to max bytes) could
 * not fit in [start, cap), the buffered bytes move to the front first. The buffer never
 * grows: a line longer than the limit is dropped as it arrives, never held, and `skipped`
 * remembers that the bytes coming next are the rest of such a line when a timeout or cancel
 * came before its '\n'. */
#include <errno.h>
#include <limits.h>
#include <string.h>

#include "fiber/alloc.h"
#include "fiber/assert.h"
#include "fiber/executor.h"
#include "moor.h"

/* ---- writing every byte of an iovec array ------------------------------------------------- */

/* After a partial write that ended inside an element, the rest goes out from a copy of the
 * elements that follow (at most this many), the first one advanced: the caller's array is
 * never written, and a fiber's stack holds 256 bytes, not IOV_MAX elements. */
#define WINDOW 16

ssize_t moor_writev_all(int fd, const struct iovec *iov, int iovcnt, size_t *written,
                        int64_t deadline)
{
    if (written)
        *written = 0;
    if (iovcnt < 0 || iovcnt > IOV_MAX)
        return -EINVAL;
    size_t total = 0;
    for (int i = 0; i < iovcnt; i++) {
        if (iov[i].iov_len > (size_t)SSIZE_MAX - total)
            return -EINVAL; /* the total could not be returned */
        total += iov[i].iov_len;
    }
    size_t done = 0;
    int i = 0;      /* the first element not written whole */
    size_t off = 0; /* bytes of iov[i] written */
    while (done < total) {
        while (off == iov[i].iov_len) { /* done with it, or empty; some element is not */
            i++;
            off = 0;
        }
        ssize_t n;
        if (off == 0) {
            n = moor_writev(fd, iov + i, iovcnt - i, deadline);
        } else {
            struct iovec win[WINDOW];
            int k = iovcnt - i < WINDOW ? iovcnt - i : WINDOW;
            memcpy(win, iov + i, (size_t)k * sizeof *win);
            win[0].iov_base = (char *)win[0].iov_base + off;
            win[0].iov_len -= off;
            n = moor_writev(fd, win, k, deadline);
        }
        if (n < 0) {
            if (written)
                *written = done;
            return n;
        }
        done += (size_t)n;
        for (size_t left = (size_t)n; left > 0;) { /* n never passes the end of the array */
            size_t rest = iov[i].iov_len - off;
            if (left < rest) {
                off += left;
                break;
            }
            left -= rest;
            i++;
            off = 0;
        }
    }
    if (written)
        *written = done;
    return (ssize_t)done;
}

/* ---- the reader ---------------------------------------------------------------------------- */

int moor_reader_init(moor_reader *r, int fd, size_t size)
{
    *r = (moor_reader){.fd = fd};
    if (size == 0)
        return -EINVAL;
    /* NULL above PTRDIFF_MAX, so every length in the buffer fits the ssize_t results. */
    r->buf = moor__alloc(size);
    if (!r->buf)
        return -ENOMEM;
    r->cap = size;
    return 0;
}

void moor_reader_free(moor_reader *r)
{
    moor__free(r->buf);
    *r = (moor_reader){.fd = r->fd};
}

size_t moor_reader_buffered(const moor_reader *r, const void **data)
{
    if (data)
        *data = r->buf ? r->buf + r->start : NULL;
    return r->end - r->start;
}

void moor_reader_consume(moor_reader *r, size_t n)
{
    moor__assert(n <= r->end - r->start,
                 "moor_reader_consume of %zu bytes on a reader of fd %d with %zu buffered", n,
                 r->fd, r->end - r->start);
    r->start += n;
}

/* Whether a read's error ends the stream, so that every later call returns it: not a deadline
 * that passed, a cancel, or a resource the event loop lacked, after which reading may work
 * again (and the bytes of a partial line stay buffered for it). A reset is final: the next
 * read(2) would report a clean end, and the line it cut must not pass for a last line. */
static int ends_stream(ssize_t err, int64_t deadline)
{
    switch (err) {
    case -ECANCELED:
    case -ENOMEM:
    case -EMFILE:
    case -ENFILE:
        return 0;
    case -ETIMEDOUT: /* moor's deadline, or the kernel's (TCP) timeout: the connection died */
        return deadline < 0 || moor_now() < deadline;
    default:
        return 1;
    }
}

/* One moor_read into p, counted in *reads. Returns the count (> 0), MOOR_EOF, or an error;
 * the end of the stream and the errors that end it are kept in r->state, and returned without
 * reading again. */
static ssize_t read_some(moor_reader *r, void *p, size_t len, int *reads, int64_t deadline)
{
    if (r->state)
        return r->state;
    (*reads)++;
    ssize_t n = moor_read(r->fd, p, len, deadline);
    if (n > 0)
        return n;
    if (n == 0)
        n = MOOR_EOF;
    if (ends_stream(n, deadline))
        r->state = (int)n;
    return n;
}

/* Read once into the room after the buffered bytes, which the caller made sure there is. */
static ssize_t fill(moor_reader *r, int *reads, int64_t deadline)
{
    ssize_t n = read_some(r, r->buf + r->end, r->cap - r->end, reads, deadline);
    if (n > 0)
        r->end += (size_t)n;
    return n;
}

/* Drop the rest of an over-long line, through its '\n' (or to the end of the stream). Returns
 * -EMSGSIZE with the count of every byte of the line, or the error of a read that came first;
 * then r->skipped keeps the count, and the next moor_read_line goes on from here. */
static ssize_t skip_line(moor_reader *r, size_t *discarded, int *reads, int64_t deadline)
{
    for (;;) {
        unsigned char *p = r->buf + r->start;
        size_t len = r->end - r->start;
        unsigned char *nl = memchr(p, '\n', len);
        size_t drop = nl ? (size_t)(nl - p) + 1 : len;
        r->start += drop;
        /* Saturates rather than wraps (it never gets back to 0, "not skipping"): an endless
         * line of 2^64 bytes is out of reach anyway. */
        r->skipped = drop > SIZE_MAX - r->skipped ? SIZE_MAX : r->skipped + drop;
        if (nl)
            break;
        r->start = r->end = 0;
        ssize_t n = fill(r, reads, deadline);
        if (n == MOOR_EOF)
            break; /* the line ended with the stream: the next call says MOOR_EOF */
        if (n < 0)
            return n;
    }
    if (discarded)
        *discarded = r->skipped;
    r->skipped = 0;
    return -EMSGSIZE;
}

/* The result of a call that may have been served from the buffer alone: like any call that
 * could wait but completes at once, it spends a unit of the cooperative budget (moor_read
 * spends its own), so that a fiber going through a full buffer of lines lets others run. */
static ssize_t spend(ssize_t rc, int reads)
{
    if (reads == 0)
        moor__coop_spend();
    return rc;
}

ssize_t moor_read_line(moor_reader *r, const char **line, size_t max, size_t *discarded,
                       int64_t deadline)
{
    moor__assert(r->buf, "moor_read_line on a reader of fd %d that is not initialised", r->fd);
    *line = NULL;
    if (discarded)
        *discarded = 0;
    if (max == 0)
        max = r->cap;
    if (max > r->cap)
        return -EINVAL;
    int reads = 0;
    if (r->skipped) {
        ssize_t rc = skip_line(r, discarded, &reads, deadline);
        return spend(rc, reads);
    }
    size_t scanned = 0; /* bytes of the line searched for a '\n' by this call */
    for (;;) {
        unsigned char *p = r->buf + r->start;
        size_t len = r->end - r->start;
        size_t upto = len < max ? len : max;
        unsigned char *nl = memchr(p + scanned, '\n', upto - scanned);
        if (nl) {
            size_t n = (size_t)(nl - p);
            r->start += n + 1;
            if (n > 0 && p[n - 1] == '\r')
                n--;
            *line = (const char *)p;
            return spend((ssize_t)n, reads);
        }
        scanned = upto;
        if (len >= max) { /* no '\n' within max bytes */
            ssize_t rc = skip_line(r, discarded, &reads, deadline);
            return spend(rc, reads);
        }
        if (len == 0) {
            r->start = r->end = 0;
        } else if (r->cap - r->start < max) { /* a line of max bytes would not fit after start */
            memmove(r->buf, p, len);
            r->start = 0;
            r->end = len;
        }
        ssize_t n = fill(r, &reads, deadline);
        if (n == MOOR_EOF && len > 0) { /* a last line without its '\n' */
            *line = (const char *)r->buf + r->start;
            r->start = r->end;
            return spend((ssize_t)len, reads);
        }
        if (n < 0)
            return spend(n, reads);
    }
}

ssize_t moor_read_exact(moor_reader *r, void *dst, size_t len, size_t *got, int64_t deadline)
{
    moor__assert(r->buf, "moor_read_exact on a reader of fd %d that is not initialised", r->fd);
    unsigned char *d = dst;
    size_t done = 0;
    int reads = 0;
    ssize_t rc = (ssize_t)len;
    if (len > SSIZE_MAX)
        rc = -EINVAL;
    while (rc >= 0 && done < len) {
        size_t have = r->end - r->start;
        if (have > 0) {
            size_t take = have < len - done ? have : len - done;
            memcpy(d + done, r->buf + r->start, take);
            r->start += take;
            done += take;
            continue;
        }
        r->start = r->end = 0;
        ssize_t n;
        if (len - done >= r->cap) { /* the buffer would only be copied through */
            n = read_some(r, d + done, len - done, &reads, deadline);
            if (n > 0)
                done += (size_t)n;
        } else {
            n = fill(r, &reads, deadline);
        }
        if (n == MOOR_EOF)
            rc = done ? -EPIPE : MOOR_EOF;
        else if (n < 0)
            rc = n;
    }
    if (got)
        *got = done;
    return rc == -EINVAL || len == 0 ? rc : spend(rc, reads);
}
