// The CPU backend's kernels, sharing one thread pool: skinny_matmul (a decode step's few rows
// times a weight matrix), matmul (a prompt's many rows), rms_norm, swiglu, qkv_rope (bias, rope
// and the KV-cache writes) and attention (every sequence of a step over its KV cache).
// Compiled at run time by the host C compiler (-O3 -march=native, pyllm/backends/cpu_kernels.py);
// without AVX-512 it builds nothing and the NumPy path serves.
//
// skinny_matmul: out [M, N] = x [M, K] @ w [N, K]^T.
// Why: every decode step streams all the weights once, so at a few rows the matmul should run at
// memory speed, but OpenBLAS computes an 8-row product at about half of its GEMV bandwidth (and
// its GEMV, threads and all, at ~85% of this kernel's one-row speed).
// Here each weight row is read once and used for all M activation rows while it is in registers.
//
// Work split: skinny_matmul() hands each thread (the caller and the workers of start_threads)
// its own range of weight rows. A thread walks its range two weight rows at a time, and meets the
// activation rows 8 at a time: 2 x 8 accumulators of 16 lanes (16 of the 32 zmm registers), per
// 16 k one load of each weight row, one of each activation row and 16 FMAs.
// Software prefetch runs PREFETCH_FLOATS ahead, which the hardware prefetcher alone does not reach
// at this compute density (measured: 16 GB/s with it, 10 without, on a 2-core Xeon).
// Numerics: f32 products and sums; each output is 16 partial sums added at the end, plus the
// K % 16 tail, so results differ from a sequential dot product by rounding only.
#ifdef __AVX512F__
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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
      __m512 xm = _mm512_loadu_ps(x + (size_t)m * K + k);
      __asm__("" : "+v"(xm));  // one load for both FMAs, not one folded into each
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

// Each pair of weight rows meets the activation rows in chunks of at most 8 (the registers hold
// 2 x 8 accumulators) while the pair is still in L1, so the weights are streamed once for any M.
typedef void (*pair_fn)(const float *x, int K, const float *w0, float *out, int ldo);
#define PAIR(M) \
  static void pair_##M(const float *x, int K, const float *w0, float *out, int ldo) { two_rows(M, x, K, w0, out, ldo); }
PAIR(1) PAIR(2) PAIR(3) PAIR(4) PAIR(5) PAIR(6) PAIR(7) PAIR(8)
static const pair_fn PAIRS[9] = {0, pair_1, pair_2, pair_3, pair_4, pair_5, pair_6, pair_7, pair_8};

static void weight_rows(int M, const float *x, int K, const float *w, int lo, int hi, float *out, int ldo) {
  int n = lo;
  for (; n + 1 < hi; n += 2)
    for (int m = 0; m < M; m += 8)
      PAIRS[M - m < 8 ? M - m : 8](x + (size_t)m * K, K, w + (size_t)n * K, out + (size_t)m * ldo + n, ldo);
  for (; n < hi; n++)
    for (int m = 0; m < M; m++) out[(size_t)m * ldo + n] = dot_tail(x + (size_t)m * K, w + (size_t)n * K, 0, K, 0.0f);
}

// The thread pool both kernels run on. A decode step makes ~150 calls a few hundred microseconds
// apart, so waking a sleeping thread each time (tens of microseconds in a VM) would cost more than
// the split gains: workers spin for SPIN_NS after a call before they sleep on the condition variable.
#define MAX_THREADS 64
#define SPIN_NS 500000L

static struct {
  pthread_mutex_t call_lock;  // one call at a time, whichever thread makes it
  pthread_mutex_t lock;       // with wake: how idle workers sleep
  pthread_cond_t wake;
  int threads;                // the caller and its running workers
  int wanted;                 // threads asked for by start_threads
  pid_t owner;                // the process whose workers run (a forked child has none of them)
  atomic_ulong generation;    // bumped once per call
  atomic_int pending;         // workers not yet done with the current call
  unsigned long first_seen;   // the generation when the workers started: each runs every later one
  void (*task)(int part);     // the current call: each thread runs its part
} pool = {.call_lock = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER, .threads = 1, .wanted = 1};

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

static struct {  // the current skinny_matmul call
  const float *x, *w;
  float *out;
  int M, K, N;
} mm;

static void matmul_part(int part) {  // even bounds: the kernel takes weight rows two at a time
  const int lo = (int)((long long)mm.N * part / pool.threads) / 2 * 2;
  const int hi = part + 1 == pool.threads ? mm.N : (int)((long long)mm.N * (part + 1) / pool.threads) / 2 * 2;
  weight_rows(mm.M, mm.x, mm.K, mm.w, lo, hi, mm.out, mm.N);
}

