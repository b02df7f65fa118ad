/* Sparse prefill inside the native forward: MInference's vertical-slash pattern, as qwen25.model.sparse_prefill
 * defines it, over the paged / 16-bit KV cache that forward.c writes. Included by forward.c (it uses its KVView,
 * kv_widen, exp256 and max_of).
 *
 * For one run of T consecutive rows of a sequence (a prefill chunk at positions past..S-1) and each query head:
 *  1. estimate: the last n = min(last_q, T) queries attend densely to all S keys (fp32 softmax); their attention
 *     summed per key gives the vertical scores, summed per distance (query - key) the slash scores; the first
 *     sink_size columns and the local_size nearest distances are forced; the top vertical_size columns and top
 *     slash_size distances are kept (ties at the k-th value: the lowest indices);
 *  2. attend: queries in blocks of block_size absolute positions; a kept distance d selects the key-block
 *     offsets d / bs and d / bs + (d % bs > 0), i.e. for query block qb the key blocks qb - offset (a superset of
 *     the diagonal); a kept column is used where no selected block holds it; causal as always. The result is
 *     softmax attention over exactly that key set, the same set as the PyTorch reference.
 * Attention is GEMM-shaped: a query block (<= block_size rows of one head, scaled q) against tiles of SP_KB keys
 * gathered from the set, each key widened to fp32 once per tile (keys transposed, so a micro-tile of 4 queries x
 * SP_KB keys is 4 broadcasts and SP_KB / lanes loads per dimension), with an online softmax in fp32 (running max
 * and sum per query). Lanes: 16 with AVX-512 (this build's -mavx512f), else 8 (AVX2); the steps are the same.
 * Work items: heads (estimate), then (head, query block) pairs, dynamically scheduled over the threads.
 */

typedef struct {
    int vertical_size, slash_size, last_q, sink_size, local_size, block_size, min_length;
    int max_rows;  /* rows of the pass (the work buffer's first part flags them: int per row, 1 = sparse run) */
    float *work;   /* sparse_work_floats(H, D, max_rows, max_positions, threads, this) floats */
} SparseArgs;

#define SP_KB 64  /* keys per key tile */

#if defined(__AVX512F__)
#define SP_VL 16
typedef __m512 spvec;
#define sp_load _mm512_loadu_ps
#define sp_store _mm512_storeu_ps
#define sp_set1 _mm512_set1_ps
#define sp_fmadd _mm512_fmadd_ps
#define sp_zero _mm512_setzero_ps
#define sp_mul _mm512_mul_ps
#define SP_NC 4   /* key vectors per score micro-tile (4 rows x SP_NC x 16 keys) */
#define SP_NO 4   /* output vectors per value micro-tile (4 rows x SP_NO x 16 dims) */
#else
#define SP_VL 8
typedef __m256 spvec;
#define sp_load _mm256_loadu_ps
#define sp_store _mm256_storeu_ps
#define sp_set1 _mm256_set1_ps
#define sp_fmadd _mm256_fmadd_ps
#define sp_zero _mm256_setzero_ps
#define sp_mul _mm256_mul_ps
#define SP_NC 2
#define SP_NO 2
#endif
#define SP_KV (SP_KB / SP_VL)

static inline int sp_min(int a, int b) { return a < b ? a : b; }
static inline int sp_max(int a, int b) { return a > b ? a : b; }

