/*
 * Hot loops of the float-entropy.v1 codec (shardstore/codecs/entropy.py documents the format).
 *
 * Two entry points, each one call per piece with the GIL released for all of its work, so that
 * a thread pool encodes and decodes pieces on every core:
 *   encode_piece(data, itemsize, rotate, widths, block_elems, cost[, simd]) -> bytes   the stream
 *   decode(stream, itemsize, rotate, widths, block_elems, out[, simd]) -> None   writes `out`
 *
 * The encoder's planning (normalize_row, the cost estimate, the raw/coded choice) mirrors
 * entropy.normalize and entropy._plan step for step, so the numpy fallback gives the same bytes.
 * The SIMD and portable loops compute the same integers (the SIMD encoder's division is exact,
 * see enc_step8), so `simd` changes only the speed, never a byte.
 *
 * Portable C99 built without -march flags; the AVX2 loops (rANS encode and decode, raw field
 * packing and unpacking, the field merge fused into the last coded field's decode) are compiled
 * with a target attribute and chosen at run time (__builtin_cpu_supports), the portable loops
 * otherwise. The decoder's rANS loops also come in an AVX-512 (F, VL) build, from the same source
 * (_entropy_rans.h, included once per instruction set), chosen where the CPU has it.
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

/* The SIMD loops are compiled with a target attribute and chosen at run time, so one build runs
 * everywhere: x86-64 with GCC or Clang gets them, any other machine the portable loops alone. */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma,popcnt")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma,popcnt")))
/* The decoder's rANS steps also come in an AVX-512 (F, VL) build, on 256-bit vectors still. */
#define AVX512 __attribute__((target("avx2,fma,popcnt,avx512f,avx512vl")))
#define AVX512_INLINE static inline __attribute__((always_inline, target("avx2,fma,popcnt,avx512f,avx512vl")))
#endif

static int have_avx2 = 0, have_avx512 = 0;

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

/* Only the lowest field holds the rotated sign bit: any other is a plain shift of the unrotated
 * value, one less. Returns whether the field needs the rotation, and sets its shift. */
static int field_shift(const layout_t *lay, int f, int *shift) {
    int sh = lay->shifts[f];
    *shift = lay->rotate && sh ? sh - 1 : sh;
    return lay->rotate && !sh;
}

/* One field's bin of element u (unrotated; see field_shift). */
typedef struct {
    int shift;
    uint32_t mask, off;
} field_bin_t;

ALWAYS_INLINE uint32_t field_bin(uint64_t u, field_bin_t b, const int bits, const int rot) {
    uint64_t v = rot ? (u << 1) | (u >> (bits - 1)) : u >> b.shift;
    return b.off + ((uint32_t)v & b.mask);
}

/* Counts of one block, per field, for any layout. Four sub-histograms (element i goes to i % 4):
 * a run of one symbol, common in the exponent field, would otherwise serialise on one counter.
 * Field f's bins start at its own offset (its width, not 512: the four copies stay in L1).
 * `rotated`: the layout rotates the sign, so the last field (shift 0) takes the rotation. */
ALWAYS_INLINE void hist_fields_k(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t nb, uint32_t *sub,
                                 uint32_t *counts, const int k, const int nf, const int rotated) {
    const int bits = 8 * k;
    /* Locals, not lay->: the counter stores could otherwise alias them and force reloads. */
    field_bin_t fb[MAX_FIELDS];
    uint32_t stride = 0;
    for (int f = 0; f < nf; f++) {
        field_shift(lay, f, &fb[f].shift);
        fb[f].mask = (1u << lay->widths[f]) - 1;
        fb[f].off = stride;
        stride += 1u << lay->widths[f];
    }
    memset(sub, 0, 4 * (size_t)stride * sizeof(uint32_t));
    uint32_t *h0 = sub, *h1 = sub + stride, *h2 = sub + 2 * stride, *h3 = sub + 3 * stride;
    const uint8_t *p = src + i0 * k;
    Py_ssize_t i = 0;
#define COUNT(H, U)                                                          \
    do {                                                                     \
        uint64_t u_ = (U);                                                   \
        for (int f = 0; f < nf; f++) (H)[field_bin(u_, fb[f], bits, rotated && f == nf - 1)]++;     \
    } while (0)
    for (; i + 4 <= nb; i += 4) {
        COUNT(h0, load_elem(p + i * k, k));
        COUNT(h1, load_elem(p + (i + 1) * k, k));
        COUNT(h2, load_elem(p + (i + 2) * k, k));
        COUNT(h3, load_elem(p + (i + 3) * k, k));
    }
    for (; i < nb; i++) COUNT(h0, load_elem(p + i * k, k));
#undef COUNT
    memset(counts, 0, (size_t)nf * ALPHABET * sizeof(uint32_t));
    for (int f = 0; f < nf; f++)
        for (uint32_t s = 0; s <= fb[f].mask; s++) {
            uint32_t e = fb[f].off + s;
            counts[f * ALPHABET + s] = h0[e] + h1[e] + h2[e] + h3[e];
        }
}

/* 2-byte elements in a long block: one count per element in a 65536-bin histogram of the whole
 * value (unrotated; the fold rotates), then folded into the fields: one increment per element
 * instead of one per field (measured faster for BF16 and F16 alike). Not worth its 256 KiB
 * clear and fold below HIST16_MIN elements. */
#define HIST16_MIN 16384

