/*
 * Hot loops of the float-entropy.v1 codec (shardstore/codecs/entropy.py documents the format).
 *
 * Two entry points, each one call per piece with the GIL released for all of its work, so that
 * a thread pool encodes and decodes pieces on every core:
 *   encode_piece(data, itemsize, rotate, widths, block_elems, cost) -> bytes   the whole stream
 *   decode(stream, itemsize, rotate, widths, block_elems, out[, simd]) -> None   writes `out`
 *
 * The encoder's planning (normalize_row, the cost estimate, the raw/coded choice) mirrors
 * entropy.normalize and entropy._plan step for step, so the numpy fallback gives the same bytes.
 *
 * Portable C99 built without -march flags; the AVX2 decode loops are compiled with a target
 * attribute and chosen at run time (__builtin_cpu_supports), the portable loops otherwise.
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


#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ encode */

/* Element i's bits, sign rotated to bit 0 for floats. `k` is a compile-time constant at every
 * call site (see DISPATCH_K), so each dtype gets its own straight-line loop. */
ALWAYS_INLINE uint64_t elem_bits_k(const uint8_t *data, Py_ssize_t i, const int k, int rotate) {
    uint64_t u = load_elem(data + i * k, k);
    return rotate ? rotl1(u, 8 * k) : u;
}

#define DISPATCH_K(k, call) \
    switch (k) {            \
    case 1: call(1); break; \
    case 2: call(2); break; \
    case 4: call(4); break; \
    default: call(8); break; \
    }

/* Counts of one block, per field. Four sub-histograms (element i goes to i % 4): a run of one
 * symbol, common in the exponent field, would otherwise serialise on a single counter. */
ALWAYS_INLINE void hist_block_k(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t nb, uint32_t *sub,
                                uint32_t *counts, const int k) {
    int nf = lay->nfields, rotate = lay->rotate;
    size_t stride = (size_t)nf * ALPHABET;
    uint32_t masks[MAX_FIELDS];
    for (int f = 0; f < nf; f++) masks[f] = (1u << lay->widths[f]) - 1;
    memset(sub, 0, 4 * stride * sizeof(uint32_t));
    Py_ssize_t i = 0;
    for (; i + 4 <= nb; i += 4) {
        for (int q = 0; q < 4; q++) {
            uint64_t u = elem_bits_k(src, i0 + i + q, k, rotate);
            uint32_t *h = sub + q * stride;
            for (int f = 0; f < nf; f++) h[f * ALPHABET + ((u >> lay->shifts[f]) & masks[f])]++;
        }
    }
    for (; i < nb; i++) {
        uint64_t u = elem_bits_k(src, i0 + i, k, rotate);
        for (int f = 0; f < nf; f++) sub[f * ALPHABET + ((u >> lay->shifts[f]) & masks[f])]++;
    }
    for (size_t e = 0; e < stride; e++) counts[e] = sub[e] + sub[stride + e] + sub[2 * stride + e] + sub[3 * stride + e];
}

static void hist_block(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t nb, uint32_t *sub,
                       uint32_t *counts) {
#define HIST(K) hist_block_k(lay, src, i0, nb, sub, counts, K)
    DISPATCH_K(lay->itemsize, HIST)
#undef HIST
}

typedef struct {
    int64_t rem;
    int idx;
} remkey_t;

static int cmp_rem(const void *a, const void *b) {
    const remkey_t *x = (const remkey_t *)a, *y = (const remkey_t *)b;
    if (x->rem != y->rem) return x->rem > y->rem ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}

/* entropy.normalize for one row, step for step (largest remainder, ties to the lower symbol,
 * overshoot taken from the first most frequent symbol): the numpy fallback gives the same bytes. */
static void normalize_row(const uint32_t *counts, int64_t total, int32_t *freqs) {
    remkey_t keys[ALPHABET];
    int nk = 0;
    int64_t sum = 0;
    for (int s = 0; s < ALPHABET; s++) {
        int64_t c = counts[s], scaled = c * PROB_SCALE, f = scaled / total;
        if (c > 0 && f == 0) {
            f = 1; /* bumped: already got more than its share */
        } else if (c > 0) {
            keys[nk].rem = scaled % total;
            keys[nk].idx = s;
            nk++;
        }
        freqs[s] = (int32_t)f;
        sum += f;
    }
    int64_t diff = PROB_SCALE - sum;
    if (diff > 0) {
        qsort(keys, (size_t)nk, sizeof(remkey_t), cmp_rem);
        for (int r = 0; r < nk && r < diff; r++) freqs[keys[r].idx]++;
    }
    int64_t excess = diff < 0 ? -diff : 0;
    while (excess) {
        int top = 0;
        for (int s = 1; s < ALPHABET; s++)
            if (freqs[s] > freqs[top]) top = s;
        int64_t take = freqs[top] - 1 < excess ? freqs[top] - 1 : excess;
        if (take <= 0) break; /* unreachable: a row has at most 512 symbols */
        freqs[top] -= (int32_t)take;
        excess -= take;
    }
}

