/* Matmuls on ggml's own weight blocks (Q4_K, Q6_K, Q5_0, Q8_0), against activations quantized to 8 bits per block.
 *
 * out[i][r] = x_i . W-row r, where W is the file's bytes (rows of blocks, unchanged) and x_i is first quantized:
 *   - for Q4_K / Q6_K weights (256-value super-blocks): per 256 values, scale d = absmax / 127, q = round(x / d)
 *     in [-127, 127], plus the sum of q over each 16 values (to fold the weights' offsets: Q4_K's minimums,
 *     Q6_K's -32) — the layout of ggml's q8_K activation blocks, written here from the format;
 *   - for Q5_0 / Q8_0 weights (32-value blocks): per 32 values, d = absmax / 127, q as above, and the sum of q.
 * Every block's dot product is then an exact integer sum of (unsigned weight quant) x (signed activation quant)
 * products, scaled once in fp32 per (sub-)block: the only rounding besides the activation quantization is the fp32
 * accumulation of those per-block terms, in block order. A row of the result does not depend on the other rows.
 *
 * The integer dot products run on 16 / 32 bytes at a time for the build's ISA (qwen25.kernels.isa): maddubs + madd
 * on the avx2 build, vpdpbusd on the avx512 (VNNI) one; the weight quants are unpacked to bytes per block first
 * (Q5_0's fifth bits by a byte shuffle + compare on avx2, a mask move on avx512). Rows of W are split across OpenMP threads;
 * each weight row is read once for all activation rows (decode: 1 row; batches and tiles: a few).
 */
#include <immintrin.h>
#include <math.h>
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

/* one activation block: n values -> q (int8), returns the scale; sums[k] = sum of q over each `sub` values */
static float quantize_block(const float *x, int n, int sub, int8_t *q, int16_t *sums) {
    float amax = 0.0f;
    for (int k = 0; k < n; k++) amax = fmaxf(amax, fabsf(x[k]));
    float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int k = 0; k < n; k++) q[k] = (int8_t)lrintf(x[k] * inv);
    for (int s = 0; s < n / sub; s++) {
        int t = 0;
        for (int k = 0; k < sub; k++) t += q[s * sub + k];
        sums[s] = (int16_t)t;
    }
    return d;
}

static inline int hsum_i32x8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* sum of u[k] * s[k] over 32 bytes (u unsigned, s signed): exact, as u[k] * s[k] pairs fit int16 unsaturated for
 * every caller (u <= 128, |s| <= 127) */
static inline int dot32_u8_s8(const uint8_t *u, const int8_t *s) {
    const __m256i a = _mm256_loadu_si256((const __m256i *)u), b = _mm256_loadu_si256((const __m256i *)s);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return hsum_i32x8(_mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b));
#else
    return hsum_i32x8(_mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

static inline int dot16_u8_s8(const uint8_t *u, const int8_t *s) {
    const __m128i a = _mm_loadu_si128((const __m128i *)u), b = _mm_loadu_si128((const __m128i *)s);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    __m128i t = _mm_dpbusd_epi32(_mm_setzero_si128(), a, b);
#else
    __m128i t = _mm_madd_epi16(_mm_maddubs_epi16(a, b), _mm_set1_epi16(1));
#endif
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    return _mm_cvtsi128_si32(t);
}

/* signed x signed over 32 bytes: |a| times b with a's sign moved onto b, in registers */
static inline int dot32_s8_s8(const int8_t *a, const int8_t *b) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)a), y = _mm256_loadu_si256((const __m256i *)b);
    const __m256i u = _mm256_abs_epi8(x), s = _mm256_sign_epi8(y, x);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return hsum_i32x8(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s));
