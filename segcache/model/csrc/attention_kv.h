/* The attention kernels for one KV element type, included once per type by attention.c with
   KV_T (the stored element), LOAD8 (8 elements widened to float32) and KV_SUFFIX (f32 / f16)
   defined. No include guard: it is meant to be included more than once. */

#define KV_CAT_(a, b) a##_##b
#define KV_CAT(a, b) KV_CAT_(a, b)
#define KV_NAME(name) KV_CAT(name, KV_SUFFIX)

typedef struct {
    const float *q; const KV_T *k, *v; long hstride; int Hkv, G, S, D, nchunk, chunk;
    float scale; float *pm;
} KV_NAME(DecodeAttn);

/* The partial softmax state of G query heads q [G, D] over slots s0..s1-1 (s1 > s0) of one
   KV head's rows kh, vh [S, D]: part [G][D+2] = (max, sum, output). sc: G * (s1 - s0)
   floats of scratch. */
void KV_NAME(decode_part)(const float *q, const KV_T *kh, const KV_T *vh, int G, int s0, int s1, int D,
                          float scale, float *part, float *sc) {
    const int nv = D / 8;
    __m256 qv[MAXM][32];
    for (int g = 0; g < G; g++)
        for (int j = 0; j < nv; j++)
            qv[g][j] = _mm256_mul_ps(_mm256_loadu_ps(q + (size_t)g * D + j * 8), _mm256_set1_ps(scale));
    for (int s = s0; s < s1; s++) {
        const KV_T *kr = kh + (size_t)s * D;
        __m256 acc[MAXM];
        for (int g = 0; g < G; g++) acc[g] = _mm256_setzero_ps();
        for (int j = 0; j < nv; j++) {
            __m256 kk = LOAD8(kr + j * 8);
            for (int g = 0; g < G; g++) acc[g] = _mm256_fmadd_ps(qv[g][j], kk, acc[g]);
        }
        for (int g = 0; g < G; g++) sc[(size_t)g * (s1 - s0) + (s - s0)] = hsum8(acc[g]);
    }
    __m256 o[MAXM][32];
    for (int g = 0; g < G; g++) {
        float *sg = sc + (size_t)g * (s1 - s0), mx = -INFINITY, l = 0.f;
        for (int s = 0; s < s1 - s0; s++) mx = sg[s] > mx ? sg[s] : mx;
        for (int s = 0; s < s1 - s0; s++) { sg[s] = expf(sg[s] - mx); l += sg[s]; }
        part[g * (D + 2)] = mx;
        part[g * (D + 2) + 1] = l;
        for (int j = 0; j < nv; j++) o[g][j] = _mm256_setzero_ps();
    }
    for (int s = s0; s < s1; s++) {
        const KV_T *vr = vh + (size_t)s * D;
        for (int j = 0; j < nv; j++) {
            __m256 vv = LOAD8(vr + j * 8);
            for (int g = 0; g < G; g++)
                o[g][j] = _mm256_fmadd_ps(_mm256_set1_ps(sc[(size_t)g * (s1 - s0) + (s - s0)]), vv, o[g][j]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int j = 0; j < nv; j++) _mm256_storeu_ps(part + g * (D + 2) + 2 + j * 8, o[g][j]);
}

/* Task t = (KV head h, slot chunk c): decode_part of the G query heads of h, written to
   pm[t] as [G][D+2]. */
static void KV_NAME(decode_attn_task)(void *ctx, int t, int worker) {
    (void)worker;
    const KV_NAME(DecodeAttn) *a = ctx;
    const int G = a->G, D = a->D;
    const int h = t / a->nchunk, c = t % a->nchunk;
    const int s0 = c * a->chunk, s1 = s0 + a->chunk < a->S ? s0 + a->chunk : a->S;
    float *part = a->pm + (size_t)t * G * (D + 2);
    if (s1 <= s0) { for (int g = 0; g < G; g++) part[g * (D + 2)] = -INFINITY; return; }
    float *sc = (float *)malloc(sizeof(float) * (size_t)G * (s1 - s0));
    KV_NAME(decode_part)(a->q + (size_t)h * G * D, a->k + (size_t)h * a->hstride, a->v + (size_t)h * a->hstride,
                         G, s0, s1, D, a->scale, part, sc);
    free(sc);
}

/* Decode attention, one new token: out[Hq,D] = softmax(q k^T * scale) v over S slots.
   Query heads h*G .. h*G+G-1 share KV head h. K/V rows are contiguous [S, D] per head,
   heads `hstride` elements apart. Work is split over (head, slot chunk) tasks whose partial
   softmax states are merged at the end, so 2 threads share 3 heads evenly. */
void KV_NAME(attend_decode)(const float *q, const KV_T *k, const KV_T *v, long hstride, int Hkv, int G,
                            int S, int D, float scale, float *out, int nthreads) {
    int nchunk = nthreads * 4;
    if (nchunk > S) nchunk = S;
    KV_NAME(DecodeAttn) a = {q, k, v, hstride, Hkv, G, S, D, nchunk, (S + nchunk - 1) / nchunk, scale, NULL};
    a.pm = (float *)malloc(sizeof(float) * (size_t)Hkv * nchunk * G * (D + 2));  /* per task: [G][D+2] */
    seg_parallel_for(Hkv * nchunk, nthreads, KV_NAME(decode_attn_task), &a);
    merge_states(a.pm, Hkv, nchunk, G, D, out, nthreads);
    free(a.pm);
}

typedef struct {
    const float *q; const KV_T *k, *v; long hstride; int G, T, start, D, nchunk;
    float scale; float *pm;
    float *scratch[SEG_POOL_MAX];  /* per worker: keys transposed, values widened, scores */
} KV_NAME(PrefillAttn);

/* Task (KV head h, slots c0..c0+PC-1): the chunk's keys transposed to [D][PC] and values
   widened to [PC][D] once, then every row of the head against them in register tiles
   (rows16); per row a softmax state (max, sum, output) in pm. */
static void KV_NAME(prefill_attn_task)(void *ctx, int task, int worker) {
    KV_NAME(PrefillAttn) *a = ctx;
    const int D = a->D, T = a->T, start = a->start, R = a->G * T, W = D + 2, S = start + T;
    float *kt = a->scratch[worker];
    if (!kt) kt = a->scratch[worker] = (float *)aligned_alloc(
        32, sizeof(float) * ((size_t)D * PC + (size_t)PC * D + (size_t)R * PC));
    float *vc = kt + (size_t)D * PC, *sc = vc + (size_t)PC * D;
    const int h = task / a->nchunk, c0 = (task % a->nchunk) * PC;
    const int n = S - c0 < PC ? S - c0 : PC;
    const KV_T *kh = a->k + (size_t)h * a->hstride + (size_t)c0 * D, *vh = a->v + (size_t)h * a->hstride + (size_t)c0 * D;
    const float *qh = a->q + (size_t)h * R * D;
    float *part = a->pm + (size_t)task * R * W;
    /* keys: 8 slots x 8 dims at a time, transposed; slots past n are zeros */
    for (int j = 0; j < PC; j += 8)
        for (int d = 0; d < D; d += 8) {
            __m256 r8[8];
            for (int i = 0; i < 8; i++)
                r8[i] = j + i < n ? LOAD8(kh + (size_t)(j + i) * D + d) : _mm256_setzero_ps();
            transpose8(r8);
            for (int i = 0; i < 8; i++) _mm256_store_ps(kt + (size_t)(d + i) * PC + j, r8[i]);
        }
    for (int j = 0; j < PC; j++)
        for (int d = 0; d < D; d += 8)
            _mm256_store_ps(vc + (size_t)j * D + d, j < n ? LOAD8(vh + (size_t)j * D + d) : _mm256_setzero_ps());
    /* scores sc[r][j] = q_r . k_j (scale applied below) */
    for (int j = 0; j < (n + 15) / 16 * 16; j += 16) rows16(qh, D, R, kt + j, PC, D, sc + j, PC);
    /* per row: visible slots, max, exp (exactly 0 where not visible), sum */
    for (int r = 0; r < R; r++) {
        const int t = r % T, lim = start + t + 1 - c0;
        const int vis = lim < n ? lim : n;
        float *sr = sc + (size_t)r * PC, *st = part + (size_t)r * W;
        if (vis <= 0) {
            st[0] = -INFINITY; st[1] = 0.f;
            for (int j = 0; j < PC; j += 8) _mm256_store_ps(sr + j, _mm256_setzero_ps());
            continue;
        }
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), vvis = _mm256_set1_epi32(vis);
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        for (int j = 0; j < vis; j += 8) {
            const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vvis, _mm256_add_epi32(_mm256_set1_epi32(j), lanes)));
            const __m256 sj = _mm256_mul_ps(_mm256_load_ps(sr + j), _mm256_set1_ps(a->scale));
            _mm256_store_ps(sr + j, sj);
            vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), sj, keep));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 lsum = _mm256_setzero_ps();
        for (int j = 0; j < PC; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(sr + j), vmx));
            const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(vvis, _mm256_add_epi32(_mm256_set1_epi32(j), lanes)));
            const __m256 p = _mm256_and_ps(e, keep);
            _mm256_store_ps(sr + j, p);
            lsum = _mm256_add_ps(lsum, p);
        }
        st[0] = mx;
        st[1] = hsum8(lsum);
    }
    /* outputs part[r][2 + d] = sum_j p[r][j] v_j[d] */
    for (int d = 0; d < D; d += 16) rows16(sc, PC, R, vc + d, D, n, part + 2 + d, W);
}

