/* Name lookups on c-ares (dns.c): what the rest of reactor/ and the white-box tests may use
 * besides the public moor_resolve. */
#ifndef MOOR_REACTOR_DNS_H
#define MOOR_REACTOR_DNS_H

/* The moor code for a c-ares status (ARES_SUCCESS gives 0): a MOOR_EAI_ code or -errno. */
int moor__dns_error(int ares_status);

#endif
