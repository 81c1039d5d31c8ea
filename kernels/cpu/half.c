// Decode matmul on 16-bit weights as GGUF stores them (f16, bf16), and their dequantization.
//
// Why: a decode step streams every weight once; 16-bit weights read half the bytes of f32, and
// widening them in registers keeps the arithmetic in f32.
//
// half_matmul: out [M, N] (+)= x [M, K] @ w^T for a decode step's few rows (M <= 16), w [N, K].
// Work split: each thread (the caller and the pool's workers) takes its own range of weight rows,
// in batches of QUANT_STRIP rows; within a batch, R rows at a time (R x M accumulators, R from M so
// that at least ~8 independent chains hide the dot products' latency) run the whole of K, then
// quant_store adds the batch's 16-lane sums at once. The weights are read once for all M rows.
// Numerics:
//   f16:  each weight widened exactly to f32 (vcvtph2ps), one FMA per weight and row: an f32
//         dot product, summed per lane in k order, then the 16 lanes.
//   bf16: vdpbf16ps multiplies bf16 pairs exactly and adds them in f32, so the activations go in
//         as two bf16 layers, x = hi + lo (hi = bf16(x), lo = bf16(x - hi), made once per call
//         into xb), each dotted with the weights: x is carried to ~16 significant bits instead of
//         bf16's 8, next to an f32 dot product only the low bits of x and the order of the sums
//         differ. One vdpbf16ps covers 32 weights and a row, as two FMAs after widening would.
#include "cpu.h"
#ifdef __AVX512F__
#define PREFETCH_WEIGHTS 4096  // how far ahead (in weights) each row is prefetched: the hardware alone lags

static struct {
  const float *x;
  const uint16_t *w, *xb;  // xb: bf16 [M, 2, K32] (hi | lo, K rounded up to 32, zeros past K)
  struct quant_call out;   // quant_store's view: out, M, N, accumulate
  int type, K, K32;
  uint16_t *xb_buffer;     // kept between calls, grown to fit
  size_t xb_allocated;
} half;

#ifdef __AVX512BF16__
// x rows [M, K] -> xb [M, 2, K32]: hi = bf16(x) (round to nearest even), lo = bf16(x - hi)
static void split_bf16(int M, int K, int K32, const float *x, uint16_t *xb) {
  for (int m = 0; m < M; m++)
    for (int k = 0; k < K32; k += 32) {
      const __mmask16 a = k + 16 <= K ? 0xFFFF : k < K ? (__mmask16)((1u << (K - k)) - 1) : 0;
      const __mmask16 b = k + 32 <= K ? 0xFFFF : k + 16 < K ? (__mmask16)((1u << (K - k - 16)) - 1) : 0;
      const __m512 x0 = _mm512_maskz_loadu_ps(a, x + (size_t)m * K + k);
      const __m512 x1 = _mm512_maskz_loadu_ps(b, x + (size_t)m * K + k + 16);
      const __m512bh hi = _mm512_cvtne2ps_pbh(x1, x0);
      const __m512i bits = (__m512i)hi;  // bf16 -> f32: the 16 bits on top
      const __m512 hi0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(bits)), 16));
      const __m512 hi1 = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(bits, 1)), 16));
      const __m512bh lo = _mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, hi1), _mm512_sub_ps(x0, hi0));
      uint16_t *row = xb + (size_t)m * 2 * K32;
      _mm512_storeu_si512(row + k, bits);
      _mm512_storeu_si512(row + K32 + k, (__m512i)lo);
    }
}

// R weight rows at w (row stride K) against M rows of xb: acc[r][m] = w_r . (hi_m + lo_m), per lane
static inline __attribute__((always_inline)) void bf16_rows(const int R, const int M, const uint16_t *w, int K,
                                                            int K32, const uint16_t *xb, __m512 out[][MAX_QUANT_ROWS]) {
  __m512 acc[4][MAX_QUANT_ROWS];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
  for (int k = 0; k < K32; k += 32) {
    const __mmask32 live = k + 32 <= K ? 0xFFFFFFFFu : (__mmask32)((1ull << (K - k)) - 1);
    __m512bh wv[4];
    for (int r = 0; r < R; r++) {
      _mm_prefetch((const char *)(w + (size_t)r * K + k + PREFETCH_WEIGHTS), _MM_HINT_T0);
      wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(live, w + (size_t)r * K + k);
    }
    for (int m = 0; m < M; m++) {
      const __m512bh hi = (__m512bh)_mm512_loadu_si512(xb + (size_t)m * 2 * K32 + k);
      const __m512bh lo = (__m512bh)_mm512_loadu_si512(xb + (size_t)m * 2 * K32 + K32 + k);
      for (int r = 0; r < R; r++) acc[r][m] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][m], hi, wv[r]), lo, wv[r]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) out[r][m] = acc[r][m];
}
#endif