static void *worker(void *arg) {
  const int part = (int)(intptr_t)arg;
  unsigned long seen = pool.first_seen;  // not the generation now: a call may have come before this thread ran
  for (;;) {
    const long give_up = now_ns() + SPIN_NS;
    for (int spins = 0; atomic_load_explicit(&pool.generation, memory_order_acquire) == seen; spins++) {
      _mm_pause();
      if ((spins & 255) == 255 && now_ns() > give_up) {
        pthread_mutex_lock(&pool.lock);
        while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
      }
    }
    seen = atomic_load(&pool.generation);
    pool.task(part);
    atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
  }
  return NULL;
}

// fork(): the child has none of the workers, and may inherit the locks held and the condition
// variable counting the parent's sleepers as its waiters. Hold both locks across the fork; the
// child makes fresh ones and starts its own workers at its first call (owner is not its pid).
static void before_fork(void) {
  pthread_mutex_lock(&pool.call_lock);
  pthread_mutex_lock(&pool.lock);
}
static void after_fork_in_parent(void) {
  pthread_mutex_unlock(&pool.lock);
  pthread_mutex_unlock(&pool.call_lock);
}
static void after_fork_in_child(void) {
  pthread_mutex_init(&pool.call_lock, NULL);
  pthread_mutex_init(&pool.lock, NULL);
  pthread_cond_init(&pool.wake, NULL);
  pool.owner = 0;
}
static void register_fork_handlers(void) { pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child); }

static void start_workers(void) {  // with call_lock held
  static pthread_once_t fork_handlers = PTHREAD_ONCE_INIT;
  pthread_once(&fork_handlers, register_fork_handlers);
  pool.owner = getpid();
  pool.threads = 1;
  pool.first_seen = atomic_load(&pool.generation);
  for (int part = 1; part < pool.wanted; part++) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, worker, (void *)(intptr_t)part) != 0) break;
    pthread_detach(thread);
    pool.threads++;
  }
}

// Asks for `threads` threads per call (the caller and threads - 1 workers, started once per
// process) -> how many run.
int start_threads(int threads) {
  pthread_mutex_lock(&pool.call_lock);
  if (pool.owner != getpid()) {
    pool.wanted = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    start_workers();
  }
  pthread_mutex_unlock(&pool.call_lock);
  return pool.threads;
}

// Runs task(part) for part 0 .. threads - 1, part 0 on the calling thread.
static void run(void (*task)(int part)) {
  pool.task = task;
  atomic_store(&pool.pending, pool.threads - 1);
  pthread_mutex_lock(&pool.lock);
  atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
  pthread_cond_broadcast(&pool.wake);
  pthread_mutex_unlock(&pool.lock);
  task(0);
  // a worker normally finishes within microseconds; one that was descheduled gets the core back
  for (int spins = 0; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0; spins++)
    if (spins < 100000) _mm_pause(); else sched_yield();
}

static void lock_pool(void) {
  pthread_mutex_lock(&pool.call_lock);
  if (pool.owner != getpid()) start_workers();  // a forked child: its parent's workers are not here
}

