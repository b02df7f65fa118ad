/* The whole Qwen2 forward pass in one native call, on a GGUF file's own blocks (ggml_dot.c) or on q8 / q4 weights.
 *
 * Decode steps, speculative verification passes and short prompt chunks process 1..~32 rows; in PyTorch such a
 * step is ~45 small ops per layer whose dispatch and thread wake-ups cost as much as reading the weights. Here
 * one OpenMP parallel region runs every layer: each thread keeps its own copy of the residual stream (cheap,
 * identical on every thread), the matmuls split their output rows between threads, and six barriers per
 * layer separate the phases (team_barrier.c: a bounded spin, then sleep). Rows are (token, position,
 * sequence): a row attends to positions 0..pos of its sequence in the KV cache, after every row's key/value
 * has been written, so several rows of one sequence (a prompt chunk, draft tokens) are causal without a mask.
 * The cache is either contiguous per sequence or paged through a block table (see KVView).
 *
 * Matmuls never convert weights to fp32. For int8 weights, each group of activations (the weight group) is
 * quantized to 129 levels and stored as unsigned bytes, and `maddubs_epi16` multiplies 32 of them with 32
 * weights in one instruction: 3 instructions per 32 weights (see tile8). For 4-bit weights, activations are
 * int16 with one scale per row (absmax / 32767), multiplied with the unpacked codes by `madd_epi16` (tile4).
 * Integer sums are exact and scaled once per weight group; tiles of 8 (int8) or 4 (4-bit) activation rows x 2
 * weight rows make long chunks compute-efficient. Everything else is fp32 and follows
 * qwen25.model: RMSNorm, half-split RoPE with cos/sin given by the caller, softmax, SiLU(gate) * up. Each
 * row's result does not depend on the other rows in the call.
 *
 * The KV cache stores fp32, fp16 or bf16 values (KVView.dtype). A row's key (after RoPE) and value are rounded
 * to the cache's dtype when written (fp16: F16C's round-to-nearest-even; bf16: round-to-nearest-even on the bits,
 * as torch's conversion), and attention (dense_attention.c) reads every cached vector back through that dtype,
 * widened to fp32 in a per-thread scratch buffer (a tile of 64 keys and values at a time, for all the query heads of
 * a block of rows that share its KV head), so scores, softmax and value sums run in fp32 with the same
 * instructions for every dtype.
 */
#include <math.h>
#include <stddef.h>
#include <omp.h>
#include <string.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include "ggml_dot.c"  /* matmuls on the GGUF file's own blocks (bits 0 below) */
#include "team_barrier.c"  /* team_wait: the barriers between the phases of a layer */

static inline float hsum256(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

/* A weight matrix (N, K) in one of three formats, with `group` consecutive weights of a row per scale:
 *   bits 0: w the GGUF tensor's bytes, rows of ggml blocks of `ggml_type` (Q4_K, Q6_K, Q5_0, Q8_0; ggml_dot.c),
 *           activations quantized to int8 per block of the type (32 or 256 values); s, mins, group unused
 *   bits 8: w int8 (N, K), s fp32 (N, K / group); w = s * q; wsum int32 (N, K / group): each group's sum of q
 *   bits 4: w uint8 (N, K / 2), byte j of a row holding codes 2j (low nibble) and 2j + 1 (high nibble);
 *           s and mins fp16 (N, K / group); w = s * code + min */
typedef struct {
    int bits;
    const void *w, *s;
    const uint16_t *mins;
    const float *bias;   /* (N,) or NULL */
    int group, N, K;
    const int32_t *wsum; /* bits 8 only */
    int ggml_type;       /* bits 0 only */
} QMat;

typedef struct {
    const float *input_norm, *post_norm;
    QMat qkv[3];   /* row blocks (the later ones may be empty, N = 0): q (H*D), k (Hkv*D), v (Hkv*D) */
    QMat o;
    QMat gate_up;  /* rows: gate (I), up (I); or gate only when `up` is not empty */
    QMat up;       /* N = 0, or the up rows (I) as their own matrix (GGUF blocks: gate and up are two tensors) */
    QMat down;
} QLayer;

typedef struct {
    int n_layers, hidden, n_heads, n_kv_heads, head_dim, intermediate, vocab;
    float eps;
    const QLayer *layers;
    QMat embed;
    const float *final_norm;
    QMat lm_head;
} QModel;

enum { KV_F32 = 0, KV_F16 = 1, KV_BF16 = 2 };  /* KVView.dtype */

typedef struct {
    void *k, *v;                                      /* cache bases, elements of `dtype` */
    long layer_stride, seq_stride, head_stride;       /* in elements; a position's vector is head_dim elements */
    const int32_t *tables;                            /* (n_seqs, table_width) block ids, or NULL: slot = position */
    int table_width, block_size;
    int dtype;                                        /* KV_F32, KV_F16 or KV_BF16 */
} KVView;

static inline long slot_of(const KVView *kv, int seq, int pos) {
    if (!kv->tables) return pos;
    return (long)kv->tables[(long)seq * kv->table_width + pos / kv->block_size] * kv->block_size + pos % kv->block_size;
}

/* Element offset of (layer, seq, head, pos)'s vector from a cache base. */
static inline long kv_offset(const KVView *kv, int layer, int seq, int head, int pos, int D) {
    return layer * kv->layer_stride + seq * kv->seq_stride + head * kv->head_stride + slot_of(kv, seq, pos) * D;
}

/* fp32 -> bf16, round to nearest even on the bits (NaN -> 0x7FC0), as torch converts. */
static inline __m128i bf16_from8(__m256 x) {
    __m256i b = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* Write D fp32 values (D a multiple of 8) to the cache at element `at`, rounded to its dtype. */
static void kv_store(const KVView *kv, void *base, long at, const float *x, int D) {
    if (kv->dtype == KV_F32) { memcpy((float *)base + at, x, D * sizeof(float)); return; }
    uint16_t *dst = (uint16_t *)base + at;
    for (int d = 0; d < D; d += 8) {
        __m256 v = _mm256_loadu_ps(x + d);
        __m128i h = kv->dtype == KV_F16 ? _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                        : bf16_from8(v);
        _mm_storeu_si128((__m128i *)(dst + d), h);
    }
}

/* Read D 16-bit cache values at element `at` (D a multiple of 8) into fp32 dst (exact widening). */
static inline void kv_widen(const void *base, int dtype, long at, float *dst, int D) {
    const uint16_t *src = (const uint16_t *)base + at;
    for (int d = 0; d < D; d += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + d));
        __m256 f = dtype == KV_F16 ? _mm256_cvtph_ps(h)
                                   : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        _mm256_storeu_ps(dst + d, f);
    }
}

