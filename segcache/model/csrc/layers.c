/* Whole layers in one call: the decode step of a batch (every layer and the LM head) and a
   slice of a prefill's layers. The arithmetic of LlamaModel._layer over the block weights
   with the attention kernels, without ~20 torch ops a layer and their Python. */
#include "kernels.h"

static void mat_mul_rows(const Mat *w, const float *x, int M, float *y, int gemm_rows, int nt) {
    if (w->kind == 0) q4_1_matmul(x, M, w->k, (const uint8_t *)w->qs, w->d, w->m, w->pq, w->pd, w->pm, y, w->n,
                                  gemm_rows, nt);
    else q8_0_matmul(x, M, w->k, (const int8_t *)w->qs, w->d, y, w->n, gemm_rows, nt);
}

static void mat_mul(const Mat *w, const float *x, int M, float *y, int nt) {
    mat_mul_rows(w, x, M, y, SEG_DECODE_GEMM_ROWS, nt);
}

static void rms_norm_row(const float *x, const float *w, int n, float eps, float *y) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

#define ROWS_PER_TASK 8  /* one token's row is too little work to claim on its own */

typedef struct { const float *x, *w; int T, n; float eps; float *y; } NormRows;

static void norm_task(void *ctx, int task, int worker) {
    (void)worker;
    const NormRows *a = ctx;
    const int end = (task + 1) * ROWS_PER_TASK < a->T ? (task + 1) * ROWS_PER_TASK : a->T;
    for (int t = task * ROWS_PER_TASK; t < end; t++)
        rms_norm_row(a->x + (size_t)t * a->n, a->w, a->n, a->eps, a->y + (size_t)t * a->n);
}

/* y[t] = rms_norm(x[t]) * w for T rows of n; in parallel from 16 rows. */
static void norm_rows(const float *x, const float *w, int T, int n, float eps, float *y, int nt) {
    NormRows a = {x, w, T, n, eps, y};
    seg_parallel_for((T + ROWS_PER_TASK - 1) / ROWS_PER_TASK, T >= 16 ? nt : 1, norm_task, &a);
}

/* Rotate-half RoPE in place on `nh` heads of `D` floats. */
static void rope_row(float *x, int nh, int D, const float *c, const float *s) {
    const int half = D / 2;
    for (int h = 0; h < nh; h++) {
        float *r = x + (size_t)h * D;
        for (int j = 0; j < half; j++) {
            const float a = r[j], b = r[j + half];
            r[j] = a * c[j] - b * s[j];
            r[j + half] = b * c[j + half] + a * s[j + half];
        }
    }
}

/* K and V of one token's qkv row r (after RoPE) into slot `slot` of layer offsets kofs/vofs. */
static void store_kv(const Net *net, const float *r, void *kv, const int64_t *st, size_t kofs, size_t vofs,
                     int64_t slot) {
    const int D = net->head_dim, Hkv = net->n_kv, qd = net->n_heads * D, kvd = Hkv * D;
    for (int hh = 0; hh < Hkv; hh++) {
        const float *kr = r + qd + hh * D, *vr = r + qd + kvd + hh * D;
        const size_t o = (size_t)hh * st[2] + (size_t)slot * D;
        if (net->kv_f16) {
            uint16_t *k16 = (uint16_t *)kv;
            for (int j = 0; j < D; j += 8) {
                _mm_storeu_si128((__m128i *)(k16 + kofs + o + j), _mm256_cvtps_ph(_mm256_loadu_ps(kr + j), 0));
                _mm_storeu_si128((__m128i *)(k16 + vofs + o + j), _mm256_cvtps_ph(_mm256_loadu_ps(vr + j), 0));
            }
        } else {
            float *k32 = (float *)kv;
            memcpy(k32 + kofs + o, kr, sizeof(float) * D);
            memcpy(k32 + vofs + o, vr, sizeof(float) * D);
        }
    }
}

typedef struct { int B, I; const float *gu; float *act; } SiluMul;

#define SILU_VECS 64  /* vectors of 8 per task */

static void silu_task(void *ctx, int task, int worker) {
    (void)worker;
    const SiluMul *a = ctx;
    const int nv = a->I / 8, end = (task + 1) * SILU_VECS < a->B * nv ? (task + 1) * SILU_VECS : a->B * nv;
    for (int t = task * SILU_VECS; t < end; t++) {
        const int b = t / nv, j = (t % nv) * 8;
        const float *g = a->gu + (size_t)b * 2 * a->I + j;
        const __m256 gv = _mm256_loadu_ps(g), uv = _mm256_loadu_ps(g + a->I);
        const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
        _mm256_storeu_ps(a->act + (size_t)b * a->I + j, _mm256_mul_ps(_mm256_div_ps(gv, den), uv));
    }
}

