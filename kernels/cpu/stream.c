// stream_read: the machine's memory-read roofline, measured the way a decode step reads weights.
// Each of the pool's threads sums its contiguous share of a large buffer with AVX-512 loads (four
// independent accumulators, so the adds never wait on each other); the sum is returned so the
// loads cannot be optimised away. Bytes read / seconds of this call is what "the same-run C
// streaming roofline" means in the benchmarks.
#include "cpu.h"
#ifdef __AVX512F__

static struct {  // the current stream_read call
  const float *data;
  size_t floats;
  double sums[64];  // per thread
} stream;

static void stream_part(int part) {
  const size_t lo = stream.floats * part / pool_threads / 64 * 64;
  const size_t hi = part + 1 == pool_threads ? stream.floats : stream.floats * (part + 1) / pool_threads / 64 * 64;
  __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
  size_t i = lo;
  for (; i + 64 <= hi; i += 64) {
    a = _mm512_add_ps(a, _mm512_loadu_ps(stream.data + i));
    b = _mm512_add_ps(b, _mm512_loadu_ps(stream.data + i + 16));
    c = _mm512_add_ps(c, _mm512_loadu_ps(stream.data + i + 32));
    d = _mm512_add_ps(d, _mm512_loadu_ps(stream.data + i + 48));
  }
  double sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
  for (; i < hi; i++) sum += stream.data[i];
  stream.sums[part] = sum;
}

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
