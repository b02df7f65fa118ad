/* Dense causal attention inside the native forward: every row attends to positions 0 .. its own of its sequence
 * in the KV cache (fp32, fp16 or bf16, contiguous or paged; forward.c's KVView). Included by forward.c after
 * sparse_attention.c (it uses its vector macros, SP_VL lanes, and forward.c's kv_widen and fill_slots).
 *
 * Work item: a block of consecutive rows of one sequence (a prompt chunk's, or a decode row alone) and one KV
 * head. Its queries are the rows' query heads that share that KV head (GQA: nq = rows x G), laid out with the
 * queries along the vector lanes (Qt (D, NQ), scaled by 1/sqrt(D)). Keys come in tiles of DA_KB positions at absolute
 * multiples of DA_KB, each key and value widened to fp32 once per tile for all nq queries (the next tile's cache
 * lines asked for meanwhile); then
 *   scores S (keys, NQ) = K . Qt, an fp32 online softmax per query (running max and sum; causal masking only
 *   on tiles past the block's first row), and Ot (D, NQ) += V^T . P,
 * both products the same register-tiled micro-kernel (a few broadcast elements of K or V times vectors of
 * queries). Every (query, key) score is a chain of fmas over d = 0..D-1 in order, every output element a chain
 * over keys in order, each lane on its own: a row's result does not depend on the other rows of its block, on
 * the block size, or on the vector width (the AVX2 and AVX-512 builds agree bit for bit).
 * The AVX-512 build takes the keys along the lanes instead (dense_attend_keys; D a multiple of 16): the same
 * chains, the same bits, faster at every block size (a decode row's G = 7 queries would fill 7 of 16 lanes).
 */

#define DA_KB 64   /* keys per tile */
#define DA_NQ 112  /* queries per block at most, when G divides into it (7 AVX-512 / 14 AVX2 vectors) */

#if defined(__AVX512F__)
#define DA_QV 7    /* query vectors per micro-tile (4 rows x 7 vectors: 28 accumulators of 32 registers) */
static inline spvec da_exp(spvec x) {  /* exp256's steps on 16 lanes */
    x = _mm512_max_ps(_mm512_min_ps(x, sp_set1(88.3762626647949f)), sp_set1(-88.3762626647949f));
    spvec fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, sp_set1(1.44269504088896341f), sp_set1(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, sp_set1(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, sp_set1(-2.12194440e-4f), x);
    spvec y = sp_set1(1.9875691500e-4f);
    y = sp_fmadd(y, x, sp_set1(1.3981999507e-3f));
    y = sp_fmadd(y, x, sp_set1(8.3334519073e-3f));
    y = sp_fmadd(y, x, sp_set1(4.1665795894e-2f));
    y = sp_fmadd(y, x, sp_set1(1.6666665459e-1f));
    y = sp_fmadd(y, x, sp_set1(5.0000001201e-1f));
    y = sp_fmadd(y, sp_mul(x, x), _mm512_add_ps(x, sp_set1(1.0f)));
    __m512i n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return sp_mul(y, _mm512_castsi512_ps(n));
}
#define da_max _mm512_max_ps
#define da_add _mm512_add_ps
#define da_sub _mm512_sub_ps
/* x where lane `key` < lim (a key the query may see), else -inf */
static inline spvec da_causal(spvec x, spvec key, spvec lim) {
    return _mm512_mask_mov_ps(sp_set1(-INFINITY), _mm512_cmp_ps_mask(key, lim, _CMP_LT_OQ), x);
}
static inline spvec da_unless_ninf(spvec e, spvec x) {  /* e, or 0 where x is -inf (a masked key) */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, sp_set1(-INFINITY), _CMP_NEQ_OQ), e);
}
static inline int da_any_ne(spvec a, spvec b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ) != 0; }
#else
#define DA_QV 3    /* 4 rows x 3 vectors: 12 accumulators of 16 registers */
#define da_exp exp256
#define da_max _mm256_max_ps
#define da_add _mm256_add_ps
#define da_sub _mm256_sub_ps
static inline spvec da_causal(spvec x, spvec key, spvec lim) {
    return _mm256_blendv_ps(sp_set1(-INFINITY), x, _mm256_cmp_ps(key, lim, _CMP_LT_OQ));
}
static inline spvec da_unless_ninf(spvec e, spvec x) {
    return _mm256_and_ps(e, _mm256_cmp_ps(x, sp_set1(-INFINITY), _CMP_NEQ_OQ));
}
static inline int da_any_ne(spvec a, spvec b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_NEQ_UQ)) != 0; }
#endif