static void rms_norm(const float *x, const float *w, float eps, int n, float *out) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) { __m256 v = _mm256_loadu_ps(x + i); acc = _mm256_fmadd_ps(v, v, acc); }
    float ss = hsum256(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / n + eps);
    for (i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

static void rope(float *x, const float *cos, const float *sin, int D) {
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* e^x for 8 lanes, x clamped to +-88.38 (softmax, SiLU): Cephes' expf range reduction and polynomial. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

/* The largest of x[0 .. n) (-inf for n = 0; NaNs are skipped, as `x > m ? x : m` does). */
static inline float max_of(const float *x, int n) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 8 <= n; t += 8) m8 = _mm256_max_ps(_mm256_loadu_ps(x + t), m8);  /* a NaN lane keeps m8's */
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float m = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; t < n; t++) m = x[t] > m ? x[t] : m;
    return m;
}

/* slots[t] = slot_of(kv, seq, t) for t in [0, P), a block at a time (no division per position). */
static void fill_slots(const KVView *kv, int seq, int P, long *slots) {
    if (!kv->tables) {
        for (int t = 0; t < P; t++) slots[t] = t;
        return;
    }
    const int bs = kv->block_size;
    const int32_t *table = kv->tables + (long)seq * kv->table_width;
    for (int t0 = 0, b = 0; t0 < P; t0 += bs, b++) {
        const long base = (long)table[b] * bs;
        const int n = P - t0 < bs ? P - t0 : bs;
        for (int j = 0; j < n; j++) slots[t0 + j] = base + j;
    }
}

#include "sparse_attention.c"  /* sparse prefill: MInference's vertical-slash pattern (SparseArgs) */
#include "dense_attention.c"   /* causal attention of a block of rows per KV head (dense_attend) */

/* a[n] = silu(a[n]) * u[n] for n < count: 8 lanes at a time, the tail in scalars (the same steps wherever a value
 * falls, since every caller starts its runs at a multiple of 8) */
static void silu_mul(float *a, const float *u, int count) {
    int n = 0;
    for (; n + 8 <= count; n += 8) {
        __m256 g8 = _mm256_loadu_ps(a + n);
        __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g8)));
        _mm256_storeu_ps(a + n, _mm256_mul_ps(_mm256_div_ps(g8, den), _mm256_loadu_ps(u + n)));
    }
    for (; n < count; n++) a[n] = a[n] / (1.0f + expf(-a[n])) * u[n];
}

/* This thread's share [n0, n1) of N output rows, split in equal contiguous chunks. */
static inline void share(int N, int tid, int nt, int *n0, int *n1) {
    *n0 = (int)((long)N * tid / nt);
    *n1 = (int)((long)N * (tid + 1) / nt);
}

/* The activation rows (R, K) of a matmul, quantized on demand for the weights that take them:
 * - 4-bit weights: q (R, K) int16 with one fp32 scale per row s (R,) (absmax / 32767), plus qp, each block of
 *   32 values reordered to the order of the nibbles (see reorder64), and bsum, each weight group's sum of q, row
 *   r's at bsum + r * K / 32 (has_q16: q and s made; has_q4: qp and bsum made for that group size, 0: not yet);
 * - int8 weights: u (R, K) bytes, each group of `has_u` values quantized to q in [-64, 64] with the scale
 *   absmax / 64 and stored as q + 64, and the scales us (K / has_u, R), group-major. */
typedef struct {
    const float *src;
    int K, R;
    int16_t *q, *qp;
    float *s, *bsum;
    int has_q16, has_q4;
    uint8_t *u;
    float *us;
    int has_u;
    int8_t *g8;      /* GGUF-block weights: int8 per block of has_g values, scales gd, sums gsum (see ggml_dot.c) */
    float *gd;
    int16_t *gsum;
    int32_t *goff;   /* 32-value blocks: the panel kernels' initial sums (panel_offsets) */
    int has_g;
    uint8_t *panel;  /* this thread's packed-panel scratch (ggml_panel.c) */
    int shared, tid, nt;  /* shared: g8 .. goff are one copy for all threads, each quantizing its share of rows */
    TeamBarrier *bar;     /* the team's barrier, and this thread's spin budget for it (team_barrier.c) */
    long *spin;
} QAct;

/* Point a at new rows x (R, K); nothing is quantized until a matmul asks for it. */
static void set_rows(const float *x, int R, int K, QAct *a) {
    a->src = x;
    a->R = R;
    a->K = K;
    a->has_q16 = a->has_q4 = a->has_u = a->has_g = 0;
}

#define SHARED_QUANT_ROWS 32  /* passes of this many rows quantize GGUF-block activations once for all threads */

/* Every thread calls this with the same arguments (the rows are the same on every thread). Shared (long passes):
 * the threads quantize disjoint rows into one copy between two barriers (the first: no thread still reads the
 * previous input's copy); otherwise each thread quantizes all rows into its own. The bits are the same. */
static void prepare_g(QAct *a, int ggml_type) {
    const int qk = ggml_block_values(ggml_type);
    if (a->has_g == qk) return;
    const int nb = a->K / qk, nsums = qk == QK_K ? 16 : 1, noff = qk == QK_K ? KOFF : 2;
    int r0 = 0, r1 = a->R;
    if (a->shared) {
        share(a->R, a->tid, a->nt, &r0, &r1);
        team_wait(a->bar, a->nt, a->spin);
    }
    ggml_quantize_rows(a->src + (size_t)r0 * a->K, r1 - r0, a->K, qk, a->g8 + (size_t)r0 * a->K,
                       a->gd + (size_t)r0 * nb, a->gsum + (size_t)r0 * nb * nsums);
    if (qk == 32) panel_offsets(a->gsum + (size_t)r0 * nb, r1 - r0, nb, a->goff + (size_t)r0 * nb * noff);
    else panel_offsets_k(a->gsum + (size_t)r0 * nb * nsums, r1 - r0, nb, a->goff + (size_t)r0 * nb * noff);
    if (a->shared) team_wait(a->bar, a->nt, a->spin);
    a->has_g = qk;
}

static float absmax(const float *x, int n) {  /* n: a multiple of 8 */
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mx = _mm256_setzero_ps();
    for (int k = 0; k < n; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}

static void prepare_q16(QAct *a) {
    if (a->has_q16) return;
    const int K = a->K;
    for (int r = 0; r < a->R; r++) {
        const float *xr = a->src + (size_t)r * K;
        int16_t *qr = a->q + (size_t)r * K;
        float amax = absmax(xr, K);
        a->s[r] = amax / 32767.0f;
        __m256 inv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
        for (int k = 0; k < K; k += 16) {
            __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), inv));
            __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), inv));
            __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);  /* undo the lane interleave */
            _mm256_storeu_si256((__m256i *)(qr + k), p);
        }
    }
    a->has_q16 = 1;
}

