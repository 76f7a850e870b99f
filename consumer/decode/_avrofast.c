/* Batch decoder: Confluent-framed Avro usage events -> columnar buffers.
 *
 * The contract is one-sided. A row is returned as decoded only when the reference decoder
 * (consumer/decode/reference.py over fastavro) certainly returns the same event; on any doubt the
 * row is marked slow, its outputs are rolled back to empty, and the caller asks the
 * reference. So every check here may be stricter than fastavro, never laxer.
 *
 * A "program" (built and self-checked by consumer/decode/fast.py) describes one writer
 * schema: the writer's fields in order, each either read into an output column or
 * skipped. Programs are validated here before use, so a bad program is an error, never
 * an out-of-bounds read.
 *
 * The per-row work touches no Python object, so it runs with the GIL released for large
 * batches: the input bytes are held by a private tuple, the programs by owned references.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Program layout: PROG_MAGIC, PROG_VERSION, then ops. Must match consumer/decode/fast.py. */
#define PROG_MAGIC 0xAF
#define PROG_VERSION 1
enum {
    OP_EVENT_ID = 1, /* ops 1..4: a string into output column op-1 */
    OP_EVENT_NAME = 2,
    OP_CUSTOMER_ID = 3,
    OP_CANCELS = 4,
    OP_SOURCE = 5, /* a string, validated, not output */
    OP_VALUE = 6,  /* bytes: decimal(38, 9) unscaled */
    OP_TIMESTAMP = 7,
    OP_PROPERTIES = 8, /* map<string> */
    OP_SKIP = 9        /* followed by a type */
};
/* Skipped types; T_FIXED and T_ENUM carry a 4-byte little-endian size or symbol count,
 * T_ARRAY and T_MAP are followed by their item type. */
enum {
    T_NULL = 0,
    T_BOOLEAN,
    T_INT,
    T_LONG,
    T_FLOAT,
    T_DOUBLE,
    T_STRING,
    T_BYTES,
    T_FIXED,
    T_ENUM,
    T_ARRAY,
    T_MAP
};
#define MAX_TYPE_DEPTH 8
#define REQUIRED_OPS                                                                       \
    ((1u << OP_EVENT_ID) | (1u << OP_EVENT_NAME) | (1u << OP_CUSTOMER_ID) |                \
     (1u << OP_VALUE) | (1u << OP_TIMESTAMP))

#define NCOLS 4
#define HEADER_SIZE 5
#define MAX_ID_BYTES 200
/* Items of zero bytes cost no input, so their number is bounded apart: a message of L
 * bytes could otherwise ask for L blocks of L items each. */
#define MAX_ZERO_ITEMS 65536
/* Duplicate keys are found pairwise; larger maps are left to the reference. */
#define MAX_MAP_ENTRIES 64
/* Below this many rows the GIL is kept: re-acquiring it can cost a switch interval. */
#define NOGIL_MIN_ROWS 4096

/* 10**38, the bound on |unscaled| for decimal(38, 9). */
#define LIMIT_HI 0x4B3B4CA85A86C47AULL
#define LIMIT_LO 0x098A224000000000ULL

enum { ROW_OK = 0, ROW_SLOW = 1, ROW_NOMEM = -1 };

/* ------------------------------------------------------------------------------------ */
/* Buffer: owns one PyMem_Raw allocation and exports it through the buffer protocol, so
 * numpy and Arrow wrap it without a copy and keep it alive. */

typedef struct {
    PyObject_HEAD
    void *data;
    Py_ssize_t size;
} BufferObject;

static void
Buffer_dealloc(PyObject *self)
{
    PyMem_RawFree(((BufferObject *)self)->data);
    Py_TYPE(self)->tp_free(self);
}

static int
Buffer_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    BufferObject *b = (BufferObject *)self;
    return PyBuffer_FillInfo(view, self, b->data, b->size, 0, flags);
}

static Py_ssize_t
Buffer_length(PyObject *self)
{
    return ((BufferObject *)self)->size;
}

static PyBufferProcs Buffer_as_buffer = {Buffer_getbuffer, NULL};
static PySequenceMethods Buffer_as_sequence = {.sq_length = Buffer_length};

static PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "consumer._avrofast.Buffer",
    .tp_basicsize = sizeof(BufferObject),
    .tp_dealloc = Buffer_dealloc,
    .tp_as_sequence = &Buffer_as_sequence,
    .tp_as_buffer = &Buffer_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Memory owned by the decoder's output; exported as a writable buffer.",
};

/* Takes ownership of `data` (freed on failure too). */
static PyObject *
buffer_new(void *data, size_t size)
{
    BufferObject *b = PyObject_New(BufferObject, &BufferType);
    if (b == NULL) {
        PyMem_RawFree(data);
        return NULL;
    }
    b->data = data;
    b->size = (Py_ssize_t)size;
    return (PyObject *)b;
}

/* ------------------------------------------------------------------------------------ */
/* Growable arrays. Sizes stay below INT32_MAX (Arrow int32 offsets), checked by callers. */

typedef struct {
    uint8_t *p;
    size_t len, cap;
} Bytes;

