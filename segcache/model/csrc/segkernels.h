/* The block kernels' interface: the layouts Python hands over and the entry points it calls.

   This file is read twice: by the C compiler (through kernels.h) and by cffi's cdef at build
   time, which turns it into the Python binding (segcache/model/kernels.py). So it holds only
   what cdef parses: integer #defines, typedefs and prototypes; no #include, no #if, no macros
   with arguments. One definition of every struct for both languages.

   Weight layouts (one matrix, N outputs, K inputs, nb = K/32 blocks per row):
     q4_1: qs uint8 [N, nb*16] (byte j of a block: element j low nibble, j+16 high, as in GGUF),
           d float32 [N, nb], m float32 [N, nb]; optional panels (BlockLinear.panels):
           pq uint8 [N/16, K, 8], pd/pm float32 [N/16, nb, 16]
     q8_0: qs int8 [N, K], d float32 [N, nb]
   KV buffers: [n_layers, 2, n_kv_heads, capacity, head_dim], float32 or float16, rows of
   head_dim contiguous; kv_strides = its (layer, K/V, head) strides in elements. */

#define SEG_BLOCK 32          /* elements per quantisation block */
#define SEG_MAX_GROUP 8       /* query heads per KV head the attention kernels take */
#define SEG_DECODE_GEMM_ROWS 8 /* decode: more rows than this take the GEMM */

typedef struct {
    const void *qs; const float *d; const float *m; int kind; int n; int k;  /* kind 0 q4_1, 1 q8_0 */
    const uint8_t *pq; const float *pd; const float *pm;                       /* q4_1 panels, or NULL */
} Mat;

typedef struct {
    const float *attn_norm, *qkv_bias, *mlp_norm;  /* float32 [hidden], [q_dim + 2 kv_dim] or NULL, [hidden] */
    Mat qkv, o, gate_up, down;                     /* [q+2kv, hidden] [hidden, q] [2 inter, hidden] [hidden, inter] */
} Layer;

typedef struct {
    int n_layers, hidden, inter, n_heads, n_kv, head_dim, kv_f16;
    float eps, scale;
    const Layer *layers;
    const float *embed, *norm, *cos, *sin;  /* embed [vocab, hidden]; cos/sin [max_position, head_dim] */
    Mat head;
} Net;

/* matmul.c: y[M,N] = x[M,K] @ W^T. More than gemm_rows rows (N a multiple of 16) take the
   register-tiled GEMM, whose rows do not depend on each other; else one FMA chain per row. */
void q4_1_matmul(const float *x, int M, int K, const uint8_t *qs, const float *d, const float *m,
                 const uint8_t *pq, const float *pd, const float *pm, float *y, int N, int gemm_rows,
                 int nthreads);
void q8_0_matmul(const float *x, int M, int K, const int8_t *qs, const float *d, float *y, int N,
                 int gemm_rows, int nthreads);

/* attention.c: decode (one new token over S slots) and short prefill (T tokens after start),
   K/V float32 (_f32) or float16 as stored (_f16). q/out [Hq, T, D]. */
void attend_decode_f32(const float *q, const float *k, const float *v, long hstride, int Hkv, int G,
                       int S, int D, float scale, float *out, int nthreads);
void attend_decode_f16(const float *q, const uint16_t *k, const uint16_t *v, long hstride, int Hkv,
                       int G, int S, int D, float scale, float *out, int nthreads);
void attend_prefill_f32(const float *q, const float *k, const float *v, long hstride, int Hkv, int G,
                        int T, int start, int D, float scale, float *out, int nthreads);
void attend_prefill_f16(const float *q, const uint16_t *k, const uint16_t *v, long hstride, int Hkv,
                        int G, int T, int start, int D, float scale, float *out, int nthreads);

/* layers.c: a whole decode step of B sequences (logits [B, vocab]), and layers l0..l1-1 of a
   prefill of T >= 2 tokens of one sequence over hidden states x [T, hidden] in place. */
void decode_step(const Net *net, int B, const int64_t *tokens, const int64_t *pos,
                 const int64_t *slots, void *const *kv, const int64_t *kv_strides, float *logits,
                 int nthreads);
void prefill_layers(const Net *net, int T, float *x, const int64_t *pos, int start, void *kv,
                    const int64_t *kv_strides, int l0, int l1, int nthreads);

/* pool.c: the worker pool every kernel shares (threads started on first use): how many
   threads it started; and counts since the process started: [0] programs run on the pool,
   [1] tasks computed again by a thread that had not claimed them (their holder was slow or
   parked), [2] programs whose caller waited at the end for a thread still inside a task,
   [3] waits in which a thread found nothing to redo and slept. */
int seg_pool_workers(void);
void seg_pool_stats(uint64_t out[6]);
/* on != 0: every program runs on its calling thread alone, tasks in order, as with one
   thread but with the same split into tasks (tests compare the bits with the pool's). */
void seg_pool_serial(int on);

/* pool_check.c: the pool's contract checked on a program whose first task a pool worker
   takes stalls that worker for park_ms: 0 if it held, else which check failed (see there). */
int seg_pool_check(int park_ms, int nthreads);