/* u and us for int8 weights with groups of `group` (a multiple of 32) values. */
static void prepare_u8(QAct *a, int group) {
    if (a->has_u == group) return;
    const int K = a->K, G = K / group;
    const __m256i offset = _mm256_set1_epi32(64), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int r = 0; r < a->R; r++)
        for (int g = 0; g < G; g++) {
            const float *xg = a->src + (size_t)r * K + (size_t)g * group;
            uint8_t *ug = a->u + (size_t)r * K + (size_t)g * group;
            float amax = absmax(xg, group);
            a->us[(size_t)g * a->R + r] = amax / 64.0f;
            __m256 inv = _mm256_set1_ps(amax > 0.0f ? 64.0f / amax : 0.0f);
            for (int k = 0; k < group; k += 32) {
                __m256i v[4];
                for (int c = 0; c < 4; c++)
                    v[c] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k + 8 * c), inv)),
                                            offset);
                /* packs / packus interleave the 128-bit lanes: bytes come out as v0[0:4] v1[0:4] v2[0:4] v3[0:4]
                 * v0[4:8] ...; the dword permutation puts them back in order */
                __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
                _mm256_storeu_si256((__m256i *)(ug + k), _mm256_permutevar8x32_epi32(b, order));
            }
        }
    a->has_u = group;
}

/* qp's order for 4-bit weights: 64 values (two 32-blocks) at a time as 4 vectors of 16, vector k holding values
 * 4p + k (p = 0..7) of the first block, then of the second: the order of the nibbles in 16-bit weight lanes. */
static inline void reorder64(const int16_t *src, int16_t *dst) {
    const __m128i pairs = _mm_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
    for (int h = 0; h < 2; h++) {
        __m128i l[4];
        for (int c = 0; c < 4; c++) l[c] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(src + h * 32 + c * 8)), pairs);
        __m128i t0 = _mm_unpacklo_epi32(l[0], l[1]), t1 = _mm_unpacklo_epi32(l[2], l[3]);
        __m128i t2 = _mm_unpackhi_epi32(l[0], l[1]), t3 = _mm_unpackhi_epi32(l[2], l[3]);
        _mm_storeu_si128((__m128i *)(dst + 0 * 16 + h * 8), _mm_unpacklo_epi64(t0, t1));
        _mm_storeu_si128((__m128i *)(dst + 1 * 16 + h * 8), _mm_unpackhi_epi64(t0, t1));
        _mm_storeu_si128((__m128i *)(dst + 2 * 16 + h * 8), _mm_unpacklo_epi64(t2, t3));
        _mm_storeu_si128((__m128i *)(dst + 3 * 16 + h * 8), _mm_unpackhi_epi64(t2, t3));
    }
}

static void prepare_q4(QAct *a, int group) {
    if (a->has_q4 == group) return;
    prepare_q16(a);
    const __m256i ones = _mm256_set1_epi16(1);
    for (long b = 0; b < (long)a->R * a->K / 32; b++) {
        if (b % 2 == 0) reorder64(a->q + b * 32, a->qp + b * 32);
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(a->q + b * 32));
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(a->q + b * 32 + 16));
        __m256i s = _mm256_add_epi32(_mm256_madd_epi16(v0, ones), _mm256_madd_epi16(v1, ones));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        a->bsum[b] = (float)_mm_cvtsi128_si32(s4);
    }
    const int per = group / 32, blocks = a->K / 32;  /* fold block sums into group sums, in place */
    for (int r = 0; r < a->R; r++)
        for (int g = 0; g < blocks / per; g++) {
            float sum = 0.0f;
            for (int b = 0; b < per; b++) sum += a->bsum[(size_t)r * blocks + g * per + b];
            a->bsum[(size_t)r * blocks + g] = sum;
        }
    a->has_q4 = group;
}

/* Decode-sized passes stream each weight row from memory once; they run faster when every stream prefetches its
 * next bytes: one-token decode of the 0.5B went from 27 to 33 tok/s (q8) and from 37 to 45 (q4) with 2 KB ahead
 * (1 KB: 31 / 44; 4 KB: 33 / 45; interleaved runs in one process). The same instructions in the prefill build
 * changed GCC's code for the multi-row tiles and cost prefill 5-20%, so they are compiled only into a second
 * build (QWEN25_PREFETCH=1) that qwen25.model.native uses for passes of up to 16 rows. Results are identical. */
#ifndef QWEN25_PREFETCH
#define QWEN25_PREFETCH 0
#endif
#define PREFETCH_AHEAD 2048

#ifndef MT
#define MT 4  /* activation rows per q4 tile: 4 x 2 fills the 16 ymm registers (measured best of 2-8) */
#endif
#define MT8 8  /* activation rows per q8 tile (8 x 2: see tile8) */

/* acc_i += (sums over adjacent pairs of u_i * [w0 | w1], as int32) for 16 bytes of activation row i broadcast to
 * both halves. In assembly because GCC, given the same steps as intrinsics, reassociates the adds of a fully
 * unrolled group into trees that spill the accumulators (measured 1.2-1.4x slower). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
/* The avx512 build (qwen25.kernels.isa): vpdpbusd multiplies the unsigned and signed bytes and adds each four
 * adjacent products into the int32 lanes in one instruction; the exact sums are the same as below. */
#define U8_ROW(n, A)                                                                                                  \
    "vbroadcasti128 %[u" #n "], %[t]\n\t"                                                                            \
    "vpdpbusd %[w], %[t], %[" #A "]\n\t"
#define DOT_U8_I8(acc, u, w) _mm256_dpbusd_epi32((acc), (u), (w))
#else
#define U8_ROW(n, A)                                                                                                  \
    "vbroadcasti128 %[u" #n "], %[t]\n\t"                                                                            \
    "vpmaddubsw %[w], %[t], %[t]\n\t"                                                                                \
    "vpmaddwd %[ones], %[t], %[t]\n\t"                                                                               \
    "vpaddd %[t], %[" #A "], %[" #A "]\n\t"
/* acc + (each four adjacent products of unsigned u and signed w bytes, summed into int32); u * w pairs fit int16
 * unsaturated wherever this is used (u <= 128, |w| <= 127) */
#define DOT_U8_I8(acc, u, w) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (w)), ones))
#endif