// out [M, N] = x [M, K] @ w [N, K]^T, all arrays C-contiguous f32.
void skinny_matmul(int M, const float *x, int K, const float *w, int N, float *out) {
  lock_pool();
  mm.M = M, mm.x = x, mm.K = K, mm.w = w, mm.N = N, mm.out = out;
  run(matmul_part);
  pthread_mutex_unlock(&pool.call_lock);
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
#define PANEL 32
#define W_ROWS 12

static struct {  // the current matmul call
  const float *x, *w;
  float *out, *panels;  // panels [ceil(M / PANEL), K, PANEL]; kept between calls: the pages stay mapped
  size_t panel_floats;  // allocated
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
  for (int p = part; p < n_panels; p += pool.threads)
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

// out rows of panel `p`, columns n .. n + R - 1
static inline __attribute__((always_inline)) void tile(const int R, int p, int n) {
  const int K = gemm.K;
  const float *panel = gemm.panels + (size_t)p * K * PANEL, *w = gemm.w + (size_t)n * K;
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
typedef void (*tile_fn)(int p, int n);
#define TILE(R) \
  static void tile_##R(int p, int n) { tile(R, p, n); }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6) TILE(7) TILE(8) TILE(9) TILE(10) TILE(11) TILE(12)
static const tile_fn TILES[W_ROWS + 1] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6,
                                          tile_7, tile_8, tile_9, tile_10, tile_11, tile_12};

static void gemm_part(int part) {
  const int n_panels = (gemm.M + PANEL - 1) / PANEL, runs = (gemm.N + W_ROWS - 1) / W_ROWS;
  for (int run = (int)((long long)runs * part / pool.threads); run < (long long)runs * (part + 1) / pool.threads; run++) {
    const int n = run * W_ROWS, R = gemm.N - n < W_ROWS ? gemm.N - n : W_ROWS;
    for (int p = 0; p < n_panels; p++) TILES[R](p, n);
  }
}

void matmul(int M, const float *x, int K, const float *w, int N, float *out, int accumulate) {
  const size_t panel_floats = (size_t)((M + PANEL - 1) / PANEL) * K * PANEL;
  lock_pool();
  if (panel_floats > gemm.panel_floats) {
    free(gemm.panels);
    gemm.panels = aligned_alloc(64, sizeof(float) * panel_floats);
    if (gemm.panels == NULL) abort();
    gemm.panel_floats = panel_floats;
  }
  gemm.x = x, gemm.w = w, gemm.out = out;
  gemm.M = M, gemm.K = K, gemm.N = N, gemm.accumulate = accumulate;
  run(pack_part);
  run(gemm_part);
  pthread_mutex_unlock(&pool.call_lock);
}

static inline __m512 exp512(__m512 x) {
  // exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two steps (Cody-Waite), and
  // exp(r) = 1 + r + r^2 P(r) on |r| <= ln 2 / 2 (Cephes' expf coefficients); within 2 ulp of expf
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));  // 0 .. FLT_MAX
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Row kernels, rms_norm and swiglu: a row is 16 lanes at a time with a masked tail. Rows are split
// evenly among the threads, or all run on the caller when the call is too small to pay for the
// handoff (a decode step's few rows).
#define SERIAL_FLOATS 32768

static struct {  // the current row kernel call
  void (*row)(int r);
  int rows;
} each_row;

static void rows_part(int part) {
  const int lo = (int)((long long)each_row.rows * part / pool.threads);
  const int hi = (int)((long long)each_row.rows * (part + 1) / pool.threads);
  for (int r = lo; r < hi; r++) each_row.row(r);
}

static void for_each_row(void (*row)(int r), int rows, long floats) {  // with call_lock held
  each_row.row = row, each_row.rows = rows;
  if (floats < SERIAL_FLOATS)
    for (int r = 0; r < rows; r++) row(r);
  else
    run(rows_part);
}

static inline __mmask16 lanes(int left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

static struct {  // the current rms_norm call
  const float *x, *weight;
  float *out;
  int width;
  float eps;
} norm;

// rms_norm: out [T, width] = x / sqrt(mean(x^2) + eps) * weight, as HF's LlamaRMSNorm (f32 statistics:
// 16 partial sums of squares, added at the end)
static void norm_row(int r) {
  const float *x = norm.x + (size_t)r * norm.width;
  float *out = norm.out + (size_t)r * norm.width;
  __m512 squares = _mm512_setzero_ps();
  for (int i = 0; i < norm.width; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(lanes(norm.width - i), x + i);
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / norm.width + norm.eps));
  for (int i = 0; i < norm.width; i += 16) {
    const __mmask16 m = lanes(norm.width - i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), scale),
                                                    _mm512_maskz_loadu_ps(m, norm.weight + i)));
  }
}

void rms_norm(int T, int width, const float *x, const float *weight, float eps, float *out) {
  lock_pool();
  norm.x = x, norm.weight = weight, norm.out = out, norm.width = width, norm.eps = eps;
  for_each_row(norm_row, T, (long)T * width);
  pthread_mutex_unlock(&pool.call_lock);
}

static struct {  // the current swiglu call
  const float *gate_up;
  float *out;
  int width;
} glu;

// swiglu: out [T, width] = silu(gate) * up = gate / (1 + exp(-gate)) * up, gate_up [T, 2 width] (gate | up)
static void glu_row(int r) {
  const float *gate = glu.gate_up + (size_t)r * 2 * glu.width, *up = gate + glu.width;
  float *out = glu.out + (size_t)r * glu.width;
  for (int i = 0; i < glu.width; i += 16) {
    const __mmask16 m = lanes(glu.width - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + i)));
  }
}

void swiglu(int T, int width, const float *gate_up, float *out) {
  lock_pool();
  glu.gate_up = gate_up, glu.out = out, glu.width = width;
  for_each_row(glu_row, T, (long)T * width);
  pthread_mutex_unlock(&pool.call_lock);
}

static struct {  // the current qkv_rope call
  const float *qkv, *bias, *cos, *sin;
  float *const *k, *const *v, *q;
  const int *capacity, *sequence, *position;  // per row: its sequence, and its position = its cache row
  int H, KV, D;
} qkv;

