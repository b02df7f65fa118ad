/* Weight-only int8 matmul for CPU decode: y[M,N] = x[M,K] . dequant(W)[N,K]^T (+ bias).
 *
 * W is int8, row-major, with one fp32 scale per group of `group` consecutive weights of a row (a multiple of
 * 32 dividing K; group == K is per-row scaling). Activations stay fp32: no
 * activation quantization, so results match the fp32 reference to rounding. Decode (M small) is bound by
 * reading W once from DRAM, so the loop streams each row once and applies it to all M activation rows.
 * Built by qwen25/kernels/build.py with -O3 -mavx2 -mfma -fopenmp; called through ctypes.
 */
#include <immintrin.h>
#include <stdint.h>


static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256 load8_i8_as_f32(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Up to 4 activation rows at a time: the weights are converted once per 32 and reused. Each output row is
 * computed by the same instruction sequence whatever M is, so a row's result does not depend on which other
 * rows share the call: decoding alone, batched, or verifying speculative tokens gives bit-identical logits. */
static void row_dot(const int8_t *w, const float *s, int group, const float *x, int ldx, int M, int K,
                    float *out, int ldo) {
    for (int m0 = 0; m0 < M; m0 += 4) {
        int mm = M - m0 < 4 ? M - m0 : 4;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int g = 0; g < K / group; g++) {
            __m256 p[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int k = g * group; k < (g + 1) * group; k += 32) {
                __m256 w0 = load8_i8_as_f32(w + k), w1 = load8_i8_as_f32(w + k + 8);
                __m256 w2 = load8_i8_as_f32(w + k + 16), w3 = load8_i8_as_f32(w + k + 24);
                for (int i = 0; i < mm; i++) {
                    const float *xk = x + (long)(m0 + i) * ldx + k;
                    __m256 q = _mm256_mul_ps(w0, _mm256_loadu_ps(xk));
                    q = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xk + 8), q);
                    q = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xk + 16), q);
                    p[i] = _mm256_add_ps(p[i], _mm256_fmadd_ps(w3, _mm256_loadu_ps(xk + 24), q));
                }
            }
            __m256 sc = _mm256_broadcast_ss(s + g);
            for (int i = 0; i < mm; i++) acc[i] = _mm256_fmadd_ps(p[i], sc, acc[i]);
        }
        for (int i = 0; i < mm; i++) out[(long)(m0 + i) * ldo] = hsum256(acc[i]);
    }
}

void q8_matmul(const float *x, const int8_t *w, const float *scales, int group, const float *bias, float *y,
               int M, int N, int K) {
    int groups = K / group;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        row_dot(w + (long)n * K, scales + (long)n * groups, group, x, K, M, K, y + n, N);
        if (bias) for (int m = 0; m < M; m++) y[(long)m * N + n] += bias[n];
    }
}

/* dequant(W) rows [0, N) into out (N, K) fp32: for large M, where a BLAS sgemm on the result wins. */
void q8_dequantize(const int8_t *w, const float *scales, int group, float *out, int N, int K) {
    int groups = K / group;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        for (int g = 0; g < groups; g++) {
            const int8_t *wg = w + (long)n * K + (long)g * group;
            float *og = out + (long)n * K + (long)g * group;
            __m256 sc = _mm256_broadcast_ss(scales + (long)n * groups + g);
            for (int j = 0; j < group; j += 8) _mm256_storeu_ps(og + j, _mm256_mul_ps(load8_i8_as_f32(wg + j), sc));
        }
    }
}
