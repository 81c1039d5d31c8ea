// The CPU backend's matmul for batched decode: out [M, N] = x [M, K] @ w [N, K]^T for 2 <= M <= 8.
// Compiled at run time by the host C compiler (-O3 -march=native, pyllm/backends/cpu_kernels.py);
// without AVX-512 it builds nothing and the NumPy path serves.
//
// Why: every decode step streams all the weights once, so at a few rows the matmul should run at
// memory speed, but OpenBLAS computes an 8-row product at about half of its GEMV bandwidth.
// Here each weight row is read once and used for all M activation rows while it is in registers.
//
// Work split: the caller's threads each take a range of weight rows [lo, hi). One call walks its
// range two weight rows at a time: 2 x M accumulators of 16 lanes (at most 16 of the 32 zmm
// registers), per 16 k one load of each weight row, one load of each activation row and 2 x M
// FMAs. Software prefetch runs PREFETCH_FLOATS ahead, which the hardware prefetcher alone does not
// reach at this compute density (measured: 16 GB/s with it, 10 without, on a 2-core Xeon).
// Numerics: f32 products and sums; each output is 16 partial sums added at the end, plus the
// K % 16 tail, so results differ from a sequential dot product by rounding only.
#ifdef __AVX512F__
#include <immintrin.h>
#include <stddef.h>

#define PREFETCH_FLOATS 2048

static inline float dot_tail(const float *x, const float *w, int k, int K, float sum) {
  for (; k < K; k++) sum += x[k] * w[k];
  return sum;
}

static inline void two_rows(const int M, const float *x, int K, const float *w0, float *out, int ldo) {
  const float *w1 = w0 + K;
  __m512 a[8], b[8];
  for (int m = 0; m < M; m++) a[m] = b[m] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    _mm_prefetch((const char *)(w0 + k + PREFETCH_FLOATS), _MM_HINT_T0);
    _mm_prefetch((const char *)(w1 + k + PREFETCH_FLOATS), _MM_HINT_T0);
    const __m512 u = _mm512_loadu_ps(w0 + k), v = _mm512_loadu_ps(w1 + k);
    for (int m = 0; m < M; m++) {
      const __m512 xm = _mm512_loadu_ps(x + (size_t)m * K + k);
      a[m] = _mm512_fmadd_ps(xm, u, a[m]);
      b[m] = _mm512_fmadd_ps(xm, v, b[m]);
    }
  }
  for (int m = 0; m < M; m++) {
    const float *xm = x + (size_t)m * K;
    out[(size_t)m * ldo] = dot_tail(xm, w0, k, K, _mm512_reduce_add_ps(a[m]));
    out[(size_t)m * ldo + 1] = dot_tail(xm, w1, k, K, _mm512_reduce_add_ps(b[m]));
  }
}

// M is a compile-time constant in each entry point, so the loops over m unroll into registers
static inline void skinny(const int M, const float *x, int K, const float *w, int lo, int hi, float *out,
                          int ldo) {
  int n = lo;
  for (; n + 1 < hi; n += 2) two_rows(M, x, K, w + (size_t)n * K, out + n, ldo);
  for (; n < hi; n++)
    for (int m = 0; m < M; m++) out[(size_t)m * ldo + n] = dot_tail(x + (size_t)m * K, w + (size_t)n * K, 0, K, 0.0f);
}

#define ENTRY(M)                                                                                     \
  void skinny_matmul_##M(const float *x, int K, const float *w, int lo, int hi, float *out, int ldo) { \
    skinny(M, x, K, w, lo, hi, out, ldo);                                                            \
  }
ENTRY(2) ENTRY(3) ENTRY(4) ENTRY(5) ENTRY(6) ENTRY(7) ENTRY(8)
#endif