// qkv_rope: one token's fused projections qkv [(H + 2 KV) * D] (+ bias): rope (HF's rotate_half
// layout: the first and second halves of a head are the pairs) on its H query heads -> q [H, D],
// and on its KV key heads -> row cache_row of k [KV, capacity, D]; its value heads -> the same row
// of v. Its position picks the row of the cos, sin tables [positions, D / 2].
static void qkv_row(int t) {
  const int D = qkv.D, half = D / 2, s = qkv.sequence[t];
  const float *c = qkv.cos + (size_t)qkv.position[t] * half, *sn = qkv.sin + (size_t)qkv.position[t] * half;
  const float *row = qkv.qkv + (size_t)t * (qkv.H + 2 * qkv.KV) * D;
  for (int h = 0; h < qkv.H + 2 * qkv.KV; h++) {
    const float *x = row + (size_t)h * D, *b = qkv.bias ? qkv.bias + (size_t)h * D : NULL;
    const int g = h - qkv.H;  // past the query heads: key head g, then value head g - KV
    float *out = g < 0 ? qkv.q + ((size_t)t * qkv.H + h) * D
                       : (g < qkv.KV ? qkv.k[s] : qkv.v[s]) + ((size_t)(g % qkv.KV) * qkv.capacity[s] + qkv.position[t]) * D;
    for (int i = 0; i < half; i += 16) {
      const __mmask16 m = lanes(half - i);
      __m512 x1 = _mm512_maskz_loadu_ps(m, x + i), x2 = _mm512_maskz_loadu_ps(m, x + half + i);
      if (b) x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(m, b + i)), x2 = _mm512_add_ps(x2, _mm512_maskz_loadu_ps(m, b + half + i));
      if (g < qkv.KV) {  // query or key: rotate
        const __m512 cs = _mm512_maskz_loadu_ps(m, c + i), sn_i = _mm512_maskz_loadu_ps(m, sn + i);
        const __m512 r1 = _mm512_sub_ps(_mm512_mul_ps(x1, cs), _mm512_mul_ps(x2, sn_i));
        x2 = _mm512_add_ps(_mm512_mul_ps(x2, cs), _mm512_mul_ps(x1, sn_i));
        x1 = r1;
      }
      _mm512_mask_storeu_ps(out + i, m, x1);
      _mm512_mask_storeu_ps(out + half + i, m, x2);
    }
  }
}

// A step's rows: sequence s owns count[s] consecutive rows, its first at cache row start[s];
// k[s], v[s] are that sequence's caches of this layer [KV, capacity[s], D]. D % 2 == 0.
void qkv_rope(int S, int H, int KV, int D, const float *qkv_in, const float *bias, const float *cos,
              const float *sin, float *const *k, float *const *v, const int *capacity, const int *start,
              const int *count, float *q) {
  int T = 0;
  for (int s = 0; s < S; s++) T += count[s];
  int *per_row = malloc(sizeof(int) * 2 * (size_t)(T > 0 ? T : 1));  // sequences, then positions
  if (per_row == NULL) abort();
  for (int s = 0, t = 0; s < S; s++)
    for (int i = 0; i < count[s]; i++, t++) per_row[t] = s, per_row[T + t] = start[s] + i;
  lock_pool();
  qkv.qkv = qkv_in, qkv.bias = bias, qkv.cos = cos, qkv.sin = sin, qkv.k = k, qkv.v = v, qkv.q = q;
  qkv.capacity = capacity, qkv.sequence = per_row, qkv.position = per_row + T;
  qkv.H = H, qkv.KV = KV, qkv.D = D;
  for_each_row(qkv_row, T, (long)T * (H + 2 * KV) * D);
  pthread_mutex_unlock(&pool.call_lock);
  free(per_row);
}

// attention: the new tokens of every sequence in a step attend causally over their KV caches, in
// one call (a decode step: one token each; a prompt: many; or a mix).
// q [T, H, D] (rope applied), sequence s owning the next count[s] rows -> out [T, H, D]. Sequence s
// reads layer `layer` of k[s], v[s] [layers, KV, capacity[s], D], its first length[s] rows (the new
// tokens' included): new token i sits at position length[s] - count[s] + i and sees keys 0 .. that.
// Query head h uses KV head h / (H / KV), as HF's repeat_kv. D % 16 == 0.
// Work split: a unit is (sequence, KV head, tile of consecutive queries); its rows, the tile's
// queries times the KV head's query heads (about TILE_ROWS), share each chunk of CHUNK keys and
// values while it is in L1. Threads take units from a shared counter, costliest first.
// Numerics: f32. A score is the dot product of the scaled query and a key, 16 keys at a time (their
// 16 accumulators reduced together). The softmax is online, as in flash attention: a row keeps its
// running maximum and total, a chunk that raises the maximum rescales the row's sums so far by
// exp(old - new), so exp never sees a positive argument; the end divides by the total.
#define CHUNK 64      // keys (and values) per chunk: 2 x 16 KB at D = 64
#define TILE_ROWS 48  // rows per unit: its scores, queries and sums (3 x 12 KB at D = 64) stay in L1/L2

