/*
 * lmproxy._fastcopy: the relay loop's commonest event, handled without the interpreter.
 *
 * A relay loop (lmproxy/relay.py) spends most of its wakeups on one kind of event: a
 * socket became readable, nothing is pending in either direction of its connection, and
 * the message that arrived (a request, a streamed token, a short answer) is smaller than
 * the copy buffer. Python handles it in one recv and one send; the interpreter around
 * those two calls costs about as much as the calls themselves. Copier.poll() waits for
 * events and handles exactly that case here, with the GIL released; every other event,
 * and whatever such a copy leaves to do (a full buffer, a destination that took only a
 * part, EOF, an error), goes back to the Python loop, which stays the one place that
 * knows the relay's rules.
 *
 * The loop tells the Copier which sockets it may copy from, and where to (allow/deny),
 * whenever the state of a connection changes in Python. It allows a socket only while
 * both directions of its connection hold nothing pending, so an event here never has
 * to order bytes behind others, and EPOLLOUT on such a socket has nothing to drain.
 *
 * For a service that speaks HTTP, a socket is allowed with its connection's Exchange
 * (lmproxy/_exchange.c): what is copied is shown to it, so the relay knows without the
 * interpreter whether a request is in flight, and the client of an idle connection is read
 * only once the exchange is counted in its gate (else Python holds the request back).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_exchange.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>

#if PY_VERSION_HEX < 0x030D0000
#define PyLong_AsInt _PyLong_AsInt /* public from Python 3.13 on */
#endif

/* The Python loop's buffer has the same size (relay._COPY_SIZE, checked by the tests). */
#define COPY_SIZE (32 * 1024)
#define MAX_EVENTS_LIMIT 65536
/* An event that is only "readable" (EPOLLOUT aside): no error, no hang-up, no FIN. */
#define PLAIN_READ_CHECK (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)

enum outcome {
    HANDLED, /* done here */
    PLAIN,   /* not touched: Python handles the event as epoll reported it */
    COPIED,  /* read here; Python finishes it (see Copier_poll's docstring) */
};

typedef struct {
    int fd;
    uint32_t mask;
    enum outcome outcome;
    ssize_t n;   /* COPIED: bytes read, 0 at EOF, -errno after an error */
    size_t sent; /* COPIED: how many of the n bytes reached the destination */
} Result;

typedef struct {
    PyObject_HEAD
    int epfd;
    int maxevents;
    struct epoll_event *events;
    Result *results;
    /* peer[fd] - 1: where the bytes read from fd go, while fd may be copied here; 0: not */
    int *peer;
    /* exchange[fd]: the connection's Exchange (a reference), or NULL; upstream[fd]: fd is
     * its client */
    Exchange **exchange;
    unsigned char *upstream;
    size_t npeer;
    char *buffer;
} Copier;

static void Copier_dealloc(Copier *self) {
    if (self->exchange != NULL)
        for (size_t fd = 0; fd < self->npeer; fd++)
            Py_XDECREF(self->exchange[fd]);
    free(self->exchange);
    free(self->upstream);
    free(self->events);
    free(self->results);
    free(self->peer);
    free(self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Copier_init(Copier *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"epoll_fd", "max_events", NULL};
    int epfd, maxevents;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ii", keywords, &epfd, &maxevents))
        return -1;
    if (epfd < 0) {
        PyErr_SetString(PyExc_ValueError, "epoll_fd must be a descriptor (>= 0)");
        return -1;
    }
    if (maxevents < 1 || maxevents > MAX_EVENTS_LIMIT) {
        PyErr_Format(PyExc_ValueError, "max_events must be between 1 and %d", MAX_EVENTS_LIMIT);
        return -1;
    }
    if (self->buffer != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Copier is initialised once");
        return -1;
    }
    self->epfd = epfd;
    self->maxevents = maxevents;
    self->npeer = 1024;
    self->events = calloc((size_t)maxevents, sizeof *self->events);
    self->results = calloc((size_t)maxevents, sizeof *self->results);
    self->peer = calloc(self->npeer, sizeof *self->peer);
    self->exchange = calloc(self->npeer, sizeof *self->exchange);
    self->upstream = calloc(self->npeer, sizeof *self->upstream);
    self->buffer = malloc(COPY_SIZE);
    if (!self->events || !self->results || !self->peer || !self->exchange || !self->upstream ||
        !self->buffer) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int ensure_ready(Copier *self) {
    if (self->buffer == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Copier was not initialised");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(Copier_allow_doc,
             "allow(fd, peer, exchange=None, upstream=False)\n--\n\n"
             "Let poll() copy what arrives on fd to peer, until deny(fd), showing it to\n"
             "exchange (the connection's lmproxy._fastcopy.Exchange) as the client's bytes\n"
             "(upstream) or the backend's.");

static int grow(Copier *self, size_t fd) {
    size_t npeer = self->npeer;
    while (npeer <= fd)
        npeer *= 2;
    int *peer = realloc(self->peer, npeer * sizeof *peer);
    if (peer == NULL)
        return -1;
    self->peer = peer;
    Exchange **exchange = realloc(self->exchange, npeer * sizeof *exchange);
    if (exchange == NULL)
        return -1;
    self->exchange = exchange;
    unsigned char *upstream = realloc(self->upstream, npeer * sizeof *upstream);
    if (upstream == NULL)
        return -1;
    self->upstream = upstream;
    size_t added = npeer - self->npeer;
    memset(peer + self->npeer, 0, added * sizeof *peer);
    memset(exchange + self->npeer, 0, added * sizeof *exchange);
    memset(upstream + self->npeer, 0, added * sizeof *upstream);
    self->npeer = npeer;
    return 0;
}

static PyObject *Copier_allow(Copier *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"fd", "peer", "exchange", "upstream", NULL};
    int fd, peer, upstream = 0;
    PyObject *exchange = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ii|Op", keywords, &fd, &peer, &exchange,
                                     &upstream) ||
        ensure_ready(self) < 0)
        return NULL;
    if (fd < 0 || peer < 0) {
        PyErr_SetString(PyExc_ValueError, "fd and peer must be descriptors (>= 0)");
        return NULL;
    }
    if (exchange != Py_None && !PyObject_TypeCheck(exchange, &ExchangeType)) {
        PyErr_SetString(PyExc_TypeError, "exchange must be an lmproxy._fastcopy.Exchange");
        return NULL;
    }
    if ((size_t)fd >= self->npeer && grow(self, (size_t)fd) < 0)
        return PyErr_NoMemory();
    self->peer[fd] = peer + 1;
    Exchange *old = self->exchange[fd];
    self->exchange[fd] = exchange == Py_None ? NULL : (Exchange *)Py_NewRef(exchange);
    Py_XDECREF(old);
    self->upstream[fd] = (unsigned char)upstream;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Copier_deny_doc,
             "deny(fd)\n--\n\n"
             "Leave every event of fd to Python (call it before fd is closed).");

