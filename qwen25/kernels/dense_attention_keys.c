/* The AVX-512 build's dense_attend with the keys along the vector lanes (dense_attend_keys), included by
 * dense_attention.c inside its AVX-512 section, after the queries-on-lanes path: it uses that file's tiles,
 * micro-kernels, softmax steps, prefetcher and masked-values guard, and gives the same bits (see
 * dense_attention.c's header and dense_attend_keys' contract below). */
/* The keys along the lanes. Measured against the lanes path (Zen 5, 2 threads, fp16 cache, a layer's attention):
 * G = 7, D = 64 (0.5B) at 8K keys, a decode row 1.7x faster (243 vs 416 us), 2 / 4 / 16 rows 1.3x / 1.3x / 1.45x;
 * a 2K-token prefill 1.4x; G = 8, D = 128 (3B): a decode row 1.6x, 16 rows 1.4x, a 2K prefill 1.15x. AVX-512
 * only: with 8 lanes a decode row's 7 queries fill 7, and this path would do the same fmas (queries padded to 8
 * rows) plus the keys' transposition (measured slower). */

static inline float da_hmax(spvec x) { return _mm512_reduce_max_ps(x); }  /* x free of NaNs */

/* SP_VL elements of a cache vector from element `at`, widened exactly (as kv_widen) */
static inline spvec da_widened(const void *base, int dtype, long at) {
    if (dtype == KV_F32) return sp_load((const float *)base + at);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + at));
    return dtype == KV_F16 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* r[i][j] <- r[j][i]: a 16 x 16 block, rows r[0..15] */
static inline void da_transpose(spvec *r) {
    spvec t[16], u[16];
    for (int k = 0; k < 16; k += 2)  /* t[k]: per 128-bit chunk, elements 0,1 of rows k, k+1 interleaved; t[k+1]: 2,3 */
        t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]), t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
    for (int k = 0; k < 16; k += 4) {  /* u[k+m]: chunk c holds column m + 4c of rows k .. k+3 */
        const __m512d a = _mm512_castps_pd(t[k]), b = _mm512_castps_pd(t[k + 1]);
        const __m512d c = _mm512_castps_pd(t[k + 2]), d = _mm512_castps_pd(t[k + 3]);
        u[k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c)), u[k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d)), u[k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int m = 0; m < 4; m++) {  /* chunk c of u[m], u[4+m], u[8+m], u[12+m], side by side: column m + 4c */
        const spvec a = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88), b = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xdd);
        const spvec c = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
        const spvec d = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xdd);
        r[m] = _mm512_shuffle_f32x4(a, c, 0x88), r[m + 8] = _mm512_shuffle_f32x4(a, c, 0xdd);
        r[m + 4] = _mm512_shuffle_f32x4(b, d, 0x88), r[m + 12] = _mm512_shuffle_f32x4(b, d, 0xdd);
    }
}

/* Kt[d][j] = K[j][d] for keys j < nk of a tile (position j's vector at element slot[j] * D; 0 for nk <= j < DA_KB),
 * d < D (a multiple of 16): 16 x 16 blocks widened and transposed in registers. Inlined with constant dtype. */
static inline __attribute__((always_inline)) void da_keys_transposed(float *Kt, const void *keys, int dtype,
                                                                     const long *slot, int nk, int D) {
    for (int j0 = 0; j0 < DA_KB; j0 += SP_VL) {
        long at[SP_VL];
        for (int j = 0; j < SP_VL; j++) at[j] = j0 + j < nk ? slot[j0 + j] * D : -1;
        for (int d0 = 0; d0 < D; d0 += SP_VL) {
            spvec r[SP_VL];
            if (j0 + SP_VL <= nk)
                for (int j = 0; j < SP_VL; j++) r[j] = da_widened(keys, dtype, at[j] + d0);
            else
                for (int j = 0; j < SP_VL; j++) r[j] = at[j] < 0 ? sp_zero() : da_widened(keys, dtype, at[j] + d0);
            da_transpose(r);
            for (int d = 0; d < SP_VL; d++) sp_store(Kt + (size_t)(d0 + d) * DA_KB + j0, r[d]);
        }
    }
}

/* Ot[i][d] += sum over keys j < nk, in order, of P[i][j] * V[j][d] for rows i < rows (a multiple of 4; P[i] at
 * P + i * DA_KB, Ot[i] at Ot + i * D; D a multiple of 64), V[j] widened from the cache (element slot[j] * D) as it
 * is used: da_gemm1's chains, in tiles of 4 rows x 64 dims. Inlined with constant dtype. */