// lane j = the sum of a[j]'s 16 lanes: halves, then quarters, then pairs within quarters, then the
// lane order put right (45 operations, where 16 separate reductions take ~130)
static inline __attribute__((always_inline)) __m512 sum16(const __m512 a[16]) {
  __m512 half[8], quarter[4], pair[2];
  for (int i = 0; i < 8; i++)  // half[i]: a[2i] in lanes 0-7, a[2i+1] in 8-15, each folded to 8
    half[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                            _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++)  // quarter[i]: 128-bit lane c holds a[4i + c] folded to 4
    quarter[i] = _mm512_add_ps(_mm512_shuffle_f32x4(half[2 * i], half[2 * i + 1], 0x88),
                               _mm512_shuffle_f32x4(half[2 * i], half[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++)  // pair[i], lane c: a[8i + c] in two partial sums, then a[8i + 4 + c]
    pair[i] = _mm512_add_ps(_mm512_shuffle_ps(quarter[2 * i], quarter[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_ps(quarter[2 * i], quarter[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4c + i now holds key c + 4i
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(pair[0], pair[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(pair[0], pair[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), sums);
}

// scores of one query row q [D] against 16 keys [16, D]
static inline __attribute__((always_inline)) __m512 scores16(const float *q, const float *keys, int D) {
  __m512 a[16];
  for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 16) {
    const __m512 qd = _mm512_loadu_ps(q + d);
    for (int j = 0; j < 16; j++) a[j] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(keys + (size_t)j * D + d), a[j]);
  }
  return sum16(a);
}

// o [R rows, stride D] (16 Z columns) += p [R, n] @ values [n, D] (same columns), p[r, j] at
// p[r * row_stride + j * key_stride]: R x Z accumulators, each value row loaded once for the R rows
static inline __attribute__((always_inline)) void weigh_values(const int R, const int Z, const float *p, int row_stride,
                                                               int key_stride, const float *values, int D, int n, float *o) {
  __m512 acc[4][4];
  for (int r = 0; r < R; r++)
    for (int z = 0; z < Z; z++) acc[r][z] = _mm512_loadu_ps(o + (size_t)r * D + 16 * z);
  for (int j = 0; j < n; j++) {
    __m512 v[4];
    for (int z = 0; z < Z; z++) v[z] = _mm512_loadu_ps(values + (size_t)j * D + 16 * z);
    for (int r = 0; r < R; r++) {
      const __m512 weight = _mm512_set1_ps(p[r * row_stride + j * key_stride]);
      for (int z = 0; z < Z; z++) acc[r][z] = _mm512_fmadd_ps(weight, v[z], acc[r][z]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int z = 0; z < Z; z++) _mm512_storeu_ps(o + (size_t)r * D + 16 * z, acc[r][z]);
}
typedef void (*weigh_fn)(const float *p, int row_stride, int key_stride, const float *values, int D, int n, float *o);
#define WEIGH(R, Z) \
  static void weigh_##R##_##Z(const float *p, int row_stride, int key_stride, const float *values, int D, int n, \
                              float *o) { weigh_values(R, Z, p, row_stride, key_stride, values, D, n, o); }
WEIGH(1, 1) WEIGH(1, 2) WEIGH(1, 3) WEIGH(1, 4) WEIGH(2, 1) WEIGH(2, 2) WEIGH(2, 3) WEIGH(2, 4)
WEIGH(3, 1) WEIGH(3, 2) WEIGH(3, 3) WEIGH(3, 4) WEIGH(4, 1) WEIGH(4, 2) WEIGH(4, 3) WEIGH(4, 4)
static const weigh_fn WEIGHS[5][5] = {{0}, {0, weigh_1_1, weigh_1_2, weigh_1_3, weigh_1_4},
                                      {0, weigh_2_1, weigh_2_2, weigh_2_3, weigh_2_4},
                                      {0, weigh_3_1, weigh_3_2, weigh_3_3, weigh_3_4},
                                      {0, weigh_4_1, weigh_4_2, weigh_4_3, weigh_4_4}};

struct unit {
  int s, g, first, n;  // sequence, KV head, its first query (0 = the sequence's first new token), queries
  long cost;           // rows x keys seen by the last query
};

static struct {  // the current attention call
  const float *q, *const *k, *const *v;
  const int *length, *capacity, *count;
  int *row;  // q's row of each sequence's first new token
  struct unit *units;
  float *out, scale;
  int S, H, KV, D, layer, n_units;
  atomic_int next_unit;
} att;

static int costlier_first(const void *a, const void *b) {
  const long x = ((const struct unit *)a)->cost, y = ((const struct unit *)b)->cost;
  return (x < y) - (x > y);
}

// where row r of a unit lives in q and out [T, H, D]: query r / group, head g * group + r % group
static inline size_t unit_row(const struct unit *u, int r) {
  const int group = att.H / att.KV;
  return ((size_t)(att.row[u->s] + u->first + r / group) * att.H + u->g * group + r % group) * att.D;
}

// o [R, D] += the weights of chunk c (n keys; p[r, j] at p[r * row_stride + j * key_stride]) @ its values,
// 4 rows at a time, each group up to the keys its last (latest) row sees
static void weigh_chunk(const struct unit *u, const float *p, int row_stride, int key_stride, const float *values,
                        int first_position, int c, int n, float *o) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group;
  for (int r = 0; r < R; r += 4) {
    const int rows = R - r < 4 ? R - r : 4;
    int seen = first_position + (r + rows - 1) / group + 1 - c;
    seen = seen > n ? n : seen;
    if (seen <= 0) continue;
    for (int d = 0; d < D; d += 64)
      WEIGHS[rows][D - d < 64 ? (D - d) / 16 : 4](p + (size_t)r * row_stride, row_stride, key_stride,
                                                  values + (size_t)c * D + d, D, seen, o + (size_t)r * D + d);
  }
}

// out rows of the unit = o / total
static void write_unit(const struct unit *u, const float *o, const float *total) {
  const int D = att.D, R = u->n * (att.H / att.KV);
  for (int r = 0; r < R; r++) {
    float *out = att.out + unit_row(u, r);
    const __m512 inverse = _mm512_set1_ps(1.0f / total[r]);
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_loadu_ps(o + (size_t)r * D + d), inverse));
  }
}

// A unit of few rows (a decode step's): scores row by row, 16 keys at a time. Rows are query-major
// (row r: query r / group, head g * group + r % group), so the rows a weigh_values call takes
// together see nearly the same keys. Scratch: 3 R (D or CHUNK) + 2 R + 16 D floats.
static void attend_few(const struct unit *u, float *scratch) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group, L = att.length[u->s];
  const int first_position = L - att.count[u->s] + u->first;
  const size_t head = ((size_t)att.layer * att.KV + u->g) * att.capacity[u->s] * D;
  const float *keys = att.k[u->s] + head, *values = att.v[u->s] + head;  // [L, D] each
  float *query = scratch, *o = query + (size_t)R * D, *p = o + (size_t)R * D;  // [R, D], [R, D], [R, CHUNK]
  float *top = p + (size_t)R * CHUNK, *total = top + R, *padded = total + R;    // [R], [R], [16, D]
  for (int r = 0; r < R; r++) {
    const float *q = att.q + unit_row(u, r);
    for (int d = 0; d < D; d += 16)
      _mm512_storeu_ps(query + (size_t)r * D + d, _mm512_mul_ps(_mm512_loadu_ps(q + d), _mm512_set1_ps(att.scale)));
    memset(o + (size_t)r * D, 0, sizeof(float) * D);
    top[r] = -INFINITY, total[r] = 0.0f;
  }
  const int keys_seen = first_position + u->n;  // by the last query
  for (int c = 0; c < keys_seen; c += CHUNK) {
    const int n = keys_seen - c < CHUNK ? keys_seen - c : CHUNK;
    const int last_block = (n - 1) / 16 * 16;  // past the cache's end, its keys come from `padded`
    const int pad = c + last_block + 16 > L;
    if (pad) {
      memset(padded, 0, sizeof(float) * 16 * D);
      memcpy(padded, keys + (size_t)(c + last_block) * D, sizeof(float) * (L - c - last_block) * D);
    }
    for (int r = 0; r < R; r++) {
      float *pr = p + (size_t)r * CHUNK;
      int seen = first_position + r / group + 1 - c;  // keys of this chunk row r sees
      seen = seen < 0 ? 0 : seen > n ? n : seen;
      __m512 row_top = _mm512_set1_ps(-INFINITY);
      for (int j = 0; j < seen; j += 16) {
        const float *block = pad && j == last_block ? padded : keys + (size_t)(c + j) * D;
        const __mmask16 visible = seen - j >= 16 ? 0xFFFF : (__mmask16)((1u << (seen - j)) - 1);
        const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), visible, scores16(query + (size_t)r * D, block, D));
        _mm512_storeu_ps(pr + j, s);
        row_top = _mm512_max_ps(row_top, s);
      }
      const float chunk_top = _mm512_reduce_max_ps(row_top);
      if (seen == 0 || chunk_top == -INFINITY) {  // nothing visible here (or only -inf scores)
        memset(pr, 0, sizeof(float) * CHUNK);
        continue;
      }
      const float new_top = chunk_top > top[r] ? chunk_top : top[r];
      const float rescale = expf(top[r] - new_top);  // 0 on the first chunk
      __m512 sum = _mm512_setzero_ps();
      for (int j = 0; j < CHUNK; j += 16) {
        const __mmask16 visible = j >= seen ? 0 : seen - j >= 16 ? 0xFFFF : (__mmask16)((1u << (seen - j)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(visible, exp512(_mm512_sub_ps(_mm512_loadu_ps(pr + j), _mm512_set1_ps(new_top))));
        _mm512_storeu_ps(pr + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      total[r] = total[r] * rescale + _mm512_reduce_add_ps(sum);
      if (rescale != 1.0f)
        for (int d = 0; d < D; d += 16)
          _mm512_storeu_ps(o + (size_t)r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + (size_t)r * D + d), _mm512_set1_ps(rescale)));
      top[r] = new_top;
    }
    weigh_chunk(u, p, CHUNK, 1, values, first_position, c, n, o);
  }
  write_unit(u, o, total);
}

// scores [keys, 16 V rows] of 8 keys (rows key[0 .. 7] of `keys`) against 16 V query rows held
// transposed, query_t [D, rows_stride]: 8 x V accumulators; per d, V loads and 8 broadcasts
static inline __attribute__((always_inline)) void scores_t(const int V, const float *query_t, int rows_stride,
                                                           const float *keys, const int *key, int D, float *s) {
  __m512 acc[8][3];
  for (int j = 0; j < 8; j++)
    for (int v = 0; v < V; v++) acc[j][v] = _mm512_setzero_ps();
  for (int d = 0; d < D; d++) {
    __m512 q[3];
    for (int v = 0; v < V; v++) q[v] = _mm512_loadu_ps(query_t + (size_t)d * rows_stride + 16 * v);
    for (int j = 0; j < 8; j++) {
      const __m512 k = _mm512_set1_ps(keys[(size_t)key[j] * D + d]);
      for (int v = 0; v < V; v++) acc[j][v] = _mm512_fmadd_ps(k, q[v], acc[j][v]);
    }
  }
  for (int j = 0; j < 8; j++)
    for (int v = 0; v < V; v++) _mm512_storeu_ps(s + (size_t)j * rows_stride + 16 * v, acc[j][v]);
}
typedef void (*scores_fn)(const float *query_t, int rows_stride, const float *keys, const int *key, int D, float *s);
#define SCORES(V) \
  static void scores_##V(const float *query_t, int rows_stride, const float *keys, const int *key, int D, float *s) { \
    scores_t(V, query_t, rows_stride, keys, key, D, s); }
SCORES(1) SCORES(2) SCORES(3)
static const scores_fn SCORES_T[4] = {0, scores_1, scores_2, scores_3};

// A unit of many rows (a prompt's tile): the same chunked online softmax as attend_few, with the
// rows in the vector lanes: queries held transposed, scores and weights as [keys, rows], so a key
// is one broadcast against 16 rows (no reductions), and the softmax runs 16 rows at a time.
// Rows are padded to Rp (a multiple of 16) with zero queries that see every key.
// Scratch: Rp (2 D + CHUNK + 4) floats.
static void attend_many(const struct unit *u, float *scratch) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group, Rp = (R + 15) / 16 * 16, L = att.length[u->s];
  const int first_position = L - att.count[u->s] + u->first;
  const size_t head = ((size_t)att.layer * att.KV + u->g) * att.capacity[u->s] * D;
  const float *keys = att.k[u->s] + head, *values = att.v[u->s] + head;  // [L, D] each
  float *query_t = scratch, *o = query_t + (size_t)Rp * D, *p = o + (size_t)Rp * D;  // [D, Rp], [Rp, D], [CHUNK, Rp]
  float *top = p + (size_t)CHUNK * Rp, *total = top + Rp, *rescale = total + Rp;     // [Rp] each
  int *position = (int *)(rescale + Rp);                                              // [Rp]
  for (int r = 0; r < Rp; r++) {
    const float *q = att.q + unit_row(u, r < R ? r : 0);
    for (int d = 0; d < D; d++) query_t[(size_t)d * Rp + r] = r < R ? q[d] * att.scale : 0.0f;
    memset(o + (size_t)r * D, 0, sizeof(float) * D);
    top[r] = -INFINITY, total[r] = 0.0f, position[r] = r < R ? first_position + r / group : L;
  }
  const int keys_seen = first_position + u->n;  // by the last query
  for (int c = 0; c < keys_seen; c += CHUNK) {
    const int n = keys_seen - c < CHUNK ? keys_seen - c : CHUNK;
    for (int j = 0; j < n; j += 8) {  // past n, the last key stands in (masked below)
      int key[8];
      for (int i = 0; i < 8; i++) key[i] = c + (j + i < n ? j + i : n - 1);
      for (int v = 0; v < Rp / 16; v += 3)
        SCORES_T[Rp / 16 - v < 3 ? Rp / 16 - v : 3](query_t + 16 * v, Rp, keys, key, D, p + (size_t)j * Rp + 16 * v);
    }
    for (int v = 0; v < Rp; v += 16) {  // 16 rows at a time
      const __m512i seen_until = _mm512_loadu_si512(position + v);  // a row sees keys up to its position
      const int all_see_chunk = _mm512_reduce_min_epi32(seen_until) >= c + n - 1;
      __m512 chunk_top = _mm512_set1_ps(-INFINITY);
      for (int j = 0; j < n; j++) {
        const __mmask16 visible = all_see_chunk ? 0xFFFF : _mm512_cmp_epi32_mask(_mm512_set1_epi32(c + j), seen_until, _MM_CMPINT_LE);
        chunk_top = _mm512_mask_max_ps(chunk_top, visible, chunk_top, _mm512_loadu_ps(p + (size_t)j * Rp + v));
      }
      const __m512 old_top = _mm512_loadu_ps(top + v), new_top = _mm512_max_ps(old_top, chunk_top);
      const __m512 factor = exp512(_mm512_sub_ps(old_top, new_top));  // old_top = -inf: ~0, and o, total are 0
      __m512 sum = _mm512_setzero_ps();
      for (int j = 0; j < n; j++) {
        const __mmask16 visible = all_see_chunk ? 0xFFFF : _mm512_cmp_epi32_mask(_mm512_set1_epi32(c + j), seen_until, _MM_CMPINT_LE);
        const __m512 e = _mm512_maskz_mov_ps(visible, exp512(_mm512_sub_ps(_mm512_loadu_ps(p + (size_t)j * Rp + v), new_top)));
        _mm512_storeu_ps(p + (size_t)j * Rp + v, e);
        sum = _mm512_add_ps(sum, e);
      }
      _mm512_storeu_ps(total + v, _mm512_fmadd_ps(_mm512_loadu_ps(total + v), factor, sum));
      _mm512_storeu_ps(top + v, new_top);
      _mm512_storeu_ps(rescale + v, factor);
    }
    for (int r = 0; r < R; r++)
      for (int d = 0; d < D; d += 16)
        _mm512_storeu_ps(o + (size_t)r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + (size_t)r * D + d), _mm512_set1_ps(rescale[r])));
    weigh_chunk(u, p, 1, Rp, values, first_position, c, n, o);
  }
  write_unit(u, o, total);
}

