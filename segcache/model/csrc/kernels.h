/* What the kernel sources share: the public interface, SIMD helpers, the pool, and the
   internal functions one concern lends another (the GEMM tile that attention reuses, the
   merge of partial softmax states). AVX2 + FMA + F16C. */
#ifndef SEGCACHE_KERNELS_H
#define SEGCACHE_KERNELS_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "segkernels.h"

#define MAXM SEG_MAX_GROUP  /* rows per dot_rows call; query heads per KV head */
#define NP 16               /* GEMM panel: weight rows dequantised together */
#define MR 6                /* GEMM tile: rows of x per register tile */
#define PC 128              /* attend_prefill: slots per task */
#define INLINE static inline __attribute__((always_inline))

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
static inline __m256 i8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
static inline __m256 load8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* Transpose 8 vectors of 8 floats in registers. */
static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* exp(x) for 8 floats (Cephes' polynomial, as in avx_mathfun: within ~2 ulp of expf). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* pool.c: run fn(ctx, task, worker) for task = 0..ntasks-1 on up to nthreads threads (the
   caller is worker 0, the pool's threads 1..nthreads-1) and return when every task is done.
   Tasks are claimed one at a time from a shared counter, so whichever threads are running
   do the work: a pool thread that the OS has parked is not waited for unless it already
   claimed a task. Calls from a second thread while a job runs run inline (worker 0). */
typedef void (*seg_task_fn)(void *ctx, int task, int worker);
void seg_parallel_for(int ntasks, int nthreads, seg_task_fn fn, void *ctx);

/* A stage of a program (seg_run_stages): ntasks tasks, either redoable, run(ctx, task, out)
   computing the task's result into `out` (the running thread's scratch, `scratch` floats)
   and commit(ctx, task, out) writing it where it belongs, once per task whichever thread
   computed it; or plain, fn(ctx, task, worker), run exactly once. A redoable task may read
   what earlier stages committed and may update only its own region, through commit; its run
   may be cut short or repeated by another thread, so it writes nothing but `out`. */
typedef void (*seg_run_fn)(const void *ctx, int task, float *out);
typedef void (*seg_commit_fn)(const void *ctx, int task, const float *out);
typedef struct {
    int ntasks;
    seg_run_fn run;
    seg_commit_fn commit;
    seg_task_fn fn;  /* a plain stage (run and commit NULL) */
    void *ctx;
} SegStage;

/* Run the stages in order on up to nthreads threads; whichever running thread finishes a
   stage starts the next, and a redoable task a parked thread holds is computed again by a
   running one. Returns when every stage is done and no pool thread is inside a task, so
   the stages, their contexts and buffers may be freed then. */
void seg_run_stages(const SegStage *stages, int nstages, size_t scratch, int nthreads);
/* The pool thread's id (1 ..) in a pool thread, 0 in any other thread. */
int seg_pool_worker_id(void);
#define SEG_POOL_MAX 64  /* threads a job may use, caller included */

/* matmul.c: c[i][0..15] = sum over k = 0..K-1 in order of a[i][k] * b[k][0..15] for all M
   rows of a, MR at a time: each output is one FMA chain in k order. */
void rows16(const float *a, int lda, int M, const float *b, int ldb, int K, float *c, int ldc);

/* matmul.c: outputs n0 .. n1-1 of y = x[M, K] @ w^T into out[i*ldo + (n - n0)], bit for bit
   what q4_1_matmul / q8_0_matmul put in y[i][n] with the same gemm_rows. n0 % 16 == 0; the
   GEMM (M > gemm_rows, w->n % 16 == 0) also needs n1 % 16 == 0 or n1 == w->n, and `panel`:
   K * 16 floats, 32-byte aligned. */
void mat_rows(const Mat *w, const float *x, int M, int n0, int n1, int gemm_rows, float *panel, float *out,
              int ldo);

/* attention.c: merge partial softmax states pm[((h*nchunk + c)*R + r)*(D+2)] = (max, sum,
   output[D]) of row r of KV head h over slot chunk c into out[(h*R + r)*D]. */
void merge_states(const float *pm, int Hkv, int nchunk, int R, int D, float *out, int nthreads);
/* attention.c: one row hr = h*R + r of merge_states into o [D]. */
void merge_row(const float *pm, int nchunk, int R, int D, int hr, float *o);

/* attention.c: the partial softmax state of G query heads q [G, D] over slots s0..s1-1 (s1 >
   s0) of one KV head's K/V rows [S, D]: part [G][D+2] = (max, sum, output); sc: G * (s1 - s0)
   floats of scratch. What attend_decode computes per (head, slot chunk). */
void decode_part_f32(const float *q, const float *kh, const float *vh, int G, int s0, int s1, int D,
                     float scale, float *part, float *sc);
void decode_part_f16(const float *q, const uint16_t *kh, const uint16_t *vh, int G, int s0, int s1, int D,
                     float scale, float *part, float *sc);

#endif
