/* Q5_0 / Q8_0 matmuls in panels: PANEL weight rows (16 on the avx512 build, 8 on avx2) are unpacked once from the
 * file's blocks into a small buffer laid out for the integer dot instruction, and every activation row then runs
 * against that buffer. Included by ggml_dot.c.
 *
 * Layout of a packed panel, per 32-value block b of the rows: 8 vectors, vector c holding values 4c..4c+3 of each
 * of the PANEL rows (4 bytes per 32-bit lane, lane j = weight row j), then the PANEL weight scales as fp32. An
 * activation row's 4 values 4c..4c+3 of block b, broadcast to every lane, are multiplied with vector c and the four
 * products summed into lane j (vpdpbusd; maddubs + madd on avx2); after the 8 steps lane j holds the block's exact
 * integer dot product for weight row j. It is scaled and accumulated in fp32, one fma per (row pair, block):
 *     acc = fma((float)S_b, d_w * d_x, acc)    for b = 0, 1, ..., in order
 * so no horizontal sum is needed, and a (activation row, weight row) result takes the same float steps on every
 * build, for every number of activation rows and every tile shape: rows stay independent and the builds agree bit
 * for bit. The unsigned operand of the dot is the weight: Q5_0's q5 in [0, 31] with its offset -16 folded in as
 * -16 * (the activation block's sum), which initialises the block's integer sum; on avx512 Q8_0 is stored as
 * w + 128 with -128 * sum folded the same way; on avx2 (maddubs saturates int16 for 255 * 127 pairs) Q8_0 stays
 * signed and runs as |w| times (x with w's sign).
 */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define PANEL 16
#define PANEL_MX 8  /* activation rows per tile: 8 integer + 8 fp32 accumulators of 32 zmm */
#else
#define PANEL 8
#define PANEL_MX 4  /* 4 + 4 accumulators of 16 ymm */
#endif
#define PANEL_BLOCK_BYTES (PANEL * 36)  /* 8 vectors of PANEL x 4 bytes, PANEL fp32 scales */

/* Passes of this many activation rows run stream_row (ggml_stream.c); from two rows on, stream_rows reads each weight
 * row once for all of them (ggml_stream_rows.c). Two decode streams, aggregate tok/s, stream_row twice -> a group
 * of 2 (AMD EPYC: avx2 avx512f avx512_vnni avx512_bf16, 2 threads): 0.5B avx512 110 -> 131, avx2 96 -> 113; 1.5B
 * avx512 41 -> 70, avx2 42 -> 58. */
#define STREAM_ROWS 1
#define PANEL_KBLOCK_BYTES (PANEL * 4 * 81)  /* Q4_K / Q6_K, per 256 values: see panel_pack_k */
#define KOFF 28  /* activation offsets per 256 values (K types): 16 for Q6_K, 4 pairs for Q4_K, 8 exponents */

/* Bytes of a packed panel of n values per row (any type). */
static size_t panel_bytes(int n) { return (size_t)((n + 255) / 256) * PANEL_KBLOCK_BYTES; }

/* Activation offsets for the panel kernels, int32 per activation block (off: (R, nb, 2) for 32-value blocks,
 * (R, nb, KOFF) for 256-value ones), from the sums of q per 32 / per 16 values (ggml_quantize_rows):
 *   32-value blocks: the initial integer sum for Q5_0 (-16 * sum of q) and for Q8_0 (-128 * sum on avx512, 0 on
 *   avx2);
 *   256-value blocks: -32 * (sum over each 16 values, unshifted: it starts a sub-block's sum, which is shifted
 *   whole), Q6_K's offset, then Q4_K's shifted sums over each 32 values as int16 pairs (sub-blocks 2p, 2p + 1 in
 *   word p), which the minimums multiply, then the 8 exponents e (ggml_dot.c). */
