// The CPU backend's C kernels, built into one library from kernels/cpu/*.c by
// pyllm/backends/cpu_kernels.py (host C compiler, -O3 -march=native) and called through ctypes:
//   matmul.c     skinny_matmul (a decode step's few rows; AVX-512 or AVX2)
//   gemm.c       matmul and quant_gemm (a prompt's many rows; AVX-512 or AVX2)
//   rows.c       rms_norm, swiglu, qkv_rope (bias, rope and the KV-cache writes; AVX-512 or AVX2)
//   attention.c  attention (every sequence of a step over its KV cache, through its block table;
//                attention_tiles.h: its lanes and register tiles; AVX-512 or AVX2)
//   quant.c      quant_matmul (decode rows on GGML block-quantized weights, int8 activations),
//                quantize_activations (quant_blocks.h: decoding the 32-weight formats);
//                quant_k.c: the same for the K-quants; dequantize.c: to f32; interleave.c:
//                the 32-weight formats' rows reordered at load for quant_matmul and avx2.c
//   half.c       half_matmul (decode rows on f16 / bf16 weights)
//   pool.c       the thread pool they all share
//   layers.c     decoder_layers: every decoder layer of a decode step in one call
//   avx2.c       avx2_block_matmul: the decode matmul on every GGML block format (int8
//                activations in quant.c's one or two layers) for CPUs with AVX2 but without
//                AVX-512; avx2_interleaved.c: its rows of interleaved matrices;
//                avx2_dequantize.c: a prompt's weight strips for gemm.c; avx2_blocks.h: the
//                block formats decoded in ymm, for avx2.c and avx2_dequantize.c
// Without AVX-512 the AVX-512-only sources compile to nothing; with AVX2, FMA and F16C
// (PYLLM_AVX2: every AVX-512 CPU has them too) avx2*.c, matmul.c, gemm.c, rows.c, attention.c,
// layers.c, pool.c and stream.c are built, so decode steps and prompts run in C there too.
#pragma once
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PYLLM_AVX2 1
#endif
#if defined(__AVX512F__) || defined(PYLLM_AVX2)
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))  // what ctypes calls; the rest stays inside

// The pool (pool.c): a kernel takes the pool, sets its arguments, and pool_run(task) runs
// task(part) for part 0 .. pool_threads - 1, part 0 on the calling thread.
extern int pool_threads;
void pool_lock(void);  // one call at a time, whichever thread makes it
void pool_unlock(void);
void pool_run(void (*task)(int part));
void pool_run_sized(void (*task)(int part), size_t bytes);  // the same, on the caller alone for a small call

// Guided shares of a call's `units` (weight rows or runs of them): each thread takes a part of
// what is left, 1 / (2 threads), from the counter *next (0 at the call's start), so a thread on a
// busier core takes less -> the share's first unit (units: none left), its count in *take.
static inline int pool_share(atomic_int *next, int units, int *take) {
  int first = atomic_load(next);
  do {
    *take = (units - first) / (2 * pool_threads);
    *take = *take < 1 ? 1 : *take;
  } while (first < units && !atomic_compare_exchange_weak(next, &first, first + *take));
  return first < units ? first : units;
}

// Weights as GGUF stores them: GGML block-quantized (quant.c, quant_k.c) or 16-bit (half.c);
// type: the GGML type id
enum { F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };
// INTERLEAVED | a 32-weight format's type: a matrix whose rows are in the interleaved layout, 16
// rows a group (interleave.c: the same bytes, reordered for quant_matmul and avx2_interleaved.c),
// the last N % 16 as GGUF
#define INTERLEAVED 0x100
#define ROW_GROUP 16  // rows of an interleaved matrix's group

// The interleaved layout of a group of ROW_GROUP blocks (the same bytes as GGUF's, reordered): at
// 0, the quants as the decoded vectors hold them: 64-byte vector t, lane j = bytes 4t .. 4t + 3 of
// block j's qs (q4, q5: t < 4, nibbles as stored; q8_0: t < 8); then per lane j the 4 bytes of its
// qh (q5), the f16 d and the f16 m (q4_1, q5_1) as 16-lane vectors. Where GGUF's block holds them:
struct interleaved_layout {
  int qs, qs_bytes;   // a GGUF block's qs: its offset and bytes
  int qh, d, m;       // in the group: offsets of the qh, d and m vectors (-1: the format has none)
  int block_qh;       // a GGUF block's qh (d at 0, m at 2)
};