#else
    return hsum_i32x8(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
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

static float dot_q4_k(const Block *k, const int8_t *q, float dx, const int16_t *sums) {
    float acc = 0.0f, mins = 0.0f;
    for (int j = 0; j < 8; j++) {
        acc += (float)(k->sc[j] * dot32_u8_s8(k->u + 32 * j, q + 32 * j));
        mins += (float)(k->mn[j] * (sums[2 * j] + sums[2 * j + 1]));
    }
    return dx * (k->d * acc - k->dmin * mins);
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

static float dot_q6_k(const Block *k, const int8_t *q, float dx, const int16_t *sums) {
    float acc = 0.0f;
    for (int i = 0; i < 16; i++) acc += (float)(k->sc[i] * (dot16_u8_s8(k->u + 16 * i, q + 16 * i) - 32 * sums[i]));
    return dx * k->d * acc;
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

static float dot_q5_0(const Block *k, const int8_t *q, float dx, const int16_t *sums) {
    return dx * k->d * (float)(dot32_u8_s8(k->u, q) - 16 * sums[0]);
}

/* Q8_0: d (f16), 32 int8; kept signed (u holds the bytes as they are) */
static void unpack_q8_0(const uint8_t *b, Block *k) {
    memcpy(k->u, b + 2, 32);
    k->d = f16(b);
}

static float dot_q8_0(const Block *k, const int8_t *q, float dx, const int16_t *sums) {
    (void)sums;
    return dx * k->d * (float)dot32_s8_s8((const int8_t *)k->u, q);
}

typedef void (*unpack_fn)(const uint8_t *, Block *);
typedef float (*dot_fn)(const Block *, const int8_t *, float, const int16_t *);

/* block size (values), block bytes, activation sums per block, unpack, dot; 0 for a type this file does not run */
static int ggml_layout(int type, int *qk, int *bytes, int *nsums, unpack_fn *un, dot_fn *fn) {
    switch (type) {
    case T_Q4_K: *qk = QK_K, *bytes = 144, *nsums = 16, *un = unpack_q4_k, *fn = dot_q4_k; return 1;
    case T_Q6_K: *qk = QK_K, *bytes = 210, *nsums = 16, *un = unpack_q6_k, *fn = dot_q6_k; return 1;
    case T_Q5_0: *qk = 32, *bytes = 22, *nsums = 1, *un = unpack_q5_0, *fn = dot_q5_0; return 1;
    case T_Q8_0: *qk = 32, *bytes = 34, *nsums = 1, *un = unpack_q8_0, *fn = dot_q8_0; return 1;
    default: return 0;
    }
}

/* Supported weight type? (ggml type id) */
int ggml_dot_supports(int type) {
    int qk, bytes, nsums;
    unpack_fn un;
    dot_fn fn;
    return ggml_layout(type, &qk, &bytes, &nsums, &un, &fn);
}

/* acc[i] = activation row i . this weight row: each block unpacked once and dotted with every activation row,
 * the per-block terms summed in block order */
#define ROW_LOOP(UNPACK, DOT)                                                                                         \
    do {                                                                                                              \
        for (int i = 0; i < m; i++) acc[i] = 0.0f;                                                                    \
        for (int b = 0; b < nb; b++) {                                                                                \
            UNPACK(row + (size_t)b * bytes, &blk);                                                                    \
            for (int i = 0; i < m; i++) {                                                                             \
                const size_t at = (size_t)i * nb + b;                                                                 \
                acc[i] += DOT(&blk, q + at * qk, d[at], sums + at * nsums);                                           \
            }                                                                                                         \
        }                                                                                                             \
    } while (0)

/* out[i * rows + r] = x[i * n ..] . W-row r for i < m; W: rows x n values as ggml blocks of `type`.
 * Returns 0, or -1 for an unsupported type, n not a multiple of the block, or no memory. */
int ggml_matmul(int type, const uint8_t *w, int rows, int n, const float *x, int m, float *out) {
    int qk, bytes, nsums;
    unpack_fn un;
    dot_fn fn;
    if (!ggml_layout(type, &qk, &bytes, &nsums, &un, &fn) || n % qk || rows < 0 || m < 0) return -1;
    const int nb = n / qk;
    const size_t row_bytes = (size_t)nb * bytes;
    int8_t *q = malloc((size_t)m * n);
    float *d = malloc(sizeof(float) * (size_t)m * nb + 1);
    int16_t *sums = malloc(sizeof(int16_t) * (size_t)m * nb * nsums + 1);
    if (!q || !d || !sums) {
        free(q), free(d), free(sums);
        return -1;
    }
    for (int i = 0; i < m; i++)
        for (int b = 0; b < nb; b++) {
            const size_t at = (size_t)i * nb + b;
            d[at] = quantize_block(x + (size_t)i * n + (size_t)b * qk, qk, qk / nsums, q + at * qk, sums + at * nsums);
        }
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        Block blk;
        float *acc = malloc(sizeof(float) * (size_t)m + 1);
        failed = acc == NULL;
#pragma omp for schedule(static)
        for (int r = 0; r < rows; r++) {
            if (failed) continue;
            const uint8_t *row = w + (size_t)r * row_bytes;
            switch (type) {  /* one loop per type, so its unpack and dot inline (no call per block) */
            case T_Q4_K: ROW_LOOP(unpack_q4_k, dot_q4_k); break;
            case T_Q6_K: ROW_LOOP(unpack_q6_k, dot_q6_k); break;
            case T_Q5_0: ROW_LOOP(unpack_q5_0, dot_q5_0); break;
            default: ROW_LOOP(unpack_q8_0, dot_q8_0); break;
            }
            for (int i = 0; i < m; i++) out[(size_t)i * rows + r] = acc[i];
        }
        free(acc);
    }
    free(q), free(d), free(sums);
    return failed ? -1 : 0;
}

/* out[j] (n values) = the weight row ids[j] of W (rows of n values as ggml blocks of `type`), dequantized:
 * the embedding lookup. Returns 0, or -1 for an unsupported type or n not a multiple of the block. */
int ggml_dequantize_rows(int type, const uint8_t *w, int n, const int64_t *ids, int count, float *out) {
    int qk, bytes, nsums;
    unpack_fn un;
    dot_fn fn;
    if (!ggml_layout(type, &qk, &bytes, &nsums, &un, &fn) || n % qk) return -1;
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

/* For the fused forward (forward.c includes this file): activation rows quantized once per pass and weight type
 * family (q: R x n int8, d: one scale per block, sums: per 16 (K types) or 32 values), and one weight row
 * against activation rows [m_lo, m_hi): out[(i - m_lo) * ldo] = x_i . W-row, with the same per-block terms
 * in the same order as ggml_matmul, so both give the same bits. */
static int ggml_block_values(int type) { return type == T_Q4_K || type == T_Q6_K ? QK_K : 32; }

static void ggml_quantize_rows(const float *x, int R, int n, int qk, int8_t *q, float *d, int16_t *sums) {
    const int nb = n / qk, nsums = qk == QK_K ? 16 : 1;
    for (int i = 0; i < R; i++)
        for (int b = 0; b < nb; b++) {
            const size_t at = (size_t)i * nb + b;
            d[at] = quantize_block(x + (size_t)i * n + (size_t)b * qk, qk, qk / nsums, q + at * qk, sums + at * nsums);
        }
}

static void ggml_row_dot(int type, const uint8_t *row, int n, const int8_t *xq, const float *xd,
                         const int16_t *xsums, int m_lo, int m_hi, float *out, long ldo) {
    int qk = 32, bytes = 34, nsums = 1;
    unpack_fn un;
    dot_fn fn;
    ggml_layout(type, &qk, &bytes, &nsums, &un, &fn);
    const int nb = n / qk, m = m_hi - m_lo;
    const int8_t *q = xq + (size_t)m_lo * n;
    const float *d = xd + (size_t)m_lo * nb;
    const int16_t *sums = xsums + (size_t)m_lo * nb * nsums;
    float acc[64];
    Block blk;
    switch (type) {
    case T_Q4_K: ROW_LOOP(unpack_q4_k, dot_q4_k); break;
    case T_Q6_K: ROW_LOOP(unpack_q6_k, dot_q6_k); break;
    case T_Q5_0: ROW_LOOP(unpack_q5_0, dot_q5_0); break;
    default: ROW_LOOP(unpack_q8_0, dot_q8_0); break;
    }
    for (int i = 0; i < m; i++) out[(size_t)i * ldo] = acc[i];
}
