/*
 * The SIMD rANS decode loops of _entropy.c, compiled once per instruction set: _entropy.c
 * includes this file twice, after defining
 *   RANS_FN(name)  the name with the set's suffix (rans_decode_avx2, rans_decode_avx512, ...)
 *   RANS_TARGET    the target attribute of the functions called from outside
 *   RANS_INLINE    the same, for the always-inlined steps and loops
 *   RANS_AVX512    1 where the renormalisation uses AVX-512 (F and VL) masks, else 0.
 * The two builds compute the same states and read the same words; only the instructions differ.
 * A target attribute does not let an AVX-512 step be inlined into an AVX2 loop, so every loop
 * that inlines the step is compiled twice, rather than written twice.
 * No include guard: included once per set on purpose.
 */

/* One rANS decode step on eight lanes: returns the new states, the symbols in *sym. */
RANS_INLINE __m256i RANS_FN(rans_step8)(__m256i x, const uint32_t *tab, __m256i hi_slot, const uint8_t **pp,
                                        __m256i *sym, const int wide) {
    const __m256i low12 = _mm256_set1_epi32(0xfff);
    __m256i slot = _mm256_and_si256(x, low12);
    __m256i e = lookup8_k(tab, slot, 1);
    __m256i s = _mm256_srli_epi32(e, 24);
    if (wide) /* 9-bit field: bit 8 from the slot */
        s = _mm256_or_si256(s, _mm256_and_si256(_mm256_cmpgt_epi32(slot, hi_slot), _mm256_set1_epi32(256)));
    *sym = s;
    x = _mm256_add_epi32(
        _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(e, 12), low12), _mm256_srli_epi32(x, PROB_BITS)),
        _mm256_and_si256(e, low12));
#if RANS_AVX512
    /* The lanes below 2^16 as a mask; vpexpandd moves the next words into them, in lane order:
     * a few micro-ops fewer than the table-driven permute and the blend (9% less decode time). */
    __mmask8 need = _mm256_cmplt_epu32_mask(x, _mm256_set1_epi32((int)RANS_L));
    const uint8_t *p = *pp;
    __m256i words = _mm256_maskz_expand_epi32(need, _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)));
    x = _mm256_mask_or_epi32(x, need, _mm256_slli_epi32(x, 16), words);
    *pp = p + 2 * _mm_popcnt_u32((unsigned)need);
#else
    const __m256i low16 = _mm256_set1_epi32(0xffff);
    __m256i need = _mm256_cmpeq_epi32(_mm256_min_epu32(x, low16), x); /* x <= 0xffff */
    int m = _mm256_movemask_ps(_mm256_castsi256_ps(need));
    const uint8_t *p = *pp;
    __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    words = _mm256_permutevar8x32_epi32(words, _mm256_loadu_si256((const __m256i *)renorm_perm[m]));
    x = _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), words), need);
    *pp = p + 2 * _mm_popcnt_u32((unsigned)m);
#endif
    return x;
}

/* One group: the next 32 symbols, symbol i from lane i % 32, eight to each of s[0..3]. */
RANS_INLINE void RANS_FN(rans_group)(rans_cursor_t *c, __m256i s[4], const int wide) {
    for (int j = 0; j < 4; j++) c->x[j] = RANS_FN(rans_step8)(c->x[j], c->tab, c->hi_slot, &c->p, &s[j], wide);
}

/* Whole groups of a coded field's symbols as 16-bit values at dst, while the payload has a
 * group's worth of words (the fields other than the fused one, and the fused one's rest);
 * returns the symbols done, a multiple of LANES. */