static PyObject *Copier_deny(Copier *self, PyObject *arg) {
    int fd = PyLong_AsInt(arg);
    if ((fd == -1 && PyErr_Occurred()) || ensure_ready(self) < 0)
        return NULL;
    if (fd >= 0 && (size_t)fd < self->npeer) {
        self->peer[fd] = 0;
        Py_CLEAR(self->exchange[fd]);
    }
    Py_RETURN_NONE;
}

/* Handles one event without the GIL. Returns 0, or -1 when the event left bytes in the
 * buffer that Python must take before the buffer is used again. */
static int handle(Copier *self, const struct epoll_event *event, Result *result) {
    int fd = event->data.fd;
    uint32_t mask = event->events;
    result->fd = fd;
    result->mask = mask;
    result->outcome = PLAIN;
    int peer = (size_t)fd < self->npeer ? self->peer[fd] - 1 : -1;
    if (peer < 0 || (mask & PLAIN_READ_CHECK) != EPOLLIN) {
        if (peer >= 0 && (mask & PLAIN_READ_CHECK) == 0)
            result->outcome = HANDLED; /* only writable, and nothing is pending to drain */
        return 0;
    }
    Exchange *exchange = self->exchange[fd];
    int upstream = self->upstream[fd];
    if (exchange != NULL && upstream && !exchange_enter(exchange))
        return 0; /* an idle connection's next request, with the gate closed: Python's */
    ssize_t n = recv(fd, self->buffer, COPY_SIZE, 0);
    int saved_errno = errno;
    if (exchange != NULL && n <= 0)
        exchange_settle(exchange); /* entered for nothing: a FIN, or no byte after all */
    if (n < 0 && (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK)) {
        result->outcome = HANDLED; /* nothing after all: edge-triggered, a new event comes */
        return 0;
    }
    result->outcome = COPIED;
    result->sent = 0;
    if (n <= 0) {
        result->n = n < 0 ? -saved_errno : 0;
        return 0;
    }
    result->n = n;
    ssize_t sent = send(peer, self->buffer, (size_t)n, MSG_NOSIGNAL);
    saved_errno = errno;
    if (exchange != NULL) /* all n bytes go on (now, or held by Python): shown as read */
        exchange_feed(exchange, upstream, self->buffer, (size_t)n);
    if (sent < 0) {
        if (saved_errno != EAGAIN && saved_errno != EWOULDBLOCK) {
            result->n = -saved_errno;
            return 0;
        }
        sent = 0;
    }
    result->sent = (size_t)sent;
    if (sent < n)
        return -1; /* the rest is in the buffer */
    if (n < COPY_SIZE)
        result->outcome = HANDLED; /* a short read: drained, the next byte raises an event */
    return 0;
}