// R weight rows at w (f16, row stride K) against M rows of x: acc[r][m] = w_r . x_m, per lane
// (summed in registers: x's floats could alias acc, which would keep the stores in the loop)
static inline __attribute__((always_inline)) void f16_rows(const int R, const int M, const uint16_t *w, int K,
                                                           const float *x, __m512 out[][MAX_QUANT_ROWS]) {
  __m512 acc[4][MAX_QUANT_ROWS];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
  for (int k = 0; k < K; k += 16) {
    const __mmask16 live = k + 16 <= K ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    __m512 wv[4];
    for (int r = 0; r < R; r++) {
      _mm_prefetch((const char *)(w + (size_t)r * K + k + PREFETCH_WEIGHTS), _MM_HINT_T0);
      wv[r] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, w + (size_t)r * K + k));
    }
    for (int m = 0; m < M; m++) {
      const __m512 xv = _mm512_maskz_loadu_ps(live, x + (size_t)m * K + k);
      for (int r = 0; r < R; r++) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) out[r][m] = acc[r][m];
}

// R weight rows from n (R x M accumulators) -> acc[0 .. R - 1]: lanes to sum
static inline __attribute__((always_inline)) void half_run(const int type, const int R, const int M, int n,
                                                           __m512 acc[][MAX_QUANT_ROWS]) {
  const uint16_t *w = half.w + (size_t)n * half.K;
#ifdef __AVX512BF16__
  if (type == BF16) {
    bf16_rows(R, M, w, half.K, half.K32, half.xb, acc);
    return;
  }
#endif
  f16_rows(R, M, w, half.K, half.x, acc);
}

// weight rows lo .. hi - 1 in batches of QUANT_STRIP: R rows at a time, a remainder one at a time
static inline __attribute__((always_inline)) void half_rows_m(const int type, const int R, const int M, int lo,
                                                              int hi) {
  for (int n0 = lo; n0 < hi; n0 += QUANT_STRIP) {
    const int rows = hi - n0 < QUANT_STRIP ? hi - n0 : QUANT_STRIP;
    __m512 acc[QUANT_STRIP][MAX_QUANT_ROWS];
    int r = 0;
    for (; r + R <= rows; r += R) half_run(type, R, M, n0 + r, acc + r);
    for (; r < rows; r++) half_run(type, 1, M, n0 + r, acc + r);
    quant_store(&half.out, n0, rows, acc);
  }
}

static inline __attribute__((always_inline)) void half_rows(const int type, int lo, int hi) {
  switch (half.out.M) {  // R x M accumulators: >= 8 chains where M allows, <= 16 registers
    case 1: half_rows_m(type, 4, 1, lo, hi); break;
    case 2: half_rows_m(type, 4, 2, lo, hi); break;
    case 3: case 4: half_rows_m(type, 2, half.out.M, lo, hi); break;
    default: half_rows_m(type, 1, half.out.M, lo, hi);
  }
}

static void half_part(int part) {  // weight rows split evenly among the threads
  const int lo = (int)((long long)half.out.N * part / pool_threads);
  const int hi = (int)((long long)half.out.N * (part + 1) / pool_threads);
  if (half.type == BF16)
    half_rows(BF16, lo, hi);
  else
    half_rows(F16, lo, hi);
}

// 1 where half_matmul takes bf16 (the CPU has AVX512_BF16), else 0
EXPORT int half_takes_bf16(void) {
#ifdef __AVX512BF16__
  return 1;
#else
  return 0;
#endif
}

// out [M, N] (+)= x [M, K] @ w^T, w [N, K] f16 or bf16 (type: the GGML type id; bf16 only where
// half_takes_bf16); 1 <= M <= 16.
EXPORT void half_matmul(int type, int M, const float *x, int K, const uint16_t *w, int N, float *out, int accumulate) {
  pool_lock();
  half.type = type, half.x = x, half.w = w, half.K = K, half.K32 = (K + 31) / 32 * 32;
  half.out.out = out, half.out.M = M, half.out.layers = 1, half.out.N = N, half.out.accumulate = accumulate;
#ifdef __AVX512BF16__
  if (type == BF16) {
    const size_t need = (size_t)M * 2 * half.K32;
    if (need > half.xb_allocated) {
      free(half.xb_buffer);
      half.xb_buffer = aligned_alloc(64, need * sizeof(uint16_t));
      if (half.xb_buffer == NULL) abort();
      half.xb_allocated = need;
    }
    split_bf16(M, K, half.K32, x, half.xb_buffer);
    half.xb = half.xb_buffer;
  }
#endif
  pool_run_sized(half_part, (size_t)N * K * 2);
  pool_unlock();
}

// w [rows, K] f16 or bf16 -> f32 [rows, K], exactly (both widen without rounding)
void dequantize_rows_half(int type, const uint16_t *w, int rows, int K, float *out) {
  const size_t n = (size_t)rows * K;
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)(w + i));
    _mm512_storeu_ps(out + i, type == F16 ? _mm512_cvtph_ps(h)
                                          : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; i++) {
    if (type == F16) {
      out[i] = _cvtsh_ss(w[i]);
    } else {
      const uint32_t bits = (uint32_t)w[i] << 16;
      memcpy(out + i, &bits, 4);
    }
  }
}
#endif