/* Queries per block for G query heads per KV head (rows = the result / G), and the lanes they take. */
static inline int da_rows(int G) { return G >= DA_NQ ? 1 : DA_NQ / G; }
static inline int da_lanes(int G) { return (da_rows(G) * G + SP_VL - 1) / SP_VL * SP_VL; }

/* C[r][c] (row r at C + r * ldc, c < nv vectors; nr rows) (+)= sum over x < nx, in order, of A[r * ars + x * axs]
 * (broadcast) * B[x * ldb + c * SP_VL]; from zero when `zero`. Inlined with constant nr, nv, zero. */
static inline __attribute__((always_inline)) void da_tile(float *C, long ldc, const float *A, long ars, long axs,
                                                          const float *B, long ldb, int nx, int nr, int nv, int zero) {
    spvec acc[8][DA_QV];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nv; c++) acc[r][c] = zero ? sp_zero() : sp_load(C + r * ldc + c * SP_VL);
    for (int x = 0; x < nx; x++) {
        spvec b[DA_QV];
        for (int c = 0; c < nv; c++) b[c] = sp_load(B + x * ldb + c * SP_VL);
        for (int r = 0; r < nr; r++) {
            const spvec a = sp_set1(A[r * ars + x * axs]);
            for (int c = 0; c < nv; c++) acc[r][c] = sp_fmadd(a, b[c], acc[r][c]);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nv; c++) sp_store(C + r * ldc + c * SP_VL, acc[r][c]);
}

/* The tile for nv (1 .. DA_QV) vectors: 4 rows, or 8 when one vector alone would leave too few accumulators. */
#define DA_CASE(n) case n: da_tile(C + r * ldc + c * SP_VL, ldc, A + r * ars, ars, axs, B + c * SP_VL, ldb, nx, \
                                   4, n, zero); break;
static inline __attribute__((always_inline)) void da_gemm_z(float *C, long ldc, const float *A, long ars, long axs,
                                                            const float *B, long ldb, int nx, int rows, int nvec,
                                                            int zero) {
    for (int c = 0; c < nvec; c += DA_QV) {
        const int nv = nvec - c < DA_QV ? nvec - c : DA_QV;
        int r = 0;
        if (nv == 1)
            for (; r + 8 <= rows; r += 8) da_tile(C + r * ldc + c * SP_VL, ldc, A + r * ars, ars, axs, B + c * SP_VL,
                                                  ldb, nx, 8, 1, zero);
        for (; r < rows; r += 4)
            switch (nv) {
                DA_CASE(1) DA_CASE(2) DA_CASE(3)
#if DA_QV > 3
                DA_CASE(4) DA_CASE(5) DA_CASE(6) DA_CASE(7)
#endif
            }
    }
}
#undef DA_CASE

/* rows (a multiple of 4) x nvec vectors of C, from zero (scores) or accumulated (value sums). */
static void da_gemm0(float *C, long ldc, const float *A, long ars, long axs, const float *B, long ldb, int nx,
                     int rows, int nvec) { da_gemm_z(C, ldc, A, ars, axs, B, ldb, nx, rows, nvec, 1); }
static void da_gemm1(float *C, long ldc, const float *A, long ars, long axs, const float *B, long ldb, int nx,
                     int rows, int nvec) { da_gemm_z(C, ldc, A, ars, axs, B, ldb, nx, rows, nvec, 0); }