static void panel_offsets_k(const int16_t *sums, int R, int nb, int32_t *off) {
    for (size_t at = 0; at < (size_t)R * nb; at++) {
        const int16_t *s = sums + KSUMS * at;
        int32_t *o = off + KOFF * at;
        for (int k = 0; k < 16; k++) o[k] = -32 * ((int32_t)s[k] >> s[16 + k / 2]);  /* exact: a multiple of 2^e */
        for (int j = 0; j < 8; j++) o[20 + j] = s[16 + j];
        for (int p = 0; p < 4; p++) {
            const uint16_t lo = (uint16_t)(s[4 * p] + s[4 * p + 1]), hi = (uint16_t)(s[4 * p + 2] + s[4 * p + 3]);
            o[16 + p] = (int32_t)((uint32_t)lo | (uint32_t)hi << 16);
        }
    }
}

static void panel_offsets(const int16_t *sums, int R, int nb, int32_t *off) {
    for (size_t at = 0; at < (size_t)R * nb; at++) {
        off[2 * at] = -16 * (int32_t)sums[at];
#if PANEL == 16
        off[2 * at + 1] = -128 * (int32_t)sums[at];
#else
        off[2 * at + 1] = 0;
#endif
    }
}

#include "ggml_panel_vec.c"  /* pvi / pvf and their operations on each ISA: gathers, transposes, broadcasts */

/* The largest panel scratch (panel_bytes(n): the K types' layout, the most any type of n values takes) during whose
 * packing the next panel is prefetched: half a 32 KB L1D. So avx2 prefetches for rows of up to 1536 values (its K
 * panels of 1536 are 15.5 KB) and avx512 for none of the model's rows. Without it on avx512, 8-row passes over all
 * 28 layers of the 1.5B's ffn_gate (Q4_K, 31 KB packed) 25.6-27.7 -> 22.9-24.9 ms, 4 rows 20.4-21.7 -> 18.2-18.8,
 * 16 rows 35.6-38.1 -> 32.5-33.3; 8 streams of the 1.5B 68.5-69.9 -> 72.5-77.2 tok/s, its prefill 195-204 -> 204-213
 * tok/s (3 alternating runs each); the 0.5B's Q5_0 / Q8_0 passes within the noise. avx2 keeps it: without, its
 * 8-row Q8_0 lm_head went ~2% slower (AMD EPYC Zen 4: avx2 avx512f avx512_vnni avx512_bf16, 2 threads). */
#define PREFETCH_PACKED_MAX 16384

/* Short passes (batched decode, speculative verification: activations of at most this many int8 bytes, a quarter of
 * Zen 4's 1 MB L2: 16 rows of the 1.5B's 8960-wide ffn_down, 292 of a 896-wide matrix) prefetch the panel two ahead
 * into L2 (prefetcht1, which fills L2 and not L1 here) while packing this one; a claimed chunk's first panel fetches
 * the next two. Every panel but a chunk's first is then in L2 when its turn comes, and skips touch_span, which was
 * about a third of an 8-row pass with the weights from DRAM (perf, the 1.5B's ffn_up). 8-row decode steps in one
 * process, the builds alternating step by step (AMD EPYC Zen 4: avx2 avx512f avx512_vnni avx512_bf16, 2 threads):
 * avx512 the 0.5B 33.7-34.4 -> 29.9-30.6 ms, the 1.5B 83.2-85.1 -> 79.2-80.6; AVX2 (where this also replaces the L1
 * prefetch of narrow panels) 48.8-49.3 -> 46.9-47.7 and 118.9-119.6 -> 110.9-112.9; 4 rows -6% to -14%, 16 -2% to
 * -8%, 32 and 64 rows of the 0.5B -6% and -2% (benchmarks/ab_forward_builds.py). The same for the fused forward's
 * gate/up, which runs one panel per call (run_lo / run_hi: its claimed chunk): 8-row steps a further -8% to -11%.
 * Longer passes (prefill) stream so many activations through L2 between a prefetch and its use that it is evicted:
 * prefetching in their tiles cost the 0.5B's prefill 3-5%, so they keep touch_span. */
#define PREFETCH_L2_MAX_ACT 262144

/* Part k of n of the bytes [ahead, ahead + bytes) into the cache (l2: into L2 only): the next panel's rows, or for
 * short passes the panel two ahead (PREFETCH_L2_MAX_ACT), while this one is packed.
 * A panel reads PANEL rows side by side, block by block; the hardware prefetchers do not follow that many streams.
 * (Written when decode still packed its panels, where one row then read ~3-4 GB/s per core without it; decode now
 * streams rows in place, ggml_stream.c, and the packed passes keep this up to PREFETCH_PACKED_MAX.) */
