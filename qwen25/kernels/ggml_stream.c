/* One activation row against a panel of weight rows straight from the file's blocks, without packing: the decode
 * kernel (included by ggml_panel.c, which picks it for passes of few rows).
 *
 * Packing a panel (ggml_panel.c) costs more per weight byte than one activation row's dot products, so a decode
 * pass, which reads each weight once, would be bound by the packing (~8 GB/s per core) instead of by memory. Here
 * each weight row's block is unpacked into registers and dotted with the activation block (as in the row kernels
 * before the panels); the 8 int32 lanes of each of 8 rows are then summed across lanes into one vector, lane j =
 * weight row j's exact integer block sum. The integers equal the panel kernel's (both are exact), and the fp32
 * steps that follow are the panel kernel's, lane for lane: fma((float)S, d_w * d_x, acc) per block in block order
 * (and Q4_K's minimum term). So a row's result is the same bits whichever kernel runs it. */

/* int32 lane j = sum of u[4j..4j+3] * s[4j..4j+3], u unsigned bytes (<= 128), s signed: exact (pairs fit int16) */
static inline __m256i dot_us(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* signed weights w and activations x: |w| times x with w's sign */
static inline __m256i dot_ss(__m256i w, __m256i x) { return dot_us(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)); }

/* lane j = the sum of v[j]'s 8 lanes */
static inline __m256i hsum8x8(const __m256i *v) {
    const __m256i a0 = _mm256_hadd_epi32(v[0], v[1]), a1 = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i a2 = _mm256_hadd_epi32(v[4], v[5]), a3 = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i b0 = _mm256_hadd_epi32(a0, a1), b1 = _mm256_hadd_epi32(a2, a3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define ROWS_DOT_S16(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)  /* acc + the two adjacent s16 x s16 products */
#else
#define ROWS_DOT_S16(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif

/* An accumulator kept as one register chain: without this GCC reassociates the integer sums into a tree, keeping
 * every product of a block alive, and spills them (measured ~1.4x slower on Q6_K). */
#define ROWS_CHAIN(v) __asm__("" : "+x"(v))

/* Q6_K for one activation row (stream_block) or a group of G <= 4 (ggml_stream_rows.c): the weight side is
 * prepared once per block: the unsigned q6 (<= 63, so a maddubs pair fits int16) and, per activation row, each
 * sub-block's scale times the row's factor 2^e for those values (ggml_dot.c) in the 16-bit lanes of its values,
 * multiplied in the pairwise add; the -32 is folded as -32 * scale_k * (the activation's shifted sum over
 * sub-block k). v[i]: lanes whose sum is the exact integer block sum for activation row i. (A signed q6 - 32 per
 * row, as before, cost a sign and a 32-bit multiply per 32 values: one row of the 1.5B's ffn_down went 0.28 ->
 * 0.23 ms with this, AMD EPYC: avx2 avx512f avx512_vnni avx512_bf16, 2 threads.) */
static inline __attribute__((always_inline)) void rows_q6k(int G, const uint8_t *blk, const int8_t *const *x,
                                                           const int16_t *const *xs, size_t b, __m256i *v) {
    const uint8_t *ql = blk, *qh = blk + 128;
    const __m128i sc8 = _mm_loadu_si128((const __m128i *)(blk + 192));
    const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3);
    const __m256i sw = _mm256_cvtepi8_epi16(sc8);  /* the 16 scales, int16 */
    const __m256i scm = _mm256_mullo_epi16(sw, _mm256_set1_epi16(-32));  /* |.| <= 4096 */
    /* per activation row: the scales times its factors 2^e (|.| <= 1024), each 128-bit half in both halves */
    __m256i slo[4], shi[4];
    for (int i = 0; i < G; i++) {
        const int16_t *xb = xs[i] + KSUMS * b;
        v[i] = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb), scm);
        const __m256i sf = _mm256_mullo_epi16(sw, _mm256_loadu_si256((const __m256i *)(xb + 32)));
        slo[i] = _mm256_permute2x128_si256(sf, sf, 0x00), shi[i] = _mm256_permute2x128_si256(sf, sf, 0x11);
    }