RANS_INLINE Py_ssize_t RANS_FN(rans_decode_k)(field_dec_t *fd, uint16_t *restrict dst, Py_ssize_t cnt, const int wide) {
    rans_cursor_t c = open_cursor(fd);
    Py_ssize_t i = 0;
    while (cnt - i >= LANES && has_group(&c)) {
        __m256i s[4];
        RANS_FN(rans_group)(&c, s, wide);
        _mm_prefetch((const char *)(c.p + PREFETCH_AHEAD), _MM_HINT_T0);
        _mm256_storeu_si256((__m256i *)(dst + i), pack16(s[0], s[1]));
        _mm256_storeu_si256((__m256i *)(dst + i + 16), pack16(s[2], s[3]));
        i += LANES;
    }
    close_cursor(fd, &c);
    return i;
}

static RANS_TARGET int RANS_FN(rans_decode)(field_dec_t *fd, int w, uint16_t *restrict dst, Py_ssize_t cnt) {
    Py_ssize_t i = 0;
    if (!fd->constant) i = w > 8 ? RANS_FN(rans_decode_k)(fd, dst, cnt, 1) : RANS_FN(rans_decode_k)(fd, dst, cnt, 0);
    return rans_decode_scalar(fd, w, dst, i, cnt);
}

/* The fused last step of a chunk: coded field fc decodes straight into finished elements at dst,
 * the other fields' values already in tmp. Returns the elements done, a multiple of LANES. */
RANS_INLINE Py_ssize_t RANS_FN(rans_decode_fused_k)(const layout_t *lay, field_dec_t *fd, int fc, const uint16_t *tmp,
                                                    uint8_t *dst, Py_ssize_t cnt, const int k, const int nf,
                                                    const int rotate, const int wide) {
    rans_cursor_t c = open_cursor(fd);
    Py_ssize_t i = 0;
    while (cnt - i >= LANES && has_group(&c)) {
        __m256i s[4];
        RANS_FN(rans_group)(&c, s, wide);
        __m256i e0 = merge8(lay, tmp, i, fc, s[0], k, nf, rotate);
        __m256i e1 = merge8(lay, tmp, i + 8, fc, s[1], k, nf, rotate);
        __m256i e2 = merge8(lay, tmp, i + 16, fc, s[2], k, nf, rotate);
        _mm_prefetch((const char *)(c.p + PREFETCH_AHEAD), _MM_HINT_T0);
        __m256i e3 = merge8(lay, tmp, i + 24, fc, s[3], k, nf, rotate);
        uint8_t *o = dst + i * k;
        if (k == 2) {
            _mm256_storeu_si256((__m256i *)o, pack16(e0, e1));
            _mm256_storeu_si256((__m256i *)(o + 32), pack16(e2, e3));
        } else {
            _mm256_storeu_si256((__m256i *)o, e0);
            _mm256_storeu_si256((__m256i *)(o + 32), e1);
            _mm256_storeu_si256((__m256i *)(o + 64), e2);
            _mm256_storeu_si256((__m256i *)(o + 96), e3);
        }
        i += LANES;
    }
    close_cursor(fd, &c);
    return i;
}

/* The fused step for two-byte elements whose low field is raw (BF16's [9, 7], F16's [8, 8] when
 * the low byte does not compress): the raw values are unpacked inside the rANS loop and merged in
 * 16-bit lanes, instead of going through the temporaries (about 10% faster for BF16). Elements
 * [0, cnt) of the chunk that starts at element c0 of the block; returns the elements done, a
 * multiple of LANES. */
