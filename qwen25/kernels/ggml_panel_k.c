/* Q4_K / Q6_K panels (included by ggml_panel.c, after its Q5_0 / Q8_0 kernels): packing the file's super-blocks
 * (256 values) of PANEL weight rows and one tile of activation rows against a packed panel. The layout and the
 * fp32 steps are described at each function; the integer sums are exact, as for the 32-value types. */

/* Q4_K / Q6_K super-blocks (256 values) of the PANEL rows, super-block b at dst + b * PANEL_KBLOCK_BYTES as vectors
 * of PANEL lanes (lane j: weight row j): 64 vectors of quants (vector t: values 4t..4t+3, unsigned: Q4_K's 4-bit
 * codes, Q6_K's 6-bit q + 32; on avx512 Q4_K fills only the first 32, vector D holding code bytes 4D..4D+3 as they
 * lie, two codes each, which the tile splits with a mask and a shift: half the stores, and 8-row passes over the
 * 1.5B's 28 ffn_gate / ffn_up / ffn_down 24.0-24.3 / 24.1-25.1 / 12.7-13.3 -> 22.5-23.6 / 22.4-22.6 / 11.8-12.5 ms,
 * 8 streams of the 1.5B +2-7% and its prefill +4-9% in 3 alternating runs; AMD EPYC Zen 4: avx2 avx512f avx512_vnni
 * avx512_bf16, 2 threads; avx2, whose tile reloads each weight vector per activation row, keeps 64), then
 *   Q4_K: 8 sub-block scales (int32), 4 vectors of minimum pairs (int16: sub-blocks 2p, 2p + 1), d, dmin (fp32);
 *   Q6_K: 16 sub-block scales (int32), d (fp32). */
static void panel_pack_k(int type, const uint8_t *const *rows, int nb, uint8_t *dst, const uint8_t *ahead,
                         size_t ahead_bytes, int ahead_l2) {
    const pvi low = PV_SET1B(0x0F), two = PV_SET1B(0x03);
    for (int b = 0; b < nb; b++) {
        prefetch_share(ahead, ahead_bytes, b, nb, ahead_l2);
        uint8_t *o = dst + (size_t)b * PANEL_KBLOCK_BYTES;
        pvi z[4], t[4];
#define KVEC(k) (o + (size_t)(k) * PANEL * 4)
        if (type == T_Q4_K) {
            const size_t at = (size_t)b * 144;
            for (int g = 0; g < 8; g++) {  /* qs words 4g..4g+3 */
                for (int r = 0; r < 4; r++) z[r] = gather4x16(rows, r, at + 16 + 16 * g);
                transpose4(z, t);
                for (int k = 0; k < 4; k++) {
#if PANEL == 16  /* avx512: the code bytes as they are (two 4-bit codes each), split by the tile */
                    PV_STOREU(KVEC(4 * g + k), t[k]);
#else
                    const int D = 4 * g + k, v = 16 * (D / 8) + D % 8;
                    PV_STOREU(KVEC(v), PV_AND(t[k], low));
                    PV_STOREU(KVEC(v + 8), PV_AND(PV_SRLI16(t[k], 4), low));
#endif
                }
            }
            /* the block's first 16 bytes, lane j = row j: word 0 = d | dmin << 16, words 1-3 = the 12 bytes of 6-bit
             * scales and minimums A, B, C (4 each); with x_q = byte q of a lane, for q < 4: sc[q] = A_q & 63,
             * mn[q] = B_q & 63, sc[q + 4] = (C_q & 15) | (A_q >> 6) << 4, mn[q + 4] = (C_q >> 4) | (B_q >> 6) << 4.
             * In vectors, not per row: unpacking them one row at a time in scalar code took a third of an 8-row pass
             * over a Q4_K matrix (AMD EPYC: avx2 avx512f avx512_vnni avx512_bf16, 2 threads). */
            for (int r = 0; r < 4; r++) z[r] = gather4x16(rows, r, at);
            transpose4(z, t);
            const pvi m6 = PV_SET1(63), m4 = PV_SET1(15), top2 = PV_SET1(0xC0);
            pvi sc[8], mn[8];
            for (int q = 0; q < 4; q++) {
                const pvi a = PV_SRLI32(t[1], 8 * q), bb = PV_SRLI32(t[2], 8 * q), c = PV_SRLI32(t[3], 8 * q);
                sc[q] = PV_AND(a, m6), mn[q] = PV_AND(bb, m6);
                sc[q + 4] = PV_OR(PV_AND(c, m4), PV_SRLI32(PV_AND(a, top2), 2));
                mn[q + 4] = PV_OR(PV_AND(PV_SRLI32(c, 4), m4), PV_SRLI32(PV_AND(bb, top2), 2));
            }
            /* avx2: the scale in both 16-bit halves, so the tile's madd multiplies by it (panel_tile_k) */
            for (int q = 0; q < 8; q++)
                PV_STOREU(KVEC(64 + q), PANEL == 16 ? sc[q] : PV_OR(sc[q], PV_SLLI32(sc[q], 16)));
            for (int p = 0; p < 4; p++) PV_STOREU(KVEC(72 + p), PV_OR(mn[2 * p], PV_SLLI32(mn[2 * p + 1], 16)));
            PF_STOREU((float *)KVEC(76), f16_lanes(t[0], 0));
            PF_STOREU((float *)KVEC(77), f16_lanes(t[0], 1));
        } else {
            const size_t at = (size_t)b * 210;
            pvi ql[32], qh[16];
            for (int g = 0; g < 8; g++) {
                for (int r = 0; r < 4; r++) z[r] = gather4x16(rows, r, at + 16 * g);
                transpose4(z, ql + 4 * g);
            }
            for (int g = 0; g < 4; g++) {
                for (int r = 0; r < 4; r++) z[r] = gather4x16(rows, r, at + 128 + 16 * g);
                transpose4(z, qh + 4 * g);
            }
            for (int h = 0; h < 2; h++)
                for (int u = 0; u < 8; u++) {
                    const pvi l0 = ql[16 * h + u], l1 = ql[16 * h + 8 + u], hi = qh[8 * h + u];
#define HI2(k) PV_SLLI16(PV_AND(PV_SRLI16(hi, 2 * (k)), two), 4)
                    PV_STOREU(KVEC(32 * h + u), PV_OR(PV_AND(l0, low), HI2(0)));
                    PV_STOREU(KVEC(32 * h + 8 + u), PV_OR(PV_AND(l1, low), HI2(1)));
                    PV_STOREU(KVEC(32 * h + 16 + u), PV_OR(PV_AND(PV_SRLI16(l0, 4), low), HI2(2)));
                    PV_STOREU(KVEC(32 * h + 24 + u), PV_OR(PV_AND(PV_SRLI16(l1, 4), low), HI2(3)));
#undef HI2
                }
            /* the 16 int8 scales, lane j = row j (word c of a lane: scales 4c..4c+3), sign-extended to int32 */
            for (int r = 0; r < 4; r++) z[r] = gather4x16(rows, r, at + 192);
            transpose4(z, t);
            for (int q = 0; q < 16; q++) PV_STOREU(KVEC(64 + q), PV_SRAI32(PV_SLLI32(t[q / 4], 24 - 8 * (q % 4)), 24));
            PF_STOREU((float *)KVEC(80), gather_f16_end(rows, at + 206));  /* d, the block's last 2 bytes */
        }
#undef KVEC
    }
}