static inline __attribute__((always_inline)) void da_values_from_cache(float *Ot, const float *P, const void *values,
                                                                       int dtype, const long *slot, int nk, int rows,
                                                                       int D) {
    for (int d0 = 0; d0 < D; d0 += 4 * SP_VL)
        for (int r = 0; r < rows; r += 4) {
            spvec acc[4][4];
            for (int a = 0; a < 4; a++)
                for (int c = 0; c < 4; c++) acc[a][c] = sp_load(Ot + (size_t)(r + a) * D + d0 + c * SP_VL);
            for (int j = 0; j < nk; j++) {
                spvec v[4];
                for (int c = 0; c < 4; c++) v[c] = da_widened(values, dtype, slot[j] * D + d0 + c * SP_VL);
                for (int a = 0; a < 4; a++) {
                    const spvec w = sp_set1(P[(size_t)(r + a) * DA_KB + j]);
                    for (int c = 0; c < 4; c++) acc[a][c] = sp_fmadd(w, v[c], acc[a][c]);
                }
            }
            for (int a = 0; a < 4; a++)
                for (int c = 0; c < 4; c++) sp_store(Ot + (size_t)(r + a) * D + d0 + c * SP_VL, acc[a][c]);
        }
}

/* sum[k] = p[k][0] + p[k][1] + ... + p[k][nk-1] for 16 rows k (p[k] at p + k * DA_KB), added in that order from
 * 0, the rows side by side: their 16 x 16 blocks transposed, then a vector add per key. */
static inline void da_sums_in_key_order(const float *p, int nk, float *sum) {
    spvec acc = sp_zero();
    for (int j0 = 0; j0 < nk; j0 += SP_VL) {
        spvec r[SP_VL];
        for (int k = 0; k < SP_VL; k++) r[k] = sp_load(p + (size_t)k * DA_KB + j0);
        da_transpose(r);
        for (int j = 0; j < SP_VL && j0 + j < nk; j++) acc = da_add(acc, r[j]);
    }
    sp_store(sum, acc);
}

/* dense_attend with the keys along the lanes (D a multiple of 16). Per tile: the keys widened and transposed
 * (Kt (D, DA_KB)), scores S (queries, DA_KB) = Qs . Kt (da_gemm's micro-kernel, a query's element broadcast), the
 * online softmax along each query's row of S, then Ot (queries, D) += P . V (a weight broadcast; V widened as it
 * is read from the cache, but for a masked tile, whose values are checked for inf/NaN first, or D not a multiple
 * of 64). The result equals dense_attend_lanes' bit for bit: each score is the same chain fma(K[j][d], q[d], .)
 * over d = 0..D-1 from 0, each output element the same chain over the keys in order, tile after tile; per query
 * and tile the same max (exact in any order), the same da_exp of the same differences, its weights summed in key
 * order from 0 (one add per key, no tree), L = fma(L, alpha, sum), and Ot rescaled by alpha where that path rescales
 * it: a group of 16 queries (its vector of lanes) together when any of their maxima changed (alpha is exactly 1
 * for an unchanged finite max; its padding lanes take their max on the first tile, where Ot is +0, unless every
 * key there holds an inf/NaN); keys of weight 0 skipped on a masked tile whose values hold an inf/NaN. Arguments
 * and scratch as dense_attend's. */
