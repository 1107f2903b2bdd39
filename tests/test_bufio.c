/* Buffered I/O (reactor/bufio.c): moor_reader's lines, exact reads and buffered bytes, and
 * moor_writev_all, over socketpairs and loopback TCP only.
 *
 * Lines arrive split across reads (a writer fiber that waits until the reader has taken each
 * piece, so every split really happens), at the limit and past it, longer than the buffer,
 * cut by the end of the stream, by a reset, by a deadline and by a cancel. writev_all writes
 * to a socket with a small send buffer drained by a slow reader, so that its writes end in
 * the middle of elements. Sizes near SIZE_MAX are refused without a system call.
 *
 * The test's own code reads and asserts in plain code (moor's calls run the executor there);
 * fibers check with FCHECK. */
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cmocka.h>

#include "moor.h"

#include "fixture.h"

/* ---- helpers -------------------------------------------------------------------------------- */

static void reader_new(moor_reader *r, int fd, size_t size)
{
    assert_int_equal(moor_reader_init(r, fd, size), 0);
    assert_int_equal(r->cap, size);
}

/* Bytes in fd's receive queue, not yet read. */
static int queued(int fd)
{
    int q = 0;
    FCHECK(ioctl(fd, FIONREAD, &q) == 0);
    return q;
}

/* A writer fiber: data in pieces of `chunk` bytes (or random sizes 1..chunk with a seed),
 * each written only once the reader has read every byte before it, so that no two pieces
 * arrive in one read. Then, with `shut`, the end of the stream. */
typedef struct feed {
    int wfd, rfd;
    const char *data;
    size_t len;
    size_t chunk;
    uint32_t seed; /* 0: every piece `chunk` bytes */
    int shut;
} feed;

static intptr_t feed_fn(void *arg)
{
    feed *f = arg;
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    uint32_t s = f->seed;
    for (size_t off = 0; off < f->len;) {
        size_t n = f->seed ? 1 + rnd(&s) % f->chunk : f->chunk;
        if (n > f->len - off)
            n = f->len - off;
        FCHECK(moor_write_all(f->wfd, f->data + off, n, NULL, deadline) == (ssize_t)n);
        off += n;
        while (queued(f->rfd) > 0 && moor_now() < deadline)
            FCHECK(moor_sleep(moor_deadline_in(1)) == 0);
    }
    if (f->shut)
        FCHECK(shutdown(f->wfd, SHUT_WR) == 0);
    return 0;
}

static moor_fiber *feed_start(feed *f)
{
    moor_fiber *fib;
    assert_int_equal(moor_spawn(&fib, feed_fn, f, NULL), 0);
    return fib;
}

static void feed_join(moor_fiber *fib)
{
    intptr_t r = -1;
    assert_int_equal(moor_join(fib, &r), 0);
    assert_int_equal(r, 0);
}

/* Read a line with limit max (0: the buffer's) and expect `want` (its length given, as lines
 * may hold any byte). */
#define expect_line_n(r, max, want, len) expect_line_at(r, max, want, len, __FILE__, __LINE__)
#define expect_line(r, want) expect_line_n(r, 0, want, strlen(want))

static void expect_line_at(moor_reader *r, size_t max, const char *want, size_t len,
                           const char *file, int line)
{
    const char *got = NULL;
    size_t discarded = 99;
    ssize_t n = moor_read_line(r, &got, max, &discarded, moor_deadline_in(SAFETY_MS));
    if (n != (ssize_t)len || !got || memcmp(got, want, len) != 0 || discarded != 0) {
        print_message("expected the line \"%.*s\" (%zu bytes), got %zd (%s) \"%.*s\", "
                      "discarded %zu\n", (int)len, want, len, n, n < 0 ? moor_strerror((int)n) : "",
                      n > 0 && got ? (int)n : 0, got ? got : "", discarded);
        _fail(file, line);
    }
}

/* Read a line and expect an error (MOOR_EOF, -EMSGSIZE, ...) with *discarded as given. */
#define expect_line_err(r, max, err, disc) expect_line_err_at(r, max, err, disc, __FILE__, __LINE__)

static void expect_line_err_at(moor_reader *r, size_t max, ssize_t err, size_t disc,
                               const char *file, int line)
{
    const char *got = "x";
    size_t discarded = 99;
    ssize_t n = moor_read_line(r, &got, max, &discarded, moor_deadline_in(SAFETY_MS));
    if (n != err || discarded != disc || got != NULL) {
        print_message("expected %zd (%s) with %zu discarded, got %zd (%s) with %zu discarded\n",
                      err, moor_strerror((int)err), disc, n,
                      n < 0 ? moor_strerror((int)n) : "a line", discarded);
        _fail(file, line);
    }
}