static void hist_whole16(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t nb, uint32_t *big,
                         uint32_t *counts) {
    memset(big, 0, 65536 * sizeof(uint32_t));
    const uint8_t *p = src + 2 * i0;
    Py_ssize_t i = 0;
    /* Four elements per 8-byte load; counted unrotated (the fold below rotates). */
    for (; i + 4 <= nb; i += 4) {
        uint64_t w = (uint64_t)rd32(p + 2 * i) | (uint64_t)rd32(p + 2 * i + 4) << 32;
        big[w & 0xffff]++;
        big[(w >> 16) & 0xffff]++;
        big[(w >> 32) & 0xffff]++;
        big[w >> 48]++;
    }
    for (; i < nb; i++) big[(uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 8]++;
    int nf = lay->nfields;
    memset(counts, 0, (size_t)nf * ALPHABET * sizeof(uint32_t));
    if (nf == 2 && lay->widths[1] >= 2) {
        /* Rows of the low field: the high field's count is a row sum, the low one a column sum.
         * Rotated, the sign becomes the low field's bit 0: each sign half of the table gives
         * the even or odd low-field bins, with rows half as long. */
        int rot = lay->rotate != 0;
        uint32_t cols = 1u << (lay->widths[1] - rot), rows = 1u << lay->widths[0];
        uint32_t *hi = counts, *lo = counts + ALPHABET;
        uint32_t col_sum[2][256];
        memset(col_sum, 0, sizeof col_sum);
        for (int half = 0; half <= rot; half++) {
            const uint32_t *base = big + (half << 15);
            for (uint32_t r = 0; r < rows; r++) {
                const uint32_t *row = base + r * cols;
                uint32_t sum = 0;
                for (uint32_t c = 0; c < cols; c++) {
                    sum += row[c];
                    col_sum[half][c] += row[c];
                }
                hi[r] += sum;
            }
        }
        for (uint32_t c = 0; c < cols; c++) {
            if (rot) {
                lo[2 * c] = col_sum[0][c];
                lo[2 * c + 1] = col_sum[1][c];
            } else {
                lo[c] = col_sum[0][c];
            }
        }
        return;
    }
    for (uint32_t v = 0; v < 65536; v++) {
        if (!big[v]) continue;
        uint32_t u = lay->rotate ? ((v << 1) | (v >> 15)) & 0xffff : v;
        for (int f = 0; f < nf; f++) counts[f * ALPHABET + ((u >> lay->shifts[f]) & ((1u << lay->widths[f]) - 1))] += big[v];
    }
}

static void hist_block(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t nb, uint32_t *sub,
                       uint32_t *big, uint32_t *counts) {
    if (big && nb >= HIST16_MIN) {
        hist_whole16(lay, src, i0, nb, big, counts);
        return;
    }
    /* The common layouts get their field loop unrolled. */
    switch (lay->itemsize * 16 + lay->nfields) {
    case 1 * 16 + 1: hist_fields_k(lay, src, i0, nb, sub, counts, 1, 1, 0); break;
    case 2 * 16 + 2:
        if (lay->rotate) hist_fields_k(lay, src, i0, nb, sub, counts, 2, 2, 1);
        else hist_fields_k(lay, src, i0, nb, sub, counts, 2, 2, 0);
        break;
    case 4 * 16 + 4:
        if (lay->rotate) hist_fields_k(lay, src, i0, nb, sub, counts, 4, 4, 1);
        else hist_fields_k(lay, src, i0, nb, sub, counts, 4, 4, 0);
        break;
    case 8 * 16 + 8:
        if (lay->rotate) hist_fields_k(lay, src, i0, nb, sub, counts, 8, 8, 1);
        else hist_fields_k(lay, src, i0, nb, sub, counts, 8, 8, 0);
        break;
    default:
#define HIST(K) hist_fields_k(lay, src, i0, nb, sub, counts, K, lay->nfields, lay->rotate)
        DISPATCH_K(lay->itemsize, HIST)
#undef HIST
    }
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

/* Per-symbol encode entries: frequency (13 bits, 4096 for a single-symbol table) | start << 13,
 * and ceil(2^63 / f), whose 128-bit product with any 32-bit x gives x / f exactly. */
static void enc_table(const int32_t *freqs, int w, uint32_t *packed, uint64_t *rcp) {
    uint32_t start = 0;
    for (int s = 0; s < (1 << w); s++) {
        uint32_t fr = (uint32_t)freqs[s];
        packed[s] = fr | start << 13;
        if (rcp) rcp[s] = fr ? (uint64_t)((((unsigned long long)1 << 63) + fr - 1) / fr) : 0;
        start += fr;
    }
}

/* One rANS encode step, x -> C(s, x), words growing downwards. Renormalise while x >= f << 20
 * (x >> 20 >= f: no 64-bit compare for f = 4096), then x = (x / f) << 12 | x % f, plus start. */
ALWAYS_INLINE uint32_t enc_put(uint32_t x, uint32_t e, uint64_t rcp, uint8_t **wpp) {
    uint32_t fr = e & 0x1fff, need = (x >> 20) >= fr;
    uint8_t *wp = *wpp;
    /* Branchless, as in the decoder: always store, advance only when needed (the scratch buffer
     * keeps slack below the lowest possible word). */
    wp[-2] = (uint8_t)x;
    wp[-1] = (uint8_t)(x >> 8);
    *wpp = wp - (need << 1);
    x >>= need << 4;
#if defined(__SIZEOF_INT128__)
    uint32_t q = (uint32_t)(((unsigned __int128)x * rcp) >> 63);
#else
    uint32_t q = x / fr;
    (void)rcp;
#endif
    return (q << PROB_BITS) + (x - q * fr) + (e >> 13);
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

/* rANS-code one field of one block; returns the payload length written to dst (>= 4 * LANES).
 * Symbols go backwards, element i on lane i % 32, so that the decoder reads forwards. */
ALWAYS_INLINE Py_ssize_t rans_encode_k(const layout_t *lay, const uint8_t *restrict src, Py_ssize_t i0, Py_ssize_t n,
                                       int f, const int32_t *freqs, uint8_t *restrict dst, uint8_t *scratch_end,
                                       const int k) {
    int rotate = lay->rotate, sh = lay->shifts[f];
    uint32_t packed[ALPHABET], mask = (1u << lay->widths[f]) - 1;
    uint64_t rcp[ALPHABET];
    enc_table(freqs, lay->widths[f], packed, rcp);
    uint32_t st[LANES];
    for (int j = 0; j < LANES; j++) st[j] = RANS_L;
    uint8_t *wp = scratch_end;
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        int j = (int)(i & (LANES - 1));
        uint32_t s = (uint32_t)(elem_bits_k(src, i0 + i, k, rotate) >> sh) & mask;
        st[j] = enc_put(st[j], packed[s], rcp[s], &wp);
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

#ifdef HAVE_AVX2_PATH
/* For a mask of the lanes that renormalise: the permutation gathering their words to the top
 * positions of a vector in lane order (encode), and the one spreading the next words read to
 * them (decode). */
static uint32_t renorm_compress[256][8];
static uint32_t renorm_perm[256][8];

static void init_renorm_tables(void) {
    for (int m = 0; m < 256; m++) {
        int cnt = __builtin_popcount((unsigned)m), k = 0;
        for (int j = 0; j < 8; j++) renorm_compress[m][j] = 0;
        for (int j = 0; j < 8; j++) {
            renorm_perm[m][j] = (m >> j) & 1 ? (uint32_t)k : 0;
            if ((m >> j) & 1) renorm_compress[m][8 - cnt + k++] = (uint32_t)j;
        }
    }
}

/* table[idx] for eight lanes. Eight scalar loads rather than a gather: on AMD Zen 4, where this
 * was measured, vpgatherdd costs about a cycle per element, and the loads made the whole decode
 * 1.5x and the encode 1.1x faster (on other CPUs a gather may win; not measured there). */
AVX2_INLINE __m256i lookup8_k(const uint32_t *table, __m256i idx, const int reload) {
    uint32_t i[8] __attribute__((aligned(32)));
    _mm256_store_si256((__m256i *)i, idx);
    /* `reload`: read the indices back from memory. Left to itself the compiler extracts them
     * with vpextrd, two micro-ops each on Zen 4 where a load is one: the decoder is bound by
     * micro-ops and runs 5% faster; the encoder, bound by its division, does not gain. */
    if (reload) __asm__("" : "+m"(i));
    return _mm256_setr_epi32((int)table[i[0]], (int)table[i[1]], (int)table[i[2]], (int)table[i[3]],
                             (int)table[i[4]], (int)table[i[5]], (int)table[i[6]], (int)table[i[7]]);
}

AVX2_INLINE __m256i lookup8(const uint32_t *table, __m256i idx) { return lookup8_k(table, idx, 0); }

/* Eight elements from p as 32-bit lanes, sign rotated to bit 0 for floats (k = 1, 2 or 4). */
AVX2_INLINE __m256i load8_elems(const uint8_t *p, const int k, int rotate) {
    __m256i u;
    if (k == 1)
        u = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    else if (k == 2)
        u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    else
        u = _mm256_loadu_si256((const __m256i *)p);
    if (rotate) {
        __m256i r = _mm256_or_si256(_mm256_slli_epi32(u, 1), _mm256_srli_epi32(u, 8 * k - 1));
        u = k == 4 ? r : _mm256_and_si256(r, _mm256_set1_epi32((int)((1u << (8 * k)) - 1)));
    }
    return u;
}

AVX2_INLINE __m256i field8(const uint8_t *p, const int k, int rotate, __m128i sh, __m256i mask) {
    return _mm256_and_si256(_mm256_srl_epi32(load8_elems(p, k, rotate), sh), mask);
}

/* enc_put on eight lanes. x / f without a divide: v = fl(x) * fl(1/f) - 1/4, one fused
 * multiply-subtract, is within 1/4 of x / f - 1/4 (fl(x) and fl(1/f) are each within 2^-24
 * relative, so 1/8 on q = x / f < 2^20; the FMA rounds once, by at most 1/16). So v lies in
 * [q - 1/2, q + 1 - 1/f) and truncates to q or q - 1, and the remainder x - q * f says which.
 * (Checked against x / f for every f and 32000 x per f, the extremes of each quotient included;
 * the tests compare whole streams with the portable loop.) */
AVX2_INLINE __m256i enc_step8(__m256i x, __m256i sym, const uint32_t *packed, uint8_t **wpp, const int wide) {
    const __m256i one = _mm256_set1_epi32(1), low16 = _mm256_set1_epi32(0xffff);
    __m256i e = lookup8(packed, sym);
    __m256i fr = _mm256_and_si256(e, _mm256_set1_epi32(0x1fff));
    __m256 rcp = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_cvtepi32_ps(fr));
    __m256i need = _mm256_cmpgt_epi32(_mm256_srli_epi32(x, 20), _mm256_sub_epi32(fr, one));
    unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(need));
    /* The renormalising lanes' low words, in lane order, at the top of 16 bytes stored below wp. */
    __m256i words = _mm256_permutevar8x32_epi32(_mm256_and_si256(x, low16),
                                                _mm256_loadu_si256((const __m256i *)renorm_compress[m]));
    uint8_t *wp = *wpp;
    _mm_storeu_si128((__m128i *)(wp - 16),
                     _mm_packus_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
    *wpp = wp - 2 * _mm_popcnt_u32(m);
    x = _mm256_srlv_epi32(x, _mm256_and_si256(need, _mm256_set1_epi32(16)));
    /* x < f << 20 is below 2^31 unless some frequency is above 2048: then convert in halves. */
    __m256 xf = wide ? _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 16)), _mm256_set1_ps(65536.0f),
                                       _mm256_cvtepi32_ps(_mm256_and_si256(x, low16)))
                     : _mm256_cvtepi32_ps(x);
    __m256i q = _mm256_cvttps_epi32(_mm256_fmsub_ps(xf, rcp, _mm256_set1_ps(0.25f)));
    __m256i r = _mm256_sub_epi32(x, _mm256_mullo_epi32(q, fr));
    __m256i over = _mm256_cmpgt_epi32(r, _mm256_sub_epi32(fr, one)); /* q was one short */
    q = _mm256_sub_epi32(q, over);
    r = _mm256_sub_epi32(r, _mm256_and_si256(over, fr));
    return _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(q, PROB_BITS), r), _mm256_srli_epi32(e, 13));
}