static inline void prefetch_share(const uint8_t *ahead, size_t bytes, int k, int n, int l2) {
    if (!ahead) return;
    const size_t lo = bytes * k / n & ~(size_t)63, hi = bytes * (k + 1) / n;
    if (l2)
        for (size_t at = lo; at < hi; at += 64) _mm_prefetch((const char *)(ahead + at), _MM_HINT_T1);
    else
        for (size_t at = lo; at < hi; at += 64) _mm_prefetch((const char *)(ahead + at), _MM_HINT_T0);
}

/* Load every 64-byte line of [p, p + bytes) once, in address order, discarding the values: a panel's bytes before
 * its packing, which reads the PANEL rows side by side, block by block. The prefetches of the next panel alone left
 * the packing waiting on memory: ~40 of the ~66 ms of an 8-row step of the 1.5B were packing weights from DRAM,
 * against ~10 for packing them from the cache (avx512). Demand loads in address order let the hardware stream the
 * lines in: 8 streams of the 1.5B 123 -> 145 tok/s, the 0.5B 308 -> 362 (avx512; AVX2 and prefill unchanged; AMD
 * EPYC: avx2 avx512f avx512_vnni avx512_bf16, 2 threads). */
static inline void touch_span(const uint8_t *p, size_t bytes) {
    pvi acc = PV_ZERO();
    /* Every line requested into L2 first, then loaded: the demand loads alone waited on the L1's few outstanding
     * misses. 8-row passes over the 0.5B's lm_head (Q8_0) 9.8-10.3 -> 8.4-8.8 ms, the 1.5B's 28 ffn_gate (Q4_K)
     * 26.4-29.9 -> 23.8-25.1; 8 streams of the 0.5B 175-186 -> 199-206 tok/s, of the 1.5B 70-73 -> 71-76; avx2
     * and prefill within the noise (3 alternating runs each; AMD EPYC Zen 4: avx2 avx512f avx512_vnni avx512_bf16,
     * 2 threads). Prefetching to L1 instead was slower, and so was also prefetching the next panel here. */
    for (size_t at = 0; at + 64 <= bytes; at += 64) _mm_prefetch((const char *)(p + at), _MM_HINT_T1);
    for (size_t at = 0; at + 64 <= bytes; at += 64) acc = PV_XOR(acc, PV_LOADU(p + at));
    __asm__ volatile("" : : "v"(acc));
}

/* Pack blocks [b0, b1) of the PANEL rows starting at rows[j] (row pointers; rows past the matrix may repeat its
 * last row) into dst, block b at dst + (b - b0) * PANEL_BLOCK_BYTES. Q5_0 / Q8_0.
 * A block's header (d; Q5_0's qh) comes from 16-byte loads of each row and the transpose the codes use, not from
 * vpgatherdd: 8-row passes on avx512, weights from DRAM, all 24 layers of the 0.5B's Q5_0 ffn_gate / ffn_up
 * 10.5-11.2 / 10.2-10.6 -> 9.7-10.0 / 9.5-10.1 ms, its Q8_0 lm_head 10.7-12.6 -> 10.0-10.3 ms (minimums of 5
 * alternating runs); 8 streams of the 0.5B 180.0 -> 186.4 tok/s (means of 4 alternating runs); avx2 within the
 * noise (AMD EPYC Zen 4: avx2 avx512f avx512_vnni avx512_bf16, 2 threads). */