static inline struct interleaved_layout interleaved_layout(int type) {
  switch (type) {
    case Q4_0: return (struct interleaved_layout){2, 16, -1, 256, -1, -1};
    case Q4_1: return (struct interleaved_layout){4, 16, -1, 256, 288, -1};
    case Q5_0: return (struct interleaved_layout){6, 16, 256, 320, -1, 2};
    case Q5_1: return (struct interleaved_layout){8, 16, 256, 320, 352, 4};
    default: return (struct interleaved_layout){2, 32, -1, 512, -1, -1};  // Q8_0
  }
}
// interleave.c: w [N, K] from GGUF's layout to the interleaved one, in place; row n of it as GGUF's
void interleave_rows(int type, uint8_t *w, int N, int K);
void deinterleave_row(int type, const uint8_t *w, int N, int K, int n, uint8_t *out);
// interleave.c: rows first .. first + count - 1 of w [N, K] (picked NULL: else rows picked[0 .. count - 1])
// -> f32 [count, K] by rows_f32 on rows in GGUF's layout (type | INTERLEAVED: each row put back first)
void dequantize_matrix_rows_by(void (*rows_f32)(int type, const uint8_t *w, int rows, int K, float *out), int type,
                               const uint8_t *w, int N, int K, int first, int count, const int32_t *picked,
                               float *out);

// bytes of a row of K weights (0: a type not known here)
static inline size_t row_bytes(int type, int K) {
  switch (type & ~INTERLEAVED) {
    case F16: case BF16: return (size_t)K * 2;
    case Q4_0: return (size_t)K / 32 * 18;
    case Q4_1: return (size_t)K / 32 * 20;
    case Q5_0: return (size_t)K / 32 * 22;
    case Q5_1: return (size_t)K / 32 * 24;
    case Q8_0: return (size_t)K / 32 * 34;
    case Q4_K: return (size_t)K / 256 * 144;
    case Q5_K: return (size_t)K / 256 * 176;
    case Q6_K: return (size_t)K / 256 * 210;
    default: return 0;
  }
}

#define BLOCK_TOKENS 16  // tokens per block of a KV pool [blocks, layers, KV, BLOCK_TOKENS, D] (pyllm/backends/base.py)

// where KV head g of `layer` in `block` starts in a KV pool: its BLOCK_TOKENS rows of D floats
static inline size_t kv_block(int block, int layers, int layer, int KV, int g, int D) {
  return (((size_t)block * layers + layer) * KV + g) * BLOCK_TOKENS * D;
}

// A step's rows as qkv_rope takes them: sequence s owns count[s] consecutive rows, the last of its
// length[s] tokens -> per row its sequence [T], then its position [T] (malloc'd: the caller frees)
static inline int *rows_of_step(int S, const int *length, const int *count, int T) {
  int *per_row = malloc(sizeof(int) * 2 * (size_t)(T > 0 ? T : 1));
  if (per_row == NULL) abort();
  for (int s = 0, t = 0; s < S; s++)
    for (int i = 0; i < count[s]; i++, t++) per_row[t] = s, per_row[T + t] = length[s] - count[s] + i;
  return per_row;
}

// where head h of row t's q|k|v [(H + 2 KV) D] goes: a query head into q [T, H, D], key head
// g = h - H into k, value head g - KV into v, KV pools [blocks, layers, KV, BLOCK_TOKENS, D], at
// the layer, in the position's block and row
static inline float *qkv_destination(int h, int t, int H, int KV, int D, int block, int position, int layer,
                                     int layers, float *q, float *k, float *v) {
  const int g = h - H;
  if (g < 0) return q + ((size_t)t * H + h) * D;
  return (g < KV ? k : v) + kv_block(block, layers, layer, KV, g % KV, D) + (size_t)(position % BLOCK_TOKENS) * D;
}

// The step's ops as both instruction sets build them (matmul.c, rows.c, attention.c), one
// contract, called by layers.c.
void skinny_matmul(int M, const float *x, int K, const float *w, int N, float *out);
void rms_norm(int T, int width, const float *x, const float *weight, float eps, float *out);
void swiglu(int T, int width, const float *gate_up, float *out);
void qkv_rope(int S, int H, int KV, int D, int layer, int layers, const float *qkv_in, const float *bias,
              const float *cos, const float *sin, float *k, float *v, const int32_t *const *tables, const int *length,
              const int *count, float *q);
