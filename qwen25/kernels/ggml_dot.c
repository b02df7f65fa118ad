/* Matmuls on ggml's own weight blocks (Q4_K, Q6_K, Q5_0, Q8_0), against activations quantized to 8 bits per block.
 *
 * out[i][r] = x_i . W-row r, where W is the file's bytes (rows of blocks, unchanged) and x_i is first quantized:
 *   - for Q4_K / Q6_K weights (256-value super-blocks): with A the block's absmax, each 32 values j take a
 *     power-of-two exponent: k_j = the largest k <= KEXP (3) with a_j * 2^k <= A (a_j their absmax), and
 *     q = round(x * (127 / A) * 2^k_j) in [-127, 127]: values far below the block's maximum keep up to 3 more
 *     bits than ggml's q8_K blocks (one step A / 127 for all 256) give them. The block's scale is
 *     d = A / 127 / 2^KEXP and sub-block j's integer sums are shifted left by e_j = KEXP - k_j (exact), so a
 *     block still gives one exact integer S. Also the sum of q over each 16 values (shifted the same way), to
 *     fold the weights' offsets (Q4_K's minimums, Q6_K's -32);
 *   - for Q5_0 / Q8_0 weights (32-value blocks): per 32 values, d = absmax / 127, q = round(x / d), and the sum
 *     of q.
 *   The K types' 3 bits took the 1.5B Q4_K_M's perplexity (bench_ppl.py) from 1.0037x to 1.0006x the dequantized fp32
 *   reference's (llama.cpp, with q8_K blocks: 1.0038x).
 * Every block's dot product is then an exact integer S (for the K types, the sub-blocks' sums times their integer
 * scales), and each (activation row, weight row) result is the fp32 chain
 *     acc = fma((float)S_b, d_w,b * d_x,b, acc)    for blocks b = 0, 1, ... in order
 * (Q4_K also acc = acc - (float)M_b * (dmin_w,b * d_x,b), fused, M_b its minimums times the activation's sums):
 * the only rounding besides the activation quantization. The chain is the same in every kernel below, so a row of
 * the result does not depend on the other rows, on the tile it falls in, or on the ISA build.
 *
 * Kernels (ggml_panel.c, ggml_panel_k.c, ggml_stream.c, ggml_stream_rows.c): longer passes pack PANEL weight rows
 * (16 on the avx512 build, 8 on avx2) into a small buffer laid out for the integer dot instruction (4 values of each row
 * per 32-bit lane) and run tiles of activation rows against it, the block sums of 16 weight rows landing in the 16
 * lanes of one register: vpdpbusd on avx512 (VNNI), maddubs + madd on avx2, no horizontal sums. A pass of 1 row
 * (decode) reads each weight row in place from start to end instead and reduces its block sums across lanes; so do
 * passes of 2 rows of the types whose panels lose there (ggml_stream_rows.c: each weight block unpacked once for the
 * pair). Rows of W are split across OpenMP threads in whole panels, a contiguous run of them per thread.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { T_Q4_0 = 2, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14 };
#define QK_K 256

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline int hsum_i32x8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

static inline float absmax8(__m256 mx) {
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

/* the absmax of 32 values */
static inline float absmax32(const float *x) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_setzero_ps();
    for (int k = 0; k < 32; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    return absmax8(mx);
}

/* 16 values times vinv, rounded (cvtps: to nearest even, as lrintf in the default mode) into q; returns their sum.
 * |q| <= 127: the packs never saturate. */
static inline int quantize16(const float *x, __m256 vinv, int8_t *q) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), vinv));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), vinv));
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  /* 16 int16 in order */
    _mm_storeu_si128((__m128i *)q, _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
    return hsum_i32x8(_mm256_add_epi32(a, b));
}

/* One 32-value activation block (Q5_0 / Q8_0 weights) -> q, *sum (the sum of q); returns d = absmax / 127. */
static float quantize_block32(const float *x, int8_t *q, int16_t *sum) {
    const float amax = absmax32(x);
    const __m256 vinv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    *sum = (int16_t)(quantize16(x, vinv, q) + quantize16(x + 16, vinv, q + 16));
    return amax / 127.0f;
}

/* Activation blocks of the K types: 256 values, then KSUMS int16: [0, 16) the sums of q per 16 values (each times
 * 2^e of its 32), [16, 24) the 8 exponents e, [24, 32) the 8 factors 2^e, [32, 48) the factors once per 16 values
 * (the Q6_K kernels' lanes). KEXP = 3 keeps every integer sum exact in int32 (Q6_K's sub-block sums of 16 x 31 x 127
 * times scales up to 128, over 16 sub-blocks: < 2^27 before the shift) and the shifted sums per 32 values within
 * int16 (Q4_K's minimums multiply them as int16 pairs: 32 x 127 x 8 < 2^15). */
#define KSUMS 48
#define KEXP 3