/* out[j][i * ldo[j]] = x[m0 + i] . W-row j for MX activation rows (x prepared by prepare_u8) and NW (1 or 2)
 * int8 weight rows given by pointer, ws / wsum their scales and group sums. maddubs multiplies x's unsigned
 * bytes (q + 64 <= 128) with the int8 weights and adds adjacent products into int16 without saturation
 * (2 * 128 * 127 < 2^15); madd with ones widens to int32. A group's exact sum minus 64 * (the group's weight sum)
 * is the integer dot product of q and the weights; it converts to float (exactly for groups of up to 1024) and
 * is scaled by (x's group scale * the weight group's scale), one fma per group. Every (row, weight row) pair
 * takes these same float steps in every tile shape, so a row's result does not depend on the other rows. */
static inline __attribute__((always_inline)) void tile8(const int8_t *const *w, const float *const *ws,
                                                        const int32_t *const *wsum, int group, const QAct *x, int m0,
                                                        int MX, int NW, float *const *out, const long *ldo) {
    const int K = x->K, G = K / group;
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *ur[MT8];
    for (int i = 0; i < MX; i++) ur[i] = x->u + (size_t)(m0 + i) * K;
    if (MX == 8 && NW == 2) {
        /* Each 16-weight step multiplies [w0 | w1] (16 bytes of each row in the two 128-bit halves) with row i's
         * 16 activation bytes broadcast to both halves: accumulator i holds pair (i, 0) in lanes 0-3 and pair
         * (i, 1) in lanes 4-7, and two rounds of hadd over four accumulators leave the 8 exact group sums of rows
         * 4h..4h+3 in one vector, lanes [(i, 0) x 4 | (i, 1) x 4]: facc[h]. */
        __m256 facc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int g = 0; g < G; g++) {
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, t;
            for (int k = g * group; k < (g + 1) * group; k += 16) {
#if QWEN25_PREFETCH
                if (k % 64 == 0)
                    for (int j = 0; j < 2; j++) _mm_prefetch((const char *)(w[j] + k + PREFETCH_AHEAD), _MM_HINT_T0);
#endif
                __m128i w0 = _mm_loadu_si128((const __m128i *)(w[0] + k)), w1 = _mm_loadu_si128((const __m128i *)(w[1] + k));
                __m256i w01 = _mm256_inserti128_si256(_mm256_castsi128_si256(w0), w1, 1);
                __asm__(U8_ROW(0, a0) U8_ROW(1, a1) U8_ROW(2, a2) U8_ROW(3, a3)
                        U8_ROW(4, a4) U8_ROW(5, a5) U8_ROW(6, a6) U8_ROW(7, a7)
                        : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3), [a4] "+x"(a4), [a5] "+x"(a5),
                          [a6] "+x"(a6), [a7] "+x"(a7), [t] "=&x"(t)
                        : [w] "x"(w01), [ones] "x"(ones), [u0] "m"(*(const __m128i *)(ur[0] + k)),
                          [u1] "m"(*(const __m128i *)(ur[1] + k)), [u2] "m"(*(const __m128i *)(ur[2] + k)),
                          [u3] "m"(*(const __m128i *)(ur[3] + k)), [u4] "m"(*(const __m128i *)(ur[4] + k)),
                          [u5] "m"(*(const __m128i *)(ur[5] + k)), [u6] "m"(*(const __m128i *)(ur[6] + k)),
                          [u7] "m"(*(const __m128i *)(ur[7] + k)));
            }
            __m256i sums[2] = {_mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3)),
                               _mm256_hadd_epi32(_mm256_hadd_epi32(a4, a5), _mm256_hadd_epi32(a6, a7))};
            __m256i corr = _mm256_set_m128i(_mm_set1_epi32(wsum[1][g]), _mm_set1_epi32(wsum[0][g]));
            corr = _mm256_slli_epi32(corr, 6);  /* 64 * the group's weight sum */
            __m256 wsc = _mm256_set_m128(_mm_set1_ps(ws[1][g]), _mm_set1_ps(ws[0][g]));
            for (int h = 0; h < 2; h++) {
                __m256 xs = _mm256_broadcast_ps((const __m128 *)(x->us + (size_t)g * x->R + m0 + 4 * h));
                __m256 dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums[h], corr));
                facc[h] = _mm256_fmadd_ps(dot, _mm256_mul_ps(xs, wsc), facc[h]);
            }
        }
        for (int h = 0; h < 2; h++) {
            float f[8];
            _mm256_storeu_ps(f, facc[h]);
            for (int i = 0; i < 4; i++) {
                out[0][(4 * h + i) * ldo[0]] = f[i];
                out[1][(4 * h + i) * ldo[1]] = f[4 + i];
            }
        }
        return;
    }
    /* Single rows (decode) and odd leftovers. Here x's bytes are turned back into q = u - 64 and multiplied as
     * |q| * (w with q's sign), which needs no weight group sums (one memory stream fewer per weight row); the
     * integer sums, and so the results, are the same. Both weight rows' sums reduce together. */
    for (int i = 0; i < MX; i++) {
        const float *xs = x->us + m0 + i;
        const __m256i off = _mm256_set1_epi8(64);
        __m128 facc = _mm_setzero_ps();  /* lane j: weight row j */
        for (int g = 0; g < G; g++) {
            __m256i acc0 = _mm256_setzero_si256(), acc1 = acc0;
            for (int k = g * group; k < (g + 1) * group; k += 32) {
#if QWEN25_PREFETCH
                if (k % 64 == 0)  /* non-temporal: measured ~5% faster than T0 here (read once, no reuse) */
                    for (int j = 0; j < NW; j++) _mm_prefetch((const char *)(w[j] + k + PREFETCH_AHEAD), _MM_HINT_NTA);
#endif
                __m256i q = _mm256_sub_epi8(_mm256_loadu_si256((const __m256i *)(ur[i] + k)), off);
                __m256i qabs = _mm256_abs_epi8(q);
                __m256i w0 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(w[0] + k)), q);
                acc0 = DOT_U8_I8(acc0, qabs, w0);
                if (NW == 2) {
                    __m256i w1 = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(w[1] + k)), q);
                    acc1 = DOT_U8_I8(acc1, qabs, w1);
                }
            }
            __m256i h = _mm256_hadd_epi32(acc0, acc1);
            __m128i h4 = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            __m128i dot = _mm_hadd_epi32(h4, h4);  /* lanes 0, 1: the two rows' sums */
            __m128 wsc = _mm_unpacklo_ps(_mm_set_ss(ws[0][g]), _mm_set_ss(ws[NW - 1][g]));
            __m128 sc = _mm_mul_ps(_mm_set1_ps(xs[(size_t)g * x->R]), wsc);
            facc = _mm_fmadd_ps(_mm_cvtepi32_ps(dot), sc, facc);
        }
        out[0][i * ldo[0]] = _mm_cvtss_f32(facc);
        if (NW == 2) out[1][i * ldo[1]] = _mm_cvtss_f32(_mm_shuffle_ps(facc, facc, 1));
    }
}