static uint8_t *put_varint(uint8_t *p, uint32_t v) {
    /* Values stay below 2^14 (symbols, gaps, frequencies - 1): one or two bytes. */
    if (v >= 0x80) {
        *p++ = (uint8_t)((v & 0x7f) | 0x80);
        *p++ = (uint8_t)(v >> 7);
    } else {
        *p++ = (uint8_t)v;
    }
    return p;
}

/* The table of a coded field (symbol count, symbols, frequencies), as entropy._table_bytes. */
static Py_ssize_t table_bytes(const int32_t *freqs, uint8_t *dst) {
    uint8_t *p = dst;
    int nsym = 0, last = -1;
    for (int s = 0; s < ALPHABET; s++) nsym += freqs[s] > 0;
    p = put_varint(p, (uint32_t)(nsym - 1));
    for (int s = 0; s < ALPHABET; s++) {
        if (!freqs[s]) continue;
        p = put_varint(p, (uint32_t)(last < 0 ? s : s - last - 1));
        last = s;
    }
    for (int s = 0; s < ALPHABET; s++)
        if (freqs[s]) p = put_varint(p, (uint32_t)(freqs[s] - 1));
    return p - dst;
}

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
    Py_ssize_t o = 0, i = 0;
    /* Eight values at a time fill exactly w bytes: no per-value flush (w < 8 fits 64 bits). */
    for (; w < 8 && i + 8 <= n; i += 8) {
        uint64_t v = 0;
        for (int j = 0; j < 8; j++) v |= (uint64_t)((elem_bits_k(src, i0 + i + j, k, rotate) >> sh) & mask) << (w * j);
        for (int b = 0; b < w; b++) dst[o++] = (uint8_t)(v >> (8 * b));
    }
    for (; i < n; i++) {
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
                                       int f, const int32_t *freqs, uint8_t *restrict dst, uint8_t *scratch_end,
                                       const int k) {
    int rotate = lay->rotate;
    enc_sym_t syms[ALPHABET];
    uint32_t start = 0;
    int alphabet = 1 << lay->widths[f];
    for (int s = 0; s < alphabet; s++) {
        uint32_t fr = (uint32_t)freqs[s];
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

static void pack_raw(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t n, int f, uint8_t *dst) {
#define PACK(K) pack_raw_k(lay, src, i0, n, f, dst, K)
    DISPATCH_K(lay->itemsize, PACK)
#undef PACK
}

static Py_ssize_t rans_encode(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t n, int f,
                              const int32_t *freqs, uint8_t *dst, uint8_t *scratch_end) {
    Py_ssize_t len = 0;
#define ENC(K) len = rans_encode_k(lay, src, i0, n, f, freqs, dst, scratch_end, K)
    DISPATCH_K(lay->itemsize, ENC)
#undef ENC
    return len;
}

#define MAX_TABLE_BYTES (2 + 256 * 2 + 256 * 2) /* symbol count, symbols, frequencies */

/* Upper bound of one part: mode byte, table, length, states, at most one word per element. */
static Py_ssize_t part_bound(Py_ssize_t nb) { return 1 + MAX_TABLE_BYTES + 4 + 4 * LANES + 2 * nb; }

/* The whole piece: per block, histogram, tables, raw/coded choice (as entropy._plan), payloads.
 * Returns the bytes written to out, or -1 when out of memory. */
static Py_ssize_t encode_piece(const layout_t *lay, const uint8_t *src, Py_ssize_t n, const int64_t *cost,
                               uint8_t *out) {
    int nf = lay->nfields;
    Py_ssize_t be = lay->block_elems;
    uint32_t *sub = (uint32_t *)malloc(4 * (size_t)nf * ALPHABET * sizeof(uint32_t));
    uint32_t *counts = (uint32_t *)malloc((size_t)nf * ALPHABET * sizeof(uint32_t));
    int32_t *freqs = (int32_t *)malloc((size_t)nf * ALPHABET * sizeof(int32_t));
    uint8_t *scratch = (uint8_t *)malloc((size_t)(2 * be + 16));
    Py_ssize_t pos = -1;
    if (!sub || !counts || !freqs || !scratch) goto done;
    pos = 0;
    for (Py_ssize_t i0 = 0; i0 < n; i0 += be) {
        Py_ssize_t nb = n - i0 < be ? n - i0 : be;
        hist_block(lay, src, i0, nb, sub, counts);
        for (int f = 0; f < nf; f++) {
            const uint32_t *c = counts + f * ALPHABET;
            int32_t *fr = freqs + f * ALPHABET;
            int w = lay->widths[f];
            Py_ssize_t raw_bytes = (nb * w + 7) / 8;
            int nsym = 0;
            for (int s = 0; s < ALPHABET; s++) nsym += c[s] > 0;
            int coded = 0;
            uint8_t *p = out + pos;
            if (nsym <= 256) {
                normalize_row(c, nb, fr);
                int64_t bits = 0;
                for (int s = 0; s < ALPHABET; s++) bits += (int64_t)c[s] * cost[fr[s]];
                bits >>= 16;
                Py_ssize_t tlen = table_bytes(fr, p + 1); /* written in place; dropped if raw wins */
                coded = (Py_ssize_t)((bits + 7) / 8) + tlen + 4 + 4 * LANES < raw_bytes;
                if (coded) {
                    p[0] = 1;
                    uint8_t *lenp = p + 1 + tlen;
                    Py_ssize_t len = rans_encode(lay, src, i0, nb, f, fr, lenp + 4, scratch + 2 * be + 16);
                    store_elem(lenp, 4, (uint64_t)len);
                    pos += 1 + tlen + 4 + len;
                }
            }
            if (!coded) {
                p[0] = 0;
                pack_raw(lay, src, i0, nb, f, p + 1);
                pos += 1 + raw_bytes;
            }
        }
    }
done:
    free(sub);
    free(counts);
    free(freqs);
    free(scratch);
    return pos;
}

static PyObject *py_encode_piece(PyObject *self, PyObject *args) {
    Py_buffer data, widths, cost;
    int itemsize, rotate;
    Py_ssize_t block_elems;
    if (!PyArg_ParseTuple(args, "y*iiy*ny*", &data, &itemsize, &rotate, &widths, &block_elems, &cost)) return NULL;
    layout_t lay;
    PyObject *result = NULL;
    if (parse_layout(&lay, itemsize, rotate, &widths, block_elems) < 0) goto done;
    if (data.len % itemsize) {
        PyErr_SetString(PyExc_ValueError, "data is not a whole number of elements");
        goto done;
    }
    if (cost.len != (PROB_SCALE + 1) * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "cost table must hold 4097 int64");
        goto done;
    }
    Py_ssize_t n = data.len / itemsize;
    Py_ssize_t nblocks = (n + block_elems - 1) / block_elems;
    /* A malloc'd scratch rather than a PyBytes of the bound: malloc reuses the freed pages of the
     * previous piece, where a fresh bound-sized object would fault in (and zero) new ones. */
    Py_ssize_t bound = nblocks * lay.nfields * part_bound(0) + (Py_ssize_t)lay.nfields * 2 * n + 16;
    uint8_t *buf = (uint8_t *)malloc((size_t)bound);
    if (!buf) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t len;
    Py_BEGIN_ALLOW_THREADS
    len = encode_piece(&lay, (const uint8_t *)data.buf, n, (const int64_t *)cost.buf, buf);
    Py_END_ALLOW_THREADS
    if (len < 0)
        PyErr_NoMemory();
    else
        result = PyBytes_FromStringAndSize((const char *)buf, len);
    free(buf);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&widths);
    PyBuffer_Release(&cost);
    return result;
}

