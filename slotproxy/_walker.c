/* The relay's per-chunk work, compiled: the framing walker behind
 * wire.SessionTracker, and the pump behind relay._Half.
 *
 * Both run on every chunk relayed either way, so they are here in C;
 * wire.Walker and relay.PyPump are the same in Python (the reference, and the
 * fallback where no compiler was at hand). The walker reads message headers
 * only and skips bodies; the tests run the same cases through both versions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/epoll.h>
#endif

#define MAX_STARTUP_BODY (64 * 1024)

/* A message length (up to 2^31 - 1) is added to a position: no overflow on 64 bits.
 * Elsewhere the build fails, and the install falls back to the Python walker. */
_Static_assert(sizeof(Py_ssize_t) >= 8, "positions need 64 bits");

/* What each client message type means for the session (see wire._CLIENT_KIND). */
enum { NOTHING, REQUEST, SYNC, BATCH, TERMINATE };
static unsigned char client_kind[256];

typedef struct {
    PyObject_HEAD
    PyObject *clock;
    PyObject *c_carry; /* bytes: the start of a message split across chunks, or NULL */
    PyObject *s_carry;
    PyObject *held; /* list of (type, body): BackendKeyData and ErrorResponse before ready */
    Py_ssize_t c_skip; /* bytes left of a message body being skipped */
    Py_ssize_t s_skip;
    Py_ssize_t pending;
    double since;
    int status;
    char batch, ready, terminated, lost;
} Walker;

static int32_t
read_int32(const unsigned char *p)
{
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]);
}

static int
tick(Walker *self)
{
    PyObject *now = PyObject_CallNoArgs(self->clock);
    if (now == NULL)
        return -1;
    double value = PyFloat_AsDouble(now);
    Py_DECREF(now);
    if (value == -1.0 && PyErr_Occurred())
        return -1;
    self->since = value;
    return 0;
}

static int
Walker_init(Walker *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"clock", NULL};
    PyObject *clock;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Walker", kwlist, &clock))
        return -1;
    Py_INCREF(clock);
    Py_XSETREF(self->clock, clock);
    Py_CLEAR(self->c_carry);
    Py_CLEAR(self->s_carry);
    Py_XSETREF(self->held, PyList_New(0));
    if (self->held == NULL)
        return -1;
    self->c_skip = self->s_skip = self->pending = 0;
    self->status = 'I';
    self->batch = self->ready = self->terminated = self->lost = 0;
    return tick(self);
}

static int
Walker_traverse(Walker *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->clock);
    Py_VISIT(self->held);
    return 0;
}

static int
Walker_clear(Walker *self)
{
    Py_CLEAR(self->clock);
    Py_CLEAR(self->c_carry);
    Py_CLEAR(self->s_carry);
    Py_CLEAR(self->held);
    return 0;
}

