/*
 * Hot loops of the float-entropy.v1 codec (shardstore/codecs/entropy.py documents the format).
 *
 * Three entry points, each releasing the GIL for all of its work so that a thread
 * pool decodes pieces on every core:
 *   histogram(data, itemsize, rotate, widths, block_elems) -> bytes   u32 counts [block][field][512]
 *   encode(data, itemsize, rotate, widths, block_elems, modes, freqs) -> list[bytes]  one payload per (block, field)
 *   decode(stream, itemsize, rotate, widths, block_elems, out) -> None   parses the whole piece, writes `out`
 *
 * The normalisation of frequencies and the choice raw/coded live in Python (shared with the
 * numpy fallback), so both implementations produce the same bytes by construction.
 *
 * Plain portable C99 (no intrinsics, no -march): reads and writes go through byte helpers that
 * compilers turn into single loads on little-endian hosts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PROB_BITS 12
#define PROB_SCALE (1u << PROB_BITS)
#define RANS_L (1u << 16)
#define LANES 32
#define MAX_FIELDS 8
#define ALPHABET 512
#define CHUNK 2048 /* elements decoded per field before merging: keeps temporaries in L1 */

typedef struct {
    int itemsize;
    int rotate;
    int nfields;
    int widths[MAX_FIELDS];
    int shifts[MAX_FIELDS];
    Py_ssize_t block_elems;
} layout_t;

static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t load_elem(const uint8_t *p, int k) {
    /* A switch rather than a loop: the branch is perfectly predicted and each case is one load. */
    switch (k) {
    case 1:
        return p[0];
    case 2:
        return (uint64_t)p[0] | (uint64_t)p[1] << 8;
    case 4:
        return rd32(p);
    default:
        return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
    }
}

static inline void store_elem(uint8_t *p, int k, uint64_t v) {
    for (int b = 0; b < k; b++) p[b] = (uint8_t)(v >> (8 * b));
}

/* Floats move the sign bit to the bottom so the exponent sits at the top, whole. */
static inline uint64_t rotl1(uint64_t v, int bits) {
    uint64_t mask = bits == 64 ? ~(uint64_t)0 : (((uint64_t)1 << bits) - 1);
    return ((v << 1) | (v >> (bits - 1))) & mask;
}

static inline uint64_t rotr1(uint64_t v, int bits) {
    return (v >> 1) | ((v & 1) << (bits - 1));
}

static int parse_layout(layout_t *lay, int itemsize, int rotate, Py_buffer *widths, Py_ssize_t block_elems) {
    if (itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "itemsize must be 1, 2, 4 or 8");
        return -1;
    }
    if (widths->len < 1 || widths->len > MAX_FIELDS) {
        PyErr_SetString(PyExc_ValueError, "bad field count");
        return -1;
    }
    if (block_elems < LANES || block_elems > (1 << 24) || block_elems % LANES) {
        PyErr_SetString(PyExc_ValueError, "bad block size");
        return -1;
    }
    lay->itemsize = itemsize;
    lay->rotate = rotate;
    lay->nfields = (int)widths->len;
    lay->block_elems = block_elems;
    int total = 0;
    for (int f = 0; f < lay->nfields; f++) {
        int w = ((const uint8_t *)widths->buf)[f];
        if (w < 1 || w > 9) {
            PyErr_SetString(PyExc_ValueError, "field widths must be 1..9 bits");
            return -1;
        }
        lay->widths[f] = w;
        total += w;
    }
    if (total != 8 * itemsize) {
        PyErr_SetString(PyExc_ValueError, "field widths must add up to the element size");
        return -1;
    }
    int shift = total;
    for (int f = 0; f < lay->nfields; f++) {
        shift -= lay->widths[f];
        lay->shifts[f] = shift;
    }
    return 0;
}