void attention(int S, int H, int KV, int D, float scale, int layer, int layers, const float *q, const float *k,
               const float *v, const int32_t *const *tables, const int *length, const int *count, float *out);
void avx2_block_matmul(int type, int M, int layers, const float *x, int K, const uint8_t *w, int N, float *out,
                       int accumulate);
#endif

// exp in vector lanes (exp512, exp256): exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2
// in two steps (Cody-Waite: ln 2 = EXP_LN2_HIGH + EXP_LN2_LOW), and exp(r) = 1 + r + r^2 P(r) on
// |r| <= ln 2 / 2, P's coefficients EXP_P highest first (Cephes' expf)
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HIGH 0.693359375f
#define EXP_LN2_LOW -2.12194440e-4f
static const float EXP_P[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#ifdef PYLLM_AVX2
// 8-lane helpers (avx2*.c): a tail of `left` < 8 floats through a lane mask
static inline __m256i lanes8(int left) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float sum8(__m256 v) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

static inline float max8(__m256 v) {
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

static inline __m256 exp256(__m256 x) {  // exp512's method (EXP_*) in 8 lanes: within 2 ulp of expf
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));  // 2^n stays a normal float
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HIGH), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LOW), r);
  __m256 p = _mm256_set1_ps(EXP_P[0]);
  for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}
#endif

#ifdef __AVX512F__

static inline __m512 keep(__m512 v) {  // v as computed: hides a product from contraction into an FMA
  __asm__("" : "+v"(v));
  return v;
}

static inline __m512 exp512(__m512 x) {  // for swiglu and softmax (the method: EXP_* above); within 2 ulp of expf
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));  // 0 .. FLT_MAX
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HIGH), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LOW), r);
  __m512 p = _mm512_set1_ps(EXP_P[0]);
  for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

#ifdef __AVX512F__
// w [rows, K] -> f32 [rows, K], as gguf.quants.dequantize; single-threaded, for inside pool tasks
void dequantize_rows(int type, const uint8_t *w, int rows, int K, float *out);
void dequantize_rows_half(int type, const uint16_t *w, int rows, int K, float *out);  // F16, BF16
// rows first .. first + count - 1 of w [N, K] (or rows picked[0 .. count - 1]) -> f32 [count, K]; type may
// carry INTERLEAVED
void dequantize_matrix_rows(int type, const uint8_t *w, int N, int K, int first, int count, const int32_t *picked,
                            float *out);
// between quant.c and quant_k.c: the current quant_matmul call, xq's record size (quant.c), the
// K-quants' rows of it and their dequantization, a row's output
#define QX_GROUP 16     // blocks of 32 per xq record
#define QX_RECORD 832   // bytes of an xq record
#define MAX_QUANT_ROWS 32  // xq records per group a call takes: 16 rows of x, each as two layers
#define QUANT_STRIP 8   // weight rows that take a group of xq in turn (when a row's xq passes L1)
struct quant_call {
  const uint8_t *xq, *w;
  float *out;
  int type, M, K, N, accumulate, strip;  // M: xq records per group (rows x layers); strip: 1 or QUANT_STRIP
  int layers;           // 1, or 2: records M / 2 .. M - 1 are rows 0 .. M / 2 - 1's second layers
  int interleaved;      // the matrix in the interleaved layout: 16 rows a group (interleave.c)
  const uint8_t *tail;  // K / 32 % QX_GROUP blocks: xq's last records, lane j = lane j % that (M records)
};
// rows whose tails of `tail` blocks share a group's lanes, at most a batch (QUANT_STRIP); tail 0: none
static inline int quant_tail_rows(int tail) {
  return !tail ? 0 : QX_GROUP / tail < QUANT_STRIP ? QX_GROUP / tail : QUANT_STRIP;
}
// lanes 0 .. tail - 1 of acc[m] += lanes first .. first + tail - 1 of sums[m] (a row's share of a group of tails)
static inline void quant_add_tail(int M, const __m512 *sums, int first, int tail, __m512 *acc) {
  const __m512i index = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(first));
  for (int m = 0; m < M; m++)
    acc[m] = _mm512_add_ps(acc[m], _mm512_maskz_permutexvar_ps((__mmask16)((1u << tail) - 1), index, sums[m]));
}
void quant_rows_k(const struct quant_call *call, int lo, int hi);  // weight rows lo .. hi - 1
void dequantize_rows_k(int type, const uint8_t *w, int rows, int K, float *out);
void quant_store(const struct quant_call *call, int n0, int rows,  // out[:, n0 + r] (+)= acc[r]'s lane sums, r < rows
                 __m512 (*acc)[MAX_QUANT_ROWS]);