static char *repeat(char c, size_t n, const char *tail)
{
    size_t t = strlen(tail);
    char *s = malloc(n + t + 1);
    assert_non_null(s);
    memset(s, c, n);
    memcpy(s + n, tail, t + 1);
    return s;
}

/* ---- lines ------------------------------------------------------------------------------------ */

/* Every byte in a read of its own: lines come together across many reads, with '\r\n' and an
 * empty line. */
static void test_bufio_lines_split_across_reads(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 64);
    static const char data[] = "first line\r\nsecond\n\nthird\r\n\r\nlast";
    feed f = {sv[1], sv[0], data, sizeof data - 1, 1, 0, 1};
    moor_fiber *fib = feed_start(&f);
    expect_line(&r, "first line");
    expect_line(&r, "second");
    expect_line(&r, "");
    expect_line(&r, "third");
    expect_line(&r, "");
    expect_line(&r, "last");
    expect_line_err(&r, 0, MOOR_EOF, 0);
    feed_join(fib);
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

/* Hundreds of lines of every length up to the buffer's size ('\n' or '\r\n' counted), in pieces
 * of random sizes: lines start anywhere in the buffer, so a line that does not fit in the room
 * after it must be moved to the front, and a line of the buffer's size must still be read. */
static void test_bufio_lines_random_pieces_fill_the_buffer(void **state)
{
    (void)state;
    enum { CAP = 32, LINES = 400 };
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], CAP);
    char *data = malloc(LINES * (CAP + 1));
    size_t lens[LINES], offs[LINES], len = 0;
    assert_non_null(data);
    uint32_t s = 12345;
    for (int i = 0; i < LINES; i++) {
        int crlf = rnd(&s) % 3 == 0;
        size_t n = rnd(&s) % (CAP - (size_t)crlf); /* n + '\r'? + '\n' <= CAP */
        if (i % 50 == 7)
            n = CAP - 1 - (size_t)crlf; /* exactly the limit */
        offs[i] = len;
        lens[i] = n;
        for (size_t k = 0; k < n; k++)
            data[len++] = (char)('a' + (i + (int)k) % 26);
        if (crlf)
            data[len++] = '\r';
        data[len++] = '\n';
    }
    feed f = {sv[1], sv[0], data, len, 45, 777, 1};
    moor_fiber *fib = feed_start(&f);
    for (int i = 0; i < LINES; i++)
        expect_line_n(&r, 0, data + offs[i], lens[i]);
    expect_line_err(&r, 0, MOOR_EOF, 0);
    feed_join(fib);
    free(data);
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

/* The limit counts the line's '\r\n': a line of max bytes is read, one byte more is dropped
 * through its '\n' and counted, and the next line is read as if nothing happened. Once with
 * everything in one read (the '\n' of the long line already buffered past the limit), once
 * byte by byte. */
static void test_bufio_line_at_limit_and_one_over(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    char *at = repeat('a', 15, "\n");       /* 16 bytes */
    char *over = repeat('b', 16, "\n");     /* 17 */
    char *at_cr = repeat('c', 14, "\r\n");  /* 16 */
    char *over_cr = repeat('d', 15, "\r\n"); /* 17 */
    char data[128];
    snprintf(data, sizeof data, "%s%sok\n%s%snext\n", at, over, at_cr, over_cr);
    for (size_t chunk = 1; chunk <= sizeof data; chunk += sizeof data - 1) {
        int sv[2];
        stream_pair(sv);
        moor_reader r;
        reader_new(&r, sv[0], 16);
        feed f = {sv[1], sv[0], data, strlen(data), chunk, 0, 1};
        moor_fiber *fib = feed_start(&f);
        expect_line_n(&r, 0, at, 15);
        expect_line_err(&r, 0, -EMSGSIZE, 17);
        expect_line(&r, "ok");
        expect_line_n(&r, 0, at_cr, 14);
        expect_line_err(&r, 0, -EMSGSIZE, 17);
        expect_line(&r, "next");
        expect_line_err(&r, 0, MOOR_EOF, 0);
        feed_join(fib);
        moor_reader_free(&r);
        close(sv[0]);
        close(sv[1]);
    }
    free(at);
    free(over);
    free(at_cr);
    free(over_cr);
    ex_free(ex);
}