static void panel_pack(int type, const uint8_t *const *rows, int b0, int b1, uint8_t *dst, const uint8_t *ahead,
                       size_t ahead_bytes, int ahead_l2) {
    const int bytes = ggml_block_bytes(type);
    const pvi low = PV_SET1B(0x0F);
    for (int b = b0; b < b1; b++) {
        prefetch_share(ahead, ahead_bytes, b - b0, b1 - b0, ahead_l2);
        const size_t at = (size_t)b * bytes;
        uint8_t *o = dst + (size_t)(b - b0) * PANEL_BLOCK_BYTES;
        pvi z[4], t[4];
        pvf dv;
        if (type == T_Q5_0) {
            /* bytes 0..7 of each row's block: word 0 = d | qh low half << 16, word 1 = qh high half | ... */
            for (int r = 0; r < 4; r++) z[r] = gather4x16(rows, r, at);
            transpose4(z, t);
            const pvi qh = PV_OR(PV_SRLI32(t[0], 16), PV_SLLI32(t[1], 16));
            dv = f16_lanes(t[0], 0);
            for (int r = 0; r < 4; r++) z[r] = gather4x16(rows, r, at + 6);
            transpose4(z, t);
            for (int c = 0; c < 4; c++) {
                PV_STOREU(o + c * PANEL * 4, PV_OR(PV_AND(t[c], low), fifth_bits_c(qh, c)));
                PV_STOREU(o + (c + 4) * PANEL * 4, PV_OR(PV_AND(PV_SRLI16(t[c], 4), low), fifth_bits_c(qh, c + 4)));
            }
        } else {
            for (int h = 0; h < 2; h++) {
                for (int r = 0; r < 4; r++) z[r] = gather4x16(rows, r, at + 2 + 16 * h);
                transpose4(z, t);
                for (int c = 0; c < 4; c++)
#if PANEL == 16
                    PV_STOREU(o + (4 * h + c) * PANEL * 4, PV_XOR(t[c], PV_SET1B((char)0x80)));  /* w + 128 */
#else
                    PV_STOREU(o + (4 * h + c) * PANEL * 4, t[c]);
#endif
            }
            for (int r = 0; r < 4; r++) z[r] = gather4x16(rows, r, at);
            transpose4(z, t);
            dv = f16_lanes(t[0], 0);
        }
        PF_STOREU((float *)(o + 8 * PANEL * 4), dv);
    }
}

static inline void panel_store(const pvf *facc, int MX, float *out, long ldo, int nvalid) {
    for (int i = 0; i < MX; i++) {
        if (nvalid == PANEL) {
            PF_STOREU(out + (size_t)i * ldo, facc[i]);
        } else {
            float f[PANEL];
            PF_STOREU(f, facc[i]);
            for (int j = 0; j < nvalid; j++) out[(size_t)i * ldo + j] = f[j];
        }
    }
}

#include "ggml_stream.c"  /* one activation row without packing (decode) */
#include "ggml_stream_rows.c"  /* a few activation rows without packing (batched decode, verification) */

/* One tile: MX activation rows (q: int8 rows of stride n, d: one scale per block, off: the initial sums as in
 * panel_offsets, rows of stride 2 * nb) against a packed Q5_0 / Q8_0 panel of nb blocks; out[i * ldo + j] for
 * weight rows j < nvalid. */
static inline __attribute__((always_inline)) void panel_tile(int type, const uint8_t *P, int nb, const int8_t *q,
                                                             int n, const float *d, const int32_t *off, int MX,
                                                             float *out, long ldo, int nvalid) {
    pvf facc[PANEL_MX];
    const int t = type == T_Q8_0;
    for (int i = 0; i < MX; i++) facc[i] = PF_ZERO();
    for (int b = 0; b < nb; b++) {
        const uint8_t *pb = P + (size_t)b * PANEL_BLOCK_BYTES;
        pvi acc[PANEL_MX];
        for (int i = 0; i < MX; i++) acc[i] = PV_SET1(off[(size_t)i * 2 * nb + 2 * b + t]);
#if PANEL != 16
        if (type == T_Q5_0)  /* avx2: four steps' maddubs pairs added in int16 (4 x 2 x 31 x 127 < 2^15), one madd */
            for (int h = 0; h < 2; h++) {
                const pvi w0 = PV_LOADU(pb + (4 * h) * PANEL * 4), w1 = PV_LOADU(pb + (4 * h + 1) * PANEL * 4);
                const pvi w2 = PV_LOADU(pb + (4 * h + 2) * PANEL * 4), w3 = PV_LOADU(pb + (4 * h + 3) * PANEL * 4);
                for (int i = 0; i < MX; i++) {
                    const pvi x = x16_lanes(q + (size_t)i * n + 32 * b + 16 * h);
                    __m256i p = _mm256_maddubs_epi16(w0, X4(x, 0));
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w1, X4(x, 1)));
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w2, X4(x, 2)));
                    p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w3, X4(x, 3)));
                    acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
                }
            }