/* One K-type activation block (256 values at x) -> q, sums (KSUMS int16, see above); returns d = A / 127 / 2^KEXP. */
static float quantize_block_k(const float *x, int8_t *q, int16_t *sums) {
    float a[8], amax = 0.0f;
    for (int j = 0; j < 8; j++) {
        a[j] = absmax32(x + 32 * j);
        amax = a[j] > amax ? a[j] : amax;
    }
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int j = 0; j < 8; j++) {
        int k = 0;
        while (k < KEXP && a[j] * (float)(2 << k) <= amax) k++;
        const int e = KEXP - k;
        const __m256 vinv = _mm256_set1_ps(inv * (float)(1 << k));  /* exact: a power of two */
        sums[16 + j] = (int16_t)e;
        sums[24 + j] = sums[32 + 2 * j] = sums[33 + 2 * j] = (int16_t)(1 << e);
        for (int h = 0; h < 2; h++)  /* |sum << e| <= 16 x 127 x 8 */
            sums[2 * j + h] = (int16_t)(quantize16(x + 32 * j + 16 * h, vinv, q + 32 * j + 16 * h) << e);
    }
    return amax / 127.0f * (1.0f / (float)(1 << KEXP));
}

/* A weight block unpacked once and then dotted with every activation row: quants as bytes, the integer scales
 * (and Q4_K's minimums) of its sub-blocks, and its fp16 scale(s) as floats. */
typedef struct {
    uint8_t u[QK_K];
    int sc[16], mn[8];
    float d, dmin;
} Block;

/* Q4_K: d, dmin (f16), 12 bytes of 6-bit (scale, min) pairs, 128 bytes of nibbles; 8 sub-blocks of 32 */
static void unpack_q4_k(const uint8_t *b, Block *k) {
    const uint8_t *s = b + 4, *qs = b + 16;
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            k->u[64 * c + l] = qs[32 * c + l] & 0x0F;
            k->u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            k->sc[j] = s[j] & 63;
            k->mn[j] = s[j + 4] & 63;
        } else {
            k->sc[j] = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
            k->mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    k->d = f16(b), k->dmin = f16(b + 2);
}

/* Q6_K: ql[128] low nibbles, qh[64] high crumbs, 16 int8 scales, d (f16); value (q6 - 32) * d * scale per 16 */
static void unpack_q6_k(const uint8_t *b, Block *k) {
    const uint8_t *ql = b, *qh = b + 128;
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t lo0 = ql[64 * h + l], lo1 = ql[64 * h + 32 + l], hi = qh[32 * h + l];
            k->u[128 * h + l] = (lo0 & 0x0F) | ((hi & 3) << 4);
            k->u[128 * h + 32 + l] = (lo1 & 0x0F) | (((hi >> 2) & 3) << 4);
            k->u[128 * h + 64 + l] = (lo0 >> 4) | (((hi >> 4) & 3) << 4);
            k->u[128 * h + 96 + l] = (lo1 >> 4) | (((hi >> 6) & 3) << 4);
        }
    for (int i = 0; i < 16; i++) k->sc[i] = ((const int8_t *)(b + 192))[i];
    k->d = f16(b + 208);
}

/* Q5_0: d (f16), 32 high bits, 16 bytes of nibbles; value (q5 - 16) * d. Value j < 16 is byte j's low nibble,
 * value j + 16 its high one; bit j of the 32 high bits is value j's fifth bit (0x10). */
static inline __m256i fifth_bits(uint32_t qh) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(0x10));
#else
    /* byte j <- byte j / 8 of qh, then keep bit j % 8: all-ones where set, 0x10 of that */
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
                                               _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                                  0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
#endif
}

static void unpack_q5_0(const uint8_t *b, Block *k) {
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const __m128i qs = _mm_loadu_si128((const __m128i *)(b + 6)), low = _mm_set1_epi8(0x0F);
    const __m256i nibbles = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), low), _mm_and_si128(qs, low));
    _mm256_storeu_si256((__m256i *)k->u, _mm256_or_si256(nibbles, fifth_bits(qh)));
    k->d = f16(b);
}

/* Q8_0: d (f16), 32 int8; kept signed (u holds the bytes as they are) */
static void unpack_q8_0(const uint8_t *b, Block *k) {
    memcpy(k->u, b + 2, 32);
    k->d = f16(b);
}

typedef void (*unpack_fn)(const uint8_t *, Block *);

/* block size (values), block bytes, activation sums per block, unpack, dot; 0 for a type this file does not run */
static int ggml_layout(int type, int *qk, int *bytes, int *nsums, unpack_fn *un) {
    switch (type) {
    case T_Q4_K: *qk = QK_K, *bytes = 144, *nsums = 16, *un = unpack_q4_k; return 1;
    case T_Q6_K: *qk = QK_K, *bytes = 210, *nsums = 16, *un = unpack_q6_k; return 1;
    case T_Q5_0: *qk = 32, *bytes = 22, *nsums = 1, *un = unpack_q5_0; return 1;
    case T_Q8_0: *qk = 32, *bytes = 34, *nsums = 1, *un = unpack_q8_0; return 1;
    default: return 0;
    }
}

/* Supported weight type? (ggml type id) */
int ggml_dot_supports(int type) {
    int qk, bytes, nsums;
    unpack_fn un;
    return ggml_layout(type, &qk, &bytes, &nsums, &un);
}