/* sc[i * SP_KB + j] = Q[i] . Kt[:, j] for i < nq, j < SP_KB. Q (nq, D) (already scaled), Kt (D, SP_KB). */
static void sp_scores(const float *Q, int nq, int D, const float *Kt, float *sc) {
    int i = 0;
    for (; i + 4 <= nq; i += 4)
        for (int c0 = 0; c0 < SP_KV; c0 += SP_NC) {
            spvec acc[4][SP_NC];
            for (int r = 0; r < 4; r++) for (int c = 0; c < SP_NC; c++) acc[r][c] = sp_zero();
            for (int d = 0; d < D; d++) {
                spvec k[SP_NC];
                for (int c = 0; c < SP_NC; c++) k[c] = sp_load(Kt + (size_t)d * SP_KB + (c0 + c) * SP_VL);
                for (int r = 0; r < 4; r++) {
                    const spvec qb = sp_set1(Q[(size_t)(i + r) * D + d]);
                    for (int c = 0; c < SP_NC; c++) acc[r][c] = sp_fmadd(qb, k[c], acc[r][c]);
                }
            }
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < SP_NC; c++) sp_store(sc + (size_t)(i + r) * SP_KB + (c0 + c) * SP_VL, acc[r][c]);
        }
    for (; i < nq; i++) {
        spvec acc[SP_KV];
        for (int c = 0; c < SP_KV; c++) acc[c] = sp_zero();
        for (int d = 0; d < D; d++) {
            const spvec qb = sp_set1(Q[(size_t)i * D + d]);
            for (int c = 0; c < SP_KV; c++) acc[c] = sp_fmadd(qb, sp_load(Kt + (size_t)d * SP_KB + c * SP_VL), acc[c]);
        }
        for (int c = 0; c < SP_KV; c++) sp_store(sc + (size_t)i * SP_KB + c * SP_VL, acc[c]);
    }
}

/* O[i, d0 ..) += sum_{j < nk} P[i * SP_KB + j] * V[j, d0 ..) for nr rows and nv vectors (constants when inlined). */
static inline __attribute__((always_inline)) void sp_values_tile(const float *P, int nr, int nk, const float *V,
                                                                 int D, float *O, int nv) {
    spvec acc[4][SP_NO];
    for (int r = 0; r < nr; r++) for (int c = 0; c < nv; c++) acc[r][c] = sp_load(O + (size_t)r * D + c * SP_VL);
    for (int j = 0; j < nk; j++) {
        spvec v[SP_NO];
        for (int c = 0; c < nv; c++) v[c] = sp_load(V + (size_t)j * D + c * SP_VL);
        for (int r = 0; r < nr; r++) {
            const spvec p = sp_set1(P[(size_t)r * SP_KB + j]);
            for (int c = 0; c < nv; c++) acc[r][c] = sp_fmadd(p, v[c], acc[r][c]);
        }
    }
    for (int r = 0; r < nr; r++) for (int c = 0; c < nv; c++) sp_store(O + (size_t)r * D + c * SP_VL, acc[r][c]);
}

/* O (nq, D) += P (nq, SP_KB; the first nk keys) . V (nk, D); D a multiple of SP_VL. */
static void sp_values(const float *P, int nq, int nk, const float *V, int D, float *O) {
    for (int i = 0; i < nq; i += 4) {
        const int nr = sp_min(4, nq - i);
        for (int d0 = 0; d0 < D; d0 += SP_NO * SP_VL) {
            const int nv = sp_min(SP_NO, (D - d0) / SP_VL);
            const float *p = P + (size_t)i * SP_KB;
            float *o = O + (size_t)i * D + d0;
            if (nr == 4 && nv == SP_NO) sp_values_tile(p, 4, nk, V + d0, D, o, SP_NO);
            else sp_values_tile(p, nr, nk, V + d0, D, o, nv);
        }
    }
}

/* Keys and values of positions kpos[0 .. nk) (cache slots kslot) into Kt (D, SP_KB) transposed and V (nk, D),
 * widened to fp32; key columns past nk are zeroed (their scores are masked, never NaN from stale memory). */