AVX2_INLINE Py_ssize_t rans_encode_avx2_k(const layout_t *lay, const uint8_t *restrict src, Py_ssize_t i0,
                                          Py_ssize_t n, int f, const int32_t *freqs, uint8_t *restrict dst,
                                          uint8_t *scratch_end, const int k, const int rot) {
    int rotate = lay->rotate, sh = lay->shifts[f], fsh;
    field_shift(lay, f, &fsh);
    uint32_t packed[ALPHABET], mask = (1u << lay->widths[f]) - 1;
    uint64_t rcp[ALPHABET];
    enc_table(freqs, lay->widths[f], packed, rcp);
    uint32_t st[LANES];
    for (int j = 0; j < LANES; j++) st[j] = RANS_L;
    uint8_t *wp = scratch_end;
    Py_ssize_t full = n & ~(Py_ssize_t)(LANES - 1);
    for (Py_ssize_t i = n - 1; i >= full; i--) { /* the last, partial group */
        int j = (int)(i & (LANES - 1));
        uint32_t s = (uint32_t)(elem_bits_k(src, i0 + i, k, rotate) >> sh) & mask;
        st[j] = enc_put(st[j], packed[s], rcp[s], &wp);
    }
    __m256i x0 = _mm256_loadu_si256((const __m256i *)(st + 0)), x1 = _mm256_loadu_si256((const __m256i *)(st + 8));
    __m256i x2 = _mm256_loadu_si256((const __m256i *)(st + 16)), x3 = _mm256_loadu_si256((const __m256i *)(st + 24));
    const __m128i shv = _mm_cvtsi32_si128(fsh);
    const __m256i maskv = _mm256_set1_epi32((int)mask);
    int wide = 0;
    for (int s = 0; s < (1 << lay->widths[f]); s++) wide |= freqs[s] > 2048;
#define ENC_GROUPS(WIDE)                                                                                 \
    for (Py_ssize_t g = full - LANES; g >= 0; g -= LANES) {                                              \
        const uint8_t *p = src + (i0 + g) * k;                                                           \
        /* Lanes from last to first, as the scalar loop: the words come out in lane order. */           \
        x3 = enc_step8(x3, field8(p + 24 * k, k, rot, shv, maskv), packed, &wp, WIDE);            \
        x2 = enc_step8(x2, field8(p + 16 * k, k, rot, shv, maskv), packed, &wp, WIDE);            \
        x1 = enc_step8(x1, field8(p + 8 * k, k, rot, shv, maskv), packed, &wp, WIDE);             \
        x0 = enc_step8(x0, field8(p, k, rot, shv, maskv), packed, &wp, WIDE);                     \
    }
    if (wide) {
        ENC_GROUPS(1)
    } else {
        ENC_GROUPS(0)
    }
#undef ENC_GROUPS
    _mm256_storeu_si256((__m256i *)(st + 0), x0);
    _mm256_storeu_si256((__m256i *)(st + 8), x1);
    _mm256_storeu_si256((__m256i *)(st + 16), x2);
    _mm256_storeu_si256((__m256i *)(st + 24), x3);
    for (int j = 0; j < LANES; j++) store_elem(dst + 4 * j, 4, st[j]);
    Py_ssize_t words = scratch_end - wp;
    memcpy(dst + 4 * LANES, wp, (size_t)words);
    return 4 * LANES + words;
}