/* Attention of T new tokens after `start` stored slots (a short prefill): row r = g*T + t of
   KV head h is query head h*G+g of token t and sees slots 0 .. start+t. q, out [Hq, T, D]
   float32; K/V rows [S, D] per head (S = start+T), heads `hstride` elements apart, read as
   stored. Tasks are (KV head, PC slots); their states are merged by log-sum-exp at the end
   (slot chunks split evenly over threads whatever T is). */
void KV_NAME(attend_prefill)(const float *q, const KV_T *k, const KV_T *v, long hstride, int Hkv, int G,
                             int T, int start, int D, float scale, float *out, int nthreads) {
    const int S = start + T, R = G * T, nchunk = (S + PC - 1) / PC;
    KV_NAME(PrefillAttn) a = {.q = q, .k = k, .v = v, .hstride = hstride, .G = G, .T = T, .start = start,
                              .D = D, .nchunk = nchunk, .scale = scale};
    a.pm = (float *)malloc(sizeof(float) * (size_t)Hkv * nchunk * R * (D + 2));
    seg_parallel_for(Hkv * nchunk, nthreads, KV_NAME(prefill_attn_task), &a);
    for (int w = 0; w < SEG_POOL_MAX; w++) free(a.scratch[w]);
    merge_states(a.pm, Hkv, nchunk, R, D, out, nthreads);
    free(a.pm);
}

#undef KV_NAME
#undef KV_CAT
#undef KV_CAT_