/* act[b] = silu(gate[b]) * up[b], gu[b] = [gate | up] of I each; I % 32 == 0 (down is in blocks). */
static void silu_mul(const float *gu, float *act, int B, int I, int nt) {
    SiluMul a = {B, I, gu, act};
    seg_parallel_for((B * (I / 8) + SILU_VECS - 1) / SILU_VECS, nt, silu_task, &a);
}

/* kv[b]: that sequence's buffer; kv_strides[b] its (layer, K/V, head) strides in elements;
   slots[b] where the new token's K/V go (it attends to slots 0..slots[b]); pos[b] its RoPE
   position. logits: [B, vocab]. */
void decode_step(const Net *net, int B, const int64_t *tokens, const int64_t *pos, const int64_t *slots,
                 void *const *kv, const int64_t *kv_strides, float *logits, int nt) {
    const int H = net->hidden, D = net->head_dim, Hq = net->n_heads, Hkv = net->n_kv;
    const int qd = Hq * D, kvd = Hkv * D, nqkv = qd + 2 * kvd, I = net->inter;
    float *buf = (float *)malloc(sizeof(float) * (size_t)B * (2 * H + nqkv + qd + 3 * I));
    float *x = buf, *h = x + (size_t)B * H, *qkv = h + (size_t)B * H;   /* [B,H] [B,H] [B,nqkv] */
    float *att = qkv + (size_t)B * nqkv, *gu = att + (size_t)B * qd;    /* [B,qd] [B,2I] */
    float *act = gu + (size_t)B * 2 * I;                                /* [B,I] */
    for (int b = 0; b < B; b++)
        memcpy(x + (size_t)b * H, net->embed + (size_t)tokens[b] * H, sizeof(float) * H);
    for (int l = 0; l < net->n_layers; l++) {
        const Layer *L = net->layers + l;
        for (int b = 0; b < B; b++) rms_norm_row(x + (size_t)b * H, L->attn_norm, H, net->eps, h + (size_t)b * H);
        mat_mul(&L->qkv, h, B, qkv, nt);
        for (int b = 0; b < B; b++) {
            float *r = qkv + (size_t)b * nqkv;
            if (L->qkv_bias) for (int i = 0; i < nqkv; i++) r[i] += L->qkv_bias[i];
            rope_row(r, Hq + Hkv, D, net->cos + (size_t)pos[b] * D, net->sin + (size_t)pos[b] * D);
            const int64_t *st = kv_strides + 3 * b;
            const size_t kofs = (size_t)(l * st[0]), vofs = kofs + (size_t)st[1];
            store_kv(net, r, kv[b], st, kofs, vofs, slots[b]);
            if (net->kv_f16)
                attend_decode_f16(r, (const uint16_t *)kv[b] + kofs, (const uint16_t *)kv[b] + vofs, (long)st[2],
                                  Hkv, Hq / Hkv, (int)slots[b] + 1, D, net->scale, att + (size_t)b * qd, nt);
            else
                attend_decode_f32(r, (const float *)kv[b] + kofs, (const float *)kv[b] + vofs, (long)st[2],
                                  Hkv, Hq / Hkv, (int)slots[b] + 1, D, net->scale, att + (size_t)b * qd, nt);
        }
        mat_mul(&L->o, att, B, h, nt);
        for (size_t i = 0; i < (size_t)B * H; i++) x[i] += h[i];
        for (int b = 0; b < B; b++) rms_norm_row(x + (size_t)b * H, L->mlp_norm, H, net->eps, h + (size_t)b * H);
        mat_mul(&L->gate_up, h, B, gu, nt);
        silu_mul(gu, act, B, I, nt);
        mat_mul(&L->down, act, B, h, nt);
        for (size_t i = 0; i < (size_t)B * H; i++) x[i] += h[i];
    }
    for (int b = 0; b < B; b++) rms_norm_row(x + (size_t)b * H, net->norm, H, net->eps, h + (size_t)b * H);
    mat_mul(&net->head, h, B, logits, nt);
    free(buf);
}

typedef struct {
    const Net *net; const Layer *L; float *qkv, *qh; const int64_t *pos, *st; void *kv;
    size_t kofs, vofs; int T, start;
} QkvRows;

