/* The compiled run core (issue 16): the bulk path's two per-event loops in C.
 *
 * `sidecar.runcore` picks this module when it is built, and the pure-Python twins there
 * otherwise; the property tests and the fuzz target hold the two to the same results.
 *
 * Rules this module keeps:
 *
 * 1. `scan_run` returns exactly what `runcore.PythonCore.scan_run` returns for the same region,
 *    or None exactly when it does; the region must be valid UTF-8 (the parser checks it first).
 * 2. Nothing is allocated for a region whose first block does not have a run's shape; a region
 *    that fails later frees what it built and returns None.
 * 3. `format_run` builds each payload in one allocation, byte for byte what the Python twin's
 *    %-format builds, and the running byte totals with them.
 * 4. Neither function keeps a reference to its arguments or any state between calls.
 * 5. Arguments outside what the sidecar passes raise, never crash: a wrong type TypeError,
 *    a negative seq ValueError, a seq or byte total past 2**63 OverflowError (the twins,
 *    with Python's ints, have no such bound; no stream gets near it).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static const char DATA_LINE[] = "data: ";
#define DATA_LINE_LEN 6
static const char NOTIFICATION_DATA[] = "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/";
#define NOTIFICATION_DATA_LEN ((Py_ssize_t)(sizeof(NOTIFICATION_DATA) - 1))
static const char ID_LINE[] = "id: ";
#define ID_LINE_LEN 4
static const char EVENT_MESSAGE[] = "event: message";
#define EVENT_MESSAGE_LEN 14

enum role { ROLE_DATA = 1, ROLE_ID = 2, ROLE_EVENT = 3 };

static int
starts_with(const char *p, Py_ssize_t len, const char *prefix, Py_ssize_t plen)
{
    return len >= plen && memcmp(p, prefix, (size_t)plen) == 0;
}

/* The end of the line starting at `p` (its LF, or `end`). */
static inline const char *
line_end(const char *p, const char *end)
{
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    return nl != NULL ? nl : end;
}

/* Append a new reference to `list` and drop it (NULL: the call that made it failed). */
static int
append_new(PyObject *list, PyObject *item)
{
    if (item == NULL) {
        return -1;
    }
    int failed = PyList_Append(list, item);
    Py_DECREF(item);
    return failed;
}

PyDoc_STRVAR(scan_run_doc,
"scan_run(region: bytes, max_id: int) -> (data_lines, ids, notifications, plain_ids) | None\n\n"
"The run in `region` (complete blocks, valid UTF-8), or None if its blocks do not all have\n"
"one plain shape.");

/* An id that goes into our ids as it is (runcore.plain_ids): 1..max_id bytes of printable
 * ASCII, neither starting with a space or "~" nor ending with a space. */
static int
plain_id(const char *p, Py_ssize_t len, Py_ssize_t max_id)
{
    if (len < 1 || len > max_id || p[0] == ' ' || p[0] == '~' || p[len - 1] == ' ') {
        return 0;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        if ((unsigned char)p[i] < 0x20 || (unsigned char)p[i] > 0x7e) {
            return 0;
        }
    }
    return 1;
}