static AVX2 Py_ssize_t rans_encode_avx2(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t n, int f,
                                        const int32_t *freqs, uint8_t *dst, uint8_t *scratch_end) {
    switch (lay->itemsize) {
    case 1:
        if (lay->rotate && !lay->shifts[f]) return rans_encode_avx2_k(lay, src, i0, n, f, freqs, dst, scratch_end, 1, 1);
        return rans_encode_avx2_k(lay, src, i0, n, f, freqs, dst, scratch_end, 1, 0);
    case 2:
        if (lay->rotate && !lay->shifts[f]) return rans_encode_avx2_k(lay, src, i0, n, f, freqs, dst, scratch_end, 2, 1);
        return rans_encode_avx2_k(lay, src, i0, n, f, freqs, dst, scratch_end, 2, 0);
    case 4:
        if (lay->rotate && !lay->shifts[f]) return rans_encode_avx2_k(lay, src, i0, n, f, freqs, dst, scratch_end, 4, 1);
        return rans_encode_avx2_k(lay, src, i0, n, f, freqs, dst, scratch_end, 4, 0);
    default: return rans_encode_k(lay, src, i0, n, f, freqs, dst, scratch_end, 8);
    }
}

/* pack_raw for 1-, 2- and 4-byte elements: w = 8 packs 32 values to bytes per step; w < 8 puts
 * each half's four values side by side in 4w bits and writes the two halves as w bytes (an
 * 8-byte store: the byte past the field is rewritten by whatever comes next, or is slack). */
