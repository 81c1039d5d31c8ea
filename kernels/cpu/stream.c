// stream_read: the machine's memory-read roofline, measured the way a decode step reads weights.
// Each of the pool's threads sums its contiguous share of a large buffer with AVX-512 loads (on a
// CPU without AVX-512: AVX2's, two per zmm's 64 bytes; four independent accumulators, so the adds
// never wait on each other); the sum is returned so the loads cannot be optimised away. Bytes read / seconds of this call is what "the same-run C
// streaming roofline" means in the benchmarks.
//
// int8_dot_loop: the int8 compute roofline, the ceiling of a batched decode step (whose weights
// meet many rows, so that the dot products, not the reads, set its time): each thread runs
// `rounds` x 12 independent vpdpbusd on registers (64 multiply-adds each); 768 x rounds x threads
// multiply-adds / seconds of this call is the peak the quantized kernels work against.
#include "cpu.h"
#if defined(__AVX512F__) || defined(PYLLM_AVX2)

static struct {  // the current stream_read call
  const float *data;
  size_t floats;
  double sums[64];  // per thread
} stream;

static void stream_part(int part) {
  const size_t lo = stream.floats * part / pool_threads / 64 * 64;
  const size_t hi = part + 1 == pool_threads ? stream.floats : stream.floats * (part + 1) / pool_threads / 64 * 64;
  size_t i = lo;
#ifdef __AVX512F__
  __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
  for (; i + 64 <= hi; i += 64) {
    a = _mm512_add_ps(a, _mm512_loadu_ps(stream.data + i));
    b = _mm512_add_ps(b, _mm512_loadu_ps(stream.data + i + 16));
    c = _mm512_add_ps(c, _mm512_loadu_ps(stream.data + i + 32));
    d = _mm512_add_ps(d, _mm512_loadu_ps(stream.data + i + 48));
  }
  double sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
#else
  __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
  for (; i + 64 <= hi; i += 64)
    for (int h = 0; h < 64; h += 32) {
      a = _mm256_add_ps(a, _mm256_loadu_ps(stream.data + i + h));
      b = _mm256_add_ps(b, _mm256_loadu_ps(stream.data + i + h + 8));
      c = _mm256_add_ps(c, _mm256_loadu_ps(stream.data + i + h + 16));
      d = _mm256_add_ps(d, _mm256_loadu_ps(stream.data + i + h + 24));
    }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
  double sum = 0.0;
  for (int j = 0; j < 8; j++) sum += lanes[j];
#endif
  for (; i < hi; i++) sum += stream.data[i];
  stream.sums[part] = sum;
}

#ifdef __AVX512VNNI__
static long dot_rounds;
static int dot_sums[64];

static void dot_part(int part) {
  __m512i acc[12];
  const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8((char)(part + 1));
  for (int j = 0; j < 12; j++) acc[j] = _mm512_set1_epi32(j);
  for (long r = 0; r < dot_rounds; r++)
    for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
  __m512i sum = acc[0];
  for (int j = 1; j < 12; j++) sum = _mm512_add_epi32(sum, acc[j]);
  dot_sums[part] = _mm512_reduce_add_epi32(sum);
}

// 12 x rounds vpdpbusd on every thread of the pool -> a checksum (so the loop stays); the threads
EXPORT int int8_dot_loop(long rounds, int *threads) {
  pool_lock();
  dot_rounds = rounds;
  pool_run(dot_part);
  int sum = 0;
  for (int part = 0; part < pool_threads; part++) sum += dot_sums[part];
  *threads = pool_threads;
  pool_unlock();
  return sum;
}
#endif

// the sum of data [floats], read once by every thread of the pool
EXPORT double stream_read(const float *data, size_t floats) {
  pool_lock();
  stream.data = data, stream.floats = floats;
  pool_run(stream_part);
  double sum = 0.0;
  for (int part = 0; part < pool_threads; part++) sum += stream.sums[part];
  pool_unlock();
  return sum;
}
#endif