/* Whether n floats are all finite (no inf, no NaN): the exponent bits of each are not all ones. */
static inline int da_all_finite(const float *x, size_t n) {
    const uint32_t *u = (const uint32_t *)x;
    uint32_t bad = 0;
    for (size_t i = 0; i < n; i++) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
    return !bad;
}

/* o(i, d) += sum over keys j < nk, in order, of V[j][d] * p(i, j), for queries i < nq, skipping the keys of
 * weight 0 (masked ones): the same fma chain as da_gemm1 where a weight is non-zero (adding 0 * v changes nothing
 * else), used on a masked tile whose values hold an inf or a NaN, where 0 * inf would put a NaN into the rows of
 * the block that come before that key. o(i, d) at O[i * o_i + d * o_d], p(i, j) at P[i * p_i + j * p_j] (either
 * layout: queries along the lanes or keys along the lanes). Scalar: it runs only on such tiles. */
static void da_masked_values(float *O, long o_i, long o_d, const float *Vb, const float *P, long p_i, long p_j,
                             int nq, int nk, int D) {
    for (int d = 0; d < D; d++)
        for (int i = 0; i < nq; i++) {
            float acc = O[i * o_i + d * o_d];
            for (int j = 0; j < nk; j++) {
                const float p = P[i * p_i + j * p_j];
                if (p != 0.0f) acc = fmaf(Vb[(size_t)j * D + d], p, acc);
            }
            O[i * o_i + d * o_d] = acc;
        }
}

/* Widen keys and values t0 .. t0+nk-1 (cache positions slot[t]) to fp32: Vb (nk, D); with Kb (nk, D) when Kb. */
static void da_widen_tile(float *Kb, float *Vb, const void *keys, const void *values, int dtype, const long *slot,
                          int t0, int nk, int D) {
    for (int j = 0; j < nk; j++) {
        const long at = slot[t0 + j] * D;
        if (dtype == KV_F32) {
            if (Kb) memcpy(Kb + (size_t)j * D, (const float *)keys + at, sizeof(float) * D);
            memcpy(Vb + (size_t)j * D, (const float *)values + at, sizeof(float) * D);
        } else {
            if (Kb) kv_widen(keys, dtype, at, Kb + (size_t)j * D, D);
            kv_widen(values, dtype, at, Vb + (size_t)j * D, D);
        }
    }
}

/* The next tile's cache lines, asked for while this tile computes (a decode row streams its whole cache from
 * memory), a share at a time between its steps: all at once, they leave the memory idle for the rest of the tile
 * (measured, a decode row at 8K keys, fp16 cache: the keys path 1.5x faster with 7 shares than with one burst,
 * the lanes path 1.2x faster with 4 shares than with none). Keys next .. end-1: positions slot[next .. end-1]. */
typedef struct { const char *keys, *values; const long *slot; long bytes; int next, end; } DaPrefetch;

static inline DaPrefetch da_prefetcher(const void *keys, const void *values, int dtype, const long *slot, int D) {
    const DaPrefetch pf = {keys, values, slot, (long)D * (dtype == KV_F32 ? sizeof(float) : sizeof(uint16_t)), 0, 0};
    return pf;
}

/* Aim at the tile after the one at t0 (of P keys). */
static inline void da_prefetch_after(DaPrefetch *pf, int t0, int P) {
    pf->next = t0 + DA_KB < P ? t0 + DA_KB : P, pf->end = t0 + 2 * DA_KB < P ? t0 + 2 * DA_KB : P;
}

/* Ask for 1 / shares_left of the keys still to come (1: all of them), their keys' and values' lines. */
static inline void da_prefetch_share(DaPrefetch *pf, int shares_left) {
    const int stop = pf->next + (pf->end - pf->next + shares_left - 1) / shares_left;
    for (; pf->next < stop; pf->next++)
        for (long b = 0; b < pf->bytes; b += 64) {
            _mm_prefetch(pf->keys + pf->slot[pf->next] * pf->bytes + b, _MM_HINT_T0);
            _mm_prefetch(pf->values + pf->slot[pf->next] * pf->bytes + b, _MM_HINT_T0);
        }
}