/* ------------------------------------------------------------------ decode */

typedef struct {
    int coded;
    /* coded */
    uint32_t table[PROB_SCALE];    /* freq (13 bits) | bias << 13: the state update per slot */
    uint16_t slot_sym[PROB_SCALE]; /* the symbol per slot, separate so its load is off the state chain */
    uint16_t slot_pad[8];          /* a 32-bit gather of slot_sym[4095] reads two bytes past it */
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
    memset(fd->slot_pad, 0, sizeof fd->slot_pad);
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

/* Decode the next cnt symbols of a coded field into dst, from symbol i (a multiple of LANES)
 * on: the portable path, and the tail of the SIMD one. */
static int rans_decode_scalar(field_dec_t *fd, uint16_t *restrict dst, Py_ssize_t i, Py_ssize_t cnt) {
    const uint32_t *restrict tab = fd->table;
    const uint16_t *restrict sy = fd->slot_sym;
    uint32_t st[LANES];
    memcpy(st, fd->st, sizeof st);
    const uint8_t *restrict p = fd->wp;
    const uint8_t *end = fd->wend;
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

static void raw_unpack_scalar(const field_dec_t *fd, int w, Py_ssize_t i0, uint16_t *dst, Py_ssize_t i,
                              Py_ssize_t cnt) {
    const uint8_t *r = fd->raw;
    if (w == 8) {
        for (; i < cnt; i++) dst[i] = r[i0 + i];
        return;
    }
    uint32_t mask = (1u << w) - 1;
    if (w == 7 && (i0 + i) % 8 == 0) {
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

/* ---- AVX2: 8 lanes per vector, the 32 lanes in four vectors, chosen at run time. */

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1
#include <immintrin.h>

/* For a mask of the lanes that read a word, where each lane's word sits among the next ones. */
static uint32_t renorm_perm[256][8];

static void init_renorm_perm(void) {
    for (int m = 0; m < 256; m++) {
        int k = 0;
        for (int j = 0; j < 8; j++) renorm_perm[m][j] = (m >> j) & 1 ? (uint32_t)k++ : 0;
    }
}

#define AVX2 __attribute__((target("avx2,popcnt")))

static inline AVX2 __m256i rans_step8(__m256i x, const uint32_t *tab, const uint16_t *sy, const uint8_t **pp,
                                      __m256i *sym) {
    const __m256i slot_mask = _mm256_set1_epi32(PROB_SCALE - 1);
    const __m256i freq_mask = _mm256_set1_epi32(0x1fff);
    const __m256i low16 = _mm256_set1_epi32(0xffff);
    __m256i slot = _mm256_and_si256(x, slot_mask);
    __m256i e = _mm256_i32gather_epi32((const int *)tab, slot, 4);
    *sym = _mm256_and_si256(_mm256_i32gather_epi32((const int *)sy, slot, 2), low16);
    x = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(e, freq_mask), _mm256_srli_epi32(x, PROB_BITS)),
                         _mm256_srli_epi32(e, 13));
    __m256i need = _mm256_cmpeq_epi32(_mm256_min_epu32(x, low16), x); /* x < 2^16 */
    int m = _mm256_movemask_ps(_mm256_castsi256_ps(need));
    const uint8_t *p = *pp;
    __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    words = _mm256_permutevar8x32_epi32(words, _mm256_loadu_si256((const __m256i *)renorm_perm[m]));
    x = _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), words), need);
    *pp = p + 2 * _mm_popcnt_u32((unsigned)m);
    return x;
}