AVX2_INLINE void pack_raw_avx2_k(const layout_t *lay, const uint8_t *restrict src, Py_ssize_t i0, Py_ssize_t n, int f,
                                 uint8_t *restrict dst, const int k) {
    int w = lay->widths[f], fsh;
    int rotate = field_shift(lay, f, &fsh);
    const __m128i shv = _mm_cvtsi32_si128(fsh);
    const __m256i maskv = _mm256_set1_epi32((int)((1u << w) - 1));
    Py_ssize_t i = 0;
    const uint8_t *p = src + i0 * k;
    if (w == 8) {
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (; i + 32 <= n; i += 32) {
            __m256i a = field8(p + i * k, k, rotate, shv, maskv), b = field8(p + (i + 8) * k, k, rotate, shv, maskv);
            __m256i c = field8(p + (i + 16) * k, k, rotate, shv, maskv);
            __m256i d = field8(p + (i + 24) * k, k, rotate, shv, maskv);
            __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
            _mm256_storeu_si256((__m256i *)(dst + i), _mm256_permutevar8x32_epi32(bytes, order));
        }
    } else if (w < 8) {
        const __m256i place = _mm256_setr_epi32(0, w, 2 * w, 3 * w, 0, w, 2 * w, 3 * w);
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_sllv_epi32(field8(p + i * k, k, rotate, shv, maskv), place);
            v = _mm256_or_si256(v, _mm256_bsrli_epi128(v, 8));
            v = _mm256_or_si256(v, _mm256_bsrli_epi128(v, 4));
            uint64_t lo = (uint32_t)_mm256_cvtsi256_si32(v);
            uint64_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(v, 1));
            uint64_t word = lo | hi << (4 * w);
            memcpy(dst + i / 8 * w, &word, 8);
        }
    }
    pack_raw_k(lay, src, i0 + i, n - i, f, dst + i / 8 * w, k);
}

static AVX2 void pack_raw_avx2(const layout_t *lay, const uint8_t *src, Py_ssize_t i0, Py_ssize_t n, int f,
                               uint8_t *dst) {
    switch (lay->itemsize) {
    case 1: pack_raw_avx2_k(lay, src, i0, n, f, dst, 1); break;
    case 2: pack_raw_avx2_k(lay, src, i0, n, f, dst, 2); break;
    case 4: pack_raw_avx2_k(lay, src, i0, n, f, dst, 4); break;
    default: pack_raw_k(lay, src, i0, n, f, dst, 8); break;
    }
}
#endif

#define MAX_TABLE_BYTES (2 + 256 * 2 + 256 * 2) /* symbol count, symbols, frequencies */

/* Upper bound of one part: mode byte, table, length, states, at most one word per element. */
static Py_ssize_t part_bound(Py_ssize_t nb) { return 1 + MAX_TABLE_BYTES + 4 + 4 * LANES + 2 * nb; }

/* The whole piece: per block, histogram, tables, raw/coded choice (as entropy._plan), payloads.
 * Returns the bytes written to out, or -1 when out of memory. */
ALWAYS_INLINE Py_ssize_t encode_piece_impl(const layout_t *lay, const uint8_t *src, Py_ssize_t n, const int64_t *cost,
                                           uint8_t *out, const int simd) {
    int nf = lay->nfields;
    Py_ssize_t be = lay->block_elems;
    uint32_t *sub = (uint32_t *)malloc(4 * (size_t)nf * ALPHABET * sizeof(uint32_t));
    uint32_t *counts = (uint32_t *)malloc((size_t)nf * ALPHABET * sizeof(uint32_t));
    int32_t *freqs = (int32_t *)malloc((size_t)nf * ALPHABET * sizeof(int32_t));
    uint8_t *scratch = (uint8_t *)malloc((size_t)(2 * be + 16));
    int whole16 = lay->itemsize == 2 && n >= HIST16_MIN;
    uint32_t *big = whole16 ? (uint32_t *)malloc(65536 * sizeof(uint32_t)) : NULL;
    Py_ssize_t pos = -1;
    if (!sub || !counts || !freqs || !scratch || (whole16 && !big)) goto done;
    pos = 0;
    for (Py_ssize_t i0 = 0; i0 < n; i0 += be) {
        Py_ssize_t nb = n - i0 < be ? n - i0 : be;
        hist_block(lay, src, i0, nb, sub, big, counts);
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
                    uint8_t *scratch_end = scratch + 2 * be + 16;
                    Py_ssize_t len;
#ifdef HAVE_AVX2_PATH
                    if (simd)
                        len = rans_encode_avx2(lay, src, i0, nb, f, fr, lenp + 4, scratch_end);
                    else
#endif
                        len = rans_encode(lay, src, i0, nb, f, fr, lenp + 4, scratch_end);
                    store_elem(lenp, 4, (uint64_t)len);
                    pos += 1 + tlen + 4 + len;
                }
            }
            if (!coded) {
                p[0] = 0;
#ifdef HAVE_AVX2_PATH
                if (simd)
                    pack_raw_avx2(lay, src, i0, nb, f, p + 1);
                else
#endif
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
    free(big);
    return pos;
}

static Py_ssize_t encode_piece_portable(const layout_t *lay, const uint8_t *src, Py_ssize_t n, const int64_t *cost,
                                        uint8_t *out) {
    return encode_piece_impl(lay, src, n, cost, out, 0);
}

#ifdef HAVE_AVX2_PATH
static AVX2 Py_ssize_t encode_piece_avx2(const layout_t *lay, const uint8_t *src, Py_ssize_t n, const int64_t *cost,
                                         uint8_t *out) {
    return encode_piece_impl(lay, src, n, cost, out, 1);
}
#endif

