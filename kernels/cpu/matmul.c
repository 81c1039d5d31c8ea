// Matmuls against a weight matrix w [N, K] (rows of K contiguous floats), all f32.
//
// skinny_matmul: out [M, N] = x [M, K] @ w [N, K]^T.
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
#include "cpu.h"
#ifdef __AVX512F__
#define PREFETCH_FLOATS 4096

static float *grown(float *buffer, size_t *allocated, size_t floats) {  // scratch kept between calls, grown to fit
  if (floats <= *allocated) return buffer;
  free(buffer);
  buffer = aligned_alloc(64, sizeof(float) * floats);
  if (buffer == NULL) abort();
  *allocated = floats;
  return buffer;
}

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

static struct {  // the current skinny_matmul call
  const float *x, *w;
  float *out;
  int M, K, N;
} mm;

static void matmul_part(int part) {
  const int lo = (int)((long long)mm.N * part / pool_threads);
  const int hi = (int)((long long)mm.N * (part + 1) / pool_threads);
  weight_rows(mm.M, mm.x, mm.K, mm.w, lo, hi, mm.out, mm.N);
}

// out [M, N] = x [M, K] @ w [N, K]^T, all arrays C-contiguous f32.
EXPORT void skinny_matmul(int M, const float *x, int K, const float *w, int N, float *out) {
  pool_lock();
  mm.M = M, mm.x = x, mm.K = K, mm.w = w, mm.N = N, mm.out = out;
  pool_run_sized(matmul_part, (size_t)N * K * sizeof(float));
  pool_unlock();
}

// matmul: out [M, N] (+)= x [M, K] @ w [N, K]^T for many rows (a prompt), all C-contiguous f32.
// Why here and not OpenBLAS: OpenBLAS's threads spin after each call and take the second core
// from this pool's kernels, which run between the matmuls of a prefill; and it reaches ~75% of
// this CPU's FMA peak, which a plain AVX-512 kernel matches.
// Layout: x is first packed into panels of 32 rows, k-major (panel [K][32]), so one k of a panel
// is two zmm registers. A tile is 32 rows x W_ROWS weight rows: 2 x W_ROWS accumulators (24 zmm);
// per k, two loads of the panel, W_ROWS broadcast weights and 2 x W_ROWS FMAs. The weights need
// no packing: a tile reads W_ROWS rows of w sequentially, and tiles of the same weight rows meet
// every panel in turn while those rows are in L1 (the panels, ~1 MB for a 512-token prompt, in L2).
// Work split: packing by panels, then the tiles' weight rows, in runs of W_ROWS, among threads.
// Numerics: f32 products, each output one f32 sum in k order (unlike OpenBLAS, no blocking of k).
//
// quant_gemm: the same for weights in GGML blocks (quant.c): each thread dequantizes a run of
// W_ROWS weight rows into its own strip of W_ROWS x K floats (L2-resident) right before the
// tiles of that run read it, so a prompt computes in f32 on exactly the stored weights and no
// f32 copy of a matrix exists beyond one strip per thread.
#define PANEL 32
#define W_ROWS 12

static struct {  // the current matmul or quant_gemm call
  const float *x, *w;     // w: f32 rows (matmul), or NULL when blocks holds the weights
  const uint8_t *blocks;  // quant_gemm: rows of GGML blocks of `type`
  int type;
  float *out, *panels;  // panels [ceil(M / PANEL), K, PANEL]; kept between calls: the pages stay mapped
  float *strips;        // quant_gemm: per thread [W_ROWS, K]; kept between calls like the panels
  size_t panel_floats, strip_floats;  // allocated
  int M, K, N, accumulate;
} gemm;