/* The same for 4-bit weights (x prepared by prepare_q4), 64 weights (two 32-blocks, 32 bytes) of a row at a
 * time: the 16-bit lane p of a block holds codes 4p .. 4p + 3 in its four nibbles, taken out by masks as
 * code, 16 * code, 256 * code and (shifted) code, multiplied with qp's matching vectors; the 16x and 256x sums
 * are exact multiples and shift back exactly (|256 * 15 * 32767 * 2| < 2^31, and a step's sum < 2^24 converts to
 * float exactly). Lanes 0-3 of a step's int32 sums belong to the first block, 4-7
 * to the second, each scaled by its group's scale. The min term, sum over groups of min * (sum of the group's
 * x), is a dot product of the row's mins with x's group sums. */
static inline __attribute__((always_inline)) void tile4(const uint8_t *const *w, const uint16_t *const *ws,
                                                        const uint16_t *const *wm, int per, const QAct *x, int m0,
                                                        int MX, int NW, float *const *out, const long *ldo) {
    const int K = x->K, group = 32 * per, G = K / group, B = K / 32;
    const __m256i mask0 = _mm256_set1_epi16(0x000F), mask1 = _mm256_set1_epi16(0x00F0), mask2 = _mm256_set1_epi16(0x0F00);
    __m256 facc[MT][2];
    for (int i = 0; i < MX; i++) for (int j = 0; j < NW; j++) facc[i][j] = _mm256_setzero_ps();
    const __m256i pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    for (int b = 0; b < B; b += 2) {
        __m256 sc[2];  /* lanes 0-3: block b's group scale, 4-7: block b + 1's */
        for (int j = 0; j < NW; j++) {
            __m128i h2;
            if (per == 1) h2 = _mm_loadu_si32(ws[j] + b);  /* the two consecutive fp16 scales */
            else h2 = _mm_insert_epi16(_mm_cvtsi32_si128(ws[j][b / per]), ws[j][(b + 1) / per], 1);
            sc[j] = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(h2)), pair);
        }
        __m256i c0[2], c1[2], c2[2], c3[2];
        for (int j = 0; j < NW; j++) {
#if QWEN25_PREFETCH
            if (b % 4 == 0)  /* non-temporal (read once): q4 decode ~2% faster than with T0 (interleaved runs) */
                _mm_prefetch((const char *)(w[j] + (long)b * 16 + PREFETCH_AHEAD), _MM_HINT_NTA);
#endif
            __m256i v = _mm256_loadu_si256((const __m256i *)(w[j] + (long)b * 16));
            c0[j] = _mm256_and_si256(v, mask0);
            c1[j] = _mm256_and_si256(v, mask1);
            c2[j] = _mm256_and_si256(v, mask2);
            c3[j] = _mm256_srli_epi16(v, 12);
        }
        for (int i = 0; i < MX; i++) {
            const int16_t *xp = x->qp + (size_t)(m0 + i) * K + (size_t)b * 32;
            __m256i x0 = _mm256_loadu_si256((const __m256i *)xp), x1 = _mm256_loadu_si256((const __m256i *)(xp + 16));
            __m256i x2 = _mm256_loadu_si256((const __m256i *)(xp + 32)), x3 = _mm256_loadu_si256((const __m256i *)(xp + 48));
            for (int j = 0; j < NW; j++) {
                __m256i s = _mm256_add_epi32(_mm256_madd_epi16(c0[j], x0), _mm256_madd_epi16(c3[j], x3));
                s = _mm256_add_epi32(s, _mm256_srai_epi32(_mm256_madd_epi16(c1[j], x1), 4));
                s = _mm256_add_epi32(s, _mm256_srai_epi32(_mm256_madd_epi16(c2[j], x2), 8));
                facc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc[j], facc[i][j]);
            }
        }
    }
    for (int i = 0; i < MX; i++) {
        const float *gs = x->bsum + (size_t)(m0 + i) * (K / 32);  /* group sums (see prepare_q4) */
        for (int j = 0; j < NW; j++) {  /* two accumulators: the mins dot product is not one long chain */
            __m256 ma = _mm256_setzero_ps(), mb = _mm256_setzero_ps();
            int g = 0;
            for (; g + 16 <= G; g += 16) {
                ma = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm[j] + g))), _mm256_loadu_ps(gs + g), ma);
                mb = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm[j] + g + 8))), _mm256_loadu_ps(gs + g + 8), mb);
            }
            if (g + 8 <= G) {
                ma = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wm[j] + g))), _mm256_loadu_ps(gs + g), ma);
                g += 8;
            }
            if (g + 4 <= G) {
                __m128 m4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(wm[j] + g)));
                mb = _mm256_add_ps(mb, _mm256_set_m128(_mm_setzero_ps(), _mm_mul_ps(m4, _mm_loadu_ps(gs + g))));
                g += 4;
            }
            float total = hsum256(_mm256_add_ps(facc[i][j], _mm256_add_ps(ma, mb)));
            for (; g < G; g++) total += _cvtsh_ss(wm[j][g]) * gs[g];
            out[j][i * ldo[j]] = total * x->s[m0 + i];
        }
    }
}

/* Weight rows na and nb (nb == na: one row) of W against activation rows [m_lo, m_hi), in tiles of MT8 (int8)
 * or MT (4-bit) rows plus single leftover rows; row na's results go to out[0] and nb's to out[1] (row stride
 * ldo[j]), from activation row m_lo on. */
