/* Whole layers in one call: the decode step of a batch (every layer and the LM head) and a
   slice of a prefill's layers. The arithmetic of LlamaModel._layer over the block weights
   with the attention kernels, without ~20 torch ops a layer and their Python. */
#include "kernels.h"

static void mat_mul_rows(const Mat *w, const float *x, int M, float *y, int gemm_rows, int nt) {
    if (w->kind == 0) q4_1_matmul(x, M, w->k, (const uint8_t *)w->qs, w->d, w->m, w->pq, w->pd, w->pm, y, w->n,
                                  gemm_rows, nt);
    else q8_0_matmul(x, M, w->k, (const int8_t *)w->qs, w->d, y, w->n, gemm_rows, nt);
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

/* silu(g) * u for 8 lanes: the one SiLU both the prefill and the decode step use. */
static inline __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
    return _mm256_mul_ps(_mm256_div_ps(g, den), u);
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
        _mm256_storeu_ps(a->act + (size_t)b * a->I + j, silu_mul8(_mm256_loadu_ps(g), _mm256_loadu_ps(g + a->I)));
    }
}

/* act[b] = silu(gate[b]) * up[b], gu[b] = [gate | up] of I each; I % 32 == 0 (down is in blocks). */
static void silu_mul(const float *gu, float *act, int B, int I, int nt) {
    SiluMul a = {B, I, gu, act};
    seg_parallel_for((B * (I / 8) + SILU_VECS - 1) / SILU_VECS, nt, silu_task, &a);
}

/* The decode step is a program of stages (pool.c), nine a layer: attention norm (with the
   previous layer's residual), QKV product, RoPE and the K/V store, attention per (sequence,
   KV head, slot chunk), the merge of those chunks, output product, MLP norm with the
   residual, gate/up product with SiLU, down product; then the final norm and the LM head.
   Every task computes into its thread's scratch and commits once, so a task held by a
   parked thread is redone by a running one; a norm or RoPE task updates only its own rows.
   The arithmetic of every output is what the same kernels compute one call at a time. */
typedef struct {
    const Net *net; int B, nt;
    const int64_t *pos, *slots, *kv_strides; void *const *kv;
    float *x, *h, *qkv, *pm, *att, *act, *logits;
    const int *attn_first;  /* [B+1]: sequence b's attention tasks are attn_first[b] .. [b+1]-1 */
    const int *nchunk, *chunk;  /* [B]: slot chunks per KV head, slots per chunk */
} Step;

typedef struct {
    const Step *s; int l;
    const Mat *w; const float *in; float *y; int outs, rows;  /* a product: y [B, outs], outputs per task */
    const float *norm; int add;                         /* a norm: weights; residual first */
} StageArgs;

/* Outputs per product task: about 64 tasks at most, a multiple of 16 (the GEMM's panel). */
static int product_rows(int N) { return 16 * ((N + 16 * 64 - 1) / (16 * 64)); }

/* Row b: out = [x_b (+ h_b) | rms_norm(that) * w]. */
static void norm_run(const void *ctx, int b, float *out) {
    const StageArgs *a = ctx;
    const int H = a->s->net->hidden;
    const float *xb = a->s->x + (size_t)b * H, *hb = a->s->h + (size_t)b * H;
    if (a->add) for (int i = 0; i < H; i++) out[i] = xb[i] + hb[i];
    else memcpy(out, xb, sizeof(float) * H);
    rms_norm_row(out, a->norm, H, a->s->net->eps, out + H);
}

static void norm_commit(const void *ctx, int b, const float *out) {
    const StageArgs *a = ctx;
    const int H = a->s->net->hidden;
    if (a->add) memcpy(a->s->x + (size_t)b * H, out, sizeof(float) * H);
    memcpy(a->s->h + (size_t)b * H, out + H, sizeof(float) * H);
}

/* Outputs n0 .. n0+rows-1 of y = in @ w^T for every row: out [B, rows], then the panel. */
static int task_end(const StageArgs *a, int n0) { return n0 + a->rows < a->outs ? n0 + a->rows : a->outs; }

static void product_run(const void *ctx, int task, float *out) {
    const StageArgs *a = ctx;
    const int B = a->s->B, n0 = task * a->rows;
    mat_rows(a->w, a->in, B, n0, task_end(a, n0), SEG_DECODE_GEMM_ROWS, out + (size_t)B * a->rows, out, a->rows);
}

/* A product task's outputs out [B, rows] into columns n0 .. of y [B, outs]. */
static void columns_commit(const void *ctx, int task, const float *out) {
    const StageArgs *a = ctx;
    const int n0 = task * a->rows, n1 = task_end(a, n0);
    for (int i = 0; i < a->s->B; i++)
        memcpy(a->y + (size_t)i * a->outs + n0, out + (size_t)i * a->rows, sizeof(float) * (n1 - n0));
}

/* act[:, n0 .. n0+rows-1] = silu(gate) * up, from gate rows n0.. and up rows I+n0.. of the
   fused product: out [B, rows], gate [B, rows], up [B, rows], then the panel. */
