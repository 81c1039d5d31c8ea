// matmul and quant_gemm: a prompt's many rows against a weight matrix, with AVX-512 (32-row
// panels, 16 lanes) or, on a CPU without it, AVX2 (16-row panels, 8 lanes): one method.
//
// matmul: out [M, N] (+)= x [M, K] @ w [N, K]^T for many rows (a prompt), all C-contiguous f32.
// Why here and not OpenBLAS: OpenBLAS's threads spin after each call and take the second core
// from this pool's kernels, which run between the matmuls of a prefill; and it reaches ~75% of
// this CPU's FMA peak, which a plain AVX-512 kernel matches.
// Layout: x is first packed into panels of PANEL rows, k-major (panel [K][PANEL]), so one k of a
// panel is two vector registers. A tile is PANEL rows x W_ROWS weight rows: 2 x W_ROWS
// accumulators (AVX-512: 24 of 32 zmm; AVX2: 12 of 16 ymm); per k, two loads of the panel, W_ROWS
// broadcast weights and 2 x W_ROWS FMAs. The weights need no packing: a tile reads W_ROWS rows of
// w sequentially, and tiles of the same weight rows meet every panel in turn while those rows are
// in L1 (the panels, ~1 MB for a 512-token prompt, in L2 or L3; AVX2's 6 rows take k in chunks of
// K_CHUNK, each chunk meeting every panel, so that they fit L1 at any K).
// Work split: packing by panels, then the tiles' weight rows in runs of W_ROWS, taken by the
// threads in guided shares (pool_share).
// Numerics: f32 products, each output one f32 sum in k order (unlike OpenBLAS: a chunk continues
// the previous chunk's sums).
//
// quant_gemm: the same for weights in GGML blocks: each thread dequantizes a run of
// W_ROWS weight rows into its own strip of W_ROWS x K floats (L2-resident) right before the
// tiles of that run read it, so a prompt computes in f32 on exactly the stored weights and no
// f32 copy of a matrix exists beyond one strip per thread.
#include "cpu.h"
#ifdef __AVX512F__
#define PANEL 32
#define W_ROWS 12
#elif defined(PYLLM_AVX2)
#include "avx2_blocks.h"
#define PANEL 16
#define W_ROWS 6
#endif
#if defined(__AVX512F__) || defined(PYLLM_AVX2)

static float *grown(float *buffer, size_t *allocated, size_t floats) {  // scratch kept between calls, grown to fit
  if (floats <= *allocated) return buffer;
  free(buffer);
  buffer = aligned_alloc(64, sizeof(float) * floats);
  if (buffer == NULL) abort();
  *allocated = floats;
  return buffer;
}

static struct {  // the current matmul or quant_gemm call
  const float *x, *w;     // w: f32 rows (matmul), or NULL when blocks holds the weights
  const uint8_t *blocks;  // quant_gemm: rows of GGML blocks of `type`
  int type;
  float *out, *panels;  // panels [ceil(M / PANEL), K, PANEL]; kept between calls: the pages stay mapped
  float *strips;        // quant_gemm: per thread [W_ROWS, K]; kept between calls like the panels
  size_t panel_floats, strip_floats;  // allocated
  int M, K, N, accumulate;
  atomic_int next_run;  // gemm_part's shares: the first run of W_ROWS weight rows none has taken
} gemm;

#ifdef __AVX512F__
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

typedef void (*tile_fn)(int p, int n, const float *w);  // tile with R constant, R = 1 .. W_ROWS
#define TILE_ROWS(R) \
  static void tile_##R(int p, int n, const float *w) { tile(R, p, n, w); }
TILE_ROWS(1) TILE_ROWS(2) TILE_ROWS(3) TILE_ROWS(4) TILE_ROWS(5) TILE_ROWS(6)
TILE_ROWS(7) TILE_ROWS(8) TILE_ROWS(9) TILE_ROWS(10) TILE_ROWS(11) TILE_ROWS(12)
static const tile_fn TILES[W_ROWS + 1] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6,
                                          tile_7, tile_8, tile_9, tile_10, tile_11, tile_12};