static void rows_dot(const QMat *W, int na, int nb, const QAct *x, int m_lo, int m_hi, float *const *out,
                     const long *ldo) {
    const int NW = nb == na ? 1 : 2, groups = W->K / W->group;
    const int8_t *w8[2] = {(const int8_t *)W->w + (long)na * W->K, (const int8_t *)W->w + (long)nb * W->K};
    const float *s8[2] = {(const float *)W->s + (long)na * groups, (const float *)W->s + (long)nb * groups};
    const int32_t *ws8[2] = {W->wsum + (long)na * groups, W->wsum + (long)nb * groups};
    const uint8_t *w4[2] = {(const uint8_t *)W->w + (long)na * W->K / 2, (const uint8_t *)W->w + (long)nb * W->K / 2};
    const uint16_t *s4[2] = {(const uint16_t *)W->s + (long)na * groups, (const uint16_t *)W->s + (long)nb * groups};
    const uint16_t *m4[2] = {W->mins + (long)na * groups, W->mins + (long)nb * groups};
    const int mt = W->bits == 8 ? MT8 : MT;
    int m0 = m_lo;
    for (; m0 < m_hi; ) {
        int mx = m_hi - m0 >= mt ? mt : 1;
        float *o[2] = {out[0] + (m0 - m_lo) * ldo[0], out[1] + (m0 - m_lo) * ldo[1]};
        if (W->bits == 4 && W->group == 32) {  /* the default q4 group: a constant, so the block loop unrolls */
            if (mx == MT) { if (NW == 2) tile4(w4, s4, m4, 1, x, m0, MT, 2, o, ldo); else tile4(w4, s4, m4, 1, x, m0, MT, 1, o, ldo); }
            else { if (NW == 2) tile4(w4, s4, m4, 1, x, m0, 1, 2, o, ldo); else tile4(w4, s4, m4, 1, x, m0, 1, 1, o, ldo); }
        } else if (W->bits == 4) {
            const int per = W->group / 32;
            if (mx == MT) { if (NW == 2) tile4(w4, s4, m4, per, x, m0, MT, 2, o, ldo); else tile4(w4, s4, m4, per, x, m0, MT, 1, o, ldo); }
            else { if (NW == 2) tile4(w4, s4, m4, per, x, m0, 1, 2, o, ldo); else tile4(w4, s4, m4, per, x, m0, 1, 1, o, ldo); }
        } else if (W->group == 128) {  /* the default q8 group: a constant, so the step loop unrolls */
            if (mx == MT8) { if (NW == 2) tile8(w8, s8, ws8, 128, x, m0, MT8, 2, o, ldo); else tile8(w8, s8, ws8, 128, x, m0, MT8, 1, o, ldo); }
            else { if (NW == 2) tile8(w8, s8, ws8, 128, x, m0, 1, 2, o, ldo); else tile8(w8, s8, ws8, 128, x, m0, 1, 1, o, ldo); }
        } else {
            if (mx == MT8) { if (NW == 2) tile8(w8, s8, ws8, W->group, x, m0, MT8, 2, o, ldo); else tile8(w8, s8, ws8, W->group, x, m0, MT8, 1, o, ldo); }
            else { if (NW == 2) tile8(w8, s8, ws8, W->group, x, m0, 1, 2, o, ldo); else tile8(w8, s8, ws8, W->group, x, m0, 1, 1, o, ldo); }
        }
        m0 += mx;
    }
}

/* Weight rows per cache block: a block of W stays in L2 while every 4-row tile of x goes past it. */
#define NBLOCK 32

/* y[r, n] = x[r] . W[n] (+ bias[n]) for this thread's rows n. */
/* Activation rows per panel pass: a chunk of quantized rows stays in L2 while the panels go past it. */
static int panel_chunk(int K) {
    const int rows = (512 * 1024 / K) / PANEL_MX * PANEL_MX;
    return rows < PANEL_MX ? PANEL_MX : rows;
}

/* This thread's share [n0, n1) of N rows in whole panels (the last thread takes the remainder). */
static void panel_share(int N, int tid, int nt, int *n0, int *n1) {
    share(N / PANEL, tid, nt, n0, n1);
    *n0 *= PANEL;
    *n1 = tid == nt - 1 ? N : *n1 * PANEL;
}

/* y[r, n] = x[r] . W[n] for GGUF-block weight rows [n0, n1) (ggml_panel.c: packed panels, or rows streamed in
 * place for 1-2 activation rows), activation rows in chunks that stay in L2. */
static void panel_rows(const QMat *W, const QAct *x, int R, int n0, int n1, float *y, long ldy) {
    const int MC = panel_chunk(W->K);
    for (int m0 = 0; m0 < R; m0 += MC)
        panel_matmul(W->ggml_type, (const uint8_t *)W->w, W->N, W->K, x->g8, x->gd, x->goff, x->gsum, m0,
                     R - m0 < MC ? R : m0 + MC, n0, n1, y + (long)m0 * ldy, ldy, x->panel);
}

static void matmul_share(const QMat *W, QAct *x, int R, float *y, int ldy, int tid, int nt) {
    if (W->N == 0) return;
    if (W->bits == 0) {  /* GGUF blocks */
        prepare_g(x, W->ggml_type);
        int n0, n1;
        panel_share(W->N, tid, nt, &n0, &n1);
        panel_rows(W, x, R, n0, n1, y + n0, ldy);
        if (W->bias)
            for (int r = 0; r < R; r++) for (int n = n0; n < n1; n++) y[(long)r * ldy + n] += W->bias[n];
        return;
    }
    if (W->bits == 4) prepare_q4(x, W->group); else prepare_u8(x, W->group);
    int n0, n1;
    share(W->N / 2, tid, nt, &n0, &n1);  /* in pairs of rows */
    n0 *= 2;
    n1 = tid == nt - 1 ? W->N : 2 * n1;
    for (int b0 = n0; b0 < n1; b0 += NBLOCK) {
        int b1 = b0 + NBLOCK < n1 ? b0 + NBLOCK : n1;
        for (int m0 = 0; m0 < R; m0 += 64) {  /* 64-row slices of x keep the x tile traffic in L2 */
            int m1 = R - m0 < 64 ? R : m0 + 64;
            for (int n = b0; n < b1; n += 2) {
                int nb = b1 - n >= 2 ? n + 1 : n;
                float *out[2] = {y + (long)m0 * ldy + n, y + (long)m0 * ldy + nb};
                const long ldo[2] = {ldy, ldy};
                rows_dot(W, n, nb, x, m0, m1, out, ldo);
            }
        }
        if (W->bias)
            for (int r = 0; r < R; r++) for (int n = b0; n < b1; n++) y[(long)r * ldy + n] += W->bias[n];
    }
}

static int max_input(const QModel *m) {
    int k = m->hidden > m->intermediate ? m->hidden : m->intermediate;
    return k > m->n_heads * m->head_dim ? k : m->n_heads * m->head_dim;
}

static size_t up16(size_t n) { return (n + 15) & ~(size_t)15; }  /* 64-byte aligned sub-buffers */

/* Offsets (in floats) into the work buffer: shared buffers, then one private region per thread. */
typedef struct { size_t attn, tmp, act, tiles, priv0, private_, xn, scores, slots, gu, xs, xq, xp, bsum, xu, xus, g8, gd, gsum, goff, panel; } Layout;