/* Per-thread scratch floats for G query heads per KV head of head_dim D (per query: 3 floats for
 * dense_attend_lanes, 4 for dense_attend_keys). */
static inline size_t da_scratch_floats(int G, int D) {
    const size_t NQ = da_lanes(G);
    return (size_t)D * NQ * 2 + (size_t)DA_KB * NQ + (size_t)DA_KB * D * 2 + 4 * NQ + 64;
}

/* dense_attend with the queries along the lanes (the header's). */
static void dense_attend_lanes(const float *q, long ldq, float *out, long ldo, int n, int pos0, int G, int D,
                               float scale, const void *keys, const void *values, int dtype, const long *slot,
                               float *scratch) {
    const int nq = n * G, NQ = (nq + SP_VL - 1) / SP_VL * SP_VL, nvec = NQ / SP_VL, P = pos0 + n;
    float *Qt = scratch, *Ot = Qt + (size_t)D * NQ, *S = Ot + (size_t)D * NQ, *Kb = S + (size_t)DA_KB * NQ;
    float *Vb = Kb + (size_t)DA_KB * D, *M = Vb + (size_t)DA_KB * D, *L = M + NQ, *lim = L + NQ;
    for (int i = 0; i < NQ; i++) {
        const int r = i < nq ? i / G : n - 1;  /* lanes past nq: a zero query of the last row, results unused */
        for (int d = 0; d < D; d++) Qt[(size_t)d * NQ + i] = i < nq ? q[r * ldq + (i % G) * D + d] * scale : 0.0f;
        M[i] = -INFINITY, L[i] = 0.0f, lim[i] = (float)(pos0 + r + 1);
    }
    memset(Ot, 0, sizeof(float) * D * NQ);
    DaPrefetch pf = da_prefetcher(keys, values, dtype, slot, D);
    for (int t0 = 0; t0 < P; t0 += DA_KB) {
        const int nk = P - t0 < DA_KB ? P - t0 : DA_KB, nk4 = (nk + 3) & ~3;
        da_prefetch_after(&pf, t0, P);
        da_prefetch_share(&pf, 4);
        da_widen_tile(Kb, Vb, keys, values, dtype, slot, t0, nk, D);
        if (nk4 > nk) memset(Kb + (size_t)nk * D, 0, sizeof(float) * (nk4 - nk) * D);
        da_prefetch_share(&pf, 3);
        da_gemm0(S, NQ, Kb, D, 1, Qt, NQ, D, nk4, nvec);  /* S[j][i] = K[j] . Qt[:, i] */
        da_prefetch_share(&pf, 2);
        const int masked = t0 + nk > pos0 + 1;              /* a key past the first row's position */
        for (int c = 0; c < nvec; c++) {
            const spvec lc = sp_load(lim + c * SP_VL), m0 = sp_load(M + c * SP_VL);
            spvec mt = sp_set1(-INFINITY);
            for (int j = 0; j < nk; j++) {
                float *s = S + (size_t)j * NQ + c * SP_VL;
                spvec x = sp_load(s);
                if (masked) { x = da_causal(x, sp_set1((float)(t0 + j)), lc); sp_store(s, x); }
                mt = da_max(x, mt);
            }
            const spvec m1 = da_max(mt, m0), alpha = da_exp(da_sub(m0, m1));
            spvec sum = sp_zero();
            for (int j = 0; j < nk; j++) {  /* p = exp(s - max), 0 for masked keys; summed in key order */
                float *s = S + (size_t)j * NQ + c * SP_VL;
                const spvec x = sp_load(s), e = da_unless_ninf(da_exp(da_sub(x, m1)), x);
                sp_store(s, e);
                sum = da_add(sum, e);
            }
            sp_store(L + c * SP_VL, sp_fmadd(sp_load(L + c * SP_VL), alpha, sum));
            sp_store(M + c * SP_VL, m1);
            if (da_any_ne(m1, m0))  /* a new running max: rescale the sums so far (alpha is exactly 1 otherwise) */
                for (int d = 0; d < D; d++)
                    sp_store(Ot + (size_t)d * NQ + c * SP_VL, sp_mul(sp_load(Ot + (size_t)d * NQ + c * SP_VL), alpha));
        }
        da_prefetch_share(&pf, 1);
        if (masked && !da_all_finite(Vb, (size_t)nk * D))
            da_masked_values(Ot, 1, NQ, Vb, S, 1, NQ, NQ, nk, D);  /* no inf/NaN value into a query that can't see it */
        else
            da_gemm1(Ot, NQ, Vb, 1, D, S, NQ, nk, D, nvec);  /* Ot[d][i] += sum_j V[j][d] * P[j][i] */
    }
    for (int i = 0; i < nq; i++) {
        const float inv = 1.0f / L[i];
        float *o = out + (i / G) * ldo + (i % G) * D;
        for (int d = 0; d < D; d++) o[d] = Ot[(size_t)d * NQ + i] * inv;
    }
}