RANS_INLINE Py_ssize_t RANS_FN(rans_decode_fused_raw16_k)(field_dec_t *fd, const field_dec_t *raw, int w1,
                                                          Py_ssize_t c0, uint8_t *dst, Py_ssize_t cnt,
                                                          const int byte_wide, const int rotate, const int wide) {
    rans_cursor_t c = open_cursor(fd);
    const uint8_t *r = raw->raw;
    __m256i shuffle = _mm256_setzero_si256(), mult = _mm256_setzero_si256();
    if (!byte_wide) unpack_consts(w1, &shuffle, &mult);
    Py_ssize_t i = 0;
    /* Each group's raw loads (byte_wide: 32 bytes; else two 16-byte loads w1 bytes apart, twice)
     * stay inside the raw field. */
    while (cnt - i >= LANES && has_group(&c) &&
           (byte_wide ? c0 + i + LANES : (c0 + i) / 8 * w1 + 3 * w1 + 16) <= raw->raw_len) {
        __m256i s[4], m0, m1;
        RANS_FN(rans_group)(&c, s, wide);
        _mm_prefetch((const char *)(c.p + PREFETCH_AHEAD), _MM_HINT_T0);
        const uint8_t *base = r + (c0 + i) / 8 * w1;
        _mm_prefetch((const char *)(base + PREFETCH_AHEAD), _MM_HINT_T0);
        if (byte_wide) {
            m0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)base));
            m1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(base + 16)));
        } else {
            m0 = unpack16(base, w1, shuffle, mult);
            m1 = unpack16(base + 2 * w1, w1, shuffle, mult);
        }
        __m256i u0 = _mm256_or_si256(_mm256_sll_epi16(pack16(s[0], s[1]), _mm_cvtsi32_si128(w1)), m0);
        __m256i u1 = _mm256_or_si256(_mm256_sll_epi16(pack16(s[2], s[3]), _mm_cvtsi32_si128(w1)), m1);
        if (rotate) {
            u0 = _mm256_or_si256(_mm256_srli_epi16(u0, 1), _mm256_slli_epi16(u0, 15));
            u1 = _mm256_or_si256(_mm256_srli_epi16(u1, 1), _mm256_slli_epi16(u1, 15));
        }
        _mm256_storeu_si256((__m256i *)(dst + 2 * i), u0);
        _mm256_storeu_si256((__m256i *)(dst + 2 * i + 32), u1);
        i += LANES;
    }
    close_cursor(fd, &c);
    return i;
}

static RANS_TARGET Py_ssize_t RANS_FN(decode_fused_raw16)(const layout_t *lay, field_dec_t *fds, Py_ssize_t c0,
                                                          uint8_t *dst, Py_ssize_t cnt) {
    int w1 = lay->widths[1], wide = lay->widths[0] > 8, rot = lay->rotate != 0;
#define FUSED(BW, ROT, WIDE) \
    return RANS_FN(rans_decode_fused_raw16_k)(&fds[0], &fds[1], w1, c0, dst, cnt, BW, ROT, WIDE)
    if (w1 == 8) {
        if (rot) FUSED(1, 1, 0);
        FUSED(1, 0, 0);
    }
    if (rot && wide) FUSED(0, 1, 1);
    if (rot) FUSED(0, 1, 0);
    if (wide) FUSED(0, 0, 1);
    FUSED(0, 0, 0);
#undef FUSED
}

/* The fused step for the layouts that have one (k = 2 or 4, every field up to 4): returns the
 * elements done, or 0 where there is no fused loop for the layout. */
static RANS_TARGET Py_ssize_t RANS_FN(decode_fused)(const layout_t *lay, field_dec_t *fd, int fc, const uint16_t *tmp,
                                                    uint8_t *dst, Py_ssize_t cnt) {
    int wide = lay->widths[fc] > 8, rot = lay->rotate != 0;
#define FUSED(K, NF, ROT, WIDE) return RANS_FN(rans_decode_fused_k)(lay, fd, fc, tmp, dst, cnt, K, NF, ROT, WIDE)
#define FUSED_RW(K, NF)                              \
    do {                                             \
        if (rot && wide) FUSED(K, NF, 1, 1);         \
        if (rot) FUSED(K, NF, 1, 0);                 \
        if (wide) FUSED(K, NF, 0, 1);                \
        FUSED(K, NF, 0, 0);                          \
    } while (0)
    if (lay->itemsize == 2 && lay->nfields == 2) FUSED_RW(2, 2);
    if (lay->itemsize == 4 && lay->nfields == 4) FUSED_RW(4, 4);
#undef FUSED_RW
#undef FUSED
    return 0;
}