static Layout layout(const QModel *m, int R, int max_positions) {
    const size_t h = m->hidden, QW = (size_t)m->n_heads * m->head_dim, KVW = (size_t)m->n_kv_heads * m->head_dim;
    const size_t G = m->n_heads / m->n_kv_heads;
    Layout o;
    o.attn = up16(R * (QW + 2 * KVW));
    o.tmp = o.attn + up16(R * QW);
    o.act = o.tmp + up16(R * h);
    o.tiles = o.act + up16((size_t)R * m->intermediate);
    o.priv0 = o.tiles + up16((size_t)R + 1);               /* ints: the first row of each attention tile */
    o.xn = up16(R * h);                                   /* private: x at 0 */
    o.scores = o.xn + up16(R * h);
    o.slots = o.scores + up16(da_scratch_floats(G, m->head_dim));  /* dense_attend's scratch */
    o.gu = o.slots + up16(2 * (size_t)max_positions);     /* longs */
    o.xs = o.gu + up16((size_t)(R > 64 ? R : 64) * (NBLOCK > PANEL ? NBLOCK : PANEL));
    o.xq = o.xs + up16(R);
    o.xp = o.xq + up16((size_t)R * max_input(m) / 2);       /* int16 */
    o.bsum = o.xp + up16((size_t)R * max_input(m) / 2);
    o.xu = o.bsum + up16((size_t)R * max_input(m) / 32);
    o.xus = o.xu + up16((size_t)R * max_input(m) / 4);    /* bytes */
    o.g8 = o.xus + up16((size_t)R * max_input(m) / 32);
    o.gd = o.g8 + up16((size_t)R * max_input(m) / 4);       /* bytes */
    o.gsum = o.gd + up16((size_t)R * max_input(m) / 32);
    o.goff = o.gsum + up16((size_t)R * max_input(m) / 32);  /* int16, one per 16 values */
    o.panel = o.goff + up16((size_t)R * max_input(m) / 8);     /* int32: 2 per 32 values, KOFF per 256 */
    o.private_ = o.panel + up16(panel_bytes(max_input(m)) / 4);
    return o;
}

static inline int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* QMat.wsum of an int8 matrix (N, K) with groups of `group` (a multiple of 32) weights: out (N, K / group). */
void q8_group_sums(const int8_t *w, long N, int K, int group, int32_t *out) {
    const int G = K / group;
    #pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++)
        for (int g = 0; g < G; g++) {
            const int8_t *wg = w + n * K + (long)g * group;
            __m256i acc = _mm256_setzero_si256();
            for (int k = 0; k < group; k += 32) {
                __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_loadu_si256((const __m256i *)(wg + k)));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
            }
            out[n * G + g] = hsum_epi32(acc);
        }
}

size_t qwen2_work_floats(const QModel *m, int R, int max_positions, int nthreads) {
    Layout o = layout(m, R, max_positions);
    return o.priv0 + (size_t)nthreads * o.private_;
}

/* Compute R rows; write the logits of rows out_rows[0..n_out) to logits (n_out, vocab).
 * positions[r]: the row's position in its sequence seq_of_row[r]; cos/sin (R, head_dim); work: a buffer of
 * qwen2_work_floats(m, R, max_positions, nthreads) floats, max_positions > every position. */