/* ------------------------------------------------------------------ histogram */

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Element i's bits, sign rotated to bit 0 for floats. `k` is a compile-time constant at every
 * call site (see the switches below), so each dtype gets its own straight-line loop. */
ALWAYS_INLINE uint64_t elem_bits_k(const uint8_t *data, Py_ssize_t i, const int k, int rotate) {
    uint64_t u = load_elem(data + i * k, k);
    return rotate ? rotl1(u, 8 * k) : u;
}

ALWAYS_INLINE void hist_k(const layout_t *lay, const uint8_t *src, Py_ssize_t n, uint32_t *counts, const int k) {
    Py_ssize_t nblocks = (n + lay->block_elems - 1) / lay->block_elems;
    int nf = lay->nfields, rotate = lay->rotate;
    for (Py_ssize_t b = 0; b < nblocks; b++) {
        Py_ssize_t i0 = b * lay->block_elems, i1 = i0 + lay->block_elems < n ? i0 + lay->block_elems : n;
        uint32_t *bc = counts + b * nf * ALPHABET;
        for (Py_ssize_t i = i0; i < i1; i++) {
            uint64_t u = elem_bits_k(src, i, k, rotate);
            for (int f = 0; f < nf; f++) bc[f * ALPHABET + ((u >> lay->shifts[f]) & ((1u << lay->widths[f]) - 1))]++;
        }
    }
}

static PyObject *py_histogram(PyObject *self, PyObject *args) {
    Py_buffer data, widths;
    int itemsize, rotate;
    Py_ssize_t block_elems;
    if (!PyArg_ParseTuple(args, "y*iiy*n", &data, &itemsize, &rotate, &widths, &block_elems)) return NULL;
    layout_t lay;
    PyObject *result = NULL;
    if (parse_layout(&lay, itemsize, rotate, &widths, block_elems) < 0) goto done;
    if (data.len % itemsize) {
        PyErr_SetString(PyExc_ValueError, "data is not a whole number of elements");
        goto done;
    }
    Py_ssize_t n = data.len / itemsize;
    Py_ssize_t nblocks = (n + block_elems - 1) / block_elems;
    Py_ssize_t entries = nblocks * lay.nfields * ALPHABET;
    result = PyBytes_FromStringAndSize(NULL, entries * (Py_ssize_t)sizeof(uint32_t));
    if (!result) goto done;
    uint32_t *counts = (uint32_t *)PyBytes_AS_STRING(result);
    const uint8_t *src = (const uint8_t *)data.buf;
    Py_BEGIN_ALLOW_THREADS
    memset(counts, 0, (size_t)entries * sizeof(uint32_t));
    switch (itemsize) {
    case 1: hist_k(&lay, src, n, counts, 1); break;
    case 2: hist_k(&lay, src, n, counts, 2); break;
    case 4: hist_k(&lay, src, n, counts, 4); break;
    default: hist_k(&lay, src, n, counts, 8); break;
    }
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&widths);
    return result;
}

/* ------------------------------------------------------------------ encode */

typedef struct {
    uint32_t freq, start;
    uint64_t x_max; /* 64 bits: f << 20 reaches 2^32 for a single-symbol table */
    uint64_t rcp;   /* ceil(2^63 / f): exact quotient for every 32-bit x (f <= 2^12) */
} enc_sym_t;

static inline uint32_t div_freq(uint32_t x, const enc_sym_t *s) {
#if defined(__SIZEOF_INT128__)
    return (uint32_t)(((unsigned __int128)x * s->rcp) >> 63);
#else
    return x / s->freq;
#endif
}

