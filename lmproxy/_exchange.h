/*
 * lmproxy._fastcopy.Exchange and Gate: the C twin of lmproxy/exchange.py (its reference,
 * tested against it byte for byte), so that the fast copier can follow every request and
 * response it copies without the interpreter. See lmproxy/_exchange.c.
 */
#ifndef LMPROXY_EXCHANGE_H
#define LMPROXY_EXCHANGE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

/* Counts the connections of a relay that have a request in flight, and says whether an
 * idle one may start a new request (open) or must wait for the shim's claim (closed). */
typedef struct {
    PyObject_HEAD
    atomic_long in_flight;
    atomic_int open;
} Gate;

enum framing_state {
    F_HEAD,        /* between messages, or inside a head */
    F_LENGTH,      /* a body of known length */
    F_CHUNK_SIZE,  /* a chunk-size line */
    F_CHUNK_DATA,
    F_CHUNK_END,   /* the CRLF after a chunk's data */
    F_TRAILERS,    /* after the last chunk: trailer lines, then an empty line */
    F_UNTIL_CLOSE, /* a response body that ends with the connection */
};

typedef struct {
    enum framing_state state;
    uint64_t left; /* F_LENGTH, F_CHUNK_DATA: bytes left; F_CHUNK_END: CRLF bytes left */
    char *buffer;  /* the head (or line) so far */
    size_t length, capacity;
} Framing;

typedef struct {
    PyObject_HEAD
    Framing up, down;
    int opaque;
    int connect;     /* the last request was CONNECT */
    int pending;     /* requests whose response has not ended (at most 64) */
    uint64_t heads;  /* bit i: the i-th of them (oldest first) is a HEAD request */
    int counted;     /* holds one of the gate's in_flight */
    Gate *gate;      /* or NULL */
} Exchange;

extern PyTypeObject ExchangeType;
extern PyTypeObject GateType;

/* Without the GIL, from the relay loop that owns the exchange: */
int exchange_enter(Exchange *x); /* 1: counted, the client may be read; 0: gate closed */
void exchange_feed(Exchange *x, int upstream, const char *data, size_t n);
void exchange_settle(Exchange *x); /* counted exactly while in flight */

int exchange_add_types(PyObject *module);

#endif