static PyObject *results_to_python(Copier *self, int count, int handled) {
    PyObject *plain = NULL, *copied = NULL;
    Py_ssize_t nplain = 0, ncopied = 0;
    for (int i = 0; i < count; i++) {
        nplain += self->results[i].outcome == PLAIN;
        ncopied += self->results[i].outcome == COPIED;
    }
    plain = PyList_New(nplain);
    copied = PyList_New(ncopied);
    if (plain == NULL || copied == NULL)
        goto fail;
    Py_ssize_t p = 0, c = 0;
    for (int i = 0; i < count; i++) {
        const Result *r = &self->results[i];
        PyObject *item;
        if (r->outcome == PLAIN) {
            item = Py_BuildValue("(iI)", r->fd, (unsigned int)r->mask);
            if (item == NULL)
                goto fail;
            PyList_SET_ITEM(plain, p++, item);
        } else if (r->outcome == COPIED) {
            PyObject *rest;
            if (r->n > 0 && r->sent < (size_t)r->n)
                rest = PyBytes_FromStringAndSize(self->buffer + r->sent,
                                                 (Py_ssize_t)((size_t)r->n - r->sent));
            else
                rest = Py_NewRef(Py_None);
            if (rest == NULL)
                goto fail;
            item = Py_BuildValue("(inN)", r->fd, (Py_ssize_t)r->n, rest);
            if (item == NULL)
                goto fail;
            PyList_SET_ITEM(copied, c++, item);
        }
    }
    return Py_BuildValue("(iNN)", handled, plain, copied);
fail:
    Py_XDECREF(plain);
    Py_XDECREF(copied);
    return NULL;
}

PyDoc_STRVAR(
    Copier_poll_doc,
    "poll(timeout_ms)\n--\n\n"
    "Wait for events (epoll_wait, up to timeout_ms; -1: no limit), copy the plain reads of\n"
    "allowed sockets, and return (handled, plain, copied):\n\n"
    "- handled: how many events were dealt with entirely here;\n"
    "- plain: [(fd, mask)] for Python to handle as epoll reported them;\n"
    "- copied: [(fd, n, rest)] for reads made here that Python must finish: n bytes were\n"
    "  read (n == the buffer's size: more may wait), 0 at EOF, -errno after an error of the\n"
    "  read or the send; rest holds the bytes the destination did not take, else None.\n\n"
    "An interrupted wait returns (0, [], []).");

static PyObject *Copier_poll(Copier *self, PyObject *arg) {
    int timeout = PyLong_AsInt(arg);
    if ((timeout == -1 && PyErr_Occurred()) || ensure_ready(self) < 0)
        return NULL;
    int count, handled = 0, saved_errno = 0;
    Py_BEGIN_ALLOW_THREADS
    count = epoll_wait(self->epfd, self->events, self->maxevents, timeout);
    if (count < 0) {
        saved_errno = errno;
    } else {
        int i = 0;
        for (; i < count; i++) {
            Result *result = &self->results[i];
            int stop = handle(self, &self->events[i], result) < 0;
            handled += result->outcome == HANDLED;
            if (stop) {
                i++;
                break;
            }
        }
        /* After a partial send the buffer holds its rest: the others go to Python. */
        for (; i < count; i++) {
            self->results[i].fd = self->events[i].data.fd;
            self->results[i].mask = self->events[i].events;
            self->results[i].outcome = PLAIN;
        }
    }
    Py_END_ALLOW_THREADS
    if (count < 0) {
        if (saved_errno == EINTR)
            return Py_BuildValue("(i[][])", 0);
        errno = saved_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return results_to_python(self, count, handled);
}

static PyMethodDef Copier_methods[] = {
    {"allow", (PyCFunction)(void (*)(void))Copier_allow, METH_VARARGS | METH_KEYWORDS,
     Copier_allow_doc},
    {"deny", (PyCFunction)Copier_deny, METH_O, Copier_deny_doc},
    {"poll", (PyCFunction)Copier_poll, METH_O, Copier_poll_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(Copier_doc,
             "Copier(epoll_fd, max_events)\n--\n\n"
             "Waits on an edge-triggered epoll instance (owned by the caller, which must keep it\n"
             "open while it polls) and copies the plain reads of the sockets it is allowed to.");

static PyTypeObject CopierType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lmproxy._fastcopy.Copier",
    .tp_doc = Copier_doc,
    .tp_basicsize = sizeof(Copier),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Copier_init,
    .tp_dealloc = (destructor)Copier_dealloc,
    .tp_methods = Copier_methods,
};

static struct PyModuleDef fastcopy_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_fastcopy",
    .m_doc = "The relay loop's plain reads copied without the interpreter (see relay.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__fastcopy(void) {
    if (PyType_Ready(&CopierType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&fastcopy_module);
    if (module == NULL)
        return NULL;
    if (exchange_add_types(module) < 0 ||
        PyModule_AddObjectRef(module, "Copier", (PyObject *)&CopierType) < 0 ||
        PyModule_AddIntConstant(module, "COPY_SIZE", COPY_SIZE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