/* Bit-pack a w-bit field LSB-first: ceil(n * w / 8) bytes. */
ALWAYS_INLINE void pack_raw_k(const layout_t *lay, const uint8_t *restrict src, Py_ssize_t i0, Py_ssize_t n, int f,
                              uint8_t *restrict dst, const int k) {
    int rotate = lay->rotate;
    int w = lay->widths[f], sh = lay->shifts[f];
    uint32_t mask = (1u << w) - 1;
    if (w == 8) {
        for (Py_ssize_t i = 0; i < n; i++) dst[i] = (uint8_t)((elem_bits_k(src, i0 + i, k, rotate) >> sh) & mask);
        return;
    }
    uint64_t acc = 0;
    int nbits = 0;
    Py_ssize_t o = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        acc |= ((elem_bits_k(src, i0 + i, k, rotate) >> sh) & mask) << nbits;
        nbits += w;
        while (nbits >= 8) {
            dst[o++] = (uint8_t)acc;
            acc >>= 8;
            nbits -= 8;
        }
    }
    if (nbits > 0) dst[o++] = (uint8_t)acc;
}

/* rANS-code one field of one block; returns the payload length written to dst (>= 4 * LANES). */
ALWAYS_INLINE Py_ssize_t rans_encode_k(const layout_t *lay, const uint8_t *restrict src, Py_ssize_t i0, Py_ssize_t n,
                                       int f, const uint16_t *freqs, uint8_t *restrict dst, uint8_t *scratch_end,
                                       const int k) {
    int rotate = lay->rotate;
    enc_sym_t syms[ALPHABET];
    uint32_t start = 0;
    int alphabet = 1 << lay->widths[f];
    for (int s = 0; s < alphabet; s++) {
        uint32_t fr = freqs[s];
        syms[s].freq = fr;
        syms[s].start = start;
        syms[s].x_max = (uint64_t)fr << (32 - PROB_BITS);
        syms[s].rcp = fr ? (uint64_t)((((unsigned long long)1 << 63) + fr - 1) / fr) : 0;
        start += fr;
    }
    uint32_t st[LANES];
    for (int j = 0; j < LANES; j++) st[j] = RANS_L;
    uint8_t *wp = scratch_end; /* words grow downwards: the decoder reads them forwards */
    int sh = lay->shifts[f];
    uint32_t mask = (uint32_t)alphabet - 1;
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        int j = (int)(i & (LANES - 1));
        uint32_t x = st[j];
        const enc_sym_t *s = &syms[(elem_bits_k(src, i0 + i, k, rotate) >> sh) & mask];
        /* Branchless, as in the decoder: always store, advance only when needed (the scratch
         * buffer keeps slack below the lowest possible word). */
        uint32_t need = (uint64_t)x >= s->x_max;
        wp[-2] = (uint8_t)x;
        wp[-1] = (uint8_t)(x >> 8);
        wp -= need << 1;
        x >>= need << 4;
        uint32_t q = div_freq(x, s);
        st[j] = x + q * (PROB_SCALE - s->freq) + s->start;
    }
    for (int j = 0; j < LANES; j++) store_elem(dst + 4 * j, 4, st[j]);
    Py_ssize_t words = scratch_end - wp;
    memcpy(dst + 4 * LANES, wp, (size_t)words);
    return 4 * LANES + words;
}

#define DISPATCH_K(k, call) \
    switch (k) {            \
    case 1: call(1); break; \
    case 2: call(2); break; \
    case 4: call(4); break; \
    default: call(8); break; \
    }

static void pack_raw(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t n, int f, uint8_t *dst) {
#define PACK(K) pack_raw_k(lay, src, i0, n, f, dst, K)
    DISPATCH_K(lay->itemsize, PACK)
#undef PACK
}

static Py_ssize_t rans_encode(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t n, int f,
                              const uint16_t *freqs, uint8_t *dst, uint8_t *scratch_end) {
    Py_ssize_t len = 0;
#define ENC(K) len = rans_encode_k(lay, src, i0, n, f, freqs, dst, scratch_end, K)
    DISPATCH_K(lay->itemsize, ENC)
#undef ENC
    return len;
}

