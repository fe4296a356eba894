# C types for heads.py when Cython compiles it. An augmenting .pxd: heads.py stays plain Python.
cimport cython

cdef bytes _CLASSES
cdef bytes _LOWER
cdef list _names
cdef dict _FRAMING, _METHODS, _VERSIONS
cdef Py_ssize_t _NAME_SLOTS, _MAX_DIGITS
cdef unsigned char _TOKEN, _TEXT, _CR, _LF, _SP, _TAB, _COLON, _SLASH, _DIGIT_0, _DIGIT_9
cdef int _CONTENT_LENGTH, _CONNECTION, _REFUSED

@cython.locals(lower="const unsigned char*", known="const unsigned char*", slot=Py_ssize_t, i=Py_ssize_t,
               name=bytes)
cdef bytes _lower_name(const unsigned char* s, Py_ssize_t start, Py_ssize_t stop)

@cython.locals(s="const unsigned char*", classes="const unsigned char*", n=Py_ssize_t, headers=list,
               length="long long", close=bint, keep_alive=bint, start=Py_ssize_t, stop=Py_ssize_t,
               i=Py_ssize_t, name=bytes)
cdef tuple _read_headers(bytes data, Py_ssize_t p, Py_ssize_t limit)

@cython.locals(s="const unsigned char*", classes="const unsigned char*", n=Py_ssize_t, p=Py_ssize_t,
               start=Py_ssize_t)
cpdef tuple read_request(bytes data, Py_ssize_t limit)

@cython.locals(s="const unsigned char*", classes="const unsigned char*", n=Py_ssize_t, p=Py_ssize_t,
               status=int)
cpdef tuple read_response(bytes data, Py_ssize_t limit)

# Skips 8-byte words of a field value that are all visible ASCII or space (0x20-0x7E), read
# with memcpy (no alignment needed); the byte loop goes on from the first word that is not.
cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    static CYTHON_INLINE Py_ssize_t apigate_skip_plain_words(const unsigned char *s, Py_ssize_t p, Py_ssize_t n) {
        const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
        uint64_t w;
        while (p + 8 <= n) {
            memcpy(&w, s + p, 8);
            /* a byte below 0x20, or a byte of 0x7F and above */
            if (((w - 0x20 * ones) & ~w & highs) | (((w + ones) | w) & highs)) break;
            p += 8;
        }
        return p;
    }
    """
    Py_ssize_t _skip_plain_words "apigate_skip_plain_words"(const unsigned char* s, Py_ssize_t p, Py_ssize_t n)