static PyObject *py_encode_piece(PyObject *self, PyObject *args) {
    Py_buffer data, widths, cost;
    int itemsize, rotate, simd = 1;
    Py_ssize_t block_elems;
    if (!PyArg_ParseTuple(args, "y*iiy*ny*|p", &data, &itemsize, &rotate, &widths, &block_elems, &cost, &simd))
        return NULL;
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
     * previous piece, where a fresh bound-sized object would fault in (and zero) new ones. The 16
     * bytes of slack take the SIMD raw packer's overhanging store. */
    Py_ssize_t bound = nblocks * lay.nfields * part_bound(0) + (Py_ssize_t)lay.nfields * 2 * n + 16;
    uint8_t *buf = (uint8_t *)malloc((size_t)bound);
    if (!buf) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t len;
    const uint8_t *src = (const uint8_t *)data.buf;
    const int64_t *costs = (const int64_t *)cost.buf;
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_PATH
    if (simd && have_avx2)
        len = encode_piece_avx2(&lay, src, n, costs, buf);
    else
#endif
        len = encode_piece_portable(&lay, src, n, costs, buf);
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

/* A slot's decode entry, one 32-bit load per symbol:
 *   bits 0-11 bias (slot - start), 12-23 frequency, 24-31 the symbol's low 8 bits.
 * A 9-bit field's top bit is not in the entry: symbols are in ascending order over the slots, so
 * it is set exactly from slot `hi_slot` on (the start of the first symbol >= 256; 4096 if none).
 * Frequency 4096 does not fit 12 bits, and needs none: a single-symbol table never changes the
 * state nor reads a word, so such a field (`constant`) is that symbol throughout. */
#define ENTRY_BIAS(e) ((e) & 0xfff)
#define ENTRY_FREQ(e) (((e) >> 12) & 0xfff)

typedef struct {
    int coded;
    /* coded */
    int constant;     /* single-symbol table: `symbols[0]` everywhere */
    uint32_t hi_slot; /* first slot whose symbol has bit 8 set */
    uint32_t table[PROB_SCALE];
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
    fd->hi_slot = PROB_SCALE;
    for (uint32_t r = 0; r < nsym; r++) {
        if (read_varint(&p, end, &fr) < 0) return "truncated frequencies";
        fr += 1;
        if (fr > PROB_SCALE - total) return "frequencies exceed 4096";
        if (fd->symbols[r] >= 256 && fd->hi_slot == PROB_SCALE) fd->hi_slot = total;
        uint32_t high = (uint32_t)(fd->symbols[r] & 0xff) << 24 | (fr & 0xfff) << 12;
        for (uint32_t k = 0; k < fr; k++) fd->table[total + k] = high | k;
        total += fr;
    }
    if (total != PROB_SCALE) return "frequencies do not sum to 4096";
    fd->constant = nsym == 1;
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
ALWAYS_INLINE int rans_decode_scalar_k(field_dec_t *fd, uint16_t *restrict dst, Py_ssize_t i, Py_ssize_t cnt,
                                       const int wide) {
    if (fd->constant) {
        for (; i < cnt; i++) dst[i] = fd->symbols[0];
        return 0;
    }
    const uint32_t *restrict tab = fd->table;
    const uint32_t hi_slot = fd->hi_slot;
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
            dst[i + j] = (uint16_t)(e >> 24 | (uint32_t)(wide && slot >= hi_slot) << 8);
            x = ENTRY_FREQ(e) * (x >> PROB_BITS) + ENTRY_BIAS(e);
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
        dst[i] = (uint16_t)(e >> 24 | (uint32_t)(wide && slot >= hi_slot) << 8);
        x = ENTRY_FREQ(e) * (x >> PROB_BITS) + ENTRY_BIAS(e);
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

/* Fields of up to 8 bits skip the slot compare that gives a 9-bit symbol its top bit. */
static int rans_decode_scalar(field_dec_t *fd, int w, uint16_t *restrict dst, Py_ssize_t i, Py_ssize_t cnt) {
    return w > 8 ? rans_decode_scalar_k(fd, dst, i, cnt, 1) : rans_decode_scalar_k(fd, dst, i, cnt, 0);
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

/* Merge the fields of elements [i, cnt) of a chunk into place (sign rotated back), straight
 * into `out` (the chunk's first element). */
ALWAYS_INLINE void merge_fields(const layout_t *lay, const uint16_t *tmp, uint8_t *dst, Py_ssize_t i, Py_ssize_t cnt) {
    int k = lay->itemsize, nf = lay->nfields, bits = 8 * k;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (k == 2 && nf == 2 && lay->rotate) {
        const uint16_t *a = tmp, *b = tmp + CHUNK;
        const int s0 = lay->shifts[0];
        for (; i < cnt; i++) {
            uint16_t u = (uint16_t)((a[i] << s0) | b[i]);
            u = (uint16_t)((u >> 1) | (u << 15));
            memcpy(dst + 2 * i, &u, 2);
        }
        return;
    }
    if (k == 4 && nf == 4 && lay->rotate) {
        const uint16_t *a = tmp, *b = tmp + CHUNK, *c = tmp + 2 * CHUNK, *d = tmp + 3 * CHUNK;
        const int s0 = lay->shifts[0], s1 = lay->shifts[1], s2 = lay->shifts[2];
        for (; i < cnt; i++) {
            uint32_t u = ((uint32_t)a[i] << s0) | ((uint32_t)b[i] << s1) | ((uint32_t)c[i] << s2) | d[i];
            u = (u >> 1) | (u << 31);
            memcpy(dst + 4 * i, &u, 4);
        }
        return;
    }
#endif
    for (; i < cnt; i++) {
        uint64_t u = 0;
        for (int f = 0; f < nf; f++) u |= (uint64_t)tmp[f * CHUNK + i] << lay->shifts[f];
        if (lay->rotate) u = rotr1(u, bits);
        store_elem(dst + i * k, k, u);
    }
}

/* ---- AVX2: 8 lanes per vector, the 32 lanes in four vectors. */

#ifdef HAVE_AVX2_PATH
/* How far ahead the SIMD decode loops prefetch the raw fields and the rANS words: a block's
 * fields are separate streams in the input, more than the hardware prefetcher keeps ahead of
 * (measured: 5-7% faster decodes). */
#define PREFETCH_AHEAD 1024

/* Element vectors from the other fields' values (16-bit, at tmp + f * CHUNK + i) and this
 * field's symbols, sign rotated back: eight 32-bit lanes. */
AVX2_INLINE __m256i merge8(const layout_t *lay, const uint16_t *tmp, Py_ssize_t i, int fc, __m256i sym,
                           const int k, const int nf, const int rotate) {
    __m256i u = _mm256_sll_epi32(sym, _mm_cvtsi32_si128(lay->shifts[fc]));
    for (int f = 0; f < nf; f++) {
        if (f == fc) continue;
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(tmp + f * CHUNK + i)));
        u = _mm256_or_si256(u, _mm256_sll_epi32(v, _mm_cvtsi32_si128(lay->shifts[f])));
    }
    if (rotate) u = _mm256_or_si256(_mm256_srli_epi32(u, 1), _mm256_slli_epi32(u, 8 * k - 1));
    return k == 2 ? _mm256_and_si256(u, _mm256_set1_epi32(0xffff)) : u;
}

/* Sixteen 32-bit lanes (a's eight, then b's; every value below 2^16) as 16-bit lanes, in order. */
AVX2_INLINE __m256i pack16(__m256i a, __m256i b) {
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xd8);
}

/* Where a SIMD loop is in a coded field: its table, its 32 lane states as four vectors of eight,
 * and its next word. */
typedef struct {
    const uint32_t *tab;
    __m256i hi_slot; /* the first slot of a symbol >= 256, less one (9-bit fields) */
    __m256i x[4];
    const uint8_t *p, *end;
} rans_cursor_t;

AVX2_INLINE rans_cursor_t open_cursor(const field_dec_t *fd) {
    rans_cursor_t c;
    c.tab = fd->table;
    c.hi_slot = _mm256_set1_epi32((int)fd->hi_slot - 1);
    for (int j = 0; j < 4; j++) c.x[j] = _mm256_loadu_si256((const __m256i *)(fd->st + 8 * j));
    c.p = fd->wp;
    c.end = fd->wend;
    return c;
}

/* Whether a whole group may be decoded: 32 symbols read at most 32 words, and each step's
 * 16-byte load stays inside the payload. */
AVX2_INLINE int has_group(const rans_cursor_t *c) { return c->end - c->p >= 2 * LANES; }

/* The states and the word position back into the field, where the scalar tail goes on. */
AVX2_INLINE void close_cursor(field_dec_t *fd, const rans_cursor_t *c) {
    for (int j = 0; j < 4; j++) _mm256_storeu_si256((__m256i *)(fd->st + 8 * j), c->x[j]);
    fd->wp = c->p;
}

/* Constants for unpack16: which bytes each of eight values needs, and the multiplier that moves
 * its bits to the top of its 16-bit lane. */
static AVX2 void unpack_consts(int w, __m256i *shuffle, __m256i *mult) {
    uint8_t shuf[16];
    uint16_t mul[8];
    for (int j = 0; j < 8; j++) {
        int bit = w * j;
        shuf[2 * j] = (uint8_t)(bit >> 3);
        shuf[2 * j + 1] = (uint8_t)((bit >> 3) + 1);
        mul[j] = (uint16_t)(1u << (16 - w - (bit & 7)));
    }
    *shuffle = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)shuf));
    *mult = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)mul));
}

