/* Weight-only int4 matmul for CPU decode: y[M,N] = x[M,K] . dequant(W)[N,K]^T (+ bias).
 *
 * W holds 4-bit codes u in [0, 15], two per byte, in order: byte j carries weight 2j in its low nibble and
 * weight 2j + 1 in its high nibble. One fp16 scale s and one fp16 offset m per group of `group`
 * weights (a multiple of 32 dividing K): w = s * u + m, so a row's dot product with x is, per group,
 * s * sum(u * x) + m * sum(x); the sums of x per group are computed once per call. Activations stay fp32 (no
 * activation quantization), so results match the dequantized fp32 reference to rounding. Each weight row is
 * streamed once and applied to all M activation rows. On a 2-core AVX2 machine this is bound by the unpack +
 * convert + FMA work (~8 G weights/s per core, about q8_matmul.c's rate), not by DRAM.
 * Built by qwen25/kernels/__init__.py with -O3 -mavx2 -mfma -mf16c -fopenmp; called through ctypes.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline float half(uint16_t h) { return _cvtsh_ss(h); }

/* The 32 codes of one block as floats, in order: each 4-byte word (8 codes) is broadcast to all lanes and
 * shifted right by 4 * lane, so no shuffle unit is needed (the broadcast is a plain load). */
static inline void unpack32(const uint8_t *p, __m256 w[4]) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), mask = _mm256_set1_epi32(0x0F);
    for (int j = 0; j < 4; j++) {
        int32_t word;
        memcpy(&word, p + 4 * j, sizeof word);  /* an unaligned 4-byte load */
        __m256i v = _mm256_set1_epi32(word);
        w[j] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask));
    }
}

/* 8 fp16 values from p as floats; past `n` they are zero. */
static inline __m256 load8_half(const uint16_t *p, int n) {
    if (n >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    uint16_t tmp[8] = {0};
    memcpy(tmp, p, sizeof(uint16_t) * n);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp));
}

/* MM (1..4, a compile-time constant after inlining, so the accumulators live in registers) activation rows
 * against one weight row: each block is unpacked once and reused. Scales and offsets are converted 8 groups at a
 * time; the offset terms sum(m * xsum) are accumulated 8 groups per FMA. Each output row goes through the same
 * arithmetic in the same order whatever MM and M are (as in q8_matmul.c), so a row's result does not depend on
 * which other rows share the call: decoding alone, batched, or verifying speculative tokens gives bit-identical
 * logits. xsum rows are `ldxs` floats apart, zero-padded to a multiple of 8 groups. */
static inline __attribute__((always_inline)) void row_dot(const uint8_t *w, const uint16_t *s, const uint16_t *m,
                                                          int group, const float *x, const float *xsum, int ldxs,
                                                          int K, float *out, int ldo, const int MM) {
    int groups = K / group;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256 off[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float sc[8] __attribute__((aligned(32)));
    for (int g0 = 0; g0 < groups; g0 += 8) {
        int gn = groups - g0 < 8 ? groups - g0 : 8;
        _mm256_store_ps(sc, load8_half(s + g0, gn));
        __m256 mv = load8_half(m + g0, gn);
        for (int i = 0; i < MM; i++) off[i] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xsum + (long)i * ldxs + g0), off[i]);
        for (int g = g0; g < g0 + gn; g++) {
            __m256 p[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int k = g * group; k < (g + 1) * group; k += 32) {
                __m256 q[4];
                unpack32(w + k / 2, q);
                for (int i = 0; i < MM; i++) {
                    const float *xk = x + (long)i * K + k;
                    __m256 t = _mm256_mul_ps(q[0], _mm256_loadu_ps(xk));
                    t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xk + 8), t);
                    t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xk + 16), t);
                    p[i] = _mm256_add_ps(p[i], _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xk + 24), t));
                }
            }
            __m256 scale = _mm256_broadcast_ss(sc + (g - g0));
            for (int i = 0; i < MM; i++) acc[i] = _mm256_fmadd_ps(p[i], scale, acc[i]);
        }
    }
    for (int i = 0; i < MM; i++) out[(long)i * ldo] = hsum256(_mm256_add_ps(acc[i], off[i]));
}

/* Sum of x over each group of one activation row, in a fixed order. */
static void group_sums(const float *x, int group, int K, float *out) {
    for (int g = 0; g < K / group; g++) {
        __m256 t = _mm256_setzero_ps();
        for (int k = g * group; k < (g + 1) * group; k += 32) {
            __m256 a = _mm256_add_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(x + k + 8));
            __m256 b = _mm256_add_ps(_mm256_loadu_ps(x + k + 16), _mm256_loadu_ps(x + k + 24));
            t = _mm256_add_ps(t, _mm256_add_ps(a, b));
        }
        out[g] = hsum256(t);
    }
}

/* bias may be NULL. Returns 0, or -1 when scratch memory is unavailable. */
int q4_matmul(const float *x, const uint8_t *w, const uint16_t *scales, const uint16_t *mins, int group,
              const float *bias, float *y, int M, int N, int K) {
    int groups = K / group, ldxs = (groups + 7) / 8 * 8;
    float *xsum = calloc((size_t)M * ldxs, sizeof(float));  /* per (activation row, group), shared by all rows */
    if (!xsum) return -1;
    for (int i = 0; i < M; i++) group_sums(x + (long)i * K, group, K, xsum + (long)i * ldxs);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *wn = w + (long)n * (K / 2);
        const uint16_t *sn = scales + (long)n * groups, *mn = mins + (long)n * groups;
        for (int m0 = 0; m0 < M; m0 += 4) {
            const float *xm = x + (long)m0 * K, *xs = xsum + (long)m0 * ldxs;
            float *ym = y + (long)m0 * N + n;
            switch (M - m0 < 4 ? M - m0 : 4) {
                case 1: row_dot(wn, sn, mn, group, xm, xs, ldxs, K, ym, N, 1); break;
                case 2: row_dot(wn, sn, mn, group, xm, xs, ldxs, K, ym, N, 2); break;
                case 3: row_dot(wn, sn, mn, group, xm, xs, ldxs, K, ym, N, 3); break;
                default: row_dot(wn, sn, mn, group, xm, xs, ldxs, K, ym, N, 4); break;
            }
        }
        if (bias) for (int i = 0; i < M; i++) y[(long)i * N + n] += bias[n];
    }
    free(xsum);
    return 0;
}

/* dequant(W) into out (N, K) fp32: for large M, where a BLAS sgemm on the result wins. */
void q4_dequantize(const uint8_t *w, const uint16_t *scales, const uint16_t *mins, int group, float *out, int N,
                   int K) {
    int groups = K / group;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int g = 0; g < groups; g++) {
            __m256 sc = _mm256_set1_ps(half(scales[(long)n * groups + g]));
            __m256 mn = _mm256_set1_ps(half(mins[(long)n * groups + g]));
            for (int k = g * group; k < (g + 1) * group; k += 32) {
                __m256 q[4];
                unpack32(w + (long)n * (K / 2) + k / 2, q);
                float *o = out + (long)n * K + k;
                for (int j = 0; j < 4; j++) _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(q[j], sc, mn));
            }
        }
    }
}
