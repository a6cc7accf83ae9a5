/*
 * lmproxy._fastcopy.Exchange: whether a connection has an HTTP/1.1 request in flight, from
 * the bytes it carries; lmproxy._fastcopy.Gate: how many of a relay's connections have one,
 * and whether an idle connection may start the next.
 *
 * Exchange follows lmproxy/exchange.py rule for rule (that module explains the rules and is
 * the reference: tests/unit/test_exchange.py feeds both the same bytes, split anywhere, and
 * compares every answer). It is in C so that the fast copier (lmproxy/_fastcopy.c) can
 * follow the messages it copies without the interpreter: the relay's keep-alive path then
 * costs what it cost before it counted requests.
 *
 * The gate is the relay's half of the shim's claim (lmproxy/shim.py): while the shim holds
 * no claim, the model may be evicted as soon as no request is in flight, so a connection
 * that sits idle in a client's pool must not start a new request unseen. enter() counts the
 * connection first and only then looks whether the gate is open; close_if_idle() closes it
 * first and only then looks whether anything is counted. With sequentially consistent
 * atomics, one of the two sees the other: either the closer sees the request, or the
 * request sees the gate closed and waits, unread, for the shim.
 */
#include "_exchange.h"

#include <stdlib.h>
#include <string.h>

/* Longest head (or chunk-size line, or trailer section) followed; longer is opaque. */
#define HEAD_LIMIT (64 * 1024)
/* Requests whose responses have not ended, at most (pipelining deeper is opaque). */
#define MAX_PENDING 64
/* Content-Length digits, at most (more is opaque: no body is that long). */
#define MAX_LENGTH_DIGITS 18

/* --- the gate ------------------------------------------------------------------------ */

int exchange_enter(Exchange *x) {
    Gate *gate = x->gate;
    if (gate == NULL || x->counted)
        return 1;
    atomic_fetch_add(&gate->in_flight, 1);
    if (atomic_load(&gate->open)) {
        x->counted = 1;
        return 1;
    }
    atomic_fetch_sub(&gate->in_flight, 1);
    return 0;
}

static int between(const Framing *f) { return f->state == F_HEAD && f->length == 0; }

static int in_flight(const Exchange *x) {
    return x->opaque || x->pending || !between(&x->up) || !between(&x->down);
}

void exchange_settle(Exchange *x) {
    Gate *gate = x->gate;
    if (gate == NULL)
        return;
    int busy = in_flight(x);
    if (x->counted && !busy) {
        x->counted = 0;
        atomic_fetch_sub(&gate->in_flight, 1);
    } else if (!x->counted && busy) {
        /* Bytes that came without enter(): a response nobody asked for (opaque). */
        x->counted = 1;
        atomic_fetch_add(&gate->in_flight, 1);
    }
}

/* --- following the bytes ------------------------------------------------------------ */

static int is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* bytes.strip(): ASCII whitespace off both ends. */
static void strip(const char **p, size_t *n) {
    while (*n && is_space(**p)) {
        (*p)++;
        (*n)--;
    }
    while (*n && is_space((*p)[*n - 1]))
        (*n)--;
}

static int equals_lower(const char *p, size_t n, const char *lower) {
    size_t m = strlen(lower);
    if (n != m)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (c != lower[i])
            return 0;
    }
    return 1;
}

static void forget(Framing *f) {
    free(f->buffer);
    f->buffer = NULL;
    f->length = f->capacity = 0;
}

static int append(Framing *f, const char *data, size_t n) {
    if (f->length + n > f->capacity) {
        size_t capacity = f->capacity ? f->capacity : 256;
        while (capacity < f->length + n)
            capacity *= 2;
        char *grown = realloc(f->buffer, capacity);
        if (grown == NULL)
            return -1;
        f->buffer = grown;
        f->capacity = capacity;
    }
    memcpy(f->buffer + f->length, data, n);
    f->length += n;
    return 0;
}

/* Gathers bytes up to term, as exchange.py's _Direction.line: 1 with the bytes before it
 * in *line (valid until the next append), 0 while it has not come (data all taken), -1 when
 * the head is too long. *at: where reading goes on in data. */
