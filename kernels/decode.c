// The CPU backend's kernels for decode steps, sharing one thread pool: skinny_matmul (a few rows
// times a weight matrix) and decode_attention (one new token per sequence over its KV cache).
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

// decode_attention: one new token per sequence attends over its whole cache (no mask needed).
// q [S, H, D] (rope applied) -> out [S, H, D]; sequence s reads layer `layer` of its caches
// k[s], v[s] [layers, KV, capacity[s], D] up to length[s] rows; query head h uses KV head
// h / (H / KV), as HF's repeat_kv. D % 16 == 0.
// Work split: the S x KV (sequence, KV head) pairs are dealt round-robin to the threads; one pair's
// query heads share its K and V rows while they are in cache.
// Numerics: f32 throughout; scores are scaled dot products, the softmax subtracts the row maximum
// before exp (vectorized below, within 2 ulp of expf), and P.V is divided by the sum at the end.
static inline __m512 exp512(__m512 x) {
  // exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two steps (Cody-Waite), and
  // exp(r) = 1 + r + r^2 P(r) on |r| <= ln 2 / 2 (Cephes' expf coefficients)
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

static struct {  // the current decode_attention call
  const float *q, *const *k, *const *v;
  const int *length, *capacity;
  float *out, scale;
  int S, H, KV, D, layer;
} att;

static void attend(int s, int g, float *scores) {  // query heads of KV head g of sequence s
  const int D = att.D, L = att.length[s], group = att.H / att.KV;
  const size_t head = ((size_t)att.layer * att.KV + g) * att.capacity[s] * D;
  const float *keys = att.k[s] + head, *values = att.v[s] + head;  // [L, D] each
  for (int h = g * group; h < (g + 1) * group; h++) {
    const float *q = att.q + ((size_t)s * att.H + h) * D;
    float top = -INFINITY;
    for (int j = 0; j < L; j++) {
      __m512 dot = _mm512_setzero_ps();
      for (int d = 0; d < D; d += 16)
        dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(keys + (size_t)j * D + d), dot);
      scores[j] = _mm512_reduce_add_ps(dot) * att.scale;
      top = scores[j] > top ? scores[j] : top;
    }
    __m512 total = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= L; j += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(top)));
      _mm512_storeu_ps(scores + j, e);
      total = _mm512_add_ps(total, e);
    }
    if (j < L) {
      const __mmask16 tail = (__mmask16)((1u << (L - j)) - 1);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + j), _mm512_set1_ps(top)));
      _mm512_mask_storeu_ps(scores + j, tail, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
    }
    const float inverse = 1.0f / _mm512_reduce_add_ps(total);
    float *out = att.out + ((size_t)s * att.H + h) * D;
    for (int d = 0; d < D; d += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (j = 0; j < L; j++)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[j]), _mm512_loadu_ps(values + (size_t)j * D + d), acc);
      _mm512_storeu_ps(out + d, _mm512_mul_ps(acc, _mm512_set1_ps(inverse)));
    }
  }
}

static void attention_part(int part) {
  int longest = 0;
  for (int s = 0; s < att.S; s++) longest = att.length[s] > longest ? att.length[s] : longest;
  float *scores = malloc(sizeof(float) * (size_t)(longest > 0 ? longest : 1));
  if (scores == NULL) abort();
  for (int unit = part; unit < att.S * att.KV; unit += pool.threads) attend(unit / att.KV, unit % att.KV, scores);
  free(scores);
}

void decode_attention(int S, int H, int KV, int D, float scale, int layer, const float *q, const float *const *k,
                      const float *const *v, const int *length, const int *capacity, float *out) {
  lock_pool();
  att.q = q, att.k = k, att.v = v, att.length = length, att.capacity = capacity;
  att.out = out, att.scale = scale, att.S = S, att.H = H, att.KV = KV, att.D = D, att.layer = layer;
  run(attention_part);
  pthread_mutex_unlock(&pool.call_lock);
}
#endif