/* A limit below the buffer's size: the '\n' of the over-long line is buffered after the
 * limit, and the lines after it too; only the long line goes. */
static void test_bufio_line_limit_below_buffer_size(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 64);
    static const char data[] = "abcd\nabcde\nxy\nabcd\r\n";
    assert_int_equal(write(sv[1], data, sizeof data - 1), (ssize_t)sizeof data - 1);
    expect_line_n(&r, 5, "abcd", 4);
    expect_line_err(&r, 5, -EMSGSIZE, 6);
    expect_line_n(&r, 5, "xy", 2);
    expect_line_err(&r, 5, -EMSGSIZE, 6); /* "abcd\r\n" is 6 bytes with its '\r' */
    close(sv[1]);
    expect_line_err(&r, 5, MOOR_EOF, 0);
    moor_reader_free(&r);
    close(sv[0]);
    ex_free(ex);
}

/* A line many times the buffer's size, arriving in pieces: dropped as it comes, every byte
 * counted, and the line after it read. An over-long last line without '\n' is counted up to
 * the end of the stream, then MOOR_EOF. */
static void test_bufio_line_longer_than_buffer(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 16);
    char *longl = repeat('x', 100, "\nnext\n");
    char *tail = repeat('y', 40, "");
    char data[256];
    snprintf(data, sizeof data, "%s%s", longl, tail);
    feed f = {sv[1], sv[0], data, strlen(data), 7, 0, 1};
    moor_fiber *fib = feed_start(&f);
    expect_line_err(&r, 0, -EMSGSIZE, 101);
    expect_line(&r, "next");
    expect_line_err(&r, 0, -EMSGSIZE, 40);
    expect_line_err(&r, 0, MOOR_EOF, 0);
    feed_join(fib);
    free(longl);
    free(tail);
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

/* ---- the end of the stream ------------------------------------------------------------------ */

/* A last line without its '\n' is a line (as it is, a lone '\r' kept), then MOOR_EOF, and
 * MOOR_EOF again. */
static void test_bufio_eof_mid_line(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    for (int variant = 0; variant < 2; variant++) {
        int sv[2];
        stream_pair(sv);
        moor_reader r;
        reader_new(&r, sv[0], 32);
        const char *data = variant ? "abc\npartial" : "abc\nx\r";
        feed f = {sv[1], sv[0], data, strlen(data), 3, 0, 1};
        moor_fiber *fib = feed_start(&f);
        expect_line(&r, "abc");
        expect_line(&r, variant ? "partial" : "x\r");
        expect_line_err(&r, 0, MOOR_EOF, 0);
        expect_line_err(&r, 0, MOOR_EOF, 0);
        feed_join(fib);
        moor_reader_free(&r);
        close(sv[0]);
        close(sv[1]);
    }
    ex_free(ex);
}

static void test_bufio_eof_at_line_boundary(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 32);
    feed f = {sv[1], sv[0], "abc\ndef\n", 8, 4, 0, 1};
    moor_fiber *fib = feed_start(&f);
    expect_line(&r, "abc");
    expect_line(&r, "def");
    expect_line_err(&r, 0, MOOR_EOF, 0);
    expect_line_err(&r, 0, MOOR_EOF, 0);
    feed_join(fib);
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

/* An empty line is 0 with a line pointer; the end is MOOR_EOF; a stream that ends at once is
 * MOOR_EOF at once. */
static void test_bufio_empty_line_is_not_eof(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 32);
    assert_int_equal(write(sv[1], "\n\r\n", 3), 3);
    assert_int_equal(shutdown(sv[1], SHUT_WR), 0);
    expect_line(&r, "");
    expect_line(&r, "");
    expect_line_err(&r, 0, MOOR_EOF, 0);
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);

    stream_pair(sv);
    reader_new(&r, sv[0], 32);
    close(sv[1]);
    expect_line_err(&r, 0, MOOR_EOF, 0);
    moor_reader_free(&r);
    close(sv[0]);
    ex_free(ex);
}

/* ---- a reset, a deadline, a cancel --------------------------------------------------------- */

static intptr_t reset_fn(void *arg)
{
    int fd = (int)(intptr_t)arg;
    FCHECK(moor_sleep(moor_deadline_in(20)) == 0); /* the reader has read "hel" and waits */
    struct linger lg = {1, 0};
    FCHECK(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0);
    FCHECK(moor_close(fd) == 0); /* linger 0: an RST, not a FIN */
    return 0;
}

