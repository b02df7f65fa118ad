/* The whole Qwen2 forward pass in one native call, on ggml weight blocks (ggml_dot.c: a GGUF file's own, or made in
 * memory by qwen25.weights.block_quant).
 *
 * Decode steps, speculative verification passes and short prompt chunks process 1..~32 rows; in PyTorch such a
 * step is ~45 small ops per layer whose dispatch and thread wake-ups cost as much as reading the weights. Here
 * one OpenMP parallel region runs every layer: each thread keeps its own copy of the residual stream (cheap,
 * identical on every thread), the matmuls split their output rows between threads (in chunks each thread claims
 * as it gets to them), and six barriers per
 * layer separate the phases (team_barrier.c: a bounded spin, then sleep). Rows are (token, position,
 * sequence): a row attends to positions 0..pos of its sequence in the KV cache, after every row's key/value
 * has been written, so several rows of one sequence (a prompt chunk, draft tokens) are causal without a mask.
 * The cache is either contiguous per sequence or paged through a block table (see KVView).
 *
 * Matmuls never convert weights to fp32: each matmul input is quantized to int8 per block of the weight type
 * (32 or 256 values) and multiplied with the blocks as they lie (ggml_dot.c, ggml_panel.c). Everything else is
 * fp32 and follows qwen25.model: RMSNorm, half-split RoPE with cos/sin given by the caller, softmax,
 * SiLU(gate) * up. Each row's result does not depend on the other rows in the call.
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
#include "ggml_dot.c"  /* matmuls on ggml weight blocks */
#include "team_barrier.c"  /* team_wait: the barriers between the phases of a layer */

