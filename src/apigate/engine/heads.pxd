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
