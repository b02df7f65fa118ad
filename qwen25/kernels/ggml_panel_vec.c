/* The panel kernels' vector vocabulary (included by ggml_panel.c): pvi / pvf, the integer and fp32 vectors of the
 * build (512-bit with AVX-512 VNNI, 256-bit on AVX2), one name per operation on them (PV_* / PF_*), and the gathers,
 * transposes and activation broadcasts that the packing (ggml_panel.c, ggml_panel_k.c) and the tiles share. */

#if PANEL == 16
typedef __m512i pvi;
typedef __m512 pvf;
#define PV_LOADU(p) _mm512_loadu_si512((const void *)(p))
#define PV_STOREU(p, v) _mm512_storeu_si512((void *)(p), v)
#define PV_SET1(x) _mm512_set1_epi32(x)
#define PV_SET1B(x) _mm512_set1_epi8(x)
#define PV_AND _mm512_and_si512
#define PV_OR _mm512_or_si512
#define PV_XOR _mm512_xor_si512
#define PV_SRLI16 _mm512_srli_epi16
#define PF_ZERO _mm512_setzero_ps
#define PF_LOADU _mm512_loadu_ps
#define PF_STOREU _mm512_storeu_ps
#define PF_SET1 _mm512_set1_ps
#define PF_MUL _mm512_mul_ps
#define PF_FMA _mm512_fmadd_ps
#define PF_CVT _mm512_cvtepi32_ps
#define PV_UNPACKLO32 _mm512_unpacklo_epi32
#define PV_UNPACKHI32 _mm512_unpackhi_epi32
#define PV_UNPACKLO64 _mm512_unpacklo_epi64
#define PV_UNPACKHI64 _mm512_unpackhi_epi64
#define PV_SHUFFLE8 _mm512_shuffle_epi8
#define PV_ADD32 _mm512_add_epi32
#define PV_MULLO32 _mm512_mullo_epi32
#define PV_SLLV32 _mm512_sllv_epi32
#define PV_SLLI16 _mm512_slli_epi16
#define PV_SRLI32 _mm512_srli_epi32
#define PV_SLLI32 _mm512_slli_epi32
#define PV_SRAI32 _mm512_srai_epi32
#define PV_ZERO _mm512_setzero_si512
#define PF_FNMA _mm512_fnmadd_ps
/* K types: 8 x (block, sub-block, fp32) accumulators. 6 before: 8 rows ran as 6 + 1 + 1; with 8, the 1.5B's 8
 * streams 99 -> 103 tok/s and prefill 378 -> 391 (AMD EPYC: avx2 avx512f avx512_vnni avx512_bf16, 2 threads) */
#define PANEL_KMX 8
/* acc + four adjacent u8 x s8 products per lane; acc + two adjacent s16 x s16 products per lane */
#define PV_DOT_U8(acc, u, s) _mm512_dpbusd_epi32(acc, u, s)
#define PV_DOT_S16(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)

/* 16 bytes at p[j] + at for rows j = r, r + 4, r + 8, r + 12 as the four 128-bit lanes */
static inline pvi gather4x16(const uint8_t *const *p, int r, size_t at) {
    pvi z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p[r] + at)));
    z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(p[r + 4] + at)), 1);
    z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(p[r + 8] + at)), 2);
    return _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(p[r + 12] + at)), 3);
}

/* lane j = the 32-bit word at p[j] + at (a panel's rows lie within 2 GB of its first) */
static inline pvi gather_words(const uint8_t *const *p, size_t at) {
    const __m512i base = _mm512_set1_epi64((long long)p[0]);
    const __m256i lo = _mm512_cvtepi64_epi32(_mm512_sub_epi64(_mm512_loadu_si512((const void *)p), base));
    const __m256i hi = _mm512_cvtepi64_epi32(_mm512_sub_epi64(_mm512_loadu_si512((const void *)(p + 8)), base));
    return _mm512_i32gather_epi32(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), (const void *)(p[0] + at), 1);
}

/* fp32 lanes from the fp16 in the low (high = 0) or high half of each 32-bit lane of words */
static inline pvf f16_lanes(pvi words, int high) {
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(high ? _mm512_srli_epi32(words, 16) : words));
}

/* fp32 lanes from the fp16 scale at p[j] + at + 2 that ends a tensor's block (read as the high half of the word at
 * p[j] + at, inside the block) */
static inline pvf gather_f16_end(const uint8_t *const *p, size_t at) { return f16_lanes(gather_words(p, at), 1); }