static void sp_gather(const void *keys, const void *values, int dtype, const long *kslot, int nk, int D,
                      float *Kt, float *V, float *tmp) {
    for (int j = 0; j < nk; j++) {
        const long at = kslot[j] * D;
        const float *k;
        if (dtype == KV_F32) {
            k = (const float *)keys + at;
            memcpy(V + (size_t)j * D, (const float *)values + at, sizeof(float) * D);
        } else {
            kv_widen(keys, dtype, at, tmp, D);
            kv_widen(values, dtype, at, V + (size_t)j * D, D);
            k = tmp;
        }
        for (int d = 0; d < D; d++) Kt[(size_t)d * SP_KB + j] = k[d];
    }
    if (nk < SP_KB)
        for (int d = 0; d < D; d++) memset(Kt + (size_t)d * SP_KB + nk, 0, sizeof(float) * (SP_KB - nk));
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Scratch: shared pattern (per head: the kept columns and a byte per key-block offset), then per thread. */
typedef struct { size_t cols, offs, shared, qe, kt, v, tmp, sc, logits, vert, slash, sel, slots, kpos, kslot, qb, ob,
                 ml, private_; } SpLayout;

static size_t sp_up16(size_t n) { return (n + 15) & ~(size_t)15; }

static SpLayout sp_layout(int H, int D, int max_positions, const SparseArgs *c) {
    const size_t S = max_positions, nkb = (S + c->block_size - 1) / c->block_size + 1;
    const size_t nq = c->last_q > c->block_size ? c->last_q : c->block_size;
    SpLayout o;
    o.cols = 0;
    o.offs = sp_up16((size_t)H * sp_min(c->vertical_size, max_positions));  /* int32 */
    o.shared = o.offs + sp_up16((size_t)H * nkb / 4 + 1);                    /* bytes */
    o.qe = 0;                                                                /* private: */
    o.kt = o.qe + sp_up16(nq * D);
    o.v = o.kt + sp_up16((size_t)D * SP_KB);
    o.tmp = o.v + sp_up16((size_t)SP_KB * D);
    o.sc = o.tmp + sp_up16(D);
    o.logits = o.sc + sp_up16(nq * SP_KB);
    o.vert = o.logits + sp_up16((size_t)c->last_q * S);
    o.slash = o.vert + sp_up16(S);
    o.sel = o.slash + sp_up16(S);
    o.slots = o.sel + sp_up16(S);
    o.kpos = o.slots + sp_up16(2 * S);                                       /* longs */
    o.kslot = o.kpos + sp_up16(S);                                           /* ints */
    o.qb = o.kslot + sp_up16(2 * S);                                         /* longs */
    o.ob = o.qb + sp_up16((size_t)c->block_size * D);
    o.ml = o.ob + sp_up16((size_t)c->block_size * D);
    o.private_ = o.ml + sp_up16(2 * (size_t)c->block_size);
    return o;
}

/* Floats of SparseArgs.work for passes of R rows over at most max_positions positions, H heads of head_dim D. */
size_t sparse_work_floats(int H, int D, int R, int max_positions, int nthreads, const SparseArgs *c) {
    SpLayout o = sp_layout(H, D, max_positions, c);
    return sp_up16((size_t)R + 1) + o.shared + (size_t)nthreads * o.private_;  /* see SparseArgs.max_rows */
}

#include "sparse_pattern.c"  /* the pattern estimate: top-k and sp_estimate */

/* Slots of positions [a, b) of a sequence (through the block table), into out. */
static void sp_range_slots(const KVView *kv, int seq, int a, int b, long *out) {
    if (!kv->tables) { for (int t = a; t < b; t++) *out++ = t; return; }
    const int bs = kv->block_size;
    const int32_t *table = kv->tables + (long)seq * kv->table_width;
    for (int t = a; t < b;) {
        const long base = (long)table[t / bs] * bs;
        const int end = sp_min(b, (t / bs + 1) * bs);
        for (; t < end; t++) *out++ = base + t % bs;
    }
}

/* Attention of one head's queries at positions q0..q1-1 (one query block; row t's q at q + (t - q0) * ldq, its
 * output at out + (t - q0) * ldo) over the pattern's keys (cols[ncols], offs) of one (layer, seq, kv head). */
static void sp_attend_block(const float *q, long ldq, float *out, long ldo, int q0, int q1, int D, float scale,
                            const KVView *kv, int seq, const void *keys, const void *values, const int32_t *cols,
                            int ncols, const uint8_t *offs, const SparseArgs *c, float *scratch, const SpLayout *L) {
    const int bs = c->block_size, qb = q0 / bs, nq = q1 - q0;
    float *Kt = scratch + L->kt, *V = scratch + L->v, *tmp = scratch + L->tmp, *sc = scratch + L->sc;
    float *Q = scratch + L->qb, *O = scratch + L->ob, *mrow = scratch + L->ml, *lrow = mrow + bs;
    int *kpos = (int *)(scratch + L->kpos);
    long *kslot = (long *)(scratch + L->kslot);
    int nk = 0;
    for (int o = 0; o <= qb; o++) {  /* the selected key blocks, up to the block's last query */
        if (!offs[o]) continue;
        const int a = (qb - o) * bs, b = sp_min(a + bs, q1);
        sp_range_slots(kv, seq, a, b, kslot + nk);
        for (int t = a; t < b; t++) kpos[nk++] = t;
    }
    for (int j = 0; j < ncols; j++) {  /* columns no selected block holds */
        const int col = cols[j];
        if (col >= q1 || offs[qb - col / bs]) continue;
        kslot[nk] = slot_of(kv, seq, col);
        kpos[nk++] = col;
    }
    for (int i = 0; i < nq; i++) {
        for (int d = 0; d < D; d++) Q[(size_t)i * D + d] = q[(long)i * ldq + d] * scale;
        memset(O + (size_t)i * D, 0, sizeof(float) * D);
        mrow[i] = -INFINITY;
        lrow[i] = 0.0f;
    }
    for (int j0 = 0; j0 < nk; j0 += SP_KB) {
        const int n = sp_min(SP_KB, nk - j0);
        const int *kp = kpos + j0;
        sp_gather(keys, values, kv->dtype, kslot + j0, n, D, Kt, V, tmp);
        sp_scores(Q, nq, D, Kt, sc);
        int kmax = 0;
        for (int j = 0; j < n; j++) kmax = sp_max(kmax, kp[j]);
        for (int i = 0; i < nq; i++) {
            float *s = sc + (size_t)i * SP_KB;
            for (int j = n; j < SP_KB; j++) s[j] = -INFINITY;
            if (kmax > q0 + i)  /* causal: keys after this query */
                for (int j = 0; j < n; j++) if (kp[j] > q0 + i) s[j] = -INFINITY;
            const float mt = max_of(s, SP_KB);
            if (mt == -INFINITY) { memset(s, 0, sizeof(float) * SP_KB); continue; }
            if (mt > mrow[i]) {  /* a new running max: rescale what was summed so far */
                const float a = expf(mrow[i] - mt);
                lrow[i] *= a;
                for (int d = 0; d < D; d++) O[(size_t)i * D + d] *= a;
                mrow[i] = mt;
            }
            const __m256 m8 = _mm256_set1_ps(mrow[i]), ninf = _mm256_set1_ps(-INFINITY);
            __m256 acc = _mm256_setzero_ps();
            for (int j = 0; j < SP_KB; j += 8) {
                const __m256 x = _mm256_loadu_ps(s + j);
                const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(x, m8)), _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ));
                _mm256_storeu_ps(s + j, e);
                acc = _mm256_add_ps(acc, e);
            }
            lrow[i] += hsum256(acc);
        }
        sp_values(sc, nq, n, V, D, O);
    }
    for (int i = 0; i < nq; i++) {
        const float inv = lrow[i] > 0.0f ? 1.0f / lrow[i] : 0.0f;
        for (int d = 0; d < D; d++) out[(long)i * ldo + d] = O[(size_t)i * D + d] * inv;
    }
}

