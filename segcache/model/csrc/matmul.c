/* Matrix products against weights in GGUF blocks (Q4_1 / Q8_0), float32 activations.

   Two kernels: dot_rows for a few rows (decode), where every weight block is dequantised
   once into registers and each row runs its own FMA chain; and a register-tiled GEMM for
   more rows (prefill), over panels of 16 weight rows dequantised into a transposed float32
   buffer. In both, a weight element is exactly the float32 of the reference matrix
   (d*q + m, or d*q for Q8_0), so only the summation order differs from a dense product. */
#include "kernels.h"

/* Several rows of x against one weight row. R is a compile-time constant at every call
   (always_inline), so the accumulators stay in registers. */
INLINE void dot_rows(const float *x, int K, int nb, const uint8_t *q4, const int8_t *q8,
                     const float *dr, const float *mr, float *y, int N, const int R) {
    const __m128i lowmask = _mm_set1_epi8(0x0F);
    __m256 acc[MAXM], acc2[MAXM];
    for (int i = 0; i < R; i++) { acc[i] = _mm256_setzero_ps(); acc2[i] = _mm256_setzero_ps(); }
    for (int b = 0; b < nb; b++) {
        __m256 w0, w1, w2, w3;
        const __m256 db = _mm256_set1_ps(dr[b]);
        if (q4) {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(q4 + (size_t)b * 16));
            const __m128i lo = _mm_and_si128(raw, lowmask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), lowmask);
            const __m256 mb = _mm256_set1_ps(mr[b]);
            w0 = _mm256_fmadd_ps(db, u8x8(lo), mb); w1 = _mm256_fmadd_ps(db, u8x8(_mm_srli_si128(lo, 8)), mb);
            w2 = _mm256_fmadd_ps(db, u8x8(hi), mb); w3 = _mm256_fmadd_ps(db, u8x8(_mm_srli_si128(hi, 8)), mb);
        } else {
            const __m128i a = _mm_loadu_si128((const __m128i *)(q8 + (size_t)b * 32));
            const __m128i c = _mm_loadu_si128((const __m128i *)(q8 + (size_t)b * 32 + 16));
            w0 = _mm256_mul_ps(db, i8x8(a)); w1 = _mm256_mul_ps(db, i8x8(_mm_srli_si128(a, 8)));
            w2 = _mm256_mul_ps(db, i8x8(c)); w3 = _mm256_mul_ps(db, i8x8(_mm_srli_si128(c, 8)));
        }
        for (int i = 0; i < R; i++) {
            const float *xb = x + (size_t)i * K + (size_t)b * 32;
            if (R <= 4) {  /* few rows: two chains per row hide the FMA latency */
                acc[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[i]);
                acc2[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc2[i]);
                acc[i] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), acc[i]);
                acc2[i] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), acc2[i]);
            } else {
                acc[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[i]);
                acc[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc[i]);
                acc[i] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), acc[i]);
                acc[i] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), acc[i]);
            }
        }
    }
    if (R == 8) {  /* eight horizontal sums at once */
        const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
        float r[8];
        _mm256_storeu_ps(r, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
        for (int i = 0; i < 8; i++) y[(size_t)i * N] = r[i];
    } else {
        for (int i = 0; i < R; i++) y[(size_t)i * N] = hsum8(R <= 4 ? _mm256_add_ps(acc[i], acc2[i]) : acc[i]);
    }
}

/* The arguments of one product, shared by its tasks. */
typedef struct {
    const float *x; int M, K, N, nb;
    const uint8_t *q4; const int8_t *q8; const float *d, *m;
    const uint8_t *pq; const float *pd, *pm;  /* q4_1 panels, or NULL */
    float *y;
    float *scratch[SEG_POOL_MAX];             /* block_gemm: one panel buffer per worker */
} Product;

#define MATVEC_ROWS 16  /* weight rows per block_matmul task */

/* Weight rows n0 .. n1-1 against every row of x [M, K], MAXM rows of x at a time:
   y[i*ldy + (n - n0)]. q8 or q4 (with m) is NULL. */
static void weight_rows(const float *x, int M, int K, const uint8_t *q4, const int8_t *q8, const float *d,
                        const float *m, int n0, int n1, float *y, int ldy) {
    const int nb = K / 32;
    for (int n = n0; n < n1; n++) {
        const uint8_t *qr4 = q4 ? q4 + (size_t)n * nb * 16 : NULL;
        const int8_t *qr8 = q8 ? q8 + (size_t)n * K : NULL;
        const float *dr = d + (size_t)n * nb, *mr = m ? m + (size_t)n * nb : NULL;
        for (int i0 = 0; i0 < M; i0 += MAXM) {
            const float *xi = x + (size_t)i0 * K;
            float *yi = y + (size_t)i0 * ldy + (n - n0);
            switch (M - i0 < MAXM ? M - i0 : MAXM) {
                case 1: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, ldy, 1); break;
                case 2: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, ldy, 2); break;
                case 3: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, ldy, 3); break;
                case 4: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, ldy, 4); break;
                case 5: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, ldy, 5); break;
                case 6: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, ldy, 6); break;
                case 7: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, ldy, 7); break;
                default: dot_rows(xi, K, nb, qr4, qr8, dr, mr, yi, ldy, 8); break;
            }
        }
    }
}

