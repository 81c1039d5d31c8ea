// skinny_matmul (matmul.c's contract, cpu.h) for CPUs with AVX2 but without AVX-512: out [M, N] =
// x [M, K] @ w [N, K]^T for a decode step's M <= 16 rows, all f32.
// Work split: each thread its own range of weight rows, walked one row at a time (one sequential
// stream per thread); a row meets the activation rows 4 at a time while it is in L1: per 16 k,
// two loads of the weight row, two of each activation row and two FMAs into that row's two
// accumulators (two chains: an FMA's latency is covered at 4 rows by the other rows' chains, at 1
// row by the pair). No software prefetch: the hardware's follows each thread's one stream, and
// prefetching ahead of it measured slower (benchmarks/results/avx2/kernels.md).
// Numerics: f32 products and sums; each output is 16 partial sums (8 lanes x 2 chains) added at the
// end, plus the K % 16 tail, the same for any M: a row's result does not depend on its batch.
#include "cpu.h"
#if defined(PYLLM_AVX2) && !defined(__AVX512F__)

// out[m * ldo] = x[m] . w for M <= 4 activation rows x [M, K] and one weight row w [K]
static inline __attribute__((always_inline)) void one_row(const int M, const float *x, int K, const float *w,
                                                          float *out, int ldo) {
  __m256 a[4], b[4];
  for (int m = 0; m < M; m++) a[m] = b[m] = _mm256_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 u = _mm256_loadu_ps(w + k), v = _mm256_loadu_ps(w + k + 8);
    for (int m = 0; m < M; m++) {
      a[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (size_t)m * K + k), u, a[m]);
      b[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (size_t)m * K + k + 8), v, b[m]);
    }
  }
  for (int m = 0; m < M; m++) {
    float sum = sum8(_mm256_add_ps(a[m], b[m]));
    for (int j = k; j < K; j++) sum += x[(size_t)m * K + j] * w[j];
    out[(size_t)m * ldo] = sum;
  }
}

static struct {  // the current skinny_matmul call
  const float *x, *w;
  float *out;
  int M, K, N;
} mm;

static void matmul_part(int part) {
  const int lo = (int)((long long)mm.N * part / pool_threads), hi = (int)((long long)mm.N * (part + 1) / pool_threads);
  for (int n = lo; n < hi; n++)
    for (int m = 0; m < mm.M; m += 4) {
      const float *x = mm.x + (size_t)m * mm.K, *w = mm.w + (size_t)n * mm.K;
      float *out = mm.out + (size_t)m * mm.N + n;
      switch (mm.M - m < 4 ? mm.M - m : 4) {  // M constant in each copy of one_row
        case 1: one_row(1, x, mm.K, w, out, mm.N); break;
        case 2: one_row(2, x, mm.K, w, out, mm.N); break;
        case 3: one_row(3, x, mm.K, w, out, mm.N); break;
        default: one_row(4, x, mm.K, w, out, mm.N);
      }
    }
}

EXPORT void skinny_matmul(int M, const float *x, int K, const float *w, int N, float *out) {
  pool_lock();
  mm.M = M, mm.x = x, mm.K = K, mm.w = w, mm.N = N, mm.out = out;
  pool_run_sized(matmul_part, (size_t)N * K * sizeof(float));
  pool_unlock();
}
#endif