// byte offsets inside an xq record (quant.c's header has the layout)
enum { QX_D = 512, QX_DSUM = 576, QX_SUM = 640, QX_SUM_LO = 704, QX_SUM_HI = 768 };

// one group of weights W[8] (decoded to xq's layout) against one xq record x: per lane (block),
// s0 the products over the block's first half, s1 over its second
static inline __attribute__((always_inline)) void xq_dots(const __m512i W[8], const uint8_t *x, __m512i *s0,
                                                          __m512i *s1) {
  *s0 = *s1 = _mm512_setzero_si512();
  for (int u = 0; u < 4; u++) {
    *s0 = _mm512_dpbusd_epi32(*s0, W[u], _mm512_loadu_si512(x + 64 * u));
    *s1 = _mm512_dpbusd_epi32(*s1, W[4 + u], _mm512_loadu_si512(x + 64 * (4 + u)));
  }
}

// n (1, 2) groups of weights W[i] against one xq record x, each of its vectors loaded once for
// all n: s[i] per lane = the products over the block; one chain per group where M >= 4 records'
// chains overlap, else two
static inline __attribute__((always_inline)) void xq_sums(const int n, const __m512i *const *W, const uint8_t *x, int M,
                                                          __m512i *s) {
  __m512i lo[2], hi[2];
  for (int i = 0; i < n; i++) lo[i] = hi[i] = _mm512_setzero_si512();
  for (int u = 0; u < 4; u++) {
    const __m512i first = _mm512_loadu_si512(x + 64 * u), second = _mm512_loadu_si512(x + 64 * (4 + u));
    for (int i = 0; i < n; i++) {
      lo[i] = _mm512_dpbusd_epi32(lo[i], W[i][u], first);
      if (M >= 4)
        lo[i] = _mm512_dpbusd_epi32(lo[i], W[i][4 + u], second);
      else
        hi[i] = _mm512_dpbusd_epi32(hi[i], W[i][4 + u], second);
    }
  }
  for (int i = 0; i < n; i++) s[i] = M >= 4 ? lo[i] : _mm512_add_epi32(lo[i], hi[i]);
}

// a block's terms added to acc, per lane, from its exact sum s = sum(q xq) and its xq's dx:
// offset formats d dx (s - offset), offset = c sum(xq); formats with a min d dx s + m dsum, dsum = dx sum(xq)
static inline __attribute__((always_inline)) __m512 plus_offset_terms(__m512 acc, __m512i s, __m512i offset, __m512 dx,
                                                                      __m512 d) {
  return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s, offset)), dx), d, acc);
}
static inline __attribute__((always_inline)) __m512 plus_min_terms(__m512 acc, __m512i s, __m512 dx, __m512 d, __m512 m,
                                                                   __m512 dsum) {
  return _mm512_fmadd_ps(m, dsum, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s), dx), d, acc));
}

// formats with a per-block min (q4_1, q5_1, q4_k, q5_k), for n (1, 2) weight groups (W[i], scales
// dw[i], mins mw[i]): acc[i][m] += dw dx sum(q xq) + mw dx sum(xq), per lane
static inline __attribute__((always_inline)) void groups_times_min(const int n, const __m512i *const *W, const __m512 *dw,
                                                                   const __m512 *mw, int M, const uint8_t *x,
                                                                   __m512 *const *acc) {
  for (int m = 0; m < M; m++, x += QX_RECORD) {
    __m512i s[2];
    xq_sums(n, W, x, M, s);
    const __m512 dx = _mm512_loadu_ps((const float *)(x + QX_D)), dsum = _mm512_loadu_ps((const float *)(x + QX_DSUM));
    for (int i = 0; i < n; i++)
      acc[i][m] = plus_min_terms(acc[i][m], s[i], dx, dw[i], mw[i], dsum);
  }
}

static inline __attribute__((always_inline)) void rows_times_min(const __m512i W[8], __m512 dw, __m512 mw, int M,
                                                                 const uint8_t *x, __m512 *acc) {
  const __m512i *groups[1] = {W};
  __m512 *accs[1] = {acc};
  groups_times_min(1, groups, &dw, &mw, M, x, accs);
}
#endif