#pragma GCC unroll 8
    for (int t = 0; t < 8; t++) {  /* values 32t..32t+31: sub-blocks 2t, 2t + 1 */
        const int h = t / 4, k = t % 4;
        const __m256i lo = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32 * (k % 2)));
        const __m256i hi = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
        const __m256i nib = _mm256_and_si256(k < 2 ? lo : _mm256_srli_epi16(lo, 4), low);
        const __m256i u = _mm256_or_si256(nib, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 2 * k), two), 4));
        /* words 2t and 2t + 1 (of their half) into the 16-bit lanes of the two sub-blocks' values */
        const char a0 = (char)(4 * t % 16), a1 = (char)(a0 + 1), b0 = (char)(a0 + 2), b1 = (char)(a0 + 3);
        const __m256i ctl = _mm256_setr_epi8(a0, a1, a0, a1, a0, a1, a0, a1, a0, a1, a0, a1, a0, a1, a0, a1,
                                             b0, b1, b0, b1, b0, b1, b0, b1, b0, b1, b0, b1, b0, b1, b0, b1);
        for (int i = 0; i < G; i++) {
            const __m256i sci = _mm256_shuffle_epi8(t < 4 ? slo[i] : shi[i], ctl);
            v[i] = ROWS_DOT_S16(v[i], _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(x[i] + 256 * b + 32 * t))), sci);
            ROWS_CHAIN(v[i]);
        }
    }
}

/* Lanes whose sum is the exact integer dot product of weight row block `blk` with the activation block x (32 or
 * 256 values), less STREAM_OFFSET(type) * (the activation block's sum) for the 32-value types: Q5_0 as its
 * unsigned q5 (offset 16), Q8_0 as w + 128 on avx512 (offset 128) and as signed values on avx2 (offset 0); Q6_K
 * as q6 - 32 times its sub-block scales (rows_q6k), Q4_K its codes times its sub-block scales (stream_q4k), both times
 * the activation's factors 2^e; xs: the activation block's KSUMS sums, exponents and factors (ggml_dot.c). */
#if PANEL == 16
#define STREAM_OFFSET(type) ((type) == T_Q5_0 ? 16 : 128)
#else
#define STREAM_OFFSET(type) ((type) == T_Q5_0 ? 16 : 0)
#endif
static inline __attribute__((always_inline)) __m256i stream_block(int type, const uint8_t *blk, const int8_t *x,
                                                                 const int16_t *xs, int32_t *mins) {
    if (type == T_Q5_0 || type == T_Q8_0) {
        __m256i w;
        if (type == T_Q5_0) {
            uint32_t qh;
            memcpy(&qh, blk + 2, 4);
            /* the 16 bytes in both halves (a load, no shuffle), the high half shifted by 4: low nibbles, then high */
            const __m256i qs = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 6)));
            w = _mm256_and_si256(_mm256_srlv_epi32(qs, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0F));
            return dot_us(_mm256_or_si256(w, fifth_bits(qh)), _mm256_loadu_si256((const __m256i *)x));
        }
        w = _mm256_loadu_si256((const __m256i *)(blk + 2));
#if PANEL == 16
        return dot_us(_mm256_xor_si256(w, _mm256_set1_epi8((char)0x80)), _mm256_loadu_si256((const __m256i *)x));
#else
        return dot_ss(w, _mm256_loadu_si256((const __m256i *)x));
#endif
    }
    __m256i isum = _mm256_setzero_si256();
    if (type == T_Q4_K) {  /* see stream_q4k */
        (void)mins;
        return isum;
    }
    rows_q6k(1, blk, &x, &xs, 0, &isum);  /* Q6_K: the group kernel's steps for one row */
    return isum;
}

/* Q4_K's 12 bytes of 6-bit (scale, min) pairs at s (read as 16 bytes: the block goes on) -> bytes 0-7 the 8
 * sub-block scales, bytes 8-15 the 8 minimums (j < 4: the low 6 bits of bytes j and j + 4; j >= 4: the nibbles of
 * byte j + 4 with the top 2 bits of bytes j - 4 and j as their bits 4-5) */
static inline __m128i q4k_scales_mins(const uint8_t *s) {
    const __m128i u = _mm_loadu_si128((const __m128i *)s);  /* 32-bit words u0 u1 u2 (u3: not ours) */
    const __m128i lo = _mm_and_si128(u, _mm_set1_epi8(0x3F));  /* words: scales 0-3, minimums 0-3 */
    const __m128i u2 = _mm_srlv_epi32(_mm_shuffle_epi32(u, 0xAA), _mm_setr_epi32(0, 4, 0, 0));  /* u2, u2 >> 4 */
    const __m128i hi = _mm_or_si128(_mm_and_si128(u2, _mm_set1_epi8(0x0F)),
                                    _mm_and_si128(_mm_srli_epi32(u, 2), _mm_set1_epi8(0x30)));  /* scales 4-7, mins 4-7 */
    return _mm_unpacklo_epi32(lo, hi);  /* scales 0-3, 4-7, minimums 0-3, 4-7 */
}