static void dense_attend_keys(const float *q, long ldq, float *out, long ldo, int n, int pos0, int G, int D,
                              float scale, const void *keys, const void *values, int dtype, const long *slot,
                              float *scratch) {
    const int nq = n * G, NQ = (nq + SP_VL - 1) / SP_VL * SP_VL, rows = (nq + 3) & ~3, P = pos0 + n;
    float *Qs = scratch, *Ot = Qs + (size_t)D * NQ, *S = Ot + (size_t)D * NQ, *Kt = S + (size_t)DA_KB * NQ;
    float *Vb = Kt + (size_t)DA_KB * D, *M = Vb + (size_t)DA_KB * D, *M1 = M + NQ, *L = M1 + NQ, *sum = L + NQ;
    for (int i = 0; i < rows; i++)  /* rows past nq: zero queries, results unused */
        for (int d = 0; d < D; d++) Qs[(size_t)i * D + d] = i < nq ? q[(i / G) * ldq + (i % G) * D + d] * scale : 0.0f;
    for (int i = 0; i < NQ; i++) M[i] = M1[i] = i < nq ? -INFINITY : 0.0f, L[i] = sum[i] = 0.0f;
    memset(Ot, 0, sizeof(float) * rows * D);
    memset(S + (size_t)rows * DA_KB, 0, sizeof(float) * (NQ - rows) * DA_KB);  /* rows the sums read, unused */
    DaPrefetch pf = da_prefetcher(keys, values, dtype, slot, D);
    for (int t0 = 0; t0 < P; t0 += DA_KB) {
        const int nk = P - t0 < DA_KB ? P - t0 : DA_KB, masked = t0 + nk > pos0 + 1;
        da_prefetch_after(&pf, t0, P);
        da_prefetch_share(&pf, 7);
        const int widen_values = masked || D % (4 * SP_VL);  /* into Vb, else read by da_values_from_cache */
        if (widen_values) da_widen_tile(NULL, Vb, keys, values, dtype, slot, t0, nk, D);
        if (dtype == KV_F32) da_keys_transposed(Kt, keys, KV_F32, slot + t0, nk, D);
        else if (dtype == KV_F16) da_keys_transposed(Kt, keys, KV_F16, slot + t0, nk, D);
        else da_keys_transposed(Kt, keys, KV_BF16, slot + t0, nk, D);
        da_prefetch_share(&pf, 6);
        da_gemm0(S, DA_KB, Qs, D, 1, Kt, DA_KB, D, rows, DA_KB / SP_VL);  /* S[i][j] = Qs[i] . Kt[:, j] */
        da_prefetch_share(&pf, 5);
        const spvec key = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int i = 0; i < nq; i++) {  /* a query's scores masked (-inf: keys it may not see, keys past nk), max */
            const int seen = pos0 + i / G + 1 - t0;
            const spvec lim = sp_set1((float)(seen < nk ? seen : nk));
            spvec mv = sp_set1(-INFINITY);
            for (int c = 0; c < DA_KB; c += SP_VL) {
                float *s = S + (size_t)i * DA_KB + c;
                const spvec x = da_causal(sp_load(s), da_add(key, sp_set1((float)c)), lim);
                sp_store(s, x);
                mv = da_max(x, mv);
            }
            const float mt = da_hmax(mv);
            M1[i] = mt > M[i] ? mt : M[i];  /* da_max(mt, m0) */
        }
        da_prefetch_share(&pf, 4);
        for (int i = 0; i < nq; i++)  /* p = exp(s - max), 0 for masked keys */
            for (int c = 0; c < DA_KB; c += SP_VL) {
                float *s = S + (size_t)i * DA_KB + c;
                const spvec x = sp_load(s);
                sp_store(s, da_unless_ninf(da_exp(da_sub(x, sp_set1(M1[i]))), x));
            }
        da_prefetch_share(&pf, 3);
        for (int c = 0; c < nq; c += SP_VL)  /* the sums of p in key order (rows past nq: unused) */
            da_sums_in_key_order(S + (size_t)c * DA_KB, nk, sum + c);
        da_prefetch_share(&pf, 2);
        for (int c = 0; c < nq; c += SP_VL) {  /* 16 queries (lanes past nq: M = M1 = 0) */
            const spvec m0 = sp_load(M + c), m1 = sp_load(M1 + c), alpha = da_exp(da_sub(m0, m1));
            sp_store(L + c, sp_fmadd(sp_load(L + c), alpha, sp_load(sum + c)));
            sp_store(M + c, m1);
            if (da_any_ne(m1, m0)) {  /* a new running max: rescale the sums so far, as the lanes path */
                float a[SP_VL];
                sp_store(a, alpha);
                for (int k = 0; k < SP_VL && c + k < nq; k++)
                    for (int d = 0; d < D; d += SP_VL) {
                        float *o = Ot + (size_t)(c + k) * D + d;
                        sp_store(o, sp_mul(sp_load(o), sp_set1(a[k])));
                    }
            }
        }
        da_prefetch_share(&pf, 1);
        if (!widen_values) {
            if (dtype == KV_F32) da_values_from_cache(Ot, S, values, KV_F32, slot + t0, nk, rows, D);
            else if (dtype == KV_F16) da_values_from_cache(Ot, S, values, KV_F16, slot + t0, nk, rows, D);
            else da_values_from_cache(Ot, S, values, KV_BF16, slot + t0, nk, rows, D);
        } else if (masked && !da_all_finite(Vb, (size_t)nk * D))
            da_masked_values(Ot, D, 1, Vb, S, DA_KB, 1, nq, nk, D);  /* no inf/NaN into a query that can't see it */
        else
            da_gemm1(Ot, D, S, DA_KB, 1, Vb, D, nk, rows, D / SP_VL);  /* Ot[i][d] += sum_j P[i][j] * V[j][d] */
    }
    for (int i = 0; i < nq; i++) {
        const float inv = 1.0f / L[i];
        float *o = out + (i / G) * ldo + (i % G) * D;
        for (int d = 0; d < D; d++) o[d] = Ot[(size_t)i * D + d] * inv;
    }
}