static inline AVX2 void store_sym16(uint16_t *dst, __m256i a, __m256i b) {
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
    _mm256_storeu_si256((__m256i *)dst, packed);
}

static AVX2 int rans_decode_avx2(field_dec_t *fd, uint16_t *restrict dst, Py_ssize_t cnt) {
    const uint32_t *tab = fd->table;
    const uint16_t *sy = fd->slot_sym;
    const uint8_t *p = fd->wp, *end = fd->wend;
    __m256i x0 = _mm256_loadu_si256((const __m256i *)(fd->st + 0));
    __m256i x1 = _mm256_loadu_si256((const __m256i *)(fd->st + 8));
    __m256i x2 = _mm256_loadu_si256((const __m256i *)(fd->st + 16));
    __m256i x3 = _mm256_loadu_si256((const __m256i *)(fd->st + 24));
    Py_ssize_t i = 0;
    /* 32 symbols read at most 32 words; each 16-byte load stays inside the payload. */
    while (cnt - i >= LANES && end - p >= 2 * LANES) {
        __m256i s0, s1, s2, s3;
        x0 = rans_step8(x0, tab, sy, &p, &s0);
        x1 = rans_step8(x1, tab, sy, &p, &s1);
        x2 = rans_step8(x2, tab, sy, &p, &s2);
        x3 = rans_step8(x3, tab, sy, &p, &s3);
        store_sym16(dst + i, s0, s1);
        store_sym16(dst + i + 16, s2, s3);
        i += LANES;
    }
    _mm256_storeu_si256((__m256i *)(fd->st + 0), x0);
    _mm256_storeu_si256((__m256i *)(fd->st + 8), x1);
    _mm256_storeu_si256((__m256i *)(fd->st + 16), x2);
    _mm256_storeu_si256((__m256i *)(fd->st + 24), x3);
    fd->wp = p;
    return rans_decode_scalar(fd, dst, i, cnt);
}