/* One Q4_K block (256 values) against the activation block x (xs: its KSUMS sums, exponents and factors,
 * ggml_dot.c): lanes whose sum is the exact integer sum over sub-blocks j of scale_j * 2^e_j * (codes_j . x_j), and
 * in *mv lanes whose sum is the sum over j of minimum_j * (the activation's shifted sum over sub-block j). Each
 * sub-block's byte pairs (maddubs: <= 2 * 15 * 127) are multiplied by scale_j * 2^e_j (<= 504) in the pairwise add
 * (madd with it in every 16-bit lane): all exact. */
static inline __attribute__((always_inline)) __m256i stream_q4k(const uint8_t *blk, const int8_t *x, const int16_t *xs,
                                                               __m256i *mv) {
    const __m128i sm = q4k_scales_mins(blk + 4);
    const __m256i sm2 = _mm256_broadcastsi128_si256(sm);
    /* the 8 scales times the activation's 2^e_j, int16 (<= 63 x 8): one multiply per block, not a shift per j */
    const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_mullo_epi16(_mm_cvtepu8_epi16(sm),
                                                                     _mm_loadu_si128((const __m128i *)(xs + 24))));
    const __m256i low = _mm256_set1_epi8(0x0F);
    /* minimum k in 16-bit lanes 2k and 2k + 1 (the bytes 8 + k, zero-extended), times xs pairs */
    const __m256i mdup = _mm256_shuffle_epi8(sm2, _mm256_setr_epi8(8, -1, 8, -1, 9, -1, 9, -1, 10, -1, 10, -1, 11, -1,
                                                                   11, -1, 12, -1, 12, -1, 13, -1, 13, -1, 14, -1,
                                                                   14, -1, 15, -1, 15, -1));
    *mv = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xs), mdup);
    const uint8_t *qs = blk + 16;
    __m256i isum = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        for (int h = 0; h < 2; h++) {
            const int j = 2 * c + h;
            const __m256i w = h ? _mm256_and_si256(_mm256_srli_epi16(v, 4), low) : _mm256_and_si256(v, low);
            const __m256i sc = _mm256_shuffle_epi8(sc16, _mm256_set1_epi16((short)((2 * j + 1) << 8 | 2 * j)));  /* word j */
            const __m256i p = _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)(x + 32 * j)));
            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p, sc));  /* not dpwssd: its latency would chain them */
        }
    }
    return isum;
}

/* lanes 0-3 = the sums of a's, b's, c's and e's 8 lanes */
static inline __m128i hsum4x8(__m256i a, __m256i b, __m256i c, __m256i e) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, e));  /* per half: a b c e */
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* lanes 0, 1 = the sums of a's and b's 8 lanes */
static inline __m128i hsum2x8(__m256i a, __m256i b) {
    const __m256i h = _mm256_hadd_epi32(a, b);  /* per half: a01 a23 b01 b23 */
    const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    return _mm_hadd_epi32(s, s);  /* lane 0: a, lane 1: b */
}

/* out[j] = lane j of acc, j < n (all 8 when n >= 8) */
static inline void store_rows8(float *out, __m256 acc, int n) {
    if (n >= 8) {
        _mm256_storeu_ps(out, acc);
        return;
    }
    float f[8];
    _mm256_storeu_ps(f, acc);
    for (int j = 0; j < n; j++) out[j] = f[j];
}

/* The 32-value types (run for Q5_0) for rows rows[j], j < nvalid, 8 rows at a time: each row is still read from
 * start to end, one after the other (STREAM_CHUNK blocks of it at a time: all of it for widths up to 2048), its
 * blocks' lane vectors and fp16 scales kept in a small buffer; then, block by block, the 8 rows' vectors are
 * reduced across lanes into one vector, lane j = row j's exact integer block sum, and scaled and accumulated as
 * vectors: lane j takes the steps of row j's scalar chain, so no row waits on a chain of dependent scalar fmas
 * (the bound of the one-row-at-a-time loop). rows[j] must be valid for j < nvalid rounded up to 8 (panel_run
 * repeats the last row). */