static void
Walker_dealloc(Walker *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Walker_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* The chunk to walk: `data`, after what was carried over from the last one.
 * On success *joined holds a new bytes object to release, or NULL when the
 * view is `data` itself. */
static int
open_chunk(PyObject **carry, PyObject *data, Py_buffer *view, PyObject **joined)
{
    *joined = NULL;
    if (PyObject_GetBuffer(data, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (*carry == NULL)
        return 0;
    Py_ssize_t kept = PyBytes_GET_SIZE(*carry);
    PyObject *whole = PyBytes_FromStringAndSize(NULL, kept + view->len);
    if (whole == NULL) {
        PyBuffer_Release(view);
        return -1;
    }
    memcpy(PyBytes_AS_STRING(whole), PyBytes_AS_STRING(*carry), kept);
    memcpy(PyBytes_AS_STRING(whole) + kept, view->buf, view->len);
    PyBuffer_Release(view);
    Py_CLEAR(*carry);
    *joined = whole;
    return PyObject_GetBuffer(whole, view, PyBUF_SIMPLE) < 0 ? -1 : 0;
}

/* Where the walk stopped: skip the rest of a body, or carry a message's start. */
static int
close_chunk(PyObject **carry, Py_ssize_t *skip, const unsigned char *p, Py_ssize_t pos, Py_ssize_t n)
{
    if (pos > n) {
        *skip = pos - n;
        return 0;
    }
    *skip = 0;
    if (pos < n) {
        Py_XSETREF(*carry, PyBytes_FromStringAndSize((const char *)p + pos, n - pos));
        if (*carry == NULL)
            return -1;
    }
    return 0;
}

/* Made without __init__ (or cleared by the collector): nothing to walk with. */
static int
unready(Walker *self)
{
    if (self->clock != NULL && self->held != NULL)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "Walker used before __init__");
    return -1;
}

static PyObject *
Walker_from_client(Walker *self, PyObject *data)
{
    if (unready(self) < 0)
        return NULL;
    if (self->lost)
        Py_RETURN_NONE;
    Py_buffer view;
    PyObject *joined;
    Py_ssize_t pos = self->c_skip;
    if (open_chunk(&self->c_carry, data, &view, &joined) < 0) {
        Py_XDECREF(joined);
        return NULL;
    }
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len;
    int started = 0, failed = 0;
    if (pos >= n) {
        self->c_skip = pos - n;
        goto done;
    }
    while (n - pos >= 5) {
        unsigned char kind = client_kind[p[pos]];
        if (kind == TERMINATE) {
            self->terminated = 1;
        }
        else if (kind != NOTHING) {
            if (!(self->pending || self->batch))
                started = 1;
            if (kind == BATCH) {
                self->batch = 1;
            }
            else {
                self->pending++;
                if (kind == SYNC)
                    self->batch = 0;
            }
        }
        int32_t length = read_int32(p + pos + 1);
        if (length < 4) {
            self->lost = 1;
            goto done;
        }
        pos += 1 + (Py_ssize_t)length;
    }
    failed = close_chunk(&self->c_carry, &self->c_skip, p, pos, n);
done:
    PyBuffer_Release(&view);
    Py_XDECREF(joined);
    if (failed || (started && tick(self) < 0))
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Walker_from_server(Walker *self, PyObject *data)
{
    if (unready(self) < 0)
        return NULL;
    if (self->lost)
        Py_RETURN_NONE;
    Py_buffer view;
    PyObject *joined;
    Py_ssize_t pos = self->s_skip;
    if (open_chunk(&self->s_carry, data, &view, &joined) < 0) {
        Py_XDECREF(joined);
        return NULL;
    }
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len;
    int stopped = 0, failed = 0;
    if (pos >= n) {
        self->s_skip = pos - n;
        goto done;
    }
    while (n - pos >= 5) {
        unsigned char mtype = p[pos];
        int32_t length = read_int32(p + pos + 1);
        if (length < 4 || (mtype == 'Z' && length != 5)) {
            self->lost = 1;
            goto done;
        }
        Py_ssize_t end = pos + 1 + (Py_ssize_t)length;
        if (mtype == 'Z') {
            if (end > n)
                break; /* its status byte is in the next chunk */
            if (self->pending)
                self->pending--;
            if (!(self->pending || self->batch))
                stopped = 1;
            self->status = p[pos + 5];
            self->ready = 1;
        }
        else if (!self->ready && (mtype == 'K' || mtype == 'E') && length <= MAX_STARTUP_BODY) {
            if (end > n)
                break; /* carried over whole: its body is needed */
            PyObject *message = Py_BuildValue("(iy#)", (int)mtype, (const char *)p + pos + 5,
                                              (Py_ssize_t)(length - 4));
            if (message == NULL || PyList_Append(self->held, message) < 0) {
                Py_XDECREF(message);
                failed = 1;
                goto done;
            }
            Py_DECREF(message);
        }
        pos = end;
    }
    failed = close_chunk(&self->s_carry, &self->s_skip, p, pos, n);
done:
    PyBuffer_Release(&view);
    Py_XDECREF(joined);
    if (failed || (stopped && tick(self) < 0))
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Walker_get_midway(Walker *self, void *closure)
{
    return PyBool_FromLong(self->c_carry || self->c_skip || self->s_carry || self->s_skip);
}

static PyMethodDef Walker_methods[] = {
    {"from_client", (PyCFunction)Walker_from_client, METH_O, "Follow a chunk the client sent."},
    {"from_server", (PyCFunction)Walker_from_server, METH_O, "Follow a chunk the server sent."},
    {NULL},
};

static PyMemberDef Walker_members[] = {
    {"pending", T_PYSSIZET, offsetof(Walker, pending), READONLY, "requests awaiting their ReadyForQuery"},
    {"since", T_DOUBLE, offsetof(Walker, since), READONLY, "clock reading at the last change of activity"},
    {"status", T_INT, offsetof(Walker, status), READONLY, "status byte of the last ReadyForQuery"},
    {"batch", T_BOOL, offsetof(Walker, batch), READONLY, "extended-protocol messages since the last Sync"},
    {"ready", T_BOOL, offsetof(Walker, ready), READONLY, "the first ReadyForQuery was seen"},
    {"terminated", T_BOOL, offsetof(Walker, terminated), READONLY, "the client sent Terminate"},
    {"lost", T_BOOL, offsetof(Walker, lost), READONLY, "the stream stopped making sense"},
    {"held", T_OBJECT, offsetof(Walker, held), READONLY, "(type, body) of K and E messages before ready"},
    {NULL},
};

static PyGetSetDef Walker_getset[] = {
    {"midway", (getter)Walker_get_midway, NULL, "a message is half through either way", NULL},
    {NULL},
};

static PyType_Slot Walker_slots[] = {
    {Py_tp_doc, "Follows the framing of both directions of a session (see wire.Walker)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Walker_init},
    {Py_tp_dealloc, Walker_dealloc},
    {Py_tp_traverse, Walker_traverse},
    {Py_tp_clear, Walker_clear},
    {Py_tp_methods, Walker_methods},
    {Py_tp_members, Walker_members},
    {Py_tp_getset, Walker_getset},
    {0, NULL},
};

static PyType_Spec Walker_spec = {
    .name = "slotproxy._walker.Walker",
    .basicsize = sizeof(Walker),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Walker_slots,
};

/* -- Pump: what relay._Half does with each chunk: count it, show it to the
 * observer (the walker, or the session while it starts), write it on. */

typedef struct {
    PyObject_HEAD
    PyObject *write;    /* the other transport's write */
    PyObject *observer; /* a callable, or None (NULL after a del: the same) */
    long long count;    /* bytes read from this side */
} Pump;

static int
Pump_init(Pump *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"write", "observer", NULL};
    PyObject *write, *observer = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O:Pump", kwlist, &write, &observer))
        return -1;
    Py_INCREF(write);
    Py_XSETREF(self->write, write);
    Py_INCREF(observer);
    Py_XSETREF(self->observer, observer);
    self->count = 0;
    return 0;
}

static int
Pump_traverse(Pump *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->write);
    Py_VISIT(self->observer);
    return 0;
}

static int
Pump_clear(Pump *self)
{
    Py_CLEAR(self->write);
    Py_CLEAR(self->observer);
    return 0;
}

static void
Pump_dealloc(Pump *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Pump_clear(self);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* Calls `callable(data)`, holding it: the observer may replace itself while it runs. */
static int
call_with(PyObject *callable, PyObject *data)
{
    Py_INCREF(callable);
    PyObject *result = PyObject_CallOneArg(callable, data);
    Py_DECREF(callable);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

static PyObject *
Pump_data_received(Pump *self, PyObject *data)
{
    if (self->write == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Pump used before __init__");
        return NULL;
    }
    Py_ssize_t n = PyBytes_Check(data) ? PyBytes_GET_SIZE(data) : PyObject_Size(data);
    if (n < 0)
        return NULL;
    self->count += n;
    if (self->observer != NULL && self->observer != Py_None && call_with(self->observer, data) < 0)
        return NULL;
    if (call_with(self->write, data) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef Pump_methods[] = {
    {"data_received", (PyCFunction)Pump_data_received, METH_O,
     "Count a chunk, show it to the observer, write it to the other side."},
    {NULL},
};

static PyMemberDef Pump_members[] = {
    {"count", T_LONGLONG, offsetof(Pump, count), READONLY, "bytes read from this side"},
    {"observer", T_OBJECT, offsetof(Pump, observer), 0, "sees each chunk before it is written on, or None"},
    {NULL},
};

static PyType_Slot Pump_slots[] = {
    {Py_tp_doc, "The relay's per-chunk work (see relay.PyPump); a base of relay's halves."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Pump_init},
    {Py_tp_dealloc, Pump_dealloc},
    {Py_tp_traverse, Pump_traverse},
    {Py_tp_clear, Pump_clear},
    {Py_tp_methods, Pump_methods},
    {Py_tp_members, Pump_members},
    {0, NULL},
};

static PyType_Spec Pump_spec = {
    .name = "slotproxy._walker.Pump",
    .basicsize = sizeof(Pump),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .slots = Pump_slots,
};

/* -- Conduit: one end of a session relayed on its sockets themselves (relay.SocketRelay).
 *
 * A Poller (below) calls it when its socket has data: it reads a chunk, counts it,
 * shows it to the observer and sends it to the peer end's socket. Only what the
 * peer's socket does not take at once is buffered, in `pending`; the owner (the
 * SocketRelay) then stops reading the other side until the Poller finds the peer
 * writable and the rest is sent. Every rare turn (end of stream, an error, a full
 * or drained buffer, an observer that failed) is a call of one of the owner's
 * methods. Built on Linux only (epoll); elsewhere relay.Relay does the work. */

#ifdef __linux__
#define CHUNK (256 * 1024) /* read at most this much per recv, as uvloop's transports */
static PyObject *str_lost, *str_blocked, *str_drained, *str_fault;

struct Poller;

typedef struct Conduit {
    PyObject_HEAD
    int fd;              /* -1: none (before __init__, or closed) */
    struct Conduit *peer; /* where what is read goes; NULL: read and dropped */
    PyObject *owner;
    PyObject *observer;  /* a callable, or None */
    char *pending;       /* bytes the socket did not take yet: pending[sent:size] */
    Py_ssize_t sent, size, capacity;
    long long count;     /* bytes read and sent on */
    char reading, writing; /* what the poller watches for */
    struct Poller *poller; /* watching this end (holds a reference each way), or NULL */
    struct Conduit *prev, *next; /* in the poller's list of what it watches */
} Conduit;

/* An epoll instance of our own, one per event loop, which the loop watches as one
 * descriptor (relay.poller_for). Why not the loop's add_reader per socket: its
 * registration costs about 10,000 instructions in uvloop, and on an error event
 * (data and a reset together) libuv drops the socket after one call, which made
 * each wakeup read until EAGAIN. Here a wakeup reads until a short read (epoll is
 * level-triggered: what is left, or an error, is reported again on the next one). */
typedef struct Poller {
    PyObject_HEAD
    int fd;             /* the epoll instance; -1 only while __new__ fails */
    Conduit *watched;   /* what it watches: each holds a reference to it, and it to each */
    Py_ssize_t count;
    char *chunk;        /* CHUNK bytes: each chunk is sent on before the next read. Its own,
                           as an observer may let another thread's loop run meanwhile. */
    PyObject *weakrefs; /* relay.poller_for keeps it weakly: the loop's reader owns it */
} Poller;

static PyTypeObject *conduit_type;

/* Stops watching `c` (with both references: `c` may go unless the caller holds it). */
static void
unwatch(Conduit *c)
{
    Poller *p = c->poller;
    if (p == NULL)
        return;
    if (c->fd >= 0)
        epoll_ctl(p->fd, EPOLL_CTL_DEL, c->fd, NULL); /* fails only if it is gone already */
    if (c->prev != NULL)
        c->prev->next = c->next;
    else
        p->watched = c->next;
    if (c->next != NULL)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
    c->poller = NULL;
    c->reading = c->writing = 0;
    p->count--;
    Py_DECREF(p);
    Py_DECREF(c);
}

static int
watch(Poller *p, Conduit *c, int read, int write)
{
    if (c->poller != NULL && c->poller != p) {
        PyErr_SetString(PyExc_ValueError, "the Conduit is watched by another Poller");
        return -1;
    }
    if (!read && !write) {
        unwatch(c);
        return 0;
    }
    if (c->poller != NULL && c->reading == read && c->writing == write)
        return 0;
    if (c->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the Conduit is closed");
        return -1;
    }
    struct epoll_event ev = {.events = (read ? EPOLLIN : 0) | (write ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(p->fd, c->poller != NULL ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (c->poller == NULL) {
        Py_INCREF(p);
        Py_INCREF(c);
        c->poller = p;
        c->next = p->watched;
        if (p->watched != NULL)
            p->watched->prev = c;
        p->watched = c;
        p->count++;
    }
    c->reading = (char)read;
    c->writing = (char)write;
    return 0;
}

static PyObject *
Conduit_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Conduit *self = (Conduit *)PyType_GenericNew(type, args, kwds);
    if (self != NULL)
        self->fd = -1; /* owns no socket until __init__ gives it one */
    return (PyObject *)self;
}

static int
Conduit_init(Conduit *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "owner", "observer", NULL};
    int fd;
    PyObject *owner, *observer = Py_None;
    if (self->fd >= 0 || self->owner != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Conduit is initialized once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO|O:Conduit", kwlist, &fd, &owner, &observer))
        return -1;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "fd must be a descriptor");
        return -1;
    }
    self->fd = fd;
    Py_INCREF(owner);
    Py_XSETREF(self->owner, owner);
    Py_INCREF(observer);
    Py_XSETREF(self->observer, observer);
    return 0;
}

static int
Conduit_traverse(Conduit *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->peer);
    Py_VISIT(self->owner);
    Py_VISIT(self->observer);
    Py_VISIT((PyObject *)self->poller);
    return 0;
}

static int
Conduit_clear(Conduit *self)
{
    unwatch(self);
    Py_CLEAR(self->peer);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->observer);
    return 0;
}

static void
drop_pending(Conduit *self)
{
    PyMem_Free(self->pending);
    self->pending = NULL;
    self->sent = self->size = self->capacity = 0;
}

static void
Conduit_dealloc(Conduit *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Conduit_clear(self);
    drop_pending(self);
    if (self->fd >= 0)
        close(self->fd);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

/* owner.<name>(self[, arg]); its result is dropped, NULL on an exception. */
static PyObject *
tell(Conduit *self, PyObject *name, PyObject *arg)
{
    PyObject *owner = self->owner;
    if (owner == NULL)
        Py_RETURN_NONE; /* detached: nobody to tell */
    Py_INCREF(owner);
    PyObject *r = PyObject_CallMethodObjArgs(owner, name, (PyObject *)self, arg, NULL);
    Py_DECREF(owner);
    return r;
}

static PyObject *
tell_errno(Conduit *self, int error)
{
    PyObject *code = PyLong_FromLong(error);
    if (code == NULL)
        return NULL;
    PyObject *r = tell(self, str_lost, code);
    Py_DECREF(code);
    return r;
}

/* owner._fault(self, exception), with the exception raised meanwhile: the owner
 * reports it and ends the session. */
static PyObject *
tell_fault(Conduit *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *r = tell(self, str_fault, value);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return r;
}

static int
keep(Conduit *self, const char *data, Py_ssize_t n)
{
    if (self->size + n > self->capacity) {
        Py_ssize_t capacity = self->size + n;
        if (capacity < 2 * self->capacity)
            capacity = 2 * self->capacity; /* appends while blocked: our own messages, rare */
        char *grown = PyMem_Realloc(self->pending, capacity);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->pending = grown;
        self->capacity = capacity;
    }
    memcpy(self->pending + self->size, data, n);
    self->size += n;
    return 0;
}

/* Sends on this end's socket, or keeps what it does not take. New reference to the
 * owner's answer (None when nothing needed telling), NULL on an exception. */
static PyObject *
put(Conduit *self, const char *data, Py_ssize_t n)
{
    if (self->fd < 0)
        Py_RETURN_NONE; /* closed: as a transport's write after close */
    if (self->size > self->sent)
        return keep(self, data, n) < 0 ? NULL : (Py_INCREF(Py_None), Py_None);
    while (n > 0) {
        ssize_t w = send(self->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w >= 0) {
            data += w;
            n -= w;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            self->sent = self->size = 0;
            if (keep(self, data, n) < 0)
                return NULL;
            return tell(self, str_blocked, NULL);
        } else {
            return tell_errno(self, errno);
        }
    }
    Py_RETURN_NONE;
}

/* One chunk: count it, show it to the observer, send it on. */
static PyObject *
pass_on(Conduit *self, const char *chunk, Py_ssize_t n)
{
    Conduit *peer = self->peer;
    self->count += n;
    if (self->observer != NULL && self->observer != Py_None) {
        PyObject *data = PyBytes_FromStringAndSize(chunk, n);
        if (data == NULL)
            return NULL;
        int rc = call_with(self->observer, data);
        Py_DECREF(data);
        if (rc < 0)
            return tell_fault(self);
        peer = self->peer; /* the observer may have ended the session */
        if (peer == NULL)
            Py_RETURN_NONE;
    }
    Py_INCREF(peer);
    PyObject *r = put(peer, chunk, n);
    Py_DECREF(peer);
    return r;
}

/* Reads a chunk into `chunk` and passes it on; more only while each read fills it, up
 * to MAX_READS (then the others' turn). It stops at EAGAIN, the end, an error, or a
 * full peer socket. A short read is taken as all there was: if more came meanwhile,
 * or an error, the poller reports the socket again on its next wakeup. */
#define MAX_READS 4

static PyObject *
readable(Conduit *self, char *chunk)
{
    for (int reads = 0; reads < MAX_READS && self->fd >= 0 && self->reading; reads++) {
        ssize_t n = recv(self->fd, chunk, CHUNK, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return tell_errno(self, errno);
        }
        if (n == 0)
            return tell_errno(self, 0);
        if (self->peer != NULL) { /* else the other side is gone: read only to see this one close */
            PyObject *r = pass_on(self, chunk, n);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
            if (self->peer != NULL && self->peer->size > self->peer->sent)
                break; /* the peer's socket is full: reading waits for it */
        }
        if (n < CHUNK)
            break;
    }
    Py_RETURN_NONE;
}

static PyObject *
writable(Conduit *self)
{
    while (self->fd >= 0 && self->sent < self->size) {
        ssize_t w = send(self->fd, self->pending + self->sent, self->size - self->sent,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w >= 0)
            self->sent += w;
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        else if (errno != EINTR)
            return tell_errno(self, errno);
    }
    drop_pending(self);
    return tell(self, str_drained, NULL);
}

static PyObject *
Conduit_send(Conduit *self, PyObject *data)
{
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *r = put(self, view.buf, view.len);
    PyBuffer_Release(&view);
    return r;
}

static PyObject *
Conduit_link(Conduit *self, PyObject *peer)
{
    if (peer != Py_None && !PyObject_TypeCheck(peer, Py_TYPE(self))) {
        PyErr_SetString(PyExc_TypeError, "a Conduit or None");
        return NULL;
    }
    Py_XSETREF(self->peer, peer == Py_None ? NULL : (Py_INCREF(peer), (Conduit *)peer));
    Py_RETURN_NONE;
}

static PyObject *
Conduit_drop(Conduit *self, PyObject *Py_UNUSED(ignored))
{
    drop_pending(self);
    Py_RETURN_NONE;
}

static PyObject *
Conduit_shutdown(Conduit *self, PyObject *Py_UNUSED(ignored))
{
    if (self->fd >= 0)
        shutdown(self->fd, SHUT_WR); /* an error means it is closed already: reading tells */
    Py_RETURN_NONE;
}

static PyObject *
Conduit_close(Conduit *self, PyObject *Py_UNUSED(ignored))
{
    drop_pending(self);
    unwatch(self);
    if (self->fd >= 0) {
        close(self->fd);
        self->fd = -1;
    }
    Py_RETURN_NONE;
}

static PyObject *
Conduit_detach(Conduit *self, PyObject *Py_UNUSED(ignored))
{
    Conduit_clear(self);
    Py_RETURN_NONE;
}

static PyObject *
Conduit_get_buffered(Conduit *self, void *closure)
{
    return PyLong_FromSsize_t(self->size - self->sent);
}

static PyMethodDef Conduit_methods[] = {
    {"send", (PyCFunction)Conduit_send, METH_O, "Send bytes of our own on this end."},
    {"link", (PyCFunction)Conduit_link, METH_O, "Where what is read goes (None: dropped)."},
    {"drop", (PyCFunction)Conduit_drop, METH_NOARGS, "Forget what is buffered."},
    {"shutdown", (PyCFunction)Conduit_shutdown, METH_NOARGS, "End the stream this way (EOF)."},
    {"close", (PyCFunction)Conduit_close, METH_NOARGS, "Close the socket now."},
    {"detach", (PyCFunction)Conduit_detach, METH_NOARGS, "Drop the links to the owner, peer, observer."},
    {NULL},
};

static PyMemberDef Conduit_members[] = {
    {"fd", T_INT, offsetof(Conduit, fd), READONLY, "the socket, -1 once closed"},
    {"count", T_LONGLONG, offsetof(Conduit, count), READONLY, "bytes read and sent on"},
    {"observer", T_OBJECT, offsetof(Conduit, observer), 0, "sees each chunk before it is sent on, or None"},
    {"reading", T_BOOL, offsetof(Conduit, reading), READONLY, "watched for reading"},
    {"writing", T_BOOL, offsetof(Conduit, writing), READONLY, "watched for writing"},
    {NULL},
};

static PyGetSetDef Conduit_getset[] = {
    {"buffered", (getter)Conduit_get_buffered, NULL, "bytes the socket has not taken yet", NULL},
    {NULL},
};

static PyType_Slot Conduit_slots[] = {
    {Py_tp_doc, "One socket of a relayed session (see relay.SocketRelay)."},
    {Py_tp_new, Conduit_new},
    {Py_tp_init, Conduit_init},
    {Py_tp_dealloc, Conduit_dealloc},
    {Py_tp_traverse, Conduit_traverse},
    {Py_tp_clear, Conduit_clear},
    {Py_tp_methods, Conduit_methods},
    {Py_tp_members, Conduit_members},
    {Py_tp_getset, Conduit_getset},
    {0, NULL},
};

static PyType_Spec Conduit_spec = {
    .name = "slotproxy._walker.Conduit",
    .basicsize = sizeof(Conduit),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Conduit_slots,
};

/* -- Poller: the Conduits' epoll instance; the loop calls `dispatch` when it is readable. */

static PyObject *
Poller_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Poller *self = (Poller *)PyType_GenericNew(type, args, kwds);
    if (self == NULL)
        return NULL;
    self->fd = -1;
    self->chunk = PyMem_Malloc(CHUNK);
    if (self->chunk == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->fd = epoll_create1(EPOLL_CLOEXEC);
    if (self->fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
Poller_traverse(Poller *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    for (Conduit *c = self->watched; c != NULL; c = c->next)
        Py_VISIT((PyObject *)c);
    return 0;
}

static int
Poller_clear(Poller *self)
{
    while (self->watched != NULL)
        unwatch(self->watched);
    return 0;
}

static void
Poller_dealloc(Poller *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    Poller_clear(self);
    if (self->fd >= 0)
        close(self->fd);
    PyMem_Free(self->chunk);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyObject *
Poller_watch(Poller *self, PyObject *args)
{
    PyObject *c;
    int read, write;
    if (!PyArg_ParseTuple(args, "O!pp:watch", conduit_type, &c, &read, &write))
        return NULL;
    if (watch(self, (Conduit *)c, read, write) < 0)
        return NULL;
    Py_RETURN_NONE;
}

#define EVENTS 64

/* Serves what is ready. Where the owner's handling of an event raises, its `_fault`
 * ends that session (else the event, unhandled, would come back at every wakeup);
 * where that raises too, both its sockets are closed and the error goes to
 * sys.unraisablehook. The other sockets are served all the same. Only what is not
 * an Exception (KeyboardInterrupt, SystemExit) stops the batch and is raised. */
static PyObject *
Poller_dispatch(Poller *self, PyObject *Py_UNUSED(ignored))
{
    struct epoll_event ev[EVENTS];
    int n = epoll_wait(self->fd, ev, EVENTS, 0);
    if (n < 0)
        return errno == EINTR ? Py_NewRef(Py_None) : PyErr_SetFromErrno(PyExc_OSError);
    for (int i = 0; i < n; i++)
        Py_INCREF((PyObject *)ev[i].data.ptr); /* one may end another's session meanwhile */
    int stop = 0;
    for (int i = 0; i < n && !stop; i++) {
        Conduit *c = ev[i].data.ptr;
        uint32_t e = ev[i].events;
        PyObject *r = Py_NewRef(Py_None);
        if (c->poller == self && c->reading && (e & (EPOLLIN | EPOLLERR | EPOLLHUP)))
            Py_SETREF(r, readable(c, self->chunk));
        if (r != NULL && c->poller == self && c->writing && (e & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            Py_SETREF(r, writable(c));
        if (r == NULL && !PyErr_ExceptionMatches(PyExc_Exception)) {
            stop = 1;
            continue;
        }
        if (r == NULL)
            r = tell_fault(c);
        if (r == NULL && !PyErr_ExceptionMatches(PyExc_Exception)) {
            stop = 1;
            continue;
        }
        if (r == NULL) {
            PyErr_WriteUnraisable((PyObject *)c);
            Conduit *peer = c->peer;
            Py_XINCREF(peer);
            Py_XDECREF(Conduit_close(c, NULL));
            if (peer != NULL)
                Py_XDECREF(Conduit_close(peer, NULL));
            Py_XDECREF(peer);
        }
        Py_XDECREF(r);
    }
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    if (stop)
        PyErr_Fetch(&type, &value, &tb); /* not set while what the DECREFs free runs */
    for (int i = 0; i < n; i++)
        Py_DECREF((PyObject *)ev[i].data.ptr);
    if (stop) {
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Poller_methods[] = {
    {"watch", (PyCFunction)Poller_watch, METH_VARARGS,
     "watch(conduit, read, write): what to watch its socket for (neither: stop watching it)."},
    {"dispatch", (PyCFunction)Poller_dispatch, METH_NOARGS,
     "Read and send on every socket that is ready; the loop calls it when `fd` is readable."},
    {NULL},
};

static PyMemberDef Poller_members[] = {
    {"fd", T_INT, offsetof(Poller, fd), READONLY, "the epoll instance"},
    {"watching", T_PYSSIZET, offsetof(Poller, count), READONLY, "how many Conduits it watches"},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(Poller, weakrefs), READONLY},
    {NULL},
};

static PyType_Slot Poller_slots[] = {
    {Py_tp_doc, "The relayed sockets' epoll instance, one per event loop (see relay.poller_for)."},
    {Py_tp_new, Poller_new},
    {Py_tp_dealloc, Poller_dealloc},
    {Py_tp_traverse, Poller_traverse},
    {Py_tp_clear, Poller_clear},
    {Py_tp_methods, Poller_methods},
    {Py_tp_members, Poller_members},
    {0, NULL},
};

static PyType_Spec Poller_spec = {
    .name = "slotproxy._walker.Poller",
    .basicsize = sizeof(Poller),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Poller_slots,
};
#endif /* __linux__ */

static PyObject *
add_type(PyObject *module, PyType_Spec *spec, const char *name)
{
    PyObject *type = PyType_FromModuleAndSpec(module, spec, NULL);
    if (type == NULL)
        return NULL;
    int rc = PyModule_AddObjectRef(module, name, type);
    Py_DECREF(type);
    return rc < 0 ? NULL : type; /* borrowed: the module holds it */
}

static int
walker_exec(PyObject *module)
{
    const char *requests = "QF", *batch = "PBEDCH";
    for (const char *c = requests; *c; c++)
        client_kind[(unsigned char)*c] = REQUEST;
    for (const char *c = batch; *c; c++)
        client_kind[(unsigned char)*c] = BATCH;
    client_kind['S'] = SYNC;
    client_kind['X'] = TERMINATE;
    if (!add_type(module, &Walker_spec, "Walker") || !add_type(module, &Pump_spec, "Pump"))
        return -1;
#ifdef __linux__
    str_lost = PyUnicode_InternFromString("_lost");
    str_blocked = PyUnicode_InternFromString("_blocked");
    str_drained = PyUnicode_InternFromString("_drained");
    str_fault = PyUnicode_InternFromString("_fault");
    if (!str_lost || !str_blocked || !str_drained || !str_fault)
        return -1;
    conduit_type = (PyTypeObject *)add_type(module, &Conduit_spec, "Conduit");
    if (conduit_type == NULL || !add_type(module, &Poller_spec, "Poller"))
        return -1;
#endif
    return 0;
}

static PyModuleDef_Slot walker_module_slots[] = {
    {Py_mod_exec, walker_exec},
    {0, NULL},
};

static struct PyModuleDef walker_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "slotproxy._walker",
    .m_doc = "The relay's per-chunk work, compiled: the framing walker and the pump.",
    .m_size = 0,
    .m_slots = walker_module_slots,
};

PyMODINIT_FUNC
PyInit__walker(void)
{
    return PyModuleDef_Init(&walker_module);
}