/* A peer that resets in the middle of a line: -ECONNRESET, and again on the next call (the
 * next read(2) would say end of stream: the cut line must not come out as a last line). */
static void test_bufio_peer_reset(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    int l = moor_tcp_listen("127.0.0.1", 0, 4);
    assert_true(l >= 0);
    int port = moor_socket_port(l);
    assert_true(port > 0);
    int a = moor_tcp_connect("127.0.0.1", port, deadline);
    assert_true(a >= 0);
    int b = moor_accept(l, NULL, NULL, deadline);
    assert_true(b >= 0);
    assert_int_equal(moor_close(l), 0);

    moor_reader r;
    reader_new(&r, a, 64);
    assert_int_equal(moor_write_all(b, "one\nhel", 7, NULL, deadline), 7);
    moor_fiber *fib;
    assert_int_equal(moor_spawn(&fib, reset_fn, (void *)(intptr_t)b, NULL), 0);
    expect_line(&r, "one");
    expect_line_err(&r, 0, -ECONNRESET, 0);
    expect_line_err(&r, 0, -ECONNRESET, 0);
    const void *data;
    assert_int_equal(moor_reader_buffered(&r, &data), 3); /* kept, never a line */
    assert_memory_equal(data, "hel", 3);
    assert_int_equal(moor_join(fib, NULL), 0);
    moor_reader_free(&r);
    assert_int_equal(moor_close(a), 0);
    ex_free(ex);
}

/* A deadline in the middle of a line: -ETIMEDOUT (not before it), the bytes stay buffered,
 * and once the rest arrives the whole line is returned. */
static void test_bufio_deadline_mid_line(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 32);
    assert_int_equal(write(sv[1], "hel", 3), 3);
    const char *line = "x";
    size_t discarded = 99;
    int64_t t0 = moor_now();
    assert_int_equal(moor_read_line(&r, &line, 0, &discarded, moor_deadline_in(WAIT_MS)),
                     -ETIMEDOUT);
    assert_true(moor_now() - t0 >= WAIT_MS);
    assert_null(line);
    assert_int_equal(discarded, 0);
    const void *data;
    assert_int_equal(moor_reader_buffered(&r, &data), 3);
    assert_memory_equal(data, "hel", 3);
    assert_int_equal(write(sv[1], "lo\r\nnext\n", 9), 9);
    expect_line(&r, "hello");
    expect_line(&r, "next");
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

/* A deadline while an over-long line is being dropped: -ETIMEDOUT, and the next call goes on
 * dropping the same line (its rest is not taken for a line), then counts all of it. */
static void test_bufio_deadline_mid_long_line(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 8);
    char *z = repeat('z', 20, "");
    assert_int_equal(write(sv[1], z, 20), 20);
    const char *line = "x";
    size_t discarded = 99;
    assert_int_equal(moor_read_line(&r, &line, 0, &discarded, moor_deadline_in(WAIT_MS)),
                     -ETIMEDOUT);
    assert_int_equal(discarded, 0);
    assert_int_equal(write(sv[1], "zz\nnext\n", 8), 8);
    expect_line_err(&r, 0, -EMSGSIZE, 23);
    expect_line(&r, "next");
    free(z);
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

typedef struct line_call {
    moor_reader *r;
    int entered;
    ssize_t rc;
} line_call;

static intptr_t line_call_fn(void *arg)
{
    line_call *c = arg;
    const char *line;
    c->entered = 1;
    c->rc = moor_read_line(c->r, &line, 0, NULL, -1);
    return 0;
}

/* A cancel in the middle of a line: -ECANCELED, the bytes stay buffered, and the next call
 * (here from plain code) returns the whole line once the rest arrives. */
static void test_bufio_cancel_mid_line(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 32);
    assert_int_equal(write(sv[1], "hel", 3), 3);
    line_call c = {&r, 0, 1};
    moor_fiber *fib;
    assert_int_equal(moor_spawn(&fib, line_call_fn, &c, NULL), 0);
    assert_int_equal(moor_sleep(moor_deadline_in(10)), 0); /* it reads "hel" and waits */
    assert_int_equal(c.entered, 1);
    assert_int_equal(c.rc, 1); /* still in moor_read_line */
    moor_cancel(fib);
    assert_int_equal(moor_join(fib, NULL), -ECANCELED);
    assert_int_equal(c.rc, -ECANCELED);
    const void *data;
    assert_int_equal(moor_reader_buffered(&r, &data), 3);
    assert_memory_equal(data, "hel", 3);
    assert_int_equal(write(sv[1], "lo\n", 3), 3);
    expect_line(&r, "hello");
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