static void run_tiles(int n, int R, const float *w) {  // the weight rows n .. n + R - 1 against every panel
  for (int p = 0; p < (gemm.M + PANEL - 1) / PANEL; p++) TILES[R](p, n, w);
}

static void unpack_strip(int n, int R, float *strip) {  // weight rows n .. n + R - 1 -> strip [R, K]
  dequantize_matrix_rows(gemm.type, gemm.blocks, gemm.N, gemm.K, n, R, NULL, strip);
}

#define LANES 16  // floats in a vector register
typedef __m512 lanes_t;
static inline lanes_t first_floats(const float *p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline lanes_t no_floats(void) { return _mm512_setzero_ps(); }
static inline void store_floats(float *p, lanes_t v) { _mm512_storeu_ps(p, v); }
static inline void transpose(const lanes_t rows[LANES], lanes_t columns[LANES]) { transpose16(rows, columns); }
#else  // AVX2: the same in 8 lanes
// rows [8] -> columns [8] (column j: element j of every row): unpacks, shuffles, then 128-bit halves
static inline void transpose8(const __m256 r[8], __m256 c[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; i++) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; i++) {  // u[4i + c]: rows 4i .. 4i + 3 at column c (+ 4 in the upper half)
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; j++) {
    c[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    c[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

// Panel p's rows times the weight rows w [R, K] at k0 .. k1 - 1, adding to the sums so far in
// partial [W_ROWS][PANEL] (k0 > 0); at k1 = K, out rows of panel p, columns n .. n + R - 1.
static inline __attribute__((always_inline)) void tile(const int R, int p, int n, const float *w, int k0, int k1,
                                                      float *partial) {
  const int K = gemm.K;
  const float *panel = gemm.panels + (size_t)p * K * PANEL;
  __m256 lo[W_ROWS], hi[W_ROWS];  // in registers only where every loop over j is unrolled
#pragma GCC unroll 6
  for (int j = 0; j < R; j++) {
    lo[j] = k0 ? _mm256_loadu_ps(partial + j * PANEL) : _mm256_setzero_ps();
    hi[j] = k0 ? _mm256_loadu_ps(partial + j * PANEL + 8) : _mm256_setzero_ps();
  }
  for (int k = k0; k < k1; k++) {
    const __m256 a = _mm256_load_ps(panel + (size_t)k * PANEL), b = _mm256_load_ps(panel + (size_t)k * PANEL + 8);
#pragma GCC unroll 6
    for (int j = 0; j < R; j++) {
      const __m256 weight = _mm256_broadcast_ss(w + (size_t)j * K + k);
      lo[j] = _mm256_fmadd_ps(a, weight, lo[j]);
      hi[j] = _mm256_fmadd_ps(b, weight, hi[j]);
    }
  }
#pragma GCC unroll 6
  for (int j = 0; j < R; j++) _mm256_storeu_ps(partial + j * PANEL, lo[j]), _mm256_storeu_ps(partial + j * PANEL + 8, hi[j]);
  if (k1 < K) return;
  const int rows = gemm.M - p * PANEL < PANEL ? gemm.M - p * PANEL : PANEL;  // partial [j][r]: out column n + j, row r
  for (int r = 0; r < rows; r++) {
    float *out = gemm.out + (size_t)(p * PANEL + r) * gemm.N + n;
    for (int j = 0; j < R; j++) out[j] = gemm.accumulate ? out[j] + partial[j * PANEL + r] : partial[j * PANEL + r];
  }
}

typedef void (*tile_fn)(int p, int n, const float *w, int k0, int k1, float *partial);  // R constant, 1 .. W_ROWS
#define TILE_ROWS(R) \
  static void tile_##R(int p, int n, const float *w, int k0, int k1, float *partial) { tile(R, p, n, w, k0, k1, partial); }
TILE_ROWS(1) TILE_ROWS(2) TILE_ROWS(3) TILE_ROWS(4) TILE_ROWS(5) TILE_ROWS(6)
static const tile_fn TILES[W_ROWS + 1] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6};

// The weight rows n .. n + R - 1 (w [R, K]) against every panel, K_CHUNK k at a time, so that the
// chunk of the rows stays in L1 while it meets the panels in turn (6 rows of K = 1536 fill 36 KB)
#define K_CHUNK 256
static void run_tiles(int n, int R, const float *w) {
  static __thread float *partials;  // this thread's [panels][W_ROWS][PANEL] sums so far
  static __thread size_t allocated;
  const int n_panels = (gemm.M + PANEL - 1) / PANEL;
  partials = grown(partials, &allocated, (size_t)n_panels * W_ROWS * PANEL);
  for (int k0 = 0; k0 < gemm.K; k0 += K_CHUNK) {
    const int k1 = gemm.K - k0 < K_CHUNK ? gemm.K : k0 + K_CHUNK;
    for (int p = 0; p < n_panels; p++) TILES[R](p, n, w, k0, k1, partials + (size_t)p * W_ROWS * PANEL);
  }
}

static void unpack_strip(int n, int R, float *strip) {  // weight rows n .. n + R - 1 -> strip [R, K]
  avx2_dequantize_rows(gemm.type, gemm.blocks, gemm.N, gemm.K, n, R, NULL, strip);
}

#define LANES 8  // floats in a vector register
typedef __m256 lanes_t;
static inline lanes_t first_floats(const float *p, int n) { return _mm256_maskload_ps(p, lanes8(n)); }
static inline lanes_t no_floats(void) { return _mm256_setzero_ps(); }
static inline void store_floats(float *p, lanes_t v) { _mm256_storeu_ps(p, v); }
static inline void transpose(const lanes_t rows[LANES], lanes_t columns[LANES]) { transpose8(rows, columns); }
#endif

// panel p: [K, PANEL] <- x rows PANEL p .. PANEL (p + 1) - 1 (zeros past M), LANES rows x LANES k transposed at a time
static void pack_part(int part) {
  const int n_panels = (gemm.M + PANEL - 1) / PANEL, K = gemm.K;
  for (int p = part; p < n_panels; p += pool_threads)
    for (int half = 0; half < PANEL; half += LANES) {
      const int first_row = p * PANEL + half;
      const int rows = gemm.M - first_row < LANES ? gemm.M - first_row : LANES;  // of x, for these lanes
      float *panel = gemm.panels + (size_t)p * K * PANEL + half;
      for (int k = 0; k < K; k += LANES) {
        const int ks = K - k < LANES ? K - k : LANES;
        lanes_t block[LANES], columns[LANES];
        for (int i = 0; i < LANES; i++)
          block[i] = i < rows ? first_floats(gemm.x + (size_t)(first_row + i) * K + k, ks) : no_floats();
        transpose(block, columns);
        for (int i = 0; i < ks; i++) store_floats(panel + (size_t)(k + i) * PANEL, columns[i]);
      }
    }
}

static void gemm_part(int part) {
  const int runs = (gemm.N + W_ROWS - 1) / W_ROWS, K = gemm.K;
  float *strip = gemm.strips + (size_t)part * W_ROWS * K;
  for (int first, take; (first = pool_share(&gemm.next_run, runs, &take)) < runs;)
    for (int run = first; run < first + take && run < runs; run++) {
      const int n = run * W_ROWS, R = gemm.N - n < W_ROWS ? gemm.N - n : W_ROWS;
      const float *w = gemm.w + (size_t)n * K;
      if (gemm.blocks) {
        unpack_strip(n, R, strip);
        w = strip;
      }
      run_tiles(n, R, w);
    }
}

static void run_gemm(int M, const float *x, int K, int N, float *out, int accumulate) {  // with the pool taken
  gemm.panels = grown(gemm.panels, &gemm.panel_floats, (size_t)((M + PANEL - 1) / PANEL) * K * PANEL);
  gemm.x = x, gemm.out = out;
  gemm.M = M, gemm.K = K, gemm.N = N, gemm.accumulate = accumulate;
  atomic_store(&gemm.next_run, 0);
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