static int gather(Framing *f, const char *data, size_t n, size_t *at, const char *term,
                  size_t tn, const char **line, size_t *line_n) {
    size_t before = f->length;
    if (before == 0) {
        const char *found = memmem(data + *at, n - *at, term, tn);
        if (found != NULL) {
            *line = data + *at;
            *line_n = (size_t)(found - (data + *at));
            *at = (size_t)(found - data) + tn;
            return 1;
        }
    }
    if (append(f, data + *at, n - *at) < 0)
        return -1;
    size_t from = before >= tn ? before - tn + 1 : 0;
    const char *found = memmem(f->buffer + from, f->length - from, term, tn);
    if (found == NULL) {
        *at = n;
        return f->length > HEAD_LIMIT ? -1 : 0;
    }
    size_t end = (size_t)(found - f->buffer);
    *line = f->buffer;
    *line_n = end;
    *at = *at + end + tn - before;
    f->length = 0;
    return 1;
}

static int parse_digits(const char *p, size_t n, int base, size_t max, uint64_t *value) {
    if (n == 0 || n > max)
        return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -1;
        v = v * (uint64_t)base + (uint64_t)d;
    }
    *value = v;
    return 0;
}

typedef struct {
    int64_t length; /* -1: none */
    int chunked;
} BodyFraming;

/* A message's body from its header lines (after the first line): as exchange.py's _framing. */
static int framing(const char *p, size_t n, int request, BodyFraming *out) {
    int64_t length = -1;
    int codings = 0, last_chunked = 0;
    while (n) {
        const char *end = memmem(p, n, "\r\n", 2);
        size_t line_n = end ? (size_t)(end - p) : n;
        const char *colon = memchr(p, ':', line_n);
        if (colon == NULL)
            return -1;
        const char *name = p;
        size_t name_n = (size_t)(colon - p);
        if (name_n == 0 || is_space(name[0]) || is_space(name[name_n - 1]))
            return -1;
        const char *value = colon + 1;
        size_t value_n = line_n - name_n - 1;
        if (equals_lower(name, name_n, "content-length")) {
            uint64_t v;
            strip(&value, &value_n);
            if (parse_digits(value, value_n, 10, MAX_LENGTH_DIGITS, &v) < 0)
                return -1;
            if (length >= 0 && (uint64_t)length != v)
                return -1;
            length = (int64_t)v;
        } else if (equals_lower(name, name_n, "transfer-encoding")) {
            while (value_n) {
                const char *comma = memchr(value, ',', value_n);
                size_t part_n = comma ? (size_t)(comma - value) : value_n;
                const char *part = value;
                size_t stripped_n = part_n;
                strip(&part, &stripped_n);
                if (stripped_n) {
                    codings = 1;
                    last_chunked = equals_lower(part, stripped_n, "chunked");
                }
                if (comma == NULL)
                    break;
                value += part_n + 1;
                value_n -= part_n + 1;
            }
        }
        if (end == NULL)
            break;
        p += line_n + 2;
        n -= line_n + 2;
    }
    out->length = length;
    out->chunked = 0;
    if (codings) {
        out->length = -1;
        if (!last_chunked) {
            if (request)
                return -1; /* a request body of unknown length */
            return 0;      /* a response read until close */
        }
        out->chunked = 1; /* Transfer-Encoding overrides Content-Length (RFC 9112 6.3) */
    }
    return 0;
}

static void begin_body(Framing *f, BodyFraming body, int until_close) {
    if (body.chunked) {
        f->state = F_CHUNK_SIZE;
    } else if (body.length > 0) {
        f->state = F_LENGTH;
        f->left = (uint64_t)body.length;
    } else if (body.length < 0 && until_close) {
        f->state = F_UNTIL_CLOSE;
    } else {
        f->state = F_HEAD;
    }
}

static int request_head(Exchange *x, const char *head, size_t n) {
    while (n && (*head == '\r' || *head == '\n')) { /* empty lines before a request */
        head++;
        n--;
    }
    const char *end = memmem(head, n, "\r\n", 2);
    size_t first_n = end ? (size_t)(end - head) : n;
    const char *space1 = memchr(head, ' ', first_n);
    if (space1 == NULL)
        return -1;
    const char *rest = space1 + 1;
    size_t rest_n = first_n - (size_t)(rest - head);
    const char *space2 = memchr(rest, ' ', rest_n);
    if (space2 == NULL)
        return -1;
    const char *version = space2 + 1;
    size_t version_n = first_n - (size_t)(version - head);
    if (memchr(version, ' ', version_n) != NULL || version_n < 7 ||
        memcmp(version, "HTTP/1.", 7) != 0)
        return -1;
    size_t method_n = (size_t)(space1 - head);
    BodyFraming body;
    if (framing(end ? end + 2 : head + n, end ? n - first_n - 2 : 0, 1, &body) < 0)
        return -1;
    if (x->pending >= MAX_PENDING)
        return -1;
    if (method_n == 4 && memcmp(head, "HEAD", 4) == 0)
        x->heads |= (uint64_t)1 << x->pending;
    x->pending++;
    x->connect = method_n == 7 && memcmp(head, "CONNECT", 7) == 0;
    begin_body(&x->up, body, 0);
    return 0;
}