/* ---- fairness ------------------------------------------------------------------------------- */

static int spinner_stop;
static unsigned spinner_turns;

static intptr_t spinner_fn(void *arg)
{
    (void)arg;
    while (!spinner_stop) {
        spinner_turns++;
        moor_yield();
    }
    return 0;
}

typedef struct line_eater {
    moor_reader *r;
    int lines;
    unsigned turns_seen; /* the spinner's turns once every line was read */
} line_eater;

static intptr_t line_eater_fn(void *arg)
{
    line_eater *e = arg;
    unsigned before = spinner_turns;
    for (int i = 0; i < e->lines; i++) {
        const char *line;
        FCHECK(moor_read_line(e->r, &line, 0, NULL, moor_deadline_in(SAFETY_MS)) == 1);
    }
    e->turns_seen = spinner_turns - before;
    return 0;
}

/* Lines served from the buffer spend the cooperative budget as any call that completes at
 * once does: a fiber going through 400 buffered lines (one read) lets the others run. */
static void test_bufio_buffered_lines_spend_the_budget(void **state)
{
    (void)state;
    enum { LINES = 400 };
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 2 * LINES);
    char data[2 * LINES];
    for (int i = 0; i < LINES; i++)
        memcpy(data + 2 * i, "x\n", 2);
    assert_int_equal(write(sv[1], data, sizeof data), (ssize_t)sizeof data);
    spinner_stop = 0;
    spinner_turns = 0;
    line_eater e = {&r, LINES, 0};
    moor_fiber *spin, *eat;
    assert_int_equal(moor_spawn(&spin, spinner_fn, NULL, NULL), 0);
    assert_int_equal(moor_spawn(&eat, line_eater_fn, &e, NULL), 0);
    assert_int_equal(moor_join(eat, NULL), 0);
    spinner_stop = 1;
    assert_int_equal(moor_join(spin, NULL), 0);
    assert_true(e.turns_seen >= 2); /* 400 calls, one read: the budget of 128 ran out */
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

/* ---- exact reads, buffered bytes ------------------------------------------------------------ */

static unsigned char pat(size_t i) { return (unsigned char)((i * 131u) ^ (i >> 7)); }

/* Runs shorter than the buffer, as long as it and longer, in pieces of 7 bytes; then the
 * end: MOOR_EOF with nothing read. */
static void test_bufio_read_exact_across_reads(void **state)
{
    (void)state;
    enum { LEN = 1000 };
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 16);
    char data[LEN];
    for (size_t i = 0; i < LEN; i++)
        data[i] = (char)pat(i);
    feed f = {sv[1], sv[0], data, LEN, 7, 0, 1};
    moor_fiber *fib = feed_start(&f);
    static const size_t runs[] = {5, 100, 16, 3, 15, 17, LEN - 156};
    char buf[LEN];
    size_t off = 0;
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    assert_int_equal(moor_read_exact(&r, buf, 0, NULL, deadline), 0);
    for (size_t k = 0; k < sizeof runs / sizeof runs[0]; k++) {
        size_t got = 99999;
        assert_int_equal(moor_read_exact(&r, buf, runs[k], &got, deadline), (ssize_t)runs[k]);
        assert_int_equal(got, runs[k]);
        assert_memory_equal(buf, data + off, runs[k]);
        off += runs[k];
    }
    assert_int_equal(off, LEN);
    size_t got = 99;
    assert_int_equal(moor_read_exact(&r, buf, 1, &got, deadline), MOOR_EOF);
    assert_int_equal(got, 0);
    feed_join(fib);
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

/* The stream ends part-way: -EPIPE with the bytes read in dst and counted, then MOOR_EOF. A
 * deadline part-way: -ETIMEDOUT, with the bytes read so far counted, and the call goes on. */