#define STREAM_CHUNK 64
static inline __attribute__((always_inline)) void stream_rows32(int type, const uint8_t *const *rows, int nb,
                                                                const int8_t *q, const float *d, const int16_t *xs,
                                                                float *out, int nvalid) {
    const int bytes = ggml_block_bytes(type);
    for (int j0 = 0; j0 < nvalid; j0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int c0 = 0; c0 < nb; c0 += STREAM_CHUNK) {
            const int cb = nb - c0 < STREAM_CHUNK ? nb - c0 : STREAM_CHUNK;
            __m256i v[STREAM_CHUNK][8];
            uint16_t hv[STREAM_CHUNK][8];
            for (int j = 0; j < 8; j++) {
                const uint8_t *k = rows[j0 + j] + (size_t)c0 * bytes;
                for (int t = 0; t < cb; t++) {
                    v[t][j] = stream_block(type, k + t * bytes, q + (size_t)(c0 + t) * 32, xs, NULL);
                    memcpy(&hv[t][j], k + t * bytes, 2);
                }
            }
            for (int t = 0; t < cb; t++) {
                const int b = c0 + t;
                const __m256i S = _mm256_sub_epi32(hsum8x8(v[t]), _mm256_set1_epi32(STREAM_OFFSET(type) * xs[b]));
                const __m256 pf = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)hv[t])),
                                                _mm256_set1_ps(d[b]));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(S), pf, acc);
            }
        }
        store_rows8(out + j0, acc, nvalid - j0);
    }
}

/* The K types for rows of at most STREAM_K_BLOCKS blocks (rows rows[j], j < nvalid), 8 rows at a time: each row read
 * from start to end, its blocks' lane vectors (Q4_K: and minimum terms) and fp16 scales kept in a small buffer;
 * then per block the 8 rows' vectors are reduced across lanes into one vector, lane j = row j's exact integer block
 * sum, and lane j takes row j's fp32 steps: fma((float)S, d_w * d_x, acc), then for Q4_K fma(-(float)M,
 * dmin_w * d_x, acc). The reductions and the fp32 chain cost an eighth of stream_row's: one row of a 1536-wide
 * Q4_K matrix (the 1.5B's ffn_up, one thread, in L3) 9.2 -> 7.2 ns per block; the 1.5B's decode ~28 -> ~30 tok/s
 * on avx512, within noise on avx2 (AMD EPYC Zen 4 (family 25, model 17): avx2 avx512f avx512_vnni avx512_bf16, 2
 * threads). Wider rows keep stream_row: eight rows' buffers of 35 blocks (8960 values) measured 2x slower. */
#define STREAM_K_BLOCKS 8
static inline __attribute__((always_inline)) void stream_rows_k(int type, const uint8_t *const *rows, int nb,
                                                                const int8_t *q, const float *d, const int16_t *xs,
                                                                float *out, int nvalid) {
    const int bytes = type == T_Q4_K ? 144 : 210, dat = type == T_Q6_K ? 208 : 0;
    for (int j0 = 0; j0 < nvalid; j0 += 8) {
        __m256i v[STREAM_K_BLOCKS][8], mv[STREAM_K_BLOCKS][8];
        uint16_t hd[STREAM_K_BLOCKS][8], hm[STREAM_K_BLOCKS][8];
        for (int j = 0; j < 8; j++) {
            const uint8_t *k = rows[j0 + j];
            for (int b = 0; b < nb; b++) {
                if (type == T_Q4_K) {
                    v[b][j] = stream_q4k(k + b * bytes, q + (size_t)b * 256, xs + (size_t)b * KSUMS, &mv[b][j]);
                    memcpy(&hm[b][j], k + b * bytes + 2, 2);
                } else {
                    v[b][j] = stream_block(type, k + b * bytes, q + (size_t)b * 256, xs + (size_t)b * KSUMS, NULL);
                }
                memcpy(&hd[b][j], k + b * bytes + dat, 2);
            }
        }
        __m256 acc = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const __m256 db = _mm256_set1_ps(d[b]);
            const __m256 pf = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)hd[b])), db);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8x8(v[b])), pf, acc);
            if (type == T_Q4_K) {
                const __m256 pm = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)hm[b])), db);
                acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(hsum8x8(mv[b])), pm, acc);
            }
        }
        store_rows8(out + j0, acc, nvalid - j0);
    }
}

/* The panel kernel's result for one activation row (q, d: its quantized values and block scales; xs: its KSUMS
 * sums and exponents per block for the K types, its sum per block for the 32-value ones) against the weight rows rows[j], j < nvalid (nb
 * blocks each): out[j]. Each row is read from start to end (one memory stream at a time, which the hardware
 * prefetchers follow best: measured slower with four rows side by side); its block sums are reduced to exact
 * integers (32-value blocks eight at a time, K types two at a time), and its fp32 chain runs in scalars: fmaf
 * rounds as a panel lane's fma does, so the bits are the panel kernel's. Q5_0 on the avx2 build runs
 * stream_rows32 (0.5B decode, two threads, same run: avx2 +7%; the avx512 build measured ~7% slower with it,
 * and Q8_0, whose blocks take fewer instructions, ~4% slower). */