static void gate_up_run(const void *ctx, int task, float *out) {
    const StageArgs *a = ctx;
    const int B = a->s->B, I = a->outs, R = a->rows, n0 = task * R, n1 = task_end(a, n0);
    float *g = out + (size_t)B * R, *u = g + (size_t)B * R, *panel = u + (size_t)B * R;
    mat_rows(a->w, a->in, B, n0, n1, SEG_DECODE_GEMM_ROWS, panel, g, R);
    mat_rows(a->w, a->in, B, I + n0, I + n1, SEG_DECODE_GEMM_ROWS, panel, u, R);
    for (int i = 0; i < B; i++)
        for (int j = 0; j < n1 - n0; j += 8)
            _mm256_storeu_ps(out + (size_t)i * R + j,
                             silu_mul8(_mm256_loadu_ps(g + (size_t)i * R + j), _mm256_loadu_ps(u + (size_t)i * R + j)));
}

/* Sequence b's qkv row with the bias added and RoPE applied (out [q+2kv]). */
static void rope_run(const void *ctx, int b, float *out) {
    const StageArgs *a = ctx;
    const Net *net = a->s->net;
    const Layer *L = net->layers + a->l;
    const int D = net->head_dim, nqkv = (net->n_heads + 2 * net->n_kv) * D;
    memcpy(out, a->s->qkv + (size_t)b * nqkv, sizeof(float) * nqkv);
    if (L->qkv_bias) for (int i = 0; i < nqkv; i++) out[i] += L->qkv_bias[i];
    const int64_t p = a->s->pos[b];
    rope_row(out, net->n_heads + net->n_kv, D, net->cos + (size_t)p * D, net->sin + (size_t)p * D);
}

static void rope_commit(const void *ctx, int b, const float *out) {
    const StageArgs *a = ctx;
    const Step *s = a->s;
    const Net *net = s->net;
    const int nqkv = (net->n_heads + 2 * net->n_kv) * net->head_dim;
    memcpy(s->qkv + (size_t)b * nqkv, out, sizeof(float) * nqkv);
    const int64_t *st = s->kv_strides + 3 * b;
    const size_t kofs = (size_t)(a->l * st[0]), vofs = kofs + (size_t)st[1];
    store_kv(net, out, s->kv[b], st, kofs, vofs, s->slots[b]);
}

/* Task t: (sequence b, KV head, slot chunk) -> the G query heads' partial state [G][D+2],
   then G * chunk floats of scores. */
static void attn_run(const void *ctx, int t, float *out) {
    const StageArgs *a = ctx;
    const Step *s = a->s;
    const Net *net = s->net;
    const int D = net->head_dim, Hq = net->n_heads, Hkv = net->n_kv, G = Hq / Hkv;
    const int nqkv = (Hq + 2 * Hkv) * D;
    int b = 0;
    while (t >= s->attn_first[b + 1]) b++;
    const int local = t - s->attn_first[b], h = local / s->nchunk[b], c = local % s->nchunk[b];
    const int S = (int)s->slots[b] + 1, s0 = c * s->chunk[b], s1 = s0 + s->chunk[b] < S ? s0 + s->chunk[b] : S;
    if (s1 <= s0) { for (int g = 0; g < G; g++) out[g * (D + 2)] = -INFINITY; return; }
    const int64_t *st = s->kv_strides + 3 * b;
    const size_t kofs = (size_t)(a->l * st[0]) + (size_t)h * st[2], vofs = kofs + (size_t)st[1];
    const float *q = s->qkv + (size_t)b * nqkv + (size_t)h * G * D;
    float *sc = out + (size_t)G * (D + 2);
    if (net->kv_f16)
        decode_part_f16(q, (const uint16_t *)s->kv[b] + kofs, (const uint16_t *)s->kv[b] + vofs, G, s0, s1, D,
                        net->scale, out, sc);
    else
        decode_part_f32(q, (const float *)s->kv[b] + kofs, (const float *)s->kv[b] + vofs, G, s0, s1, D,
                        net->scale, out, sc);
}

static void attn_commit(const void *ctx, int t, const float *out) {
    const StageArgs *a = ctx;
    const Net *net = a->s->net;
    const int G = net->n_heads / net->n_kv, W = G * (net->head_dim + 2);
    memcpy(a->s->pm + (size_t)t * W, out, sizeof(float) * W);
}

/* Sequence b's attention output [Hq, D]: its chunks' states merged. */
static void merge_run(const void *ctx, int b, float *out) {
    const StageArgs *a = ctx;
    const Step *s = a->s;
    const Net *net = s->net;
    const int D = net->head_dim, G = net->n_heads / net->n_kv;
    const float *pm = s->pm + (size_t)s->attn_first[b] * G * (D + 2);
    for (int hr = 0; hr < net->n_heads; hr++) merge_row(pm, s->nchunk[b], G, D, hr, out + (size_t)hr * D);
}

static void merge_commit(const void *ctx, int b, const float *out) {
    const StageArgs *a = ctx;
    const int qd = a->s->net->n_heads * a->s->net->head_dim;
    memcpy(a->s->att + (size_t)b * qd, out, sizeof(float) * qd);
}