static void test_bufio_read_exact_eof_and_deadline(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 4);
    char buf[16] = {0};
    size_t got = 0;
    assert_int_equal(write(sv[1], "abc", 3), 3);
    assert_int_equal(moor_read_exact(&r, buf, 6, &got, moor_deadline_in(WAIT_MS)), -ETIMEDOUT);
    assert_int_equal(got, 3);
    assert_memory_equal(buf, "abc", 3);
    assert_int_equal(write(sv[1], "def12345", 8), 8);
    assert_int_equal(moor_read_exact(&r, buf + 3, 3, &got, moor_deadline_in(SAFETY_MS)), 3);
    assert_memory_equal(buf, "abcdef", 6);
    assert_int_equal(shutdown(sv[1], SHUT_WR), 0);
    memset(buf, 0, sizeof buf);
    got = 99;
    assert_int_equal(moor_read_exact(&r, buf, 10, &got, moor_deadline_in(SAFETY_MS)), -EPIPE);
    assert_int_equal(got, 5);
    assert_memory_equal(buf, "12345", 5);
    got = 99;
    assert_int_equal(moor_read_exact(&r, buf, 1, &got, moor_deadline_in(SAFETY_MS)), MOOR_EOF);
    assert_int_equal(got, 0);
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

/* A length-prefixed run between lines: read_exact takes the bytes read_line buffered. What is
 * buffered can be looked at and consumed without a read. */
