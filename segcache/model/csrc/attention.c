/* Attention over stored KV: decode (one new token) and short prefills (up to a few hundred
   new tokens), for float32 and float16 KV (attention_kv.h, once per element type), and the
   merge of the partial softmax states both produce. */
#include "kernels.h"

typedef struct { const float *pm; int nchunk, R, D, rows; float *out; } Merge;

#define MERGE_ROWS 32  /* rows per task: one row is too little work to claim on its own */

void merge_row(const float *pm, int nchunk, int R, int D, int hr, float *o) {
    const int W = D + 2, h = hr / R, r = hr % R;
    float mx = -INFINITY, l = 0.f;
    for (int c = 0; c < nchunk; c++) {
        const float m = pm[((size_t)(h * nchunk + c) * R + r) * W];
        mx = m > mx ? m : mx;
    }
    for (int d = 0; d < D; d++) o[d] = 0.f;
    for (int c = 0; c < nchunk; c++) {
        const float *st = pm + ((size_t)(h * nchunk + c) * R + r) * W;
        if (st[0] == -INFINITY) continue;
        const float w = expf(st[0] - mx);
        l += w * st[1];
        for (int d = 0; d < D; d++) o[d] += w * st[2 + d];
    }
    for (int d = 0; d < D; d++) o[d] /= l;
}

static void merge_task(void *ctx, int task, int worker) {
    (void)worker;
    const Merge *a = ctx;
    const int end = (task + 1) * MERGE_ROWS < a->rows ? (task + 1) * MERGE_ROWS : a->rows;
    for (int hr = task * MERGE_ROWS; hr < end; hr++) merge_row(a->pm, a->nchunk, a->R, a->D, hr, a->out + (size_t)hr * a->D);
}

void merge_states(const float *pm, int Hkv, int nchunk, int R, int D, float *out, int nthreads) {
    Merge a = {pm, nchunk, R, D, Hkv * R, out};
    seg_parallel_for((a.rows + MERGE_ROWS - 1) / MERGE_ROWS, a.rows >= 64 ? nthreads : 1, merge_task, &a);
}

#define KV_T float
#define LOAD8 _mm256_loadu_ps
#define KV_SUFFIX f32
#include "attention_kv.h"
#undef KV_T
#undef LOAD8
#undef KV_SUFFIX

#define KV_T uint16_t
#define LOAD8 load8_f16
#define KV_SUFFIX f16
#include "attention_kv.h"
#undef KV_T
#undef LOAD8
#undef KV_SUFFIX