/* Token t: bias and RoPE on its qkv row, its queries to qh [Hq, T, D], its K/V stored. */
static void qkv_row(const QkvRows *a, int t) {
    const Net *net = a->net;
    const int D = net->head_dim, Hq = net->n_heads, nqkv = (Hq + 2 * net->n_kv) * D;
    float *r = a->qkv + (size_t)t * nqkv;
    if (a->L->qkv_bias) for (int i = 0; i < nqkv; i++) r[i] += a->L->qkv_bias[i];
    rope_row(r, Hq + net->n_kv, D, net->cos + (size_t)a->pos[t] * D, net->sin + (size_t)a->pos[t] * D);
    for (int hh = 0; hh < Hq; hh++)
        memcpy(a->qh + ((size_t)hh * a->T + t) * D, r + (size_t)hh * D, sizeof(float) * D);
    store_kv(net, r, a->kv, a->st, a->kofs, a->vofs, a->start + t);
}

static void qkv_task(void *ctx, int task, int worker) {
    (void)worker;
    const QkvRows *a = ctx;
    const int end = (task + 1) * ROWS_PER_TASK < a->T ? (task + 1) * ROWS_PER_TASK : a->T;
    for (int t = task * ROWS_PER_TASK; t < end; t++) qkv_row(a, t);
}

/* Layers l0 .. l1-1 of a prefill of T >= 2 tokens of one sequence, at slots start ..
   start+T-1 and RoPE positions pos[0..T-1], over the hidden states x [T, hidden] in place;
   writes each token's K/V into kv (strides as decode_step's). Every row is computed
   independently of the others (the GEMM for every projection, attend_prefill). */
void prefill_layers(const Net *net, int T, float *x, const int64_t *pos, int start, void *kv,
                    const int64_t *kv_strides, int l0, int l1, int nt) {
    const int H = net->hidden, D = net->head_dim, Hq = net->n_heads, Hkv = net->n_kv;
    const int qd = Hq * D, kvd = Hkv * D, nqkv = qd + 2 * kvd, I = net->inter, G = Hq / Hkv;
    float *buf = (float *)malloc(sizeof(float) * (size_t)T * (H + nqkv + 3 * qd + 3 * I));
    float *h = buf, *qkv = h + (size_t)T * H, *qh = qkv + (size_t)T * nqkv;  /* [T,H] [T,nqkv] [Hq,T,D] */
    float *oh = qh + (size_t)T * qd, *att = oh + (size_t)T * qd;             /* [Hq,T,D] [T,qd] */
    float *gu = att + (size_t)T * qd, *act = gu + (size_t)T * 2 * I;        /* [T,2I] [T,I] */
    for (int l = l0; l < l1; l++) {
        const Layer *L = net->layers + l;
        const size_t kofs = (size_t)l * kv_strides[0], vofs = kofs + (size_t)kv_strides[1];
        norm_rows(x, L->attn_norm, T, H, net->eps, h, nt);
        mat_mul_rows(&L->qkv, h, T, qkv, 1, nt);
        QkvRows rows = {net, L, qkv, qh, pos, kv_strides, kv, kofs, vofs, T, start};
        seg_parallel_for((T + ROWS_PER_TASK - 1) / ROWS_PER_TASK, T >= 16 ? nt : 1, qkv_task, &rows);
        if (net->kv_f16)
            attend_prefill_f16(qh, (const uint16_t *)kv + kofs, (const uint16_t *)kv + vofs, (long)kv_strides[2],
                               Hkv, G, T, start, D, net->scale, oh, nt);
        else
            attend_prefill_f32(qh, (const float *)kv + kofs, (const float *)kv + vofs, (long)kv_strides[2],
                               Hkv, G, T, start, D, net->scale, oh, nt);
        for (int t = 0; t < T; t++)
            for (int hh = 0; hh < Hq; hh++)
                memcpy(att + (size_t)t * qd + (size_t)hh * D, oh + ((size_t)hh * T + t) * D, sizeof(float) * D);
        mat_mul_rows(&L->o, att, T, h, 1, nt);
        for (size_t i = 0; i < (size_t)T * H; i++) x[i] += h[i];
        norm_rows(x, L->mlp_norm, T, H, net->eps, h, nt);
        mat_mul_rows(&L->gate_up, h, T, gu, 1, nt);
        silu_mul(gu, act, T, I, nt);
        mat_mul_rows(&L->down, act, T, h, 1, nt);
        for (size_t i = 0; i < (size_t)T * H; i++) x[i] += h[i];
    }
    free(buf);
}