static void test_bufio_buffered_and_consume(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    moor_reader r;
    reader_new(&r, sv[0], 64);
    const void *data = NULL;
    assert_int_equal(moor_reader_buffered(&r, &data), 0);
    static const char msg[] = "3\nabcXYZ\nskip-me-defrest\n";
    assert_int_equal(write(sv[1], msg, sizeof msg - 1), (ssize_t)sizeof msg - 1);
    expect_line(&r, "3");
    assert_int_equal(moor_reader_buffered(&r, &data), sizeof msg - 1 - 2);
    assert_memory_equal(data, "abcXYZ\n", 7);
    char buf[8];
    assert_int_equal(moor_read_exact(&r, buf, 3, NULL, moor_deadline_in(SAFETY_MS)), 3);
    assert_memory_equal(buf, "abc", 3);
    expect_line(&r, "XYZ");
    assert_int_equal(moor_reader_buffered(&r, &data), 16);
    moor_reader_consume(&r, 8);
    assert_int_equal(moor_reader_buffered(&r, &data), 8);
    assert_memory_equal(data, "defrest\n", 8);
    moor_reader_consume(&r, 0);
    assert_int_equal(moor_read_exact(&r, buf, 3, NULL, moor_deadline_in(SAFETY_MS)), 3);
    assert_memory_equal(buf, "def", 3);
    expect_line(&r, "rest");
    assert_int_equal(moor_reader_buffered(&r, NULL), 0);
    moor_reader_free(&r);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

static void consume_too_much(void *arg)
{
    (void)arg;
    moor_reader r;
    CHILD_REQUIRE(moor_reader_init(&r, 0, 8) == 0);
    moor_reader_consume(&r, 1);
}

static void test_bufio_consume_more_than_buffered_asserts(void **state)
{
    (void)state;
    child_report rep;
    child_run(consume_too_much, NULL, &rep);
    expect_child_signal(&rep, SIGABRT, "moor_reader_consume of 1 bytes");
}

/* ---- writev_all ---------------------------------------------------------------------------- */

typedef struct slow_sink {
    int fd;
    const unsigned char *want;
    size_t total;
    size_t got;
    unsigned reads;
} slow_sink;

static intptr_t slow_sink_fn(void *arg)
{
    slow_sink *s = arg;
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    unsigned char buf[1000];
    for (;;) {
        ssize_t n = moor_read(s->fd, buf, sizeof buf, deadline);
        FCHECK(n >= 0);
        if (n <= 0)
            break;
        FCHECK(s->got + (size_t)n <= s->total);
        if (s->got + (size_t)n > s->total)
            break;
        FCHECK(memcmp(buf, s->want + s->got, (size_t)n) == 0);
        s->got += (size_t)n;
        s->reads++;
        FCHECK(moor_sleep(moor_deadline_in(1)) == 0); /* slow: the writer's socket fills */
    }
    return 0;
}

/* IOV_MAX elements of odd lengths, every fifth empty, a few larger than the socket's buffer,
 * with gaps between them in memory, to a socket with a small send buffer and a slow reader:
 * writes begin and end in the middle of elements; every byte arrives in order, and the array
 * is as it was. */
static void test_bufio_writev_all_partial_writes(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    int small = 4096;
    assert_int_equal(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
    static struct iovec iov[IOV_MAX], copy[IOV_MAX];
    size_t src_len = (size_t)IOV_MAX * 400 + (IOV_MAX / 100 + 1) * 30000;
    unsigned char *src = malloc(src_len), *want = malloc(src_len);
    assert_non_null(src);
    assert_non_null(want);
    for (size_t i = 0; i < src_len; i++)
        src[i] = pat(i);
    size_t off = 0, total = 0;
    for (int i = 0; i < IOV_MAX; i++) {
        size_t len = i % 5 == 3 ? 0 : ((size_t)i * 7919u) % 397u;
        if (i % 100 == 50)
            len = 30000 - (size_t)i; /* several writes begin and end inside it */
        iov[i] = (struct iovec){src + off, len};
        memcpy(want + total, src + off, len);
        total += len;
        off += len + 3; /* a gap: elements are not one run of memory */
    }
    memcpy(copy, iov, sizeof iov);
    slow_sink s = {sv[1], want, total, 0, 0};
    moor_fiber *fib;
    assert_int_equal(moor_spawn(&fib, slow_sink_fn, &s, NULL), 0);
    size_t written = 0;
    assert_int_equal(moor_writev_all(sv[0], iov, IOV_MAX, &written, moor_deadline_in(SAFETY_MS)),
                     (ssize_t)total);
    assert_int_equal(written, total);
    assert_memory_equal(iov, copy, sizeof iov);
    assert_int_equal(shutdown(sv[0], SHUT_WR), 0);
    assert_int_equal(moor_join(fib, NULL), 0);
    assert_int_equal(s.got, total);
    assert_true(s.reads > 10);
    free(src);
    free(want);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

typedef struct quitter {
    int fd;
    size_t read;   /* bytes it read before it closed */
    int queued;    /* bytes it left unread, as it closed */
} quitter;

/* Read some, then close with bytes unread: queued and closed with no switch in between, so
 * that every byte the writer wrote is either read or counted in `queued`. */
static intptr_t quitter_fn(void *arg)
{
    quitter *q = arg;
    int64_t deadline = moor_deadline_in(SAFETY_MS);
    char buf[4096];
    while (q->read < 10000) {
        ssize_t n = moor_read(q->fd, buf, sizeof buf, deadline);
        FCHECK(n > 0);
        if (n <= 0)
            return 0;
        q->read += (size_t)n;
    }
    FCHECK(moor_sleep(moor_deadline_in(5)) == 0); /* the writer fills the socket */
    q->queued = queued(q->fd);
    FCHECK(close(q->fd) == 0);
    return 0;
}

/* The reader goes away in the middle: -EPIPE, and *written is exactly what the kernel took. */
static void test_bufio_writev_all_peer_closes(void **state)
{
    (void)state;
    enum { ELEMS = 64, ELEM = 64 * 1024 };
    moor_executor *ex = ex_new();
    int sv[2];
    stream_pair(sv);
    unsigned char *src = calloc(ELEMS, ELEM);
    assert_non_null(src);
    struct iovec iov[ELEMS];
    for (int i = 0; i < ELEMS; i++)
        iov[i] = (struct iovec){src + (size_t)i * ELEM, ELEM - (size_t)i}; /* odd lengths */
    quitter q = {sv[1], 0, -1};
    moor_fiber *fib;
    assert_int_equal(moor_spawn(&fib, quitter_fn, &q, NULL), 0);
    size_t written = 0;
    ssize_t n = moor_writev_all(sv[0], iov, ELEMS, &written, moor_deadline_in(SAFETY_MS));
    assert_int_equal(n, -EPIPE);
    assert_int_equal(moor_join(fib, NULL), 0);
    assert_true(q.queued >= 0);
    assert_int_equal(written, q.read + (size_t)q.queued);
    assert_true(written < (size_t)ELEMS * ELEM - ELEMS * (ELEMS - 1) / 2);
    free(src);
    close(sv[0]);
    ex_free(ex);
}

/* Nothing to write: 0 without a system call (the fd is not even valid). */
static void test_bufio_writev_all_nothing(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    char b[1];
    struct iovec empty[3] = {{b, 0}, {NULL, 0}, {b, 0}};
    size_t written = 99;
    assert_int_equal(moor_writev_all(-1, NULL, 0, &written, -1), 0);
    assert_int_equal(written, 0);
    written = 99;
    assert_int_equal(moor_writev_all(-1, empty, 3, &written, -1), 0);
    assert_int_equal(written, 0);
    ex_free(ex);
}

/* ---- sizes near SIZE_MAX, and the name of MOOR_EOF ---------------------------------------- */

static void test_bufio_sizes_near_size_max_refused(void **state)
{
    (void)state;
    moor_executor *ex = ex_new();
    moor_reader r;
    assert_int_equal(moor_reader_init(&r, 0, 0), -EINVAL);
    moor_reader_free(&r);
    assert_int_equal(moor_reader_init(&r, 0, SIZE_MAX), -ENOMEM);
    moor_reader_free(&r);
    assert_int_equal(moor_reader_init(&r, 0, SIZE_MAX / 2 + 1), -ENOMEM);
    moor_reader_free(&r);

    int sv[2];
    stream_pair(sv);
    reader_new(&r, sv[0], 16);
    const char *line = "x";
    assert_int_equal(moor_read_line(&r, &line, 17, NULL, -1), -EINVAL);
    assert_int_equal(moor_read_line(&r, &line, SIZE_MAX, NULL, -1), -EINVAL);
    assert_null(line);
    char buf[4];
    size_t got = 99;
    assert_int_equal(moor_read_exact(&r, buf, SIZE_MAX, &got, -1), -EINVAL);
    assert_int_equal(got, 0);
    assert_int_equal(moor_read_exact(&r, buf, (size_t)SSIZE_MAX + 1, &got, -1), -EINVAL);
    moor_reader_free(&r);

    /* Never written: each is refused before a system call (the lengths are lies). */
    struct iovec half[2] = {{buf, SIZE_MAX / 2 + 1}, {buf, SIZE_MAX / 2 + 1}}; /* wraps to 0 */
    struct iovec big[1] = {{buf, (size_t)SSIZE_MAX + 1}};
    struct iovec edge[2] = {{buf, (size_t)SSIZE_MAX}, {buf, 1}};
    struct iovec fits[2] = {{buf, 0}, {buf, 1}};
    size_t written = 99;
    assert_int_equal(moor_writev_all(sv[1], half, 2, &written, -1), -EINVAL);
    assert_int_equal(written, 0);
    assert_int_equal(moor_writev_all(sv[1], big, 1, &written, -1), -EINVAL);
    assert_int_equal(moor_writev_all(sv[1], edge, 2, &written, -1), -EINVAL);
    assert_int_equal(moor_writev_all(sv[1], fits, -1, &written, -1), -EINVAL);
    assert_int_equal(moor_writev_all(sv[1], fits, IOV_MAX + 1, &written, -1), -EINVAL);
    assert_int_equal(moor_writev_all(sv[1], fits, INT_MIN, &written, -1), -EINVAL);
    assert_int_equal(written, 0);
    close(sv[0]);
    close(sv[1]);
    ex_free(ex);
}

static void test_bufio_strerror_eof(void **state)
{
    (void)state;
    assert_string_equal(moor_strerror(MOOR_EOF), "End of stream");
    assert_true(MOOR_EOF < -4095); /* never an errno value */
}

int main(void)
{
    child_signals_save();
    const struct CMUnitTest tests[] = {
        TEST(test_bufio_lines_split_across_reads),
        TEST(test_bufio_lines_random_pieces_fill_the_buffer),
        TEST(test_bufio_line_at_limit_and_one_over),
        TEST(test_bufio_line_limit_below_buffer_size),
        TEST(test_bufio_line_longer_than_buffer),
        TEST(test_bufio_eof_mid_line),
        TEST(test_bufio_eof_at_line_boundary),
        TEST(test_bufio_empty_line_is_not_eof),
        TEST(test_bufio_peer_reset),
        TEST(test_bufio_deadline_mid_line),
        TEST(test_bufio_deadline_mid_long_line),
        TEST(test_bufio_cancel_mid_line),
        TEST(test_bufio_buffered_lines_spend_the_budget),
        TEST(test_bufio_read_exact_across_reads),
        TEST(test_bufio_read_exact_eof_and_deadline),
        TEST(test_bufio_buffered_and_consume),
        TEST(test_bufio_consume_more_than_buffered_asserts),
        TEST(test_bufio_writev_all_partial_writes),
        TEST(test_bufio_writev_all_peer_closes),
        TEST(test_bufio_writev_all_nothing),
        TEST(test_bufio_sizes_near_size_max_refused),
        TEST(test_bufio_strerror_eof),
    };
    return RUN_TESTS(tests);
}