#if defined(__AVX512F__)
#include "dense_attention_keys.c"  /* dense_attend_keys: the keys along the lanes */
#endif

/* Attention of rows r = 0 .. n-1 (positions pos0 + r of one sequence) for one KV head: row r's G query heads at
 * q + r * ldq (G, D), its result to out + r * ldo (G, D). keys / values: the (layer, seq, KV head)'s cache base,
 * elements of `dtype`, position t's vector at element slot[t] * D (slot: at least pos0 + n entries). n * G <=
 * da_lanes(G). scratch: da_scratch_floats(G, D) floats. */
static void dense_attend(const float *q, long ldq, float *out, long ldo, int n, int pos0, int G, int D, float scale,
                         const void *keys, const void *values, int dtype, const long *slot, float *scratch) {
#if defined(__AVX512F__)
    if (D % SP_VL == 0) {
        dense_attend_keys(q, ldq, out, ldo, n, pos0, G, D, scale, keys, values, dtype, slot, scratch);
        return;
    }
#endif
    dense_attend_lanes(q, ldq, out, ldo, n, pos0, G, D, scale, keys, values, dtype, slot, scratch);
}

/* The dense attention of one chunk on its own (tests): q (T, H, D) rotated queries at positions past .. past+T-1
 * of sequence seq, whose keys/values (layer l) are already in the cache; out (T, H, D). Blocks as the forward's. */
void dense_attention(const KVView *kv, int l, int seq, const float *q, int T, int past, int H, int Hkv, int D,
                     float *out, int nthreads) {
    const int G = H / Hkv, B = da_rows(G), nb = (T + B - 1) / B;
    const size_t elem = kv->dtype == KV_F32 ? sizeof(float) : sizeof(uint16_t);
    #pragma omp parallel num_threads(nthreads)
    {
        float *scratch = malloc(sizeof(float) * da_scratch_floats(G, D));
        long *slots = malloc(sizeof(long) * (size_t)(past + T));
        fill_slots(kv, seq, past + T, slots);
        #pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < nb * Hkv; item++) {
            const int r0 = item / Hkv * B, n = T - r0 < B ? T - r0 : B, gk = item % Hkv;
            const long base = l * kv->layer_stride + seq * kv->seq_stride + gk * kv->head_stride;
            dense_attend(q + (size_t)r0 * H * D + gk * G * D, (long)H * D, out + (size_t)r0 * H * D + gk * G * D,
                         (long)H * D, n, past + r0, G, D, 1.0f / sqrtf((float)D), (const char *)kv->k + base * elem,
                         (const char *)kv->v + base * elem, kv->dtype, slots, scratch);
        }
        free(scratch);
        free(slots);
    }
}
