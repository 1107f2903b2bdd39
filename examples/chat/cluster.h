/* moor-chat --redis HOST:PORT: one room shared by several moor-chat processes through Redis.
 * See cluster.c for the keys, the messages and what happens when Redis goes. */
#ifndef MOOR_CHAT_CLUSTER_H
#define MOOR_CHAT_CLUSTER_H

#include <stddef.h>

/* Start the link (a fiber of its own) and wait until its first attempt to connect is over;
 * it serves the room from then on and reconnects by itself. From a fiber. 0 or -ENOMEM. */
int cluster_start(const char *host, int port);

/* Say goodbye to the other instances (their clients hear ours leave) and close the link.
 * Waits (at most about a second). From a fiber, cancelled or not. */
void cluster_stop(void);

/* A new client's name: guest<N> with N counted over every instance, claimed for this
 * instance, and its join published. 0 with nick set and *ticket its place among this
 * instance's joins, or a negative error: the room is local only (nick untouched). May
 * suspend. */
int cluster_join(char *nick, size_t size, unsigned long long *ticket);

/* How many of this instance's joins have come back on the channel. The client with a given
 * ticket is in the room, for what the other instances' clients say, once this reaches it:
 * what came on the channel before its own join was said before it came in (Redis orders
 * the channel). While the room is local only, every ticket handed out is reached. */
unsigned long long cluster_joins_seen(void);

/* Publish a client's line, its nick change, its leaving. Lines and leaves return nothing:
 * with no link the room is local only and nobody else is told. cluster_rename claims `now`
 * first: 1 when it is this client's now, 0 when a client of another instance has it, a
 * negative error when the room is local only (the local rules alone apply). May suspend. */
void cluster_line(const char *nick, const char *text, size_t len);
int cluster_rename(const char *old, const char *now);
void cluster_leave(const char *nick);

/* The nicks of every other instance's clients, as chat_local_nicks returns its own (one
 * allocation, freed by the caller); NULL when the room is local only, or without memory.
 * May suspend. */
char **cluster_who(size_t *count);

#endif /* MOOR_CHAT_CLUSTER_H */