/* out[j] (n values) = the weight row ids[j] of W (rows of n values as ggml blocks of `type`), dequantized:
 * the embedding lookup. Returns 0, or -1 for an unsupported type or n not a multiple of the block. */
int ggml_dequantize_rows(int type, const uint8_t *w, int n, const int64_t *ids, int count, float *out) {
    int qk, bytes, nsums;
    unpack_fn un;
    if (!ggml_layout(type, &qk, &bytes, &nsums, &un) || n % qk) return -1;
    const int nb = n / qk;
    for (int j = 0; j < count; j++) {
        const uint8_t *row = w + (size_t)ids[j] * nb * bytes;
        float *o = out + (size_t)j * n;
        Block k;
        for (int b = 0; b < nb; b++) {
            un(row + (size_t)b * bytes, &k);
            float *ob = o + (size_t)b * qk;
            for (int v = 0; v < qk; v++) {
                switch (type) {
                case T_Q4_K: ob[v] = k.d * (float)k.sc[v / 32] * k.u[v] - k.dmin * (float)k.mn[v / 32]; break;
                case T_Q6_K: ob[v] = k.d * (float)(k.sc[v / 16] * (k.u[v] - 32)); break;
                case T_Q5_0: ob[v] = k.d * (float)(k.u[v] - 16); break;
                default: ob[v] = k.d * (float)(int8_t)k.u[v]; break;
                }
            }
        }
    }
    return 0;
}

/* For the fused forward (forward.c includes this file) and ggml_matmul: activation rows quantized once per pass and
 * weight type family (q: R x n int8, d: one scale per block, sums: KSUMS per block (K types) or one per 32 values); the panel
 * kernels then take the same steps for both, so both give the same bits. */
static __attribute__((unused)) int ggml_block_values(int type) { return type == T_Q4_K || type == T_Q6_K ? QK_K : 32; }
/* Bytes per block of the kernels' weight types (Q5_0, Q8_0, Q4_K, Q6_K). */
static inline __attribute__((unused)) int ggml_block_bytes(int type) {
    return type == T_Q5_0 ? 22 : type == T_Q8_0 ? 34 : type == T_Q4_K ? 144 : 210;
}

static void ggml_quantize_rows(const float *x, int R, int n, int qk, int8_t *q, float *d, int16_t *sums) {
    const int nb = n / qk;
    for (int i = 0; i < R; i++)
        for (int b = 0; b < nb; b++) {
            const size_t at = (size_t)i * nb + b;
            const float *xb = x + (size_t)i * n + (size_t)b * qk;
            d[at] = qk == QK_K ? quantize_block_k(xb, q + at * qk, sums + at * KSUMS)
                               : quantize_block32(xb, q + at * qk, sums + at);
        }
}


#include "ggml_panel.c"  /* the matmuls: packed panels of weight rows */

/* out[i * rows + r] = x[i * n ..] . W-row r for i < m; W: rows x n values as ggml blocks of `type`.
 * Returns 0, or -1 for an unsupported type, n not a multiple of the block, or no memory. */
int ggml_matmul(int type, const uint8_t *w, int rows, int n, const float *x, int m, float *out) {
    int qk, bytes, nsums;
    unpack_fn un;
    if (!ggml_layout(type, &qk, &bytes, &nsums, &un) || n % qk || rows < 0 || m < 0) return -1;
    const int nb = n / qk;
    int8_t *q = malloc((size_t)m * n + 1);
    float *d = malloc(sizeof(float) * (size_t)m * nb + 1);
    int16_t *sums = malloc(sizeof(int16_t) * (size_t)m * nb * KSUMS + 1);
    int32_t *off = malloc(sizeof(int32_t) * (size_t)m * nb * KOFF + 1);
    int failed = !q || !d || !sums || !off;
    if (!failed) {
        ggml_quantize_rows(x, m, n, qk, q, d, sums);
        if (qk == 32) panel_offsets(sums, m, nb, off);
        else panel_offsets_k(sums, m, nb, off);
    }
    if (!failed) {
#pragma omp parallel
        {
            uint8_t *buf = malloc(panel_bytes(n) + 64);
            if (!buf) {
#pragma omp atomic write
                failed = 1;
            }
            /* each thread one contiguous run of panels, as the fused forward's claimed chunks are: the prefetches
             * of the panels ahead (panel_run) work within a run */
            const int panels = (rows + PANEL - 1) / PANEL, nt = omp_get_num_threads(), t = omp_get_thread_num();
            const int p0 = (int)((long)panels * t / nt) * PANEL, p1 = (int)((long)panels * (t + 1) / nt) * PANEL;
            if (buf && p0 < p1)
                panel_matmul(type, w, rows, n, q, d, off, sums, 0, m, p0, p1 < rows ? p1 : rows, p0,
                             p1 < rows ? p1 : rows, out + p0, rows, buf);
            free(buf);
        }
    }
    free(q), free(d), free(sums), free(off);
    return failed ? -1 : 0;
}