typedef struct {
    int32_t *p;
    size_t len, cap; /* in elements */
} Ints;

/* `p` grown to hold `need` elements (NULL when out of memory; `p` is then still valid). */
static void *
grow(void *p, size_t *cap, size_t need, size_t elem)
{
    size_t c = *cap ? *cap : 256;
    while (c < need)
        c *= 2; /* need < 2**31 elements, no overflow */
    if (c > SIZE_MAX / elem)
        return NULL;
    void *q = PyMem_RawRealloc(p, c * elem);
    if (q != NULL)
        *cap = c;
    return q;
}

static inline int
bytes_put(Bytes *b, const uint8_t *s, size_t n)
{
    if (b->cap - b->len < n) {
        uint8_t *q = grow(b->p, &b->cap, b->len + n, 1);
        if (q == NULL)
            return -1;
        b->p = q;
    }
    if (n)
        memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

static inline int
ints_put(Ints *a, int32_t v)
{
    if (a->len == a->cap) {
        int32_t *q = grow(a->p, &a->cap, a->len + 1, sizeof(int32_t));
        if (q == NULL)
            return -1;
        a->p = q;
    }
    a->p[a->len++] = v;
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Avro primitives over a bounds-checked cursor. */

typedef struct {
    const uint8_t *p, *end;
    size_t zero_items; /* budget for array items of zero bytes (null, fixed(0)) */
} Cur;

static inline size_t
left(const Cur *c)
{
    return (size_t)(c->end - c->p);
}

/* A varint of at most `maxbytes` bytes. Only minimal encodings that fit in 64 bits are
 * accepted: fastavro reads longer or padded ones too, but not always to the same value. */
static inline int
rd_varint(Cur *c, uint64_t *out, int maxbytes)
{
    uint64_t n = 0;
    for (int i = 0; i < maxbytes; i++) {
        if (c->p >= c->end)
            return -1;
        uint8_t b = *c->p++;
        n |= (uint64_t)(b & 0x7F) << (7 * i);
        if (!(b & 0x80)) {
            if (i > 0 && b == 0)
                return -1; /* padded */
            if (i == 9 && b > 1)
                return -1; /* bits beyond 64 */
            *out = n;
            return 0;
        }
    }
    return -1;
}

static inline int64_t
unzigzag(uint64_t n)
{
    uint64_t u = (n >> 1) ^ (0 - (n & 1));
    /* Portable uint64 -> int64 (the plain conversion is implementation-defined). */
    return u <= (uint64_t)INT64_MAX ? (int64_t)u : -(int64_t)(~u) - 1;
}

static inline int
rd_long(Cur *c, int64_t *v)
{
    uint64_t n;
    if (c->p < c->end && *c->p < 0x80) { /* one byte: most lengths and counts */
        n = *c->p++;
        *v = (int64_t)(n >> 1) ^ -(int64_t)(n & 1);
        return 0;
    }
    if (rd_varint(c, &n, 10))
        return -1;
    *v = unzigzag(n);
    return 0;
}

/* An Avro int: at most 5 bytes and within 32 bits. */
static inline int
rd_int(Cur *c, int64_t *v)
{
    uint64_t n;
    if (rd_varint(c, &n, 5) || n > 0xFFFFFFFFu)
        return -1;
    *v = unzigzag(n);
    return 0;
}

/* A length prefix: non-negative and within the message. */
static inline int
rd_len(Cur *c, size_t *len)
{
    int64_t v;
    if (rd_long(c, &v) || v < 0 || (uint64_t)v > (uint64_t)left(c))
        return -1;
    *len = (size_t)v;
    return 0;
}

/* Exactly what Python's strict bytes.decode("utf-8") accepts: no overlong forms, no
 * surrogates, nothing above U+10FFFF. */
static int
utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        while (n - i >= 8) { /* ASCII runs, a word at a time */
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ULL)
                break;
            i += 8;
        }
        if (i >= n)
            break;
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
        }
        else if (c < 0xC2) {
            return 0; /* stray continuation byte, or overlong 2-byte lead */
        }
        else if (c < 0xE0) {
            if (n - i < 2 || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        }
        else if (c < 0xF0) {
            if (n - i < 3 || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xE0 && s[i + 1] < 0xA0) || (c == 0xED && s[i + 1] > 0x9F))
                return 0; /* overlong, or a surrogate */
            i += 3;
        }
        else if (c < 0xF5) {
            if (n - i < 4 || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 ||
                (s[i + 3] & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && s[i + 1] < 0x90) || (c == 0xF4 && s[i + 1] > 0x8F))
                return 0; /* overlong, or above U+10FFFF */
            i += 4;
        }
        else {
            return 0;
        }
    }
    return 1;
}

static inline int
rd_str(Cur *c, const uint8_t **s, size_t *len)
{
    if (rd_len(c, len))
        return -1;
    *s = c->p;
    if (!utf8_valid(*s, *len))
        return -1;
    c->p += *len;
    return 0;
}

/* Bytes holding a two's-complement big-endian unscaled integer -> 16 bytes little-endian,
 * as Arrow's decimal128 stores it. Slow when |x| >= 10**38 or when there are no bytes at all
 * (Java Avro refuses an empty decimal; the reference rejects both). */
