# C for render.py when Cython compiles it. An augmenting .pxd: render.py stays plain Python and is
# the reference: apigate_render_lines writes the same bytes as its render_in_python.
cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    #include <time.h>

    #define APIGATE_RECORD_SIZE 25
    /* The writers of a value are inlined into the line's loop: a call each cost ~20 of the
       ~100 instructions a value takes. */
    #if defined(__GNUC__)
    #define APIGATE_INLINE inline __attribute__((always_inline))
    #else
    #define APIGATE_INLINE CYTHON_INLINE
    #endif

    /* The batch's bytes: one bytes object, grown by doubling and cut to size at the end. */
    typedef struct { PyObject *bytes; char *p; Py_ssize_t len; Py_ssize_t cap; } apigate_out;

    static int apigate_grow(apigate_out *o, Py_ssize_t n) {
        Py_ssize_t cap = o->cap * 2;
        if (cap < o->len + n) cap = o->len + n;
        if (_PyBytes_Resize(&o->bytes, cap) < 0) return -1;  /* (the bytes are freed on failure) */
        o->p = PyBytes_AS_STRING(o->bytes);
        o->cap = cap;
        return 0;
    }

    /* Inlined, so that a literal's memcpy is a few moves. */
    static CYTHON_INLINE int apigate_room(apigate_out *o, Py_ssize_t n) {
        return o->len + n <= o->cap ? 0 : apigate_grow(o, n);
    }

    static CYTHON_INLINE int apigate_put(apigate_out *o, const char *s, Py_ssize_t n) {
        if (apigate_room(o, n) < 0) return -1;
        memcpy(o->p + o->len, s, (size_t)n);
        o->len += n;
        return 0;
    }

    #define APIGATE_PUT(o, literal) apigate_put((o), (literal), (Py_ssize_t)(sizeof(literal) - 1))

    /* 1 when every byte is 0x20-0x7F but quote and backslash: it goes between JSON quotes as it
       is. Eight bytes a step (no alignment needed with memcpy), then one at a time. */
    static APIGATE_INLINE int apigate_plain(const unsigned char *s, Py_ssize_t n) {
        const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
        const uint64_t quotes = 0x2222222222222222ULL, backslashes = 0x5C5C5C5C5C5C5C5CULL;
        uint64_t w, q, b;
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) {
            memcpy(&w, s + i, 8);
            q = w ^ quotes;
            b = w ^ backslashes;
            /* a byte below 0x20, a byte of 0x80 or more, a quote, a backslash */
            if (((w - 0x20 * ones) & ~w & highs) | (w & highs) | ((q - ones) & ~q & highs)
                | ((b - ones) & ~b & highs)) return 0;
        }
        for (; i < n; i++) {
            unsigned char c = s[i];
            if (c < 0x20 || c >= 0x80 || c == '"' || c == '\\\\') return 0;
        }
        return 1;
    }

    /* ``value`` written by the Python callable (JSON text as bytes). */
    static int apigate_put_json(apigate_out *o, PyObject *json_text, PyObject *value) {
        int done;
        PyObject *text = PyObject_CallOneArg(json_text, value);
        if (text == NULL) return -1;
        if (!PyBytes_Check(text)) {
            Py_DECREF(text);
            PyErr_SetString(PyExc_TypeError, "json_text must return bytes");
            return -1;
        }
        done = apigate_put(o, PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text));
        Py_DECREF(text);
        return done;
    }

    /* ``"text"`` for plain ASCII strings; None as null; anything else by ``json_text``. */
    static APIGATE_INLINE int apigate_put_text(apigate_out *o, PyObject *json_text, PyObject *value) {
        if (value == Py_None) return APIGATE_PUT(o, "null");
        if (PyUnicode_CheckExact(value) && PyUnicode_IS_ASCII(value)) {
            const unsigned char *s = (const unsigned char *)PyUnicode_DATA(value);
            Py_ssize_t n = PyUnicode_GET_LENGTH(value);
            if (apigate_plain(s, n)) {
                if (apigate_room(o, n + 2) < 0) return -1;
                o->p[o->len] = '"';
                memcpy(o->p + o->len + 1, s, (size_t)n);
                o->p[o->len + n + 1] = '"';
                o->len += n + 2;
                return 0;
            }
        }
        return apigate_put_json(o, json_text, value);
    }

    /* A request or trace id: bytes quoted as they are when plain, else decoded as latin-1 and
       written by ``json_text``. */
    static APIGATE_INLINE int apigate_put_id(apigate_out *o, PyObject *json_text, PyObject *raw) {
        PyObject *text;
        int done;
        if (!PyBytes_CheckExact(raw)) return apigate_put_json(o, json_text, raw);
        if (apigate_plain((const unsigned char *)PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))) {
            Py_ssize_t n = PyBytes_GET_SIZE(raw);
            if (apigate_room(o, n + 2) < 0) return -1;
            o->p[o->len] = '"';
            memcpy(o->p + o->len + 1, PyBytes_AS_STRING(raw), (size_t)n);
            o->p[o->len + n + 1] = '"';
            o->len += n + 2;
            return 0;
        }
        text = PyUnicode_DecodeLatin1(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw), NULL);
        if (text == NULL) return -1;
        done = apigate_put_json(o, json_text, text);
        Py_DECREF(text);
        return done;
    }

    /* v in decimal, written in place (the caller made room for 20 digits). */
    static APIGATE_INLINE void apigate_digits(apigate_out *o, unsigned long long v) {
        int n = 1;
        unsigned long long rest = v;
        char *end;
        while (rest >= 10) {
            rest /= 10;
            n++;
        }
        end = o->p + o->len + n;
        do {
            *--end = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        o->len += n;
    }

    /* The value of an int, without a call for the common small ones; 0 when it does not fit 64
       bits (no error left set). */
    static CYTHON_INLINE int apigate_int_value(PyObject *value, long long *v) {
        int overflow = 0;
    #if PY_VERSION_HEX >= 0x030C0000
        if (PyUnstable_Long_IsCompact((PyLongObject *)value)) {
            *v = (long long)PyUnstable_Long_CompactValue((PyLongObject *)value);
            return 1;
        }
    #else
        Py_ssize_t size = Py_SIZE(value);
        if (size == 0 || size == 1 || size == -1) {
            *v = size * (long long)((PyLongObject *)value)->ob_digit[0];
            return 1;
        }
    #endif
        *v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow || (*v == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }

    /* An int that fits 64 bits (a signed one) in decimal; anything else by ``json_text``. With
       ``millis``, a count of microseconds (0 or more) as milliseconds with three decimals. */
    static APIGATE_INLINE int apigate_put_int(apigate_out *o, PyObject *json_text, PyObject *value, int millis) {
        long long v;
        if (!PyLong_CheckExact(value) || !apigate_int_value(value, &v) || (millis && v < 0))
            return apigate_put_json(o, json_text, value);
        if (apigate_room(o, 26) < 0) return -1;
        if (millis) {
            unsigned long long part = (unsigned long long)v % 1000;
            apigate_digits(o, (unsigned long long)v / 1000);
            o->p[o->len] = '.';
            o->p[o->len + 1] = (char)('0' + part / 100);
            o->p[o->len + 2] = (char)('0' + part / 10 % 10);
            o->p[o->len + 3] = (char)('0' + part % 10);
            o->len += 4;
        } else if (v < 0) {
            o->p[o->len++] = '-';
            apigate_digits(o, 0ULL - (unsigned long long)v);
        } else {
            apigate_digits(o, (unsigned long long)v);
        }
        return 0;
    }

    /* "YYYY-MM-DDTHH:MM:SS" of the last second asked for (lines of one second share it). */
    static long long apigate_second = -1;
    static char apigate_second_text[32];
    static Py_ssize_t apigate_second_length = 0;

    static int apigate_put_time(apigate_out *o, double wall) {
        long long milli = (long long)(wall * 1000.0);
        long long second = milli / 1000;
        int part = (int)(milli % 1000);
        if (milli < 0) {
            PyErr_SetString(PyExc_ValueError, "a time before 1970");
            return -1;
        }
        if (second != apigate_second) {
            struct tm t;
            time_t when = (time_t)second;
            if (gmtime_r(&when, &t) == NULL
                || strftime(apigate_second_text, sizeof(apigate_second_text), "%Y-%m-%dT%H:%M:%S", &t) == 0) {
                PyErr_SetString(PyExc_ValueError, "a time out of range");
                return -1;
            }
            apigate_second = second;
            apigate_second_length = (Py_ssize_t)strlen(apigate_second_text);
        }
        {
            Py_ssize_t n = apigate_second_length;
            if (apigate_room(o, n + 6) < 0) return -1;
            memcpy(o->p + o->len, apigate_second_text, (size_t)n);
            o->len += n;
            o->p[o->len] = '.';
            o->p[o->len + 1] = (char)('0' + part / 100);
            o->p[o->len + 2] = (char)('0' + part / 10 % 10);
            o->p[o->len + 3] = (char)('0' + part % 10);
            o->p[o->len + 4] = 'Z';
            o->len += 5;
        }
        return 0;
    }

    static const char *const apigate_optional_names[8] = {
        ",\\"consumer\\":", ",\\"tenant\\":", ",\\"key_id\\":", ",\\"user_id\\":",
        ",\\"limited\\":", ",\\"cache\\":", ",\\"tried\\":", ",\\"error\\":",
    };
    static const Py_ssize_t apigate_optional_lengths[8] = {12, 10, 10, 11, 11, 9, 9, 9};

    static int apigate_line(apigate_out *o, PyObject *record, double offset, PyObject *json_text) {
        PyObject **f;
        double start;
        int keep, i;
        if (!PyTuple_CheckExact(record) || PyTuple_GET_SIZE(record) != APIGATE_RECORD_SIZE) {
            PyErr_SetString(PyExc_TypeError, "an access-log record is a tuple of 25 values");
            return -1;
        }
        f = &PyTuple_GET_ITEM(record, 0);
        keep = f[0] == Py_True;
        start = PyFloat_AsDouble(f[2]);
        if (start == -1.0 && PyErr_Occurred()) return -1;
        if (APIGATE_PUT(o, "{\\"time\\":\\"") < 0 || apigate_put_time(o, start + offset) < 0
            || APIGATE_PUT(o, "\\",\\"request_id\\":") < 0 || apigate_put_id(o, json_text, f[4]) < 0
            || APIGATE_PUT(o, ",\\"trace_id\\":") < 0 || apigate_put_id(o, json_text, f[5]) < 0
            || APIGATE_PUT(o, ",\\"client_ip\\":") < 0 || apigate_put_text(o, json_text, f[6]) < 0
            || APIGATE_PUT(o, ",\\"method\\":") < 0 || apigate_put_text(o, json_text, f[7]) < 0
            || APIGATE_PUT(o, ",\\"path\\":") < 0 || apigate_put_text(o, json_text, f[8]) < 0
            || APIGATE_PUT(o, ",\\"status\\":") < 0 || apigate_put_int(o, json_text, f[9], 0) < 0
            || APIGATE_PUT(o, ",\\"duration_ms\\":") < 0 || apigate_put_int(o, json_text, f[3], 1) < 0
            || APIGATE_PUT(o, ",\\"bytes_in\\":") < 0 || apigate_put_int(o, json_text, f[10], 0) < 0
            || APIGATE_PUT(o, ",\\"bytes_out\\":") < 0 || apigate_put_int(o, json_text, f[11], 0) < 0
            || APIGATE_PUT(o, ",\\"attempts\\":") < 0 || apigate_put_int(o, json_text, f[12], 0) < 0)
            return -1;
        if (f[13] != Py_None || keep) {
            if (APIGATE_PUT(o, ",\\"route\\":") < 0 || apigate_put_text(o, json_text, f[13]) < 0) return -1;
        }
        if (f[14] != Py_None || keep) {
            if (APIGATE_PUT(o, ",\\"upstream\\":") < 0 || apigate_put_text(o, json_text, f[14]) < 0) return -1;
        }
        if (f[15] != Py_None) {
            if (APIGATE_PUT(o, ",\\"upstream_ms\\":") < 0 || apigate_put_int(o, json_text, f[15], 1) < 0)
                return -1;
        } else if (keep && APIGATE_PUT(o, ",\\"upstream_ms\\":null") < 0) {
            return -1;
        }
        for (i = 0; i < 8; i++) {
            PyObject *value = f[16 + i];
            if (value == Py_None && !keep) continue;
            if (apigate_put(o, apigate_optional_names[i], apigate_optional_lengths[i]) < 0
                || apigate_put_text(o, json_text, value) < 0)
                return -1;
        }
        if (f[24] != Py_None) {
            if (!PyBytes_Check(f[24])) {
                PyErr_SetString(PyExc_TypeError, "a record's headers are JSON text as bytes");
                return -1;
            }
            if (APIGATE_PUT(o, ",\\"headers\\":") < 0
                || apigate_put(o, PyBytes_AS_STRING(f[24]), PyBytes_GET_SIZE(f[24])) < 0)
                return -1;
        }
        return APIGATE_PUT(o, "}\\n");
    }

    static PyObject *apigate_render_lines(PyObject *records, double offset, PyObject *json_text) {
        apigate_out o;
        Py_ssize_t i, count = PyList_GET_SIZE(records);
        o.cap = count * 400 + 64;
        o.len = 0;
        o.bytes = PyBytes_FromStringAndSize(NULL, o.cap);
        if (o.bytes == NULL) return NULL;
        o.p = PyBytes_AS_STRING(o.bytes);
        for (i = 0; i < PyList_GET_SIZE(records); i++) {
            PyObject *record = PyList_GET_ITEM(records, i);
            PyObject *choose;
            Py_ssize_t begun = o.len;
            Py_INCREF(record);  /* (a callable below may change the list) */
            if (apigate_line(&o, record, offset, json_text) < 0) goto failed;
            choose = PyTuple_GET_ITEM(record, 1);
            if (choose != Py_None) {
                /* Chosen fields: the whole line is made and ``choose`` makes the chosen one. */
                PyObject *whole = PyBytes_FromStringAndSize(o.p + begun, o.len - begun);
                PyObject *chosen;
                if (whole == NULL) goto failed;
                chosen = PyObject_CallOneArg(choose, whole);
                Py_DECREF(whole);
                if (chosen == NULL) goto failed;
                if (!PyBytes_Check(chosen)) {
                    Py_DECREF(chosen);
                    PyErr_SetString(PyExc_TypeError, "choose must return bytes");
                    goto failed;
                }
                o.len = begun;
                if (apigate_put(&o, PyBytes_AS_STRING(chosen), PyBytes_GET_SIZE(chosen)) < 0) {
                    Py_DECREF(chosen);
                    goto failed;
                }
                Py_DECREF(chosen);
            }
            Py_DECREF(record);
            continue;
        failed:
            Py_DECREF(record);
            Py_XDECREF(o.bytes);
            return NULL;
        }
        if (_PyBytes_Resize(&o.bytes, o.len) < 0) return NULL;
        return o.bytes;
    }
    """
    object _render_in_c "apigate_render_lines"(list records, double offset, object json_text)