static inline float hsum256(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

/* A weight matrix (N, K): w the tensor's bytes, rows of ggml blocks of `ggml_type` (Q4_K, Q6_K, Q5_0, Q8_0;
 * ggml_dot.c); activations are quantized to int8 per block of the type (32 or 256 values). */
typedef struct {
    const void *w;
    const float *bias;   /* (N,) or NULL */
    int N, K;
    int ggml_type;
} QMat;

typedef struct {
    const float *input_norm, *post_norm;
    QMat qkv[3];   /* row blocks (the later ones may be empty, N = 0): q (H*D), k (Hkv*D), v (Hkv*D) */
    QMat o;
    QMat gate;     /* the gate rows (I) */
    QMat up;       /* the up rows (I), the same activation block size as gate's */
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

/* Each matmul's weight rows are handed out in chunks that the threads claim from a shared counter, not in fixed
 * shares: a thread that falls behind (a core shared with another process, uneven memory latency) then does less,
 * and its partner no longer waits for it at the next barrier. Every row is computed the same way, so the bits do
 * not change. A chunk is 1 / (CLAIM_SHARE * threads) of the rows not yet handed out (guided: large chunks first,
 * so the last ones, which a thread may finish alone, are small), in whole panels, at least CLAIM_MIN_BYTES of
 * weights.
 * The counters: a ring of CLAIM_RING, one per matmul call in the order every thread makes the calls (QAct.calls);
 * thread 0 zeroes the slot CLAIM_RING / 2 calls ahead. At most 3 calls run between two barriers, so no thread
 * still claims from the slot being zeroed, and none claims from it again before a barrier after the zeroing.
 * Measured against fixed halves (AMD EPYC Zen 4: avx2 avx512f avx512_vnni avx512_bf16, 2 threads; a noisy host):
 * the 1.5B's decode 28.1 -> 30.0 tok/s (means of 7 alternating runs of 3 x 128 tokens, 6 of 7 pairs won), the
 * 0.5B's 61.2 -> 62.3 (4 of 4), 8 streams of the 1.5B +1-5%; the time the threads wait at barriers in decode
 * 6-11% -> 2.5-2.9% of theirs, in 8 streams 4.5-5.1% -> 2.3-2.4%. Prefill (512 tokens), claimed against fixed
 * halves: the 1.5B 192 -> 201 tok/s, the 0.5B 652 -> 667 (means of 9 alternating runs; 2 of 3 rounds won each,
 * the 0.5B's other round lost 3%): a chunk goes over all the pass's activation rows again, which costs no more
 * than the waits it saves. Guided chunks against 8 equal ones per thread: the threads' barrier waits in decode of
 * the 1.5B 2.8-3.5% -> 1.0-1.3% of their time, its decode 20.3 -> 23.2 and 24.3 -> 27.1 tok/s (two alternating
 * rounds on a slow host), 8 streams of the 1.5B +3.7% (3 rounds), prefill equal (184.3 against 182.3 tok/s, 18
 * runs each). */
#define CLAIM_RING 8
#define CLAIM_SHARE 2
#define CLAIM_MIN_BYTES 65536

/* This thread's share [n0, n1) of N output rows, split in equal contiguous chunks. */
static inline void share(int N, int tid, int nt, int *n0, int *n1) {
    *n0 = (int)((long)N * tid / nt);
    *n1 = (int)((long)N * (tid + 1) / nt);
}

/* The activation rows (R, K) of a matmul, quantized on demand for the weights that take them. */
typedef struct {
    const float *src;
    int K, R;
    int8_t *g8;      /* int8 per block of has_g values, scales gd, sums gsum (see ggml_dot.c) */
    float *gd;
    int16_t *gsum;
    int32_t *goff;   /* 32-value blocks: the panel kernels' initial sums (panel_offsets) */
    int has_g;
    uint8_t *panel;  /* this thread's packed-panel scratch (ggml_panel.c) */
    int shared, tid, nt;  /* shared: g8 .. goff are one copy for all threads, each quantizing its share of rows */
    TeamBarrier *bar;     /* the team's barrier, and this thread's spin budget for it (team_barrier.c) */
    long *spin;
    atomic_int *claims;   /* the team's CLAIM_RING chunk counters, and this thread's count of claimed calls */
    unsigned calls;
} QAct;

/* Point a at new rows x (R, K); nothing is quantized until a matmul asks for it. */
static void set_rows(const float *x, int R, int K, QAct *a) {
    a->src = x;
    a->R = R;
    a->K = K;
    a->has_g = 0;
}

#define SHARED_QUANT_ROWS 32  /* passes of this many rows quantize the activations once for all threads */

/* Every thread calls this with the same arguments (the rows are the same on every thread). Shared (long passes):
 * the threads quantize disjoint rows into one copy between two barriers (the first: no thread still reads the
 * previous input's copy); otherwise each thread quantizes all rows into its own. The bits are the same. */
static void prepare_g(QAct *a, int ggml_type) {
    const int qk = ggml_block_values(ggml_type);
    if (a->has_g == qk) return;
    const int nb = a->K / qk, nsums = qk == QK_K ? KSUMS : 1, noff = qk == QK_K ? KOFF : 2;
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

/* Activation rows per panel pass: a chunk of quantized rows stays in L2 while the panels go past it. */
static int panel_chunk(int K) {
    const int rows = (512 * 1024 / K) / PANEL_MX * PANEL_MX;
    return rows < PANEL_MX ? PANEL_MX : rows;
}

/* y[r, n] = x[r] . W[n] for weight rows [n0, n1) (ggml_panel.c: packed panels, or rows streamed in
 * place for short passes), activation rows in chunks that stay in L2. */
static void panel_rows(const QMat *W, const QAct *x, int R, int n0, int n1, float *y, long ldy) {
    const int MC = panel_chunk(W->K);
    for (int m0 = 0; m0 < R; m0 += MC)
        panel_matmul(W->ggml_type, (const uint8_t *)W->w, W->N, W->K, x->g8, x->gd, x->goff, x->gsum, m0,
                     R - m0 < MC ? R : m0 + MC, n0, n1, n0, n1, y + (long)m0 * ldy, ldy, x->panel);
}

/* This call's chunk counter (every thread calls this once per claimed matmul, in the same order). */
static atomic_int *claim_counter(QAct *a) {
    const unsigned c = a->calls++;
    if (a->tid == 0) atomic_store(&a->claims[(c + CLAIM_RING / 2) % CLAIM_RING], 0);
    return &a->claims[c % CLAIM_RING];
}

/* The smallest chunk of weight rows of row_bytes each: whole panels, at least CLAIM_MIN_BYTES. */
static int claim_min_rows(size_t row_bytes) {
    const size_t panel_bytes_ = (size_t)PANEL * row_bytes;
    return (int)((CLAIM_MIN_BYTES + panel_bytes_ - 1) / panel_bytes_) * PANEL;
}

/* Claim the next chunk [*n0, *n1) of N rows from the counter (rows handed out so far): 1 / (CLAIM_SHARE * nt) of
 * the rows not yet handed out, in whole panels, at least min_rows; 0 when none is left. */
static int claim_next(atomic_int *next, int N, int min_rows, int nt, int *n0, int *n1) {
    int at = atomic_load(next), size;
    do {
        if (at >= N) return 0;
        size = ((N - at) / (CLAIM_SHARE * nt) + PANEL - 1) / PANEL * PANEL;
        if (size < min_rows) size = min_rows;
    } while (!atomic_compare_exchange_weak(next, &at, at + size));
    *n0 = at;
    *n1 = N - at < size ? N : at + size;
    return 1;
}

static size_t qmat_row_bytes(const QMat *W) {
    return (size_t)(W->K / ggml_block_values(W->ggml_type)) * ggml_block_bytes(W->ggml_type);
}

static void add_bias(const QMat *W, int R, int n0, int n1, float *y, int ldy) {
    if (W->bias)
        for (int r = 0; r < R; r++) for (int n = n0; n < n1; n++) y[(long)r * ldy + n] += W->bias[n];
}

/* y[r, n] = x[r] . W[n] (+ bias[n]) for the chunks of rows n this thread claims. */
static void matmul_share(const QMat *W, QAct *x, int R, float *y, int ldy) {
    if (W->N == 0) return;
    prepare_g(x, W->ggml_type);
    atomic_int *next = claim_counter(x);
    const int min_rows = claim_min_rows(qmat_row_bytes(W));
    for (int n0, n1; claim_next(next, W->N, min_rows, x->nt, &n0, &n1);) {
        panel_rows(W, x, R, n0, n1, y + n0, ldy);
        add_bias(W, R, n0, n1, y, ldy);
    }
}

static int max_input(const QModel *m) {
    int k = m->hidden > m->intermediate ? m->hidden : m->intermediate;
    return k > m->n_heads * m->head_dim ? k : m->n_heads * m->head_dim;
}

static size_t up16(size_t n) { return (n + 15) & ~(size_t)15; }  /* 64-byte aligned sub-buffers */

/* Offsets (in floats) into the work buffer: shared buffers, then one private region per thread. */
typedef struct { size_t attn, tmp, act, tiles, priv0, private_, xn, scores, slots, gu, g8, gd, gsum, goff, panel; } Layout;

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
    o.g8 = o.gu + up16((size_t)(R > 64 ? R : 64) * PANEL);
    o.gd = o.g8 + up16((size_t)R * max_input(m) / 4);       /* bytes */
    o.gsum = o.gd + up16((size_t)R * max_input(m) / 32);
    o.goff = o.gsum + up16((size_t)R * max_input(m) * KSUMS / 512);  /* int16: KSUMS per 256 values, one per 32 */
    o.panel = o.goff + up16((size_t)R * max_input(m) / 8);     /* int32: 2 per 32 values, KOFF per 256 */
    o.private_ = o.panel + up16(panel_bytes(max_input(m)) / 4);
    return o;
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
    atomic_int claims[CLAIM_RING];
    for (int c = 0; c < CLAIM_RING; c++) atomic_init(&claims[c], 0);
    #pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        long spin = TEAM_SPIN_MAX;
        float *x = work + o.priv0 + tid * o.private_, *xn = x + o.xn, *scores = x + o.scores, *gu = x + o.gu;
        long *slots = (long *)(x + o.slots);
        QAct xa = {.g8 = (int8_t *)(x + o.g8), .gd = x + o.gd,
                   .gsum = (int16_t *)(x + o.gsum), .goff = (int32_t *)(x + o.goff), .panel = (uint8_t *)(x + o.panel),
                   .tid = tid, .nt = nt, .bar = &bar, .spin = &spin, .claims = claims, .calls = 0};
        if (R >= SHARED_QUANT_ROWS) {  /* the activations: one copy (thread 0's buffers), rows split */
            float *x0 = work + o.priv0;
            xa.g8 = (int8_t *)(x0 + o.g8), xa.gd = x0 + o.gd, xa.gsum = (int16_t *)(x0 + o.gsum);
            xa.goff = (int32_t *)(x0 + o.goff), xa.shared = 1;
        }

        for (int r = 0; r < R; r++)  /* embedding rows, dequantized (every thread keeps its own copy) */
            ggml_dequantize_rows(m->embed.ggml_type, (const uint8_t *)m->embed.w, h, tokens + r, 1, x + (size_t)r * h);

        for (int l = 0; l < m->n_layers; l++) {
            const QLayer *L = &m->layers[l];
            for (int r = 0; r < R; r++) rms_norm(x + (size_t)r * h, L->input_norm, m->eps, h, xn + (size_t)r * h);
            set_rows(xn, R, h, &xa);
            matmul_share(&L->qkv[0], &xa, R, qkv, QKVW);
            matmul_share(&L->qkv[1], &xa, R, qkv + L->qkv[0].N, QKVW);
            matmul_share(&L->qkv[2], &xa, R, qkv + L->qkv[0].N + L->qkv[1].N, QKVW);
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
            matmul_share(&L->o, &xa, R, tmp, h);
            team_wait(&bar, nt, &spin);
            for (size_t i = 0; i < (size_t)R * h; i++) x[i] += tmp[i];
            for (int r = 0; r < R; r++) rms_norm(x + (size_t)r * h, L->post_norm, m->eps, h, xn + (size_t)r * h);
            set_rows(xn, R, h, &xa);

            /* gate and up apart (one activation block size): per panel of rows, gate into act
             * and up into gu, then act = silu(gate) * up on that panel */
            const QMat *W = &L->gate, *U = &L->up;
            prepare_g(&xa, W->ggml_type);
            const int MC = panel_chunk(h);
            atomic_int *next = claim_counter(&xa);
            const int min_rows = claim_min_rows(qmat_row_bytes(W) + qmat_row_bytes(U));
            for (int n0, n1; claim_next(next, I, min_rows, nt, &n0, &n1);)
                for (int m0 = 0; m0 < R; m0 += MC) {
                    const int m1 = R - m0 < MC ? R : m0 + MC;
                    for (int p0 = n0; p0 < n1; p0 += PANEL) {
                        const int p1 = n1 - p0 < PANEL ? n1 : p0 + PANEL;
                        panel_matmul(W->ggml_type, (const uint8_t *)W->w, W->N, h, xa.g8, xa.gd, xa.goff, xa.gsum, m0,
                                     m1, p0, p1, n0, n1, act + (size_t)m0 * I + p0, I, xa.panel);
                        panel_matmul(U->ggml_type, (const uint8_t *)U->w, U->N, h, xa.g8, xa.gd, xa.goff, xa.gsum, m0,
                                     m1, p0, p1, n0, n1, gu, PANEL, xa.panel);
                        for (int r = 0; r < m1 - m0; r++)
                            silu_mul(act + (size_t)(m0 + r) * I + p0, gu + (size_t)r * PANEL, p1 - p0);
                    }
                }
            team_wait(&bar, nt, &spin);
            set_rows(act, R, I, &xa);
            matmul_share(&L->down, &xa, R, tmp, h);
            team_wait(&bar, nt, &spin);
            for (size_t i = 0; i < (size_t)R * h; i++) x[i] += tmp[i];
        }

        for (int j = 0; j < n_out; j++)
            rms_norm(x + (size_t)out_rows[j] * h, m->final_norm, m->eps, h, xn + (size_t)j * h);
        set_rows(xn, n_out, h, &xa);
        matmul_share(&m->lm_head, &xa, n_out, logits, m->vocab);
    }
}