/* Sixteen w-bit values (w < 8) packed from base, as 16-bit lanes: reads base[0, w + 16). */
AVX2_INLINE __m256i unpack16(const uint8_t *base, int w, __m256i shuffle, __m256i mult) {
    __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)base)),
                                        _mm_loadu_si128((const __m128i *)(base + w)), 1);
    v = _mm256_mullo_epi16(_mm256_shuffle_epi8(v, shuffle), mult);
    return _mm256_srl_epi16(v, _mm_cvtsi32_si128(16 - w));
}

/* Raw w-bit values, 16 per step: each 128-bit half takes 8 values (w bytes) from a 16-byte load;
 * a byte shuffle puts each value's two bytes in its 16-bit lane, a multiply by 2^(16-w-s) moves
 * its bits to the top (s = its bit offset, s + w <= 16), and one shift brings them down. */
static AVX2 void raw_unpack_avx2(const field_dec_t *fd, int w, Py_ssize_t i0, uint16_t *dst, Py_ssize_t cnt) {
    Py_ssize_t i = 0;
    const uint8_t *r = fd->raw;
    if (w == 8) {
        for (; i + 16 <= cnt && i0 + i + 16 <= fd->raw_len; i += 16) {
            _mm_prefetch((const char *)(r + i0 + i + PREFETCH_AHEAD), _MM_HINT_T0);
            _mm256_storeu_si256((__m256i *)(dst + i),
                                _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(r + i0 + i))));
        }
    } else if ((i0 * w) % 8 == 0) {
        __m256i shuffle, mult;
        unpack_consts(w, &shuffle, &mult);
        for (; i + 16 <= cnt && (i0 + i) / 8 * w + w + 16 <= fd->raw_len; i += 16) {
            const uint8_t *base = r + (i0 + i) / 8 * w;
            _mm_prefetch((const char *)(base + PREFETCH_AHEAD), _MM_HINT_T0);
            _mm256_storeu_si256((__m256i *)(dst + i), unpack16(base, w, shuffle, mult));
        }
    }
    raw_unpack_scalar(fd, w, i0, dst, i, cnt);
}