/* The same for a packed Q4_K / Q6_K panel of nb super-blocks (off: rows of stride KOFF * nb). Per super-block the
 * sub-blocks' exact sums times their integer scales, shifted left by the activation's exponents, add up to S (and Q4_K's minimums times the activation sums to
 * M, exact), then acc = fma((float)S, d_w * d_x, acc) (and acc = acc - (float)M * (dmin_w * d_x), fused). */
static inline __attribute__((always_inline)) void panel_tile_k(int type, const uint8_t *P, int nb, const int8_t *q,
                                                               int n, const float *d, const int32_t *off, int MX,
                                                               float *out, long ldo, int nvalid) {
    pvf facc[PANEL_KMX];
    for (int i = 0; i < MX; i++) facc[i] = PF_ZERO();
    for (int b = 0; b < nb; b++) {
        const uint8_t *pb = P + (size_t)b * PANEL_KBLOCK_BYTES;
        const int8_t *xb = q + 256 * (size_t)b;
        const int32_t *ob = off + (size_t)KOFF * b;
#define KV(k) PV_LOADU(pb + (size_t)(k) * PANEL * 4)
        pvi S[PANEL_KMX], a[PANEL_KMX];
        for (int i = 0; i < MX; i++) S[i] = PV_ZERO();
        if (type == T_Q4_K) {
            for (int s = 0; s < 8; s++) {
                for (int i = 0; i < MX; i++) a[i] = PV_ZERO();
#if PANEL == 16
                for (int c = 0; c < 8; c++) {
                    /* sub-block s: the low (s even) or high (s odd) 4-bit codes of code bytes 32 (s / 2) + 4c.. */
                    const pvi raw = KV(8 * (s / 2) + c);
                    const pvi w = PV_AND(s % 2 ? PV_SRLI16(raw, 4) : raw, PV_SET1B(0x0F));
                    for (int i = 0; i < MX; i++) a[i] = PV_DOT_U8(a[i], w, PV_SET1(x4_at(xb + (size_t)i * n + 32 * s + 4 * c)));
                }
#else
                /* avx2: the sub-block's eight maddubs pairs added in int16 (8 x 2 x 15 x 127 < 2^15), then one madd
                 * with the scale (<= 63) in both halves of each word: the pair sums times it, exact in int32 */
                const pvi sc2 = KV(64 + s);
                for (int i = 0; i < MX; i++) {
                    const int8_t *xi = xb + (size_t)i * n + 32 * s;
                    const pvi x0 = x16_lanes(xi), x1 = x16_lanes(xi + 16);
                    __m256i p = _mm256_maddubs_epi16(KV(8 * s), X4(x0, 0));
#pragma GCC unroll 8
                    for (int c = 1; c < 8; c++)
                        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(KV(8 * s + c), X4(c < 4 ? x0 : x1, c % 4)));
                    S[i] = _mm256_add_epi32(S[i], PV_SLLV32(_mm256_madd_epi16(p, sc2), PV_SET1(ob[(size_t)i * KOFF * nb + 20 + s])));
                }
#endif
#if PANEL == 16
                const pvi sc = KV(64 + s);
                for (int i = 0; i < MX; i++)
                    S[i] = PV_ADD32(S[i], PV_SLLV32(PV_MULLO32(a[i], sc), PV_SET1(ob[(size_t)i * KOFF * nb + 20 + s])));
#endif
            }
            for (int i = 0; i < MX; i++) a[i] = PV_ZERO();
            for (int p = 0; p < 4; p++) {
                const pvi mn = KV(72 + p);
                for (int i = 0; i < MX; i++) a[i] = PV_DOT_S16(a[i], mn, PV_SET1(ob[(size_t)i * KOFF * nb + 16 + p]));
            }
            const pvf dw = PF_LOADU((const float *)(pb + 76 * PANEL * 4)), dm = PF_LOADU((const float *)(pb + 77 * PANEL * 4));
            for (int i = 0; i < MX; i++) {
                const pvf dx = PF_SET1(d[(size_t)i * nb + b]);
                facc[i] = PF_FMA(PF_CVT(S[i]), PF_MUL(dw, dx), facc[i]);
                facc[i] = PF_FNMA(PF_CVT(a[i]), PF_MUL(dm, dx), facc[i]);
            }
        } else {
            pvi T[PANEL_KMX];
            for (int s = 0; s < 16; s++) {
                for (int i = 0; i < MX; i++) a[i] = PV_SET1(ob[(size_t)i * KOFF * nb + s]);
#if PANEL == 16
                for (int c = 0; c < 4; c++) {
                    const pvi w = KV(4 * s + c);
                    for (int i = 0; i < MX; i++) a[i] = PV_DOT_U8(a[i], w, PV_SET1(x4_at(xb + (size_t)i * n + 16 * s + 4 * c)));
                }
#else
                /* avx2: two steps' maddubs pairs added in int16 (2 x 2 x 63 x 127 < 2^15), one madd per two */
                for (int c = 0; c < 4; c += 2) {
                    const pvi w0 = KV(4 * s + c), w1 = KV(4 * s + c + 1);
                    for (int i = 0; i < MX; i++) {
                        const int8_t *xi = xb + (size_t)i * n + 16 * s + 4 * c;
                        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, PV_SET1(x4_at(xi))),
                                                           _mm256_maddubs_epi16(w1, PV_SET1(x4_at(xi + 4))));
                        a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
                    }
                }
#endif
                const pvi sc = KV(64 + s);
                if (s % 2 == 0)  /* the two 16-value halves of 32 values share the activation's exponent: one shift */
                    for (int i = 0; i < MX; i++) T[i] = PV_MULLO32(a[i], sc);
                else
                    for (int i = 0; i < MX; i++)
                        S[i] = PV_ADD32(S[i], PV_SLLV32(PV_ADD32(T[i], PV_MULLO32(a[i], sc)),
                                                        PV_SET1(ob[(size_t)i * KOFF * nb + 20 + s / 2])));
            }
            const pvf dw = PF_LOADU((const float *)(pb + 80 * PANEL * 4));
            for (int i = 0; i < MX; i++) facc[i] = PF_FMA(PF_CVT(S[i]), PF_MUL(dw, PF_SET1(d[(size_t)i * nb + b])), facc[i]);
        }
#undef KV
    }
    panel_store(facc, MX, out, ldo, nvalid);
}