#endif
#if PANEL != 16
        pvi xv[PANEL_MX];
#endif
#pragma GCC unroll 8
        for (int c = 0; c < 8 && !(PANEL != 16 && type == T_Q5_0); c++) {
            const pvi w = PV_LOADU(pb + c * PANEL * 4);
#if PANEL == 16
            for (int i = 0; i < MX; i++)
                acc[i] = _mm512_dpbusd_epi32(acc[i], w, PV_SET1(x4_at(q + (size_t)i * n + 32 * b + 4 * c)));
#else
            {
                const pvi u = _mm256_abs_epi8(w);
                for (int i = 0; i < MX; i++) {
                    if (c % 4 == 0) xv[i] = x16_lanes(q + (size_t)i * n + 32 * b + 4 * c);
                    const pvi s = _mm256_sign_epi8(X4(xv[i], c % 4), w);
                    acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
                }
            }
#endif
        }
        const pvf dw = PF_LOADU((const float *)(pb + 8 * PANEL * 4));
        for (int i = 0; i < MX; i++)
            facc[i] = PF_FMA(PF_CVT(acc[i]), PF_MUL(dw, PF_SET1(d[(size_t)i * nb + b])), facc[i]);
    }
    panel_store(facc, MX, out, ldo, nvalid);
}

#include "ggml_panel_k.c"  /* Q4_K / Q6_K: packing and tiles */

/* Weight rows [n_lo, n_hi) of W (N rows of n values as ggml blocks of `type`, Q5_0 / Q8_0 / Q4_K / Q6_K) against
 * activation rows [m_lo, m_hi) quantized by ggml_quantize_rows and panel_offsets / panel_offsets_k (q, d, off for
 * all rows): out[(i - m_lo) * ldo + (r - n_lo)]. buf: panel_bytes(n) bytes of scratch. [n_lo, n_hi) lies in the
 * run [run_lo, run_hi) of weight rows that the caller computes in order, panel by panel (a claimed chunk; the fused
 * forward's gate/up calls one panel at a time): the prefetches of short passes look ahead within the run. */