static int
rd_decimal(Cur *c, uint8_t out[16])
{
    size_t len;
    if (rd_len(c, &len) || len == 0)
        return -1;
    const uint8_t *q = c->p;
    c->p += len;
    /* Drop sign-extension bytes: int.from_bytes gives them no weight. */
    while (len > 1 && ((q[0] == 0x00 && !(q[1] & 0x80)) || (q[0] == 0xFF && (q[1] & 0x80)))) {
        q++;
        len--;
    }
    if (len > 16)
        return -1;
    int neg = q[0] & 0x80;
    uint8_t be[16];
    memset(be, neg ? 0xFF : 0x00, sizeof be);
    memcpy(be + 16 - len, q, len);
    uint64_t hi = 0, lo = 0;
    for (int k = 0; k < 8; k++) {
        hi = hi << 8 | be[k];
        lo = lo << 8 | be[8 + k];
    }
    uint64_t mhi = hi, mlo = lo;
    if (neg) { /* magnitude = two's-complement negation over 128 bits */
        mlo = ~lo + 1;
        mhi = ~hi + (mlo == 0);
    }
    if (mhi > LIMIT_HI || (mhi == LIMIT_HI && mlo >= LIMIT_LO))
        return -1;
    for (int k = 0; k < 8; k++) {
        out[k] = (uint8_t)(lo >> (8 * k));
        out[8 + k] = (uint8_t)(hi >> (8 * k));
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ */
/* Programs. */

static inline uint32_t
le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The end of a type starting at `pos`, or 0 when malformed. */
static size_t
type_check(const uint8_t *prog, size_t len, size_t pos, int depth)
{
    if (pos >= len)
        return 0;
    switch (prog[pos]) {
    case T_NULL:
    case T_BOOLEAN:
    case T_INT:
    case T_LONG:
    case T_FLOAT:
    case T_DOUBLE:
    case T_STRING:
    case T_BYTES:
        return pos + 1;
    case T_FIXED:
    case T_ENUM:
        if (len - pos < 5 || le32(prog + pos + 1) > INT32_MAX ||
            (prog[pos] == T_ENUM && le32(prog + pos + 1) == 0))
            return 0;
        return pos + 5;
    case T_ARRAY:
    case T_MAP:
        if (depth >= MAX_TYPE_DEPTH)
            return 0;
        return type_check(prog, len, pos + 1, depth + 1);
    default:
        return 0;
    }
}

/* Structure only: known ops, each output at most once, the required ones present. */
static int
program_valid(const uint8_t *prog, size_t len)
{
    if (len < 2 || prog[0] != PROG_MAGIC || prog[1] != PROG_VERSION)
        return 0;
    unsigned seen = 0;
    size_t pos = 2;
    while (pos < len) {
        uint8_t op = prog[pos++];
        if (op == OP_SKIP) {
            pos = type_check(prog, len, pos, 0);
            if (pos == 0)
                return 0;
        }
        else if (op >= OP_EVENT_ID && op <= OP_PROPERTIES) {
            if (seen & (1u << op))
                return 0;
            seen |= 1u << op;
        }
        else {
            return 0;
        }
    }
    return (seen & REQUIRED_OPS) == REQUIRED_OPS;
}

/* Within a validated program. */
static size_t
type_end(const uint8_t *prog, size_t pos)
{
    switch (prog[pos]) {
    case T_FIXED:
    case T_ENUM:
        return pos + 5;
    case T_ARRAY:
    case T_MAP:
        return type_end(prog, pos + 1);
    default:
        return pos + 1;
    }
}

static int skip_value(Cur *c, const uint8_t *t);

/* Array or map blocks. A negative count is followed by the block's byte size: the items
 * are still parsed and must fill exactly that size (fastavro's skip jumps over it). */
static int
skip_blocks(Cur *c, const uint8_t *item, int is_map)
{
    for (;;) {
        int64_t count;
        const uint8_t *block_end = NULL;
        if (rd_long(c, &count))
            return -1;
        if (count == 0)
            return 0;
        if (count < 0) {
            int64_t size;
            if (count == INT64_MIN || rd_long(c, &size) || size < 0 ||
                (uint64_t)size > (uint64_t)left(c))
                return -1;
            count = -count;
            block_end = c->p + size;
        }
        /* Every other item takes at least a byte: the input bounds the work. */
        if (!is_map && (item[0] == T_NULL || (item[0] == T_FIXED && le32(item + 1) == 0))) {
            if ((uint64_t)count > (uint64_t)c->zero_items)
                return -1;
            c->zero_items -= (size_t)count;
        }
        else if ((uint64_t)count > (uint64_t)left(c)) {
            return -1;
        }
        for (int64_t k = 0; k < count; k++) {
            const uint8_t *s;
            size_t n;
            if ((is_map && rd_str(c, &s, &n)) || skip_value(c, item))
                return -1;
        }
        if (block_end != NULL && c->p != block_end)
            return -1;
    }
}

/* Skipped writer fields are checked as strictly as read ones. */
static int
skip_value(Cur *c, const uint8_t *t)
{
    int64_t v;
    size_t n;
    const uint8_t *s;
    switch (t[0]) {
    case T_NULL:
        return 0;
    case T_BOOLEAN:
        if (left(c) < 1 || *c->p > 1)
            return -1;
        c->p++;
        return 0;
    case T_INT:
        return rd_int(c, &v);
    case T_LONG:
        return rd_long(c, &v);
    case T_FLOAT:
    case T_DOUBLE:
        n = t[0] == T_FLOAT ? 4 : 8;
        if (left(c) < n)
            return -1;
        c->p += n;
        return 0;
    case T_STRING:
        return rd_str(c, &s, &n);
    case T_BYTES:
        if (rd_len(c, &n))
            return -1;
        c->p += n;
        return 0;
    case T_FIXED:
        n = le32(t + 1);
        if (left(c) < n)
            return -1;
        c->p += n;
        return 0;
    case T_ENUM:
        if (rd_int(c, &v) || v < 0 || v >= (int64_t)le32(t + 1))
            return -1;
        return 0;
    case T_ARRAY:
        return skip_blocks(c, t + 1, 0);
    case T_MAP:
        return skip_blocks(c, t + 1, 1);
    default:
        return -1;
    }
}

/* ------------------------------------------------------------------------------------ */
/* Output columns. */

typedef struct {
    size_t n;
    uint8_t *slow;
    uint32_t *schema_id;
    int32_t *str_off[NCOLS];
    Bytes str_data[NCOLS];
    uint8_t *value; /* 16 bytes a row */
    int64_t *timestamp;
    int32_t *map_off;
    Ints key_off, val_off; /* one more entry than map entries */
    Bytes key_data, val_data;
    uint64_t *id_hash;
} Out;

static void
out_free(Out *o)
{
    PyMem_RawFree(o->slow);
    PyMem_RawFree(o->schema_id);
    for (int k = 0; k < NCOLS; k++) {
        PyMem_RawFree(o->str_off[k]);
        PyMem_RawFree(o->str_data[k].p);
    }
    PyMem_RawFree(o->value);
    PyMem_RawFree(o->timestamp);
    PyMem_RawFree(o->map_off);
    PyMem_RawFree(o->key_off.p);
    PyMem_RawFree(o->val_off.p);
    PyMem_RawFree(o->key_data.p);
    PyMem_RawFree(o->val_data.p);
    PyMem_RawFree(o->id_hash);
    memset(o, 0, sizeof *o);
}

static void *
alloc0(size_t count, size_t elem)
{
    return PyMem_RawCalloc(count ? count : 1, elem);
}

static int
out_alloc(Out *o, size_t n)
{
    memset(o, 0, sizeof *o);
    o->n = n;
    if (n > (SIZE_MAX / 32) - 1)
        return -1;
    o->slow = alloc0(n, 1);
    o->schema_id = alloc0(n, sizeof(uint32_t));
    o->value = alloc0(n, 16);
    o->timestamp = alloc0(n, sizeof(int64_t));
    o->map_off = alloc0(n + 1, sizeof(int32_t));
    o->id_hash = alloc0(n, sizeof(uint64_t));
    int ok = o->slow && o->schema_id && o->value && o->timestamp && o->map_off && o->id_hash;
    for (int k = 0; k < NCOLS; k++) {
        o->str_off[k] = alloc0(n + 1, sizeof(int32_t));
        o->str_data[k].p = grow(NULL, &o->str_data[k].cap, 16 * n + 64, 1);
        ok = ok && o->str_off[k] && o->str_data[k].p;
    }
    ok = ok && !ints_put(&o->key_off, 0) && !ints_put(&o->val_off, 0);
    if (!ok) {
        out_free(o);
        return -1;
    }
    return 0;
}

static inline uint64_t
id_hash(const uint8_t *s, size_t n)
{
    uint64_t h = 0xCBF29CE484222325ULL; /* FNV-1a 64 */
    for (size_t i = 0; i < n; i++) {
        h ^= s[i];
        h *= 0x100000001B3ULL;
    }
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ULL; /* splitmix64's finalizer */
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBULL;
    return h ^ (h >> 31);
}

/* An id the caller validates in Python: empty, long, or not starting with a printable
 * ASCII character. */
static inline int
odd_id(const uint8_t *s, size_t n)
{
    return n == 0 || n > MAX_ID_BYTES || s[0] < 0x21 || s[0] > 0x7E;
}

static int
read_properties(Cur *c, Out *o, size_t first)
{
    for (;;) {
        int64_t count;
        const uint8_t *block_end = NULL;
        if (rd_long(c, &count))
            return ROW_SLOW;
        if (count == 0)
            break;
        if (count < 0) {
            int64_t size;
            if (count == INT64_MIN || rd_long(c, &size) || size < 0 ||
                (uint64_t)size > (uint64_t)left(c))
                return ROW_SLOW;
            count = -count;
            block_end = c->p + size;
        }
        if ((uint64_t)count > MAX_MAP_ENTRIES ||
            o->key_off.len - 1 - first + (size_t)count > MAX_MAP_ENTRIES)
            return ROW_SLOW;
        for (int64_t k = 0; k < count; k++) {
            const uint8_t *ks, *vs;
            size_t kn, vn;
            if (rd_str(c, &ks, &kn) || rd_str(c, &vs, &vn))
                return ROW_SLOW;
            if (kn > (size_t)INT32_MAX - o->key_data.len ||
                vn > (size_t)INT32_MAX - o->val_data.len || o->key_off.len >= INT32_MAX)
                return ROW_SLOW; /* would overflow the batch's int32 offsets */
            if (bytes_put(&o->key_data, ks, kn) || bytes_put(&o->val_data, vs, vn) ||
                ints_put(&o->key_off, (int32_t)o->key_data.len) ||
                ints_put(&o->val_off, (int32_t)o->val_data.len))
                return ROW_NOMEM;
        }
        if (block_end != NULL && c->p != block_end)
            return ROW_SLOW;
    }
    /* The reference keeps the last of repeated keys; columns would keep both. */
    const int32_t *ko = o->key_off.p;
    size_t last = o->key_off.len - 1;
    for (size_t a = first; a < last; a++) {
        size_t an = (size_t)(ko[a + 1] - ko[a]);
        for (size_t b = a + 1; b < last; b++) {
            if ((size_t)(ko[b + 1] - ko[b]) == an &&
                (an == 0 || memcmp(o->key_data.p + ko[a], o->key_data.p + ko[b], an) == 0))
                return ROW_SLOW;
        }
    }
    return ROW_OK;
}

static int
decode_row(Out *o, size_t i, const uint8_t *data, size_t len, const uint8_t *prog, size_t plen)
{
    Cur c = {data + HEADER_SIZE, data + len, MAX_ZERO_ITEMS};
    size_t first = o->key_off.len - 1;
    size_t pos = 2;
    while (pos < plen) {
        uint8_t op = prog[pos++];
        const uint8_t *s;
        size_t n;
        int r;
        switch (op) {
        case OP_EVENT_ID:
        case OP_EVENT_NAME:
        case OP_CUSTOMER_ID:
        case OP_CANCELS: {
            Bytes *col = &o->str_data[op - OP_EVENT_ID];
            if (rd_str(&c, &s, &n))
                return ROW_SLOW;
            if (n > (size_t)INT32_MAX - col->len)
                return ROW_SLOW;
            if (bytes_put(col, s, n))
                return ROW_NOMEM;
            break;
        }
        case OP_SOURCE:
            if (rd_str(&c, &s, &n))
                return ROW_SLOW;
            break;
        case OP_VALUE:
            if (rd_decimal(&c, o->value + 16 * i))
                return ROW_SLOW;
            break;
        case OP_TIMESTAMP:
            if (rd_long(&c, &o->timestamp[i]))
                return ROW_SLOW;
            break;
        case OP_PROPERTIES:
            r = read_properties(&c, o, first);
            if (r != ROW_OK)
                return r;
            break;
        case OP_SKIP:
            if (skip_value(&c, prog + pos))
                return ROW_SLOW;
            pos = type_end(prog, pos);
            break;
        default:
            return ROW_SLOW; /* unreachable: the program was validated */
        }
    }
    if (c.p != c.end)
        return ROW_SLOW; /* trailing bytes */
    for (int k = 0; k < NCOLS; k++) {
        const Bytes *col = &o->str_data[k];
        size_t start = (size_t)o->str_off[k][i];
        const uint8_t *s = col->p + start;
        size_t n = col->len - start;
        if ((k == OP_EVENT_ID - 1 || k == OP_CUSTOMER_ID - 1 || (k == OP_CANCELS - 1 && n)) &&
            odd_id(s, n))
            return ROW_SLOW;
    }
    size_t start = (size_t)o->str_off[0][i];
    o->id_hash[i] = id_hash(o->str_data[0].p + start, o->str_data[0].len - start);
    return ROW_OK;
}

/* Closes row i: on failure every column is rolled back to where the row started. */
static void
finish_row(Out *o, size_t i, int ok)
{
    if (!ok) {
        o->slow[i] = 1;
        for (int k = 0; k < NCOLS; k++)
            o->str_data[k].len = (size_t)o->str_off[k][i];
        memset(o->value + 16 * i, 0, 16);
        o->timestamp[i] = 0;
        o->id_hash[i] = 0;
        size_t m = (size_t)o->map_off[i];
        o->key_off.len = o->val_off.len = m + 1;
        o->key_data.len = (size_t)o->key_off.p[m];
        o->val_data.len = (size_t)o->val_off.p[m];
    }
    for (int k = 0; k < NCOLS; k++)
        o->str_off[k][i + 1] = (int32_t)o->str_data[k].len;
    o->map_off[i + 1] = (int32_t)(o->key_off.len - 1);
}

/* ------------------------------------------------------------------------------------ */
/* Schema id -> program index: open addressing, grows at half load. */

typedef struct {
    uint32_t *keys;
    int32_t *vals; /* -1: no program; -2: empty slot */
    size_t cap, used;
} IdMap;

static int
idmap_init(IdMap *m, size_t cap)
{
    m->cap = cap;
    m->used = 0;
    m->keys = PyMem_Malloc(cap * sizeof(uint32_t));
    m->vals = PyMem_Malloc(cap * sizeof(int32_t));
    if (m->keys == NULL || m->vals == NULL) {
        PyMem_Free(m->keys);
        PyMem_Free(m->vals);
        m->keys = NULL;
        m->vals = NULL;
        return -1;
    }
    for (size_t k = 0; k < cap; k++)
        m->vals[k] = -2;
    return 0;
}

static void
idmap_free(IdMap *m)
{
    PyMem_Free(m->keys);
    PyMem_Free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
}

static inline size_t
idmap_slot(const IdMap *m, uint32_t key)
{
    size_t k = (size_t)((key * 0x9E3779B1u) & (uint32_t)(m->cap - 1));
    while (m->vals[k] != -2 && m->keys[k] != key)
        k = (k + 1) & (m->cap - 1);
    return k;
}

static int
idmap_put(IdMap *m, uint32_t key, int32_t val)
{
    if (2 * (m->used + 1) > m->cap) {
        IdMap bigger;
        if (m->cap > SIZE_MAX / 16 || idmap_init(&bigger, 2 * m->cap))
            return -1;
        for (size_t k = 0; k < m->cap; k++) {
            if (m->vals[k] != -2) {
                size_t s = idmap_slot(&bigger, m->keys[k]);
                bigger.keys[s] = m->keys[k];
                bigger.vals[s] = m->vals[k];
            }
        }
        bigger.used = m->used;
        idmap_free(m);
        *m = bigger;
    }
    size_t s = idmap_slot(m, key);
    if (m->vals[s] == -2)
        m->used++;
    m->keys[s] = key;
    m->vals[s] = val;
    return 0;
}

static inline uint32_t
frame_id(const uint8_t *p)
{
    return (uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 8 | (uint32_t)p[4];
}

/* The program for `sid`, as a new reference, or NULL without an error set when there is
 * none; NULL with an error for a failing mapping or a malformed program. */
static PyObject *
lookup_program(PyObject *programs, uint32_t sid)
{
    PyObject *key = PyLong_FromUnsignedLong(sid);
    if (key == NULL)
        return NULL;
    PyObject *prog;
    if (PyDict_CheckExact(programs)) {
        prog = PyDict_GetItemWithError(programs, key);
        Py_XINCREF(prog);
    }
    else {
        prog = PyObject_CallMethod(programs, "get", "O", key);
    }
    Py_DECREF(key);
    if (prog == NULL || prog == Py_None) {
        Py_XDECREF(prog);
        return NULL;
    }
    if (!PyBytes_Check(prog)) {
        PyErr_Format(PyExc_TypeError, "program for schema id %lu is not bytes",
                     (unsigned long)sid);
        Py_DECREF(prog);
        return NULL;
    }
    if (!program_valid((const uint8_t *)PyBytes_AS_STRING(prog),
                       (size_t)PyBytes_GET_SIZE(prog))) {
        PyErr_Format(PyExc_ValueError, "malformed program for schema id %lu",
                     (unsigned long)sid);
        Py_DECREF(prog);
        return NULL;
    }
    return prog;
}

typedef struct {
    const uint8_t *data;
    size_t len;
    int32_t prog; /* -1: slow without decoding */
} Row;

/* (n, *buffers) in the order consumer/decode/fast.py reads them; ownership of every array
 * passes to the Buffers (or is freed), leaving `o` empty. */
static PyObject *
build_result(Out *o)
{
    size_t n = o->n, m = o->key_off.len - 1;
    void *ptrs[] = {
        o->slow,          o->schema_id,      o->str_off[0], o->str_data[0].p, o->str_off[1],
        o->str_data[1].p, o->str_off[2],     o->str_data[2].p, o->str_off[3], o->str_data[3].p,
        o->value,         o->timestamp,      o->map_off,    o->key_off.p,     o->key_data.p,
        o->val_off.p,     o->val_data.p,     o->id_hash,
    };
    size_t sizes[] = {
        n,
        4 * n,
        4 * (n + 1),
        o->str_data[0].len,
        4 * (n + 1),
        o->str_data[1].len,
        4 * (n + 1),
        o->str_data[2].len,
        4 * (n + 1),
        o->str_data[3].len,
        16 * n,
        8 * n,
        4 * (n + 1),
        4 * (m + 1),
        o->key_data.len,
        4 * (m + 1),
        o->val_data.len,
        8 * n,
    };
    enum { NPARTS = sizeof ptrs / sizeof ptrs[0] };
    memset(o, 0, sizeof *o);
    PyObject *result = PyTuple_New(NPARTS + 1);
    PyObject *count = result ? PyLong_FromSize_t(n) : NULL;
    size_t k = 0;
    if (count == NULL)
        goto fail;
    PyTuple_SET_ITEM(result, 0, count);
    for (; k < NPARTS; k++) {
        void *shrunk = PyMem_RawRealloc(ptrs[k], sizes[k] ? sizes[k] : 1);
        PyObject *b = buffer_new(shrunk ? shrunk : ptrs[k], sizes[k]); /* slack is harmless */
        if (b == NULL) {
            k++; /* buffer_new freed this one */
            goto fail;
        }
        PyTuple_SET_ITEM(result, (Py_ssize_t)k + 1, b);
    }
    return result;
fail:
    for (; k < NPARTS; k++)
        PyMem_RawFree(ptrs[k]);
    Py_XDECREF(result);
    return NULL;
}

/* Resolves every row's program under the GIL; fills rows[] and o->schema_id. */
static int
resolve_rows(PyObject *seq, PyObject *programs, PyObject *progs, Row *rows, Out *o)
{
    IdMap ids;
    if (idmap_init(&ids, 16)) {
        PyErr_NoMemory();
        return -1;
    }
    int rc = 0;
    for (size_t i = 0; i < o->n && rc == 0; i++) {
        PyObject *v = PyTuple_GET_ITEM(seq, (Py_ssize_t)i);
        rows[i].prog = -1;
        if (!PyBytes_Check(v))
            continue; /* None, or not bytes: the reference decides */
        rows[i].data = (const uint8_t *)PyBytes_AS_STRING(v);
        rows[i].len = (size_t)PyBytes_GET_SIZE(v);
        if (rows[i].len < HEADER_SIZE || rows[i].data[0] != 0)
            continue;
        uint32_t sid = frame_id(rows[i].data);
        o->schema_id[i] = sid;
        size_t slot = idmap_slot(&ids, sid);
        if (ids.vals[slot] != -2) {
            rows[i].prog = ids.vals[slot];
            continue;
        }
        PyObject *prog = lookup_program(programs, sid);
        int32_t index = -1;
        if (prog != NULL) {
            index = (int32_t)PyList_GET_SIZE(progs);
            rc = PyList_Append(progs, prog);
            Py_DECREF(prog);
        }
        else if (PyErr_Occurred()) {
            rc = -1;
        }
        if (rc == 0 && idmap_put(&ids, sid, index)) {
            PyErr_NoMemory();
            rc = -1;
        }
        rows[i].prog = index;
    }
    idmap_free(&ids);
    return rc;
}

/* Returns 0, or -1 when out of memory. */
static int
decode_rows(Out *o, const Row *rows, PyObject *progs)
{
    size_t nprogs = (size_t)PyList_GET_SIZE(progs);
    const uint8_t **pdata = PyMem_Malloc((nprogs ? nprogs : 1) * sizeof *pdata);
    size_t *plen = PyMem_Malloc((nprogs ? nprogs : 1) * sizeof *plen);
    int rc = 0;
    if (pdata == NULL || plen == NULL) {
        rc = -1;
        goto done;
    }
    for (size_t k = 0; k < nprogs; k++) { /* borrowed: `progs` outlives the loop */
        PyObject *p = PyList_GET_ITEM(progs, (Py_ssize_t)k);
        pdata[k] = (const uint8_t *)PyBytes_AS_STRING(p);
        plen[k] = (size_t)PyBytes_GET_SIZE(p);
    }
    PyThreadState *ts = o->n >= NOGIL_MIN_ROWS ? PyEval_SaveThread() : NULL;
    for (size_t i = 0; i < o->n; i++) {
        int r = ROW_SLOW;
        if (rows[i].prog >= 0) {
            size_t k = (size_t)rows[i].prog;
#ifdef AVROFAST_EXACT_COPIES
            /* Fuzz builds: message and program in allocations of their exact size, so that
             * AddressSanitizer sees even a one-byte over-read (bytes objects end in a NUL). */
            uint8_t *data = malloc(rows[i].len), *prog = malloc(plen[k]);
            if (data != NULL && prog != NULL) {
                memcpy(data, rows[i].data, rows[i].len);
                memcpy(prog, pdata[k], plen[k]);
                r = decode_row(o, i, data, rows[i].len, prog, plen[k]);
            }
            else {
                r = ROW_NOMEM;
            }
            free(data);
            free(prog);
#else
            r = decode_row(o, i, rows[i].data, rows[i].len, pdata[k], plen[k]);
#endif
        }
        if (r == ROW_NOMEM) {
            rc = -1;
            break;
        }
        finish_row(o, i, r == ROW_OK);
    }
    if (ts != NULL)
        PyEval_RestoreThread(ts);
done:
    PyMem_Free(pdata);
    PyMem_Free(plen);
    return rc;
}

PyDoc_STRVAR(decode_doc,
             "decode(values, programs, /)\n--\n\n"
             "Decode a batch; returns (n, *buffers) in the order consumer/decode/fast.py reads.");

static PyObject *
py_decode(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *values, *programs;
    if (!PyArg_ParseTuple(args, "OO:decode", &values, &programs))
        return NULL;
    /* A tuple of our own: the rows' bytes stay alive and unchanged without the GIL. */
    PyObject *seq = PySequence_Tuple(values);
    if (seq == NULL)
        return NULL;
    size_t n = (size_t)PyTuple_GET_SIZE(seq);
    PyObject *result = NULL;
    PyObject *progs = PyList_New(0); /* owned program bytes, by index */
    Row *rows = n < SIZE_MAX / sizeof(Row) ? PyMem_Malloc((n ? n : 1) * sizeof(Row)) : NULL;
    Out o;
    if (out_alloc(&o, n)) {
        PyErr_NoMemory();
        goto done;
    }
    if (progs == NULL || rows == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (resolve_rows(seq, programs, progs, rows, &o))
        goto done;
    if (decode_rows(&o, rows, progs)) {
        PyErr_NoMemory();
        goto done;
    }
    result = build_result(&o);
done:
    out_free(&o);
    PyMem_Free(rows);
    Py_XDECREF(progs);
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(hash_strings_doc,
             "hash_strings(values, /)\n--\n\n"
             "The id hash of each str's UTF-8 bytes, as a Buffer of native uint64.");

static PyObject *
py_hash_strings(PyObject *self, PyObject *values)
{
    (void)self;
    PyObject *seq = PySequence_Fast(values, "hash_strings needs a sequence of str");
    if (seq == NULL)
        return NULL;
    size_t n = (size_t)PySequence_Fast_GET_SIZE(seq);
    uint64_t *out = n > SIZE_MAX / 8 ? NULL : PyMem_RawMalloc(n ? 8 * n : 1);
    if (out == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (size_t i = 0; i < n; i++) {
        PyObject *s = items[i];
        if (!PyUnicode_Check(s)) {
            PyErr_Format(PyExc_TypeError, "hash_strings: item %zu is not a str", i);
            goto fail;
        }
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(s) < 0)
            goto fail;
#endif
        if (PyUnicode_IS_ASCII(s)) {
            out[i] = id_hash(PyUnicode_1BYTE_DATA(s), (size_t)PyUnicode_GET_LENGTH(s));
        }
        else {
            /* A temporary: PyUnicode_AsUTF8AndSize would cache a copy in every str. */
            PyObject *b = PyUnicode_AsUTF8String(s);
            if (b == NULL)
                goto fail;
            out[i] = id_hash((const uint8_t *)PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
            Py_DECREF(b);
        }
    }
    Py_DECREF(seq);
    return buffer_new(out, 8 * n);
fail:
    PyMem_RawFree(out);
    Py_DECREF(seq);
    return NULL;
}

static int
cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

PyDoc_STRVAR(schema_ids_doc,
             "schema_ids(values, /)\n--\n\n"
             "Sorted distinct schema ids named by headers with magic 0 and 5 or more bytes.");

static PyObject *
py_schema_ids(PyObject *self, PyObject *values)
{
    (void)self;
    PyObject *seq = PySequence_Fast(values, "schema_ids needs a sequence");
    if (seq == NULL)
        return NULL;
    PyObject *result = NULL;
    IdMap ids = {0};
    uint32_t *sorted = NULL;
    if (idmap_init(&ids, 16)) {
        PyErr_NoMemory();
        goto done;
    }
    /* Size and items re-read each time: a buffer exporter may run code that edits a list. */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *v = PySequence_Fast_GET_ITEM(seq, i);
        uint8_t head[HEADER_SIZE];
        if (v == Py_None)
            continue;
        if (PyBytes_Check(v)) {
            if (PyBytes_GET_SIZE(v) < HEADER_SIZE)
                continue;
            memcpy(head, PyBytes_AS_STRING(v), HEADER_SIZE);
        }
        else { /* bytearray, memoryview: read as Decoder.named_schema_ids would */
            Py_buffer view;
            Py_INCREF(v);
            int got = PyObject_GetBuffer(v, &view, PyBUF_SIMPLE);
            Py_DECREF(v);
            if (got < 0)
                goto done;
            int enough = view.len >= HEADER_SIZE;
            if (enough)
                memcpy(head, view.buf, HEADER_SIZE);
            PyBuffer_Release(&view);
            if (!enough)
                continue;
        }
        if (head[0] != 0)
            continue;
        uint32_t sid = frame_id(head);
        if (ids.vals[idmap_slot(&ids, sid)] == -2 && idmap_put(&ids, sid, 0)) {
            PyErr_NoMemory();
            goto done;
        }
    }
    sorted = PyMem_Malloc((ids.used ? ids.used : 1) * sizeof(uint32_t));
    if (sorted == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    size_t count = 0;
    for (size_t k = 0; k < ids.cap; k++)
        if (ids.vals[k] != -2)
            sorted[count++] = ids.keys[k];
    qsort(sorted, count, sizeof(uint32_t), cmp_u32);
    result = PyList_New((Py_ssize_t)count);
    if (result == NULL)
        goto done;
    for (size_t k = 0; k < count; k++) {
        PyObject *x = PyLong_FromUnsignedLong(sorted[k]);
        if (x == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, (Py_ssize_t)k, x);
    }
done:
    PyMem_Free(sorted);
    idmap_free(&ids);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", py_decode, METH_VARARGS, decode_doc},
    {"hash_strings", py_hash_strings, METH_O, hash_strings_doc},
    {"schema_ids", py_schema_ids, METH_O, schema_ids_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "consumer._avrofast",
    .m_doc = "Batch decoder behind consumer.avrofast (private).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__avrofast(void)
{
    if (PyType_Ready(&BufferType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Buffer", (PyObject *)&BufferType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