static void ended(Exchange *x, Framing *f) {
    f->state = F_HEAD;
    if (f == &x->down) {
        x->pending--;
        x->heads >>= 1;
    }
}

static int response_head(Exchange *x, const char *head, size_t n) {
    const char *end = memmem(head, n, "\r\n", 2);
    size_t first_n = end ? (size_t)(end - head) : n;
    if (first_n < 12 || memcmp(head, "HTTP/1.", 7) != 0)
        return -1;
    uint64_t status;
    if (parse_digits(head + 9, 3, 10, 3, &status) < 0)
        return -1;
    if (x->pending == 0)
        return -1; /* a response to no request */
    if (status == 101 || (x->connect && status >= 200 && status < 300))
        return -1; /* the connection was upgraded */
    if (status >= 100 && status < 200)
        return 0; /* interim: the final response follows */
    BodyFraming body;
    if (framing(end ? end + 2 : head + n, end ? n - first_n - 2 : 0, 0, &body) < 0)
        return -1;
    if ((x->heads & 1) || status == 204 || status == 304) {
        body.length = 0;
        body.chunked = 0;
    }
    begin_body(&x->down, body, 1);
    if (x->down.state == F_HEAD)
        ended(x, &x->down); /* no body: the response has ended */
    return 0;
}

static void advance(Exchange *x, Framing *f) {
    if (f->left)
        return;
    if (f->state == F_LENGTH) {
        ended(x, f);
    } else if (f->state == F_CHUNK_DATA) {
        f->state = F_CHUNK_END;
        f->left = 2;
    } else if (f->state == F_CHUNK_END) {
        f->state = F_CHUNK_SIZE;
    }
}

static int chunk_size(const char *line, size_t n, uint64_t *size) {
    const char *semicolon = memchr(line, ';', n);
    if (semicolon != NULL)
        n = (size_t)(semicolon - line);
    strip(&line, &n);
    return parse_digits(line, n, 16, 16, size);
}

/* One step of a body from *at: 0, or -1 when the bytes do not follow HTTP/1.1. */
static int body_step(Exchange *x, Framing *f, const char *data, size_t n, size_t *at) {
    const char *line;
    size_t line_n;
    int got;
    switch (f->state) {
    case F_UNTIL_CLOSE:
        *at = n;
        return 0;
    case F_LENGTH:
    case F_CHUNK_DATA: {
        uint64_t taken = n - *at < f->left ? n - *at : f->left;
        f->left -= taken;
        *at += taken;
        break;
    }
    case F_CHUNK_END:
        if (data[*at] != "\r\n"[2 - f->left])
            return -1; /* a chunk not followed by CRLF */
        f->left--;
        (*at)++;
        break;
    case F_CHUNK_SIZE: {
        got = gather(f, data, n, at, "\r\n", 2, &line, &line_n);
        if (got < 0)
            return -1;
        if (got) {
            uint64_t size;
            if (chunk_size(line, line_n, &size) < 0)
                return -1;
            f->state = size == 0 ? F_TRAILERS : F_CHUNK_DATA;
            f->left = size;
        }
        return 0;
    }
    case F_TRAILERS:
        got = gather(f, data, n, at, "\r\n", 2, &line, &line_n);
        if (got < 0)
            return -1;
        if (got && line_n == 0)
            ended(x, f);
        return 0;
    case F_HEAD:
        return -1; /* not a body */
    }
    advance(x, f);
    return 0;
}

static int follow(Exchange *x, Framing *f, const char *data, size_t n) {
    size_t at = 0;
    while (at < n) {
        if (f->state != F_HEAD) {
            if (body_step(x, f, data, n, &at) < 0)
                return -1;
            continue;
        }
        const char *head;
        size_t head_n;
        int got = gather(f, data, n, &at, "\r\n\r\n", 4, &head, &head_n);
        if (got < 0)
            return -1;
        if (got == 0)
            return 0;
        if ((f == &x->up ? request_head(x, head, head_n) : response_head(x, head, head_n)) < 0)
            return -1;
    }
    return 0;
}