/* The layouts rans_decode_fused_raw16_k serves: two-byte elements, field 0 coded (and not
 * constant), field 1 raw and at most a byte wide, the chunk's first raw value on a byte. */
static int fuses_raw16(const layout_t *lay, const field_dec_t *fds, int fused, Py_ssize_t c0) {
    return lay->itemsize == 2 && lay->nfields == 2 && fused == 0 && !fds[1].coded && lay->widths[1] <= 8 &&
           (c0 * lay->widths[1]) % 8 == 0;
}

#define RANS_CAT_(a, b) a##_##b
#define RANS_CAT(a, b) RANS_CAT_(a, b)
#define RANS_FN(name) RANS_CAT(name, RANS_ISA)

#define RANS_ISA avx2
#define RANS_TARGET AVX2
#define RANS_INLINE AVX2_INLINE
#define RANS_AVX512 0
#include "_entropy_rans.h"
#undef RANS_ISA
#undef RANS_TARGET
#undef RANS_INLINE
#undef RANS_AVX512

#define RANS_ISA avx512
#define RANS_TARGET AVX512
#define RANS_INLINE AVX512_INLINE
#define RANS_AVX512 1
#include "_entropy_rans.h"
#undef RANS_ISA
#undef RANS_TARGET
#undef RANS_INLINE
#undef RANS_AVX512

/* The SIMD rANS function of a decode level: 2 AVX-512, otherwise AVX2 (a constant at each use). */
#define RANS_CALL(simd, name) ((simd) == 2 ? name##_avx512 : name##_avx2)
#endif

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
        /* The last coded field that is not constant decodes straight into the elements (SIMD). */
        int fused = -1;
        if (simd)
            for (int f = 0; f < nf; f++)
                if (fds[f].coded && !fds[f].constant) fused = f;
        for (Py_ssize_t c0 = 0; c0 < nb; c0 += CHUNK) {
            Py_ssize_t cnt = nb - c0 < CHUNK ? nb - c0 : CHUNK;
            uint8_t *dst = out + (i0 + c0) * k;
            /* Field 1 raw beside a fused field 0 of two-byte elements: unpacked in the fused loop. */
            int raw16 = 0;
#ifdef HAVE_AVX2_PATH
            raw16 = fused >= 0 && fuses_raw16(lay, fds, fused, c0);
#endif
            for (int f = 0; f < nf; f++) {
                if (f == fused || (raw16 && f == 1)) continue;
                uint16_t *t = tmp + f * CHUNK;
                if (fds[f].coded) {
                    int rc;
#ifdef HAVE_AVX2_PATH
                    if (simd)
                        rc = RANS_CALL(simd, rans_decode)(&fds[f], lay->widths[f], t, cnt);
                    else
#endif
                        rc = rans_decode_scalar(&fds[f], lay->widths[f], t, 0, cnt);
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
            Py_ssize_t done_elems = 0;
#ifdef HAVE_AVX2_PATH
            if (raw16) {
                done_elems = RANS_CALL(simd, decode_fused_raw16)(lay, fds, c0, dst, cnt);
                raw_unpack_avx2(&fds[1], lay->widths[1], c0 + done_elems, tmp + CHUNK + done_elems, cnt - done_elems);
            } else if (fused >= 0)
                done_elems = RANS_CALL(simd, decode_fused)(lay, &fds[fused], fused, tmp, dst, cnt);
            if (fused >= 0) {
                /* The rest of the chunk (a partial group, the last words, or no fused loop for
                 * this layout) goes through the 16-bit values and the merge; done_elems is a
                 * whole number of groups, so symbol i still goes to lane i % 32. */
                int rc = RANS_CALL(simd, rans_decode)(&fds[fused], lay->widths[fused],
                                                      tmp + fused * CHUNK + done_elems, cnt - done_elems);
                if (rc < 0) {
                    err = "rANS stream ends early";
                    goto done;
                }
            }
#endif
            merge_fields(lay, tmp, dst, done_elems, cnt);
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

/* And with the AVX-512 rANS steps. The merge and the scalar tails are the same source, compiled
 * with AVX-512 F and VL allowed too (still 256-bit vectors: no zmm in the build). */
static AVX512 const char *decode_piece_avx512(const layout_t *lay, const uint8_t *stream, Py_ssize_t len,
                                              uint8_t *out, Py_ssize_t n) {
    return decode_piece_impl(lay, stream, len, out, n, 2);
}
#endif

static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer stream, widths, out;
    int itemsize, rotate, simd = 2;
    Py_ssize_t block_elems;
    if (!PyArg_ParseTuple(args, "y*iiy*nw*|i", &stream, &itemsize, &rotate, &widths, &block_elems, &out, &simd))
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
    if (simd >= 2 && have_avx512)
        err = decode_piece_avx512(&lay, src, stream.len, dst, n);
    else if (simd >= 1 && have_avx2)
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

static PyObject *py_simd(PyObject *self, PyObject *args) {
    return PyUnicode_FromString(have_avx512 ? "avx512" : have_avx2 ? "avx2" : "none");
}

static PyMethodDef methods[] = {
    {"encode_piece", py_encode_piece, METH_VARARGS,
     "Encode a whole piece: tables, raw/coded choice, payloads (last arg: allow SIMD)."},
    {"decode", py_decode, METH_VARARGS,
     "Decode a whole piece into a writable buffer (last arg: the most SIMD to use, 0 or less none, 1 AVX2, "
     "2 or more the best the CPU has)."},
    {"simd", py_simd, METH_NOARGS, "The best SIMD path this CPU has: 'avx512', 'avx2' or 'none'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_entropy", "float-entropy.v1 hot loops", -1, methods};

PyMODINIT_FUNC PyInit__entropy(void) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    have_avx512 = have_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    init_renorm_tables();
#endif
    return PyModule_Create(&module);
}