static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer data, widths, modes, freqs;
    int itemsize, rotate;
    Py_ssize_t block_elems;
    if (!PyArg_ParseTuple(args, "y*iiy*ny*y*", &data, &itemsize, &rotate, &widths, &block_elems, &modes, &freqs))
        return NULL;
    layout_t lay;
    PyObject *result = NULL;
    uint8_t *scratch = NULL, *out = NULL;
    Py_ssize_t *lengths = NULL;
    if (parse_layout(&lay, itemsize, rotate, &widths, block_elems) < 0) goto done;
    Py_ssize_t n = data.len / itemsize;
    Py_ssize_t nblocks = (n + block_elems - 1) / block_elems;
    Py_ssize_t nparts = nblocks * lay.nfields;
    if (data.len % itemsize || modes.len != nparts || freqs.len != nparts * ALPHABET * 2) {
        PyErr_SetString(PyExc_ValueError, "encode: inconsistent arguments");
        goto done;
    }
    /* Each part is at most 2 bytes per element plus the states; one buffer holds them all. */
    Py_ssize_t cap = 2 * block_elems + 4 * LANES + 16;
    scratch = (uint8_t *)malloc((size_t)cap);
    out = (uint8_t *)malloc((size_t)(nparts ? nparts : 1) * (size_t)cap);
    lengths = (Py_ssize_t *)malloc(sizeof(Py_ssize_t) * (size_t)(nparts ? nparts : 1));
    if (!scratch || !out || !lengths) {
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t *src = (const uint8_t *)data.buf;
    const uint8_t *md = (const uint8_t *)modes.buf;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < nblocks && !bad; b++) {
        Py_ssize_t i0 = b * block_elems, nb = (i0 + block_elems < n ? i0 + block_elems : n) - i0;
        for (int f = 0; f < lay.nfields; f++) {
            Py_ssize_t part = b * lay.nfields + f;
            uint8_t *dst = out + part * cap;
            if (md[part] == 0) {
                pack_raw(&lay, src, i0, nb, f, dst);
                lengths[part] = (nb * lay.widths[f] + 7) / 8;
            } else {
                uint16_t fr[ALPHABET];
                memcpy(fr, (const uint8_t *)freqs.buf + part * ALPHABET * 2, sizeof fr);
                uint32_t sum = 0;
                for (int s = 0; s < (1 << lay.widths[f]); s++) sum += fr[s];
                if (sum != PROB_SCALE) {
                    bad = 1;
                    break;
                }
                lengths[part] = rans_encode(&lay, src, i0, nb, f, fr, dst, scratch + cap);
            }
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "encode: frequencies must sum to 4096");
        goto done;
    }
    result = PyList_New(nparts);
    if (!result) goto done;
    for (Py_ssize_t p = 0; p < nparts; p++) {
        PyObject *item = PyBytes_FromStringAndSize((const char *)out + p * cap, lengths[p]);
        if (!item) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, p, item);
    }
done:
    free(scratch);
    free(out);
    free(lengths);
    PyBuffer_Release(&data);
    PyBuffer_Release(&widths);
    PyBuffer_Release(&modes);
    PyBuffer_Release(&freqs);
    return result;
}

/* ------------------------------------------------------------------ decode */

typedef struct {
    int coded;
    /* coded */
    uint32_t table[PROB_SCALE];    /* freq (13 bits) | bias << 13: the state update per slot */
    uint16_t slot_sym[PROB_SCALE]; /* the symbol per slot, separate so its load is off the state chain */
    uint16_t symbols[256];
    uint32_t st[LANES];
    const uint8_t *wp, *wend; /* 16-bit words */
    /* raw */
    const uint8_t *raw;
    Py_ssize_t raw_len;
} field_dec_t;

static int read_varint(const uint8_t **p, const uint8_t *end, uint32_t *value) {
    uint32_t v = 0;
    for (int shift = 0; shift < 21; shift += 7) {
        if (*p >= end) return -1;
        uint8_t byte = *(*p)++;
        v |= (uint32_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *value = v;
            return 0;
        }
    }
    return -1;
}