// rows [16] (row i: 16 floats) -> columns [16] (column j: element j of every row): three rounds of
// in-lane unpacks, then two of 128-bit lane shuffles
static inline void transpose16(const __m512 rows[16], __m512 columns[16]) {
  __m512 a[16], b[16], x[2];
  for (int i = 0; i < 8; i++) {  // a[2i], a[2i+1], lane L: rows 2i, 2i+1 interleaved at columns 4L + 0..1, 4L + 2..3
    a[2 * i] = _mm512_unpacklo_ps(rows[2 * i], rows[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++)  // b[4i + c], lane L: rows 4i .. 4i + 3 at column 4L + c
    for (int c = 0; c < 2; c++) {
      const __m512d lo = _mm512_castps_pd(a[4 * i + c]), hi = _mm512_castps_pd(a[4 * i + 2 + c]);
      b[4 * i + 2 * c] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
      b[4 * i + 2 * c + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
    }
  for (int c = 0; c < 4; c++) {  // column 4L + c gathers lane L of b[c], b[4 + c], b[8 + c], b[12 + c]
    x[0] = _mm512_shuffle_f32x4(b[c], b[4 + c], 0x88);  // lanes 0, 2
    x[1] = _mm512_shuffle_f32x4(b[c], b[4 + c], 0xDD);  // lanes 1, 3
    const __m512 y0 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0x88), y1 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0xDD);
    columns[c] = _mm512_shuffle_f32x4(x[0], y0, 0x88);
    columns[8 + c] = _mm512_shuffle_f32x4(x[0], y0, 0xDD);
    columns[4 + c] = _mm512_shuffle_f32x4(x[1], y1, 0x88);
    columns[12 + c] = _mm512_shuffle_f32x4(x[1], y1, 0xDD);
  }
}

static void pack_part(int part) {  // panel p: [K, PANEL] <- x rows 32p .. 32p + 31 (zeros past M)
  const int n_panels = (gemm.M + PANEL - 1) / PANEL, K = gemm.K;
  for (int p = part; p < n_panels; p += pool_threads)
    for (int half = 0; half < PANEL; half += 16) {
      const int first_row = p * PANEL + half;
      const int rows = gemm.M - first_row < 16 ? gemm.M - first_row : 16;  // of x, for these 16 lanes
      float *panel = gemm.panels + (size_t)p * K * PANEL + half;
      for (int k = 0; k < K; k += 16) {
        const int ks = K - k < 16 ? K - k : 16;
        __m512 block[16], columns[16];
        for (int i = 0; i < 16; i++)
          block[i] = i < rows ? _mm512_maskz_loadu_ps((__mmask16)((1u << ks) - 1), gemm.x + (size_t)(first_row + i) * K + k)
                              : _mm512_setzero_ps();
        transpose16(block, columns);
        for (int i = 0; i < ks; i++) _mm512_storeu_ps(panel + (size_t)(k + i) * PANEL, columns[i]);
      }
    }
}

// out rows of panel `p`, columns n .. n + R - 1, from the weight rows w [R, K]
static inline __attribute__((always_inline)) void tile(const int R, int p, int n, const float *w) {
  const int K = gemm.K;
  const float *panel = gemm.panels + (size_t)p * K * PANEL;
  __m512 lo[W_ROWS], hi[W_ROWS];
  for (int j = 0; j < R; j++) lo[j] = hi[j] = _mm512_setzero_ps();
  for (int k = 0; k < K; k++) {
    _mm_prefetch((const char *)(panel + (size_t)(k + 16) * PANEL), _MM_HINT_T0);
    _mm_prefetch((const char *)(panel + (size_t)(k + 16) * PANEL + 16), _MM_HINT_T0);
    const __m512 a = _mm512_loadu_ps(panel + (size_t)k * PANEL), b = _mm512_loadu_ps(panel + (size_t)k * PANEL + 16);
    for (int j = 0; j < R; j++) {
      const __m512 weight = _mm512_set1_ps(w[(size_t)j * K + k]);
      lo[j] = _mm512_fmadd_ps(a, weight, lo[j]);
      hi[j] = _mm512_fmadd_ps(b, weight, hi[j]);
    }
  }
  // lo[j], hi[j] hold output column n + j of the panel's rows: transposed, each row's R outputs are
  // one masked store
  const int rows = gemm.M - p * PANEL < PANEL ? gemm.M - p * PANEL : PANEL;
  const __mmask16 columns = (__mmask16)((1u << R) - 1);
  for (int half = 0; half < 2 && half * 16 < rows; half++) {
    __m512 by_column[16], by_row[16];
    for (int j = 0; j < 16; j++) by_column[j] = j < R ? (half ? hi[j] : lo[j]) : _mm512_setzero_ps();
    transpose16(by_column, by_row);
    for (int r = 0; r < 16 && half * 16 + r < rows; r++) {
      float *out = gemm.out + (size_t)(p * PANEL + half * 16 + r) * gemm.N + n;
      const __m512 sum = gemm.accumulate ? _mm512_add_ps(by_row[r], _mm512_maskz_loadu_ps(columns, out)) : by_row[r];
      _mm512_mask_storeu_ps(out, columns, sum);
    }
  }
}
typedef void (*tile_fn)(int p, int n, const float *w);
#define TILE(R) \
  static void tile_##R(int p, int n, const float *w) { tile(R, p, n, w); }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)
static const tile_fn TILES[W_ROWS + 1] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6,
                                          tile_7, tile_8, tile_9, tile_10, tile_11, tile_12};

static void gemm_part(int part) {
  const int n_panels = (gemm.M + PANEL - 1) / PANEL, runs = (gemm.N + W_ROWS - 1) / W_ROWS, K = gemm.K;
  float *strip = gemm.strips + (size_t)part * W_ROWS * K;
  for (int run = (int)((long long)runs * part / pool_threads); run < (long long)runs * (part + 1) / pool_threads; run++) {
    const int n = run * W_ROWS, R = gemm.N - n < W_ROWS ? gemm.N - n : W_ROWS;
    const float *w = gemm.w + (size_t)n * K;
    if (gemm.blocks) {
      dequantize_matrix_rows(gemm.type, gemm.blocks, gemm.N, K, n, R, NULL, strip);
      w = strip;
    }
    for (int p = 0; p < n_panels; p++) TILES[R](p, n, w);
  }
}

static void run_gemm(int M, const float *x, int K, int N, float *out, int accumulate) {  // with the pool taken
  gemm.panels = grown(gemm.panels, &gemm.panel_floats, (size_t)((M + PANEL - 1) / PANEL) * K * PANEL);
  gemm.x = x, gemm.out = out;
  gemm.M = M, gemm.K = K, gemm.N = N, gemm.accumulate = accumulate;
  pool_run(pack_part);
  pool_run(gemm_part);
}

// out [M, N] (+)= x [M, K] @ w [N, K]^T, all C-contiguous f32
EXPORT void matmul(int M, const float *x, int K, const float *w, int N, float *out, int accumulate) {
  pool_lock();
  gemm.w = w, gemm.blocks = NULL;
  run_gemm(M, x, K, N, out, accumulate);
  pool_unlock();
}

// out [M, N] (+)= x [M, K] @ dequantize(w)^T, w: N rows of GGML blocks of `type` (quant.c)
EXPORT void quant_gemm(int type, int M, const float *x, int K, const uint8_t *w, int N, float *out, int accumulate) {
  pool_lock();
  gemm.strips = grown(gemm.strips, &gemm.strip_floats, (size_t)pool_threads * W_ROWS * K);
  gemm.w = NULL, gemm.blocks = w, gemm.type = type;
  run_gemm(M, x, K, N, out, accumulate);
  pool_unlock();
}
#endif