static void attention_part(int part) {
  (void)part;
  static __thread float *scratch;  // each thread's, kept between calls (a decode step makes one per layer)
  static __thread size_t scratch_floats;
  const int group = att.H / att.KV, rows = TILE_ROWS / group > 0 ? TILE_ROWS / group * group : group;
  const size_t padded = (size_t)(rows + 15) / 16 * 16;  // attend_few needs less than attend_many
  const size_t floats = padded * (2 * att.D + CHUNK + 4) + 16 * (size_t)att.D;
  if (floats > scratch_floats) {
    free(scratch);
    scratch = malloc(sizeof(float) * floats);
    if (scratch == NULL) abort();
    scratch_floats = floats;
  }
  for (int u; (u = atomic_fetch_add(&att.next_unit, 1)) < att.n_units;)
    (att.units[u].n * group >= 16 ? attend_many : attend_few)(&att.units[u], scratch);
}

void attention(int S, int H, int KV, int D, float scale, int layer, const float *q, const float *const *k,
               const float *const *v, const int *length, const int *capacity, const int *count, float *out) {
  const int group = H / KV, tile = TILE_ROWS / group > 0 ? TILE_ROWS / group : 1;  // queries per unit
  int n_units = 0;
  for (int s = 0; s < S; s++) n_units += (count[s] + tile - 1) / tile * KV;
  struct unit *units = malloc(sizeof(struct unit) * (n_units > 0 ? n_units : 1));
  int *row = malloc(sizeof(int) * (S > 0 ? S : 1));
  if (units == NULL || row == NULL) abort();
  for (int s = 0, i = 0, next_row = 0; s < S; next_row += count[s++]) {
    row[s] = next_row;
    for (int first = 0; first < count[s]; first += tile)
      for (int g = 0; g < KV; g++) {
        const int n = count[s] - first < tile ? count[s] - first : tile;
        units[i++] = (struct unit){s, g, first, n, (long)n * (length[s] - count[s] + first + n)};
      }
  }
  qsort(units, n_units, sizeof(struct unit), costlier_first);
  lock_pool();
  att.q = q, att.k = k, att.v = v, att.length = length, att.capacity = capacity, att.count = count;
  att.row = row, att.units = units, att.n_units = n_units, att.out = out, att.scale = scale;
  att.S = S, att.H = H, att.KV = KV, att.D = D, att.layer = layer;
  atomic_store(&att.next_unit, 0);
  run(attention_part);
  pthread_mutex_unlock(&pool.call_lock);
  free(units);
  free(row);
}
#endif