/* Parse one field header of a block; returns an error message or NULL. */
static const char *parse_field(field_dec_t *fd, const uint8_t **pp, const uint8_t *end, int w, Py_ssize_t nb) {
    const uint8_t *p = *pp;
    if (p >= end) return "truncated field header";
    uint8_t mode = *p++;
    if (mode == 0) {
        Py_ssize_t len = (nb * w + 7) / 8;
        if (end - p < len) return "truncated raw field";
        fd->coded = 0;
        fd->raw = p;
        fd->raw_len = len;
        *pp = p + len;
        return NULL;
    }
    if (mode != 1) return "unknown field mode";
    uint32_t nsym_m1, sym = 0, total = 0, fr, len;
    if (read_varint(&p, end, &nsym_m1) < 0 || nsym_m1 > 255) return "bad symbol count";
    uint32_t nsym = nsym_m1 + 1;
    for (uint32_t r = 0; r < nsym; r++) {
        uint32_t gap;
        if (read_varint(&p, end, &gap) < 0) return "truncated symbol list";
        sym = r == 0 ? gap : sym + gap + 1;
        if (sym >= (1u << w)) return "symbol out of range";
        fd->symbols[r] = (uint16_t)sym;
    }
    for (uint32_t r = 0; r < nsym; r++) {
        if (read_varint(&p, end, &fr) < 0) return "truncated frequencies";
        fr += 1;
        if (fr > PROB_SCALE - total) return "frequencies exceed 4096";
        for (uint32_t k = 0; k < fr; k++) {
            fd->table[total + k] = fr | (k << 13);
            fd->slot_sym[total + k] = fd->symbols[r];
        }
        total += fr;
    }
    if (total != PROB_SCALE) return "frequencies do not sum to 4096";
    if (end - p < 4) return "truncated payload length";
    len = rd32(p);
    p += 4;
    if ((Py_ssize_t)len > end - p || len < 4 * LANES || (len - 4 * LANES) % 2) return "bad payload length";
    for (int j = 0; j < LANES; j++) {
        fd->st[j] = rd32(p + 4 * j);
        if (fd->st[j] < RANS_L) return "bad initial state";
    }
    fd->coded = 1;
    fd->wp = p + 4 * LANES;
    fd->wend = p + len;
    *pp = p + len;
    return NULL;
}

/* Decode symbols [i0, i0+cnt) of a coded field (i0 % LANES == 0) into dst. */
static int rans_decode_chunk(field_dec_t *fd, uint16_t *restrict dst, Py_ssize_t cnt) {
    const uint32_t *restrict tab = fd->table;
    const uint16_t *restrict sy = fd->slot_sym;
    uint32_t st[LANES];
    memcpy(st, fd->st, sizeof st);
    const uint8_t *restrict p = fd->wp;
    const uint8_t *end = fd->wend;
    Py_ssize_t i = 0;
    /* Fast path: a whole group of LANES symbols reads at most LANES words, so no bounds checks. */
    while (cnt - i >= LANES && end - p >= 2 * LANES) {
        for (int j = 0; j < LANES; j++) {
            uint32_t x = st[j];
            uint32_t slot = x & (PROB_SCALE - 1);
            uint32_t e = tab[slot];
            dst[i + j] = sy[slot];
            x = (e & 0x1fff) * (x >> PROB_BITS) + (e >> 13);
            /* Branchless renormalisation: whether a lane needs a word is data-dependent and
             * unpredictable, and a mispredicted branch costs more than the whole step. */
            uint32_t word = (uint32_t)p[0] | (uint32_t)p[1] << 8;
            uint32_t need = x < RANS_L;
            x = (x << (need << 4)) | (word & (0u - need));
            p += need << 1;
            st[j] = x;
        }
        i += LANES;
    }
    for (; i < cnt; i++) {
        int j = (int)(i & (LANES - 1));
        uint32_t x = st[j];
        uint32_t slot = x & (PROB_SCALE - 1);
        uint32_t e = tab[slot];
        dst[i] = sy[slot];
        x = (e & 0x1fff) * (x >> PROB_BITS) + (e >> 13);
        if (x < RANS_L) {
            if (end - p < 2) {
                memcpy(fd->st, st, sizeof st);
                return -1;
            }
            x = (x << 16) | (uint32_t)p[0] | (uint32_t)p[1] << 8;
            p += 2;
        }
        st[j] = x;
    }
    memcpy(fd->st, st, sizeof st);
    fd->wp = p;
    return 0;
}