static PyObject *
scan_run(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "scan_run(region: bytes, max_id: int) expected");
        return NULL;
    }
    Py_ssize_t max_id = PyLong_AsSsize_t(args[1]);
    if (max_id == -1 && PyErr_Occurred()) {
        return NULL;
    }
    const char *buf = PyBytes_AS_STRING(args[0]);
    const char *end = buf + PyBytes_GET_SIZE(args[0]);

    /* The first block's lines, up to the first empty line (or the end), fix the roles. */
    int roles[3];
    Py_ssize_t width = 0;
    int have_data = 0, have_id = 0, have_event = 0;
    const char *p = buf;
    for (;;) {
        const char *e = line_end(p, end);
        Py_ssize_t len = e - p;
        if (len == 0) {
            break;
        }
        if (width == 3) {
            Py_RETURN_NONE; /* more lines than a plain block has */
        }
        if (starts_with(p, len, DATA_LINE, DATA_LINE_LEN) && !have_data) {
            roles[width] = ROLE_DATA;
            have_data = 1;
        }
        else if (starts_with(p, len, ID_LINE, ID_LINE_LEN) && !have_id) {
            roles[width] = ROLE_ID;
            have_id = 1;
        }
        else if (len == EVENT_MESSAGE_LEN && memcmp(p, EVENT_MESSAGE, EVENT_MESSAGE_LEN) == 0
                 && !have_event) {
            roles[width] = ROLE_EVENT;
            have_event = 1;
        }
        else {
            Py_RETURN_NONE;
        }
        width++;
        if (e == end) {
            break;
        }
        p = e + 1;
    }
    if (!have_data) {
        Py_RETURN_NONE;
    }

    PyObject *data_lines = PyList_New(0);
    PyObject *ids = have_id ? PyList_New(0) : NULL;
    if (data_lines == NULL || (have_id && ids == NULL)) {
        goto error;
    }
    int notifications = 1, plain = 1;
    p = buf;
    for (;;) {
        for (Py_ssize_t c = 0; c < width; c++) {
            if (p > end) {
                goto mismatch; /* the region ends inside a block */
            }
            const char *e = line_end(p, end);
            Py_ssize_t len = e - p;
            switch (roles[c]) {
            case ROLE_DATA:
                if (!starts_with(p, len, DATA_LINE, DATA_LINE_LEN) || len == DATA_LINE_LEN) {
                    goto mismatch; /* another field, or an empty data line */
                }
                if (notifications && !starts_with(p, len, NOTIFICATION_DATA, NOTIFICATION_DATA_LEN)) {
                    notifications = 0;
                }
                if (append_new(data_lines, PyBytes_FromStringAndSize(p, len)) < 0) {
                    goto error;
                }
                break;
            case ROLE_ID:
                if (!starts_with(p, len, ID_LINE, ID_LINE_LEN) || len == ID_LINE_LEN
                    || memchr(p, '\0', (size_t)len) != NULL) {
                    goto mismatch; /* another field, an empty id (a reset) or a NUL */
                }
                if (plain && !plain_id(p + ID_LINE_LEN, len - ID_LINE_LEN, max_id)) {
                    plain = 0;
                }
                if (append_new(ids, PyUnicode_DecodeUTF8(p + ID_LINE_LEN, len - ID_LINE_LEN,
                                                         "strict")) < 0) {
                    goto error;
                }
                break;
            default: /* ROLE_EVENT */
                if (len != EVENT_MESSAGE_LEN || memcmp(p, EVENT_MESSAGE, EVENT_MESSAGE_LEN) != 0) {
                    goto mismatch;
                }
                break;
            }
            p = e + 1;
        }
        if (p == end + 1) {
            break; /* the block's last line ended the region */
        }
        /* Otherwise a blank line, then the next block (a LF ending the region is a blank
         * line with no block after it). */
        if (p == end || *p != '\n') {
            goto mismatch;
        }
        p++;
    }
    return Py_BuildValue("(NNOO)", data_lines, have_id ? ids : Py_NewRef(Py_None),
                         notifications ? Py_True : Py_False, plain ? Py_True : Py_False);

mismatch:
    Py_XDECREF(data_lines);
    Py_XDECREF(ids);
    Py_RETURN_NONE;
error:
    Py_XDECREF(data_lines);
    Py_XDECREF(ids);
    return NULL;
}

PyDoc_STRVAR(format_run_doc,
"format_run(prefix, seq, ids, data_lines, suffix, total) -> (payloads, cumulative)\n\n"
"Payload i is prefix + str(seq + 1 + i) + (b'.' + ids[i] in UTF-8 if ids is not None else\n"
"suffix) + b'\\n' + data_lines[i] + b'\\n\\n'; cumulative is the running byte total from\n"
"`total`, `total` first (itertools.accumulate with initial=total).");

