/* Two activation rows against weight rows straight from the file's blocks, without packing: passes of 2 rows (two
 * concurrent decode streams, short speculative verification) of the types whose panels lose there (included by
 * ggml_panel.c after ggml_stream.c, whose per-block helpers it calls).
 *
 * Packing a panel costs more per weight byte than two activation rows' dot products, so each weight row is read in
 * place, from start to end, as in the single-row kernel, and each of its blocks is dotted with both activation rows'
 * blocks: stream_block / stream_q4k are called once per activation row and inlined, so the weight block's unpacking
 * (the same expressions on the same bytes) is computed once for the pair. The two block sums are reduced across
 * lanes into one vector, lane i = activation row i's exact integer sum (the same integer as the single-row and panel
 * kernels': all are exact; lanes 2-7 are zero, not stored), and lane i then takes the same fp32 steps as those
 * kernels, in the same order: fma((float)S_b, d_w * d_x, acc) per block b (and Q4_K's minimum term, fused). So a
 * row's result is the same bits whichever kernel runs it. (Groups of 4 and 8 rows ran here too, for 3-12 rows of
 * Q5_0 / Q8_0 on avx2, until the panels won there: STREAM_MULTI_ROWS.) */

/* Passes of STREAM_ROWS + 1 .. STREAM_MULTI_ROWS(type) activation rows run stream_rows, longer ones the packed
 * panels: the crossovers measured in the whole model, streams of the 0.5B and the 1.5B (weights from DRAM). The
 * panel tiles take fewer multiplies per product (no cross-lane sums; on avx512 16-lane vpdpbusd), so they win once
 * the packing is shared by enough rows: sooner for the K types and on avx512. At most 2: stream_rows takes a pair. */
#if PANEL == 16
/* avx512: 2 rows; the panels from 3, since the panels' bytes are loaded in order before packing (touch_span): 3
 * streams of the 1.5B 55 -> 70 tok/s, 4 streams 72 -> 91, the 0.5B's 4 streams 205 -> 227; 2 streams stay faster
 * here (59 against 53 on the panels; with the L2 prefetch of PREFETCH_L2_MAX_ACT both are equal: 2-row steps of the
 * 0.5B 19.7 / 20.0 ms, the 1.5B 51.0 / 50.9; AMD EPYC Zen 4: avx2 avx512f avx512_vnni avx512_bf16, 2 threads).
 * Before, 3-4 rows ran here too (panels won per matrix but not in the model). (AMD EPYC: avx2 avx512f avx512_vnni
 * avx512_bf16, 2 threads) */
#define STREAM_MULTI_ROWS(type) 2
#else
/* avx2: the K types' panels win from 3 rows (from 5 once their tiles took the activations by shuffles: the 1.5B's
 * 8 streams 72 -> 75 tok/s, 5 streams 57 -> 61; from 3 once their bytes were loaded in order before packing: 3
 * streams 47 -> 58, 4 streams 60 -> 64). Q5_0 / Q8_0 panels lost up to 12 rows (the 0.5B's 8 streams 203 -> 168)
 * until short passes prefetched the panel two ahead into L2 (PREFETCH_L2_MAX_ACT); since then they win from 2 rows:
 * the 0.5B's decode steps of 2 / 3 / 4 / 5 / 8 / 12 rows 23.3 / 29.4 / 30.5 / 43.9 / 46.4 / 71.6 -> 20.7 / 25.5 /
 * 28.4 / 32.9 / 41.7 / 54.6 ms (in one process, the builds alternating step by step), while the 1.5B's K types
 * still lose at 2 rows (54.5 -> 58.1 ms). (AMD EPYC Zen 4: avx2 avx512f avx512_vnni avx512_bf16, 2 threads) */
#define STREAM_MULTI_ROWS(type) ((type) == T_Q5_0 || (type) == T_Q8_0 ? 1 : 2)
#endif
_Static_assert(STREAM_MULTI_ROWS(T_Q4_K) <= 2 && STREAM_MULTI_ROWS(T_Q6_K) <= 2 && STREAM_MULTI_ROWS(T_Q5_0) <= 2 &&
               STREAM_MULTI_ROWS(T_Q8_0) <= 2, "stream_rows takes exactly two rows");