static void raw_unpack_chunk(const field_dec_t *fd, int w, Py_ssize_t i0, uint16_t *dst, Py_ssize_t cnt) {
    const uint8_t *r = fd->raw;
    if (w == 8) {
        for (Py_ssize_t i = 0; i < cnt; i++) dst[i] = r[i0 + i];
        return;
    }
    uint32_t mask = (1u << w) - 1;
    Py_ssize_t i = 0;
    if (w == 7 && i0 % 8 == 0) {
        /* 8 values in 7 bytes: one 8-byte load per group while it stays inside the field. */
        for (; i + 8 <= cnt; i += 8) {
            Py_ssize_t byte = (i0 + i) / 8 * 7;
            if (byte + 8 > fd->raw_len) break;
            uint64_t v = (uint64_t)rd32(r + byte) | (uint64_t)rd32(r + byte + 4) << 32;
            for (int j = 0; j < 8; j++) dst[i + j] = (uint16_t)((v >> (7 * j)) & 0x7f);
        }
    }
    /* Fast path while a 4-byte load stays inside the field; the tail goes byte by byte. */
    for (; i < cnt; i++) {
        Py_ssize_t bit = (i0 + i) * w, byte = bit >> 3;
        if (byte + 4 > fd->raw_len) break;
        dst[i] = (uint16_t)((rd32(r + byte) >> (bit & 7)) & mask);
    }
    for (; i < cnt; i++) {
        Py_ssize_t bit = (i0 + i) * w, byte = bit >> 3;
        uint32_t v = r[byte];
        if (byte + 1 < fd->raw_len) v |= (uint32_t)r[byte + 1] << 8;
        dst[i] = (uint16_t)((v >> (bit & 7)) & mask);
    }
}