/* Decimal digits of v (v >= 0) written backwards from `out_end`; returns the first digit. */
static char *
write_decimal(char *out_end, unsigned long long v)
{
    char *q = out_end;
    do {
        *--q = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    return q;
}

static PyObject *
format_run(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "format_run() takes 6 arguments");
        return NULL;
    }
    PyObject *prefix = args[0], *ids = args[2], *data_lines = args[3], *suffix = args[4];
    if (!PyBytes_Check(prefix) || !PyBytes_Check(suffix) || !PyList_Check(data_lines)
        || (ids != Py_None && !PyList_Check(ids))) {
        PyErr_SetString(PyExc_TypeError,
                        "format_run(bytes, int, list | None, list, bytes, int) expected");
        return NULL;
    }
    long long seq = PyLong_AsLongLong(args[1]);
    if (seq == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long long total = PyLong_AsLongLong(args[5]);
    if (total == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (seq < 0) {
        PyErr_SetString(PyExc_ValueError, "format_run() needs seq >= 0");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(data_lines);
    int with_ids = ids != Py_None;
    if (with_ids && PyList_GET_SIZE(ids) != n) {
        PyErr_SetString(PyExc_ValueError, "format_run() needs as many ids as data lines");
        return NULL;
    }
    const char *pre = PyBytes_AS_STRING(prefix);
    Py_ssize_t pre_len = PyBytes_GET_SIZE(prefix);
    const char *suf = PyBytes_AS_STRING(suffix);
    Py_ssize_t suf_len = PyBytes_GET_SIZE(suffix);

    PyObject *payloads = PyList_New(n);
    PyObject *cumulative = PyList_New(n + 1);
    if (payloads == NULL || cumulative == NULL) {
        goto error;
    }
    PyObject *first = PyLong_FromLongLong(total);
    if (first == NULL) {
        goto error;
    }
    PyList_SET_ITEM(cumulative, 0, first);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *data = PyList_GET_ITEM(data_lines, i);
        if (!PyBytes_Check(data)) {
            PyErr_SetString(PyExc_TypeError, "format_run() needs bytes data lines");
            goto error;
        }
        const char *tail = suf;
        Py_ssize_t tail_len = suf_len;
        if (with_ids) {
            PyObject *id = PyList_GET_ITEM(ids, i);
            if (!PyUnicode_Check(id)) {
                PyErr_SetString(PyExc_TypeError, "format_run() needs str ids");
                goto error;
            }
            /* An ASCII str's own bytes; others' cached UTF-8 (the event path's encoding). */
            tail = PyUnicode_AsUTF8AndSize(id, &tail_len);
            if (tail == NULL) {
                goto error;
            }
        }
        char digits[24];
        char *d = write_decimal(digits + sizeof(digits), (unsigned long long)seq + 1 + (unsigned long long)i);
        Py_ssize_t d_len = digits + sizeof(digits) - d;
        Py_ssize_t data_len = PyBytes_GET_SIZE(data);
        Py_ssize_t size = pre_len + d_len + with_ids + tail_len + 1 + data_len + 2;
        PyObject *payload = PyBytes_FromStringAndSize(NULL, size);
        if (payload == NULL) {
            goto error;
        }
        char *out = PyBytes_AS_STRING(payload);
        memcpy(out, pre, (size_t)pre_len);
        out += pre_len;
        memcpy(out, d, (size_t)d_len);
        out += d_len;
        if (with_ids) {
            *out++ = '.';
        }
        memcpy(out, tail, (size_t)tail_len);
        out += tail_len;
        *out++ = '\n';
        memcpy(out, PyBytes_AS_STRING(data), (size_t)data_len);
        out += data_len;
        out[0] = '\n';
        out[1] = '\n';
        PyList_SET_ITEM(payloads, i, payload);
        if (__builtin_add_overflow(total, (long long)size, &total)) {
            PyErr_SetString(PyExc_OverflowError, "format_run() total past 2**63");
            goto error;
        }
        PyObject *running = PyLong_FromLongLong(total);
        if (running == NULL) {
            goto error;
        }
        PyList_SET_ITEM(cumulative, i + 1, running);
    }
    return Py_BuildValue("(NN)", payloads, cumulative);

error:
    Py_XDECREF(payloads);
    Py_XDECREF(cumulative);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan_run", (PyCFunction)(void (*)(void))scan_run, METH_FASTCALL, scan_run_doc},
    {"format_run", (PyCFunction)(void (*)(void))format_run, METH_FASTCALL, format_run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot slots[] = {
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sidecar._runcore",
    .m_doc = "The bulk path's per-event loops in C (see sidecar/runcore.py).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__runcore(void)
{
    return PyModuleDef_Init(&module_def);
}
