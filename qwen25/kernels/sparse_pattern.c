/* Sparse prefill's pattern estimate (part of sparse_attention.c, included by it where sp_estimate is first
 * needed; that file's comment describes the algorithm): top-k with ties to the lowest indices, and one head's
 * kept columns and key-block offsets from its last queries. Uses sparse_attention.c's SparseArgs, SpLayout and
 * sp_scores, and forward.c's KV helpers. */

/* ---------------------------------------------------------------------------------------------------------- */
/* top-k: the indices of the k largest of v[0 .. S) (ties at the k-th value: the lowest indices), any order. */
static float sp_kth_largest(float *a, int n, int k) {  /* quickselect on a copy: the k-th largest (1-based) */
    int lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        const int mid = lo + (hi - lo) / 2;
        float x = a[lo], y = a[mid], z = a[hi];  /* median of three as the pivot */
        float pivot = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));
        int i = lo, j = hi;
        while (i <= j) {  /* descending: left part >= pivot, right part <= pivot */
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return a[want];
    }
    return a[want];
}

static int sp_topk(const float *v, int S, int k, int32_t *out, float *tmp) {
    if (k >= S) {
        for (int t = 0; t < S; t++) out[t] = t;
        return S;
    }
    memcpy(tmp, v, sizeof(float) * S);
    const float thr = sp_kth_largest(tmp, S, k);
    int above = 0;
    for (int t = 0; t < S; t++) above += v[t] > thr;
    int n = 0, ties = k - above;
    for (int t = 0; t < S; t++)
        if (v[t] > thr || (v[t] == thr && ties-- > 0)) out[n++] = t;
    return n;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* One head's pattern from its last n queries q[i] (rows of stride ldq, rotated) at positions S-n+i over keys
 * 0..S-1 of one (layer, sequence, kv head) at keys/values (slot t at element slot * D). Writes the kept columns
 * (returns their count) and offs[o] = 1 for the selected key-block offsets (o < n_kb). distances: the kept
 * distances too, or NULL. */
static int sp_estimate(const float *q, long ldq, int n, int S, int D, float scale, const void *keys, int dtype,
                       const long *slots, const SparseArgs *c, int32_t *cols, uint8_t *offs, int32_t *distances,
                       float *scratch, const SpLayout *L) {
    float *Qe = scratch + L->qe, *Kt = scratch + L->kt, *tmp = scratch + L->tmp, *sc = scratch + L->sc;
    float *logits = scratch + L->logits, *vert = scratch + L->vert, *slash = scratch + L->slash;
    float *sel = scratch + L->sel;
    const int bs = c->block_size, nkb = (S + bs - 1) / bs;
    for (int i = 0; i < n; i++)
        for (int d = 0; d < D; d++) Qe[(size_t)i * D + d] = q[(long)i * ldq + d] * scale;
    for (int t0 = 0; t0 < S; t0 += SP_KB) {
        const int nk = sp_min(SP_KB, S - t0);
        for (int j = 0; j < nk; j++) {  /* keys only (the values are not read) */
            const long at = slots[t0 + j] * D;
            const float *k = (const float *)keys + at;
            if (dtype != KV_F32) { kv_widen(keys, dtype, at, tmp, D); k = tmp; }
            for (int d = 0; d < D; d++) Kt[(size_t)d * SP_KB + j] = k[d];
        }
        sp_scores(Qe, n, D, Kt, sc);
        for (int i = 0; i < n; i++) memcpy(logits + (size_t)i * S + t0, sc + (size_t)i * SP_KB, sizeof(float) * nk);
    }
    memset(vert, 0, sizeof(float) * S);
    memset(slash, 0, sizeof(float) * S);
    for (int i = 0; i < n; i++) {  /* softmax over keys 0..p, then the column and diagonal sums */
        const int p = S - n + i, len = p + 1;
        float *row = logits + (size_t)i * S;
        const float mx = max_of(row, len);
        int t = 0;
        __m256 acc = _mm256_setzero_ps();
        for (; t + 8 <= len; t += 8) {
            __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + t), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(row + t, e);
            acc = _mm256_add_ps(acc, e);
        }
        float sum = hsum256(acc);
        for (; t < len; t++) { row[t] = expf(row[t] - mx); sum += row[t]; }
        const float inv = 1.0f / sum;
        const __m256 inv8 = _mm256_set1_ps(inv);
        const __m256i reverse = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
        for (t = 0; t + 8 <= len; t += 8) {  /* slash[p - t - j] += pr[t + j]: the 8 lanes reversed */
            const __m256 pr = _mm256_mul_ps(_mm256_loadu_ps(row + t), inv8);
            _mm256_storeu_ps(vert + t, _mm256_add_ps(_mm256_loadu_ps(vert + t), pr));
            float *sl = slash + p - t - 7;
            _mm256_storeu_ps(sl, _mm256_add_ps(_mm256_loadu_ps(sl), _mm256_permutevar8x32_ps(pr, reverse)));
        }
        for (; t < len; t++) {
            const float pr = row[t] * inv;
            vert[t] += pr;
            slash[p - t] += pr;
        }
    }
    for (int t = 0; t < sp_min(c->sink_size, S); t++) vert[t] = INFINITY;
    for (int t = 0; t < sp_min(c->local_size, S); t++) slash[t] = INFINITY;
    const int ncols = sp_topk(vert, S, sp_min(c->vertical_size, S), cols, sel);
    int32_t *dist = (int32_t *)logits;  /* the logits are spent */
    const int nd = sp_topk(slash, S, sp_min(c->slash_size, S), dist, sel);
    memset(offs, 0, nkb);
    for (int j = 0; j < nd; j++) {
        const int o = dist[j] / bs, o2 = o + (dist[j] % bs > 0);
        offs[o] = 1;
        if (o2 < nkb) offs[o2] = 1;
    }
    if (distances) memcpy(distances, dist, sizeof(int32_t) * nd);
    return ncols;
}