void exchange_feed(Exchange *x, int upstream, const char *data, size_t n) {
    if (!x->opaque && follow(x, upstream ? &x->up : &x->down, data, n) < 0) {
        x->opaque = 1;
        forget(&x->up);
        forget(&x->down);
    }
    exchange_settle(x);
}

static void unseen(Exchange *x, int upstream, uint64_t n) {
    Framing *f = upstream ? &x->up : &x->down;
    if (x->opaque || n == 0 || f->state == F_UNTIL_CLOSE)
        return;
    if ((f->state != F_LENGTH && f->state != F_CHUNK_DATA) || n > f->left) {
        x->opaque = 1; /* the relay moved bytes the framing needed to see */
        return;
    }
    f->left -= n;
    advance(x, f);
}

/* --- Exchange, for Python ----------------------------------------------------------- */

static int Exchange_init(Exchange *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"gate", NULL};
    PyObject *gate = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O", keywords, &gate))
        return -1;
    if (self->gate != NULL || self->pending || self->opaque || self->up.state ||
        self->down.state) {
        PyErr_SetString(PyExc_RuntimeError, "an Exchange is initialised once");
        return -1;
    }
    if (gate != Py_None) {
        if (!PyObject_TypeCheck(gate, &GateType)) {
            PyErr_SetString(PyExc_TypeError, "gate must be a Gate or None");
            return -1;
        }
        self->gate = (Gate *)Py_NewRef(gate);
    }
    return 0;
}

static void Exchange_release(Exchange *self) {
    if (self->counted && self->gate != NULL) {
        self->counted = 0;
        atomic_fetch_sub(&self->gate->in_flight, 1);
    }
}