/* byte t of each lane = 0x10 where bit (4c + t) of the lane's word is set */
static inline pvi fifth_bits_c(pvi qh, int c) {
    const pvi rep = _mm512_set1_epi32(0x01010101 * (c / 2)) ;
    const pvi lane_base = _mm512_set_epi32(12 * 0x01010101, 8 * 0x01010101, 4 * 0x01010101, 0, 12 * 0x01010101,
                                           8 * 0x01010101, 4 * 0x01010101, 0, 12 * 0x01010101, 8 * 0x01010101,
                                           4 * 0x01010101, 0, 12 * 0x01010101, 8 * 0x01010101, 4 * 0x01010101, 0);
    const pvi y = _mm512_shuffle_epi8(qh, _mm512_add_epi8(lane_base, rep));  /* each byte: byte c/2 of its word */
    const pvi bits = _mm512_set1_epi32((int)(0x08040201u << (4 * (c % 2))));
    return _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(y, bits), _mm512_set1_epi8(0x10));
}
#else
typedef __m256i pvi;
typedef __m256 pvf;
#define PV_LOADU(p) _mm256_loadu_si256((const __m256i *)(p))
#define PV_STOREU(p, v) _mm256_storeu_si256((__m256i *)(p), v)
#define PV_SET1(x) _mm256_set1_epi32(x)
#define PV_SET1B(x) _mm256_set1_epi8(x)
#define PV_AND _mm256_and_si256
#define PV_OR _mm256_or_si256
#define PV_XOR _mm256_xor_si256
#define PV_SRLI16 _mm256_srli_epi16
#define PF_ZERO _mm256_setzero_ps
#define PF_LOADU _mm256_loadu_ps
#define PF_STOREU _mm256_storeu_ps
#define PF_SET1 _mm256_set1_ps
#define PF_MUL _mm256_mul_ps
#define PF_FMA _mm256_fmadd_ps
#define PF_CVT _mm256_cvtepi32_ps
#define PV_UNPACKLO32 _mm256_unpacklo_epi32
#define PV_UNPACKHI32 _mm256_unpackhi_epi32
#define PV_UNPACKLO64 _mm256_unpacklo_epi64
#define PV_UNPACKHI64 _mm256_unpackhi_epi64
#define PV_ADD32 _mm256_add_epi32
#define PV_MULLO32 _mm256_mullo_epi32
#define PV_SLLV32 _mm256_sllv_epi32
#define PV_SLLI16 _mm256_slli_epi16
#define PV_SRLI32 _mm256_srli_epi32
#define PV_SLLI32 _mm256_slli_epi32
#define PV_SRAI32 _mm256_srai_epi32
#define PV_ZERO _mm256_setzero_si256
#define PF_FNMA _mm256_fnmadd_ps
#define PANEL_KMX 3
/* exact where used: u <= 63, |s| <= 127, so a pair of products fits int16 unsaturated */
#define PV_DOT_U8(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#define PV_DOT_S16(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))

/* 16 bytes at p[j] + at for rows j = r, r + 4 as the two 128-bit lanes */
static inline pvi gather4x16(const uint8_t *const *p, int r, size_t at) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p[r] + at))),
                                   _mm_loadu_si128((const __m128i *)(p[r + 4] + at)), 1);
}

static inline pvi gather_words(const uint8_t *const *p, size_t at) {
    int32_t idx[8];
    for (int j = 0; j < 8; j++) idx[j] = (int32_t)(p[j] - p[0]);
    return _mm256_i32gather_epi32((const int *)(p[0] + at), _mm256_loadu_si256((const __m256i *)idx), 1);
}

static inline pvf f16_lanes(__m256i words, int high) {
    const __m256i w = _mm256_shuffle_epi8(high ? _mm256_srli_epi32(words, 16) : words,
                                          _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                                           0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1));
    return _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(w, 0x08)));
}

static inline pvf gather_f16_end(const uint8_t *const *p, size_t at) { return f16_lanes(gather_words(p, at), 1); }

static inline pvi fifth_bits_c(pvi qh, int c) {
    const pvi idx = _mm256_add_epi8(_mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404,
                                                      0x08080808, 0x0C0C0C0C),
                                    _mm256_set1_epi32(0x01010101 * (c / 2)));
    const pvi y = _mm256_shuffle_epi8(qh, idx);
    const pvi bits = _mm256_set1_epi32((int)(0x08040201u << (4 * (c % 2))));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(y, bits), bits), _mm256_set1_epi8(0x10));
}
#endif

/* 4 x 4 transposes of 32-bit words within each 128-bit lane: t[c] lane l word r = z[r] lane l word c */
static inline void transpose4(const pvi *z, pvi *t) {
    const pvi a = PV_UNPACKLO32(z[0], z[1]), b = PV_UNPACKLO32(z[2], z[3]);
    const pvi e = PV_UNPACKHI32(z[0], z[1]), f = PV_UNPACKHI32(z[2], z[3]);
    t[0] = PV_UNPACKLO64(a, b), t[1] = PV_UNPACKHI64(a, b), t[2] = PV_UNPACKLO64(e, f), t[3] = PV_UNPACKHI64(e, f);
}

static inline int32_t x4_at(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#if PANEL != 16
/* avx2: 16 activation bytes at p in both 128-bit lanes; X4(v, c) then has bytes 4c..4c+3 of them in every 32-bit
 * lane. Four broadcasts from one load and four in-lane shuffles instead of four broadcast loads, which bound the
 * avx2 tiles: the 1.5B's ffn_gate (Q4_K) at 512 rows 38 -> 29 ms (AMD EPYC: avx2 avx512f avx512_vnni avx512_bf16,
 * 2 threads). On avx512 the same measured no different, and the tiles keep their broadcast loads. */
static inline pvi x16_lanes(const int8_t *p) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
}
#define X4(v, c) _mm256_shuffle_epi32(v, (c) * 0x55)
#endif