/* Raw w-bit values, 16 per step: each 128-bit half takes 8 values (w bytes) from a 16-byte load;
 * a byte shuffle puts each value's two bytes in its 16-bit lane, a multiply by 2^(16-w-s) moves
 * its bits to the top (s = its bit offset, s + w <= 16), and one shift brings them down. */
static AVX2 void raw_unpack_avx2(const field_dec_t *fd, int w, Py_ssize_t i0, uint16_t *dst, Py_ssize_t cnt) {
    Py_ssize_t i = 0;
    const uint8_t *r = fd->raw;
    if (w == 8) {
        for (; i + 16 <= cnt; i += 16)
            _mm256_storeu_si256((__m256i *)(dst + i),
                                _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(r + i0 + i))));
    } else if ((i0 * w) % 8 == 0) {
        uint8_t shuf[16];
        uint16_t mul[8];
        for (int j = 0; j < 8; j++) {
            int bit = w * j;
            shuf[2 * j] = (uint8_t)(bit >> 3);
            shuf[2 * j + 1] = (uint8_t)((bit >> 3) + 1);
            mul[j] = (uint16_t)(1u << (16 - w - (bit & 7)));
        }
        const __m256i shuffle = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)shuf));
        const __m256i mult = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)mul));
        const int down = 16 - w;
        for (; i + 16 <= cnt && (i0 + i) / 8 * w + w + 16 <= fd->raw_len; i += 16) {
            const uint8_t *base = r + (i0 + i) / 8 * w;
            __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)base)),
                                                _mm_loadu_si128((const __m128i *)(base + w)), 1);
            v = _mm256_mullo_epi16(_mm256_shuffle_epi8(v, shuffle), mult);
            _mm256_storeu_si256((__m256i *)(dst + i), _mm256_srl_epi16(v, _mm_cvtsi32_si128(down)));
        }
    }
    raw_unpack_scalar(fd, w, i0, dst, i, cnt);
}
#endif

/* Merge the fields of cnt elements into place (sign rotated back), straight into `out`. */
ALWAYS_INLINE void merge_fields(const layout_t *lay, const uint16_t *tmp, uint8_t *dst, Py_ssize_t cnt) {
    int k = lay->itemsize, nf = lay->nfields, bits = 8 * k;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (k == 2 && nf == 2 && lay->rotate) {
        const uint16_t *a = tmp, *b = tmp + CHUNK;
        const int s0 = lay->shifts[0];
        for (Py_ssize_t i = 0; i < cnt; i++) {
            uint16_t u = (uint16_t)((a[i] << s0) | b[i]);
            u = (uint16_t)((u >> 1) | (u << 15));
            memcpy(dst + 2 * i, &u, 2);
        }
        return;
    }
    if (k == 4 && nf == 4 && lay->rotate) {
        const uint16_t *a = tmp, *b = tmp + CHUNK, *c = tmp + 2 * CHUNK, *d = tmp + 3 * CHUNK;
        const int s0 = lay->shifts[0], s1 = lay->shifts[1], s2 = lay->shifts[2];
        for (Py_ssize_t i = 0; i < cnt; i++) {
            uint32_t u = ((uint32_t)a[i] << s0) | ((uint32_t)b[i] << s1) | ((uint32_t)c[i] << s2) | d[i];
            u = (u >> 1) | (u << 31);
            memcpy(dst + 4 * i, &u, 4);
        }
        return;
    }
#endif
    for (Py_ssize_t i = 0; i < cnt; i++) {
        uint64_t u = 0;
        for (int f = 0; f < nf; f++) u |= (uint64_t)tmp[f * CHUNK + i] << lay->shifts[f];
        if (lay->rotate) u = rotr1(u, bits);
        store_elem(dst + i * k, k, u);
    }
}