static const char *decode_piece(const layout_t *lay, const uint8_t *stream, Py_ssize_t len, uint8_t *out,
                                Py_ssize_t n) {
    const uint8_t *p = stream, *end = stream + len;
    field_dec_t *fds = (field_dec_t *)malloc(sizeof(field_dec_t) * (size_t)lay->nfields);
    uint16_t *tmp = (uint16_t *)malloc(sizeof(uint16_t) * CHUNK * (size_t)lay->nfields);
    const char *err = NULL;
    if (!fds || !tmp) {
        err = "out of memory";
        goto done;
    }
    int k = lay->itemsize, bits = 8 * k, nf = lay->nfields;
    for (Py_ssize_t i0 = 0; i0 < n && !err; i0 += lay->block_elems) {
        Py_ssize_t nb = n - i0 < lay->block_elems ? n - i0 : lay->block_elems;
        for (int f = 0; f < nf && !err; f++) err = parse_field(&fds[f], &p, end, lay->widths[f], nb);
        if (err) break;
        for (Py_ssize_t c0 = 0; c0 < nb; c0 += CHUNK) {
            Py_ssize_t cnt = nb - c0 < CHUNK ? nb - c0 : CHUNK;
            for (int f = 0; f < nf; f++) {
                if (fds[f].coded) {
                    if (rans_decode_chunk(&fds[f], tmp + f * CHUNK, cnt) < 0) {
                        err = "rANS stream ends early";
                        goto done;
                    }
                } else {
                    raw_unpack_chunk(&fds[f], lay->widths[f], c0, tmp + f * CHUNK, cnt);
                }
            }
            uint8_t *dst = out + (i0 + c0) * k;
            /* Merge the fields into elements, written once, straight into the caller's buffer. */
            if (k == 2 && nf == 2 && lay->rotate) {
                const uint16_t *a = tmp, *b = tmp + CHUNK;
                int s0 = lay->shifts[0];
                for (Py_ssize_t i = 0; i < cnt; i++) {
                    uint32_t u = ((uint32_t)a[i] << s0) | b[i];
                    u = (u >> 1) | ((u & 1) << 15);
                    dst[2 * i] = (uint8_t)u;
                    dst[2 * i + 1] = (uint8_t)(u >> 8);
                }
            } else if (k == 4 && nf == 4 && lay->rotate) {
                const uint16_t *a = tmp, *b = tmp + CHUNK, *c = tmp + 2 * CHUNK, *d = tmp + 3 * CHUNK;
                int s0 = lay->shifts[0], s1 = lay->shifts[1], s2 = lay->shifts[2];
                for (Py_ssize_t i = 0; i < cnt; i++) {
                    uint32_t u = ((uint32_t)a[i] << s0) | ((uint32_t)b[i] << s1) | ((uint32_t)c[i] << s2) | d[i];
                    u = (u >> 1) | ((u & 1) << 31);
                    dst[4 * i] = (uint8_t)u;
                    dst[4 * i + 1] = (uint8_t)(u >> 8);
                    dst[4 * i + 2] = (uint8_t)(u >> 16);
                    dst[4 * i + 3] = (uint8_t)(u >> 24);
                }
            } else {
                for (Py_ssize_t i = 0; i < cnt; i++) {
                    uint64_t u = 0;
                    for (int f = 0; f < nf; f++) u |= (uint64_t)tmp[f * CHUNK + i] << lay->shifts[f];
                    if (lay->rotate) u = rotr1(u, bits);
                    store_elem(dst + i * k, k, u);
                }
            }
        }
        for (int f = 0; f < nf && !err; f++) {
            if (!fds[f].coded) continue;
            if (fds[f].wp != fds[f].wend) err = "rANS stream has trailing words";
            for (int j = 0; j < LANES && !err; j++)
                if (fds[f].st[j] != RANS_L) err = "rANS final state mismatch";
        }
    }
    if (!err && p != end) err = "trailing bytes after the last block";
done:
    free(fds);
    free(tmp);
    return err;
}

static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer stream, widths, out;
    int itemsize, rotate;
    Py_ssize_t block_elems;
    if (!PyArg_ParseTuple(args, "y*iiy*nw*", &stream, &itemsize, &rotate, &widths, &block_elems, &out)) return NULL;
    layout_t lay;
    PyObject *result = NULL;
    if (parse_layout(&lay, itemsize, rotate, &widths, block_elems) < 0) goto done;
    if (out.len % itemsize) {
        PyErr_SetString(PyExc_ValueError, "output is not a whole number of elements");
        goto done;
    }
    const char *err;
    Py_BEGIN_ALLOW_THREADS
    err = decode_piece(&lay, (const uint8_t *)stream.buf, stream.len, (uint8_t *)out.buf, out.len / itemsize);
    Py_END_ALLOW_THREADS
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&stream);
    PyBuffer_Release(&widths);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"histogram", py_histogram, METH_VARARGS, "Per-block, per-field symbol counts (u32)."},
    {"encode", py_encode, METH_VARARGS, "Encode every (block, field) part of a piece."},
    {"decode", py_decode, METH_VARARGS, "Decode a whole piece into a writable buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_entropy", "float-entropy.v1 hot loops", -1, methods};

PyMODINIT_FUNC PyInit__entropy(void) { return PyModule_Create(&module); }