/* lane i = the sum of v[i]'s 8 lanes, i < 4 (lanes 4-7 zero) */
static inline __m256i rows_hsum4(const __m256i *v) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    return _mm256_castsi128_si256(_mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

/* Activation rows r0 + i, i < 8 (rows >= m_hi repeat m_hi - 1), lane-major per block: dt[8b + i] its
 * scale of block b and, for the 32-value types, ot[8b + i] = -STREAM_OFFSET * (its sum over block b). */
static void stream_rows_prepare(int type, const float *d, const int16_t *sums, int nb, int r0, int m_hi, float *dt,
                                int32_t *ot) {
    const int kq = type == T_Q4_K || type == T_Q6_K;
    for (int i = 0; i < 8; i++) {
        const int r = r0 + i < m_hi ? r0 + i : m_hi - 1;
        for (int b = 0; b < nb; b++) {
            dt[8 * b + i] = d[(size_t)r * nb + b];
            ot[8 * b + i] = kq ? 0 : -STREAM_OFFSET(type) * sums[(size_t)r * nb + b];
        }
    }
}

/* Q4_K for G activation rows, stream_q4k's integers with the weight side prepared once per block: v[i], mv[i] as its
 * return value and *mv for activation row i. */
static inline __attribute__((always_inline)) void rows_q4k(int G, const uint8_t *blk, const int8_t *const *x,
                                                           const int16_t *const *xs, size_t b, __m256i *v,
                                                           __m256i *mv) {
    const __m256i sm2 = _mm256_broadcastsi128_si256(q4k_scales_mins(blk + 4));
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i mdup = _mm256_shuffle_epi8(sm2, _mm256_setr_epi8(8, -1, 8, -1, 9, -1, 9, -1, 10, -1, 10, -1, 11, -1,
                                                                   11, -1, 12, -1, 12, -1, 13, -1, 13, -1, 14, -1,
                                                                   14, -1, 15, -1, 15, -1));
    for (int i = 0; i < G; i++) {
        mv[i] = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(xs[i] + KSUMS * b)), mdup);
        v[i] = _mm256_setzero_si256();
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {  /* sub-block j: the low nibbles of bytes 32(j / 2).., or their high ones */
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * (j / 2)));
        const __m256i w = _mm256_and_si256(j % 2 ? _mm256_srli_epi16(q, 4) : q, low);
        const __m256i sc = _mm256_shuffle_epi8(sm2, _mm256_set1_epi16((short)(0x8000 | j)));  /* zero-extended */
        for (int i = 0; i < G; i++) {  /* the scale << the activation row's exponent (<= 504) */
            const __m256i sci = _mm256_sll_epi16(sc, _mm_cvtsi32_si128(xs[i][KSUMS * b + 16 + j]));
            v[i] = ROWS_DOT_S16(v[i], _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)(x[i] + 256 * b + 32 * j))), sci);
            ROWS_CHAIN(v[i]);
        }
    }
}

/* One weight row (nb blocks at `row`) against the pair's activation rows x[i], i < 2 (q rows; xs[i] their KSUMS
 * sums and exponents per block, K types): lane i of the result = the row pair's fp32 result. */
static inline __attribute__((always_inline)) __m256 stream_rows_one(int type, const uint8_t *row, int nb,
                                                                    const int8_t *const *x, const int16_t *const *xs,
                                                                    const float *dt, const int32_t *ot) {
    const int G = 2;
    const int kq = type == T_Q4_K || type == T_Q6_K, qk = kq ? 256 : 32;
    const int bytes = ggml_block_bytes(type);
    const int dat = type == T_Q6_K ? 208 : 0;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (size_t)b * bytes;
        __m256i v[4], mv[4];
        v[2] = v[3] = mv[2] = mv[3] = _mm256_setzero_si256();  /* lanes 2, 3: not stored */
        if (type == T_Q6_K) rows_q6k(G, blk, x, xs, (size_t)b, v);
        else if (type == T_Q4_K) rows_q4k(G, blk, x, xs, (size_t)b, v, mv);
        else
            for (int i = 0; i < G; i++) {
                int32_t m = 0;
                v[i] = stream_block(type, blk, x[i] + (size_t)b * qk, xs[i], &m);
            }
        __m256i S = rows_hsum4(v);
        if (!kq) S = _mm256_add_epi32(S, _mm256_loadu_si256((const __m256i *)(ot + 8 * b)));
        const __m256 dx = _mm256_loadu_ps(dt + 8 * b);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), _mm256_mul_ps(_mm256_set1_ps(f16(blk + dat)), dx), acc);
        if (type == T_Q4_K) {
            const __m256i M = rows_hsum4(mv);
            acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(M), _mm256_mul_ps(_mm256_set1_ps(f16(blk + 2)), dx), acc);
        }
    }
    return acc;
}

/* Weight rows [n_lo, n_hi) of w (rows of nb blocks) against the activation rows [m_lo, m_hi), m_hi - m_lo = 2, as
 * panel_run: out[(i - m_lo) * ldo + (r - n_lo)]; buf: scratch of nb x 64 bytes (within panel_bytes(n)). */
static inline __attribute__((always_inline)) void stream_rows(int type, const uint8_t *w, int nb, int n,
                                                              const int8_t *q, const float *d, const int16_t *sums,
                                                              int m_lo, int m_hi, int n_lo, int n_hi, float *out,
                                                              long ldo, uint8_t *buf) {
    const int kq = type == T_Q4_K || type == T_Q6_K, nsums = kq ? KSUMS : 1;
    const size_t row_bytes = (size_t)nb * ggml_block_bytes(type);
    float *dt = (float *)buf;
    int32_t *ot = (int32_t *)(buf + (size_t)nb * 8 * 4);
    stream_rows_prepare(type, d, sums, nb, m_lo, m_hi, dt, ot);
    const int8_t *x[2] = {q + (size_t)m_lo * n, q + (size_t)(m_lo + 1) * n};
    const int16_t *xs[2] = {sums + (size_t)m_lo * nb * nsums, sums + (size_t)(m_lo + 1) * nb * nsums};
    for (int r = n_lo; r < n_hi; r++) {
        float f[8];
        _mm256_storeu_ps(f, stream_rows_one(type, w + (size_t)r * row_bytes, nb, x, xs, dt, ot));
        out[r - n_lo] = f[0];
        out[ldo + (r - n_lo)] = f[1];
    }
}
