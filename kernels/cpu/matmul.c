// skinny_matmul: out [M, N] = x [M, K] @ w [N, K]^T for a decode step's few rows (M <= 16), all
// f32, w [N, K] rows of K contiguous floats (gemm.c: a prompt's many rows).
// Why: every decode step streams all the weights once, so at a few rows the matmul should run at
// memory speed, but OpenBLAS computes an 8-row product at about half of its GEMV bandwidth (and
// its GEMV, threads and all, at ~85% of this kernel's one-row speed).
// Here each weight row is read once and used for all M activation rows while it is in registers.
//
// Work split: skinny_matmul() hands each thread (the caller and the workers of start_threads)
// its own range of weight rows, which it walks one row at a time: a thread reads one sequential
// stream (on some CPUs two rows read side by side, two streams, read at half the rate of one),
// and meets the activation rows 8 at a time while the row is in L1: per 32 k, two loads of the
// weight row, two of each activation row and two FMAs into that row's two accumulators (two
// chains, so one activation row keeps two FMAs in flight; 16 of the 32 zmm registers at 8 rows).
// Software prefetch runs PREFETCH_FLOATS ahead, which the hardware prefetcher alone does not reach
// at this compute density on some CPUs (a 2-core Xeon), into L2 (_MM_HINT_T1: L2 tracks more
// misses at once than L1 does, so the prefetches are not dropped while L1 waits on its own).
// Numerics: f32 products and sums; each output is 32 partial sums (16 lanes x 2 chains) added at
// the end, plus the K % 32 tail, the same for any M: a row's result does not depend on its batch.
//
// AVX2 alone (no AVX-512): the same in 8 lanes, the activation rows 4 at a time: per 16 k, two
// loads of the weight row, two of each activation row and two FMAs into its two accumulators (at
// 1 row the pair covers an FMA's latency, at 4 the other rows' chains). No software prefetch
// there: the hardware's follows each thread's one stream, and prefetching ahead of it measured
// slower (benchmarks/results/avx2/kernels.md). Each output is 16 partial sums, plus the K % 16 tail.
#include "cpu.h"
#ifdef __AVX512F__
#define PREFETCH_FLOATS 4096

// out[m * ldo] = x[m] . w for M <= 8 activation rows x [M, K] and one weight row w [K]
static inline void one_row(const int M, const float *x, int K, const float *w, float *out, int ldo) {
  __m512 a[8], b[8];
  for (int m = 0; m < M; m++) a[m] = b[m] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 32 <= K; k += 32) {
    _mm_prefetch((const char *)(w + k + PREFETCH_FLOATS), _MM_HINT_T1);
    _mm_prefetch((const char *)(w + k + 16 + PREFETCH_FLOATS), _MM_HINT_T1);
    const __m512 u = _mm512_loadu_ps(w + k), v = _mm512_loadu_ps(w + k + 16);
    for (int m = 0; m < M; m++) {
      a[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (size_t)m * K + k), u, a[m]);
      b[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (size_t)m * K + k + 16), v, b[m]);
    }
  }
  for (; k + 16 <= K; k += 16)
    for (int m = 0; m < M; m++) a[m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (size_t)m * K + k), _mm512_loadu_ps(w + k), a[m]);
  for (int m = 0; m < M; m++) {
    float sum = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m]));
    for (int j = k; j < K; j++) sum += x[(size_t)m * K + j] * w[j];
    out[(size_t)m * ldo] = sum;
  }
}

// Each weight row meets the activation rows in chunks of at most 8 (the registers hold 2 x 8
// accumulators) while it is still in L1, so the weights are streamed once for any M.
typedef void (*row_fn)(const float *x, int K, const float *w, float *out, int ldo);
#define ROW(M) \
  static void row_##M(const float *x, int K, const float *w, float *out, int ldo) { one_row(M, x, K, w, out, ldo); }
ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8)
static const row_fn ROWS[9] = {0, row_1, row_2, row_3, row_4, row_5, row_6, row_7, row_8};

static void weight_rows(int M, const float *x, int K, const float *w, int lo, int hi, float *out, int ldo) {
  for (int n = lo; n < hi; n++)
    for (int m = 0; m < M; m += 8)
      ROWS[M - m < 8 ? M - m : 8](x + (size_t)m * K, K, w + (size_t)n * K, out + (size_t)m * ldo + n, ldo);
}
#elif defined(PYLLM_AVX2)

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

static void weight_rows(int M, const float *x, int K, const float *w, int lo, int hi, float *out, int ldo) {
  for (int n = lo; n < hi; n++)
    for (int m = 0; m < M; m += 4) {
      const float *xm = x + (size_t)m * K, *row = w + (size_t)n * K;
      float *o = out + (size_t)m * ldo + n;
      switch (M - m < 4 ? M - m : 4) {  // M constant in each copy of one_row
        case 1: one_row(1, xm, K, row, o, ldo); break;
        case 2: one_row(2, xm, K, row, o, ldo); break;
        case 3: one_row(3, xm, K, row, o, ldo); break;
        default: one_row(4, xm, K, row, o, ldo);
      }
    }
}
#endif
#if defined(__AVX512F__) || defined(PYLLM_AVX2)

static struct {  // the current skinny_matmul call
  const float *x, *w;
  float *out;
  int M, K, N;
  atomic_int next_unit;  // matmul_part's shares: the first SHARE_ROWS weight rows none has taken
} mm;

#define SHARE_ROWS 16
static void matmul_part(int part) {
  (void)part;
  const int units = (mm.N + SHARE_ROWS - 1) / SHARE_ROWS;
  for (int first, take; (first = pool_share(&mm.next_unit, units, &take)) < units;) {
    const int hi = (first + take) * SHARE_ROWS;
    weight_rows(mm.M, mm.x, mm.K, mm.w, first * SHARE_ROWS, hi < mm.N ? hi : mm.N, mm.out, mm.N);
  }
}

// out [M, N] = x [M, K] @ w [N, K]^T, all arrays C-contiguous f32.
EXPORT void skinny_matmul(int M, const float *x, int K, const float *w, int N, float *out) {
  pool_lock();
  mm.M = M, mm.x = x, mm.K = K, mm.w = w, mm.N = N, mm.out = out;
  atomic_store(&mm.next_unit, 0);
  pool_run_sized(matmul_part, (size_t)N * K * sizeof(float));
  pool_unlock();
}
#endif