/* Whether a run of T rows ending at position S - 1 runs sparse. */
static inline int sp_applies(const SparseArgs *c, int T, int S) { return c && T > 1 && S >= c->min_length; }

/* Sparse attention of one run (rows r0 .. r0+T-1 of one sequence at positions past .. S-1) in layer l; call
 * from every thread of the parallel region. q of row r, head h: qkv + r * ldq + h * D; output attn + r * ldo +
 * h * D. columns_in/distances_in (H, ncols_in / nd_in) given: attend with that pattern instead of estimating;
 * columns_out/distances_out (H, min(vertical_size, S) / min(slash_size, S)): the estimated pattern, if wanted. */
static void sp_run(const KVView *kv, int l, int seq, const float *qkv, long ldq, float *attn, long ldo, int r0,
                   int T, int past, int H, int Hkv, int D, int max_positions, const SparseArgs *c,
                   const int32_t *columns_in, int ncols_in, const int32_t *distances_in, int nd_in,
                   int32_t *columns_out, int32_t *distances_out) {
    const int S = past + T, G = H / Hkv, bs = c->block_size, nkb = (S + bs - 1) / bs;
    const int ncol_max = sp_min(c->vertical_size, S), nd_max = sp_min(c->slash_size, S);
    const int n = sp_min(c->last_q, T), tid = omp_get_thread_num();
    const float scale = 1.0f / sqrtf((float)D);
    const SpLayout L = sp_layout(H, D, max_positions, c);
    float *shared = c->work + sp_up16((size_t)c->max_rows + 1);
    int32_t *cols = (int32_t *)(shared + L.cols);
    uint8_t *offs = (uint8_t *)(shared + L.offs);
    float *scratch = shared + L.shared + (size_t)tid * L.private_;
    long *slots = (long *)(scratch + L.slots);
    const size_t elem = kv->dtype == KV_F32 ? sizeof(float) : sizeof(uint16_t);

    #pragma omp for schedule(dynamic, 1)
    for (int h = 0; h < H; h++) {
        const int gk = h / G;
        const long base = l * kv->layer_stride + seq * kv->seq_stride + gk * kv->head_stride;
        const char *keys = (const char *)kv->k + base * elem;
        int32_t *hc = cols + (size_t)h * ncol_max;
        uint8_t *ho = offs + (size_t)h * (nkb + 1);
        if (columns_in) {  /* a given pattern (the tests' "same selected keys") */
            for (int j = 0; j < ncol_max; j++) hc[j] = j < ncols_in ? columns_in[(size_t)h * ncols_in + j] : -1;
            memset(ho, 0, nkb);
            for (int j = 0; j < nd_in; j++) {
                const int d = distances_in[(size_t)h * nd_in + j], o = d / bs, o2 = o + (d % bs > 0);
                ho[o] = 1;
                if (o2 < nkb) ho[o2] = 1;
            }
            continue;
        }
        sp_range_slots(kv, seq, 0, S, slots);
        const int got = sp_estimate(qkv + (long)(r0 + T - n) * ldq + (long)h * D, ldq, n, S, D, scale, keys,
                                    kv->dtype, slots, c, hc, ho, distances_out ? distances_out + (size_t)h * nd_max
                                                                               : NULL, scratch, &L);
        for (int j = got; j < ncol_max; j++) hc[j] = -1;
        if (columns_out) memcpy(columns_out + (size_t)h * ncol_max, hc, sizeof(int32_t) * ncol_max);
    }  /* implicit barrier: every head's pattern is ready */

    const int qb0 = past / bs, nqb = (S - 1) / bs - qb0 + 1;
    #pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < H * nqb; item++) {
        const int h = item % H, qb = qb0 + item / H, gk = h / G;
        const int q0 = sp_max(past, qb * bs), q1 = sp_min(S, (qb + 1) * bs);
        const long base = l * kv->layer_stride + seq * kv->seq_stride + gk * kv->head_stride;
        const int32_t *hc = cols + (size_t)h * ncol_max;
        int nc = 0;
        while (nc < ncol_max && hc[nc] >= 0) nc++;
        const long row = r0 + (q0 - past);
        sp_attend_block(qkv + row * ldq + (long)h * D, ldq, attn + row * ldo + (long)h * D, ldo, q0, q1, D, scale,
                        kv, seq, (const char *)kv->k + base * elem, (const char *)kv->v + base * elem, hc, nc,
                        offs + (size_t)h * (nkb + 1), c, scratch, &L);
    }  /* implicit barrier */
}

/* The sparse attention of one run on its own (tests): q (T, H, D) rotated queries at positions past .. past+T-1
 * of sequence seq, whose keys/values (layer l) are already in the cache; out (T, H, D). A given pattern
 * (columns_in (H, ncols_in), distances_in (H, nd_in)) replaces the estimate; otherwise the estimated pattern goes
 * to columns_out (H, min(vertical_size, S), -1 padded) and distances_out (H, min(slash_size, S)) if not NULL. */
void sparse_attention(const KVView *kv, int l, int seq, const float *q, int T, int past, int H, int Hkv, int D,
                      const SparseArgs *c, const int32_t *columns_in, int ncols_in, const int32_t *distances_in,
                      int nd_in, int32_t *columns_out, int32_t *distances_out, float *out, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    sp_run(kv, l, seq, q, (long)H * D, out, (long)H * D, 0, T, past, H, Hkv, D, past + T, c, columns_in, ncols_in,
           distances_in, nd_in, columns_out, distances_out);
}
