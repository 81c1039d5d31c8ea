// stream_read: the machine's memory-read roofline, measured the way a decode step reads weights.
// Each of the pool's threads sums its contiguous share of a large buffer with AVX-512 loads (on a
// CPU without AVX-512: AVX2's, two per zmm's 64 bytes; four independent accumulators, so the adds
// never wait on each other); the sum is returned so the loads cannot be optimised away. Bytes read / seconds of this call is what "the same-run C
// streaming roofline" means in the benchmarks.
//
// int8_dot_loop: the int8 compute roofline, the ceiling of a batched decode step (whose weights
// meet many rows, so that the dot products, not the reads, set its time): each thread runs
// `rounds` x 12 independent int8 dot products on registers: vpdpbusd (64 multiply-adds) with
// AVX-512 VNNI (the bytes it multiplies are the sums', so no product repeats and none is
// hoisted), else vpmaddubsw and the vpaddw that keeps its pair sums (32), as the kernels do (an
// asm loop: each vpmaddubsw multiplies the same two registers into a scratch one, then adds it to
// its sum; a product of a sum's own bytes would chain each vpmaddubsw to the one before it and
// measure its latency, not its throughput);
// multiply-adds per round x rounds x threads / seconds of this call is the peak they work against.
//
// fma_loop: the f32 compute roofline, the ceiling of a prompt's GEMM: `rounds` x 12 independent
// FMAs per thread on registers (16 lanes with AVX-512, else 8: 2 flops each per lane).
#include "cpu.h"
#if defined(__AVX512F__) || defined(PYLLM_AVX2)
#include "lanes.h"

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

static long peak_rounds;
static float peak_sums[64];  // per thread: a checksum, so the loops stay

#ifdef __AVX512VNNI__
#define DOT_MACS 64
static void dot_part(int part) {
  __m512i acc[12];
  const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8((char)(part + 1));
  for (int j = 0; j < 12; j++) acc[j] = _mm512_set1_epi32(j);
  for (long r = 0; r < peak_rounds; r++)
#pragma GCC unroll 12
    for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
  __m512i sum = acc[0];
  for (int j = 1; j < 12; j++) sum = _mm512_add_epi32(sum, acc[j]);
  peak_sums[part] = (float)_mm512_reduce_add_epi32(sum);
}
#else
#define DOT_MACS 32
// one vpmaddubsw of x and b into a scratch register, added into sum (an asm: C's would compute the
// repeated product once)
#define DOT_STEP(sum) "vpmaddubsw %[b], %[x], %%ymm0\n\tvpaddw %%ymm0, %" #sum ", %" #sum "\n\t"
static void dot_part(int part) {
  __m256i acc[12];
  const __m256i x = _mm256_set1_epi8(1), b = _mm256_set1_epi8((char)(part + 1));
  for (int j = 0; j < 12; j++) acc[j] = _mm256_set1_epi16((short)j);
  long rounds = peak_rounds;
  if (rounds > 0)  // the whole loop in the asm, so that the sums stay in registers throughout
    __asm__("1:\n\t" DOT_STEP([a0]) DOT_STEP([a1]) DOT_STEP([a2]) DOT_STEP([a3]) DOT_STEP([a4]) DOT_STEP([a5])
            DOT_STEP([a6]) DOT_STEP([a7]) DOT_STEP([a8]) DOT_STEP([a9]) DOT_STEP([a10]) DOT_STEP([a11])
            "dec %[rounds]\n\tjnz 1b"
            : [a0] "+x"(acc[0]), [a1] "+x"(acc[1]), [a2] "+x"(acc[2]), [a3] "+x"(acc[3]), [a4] "+x"(acc[4]),
              [a5] "+x"(acc[5]), [a6] "+x"(acc[6]), [a7] "+x"(acc[7]), [a8] "+x"(acc[8]), [a9] "+x"(acc[9]),
              [a10] "+x"(acc[10]), [a11] "+x"(acc[11]), [rounds] "+r"(rounds)
            : [x] "x"(x), [b] "x"(b)
            : "xmm0", "cc");
  __m256i sum = acc[0];
  for (int j = 1; j < 12; j++) sum = _mm256_add_epi16(sum, acc[j]);
  peak_sums[part] = (float)_mm256_extract_epi16(sum, 0);
}
#endif

static void fma_part(int part) {
  lanes_t acc[12];
  const lanes_t a = all(0.999f), b = all(1e-4f * (float)(part + 1));
  for (int j = 0; j < 12; j++) acc[j] = all((float)j);
  for (long r = 0; r < peak_rounds; r++)
#pragma GCC unroll 12
    for (int j = 0; j < 12; j++) acc[j] = fmadd(acc[j], a, b);
  lanes_t sum = acc[0];
  for (int j = 1; j < 12; j++) sum = add(sum, acc[j]);
  peak_sums[part] = sum_lanes(sum);
}

static float run_peak(void (*part)(int), long rounds, int *threads) {  // with the pool's lock held
  peak_rounds = rounds;
  pool_run(part);
  float sum = 0.0f;
  for (int t = 0; t < pool_threads; t++) sum += peak_sums[t];
  *threads = pool_threads;
  return sum;
}

// 12 x rounds int8 dot products on every thread of the pool -> a checksum; the threads, and the
// multiply-adds each thread does per round
EXPORT float int8_dot_loop(long rounds, int *threads, int *macs_per_round) {
  pool_lock();
  const float sum = run_peak(dot_part, rounds, threads);
  *macs_per_round = 12 * DOT_MACS;
  pool_unlock();
  return sum;
}

// 12 x rounds FMAs on every thread of the pool -> a checksum; the threads, and the flops each
// thread does per round
EXPORT float fma_loop(long rounds, int *threads, int *flops_per_round) {
  pool_lock();
  const float sum = run_peak(fma_part, rounds, threads);
  *flops_per_round = 12 * 2 * LANES;
  pool_unlock();
  return sum;
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