static inline __attribute__((always_inline)) void panel_run(int type, const uint8_t *w, int N, int n,
                                                            const int8_t *q, const float *d, const int32_t *off,
                                                            const int16_t *sums, int m_lo, int m_hi, int n_lo,
                                                            int n_hi, int run_lo, int run_hi, float *out, long ldo,
                                                            uint8_t *buf) {
    const int kq = type == T_Q4_K || type == T_Q6_K;
    const int nb = n / (kq ? 256 : 32), ostride = kq ? KOFF * nb : 2 * nb, MX = kq ? PANEL_KMX : PANEL_MX;
    const int bytes = ggml_block_bytes(type);
    const size_t row_bytes = (size_t)nb * bytes;
    if (m_hi - m_lo > STREAM_ROWS && m_hi - m_lo <= STREAM_MULTI_ROWS(type)) {  /* no packing either, the same bits */
        stream_rows(type, w, nb, n, q, d, sums, m_lo, m_hi, n_lo, n_hi, out, ldo, buf);
        return;
    }
    for (int p0 = n_lo; p0 < n_hi; p0 += PANEL) {
        const uint8_t *rows[PANEL];
        const int nvalid = n_hi - p0 < PANEL ? n_hi - p0 : PANEL;
        for (int j = 0; j < PANEL; j++) rows[j] = w + (size_t)(p0 + j < N ? p0 + j : N - 1) * row_bytes;
        float *o = out + (p0 - n_lo);
        if (m_hi - m_lo <= STREAM_ROWS) {  /* decode: no packing (ggml_stream.c), the same bits */
            for (int i = m_lo; i < m_hi; i++)
                stream_row(type, rows, nb, q + (size_t)i * n, d + (size_t)i * nb, sums + (size_t)i * nb * (kq ? KSUMS : 1),
                           o + (size_t)(i - m_lo) * ldo, nvalid);
            continue;
        }
        /* what to prefetch while packing this panel (rows are contiguous in the file): short passes the panel two
         * ahead into L2, at a run's first panel the next two (PREFETCH_L2_MAX_ACT); long passes the next panel into
         * L1, only while the packed panel leaves room there (PREFETCH_PACKED_MAX) */
        const int short_pass = (size_t)(m_hi - m_lo) * n <= PREFETCH_L2_MAX_ACT, first = p0 == run_lo;
        const uint8_t *pf = NULL;
        size_t pf_bytes = 0;
        if (short_pass) {
            const int lo = p0 + (first ? 1 : 2) * PANEL, hi = p0 + 3 * PANEL < run_hi ? p0 + 3 * PANEL : run_hi;
            if (lo < hi) pf = w + (size_t)lo * row_bytes, pf_bytes = (size_t)(hi - lo) * row_bytes;
        } else if (p0 + PANEL < n_hi && panel_bytes(n) <= PREFETCH_PACKED_MAX) {
            const size_t next = (size_t)(p0 + PANEL) * row_bytes, end = (size_t)N * row_bytes;
            pf = w + next, pf_bytes = end - next < PANEL * row_bytes ? end - next : PANEL * row_bytes;
        }
        if (!short_pass || first)  /* else the packing of the panels before brought this one into L2 */
            touch_span(rows[0], (size_t)(rows[PANEL - 1] - rows[0]) + row_bytes);  /* rows past N repeat row N - 1 */
        if (kq) panel_pack_k(type, rows, nb, buf, pf, pf_bytes, short_pass);
        else panel_pack(type, rows, 0, nb, buf, pf, pf_bytes, short_pass);
/* (the tile sizes clamped to each kernel's accumulator count: a size only the other kernel takes stays in bounds
 * in the branch the compiler still instantiates for it) */
#define TILE(i, mx)                                                                                                   \
    do {                                                                                                              \
        if (kq)                                                                                                       \
            panel_tile_k(type, buf, nb, q + (size_t)(i) * n, n, d + (size_t)(i) * nb, off + (size_t)(i) * ostride,   \
                         (mx) < PANEL_KMX ? (mx) : PANEL_KMX, o + (size_t)((i) - m_lo) * ldo, ldo, nvalid);          \
        else                                                                                                          \
            panel_tile(type, buf, nb, q + (size_t)(i) * n, n, d + (size_t)(i) * nb, off + (size_t)(i) * ostride,     \
                       (mx) < PANEL_MX ? (mx) : PANEL_MX, o + (size_t)((i) - m_lo) * ldo, ldo, nvalid);              \
    } while (0)
        /* full tiles, then the rest in tiles of 4, 2 and 1 rows (was 1-row tiles only: 6 streams of the 1.5B on
         * avx512, a tile of 4 and a tile of 2 instead of six 1-row tiles, 92 -> 99 tok/s; AMD EPYC: avx2 avx512f
         * avx512_vnni avx512_bf16, 2 threads) */
        int i = m_lo;
        const int mx = kq ? PANEL_KMX : PANEL_MX;
        for (; i + mx <= m_hi; i += mx) TILE(i, mx);
        if (mx > 4 && m_hi - i >= 4) { TILE(i, 4); i += 4; }
        if (mx > 2 && m_hi - i >= 2) { TILE(i, 2); i += 2; }
        for (; i < m_hi; i++) TILE(i, 1);
#undef TILE
        (void)MX;
    }
}

static void panel_matmul(int type, const uint8_t *w, int N, int n, const int8_t *q, const float *d,
                         const int32_t *off, const int16_t *sums, int m_lo, int m_hi, int n_lo, int n_hi, int run_lo,
                         int run_hi, float *out, long ldo, uint8_t *buf) {
#define RUN(t) panel_run(t, w, N, n, q, d, off, sums, m_lo, m_hi, n_lo, n_hi, run_lo, run_hi, out, ldo, buf)
    switch (type) {
    case T_Q5_0: RUN(T_Q5_0); break;
    case T_Q8_0: RUN(T_Q8_0); break;
    case T_Q4_K: RUN(T_Q4_K); break;
    default: RUN(T_Q6_K); break;
    }
#undef RUN
}