void qwen2_forward(const QModel *m, const KVView *kv, int R, const int64_t *tokens, const int32_t *positions,
                      const int32_t *seq_of_row, const float *cos, const float *sin, int n_out,
                      const int32_t *out_rows, float *logits, float *work, int max_positions, int nthreads,
                      const SparseArgs *sparse) {
    const int h = m->hidden, D = m->head_dim, Hq = m->n_heads, Hkv = m->n_kv_heads, I = m->intermediate;
    const int QW = Hq * D, KVW = Hkv * D, QKVW = QW + 2 * KVW, per_kv = Hq / Hkv;
    const float scale = 1.0f / sqrtf((float)D);
    const Layout o = layout(m, R, max_positions);
    float *qkv = work, *attn = work + o.attn, *tmp = work + o.tmp, *act = work + o.act;
    int *tiles = (int *)(work + o.tiles), n_tiles = 0;  /* attention blocks: runs of consecutive positions of a seq */
    for (int r = 0; r < R; r++)
        if (r == 0 || seq_of_row[r] != seq_of_row[r - 1] || positions[r] != positions[r - 1] + 1
            || r - tiles[n_tiles - 1] == da_rows(per_kv))
            tiles[n_tiles++] = r;
    tiles[n_tiles] = R;
    int *sparse_row = NULL;  /* rows of runs (a sequence's consecutive positions) that attend sparsely */
    if (sparse) {
        sparse_row = (int *)sparse->work;
        for (int r = 0, e; r < R; r = e) {
            for (e = r + 1; e < R && seq_of_row[e] == seq_of_row[r] && positions[e] == positions[e - 1] + 1; e++) {}
            const int on = sp_applies(sparse, e - r, positions[e - 1] + 1);
            for (int i = r; i < e; i++) sparse_row[i] = on;
        }
    }

    TeamBarrier bar;
    team_init(&bar);
    #pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        long spin = TEAM_SPIN_MAX;
        float *x = work + o.priv0 + tid * o.private_, *xn = x + o.xn, *scores = x + o.scores, *gu = x + o.gu;
        long *slots = (long *)(x + o.slots);
        QAct xa = {.q = (int16_t *)(x + o.xq), .qp = (int16_t *)(x + o.xp), .s = x + o.xs, .bsum = x + o.bsum,
                   .u = (uint8_t *)(x + o.xu), .us = x + o.xus, .g8 = (int8_t *)(x + o.g8), .gd = x + o.gd,
                   .gsum = (int16_t *)(x + o.gsum), .goff = (int32_t *)(x + o.goff), .panel = (uint8_t *)(x + o.panel),
                   .tid = tid, .nt = nt, .bar = &bar, .spin = &spin};
        if (R >= SHARED_QUANT_ROWS) {  /* GGUF-block activations: one copy (thread 0's buffers), rows split */
            float *x0 = work + o.priv0;
            xa.g8 = (int8_t *)(x0 + o.g8), xa.gd = x0 + o.gd, xa.gsum = (int16_t *)(x0 + o.gsum);
            xa.goff = (int32_t *)(x0 + o.goff), xa.shared = 1;
        }

        for (int r = 0; r < R; r++) {  /* embedding rows, dequantized (every thread keeps its own copy) */
            const QMat *E = &m->embed;
            if (E->bits == 0) {
                ggml_dequantize_rows(E->ggml_type, (const uint8_t *)E->w, h, tokens + r, 1, x + (size_t)r * h);
                continue;
            }
            int groups = E->K / E->group;
            const int8_t *wr = (const int8_t *)E->w + tokens[r] * (long)E->K;
            const float *sr = (const float *)E->s + tokens[r] * (long)groups;
            for (int k = 0; k < h; k++) x[(size_t)r * h + k] = wr[k] * sr[k / E->group];
        }

        for (int l = 0; l < m->n_layers; l++) {
            const QLayer *L = &m->layers[l];
            for (int r = 0; r < R; r++) rms_norm(x + (size_t)r * h, L->input_norm, m->eps, h, xn + (size_t)r * h);
            set_rows(xn, R, h, &xa);
            matmul_share(&L->qkv[0], &xa, R, qkv, QKVW, tid, nt);
            matmul_share(&L->qkv[1], &xa, R, qkv + L->qkv[0].N, QKVW, tid, nt);
            matmul_share(&L->qkv[2], &xa, R, qkv + L->qkv[0].N + L->qkv[1].N, QKVW, tid, nt);
            team_wait(&bar, nt, &spin);

            /* RoPE on q heads and k heads, k/v into the cache. */
            #pragma omp for schedule(static) nowait
            for (int item = 0; item < R * (Hq + Hkv); item++) {
                int r = item / (Hq + Hkv), head = item % (Hq + Hkv);
                float *row = qkv + (size_t)r * QKVW;
                const float *c = cos + (size_t)r * D, *s = sin + (size_t)r * D;
                if (head < Hq) {
                    rope(row + head * D, c, s, D);
                } else {
                    int gk = head - Hq;
                    float *k = row + QW + gk * D, *v = row + QW + KVW + gk * D;
                    rope(k, c, s, D);
                    long at = kv_offset(kv, l, seq_of_row[r], gk, positions[r], D);
                    kv_store(kv, kv->k, at, k, D);
                    kv_store(kv, kv->v, at, v, D);
                }
            }
            team_wait(&bar, nt, &spin);  /* every row's k/v is cached before any row attends */

            if (sparse_row)
                for (int r = 0, e; r < R; r = e) {
                    for (e = r + 1; e < R && seq_of_row[e] == seq_of_row[r] && positions[e] == positions[e - 1] + 1; e++) {}
                    if (sparse_row[r])
                        sp_run(kv, l, seq_of_row[r], qkv, QKVW, attn, QW, r, e - r, positions[r], Hq, Hkv, D,
                               max_positions, sparse, NULL, 0, NULL, 0, NULL, NULL);
                }

            #pragma omp for schedule(dynamic, 1) nowait
            for (int k = 0; k < n_tiles * Hkv; k++) {  /* the last (longest) blocks first */
                const int item = n_tiles * Hkv - 1 - k, r0 = tiles[item / Hkv], n = tiles[item / Hkv + 1] - r0;
                const int gk = item % Hkv, seq = seq_of_row[r0];
                if (sparse_row && sparse_row[r0]) continue;  /* attended by sp_run */
                fill_slots(kv, seq, positions[r0] + n, slots);
                const long base = l * kv->layer_stride + seq * kv->seq_stride + gk * kv->head_stride;
                const size_t elem = kv->dtype == KV_F32 ? sizeof(float) : sizeof(uint16_t);
                dense_attend(qkv + (size_t)r0 * QKVW + gk * per_kv * D, QKVW, attn + (size_t)r0 * QW + gk * per_kv * D,
                             QW, n, positions[r0], per_kv, D, scale, (const char *)kv->k + base * elem,
                             (const char *)kv->v + base * elem, kv->dtype, slots, scores);
            }
            team_wait(&bar, nt, &spin);

            set_rows(attn, R, QW, &xa);
            matmul_share(&L->o, &xa, R, tmp, h, tid, nt);
            team_wait(&bar, nt, &spin);
            for (size_t i = 0; i < (size_t)R * h; i++) x[i] += tmp[i];
            for (int r = 0; r < R; r++) rms_norm(x + (size_t)r * h, L->post_norm, m->eps, h, xn + (size_t)r * h);
            set_rows(xn, R, h, &xa);

            if (L->up.N) {
                /* GGUF blocks, gate and up apart (one activation block size): per panel of rows, gate into act
                 * and up into gu, then act = silu(gate) * up on that panel */
                const QMat *W = &L->gate_up, *U = &L->up;
                prepare_g(&xa, W->ggml_type);
                int n0, n1;
                panel_share(I, tid, nt, &n0, &n1);
                const int MC = panel_chunk(h);
                for (int m0 = 0; m0 < R; m0 += MC) {
                    const int m1 = R - m0 < MC ? R : m0 + MC;
                    for (int p0 = n0; p0 < n1; p0 += PANEL) {
                        const int p1 = n1 - p0 < PANEL ? n1 : p0 + PANEL;
                        panel_matmul(W->ggml_type, (const uint8_t *)W->w, W->N, h, xa.g8, xa.gd, xa.goff, xa.gsum, m0, m1, p0,
                                     p1, act + (size_t)m0 * I + p0, I, xa.panel);
                        panel_matmul(U->ggml_type, (const uint8_t *)U->w, U->N, h, xa.g8, xa.gd, xa.goff, xa.gsum, m0, m1, p0,
                                     p1, gu, PANEL, xa.panel);
                        for (int r = 0; r < m1 - m0; r++)
                            silu_mul(act + (size_t)(m0 + r) * I + p0, gu + (size_t)r * PANEL, p1 - p0);
                    }
                }
            } else {   /* q8 / q4: gate row n and up row n as one tile pair, straight into act = silu(gate) * up */
                const QMat *W = &L->gate_up;
                int n0, n1;
                if (W->bits == 4) prepare_q4(&xa, W->group); else prepare_u8(&xa, W->group);
                share(I, tid, nt, &n0, &n1);
                for (int b0 = n0; b0 < n1; b0 += NBLOCK) {
                    int b1 = b0 + NBLOCK < n1 ? b0 + NBLOCK : n1;
                    for (int m0 = 0; m0 < R; m0 += 64) {
                        int mr = R - m0 < 64 ? R - m0 : 64;
                        float *gate = act + (size_t)m0 * I;  /* gate into act, up into gu (64, NBLOCK) */
                        for (int n = b0; n < b1; n++) {
                            float *out[2] = {gate + n, gu + (n - b0)};
                            const long ldo[2] = {I, NBLOCK};
                            rows_dot(W, n, n + I, &xa, m0, m0 + mr, out, ldo);
                        }
                        for (int r = 0; r < mr; r++)  /* act = silu(gate) * up */
                            silu_mul(gate + (size_t)r * I + b0, gu + r * NBLOCK, b1 - b0);
                    }
                }
            }
            team_wait(&bar, nt, &spin);
            set_rows(act, R, I, &xa);
            matmul_share(&L->down, &xa, R, tmp, h, tid, nt);
            team_wait(&bar, nt, &spin);
            for (size_t i = 0; i < (size_t)R * h; i++) x[i] += tmp[i];
        }

        for (int j = 0; j < n_out; j++)
            rms_norm(x + (size_t)out_rows[j] * h, m->final_norm, m->eps, h, xn + (size_t)j * h);
        set_rows(xn, n_out, h, &xa);
        matmul_share(&m->lm_head, &xa, n_out, logits, m->vocab, tid, nt);
    }
}