ALWAYS_INLINE const char *decode_piece_impl(const layout_t *lay, const uint8_t *stream, Py_ssize_t len, uint8_t *out,
                                            Py_ssize_t n, const int simd) {
    const uint8_t *p = stream, *end = stream + len;
    field_dec_t *fds = (field_dec_t *)malloc(sizeof(field_dec_t) * (size_t)lay->nfields);
    uint16_t *tmp = (uint16_t *)malloc(sizeof(uint16_t) * CHUNK * (size_t)lay->nfields);
    const char *err = NULL;
    if (!fds || !tmp) {
        err = "out of memory";
        goto done;
    }
    int k = lay->itemsize, nf = lay->nfields;
    for (Py_ssize_t i0 = 0; i0 < n && !err; i0 += lay->block_elems) {
        Py_ssize_t nb = n - i0 < lay->block_elems ? n - i0 : lay->block_elems;
        for (int f = 0; f < nf && !err; f++) err = parse_field(&fds[f], &p, end, lay->widths[f], nb);
        if (err) break;
        for (Py_ssize_t c0 = 0; c0 < nb; c0 += CHUNK) {
            Py_ssize_t cnt = nb - c0 < CHUNK ? nb - c0 : CHUNK;
            for (int f = 0; f < nf; f++) {
                uint16_t *t = tmp + f * CHUNK;
                if (fds[f].coded) {
                    int rc;
#ifdef HAVE_AVX2_PATH
                    if (simd)
                        rc = rans_decode_avx2(&fds[f], t, cnt);
                    else
#endif
                        rc = rans_decode_scalar(&fds[f], t, 0, cnt);
                    if (rc < 0) {
                        err = "rANS stream ends early";
                        goto done;
                    }
                } else {
#ifdef HAVE_AVX2_PATH
                    if (simd)
                        raw_unpack_avx2(&fds[f], lay->widths[f], c0, t, cnt);
                    else
#endif
                        raw_unpack_scalar(&fds[f], lay->widths[f], c0, t, 0, cnt);
                }
            }
            merge_fields(lay, tmp, out + (i0 + c0) * k, cnt);
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

static const char *decode_piece_portable(const layout_t *lay, const uint8_t *stream, Py_ssize_t len, uint8_t *out,
                                         Py_ssize_t n) {
    return decode_piece_impl(lay, stream, len, out, n, 0);
}

#ifdef HAVE_AVX2_PATH
/* The same loops compiled for AVX2 (the merge vectorises too), with the SIMD rANS steps. */
static AVX2 const char *decode_piece_avx2(const layout_t *lay, const uint8_t *stream, Py_ssize_t len, uint8_t *out,
                                          Py_ssize_t n) {
    return decode_piece_impl(lay, stream, len, out, n, 1);
}
#endif

static int have_avx2 = 0;

static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer stream, widths, out;
    int itemsize, rotate, simd = 1;
    Py_ssize_t block_elems;
    if (!PyArg_ParseTuple(args, "y*iiy*nw*|p", &stream, &itemsize, &rotate, &widths, &block_elems, &out, &simd))
        return NULL;
    layout_t lay;
    PyObject *result = NULL;
    if (parse_layout(&lay, itemsize, rotate, &widths, block_elems) < 0) goto done;
    if (out.len % itemsize) {
        PyErr_SetString(PyExc_ValueError, "output is not a whole number of elements");
        goto done;
    }
    const char *err;
    const uint8_t *src = (const uint8_t *)stream.buf;
    uint8_t *dst = (uint8_t *)out.buf;
    Py_ssize_t n = out.len / itemsize;
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_PATH
    if (simd && have_avx2)
        err = decode_piece_avx2(&lay, src, stream.len, dst, n);
    else
#endif
        err = decode_piece_portable(&lay, src, stream.len, dst, n);
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

static PyObject *py_simd(PyObject *self, PyObject *args) { return PyUnicode_FromString(have_avx2 ? "avx2" : "none"); }

static PyMethodDef methods[] = {
    {"encode_piece", py_encode_piece, METH_VARARGS, "Encode a whole piece: tables, raw/coded choice, payloads."},
    {"decode", py_decode, METH_VARARGS, "Decode a whole piece into a writable buffer (last arg: allow SIMD)."},
    {"simd", py_simd, METH_NOARGS, "The SIMD decode path this CPU uses: 'avx2' or 'none'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_entropy", "float-entropy.v1 hot loops", -1, methods};

PyMODINIT_FUNC PyInit__entropy(void) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    init_renorm_perm();
#endif
    return PyModule_Create(&module);
}