/* Task: weight rows n0 .. n0+15 against every row of x. */
static void matvec_task(void *ctx, int task, int worker) {
    (void)worker;
    const Product *p = (const Product *)ctx;
    const int n0 = task * MATVEC_ROWS, n1 = n0 + MATVEC_ROWS < p->N ? n0 + MATVEC_ROWS : p->N;
    weight_rows(p->x, p->M, p->K, p->q4, p->q8, p->d, p->m, n0, n1, p->y + n0, p->N);
}

/* Panel n0 .. n0+15 dequantised and transposed: wt[k*NP + j] = W[n0+j][k]. */
static void dequant_panel(int K, int nb, const uint8_t *q4, const int8_t *q8, const float *d,
                          const float *m, int n0, float *wt) {
    const __m128i lowmask = _mm_set1_epi8(0x0F);
    for (int half = 0; half < NP / 8; half++)
        for (int b = 0; b < nb; b++)
            for (int j = 0; j < 4; j++) {  /* elements 8j..8j+7 of block b, for 8 weight rows */
                __m256 r[8];
                for (int i = 0; i < 8; i++) {
                    const size_t n = (size_t)(n0 + half * 8 + i), nbi = n * nb + b;
                    const __m256 db = _mm256_set1_ps(d[nbi]);
                    if (q4) {  /* GGUF order: elements 0..15 low nibbles, 16..31 high */
                        const __m128i raw = _mm_loadl_epi64((const __m128i *)(q4 + nbi * 16 + (j & 1) * 8));
                        const __m128i nib = j < 2 ? _mm_and_si128(raw, lowmask)
                                                  : _mm_and_si128(_mm_srli_epi16(raw, 4), lowmask);
                        r[i] = _mm256_fmadd_ps(db, u8x8(nib), _mm256_set1_ps(m[nbi]));
                    } else {
                        r[i] = _mm256_mul_ps(db, i8x8(_mm_loadl_epi64((const __m128i *)(q8 + n * K + b * 32 + j * 8))));
                    }
                }
                transpose8(r);
                float *dst = wt + (size_t)(b * 32 + j * 8) * NP + half * 8;
                for (int i = 0; i < 8; i++) _mm256_store_ps(dst + (size_t)i * NP, r[i]);
            }
}

/* The same panel from Q4_1 weights packed per panel (BlockLinear.panels): for each k, 8
   bytes hold rows j (low nibble) and j+8 (high nibble), and each block's 16 scales and mins
   are contiguous, so a k is two conversions and two FMAs, no transpose. The same values as
   dequant_panel, bit for bit. */
static void dequant_panel_packed(int K, const uint8_t *pq, const float *pd, const float *pmin, float *wt) {
    const __m128i lowmask = _mm_set1_epi8(0x0F);
    for (int b = 0; b < K / 32; b++) {
        const __m256 d0 = _mm256_loadu_ps(pd + b * 16), d1 = _mm256_loadu_ps(pd + b * 16 + 8);
        const __m256 m0 = _mm256_loadu_ps(pmin + b * 16), m1 = _mm256_loadu_ps(pmin + b * 16 + 8);
        for (int k = b * 32; k < b * 32 + 32; k++) {
            const __m128i raw = _mm_loadl_epi64((const __m128i *)(pq + (size_t)k * 8));
            const __m128i lo = _mm_and_si128(raw, lowmask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), lowmask);
            _mm256_store_ps(wt + (size_t)k * NP, _mm256_fmadd_ps(d0, u8x8(lo), m0));
            _mm256_store_ps(wt + (size_t)k * NP + 8, _mm256_fmadd_ps(d1, u8x8(hi), m1));
        }
    }
}

/* c[i][0..15] = sum over k in order of a[i][k] * b[k][0..15], for i < R (a compile-time
   constant at every call, so the 2R accumulators stay in registers). */