static inline __attribute__((always_inline)) void stream_row(int type, const uint8_t *const *rows, int nb,
                                                             const int8_t *q, const float *d, const int16_t *xs,
                                                             float *out, int nvalid) {
    const int kq = type == T_Q4_K || type == T_Q6_K, qk = kq ? 256 : 32;
    const int bytes = ggml_block_bytes(type);
    const int dat = type == T_Q6_K ? 208 : 0;
    if (type == T_Q5_0 && PANEL == 8) {  /* avx2 build (see above) */
        stream_rows32(type, rows, nb, q, d, xs, out, nvalid);
        return;
    }
    if (kq && nb <= STREAM_K_BLOCKS) {
        stream_rows_k(type, rows, nb, q, d, xs, out, nvalid);
        return;
    }
    for (int j = 0; j < nvalid; j++) {
        float acc = 0.0f;
        int b0 = 0;
        if (!kq)  /* 32-value blocks: eight at a time, their sums reduced and scales multiplied as vectors */
            for (; b0 + 8 <= nb; b0 += 8) {
                const uint8_t *k = rows[j] + (size_t)b0 * bytes;
                __m256i v[8];
                for (int t = 0; t < 8; t++) v[t] = stream_block(type, k + t * bytes, q + (size_t)(b0 + t) * 32, xs, NULL);
                uint16_t hv[8];
                for (int t = 0; t < 8; t++) memcpy(&hv[t], k + t * bytes, 2);
                float sf[8], pf[8];
                const __m256i xsum = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(xs + b0)));
                const __m256i S = _mm256_sub_epi32(hsum8x8(v), _mm256_mullo_epi32(xsum, _mm256_set1_epi32(STREAM_OFFSET(type))));
                _mm256_storeu_ps(sf, _mm256_cvtepi32_ps(S));
                _mm256_storeu_ps(pf, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)hv)),
                                                   _mm256_loadu_ps(d + b0)));
                for (int t = 0; t < 8; t++) acc = fmaf(sf[t], pf[t], acc);
            }
        if (type == T_Q4_K) {  /* two blocks at a time: both sums and both minimum terms reduced at once */
            for (int b = 0; b < nb; b += 2) {
                const int two = b + 1 < nb;
                const uint8_t *k0 = rows[j] + (size_t)b * bytes, *k1 = two ? k0 + bytes : k0;
                __m256i m0, m1;
                const __m256i v0 = stream_q4k(k0, q + (size_t)b * qk, xs + (size_t)b * KSUMS, &m0);
                const __m256i v1 = stream_q4k(k1, q + (size_t)(b + two) * qk, xs + (size_t)(b + two) * KSUMS, &m1);
                const __m128i S = hsum4x8(v0, m0, v1, m1);
                acc = fmaf((float)_mm_cvtsi128_si32(S), f16(k0) * d[b], acc);
                acc = fmaf(-(float)_mm_extract_epi32(S, 1), f16(k0 + 2) * d[b], acc);
                if (!two) break;
                acc = fmaf((float)_mm_extract_epi32(S, 2), f16(k1) * d[b + 1], acc);
                acc = fmaf(-(float)_mm_extract_epi32(S, 3), f16(k1 + 2) * d[b + 1], acc);
            }
            out[j] = acc;
            continue;
        }
        for (int b = b0; b < nb; b += 2) {
            const int two = b + 1 < nb;
            const uint8_t *k0 = rows[j] + (size_t)b * bytes, *k1 = two ? k0 + bytes : k0;
            int32_t m0 = 0, m1 = 0;
            const __m256i v0 = stream_block(type, k0, q + (size_t)b * qk, kq ? xs + (size_t)b * KSUMS : xs, &m0);
            const __m256i v1 = two ? stream_block(type, k1, q + (size_t)(b + 1) * qk, kq ? xs + (size_t)(b + 1) * KSUMS : xs, &m1)
                                   : _mm256_setzero_si256();
            const __m128i S = hsum2x8(v0, v1);
            const int o0 = kq ? 0 : STREAM_OFFSET(type) * xs[b], o1 = kq || !two ? 0 : STREAM_OFFSET(type) * xs[b + 1];
            acc = fmaf((float)(_mm_cvtsi128_si32(S) - o0), f16(k0 + dat) * d[b], acc);
            if (type == T_Q4_K) acc = fmaf(-(float)m0, f16(k0 + 2) * d[b], acc);
            if (!two) break;
            acc = fmaf((float)(_mm_extract_epi32(S, 1) - o1), f16(k1 + dat) * d[b + 1], acc);
            if (type == T_Q4_K) acc = fmaf(-(float)m1, f16(k1 + 2) * d[b + 1], acc);
        }
        out[j] = acc;
    }
}