static void Exchange_dealloc(Exchange *self) {
    Exchange_release(self);
    forget(&self->up);
    forget(&self->down);
    Py_CLEAR(self->gate);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *feed_from_python(Exchange *self, PyObject *arg, int upstream) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    exchange_feed(self, upstream, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *Exchange_client(Exchange *self, PyObject *arg) {
    return feed_from_python(self, arg, 1);
}

static PyObject *Exchange_backend(Exchange *self, PyObject *arg) {
    return feed_from_python(self, arg, 0);
}

static PyObject *Exchange_unseen(Exchange *self, PyObject *args) {
    int upstream;
    long long n;
    if (!PyArg_ParseTuple(args, "pL", &upstream, &n))
        return NULL;
    if (n > 0)
        unseen(self, upstream, (uint64_t)n);
    exchange_settle(self);
    Py_RETURN_NONE;
}

static PyObject *Exchange_budget(Exchange *self, PyObject *arg) {
    int upstream = PyObject_IsTrue(arg);
    if (upstream < 0)
        return NULL;
    const Framing *f = upstream ? &self->up : &self->down;
    if (self->opaque || f->state == F_UNTIL_CLOSE)
        Py_RETURN_NONE;
    if (f->state == F_LENGTH || f->state == F_CHUNK_DATA)
        return PyLong_FromUnsignedLongLong(f->left);
    return PyLong_FromLong(0);
}

static PyObject *Exchange_enter(Exchange *self, PyObject *Py_UNUSED(arg)) {
    return PyBool_FromLong(exchange_enter(self));
}

static PyObject *Exchange_settle(Exchange *self, PyObject *Py_UNUSED(arg)) {
    exchange_settle(self);
    Py_RETURN_NONE;
}

static PyObject *Exchange_release_py(Exchange *self, PyObject *Py_UNUSED(arg)) {
    Exchange_release(self);
    Py_RETURN_NONE;
}

static PyObject *Exchange_get_in_flight(Exchange *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(in_flight(self));
}

static PyObject *Exchange_get_opaque(Exchange *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->opaque);
}

static PyObject *Exchange_get_counted(Exchange *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(self->counted);
}

static PyMethodDef Exchange_methods[] = {
    {"client", (PyCFunction)Exchange_client, METH_O, "Bytes the client sent."},
    {"backend", (PyCFunction)Exchange_backend, METH_O, "Bytes the backend sent."},
    {"unseen", (PyCFunction)Exchange_unseen, METH_VARARGS,
     "unseen(upstream, n): n bytes moved without being shown, within budget(upstream)."},
    {"budget", (PyCFunction)Exchange_budget, METH_O,
     "budget(upstream): how many bytes may move unseen (None: any number; 0: none)."},
    {"enter", (PyCFunction)Exchange_enter, METH_NOARGS,
     "Count the connection in its gate before reading its client: False if the gate is "
     "closed (nothing counted, the client must not be read)."},
    {"settle", (PyCFunction)Exchange_settle, METH_NOARGS,
     "Counted exactly while in flight (after a read that brought nothing)."},
    {"release", (PyCFunction)Exchange_release_py, METH_NOARGS,
     "The connection is closed: no longer counted."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Exchange_getset[] = {
    {"in_flight", (getter)Exchange_get_in_flight, NULL,
     "A request has begun and its response has not ended (or the framing is lost).", NULL},
    {"opaque", (getter)Exchange_get_opaque, NULL, "The framing is lost: in use while open.",
     NULL},
    {"counted", (getter)Exchange_get_counted, NULL, "Counted in its gate's in_flight.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject ExchangeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lmproxy._fastcopy.Exchange",
    .tp_doc = "Exchange(gate=None)\n--\n\nlmproxy.exchange.Exchange, in C.",
    .tp_basicsize = sizeof(Exchange),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Exchange_init,
    .tp_dealloc = (destructor)Exchange_dealloc,
    .tp_methods = Exchange_methods,
    .tp_getset = Exchange_getset,
};

/* --- Gate, for Python --------------------------------------------------------------- */

static PyObject *Gate_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (PyTuple_GET_SIZE(args) || (kwargs != NULL && PyDict_GET_SIZE(kwargs))) {
        PyErr_SetString(PyExc_TypeError, "Gate() takes no arguments");
        return NULL;
    }
    Gate *self = (Gate *)type->tp_alloc(type, 0);
    if (self != NULL) {
        atomic_init(&self->in_flight, 0);
        atomic_init(&self->open, 1);
    }
    return (PyObject *)self;
}

static PyObject *Gate_close_if_idle(Gate *self, PyObject *Py_UNUSED(arg)) {
    atomic_store(&self->open, 0);
    if (atomic_load(&self->in_flight) == 0)
        Py_RETURN_TRUE;
    atomic_store(&self->open, 1);
    Py_RETURN_FALSE;
}

static PyObject *Gate_close(Gate *self, PyObject *Py_UNUSED(arg)) {
    atomic_store(&self->open, 0);
    Py_RETURN_NONE;
}

static PyObject *Gate_open(Gate *self, PyObject *Py_UNUSED(arg)) {
    atomic_store(&self->open, 1);
    Py_RETURN_NONE;
}

static PyObject *Gate_get_in_flight(Gate *self, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(atomic_load(&self->in_flight));
}

static PyObject *Gate_get_is_open(Gate *self, void *Py_UNUSED(closure)) {
    return PyBool_FromLong(atomic_load(&self->open));
}

static PyMethodDef Gate_methods[] = {
    {"close_if_idle", (PyCFunction)Gate_close_if_idle, METH_NOARGS,
     "Close the gate if no connection is counted, atomically with enter(): True if closed."},
    {"close", (PyCFunction)Gate_close, METH_NOARGS, "Close the gate."},
    {"open", (PyCFunction)Gate_open, METH_NOARGS, "Open the gate."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Gate_getset[] = {
    {"in_flight", (getter)Gate_get_in_flight, NULL, "Connections counted (requests in flight).",
     NULL},
    {"is_open", (getter)Gate_get_is_open, NULL, "Whether idle connections may start requests.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject GateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lmproxy._fastcopy.Gate",
    .tp_doc = "Gate()\n--\n\nlmproxy.exchange.Gate, with C atomics (open at first).",
    .tp_basicsize = sizeof(Gate),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Gate_new,
    .tp_methods = Gate_methods,
    .tp_getset = Gate_getset,
};

int exchange_add_types(PyObject *module) {
    if (PyType_Ready(&GateType) < 0 || PyType_Ready(&ExchangeType) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "Gate", (PyObject *)&GateType) < 0 ||
        PyModule_AddObjectRef(module, "Exchange", (PyObject *)&ExchangeType) < 0)
        return -1;
    return 0;
}
