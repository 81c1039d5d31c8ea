// decoder_layers: every decoder layer of a step in one call, so Python is off the hot path: a
// decode step of 30 layers would otherwise make ~270 calls through ctypes, each costing more than
// a small layer's arithmetic. The same kernels as the op-by-op path run in the same order, so the
// results are bit for bit those of CpuBackend's ops:
//   h = rms_norm(x); qkv = h W_qkv^T; q = rope(q), rope(k) and v into the caches; a = attention(q);
//   x += a W_o^T; h = rms_norm(x); x += swiglu(h W_gate_up^T) W_down^T
// Each matrix (or each part of q|k|v and gate|up, where their formats differ) is f32 rows (type
// F32_ROWS: skinny_matmul, then added for the residual), f16 or bf16 rows (half.c: half_matmul)
// or GGML blocks (quant.c: the activation quantized once to xq, then quant_matmul); the last two
// accumulate the residual themselves. With AVX2 alone the ops are their 8-lane builds and a
// block-format matrix goes through avx2.c's avx2_block_matmul (no f16 / bf16 kernel there: such a
// model goes op by op).
// Rows: T <= 16 (a decode step's few rows; more go op by op through the prompt kernels).
#include "cpu.h"
#ifdef PYLLM_AVX2
#include <time.h>
#define F32_ROWS (-1)

// The benchmarks' split of a step: with timing on, the seconds decoder_layers spends in its
// matmuls (the weight-streaming kernels) add up here; off (the default), no clock is read.
static struct {
  int on;
  double matmul_seconds;
} timing;

EXPORT double decoder_matmul_seconds(int keep_timing) {  // the sum so far (then reset); timing on or off from now
  const double seconds = timing.matmul_seconds;
  timing.on = keep_timing, timing.matmul_seconds = 0.0;
  return seconds;
}

static double seconds_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

struct matrix {          // one weight matrix [N, K]
  const void *data;      // f32 [N, K], f16 / bf16 [N, K] or GGML blocks [N, row_bytes]
  int type, N;           // type: F32_ROWS or a GGML type id (F16, BF16, a block format)
};

#define MAX_PARTS 3      // q | k | v stored in different formats (llama.cpp's Q4_K_M) stay three matrices

struct layer {           // one decoder layer's weights
  const float *input_norm, *post_norm, *qkv_bias;  // [hidden], [hidden], [(H + 2 KV) D] or NULL
  struct matrix qkv[MAX_PARTS], o, gate_up[MAX_PARTS], down;  // [(H + 2 KV) D, hidden] (parts stacked by rows),
  int qkv_parts, gate_up_parts;                               // [hidden, H D], [2 inter, hidden], [hidden, inter]
};

#ifdef __AVX512F__
void quantize_activations(int M, int layers, int K, const float *x, void *xq);
void quant_matmul(int type, int M, int layers, const void *xq, int K, const uint8_t *w, int N, float *out,
                  int accumulate);
void half_matmul(int type, int M, const float *x, int K, const uint16_t *w, int N, float *out, int accumulate);
#endif

// out [T, N] = x [T, K] @ m^T, or added into out when accumulate; scratch: [T, N] floats, xq: room
// for x's int8 blocks in `layers` layers (quant.c)
static void apply_untimed(const struct matrix *m, int T, int layers, const float *x, int K, float *out,
                          int accumulate, float *scratch, void *xq) {
#ifndef __AVX512F__  // AVX2 alone: f32 rows or a block format (avx2.c quantizes x itself)
  (void)xq;
  if (m->type != F32_ROWS) {
    avx2_block_matmul(m->type, T, layers, x, K, m->data, m->N, out, accumulate);
    return;
  }
#else
  if (m->type == F16 || m->type == BF16) {
    half_matmul(m->type, T, x, K, m->data, m->N, out, accumulate);
    return;
  }
  if (m->type != F32_ROWS) {
    quantize_activations(T, layers, K, x, xq);
    quant_matmul(m->type, T, layers, xq, K, m->data, m->N, out, accumulate);
    return;
  }
#endif
  if (!accumulate) {
    skinny_matmul(T, x, K, m->data, m->N, out);
    return;
  }
  skinny_matmul(T, x, K, m->data, m->N, scratch);
  for (size_t i = 0; i < (size_t)T * m->N; i++) out[i] += scratch[i];
}

static void apply(const struct matrix *m, int T, int layers, const float *x, int K, float *out, int accumulate,
                  float *scratch, void *xq) {
  const double start = timing.on ? seconds_now() : 0.0;
  apply_untimed(m, T, layers, x, K, out, accumulate, scratch, xq);
  if (timing.on) timing.matmul_seconds += seconds_now() - start;
}

// out [T, sum of the parts' N] = x [T, K] @ (parts stacked by rows)^T: each part through spare, its
// columns copied into place (one part: straight into out)
static void apply_parts(const struct matrix *parts, int n_parts, int T, int layers, const float *x, int K, float *out,
                        float *spare, void *xq) {
  if (n_parts == 1) {
    apply(parts, T, layers, x, K, out, 0, NULL, xq);
    return;
  }
  int width = 0, column = 0;
  for (int p = 0; p < n_parts; p++) width += parts[p].N;
  for (int p = 0; p < n_parts; column += parts[p++].N) {
    apply(&parts[p], T, layers, x, K, spare, 0, NULL, xq);
    for (int t = 0; t < T; t++)
      memcpy(out + (size_t)t * width + column, spare + (size_t)t * parts[p].N, sizeof(float) * parts[p].N);
  }
}

// x [T, hidden] advances through layers 0 .. L - 1 in place (scale: attention's, D^-0.5). S sequences own the T rows in order;
// k, v (the KV pool of L layers), tables, length, count: their caches as attention's. Scratch (f32): h [T, hidden],
// qkv [T, (H + 2 KV) D], q [T, H D], a [T, H D], gate_up [T, 2 inter], act [T, inter], spare
// [T, max N]; xq: quantize_activations' bytes for T rows of max(hidden, inter) in `activation_layers`.
EXPORT void decoder_layers(int L, const struct layer *layers, int T, int activation_layers, int hidden, int inter, int H,
                           int KV, int D, float eps, float scale, float *x, int S, const float *cos, const float *sin, float *k,
                           float *v, const int32_t *const *tables, const int *length, const int *count, float *h,
                           float *qkv, float *q, float *a, float *gate_up, float *act, float *spare, void *xq) {
  for (int l = 0; l < L; l++) {
    const struct layer *w = &layers[l];
    rms_norm(T, hidden, x, w->input_norm, eps, h);
    apply_parts(w->qkv, w->qkv_parts, T, activation_layers, h, hidden, qkv, spare, xq);
    qkv_rope(S, H, KV, D, l, L, qkv, w->qkv_bias, cos, sin, k, v, tables, length, count, q);
    attention(S, H, KV, D, scale, l, L, q, k, v, tables, length, count, a);
    apply(&w->o, T, activation_layers, a, H * D, x, 1, spare, xq);
    rms_norm(T, hidden, x, w->post_norm, eps, h);
    apply_parts(w->gate_up, w->gate_up_parts, T, activation_layers, h, hidden, gate_up, spare, xq);
    swiglu(T, inter, gate_up, act);
    apply(&w->down, T, activation_layers, act, inter, x, 1, spare, xq);
  }
}
#endif