/* kv[b]: that sequence's buffer; kv_strides[b] its (layer, K/V, head) strides in elements;
   slots[b] where the new token's K/V go (it attends to slots 0..slots[b]); pos[b] its RoPE
   position. logits: [B, vocab]. */
void decode_step(const Net *net, int B, const int64_t *tokens, const int64_t *pos, const int64_t *slots,
                 void *const *kv, const int64_t *kv_strides, float *logits, int nt) {
    const int H = net->hidden, D = net->head_dim, Hq = net->n_heads, Hkv = net->n_kv, G = Hq / Hkv;
    const int qd = Hq * D, nqkv = qd + 2 * Hkv * D, I = net->inter, L = net->n_layers;
    int *ints = (int *)malloc(sizeof(int) * (size_t)(3 * B + 1));
    int *first = ints, *nchunk = first + B + 1, *chunk = nchunk + B;
    size_t attn_scratch = 0;
    first[0] = 0;
    for (int b = 0; b < B; b++) {
        const int S = (int)slots[b] + 1;
        nchunk[b] = nt * 4 < S ? nt * 4 : S;  /* attend_decode's split */
        chunk[b] = (S + nchunk[b] - 1) / nchunk[b];
        first[b + 1] = first[b] + Hkv * nchunk[b];
        const size_t need = (size_t)G * (D + 2) + (size_t)G * chunk[b];
        if (need > attn_scratch) attn_scratch = need;
    }
    const size_t pm_floats = (size_t)first[B] * G * (D + 2);
    float *buf = (float *)malloc(sizeof(float) * ((size_t)B * (2 * H + nqkv + qd + I) + pm_floats));
    float *x = buf, *h = x + (size_t)B * H, *qkv = h + (size_t)B * H;  /* [B,H] [B,H] [B,nqkv] */
    float *att = qkv + (size_t)B * nqkv, *act = att + (size_t)B * qd;    /* [B,qd] [B,I] */
    float *pm = act + (size_t)B * I;                                    /* partial states */
    for (int b = 0; b < B; b++)
        memcpy(x + (size_t)b * H, net->embed + (size_t)tokens[b] * H, sizeof(float) * H);
    const Step step = {net, B, nt, pos, slots, kv_strides, kv, x, h, qkv, pm, att, act, logits, first, nchunk, chunk};

    const int nstages = 9 * L + 2;
    SegStage *stages = (SegStage *)calloc((size_t)nstages, sizeof(SegStage));
    StageArgs *args = (StageArgs *)calloc((size_t)nstages, sizeof(StageArgs));
    size_t scratch = attn_scratch;
    int n = 0;
#define STAGE(tasks, RUN, COMMIT) \
    (stages[n] = (SegStage){.ntasks = (tasks), .run = RUN, .commit = COMMIT, .ctx = &args[n]}, &args[n++])
#define NEED(floats) do { if ((size_t)(floats) > scratch) scratch = (size_t)(floats); } while (0)
    /* a product stage: y [B, OUTS] from IN; each task's scratch is BUFS x [B, rows] and a panel */
#define PRODUCT(RUN, W, IN, Y, OUTS, BUFS) do { \
        const int rows_ = product_rows(OUTS); \
        *STAGE(((OUTS) + rows_ - 1) / rows_, RUN, columns_commit) = \
            (StageArgs){.s = &step, .w = (W), .in = (IN), .y = (Y), .outs = (OUTS), .rows = rows_}; \
        NEED((size_t)(BUFS) * B * rows_ + (size_t)(W)->k * 16); \
    } while (0)
    NEED(2 * H);
    NEED(nqkv);
    NEED(qd);
    for (int l = 0; l < L; l++) {
        const Layer *Ly = net->layers + l;
        *STAGE(B, norm_run, norm_commit) = (StageArgs){.s = &step, .l = l, .norm = Ly->attn_norm, .add = l > 0};
        PRODUCT(product_run, &Ly->qkv, h, qkv, Ly->qkv.n, 1);
        *STAGE(B, rope_run, rope_commit) = (StageArgs){.s = &step, .l = l};
        *STAGE(first[B], attn_run, attn_commit) = (StageArgs){.s = &step, .l = l};
        *STAGE(B, merge_run, merge_commit) = (StageArgs){.s = &step, .l = l};
        PRODUCT(product_run, &Ly->o, att, h, Ly->o.n, 1);
        *STAGE(B, norm_run, norm_commit) = (StageArgs){.s = &step, .l = l, .norm = Ly->mlp_norm, .add = 1};
        PRODUCT(gate_up_run, &Ly->gate_up, h, act, I, 3);
        PRODUCT(product_run, &Ly->down, act, h, Ly->down.n, 1);
    }
    *STAGE(B, norm_run, norm_commit) = (StageArgs){.s = &step, .norm = net->norm, .add = 1};
    PRODUCT(product_run, &net->head, h, logits, net->head.n, 1);
#undef STAGE
#undef NEED
#undef PRODUCT
    seg_run_stages(stages, n, scratch, nt);
    free(stages);
    free(args);
    free(buf);
    free(ints);
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
