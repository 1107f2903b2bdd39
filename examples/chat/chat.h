/* What chat.c and cluster.c (--redis) say to each other. Everything here runs on the one
 * executor of a moor-chat that uses Redis; nothing in chat.c's half waits. */
#ifndef MOOR_CHAT_H
#define MOOR_CHAT_H

#include <stddef.h>

#define MAX_LINE (4096)         /* longest line accepted, without its newline */
#define MAX_NICK (32)

/* chat.c: deliver what a client of another instance said or did to the local clients that
 * were in when it was said (see cluster_joins_seen), "nick: text" or "* ...". */
void chat_remote_line(const char *nick, const char *text, size_t len);
void chat_remote_notice(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* chat.c: news of the link, "* ...", to every local client. */
void chat_notice(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* chat.c: the nicks of the local clients, as one allocation the caller frees: an array of
 * *count pointers to the strings that follow it. NULL without memory (*count is then 0). */
char **chat_local_nicks(size_t *count);

/* chat.c: a local client lost its nick to a client of another instance while the room was
 * split; it is called `now` from here on (everyone local is told). */
void chat_renamed(const char *old, const char *now);

/* chat.c: guest<n> was handed out by the cluster; local names start above it. */
void chat_guest_seen(unsigned long n);

/* chat.c: the highest guest number handed out or seen here. */
unsigned long chat_guests(void);

#endif /* MOOR_CHAT_H */