INLINE void tile16(const float *a, int lda, const float *b, int ldb, int K, float *c, int ldc, const int R) {
    __m256 c0[MR], c1[MR];
    for (int i = 0; i < R; i++) { c0[i] = _mm256_setzero_ps(); c1[i] = _mm256_setzero_ps(); }
    for (int k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(b + (size_t)k * ldb), b1 = _mm256_loadu_ps(b + (size_t)k * ldb + 8);
        for (int i = 0; i < R; i++) {
            const __m256 x = _mm256_broadcast_ss(a + (size_t)i * lda + k);
            c0[i] = _mm256_fmadd_ps(x, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(x, b1, c1[i]);
        }
    }
    for (int i = 0; i < R; i++) {
        _mm256_storeu_ps(c + (size_t)i * ldc, c0[i]);
        _mm256_storeu_ps(c + (size_t)i * ldc + 8, c1[i]);
    }
}

void rows16(const float *a, int lda, int M, const float *b, int ldb, int K, float *c, int ldc) {
    for (int i0 = 0; i0 < M; i0 += MR) {
        const float *ai = a + (size_t)i0 * lda;
        float *ci = c + (size_t)i0 * ldc;
        switch (M - i0 < MR ? M - i0 : MR) {
            case 1: tile16(ai, lda, b, ldb, K, ci, ldc, 1); break;
            case 2: tile16(ai, lda, b, ldb, K, ci, ldc, 2); break;
            case 3: tile16(ai, lda, b, ldb, K, ci, ldc, 3); break;
            case 4: tile16(ai, lda, b, ldb, K, ci, ldc, 4); break;
            case 5: tile16(ai, lda, b, ldb, K, ci, ldc, 5); break;
            default: tile16(ai, lda, b, ldb, K, ci, ldc, 6); break;
        }
    }
}

/* Task: panel p dequantised into this worker's buffer, then every row of x against it. */
static void gemm_task(void *ctx, int p, int worker) {
    Product *g = (Product *)ctx;
    float *wt = g->scratch[worker];
    if (!wt) wt = g->scratch[worker] = (float *)aligned_alloc(32, sizeof(float) * (size_t)g->K * NP);
    if (g->pq) dequant_panel_packed(g->K, g->pq + (size_t)p * g->K * 8, g->pd + (size_t)p * g->nb * NP,
                                    g->pm + (size_t)p * g->nb * NP, wt);
    else dequant_panel(g->K, g->nb, g->q4, g->q8, g->d, g->m, p * NP, wt);
    rows16(g->x, g->K, g->M, wt, NP, g->K, g->y + (size_t)p * NP, g->N);
}

/* More than gemm_rows rows (and N a multiple of NP): the GEMM, else dot_rows. The decode step
   passes SEG_DECODE_GEMM_ROWS, where the two cross over on the 2-core AMD host (every projection
   of a layer x 30, dot_rows vs the GEMM on packed panels: 6 rows 13.9 vs 14.6 ms, 8 rows
   18.1 vs 19.0, 12 rows 28.1 vs 20.9, 25 rows 67.1 vs 38.2); a prefill passes 1, so that a
   prompt row's result never depends on how many rows its call has. */
static void block_product(Product *p, int gemm_rows, int nthreads) {
    p->nb = p->K / 32;
    if (p->M > gemm_rows && p->N % NP == 0) {
        memset(p->scratch, 0, sizeof p->scratch);
        seg_parallel_for(p->N / NP, nthreads, gemm_task, p);
        for (int w = 0; w < SEG_POOL_MAX; w++) free(p->scratch[w]);
    } else {
        seg_parallel_for((p->N + MATVEC_ROWS - 1) / MATVEC_ROWS, nthreads, matvec_task, p);
    }
}

void mat_rows(const Mat *w, const float *x, int M, int n0, int n1, int gemm_rows, float *panel, float *out,
              int ldo) {
    const int K = w->k, N = w->n, nb = K / 32;
    const uint8_t *q4 = w->kind == 0 ? (const uint8_t *)w->qs : NULL;
    const int8_t *q8 = w->kind == 0 ? NULL : (const int8_t *)w->qs;
    const float *m = w->kind == 0 ? w->m : NULL;
    if (M > gemm_rows && N % NP == 0) {  /* block_product's GEMM, panel by panel */
        for (int n = n0; n < n1; n += NP) {
            const int p = n / NP;
            if (q4 && w->pq) dequant_panel_packed(K, w->pq + (size_t)p * K * 8, w->pd + (size_t)p * nb * NP,
                                                  w->pm + (size_t)p * nb * NP, panel);
            else dequant_panel(K, nb, q4, q8, w->d, m, n, panel);
            rows16(x, K, M, panel, NP, K, out + (n - n0), ldo);
        }
        return;
    }
    weight_rows(x, M, K, q4, q8, w->d, m, n0, n1, out, ldo);  /* matvec_task's */
}

void q4_1_matmul(const float *x, int M, int K, const uint8_t *qs, const float *d, const float *m,
                 const uint8_t *pq, const float *pd, const float *pm, float *y, int N, int gemm_rows,
                 int nthreads) {
    Product p = {.x = x, .M = M, .K = K, .N = N, .q4 = qs, .d = d, .m = m, .pq = pq, .pd = pd, .pm = pm, .y = y};
    block_product(&p, gemm_rows, nthreads);
}

void q8_0_matmul(const float *x, int M, int K, const int8_t *qs, const float *d, float *y, int N,
                 int gemm_rows, int nthreads) {
    Product p = {.x = x, .M = M, .K = K, .N = N, .q8 = qs, .d = d, .y = y};
    block_product(&p, gemm_rows, nthreads);
}
