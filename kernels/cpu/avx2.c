// avx2_block_matmul: a decode step's matmul on GGML's block formats (q4_0, q4_1, q5_0, q5_1,
// q8_0, q4_k, q5_k, q6_k, rows as GGUF stores them) with AVX2 and FMA, for CPUs without AVX-512
// (Zen 1-3, Intel's client cores), where the other ops of a step stay on the NumPy reference.
// Without it such a CPU dequantizes every matrix to f32 at every step.
//
// The activations: each row of x [M, K] is cut into blocks of 32; block b gets d = max|x| / 32767
// and q = round-half-even(x / d) in int16 (d = 0: q = 0), with s = d sum(q). int16 rather than
// llama.cpp's int8 costs no more multiplies (vpmaddwd on 16 weights where int8 takes vpmaddubsw
// then vpmaddwd) and leaves an error ~1/258 of int8's, below quant.c's two int8 layers'.
//
// The weights: a block of 32 (q6_k: two halves of 16) is decoded into two ymm of int16, weights
// 0..15 and 16..31 (q4 nibbles, q5 with its fifth bit as 16, q8_0 signed; q6_k's q - 32 times its
// int8 scale of 16, so one factor d per block), with per block a factor f (d, or K-quants' d sc)
// and a constant c per unit of s: -8 d (q4_0), -16 d (q5_0), m (q4_1, q5_1), -dmin m (q4_k, q5_k),
// 0 (q8_0, q6_k). A K-quant superblock's scales are decoded once for its 8 blocks.
//
// One thread: its share of the weight rows, rows_at_once of them side by side; per row and block
// the weights are decoded once, then per row of x: two vpmaddwd and an add give 8 int32 partial
// sums (|w| <= 4096 for q6_k, 32767 x 4096 x 4 < 2^31), converted and multiplied by f d_x into
// the row's 8-lane f32 accumulator, and a scalar collects c s_x. The output: lane sum + scalar.
//
// Numerics: each block's integer dot product is exact; f d_x times it in f32, summed in k order
// per lane: next to an f32 dot product with the dequantized weights, only the activations' int16
// rounding and the summation order differ.
#include "cpu.h"
#ifdef PYLLM_AVX2

#define MAX_ROWS 16  // rows of x a call takes

struct x_block {    // one block of 32 of a row of x
  int16_t q[32];
  float d;          // its scale
  float dsum;       // d sum(q)
};

static struct {  // the current avx2_block_matmul call
  const struct x_block *x;  // [M, K / 32]
  const uint8_t *w;
  float *out;
  int type, M, K, N, accumulate;
} avx2;

// v [32] -> its block (the layout above)
static struct x_block quantize_block(const float *v) {
  struct x_block b = {0};
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 top = _mm256_setzero_ps();
  for (int i = 0; i < 32; i += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
  b.d = max8(top) / 32767.0f;
  if (b.d == 0.0f) return b;
  __m256i sum = _mm256_setzero_si256();
  for (int i = 0; i < 32; i += 16) {  // cvtps rounds half to even (the MXCSR default); |x / d| <= 32767
    const __m256 d = _mm256_set1_ps(b.d);
    const __m256i low = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(v + i), d));
    const __m256i high = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(v + i + 8), d));
    sum = _mm256_add_epi32(sum, _mm256_add_epi32(low, high));  // packs works per 128-bit lane: put them back in order
    _mm256_storeu_si256((__m256i *)(b.q + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(low, high), 0xD8));
  }
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  b.dsum = b.d * (float)_mm_cvtsi128_si32(s);
  return b;
}

static inline float f16_at(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

struct weight_block {
  __m256i low, high;  // weights 0..15, 16..31 in int16
  float factor;       // f (above)
  float constant;     // c (above)
};

struct superblock {  // a K-quant superblock's per-block scales
  float factor[8], constant[8];  // q4_k, q5_k: d sc, -dmin m; q6_k: d in factor[0]
  int16_t scale[16];             // q6_k: its int8 scales of 16
};

// bytes -> int16: 16 at p
static inline __m256i widen_unsigned(const uint8_t *p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)); }

static inline __m256i nibbles(__m256i bytes, int high) {
  return high ? _mm256_srli_epi16(bytes, 4) : _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
}

// 16 where bit j of `bits` is set, in int16 lane j
static inline __m256i bit_sixteens(unsigned bits) {
  const __m256i lane_bit = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                             (short)0x8000);
  const __m256i set = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)bits), lane_bit), lane_bit);
  return _mm256_and_si256(set, _mm256_set1_epi16(16));
}

// q4_k / q5_k's 6-bit scales and mins (scales[12] after d, dmin): block j < 4: s[j] & 63,
// s[j + 4] & 63; j >= 4: s[j + 4] & 15 | s[j - 4] >> 6 << 4, s[j + 4] >> 4 | s[j] >> 6 << 4
static inline void k4_scales(const uint8_t *p, struct superblock *s) {
  const float d = f16_at(p), dmin = f16_at(p + 2);
  const uint8_t *q = p + 4;
  for (int j = 0; j < 8; j++) {
    const int sc = j < 4 ? q[j] & 63 : (q[j + 4] & 15) | (q[j - 4] >> 6 << 4);
    const int m = j < 4 ? q[j + 4] & 63 : (q[j + 4] >> 4) | (q[j] >> 6 << 4);
    s->factor[j] = d * (float)sc, s->constant[j] = -dmin * (float)m;
  }
}

// blocks a K-quant superblock holds (1: a 32-weight format)
static inline int group_blocks(int type) { return type == Q4_K || type == Q5_K || type == Q6_K ? 8 : 1; }

// block b + j of a row at `row` in `type`, b a multiple of group_blocks (K-quants: j the block in
// its superblock, constant where the caller unrolls j; s holds the superblock's scales, decoded
// here at its first block)
static inline __attribute__((always_inline)) struct weight_block decode_block(const int type, const uint8_t *row, int b,
                                                                               const int j, struct superblock *s) {
  struct weight_block w;
  if (group_blocks(type) == 8) {
    const uint8_t *p = row + (size_t)(b / 8) * row_bytes(type, 256);
    if (type == Q6_K) {  // ql[128], qh[64], scales[16], d; block j = 4 h + i: ql[64 h + 32 (i % 2) ..], nibble i / 2; qh[32 h ..] bits 2i
      if (j == 0) {
        s->factor[0] = f16_at(p + 208);
        for (int i = 0; i < 16; i++) s->scale[i] = (int8_t)p[192 + i];
      }
      const int h = j / 4, i = j % 4;
      const uint8_t *ql = p + 64 * h + 32 * (i % 2), *qh = p + 128 + 32 * h;
      const __m256i three = _mm256_set1_epi16(3), bias = _mm256_set1_epi16(32);
      for (int half = 0; half < 2; half++) {
        const __m256i high_bits = _mm256_and_si256(_mm256_srli_epi16(widen_unsigned(qh + 16 * half), 2 * i), three);
        const __m256i q = _mm256_sub_epi16(_mm256_or_si256(nibbles(widen_unsigned(ql + 16 * half), i >= 2),
                                                           _mm256_slli_epi16(high_bits, 4)), bias);
        const __m256i scaled = _mm256_mullo_epi16(q, _mm256_set1_epi16(s->scale[8 * h + 2 * i + half]));
        if (half) w.high = scaled; else w.low = scaled;
      }
      w.factor = s->factor[0], w.constant = 0.0f;
      return w;
    }
    if (j == 0) k4_scales(p, s);  // q4_k: d, dmin, scales[12], qs[128]; q5_k: qh[32] before qs
    const uint8_t *qs = p + (type == Q5_K ? 48 : 16) + 32 * (j / 2);  // block j: nibble j % 2 of qs[32 (j / 2) ..]
    w.low = nibbles(widen_unsigned(qs), j % 2), w.high = nibbles(widen_unsigned(qs + 16), j % 2);
    if (type == Q5_K) {  // + 16 where bit j of qh[e] is set, e the weight
      const __m256i one = _mm256_set1_epi16(1);
      w.low = _mm256_or_si256(w.low, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(widen_unsigned(p + 16), j), one), 4));
      w.high = _mm256_or_si256(w.high, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(widen_unsigned(p + 32), j), one), 4));
    }
    w.factor = s->factor[j], w.constant = s->constant[j];
    return w;
  }
  const uint8_t *p = row + (size_t)(b + j) * row_bytes(type, 32);  // d, [m], [qh], qs
  w.factor = f16_at(p);
  if (type == Q8_0) {
    w.low = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 2)));
    w.high = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 18)));
    w.constant = 0.0f;
    return w;
  }
  const int has_min = type == Q4_1 || type == Q5_1, has_qh = type == Q5_0 || type == Q5_1;
  const __m256i bytes = widen_unsigned(p + 2 + 2 * has_min + 4 * has_qh);  // weight j, j + 16 in byte j's nibbles
  w.low = nibbles(bytes, 0), w.high = nibbles(bytes, 1);
  if (has_qh) {
    uint32_t qh;
    memcpy(&qh, p + 2 + 2 * has_min, 4);
    w.low = _mm256_or_si256(w.low, bit_sixteens(qh & 0xFFFF));
    w.high = _mm256_or_si256(w.high, bit_sixteens(qh >> 16));
  }
  w.constant = has_min ? f16_at(p + 2) : -(type == Q4_0 ? 8.0f : 16.0f) * w.factor;
  return w;
}

// weight rows lo .. hi - 1 against the M rows of x, P rows at once (P, M constant where the caller makes them)
static inline __attribute__((always_inline)) void rows_avx2(const int type, const int P, const int M, int lo, int hi) {
  const int blocks = avx2.K / 32;
  const size_t bytes = row_bytes(type, avx2.K);
  for (int n0 = lo; n0 < hi; n0 += P) {
    const int rows = hi - n0 < P ? hi - n0 : P;
    __m256 acc[2][MAX_ROWS];
    float constant[2][MAX_ROWS];
    struct superblock scales[2] = {0};  // set at each superblock's first block
    for (int r = 0; r < P; r++)
      for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps(), constant[r][m] = 0.0f;
    for (int b0 = 0; b0 < blocks; b0 += group_blocks(type))
#pragma GCC unroll 8
      for (int j = 0; j < group_blocks(type); j++)
        for (int r = 0; r < P; r++) {
          const int b = b0 + j;
          const uint8_t *row = avx2.w + (size_t)(n0 + (r < rows ? r : 0)) * bytes;  // a missing last row repeats the first
          _mm_prefetch((const char *)row + (size_t)(b + 8) * row_bytes(type, 256) / 8, _MM_HINT_T0);  // 8 blocks ahead
          const struct weight_block w = decode_block(type, row, b0, j, &scales[r]);
          for (int m = 0; m < M; m++) {
            const struct x_block *x = avx2.x + (size_t)m * blocks + b;
            const __m256i dots = _mm256_add_epi32(_mm256_madd_epi16(w.low, _mm256_loadu_si256((const __m256i *)x->q)),
                                                  _mm256_madd_epi16(w.high, _mm256_loadu_si256((const __m256i *)(x->q + 16))));
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots), _mm256_set1_ps(w.factor * x->d), acc[r][m]);
            constant[r][m] += w.constant * x->dsum;
          }
        }
    for (int r = 0; r < rows; r++)
      for (int m = 0; m < M; m++) {
        const float sum = sum8(acc[r][m]) + constant[r][m];
        float *out = avx2.out + (size_t)m * avx2.N + n0 + r;
        *out = avx2.accumulate ? *out + sum : sum;
      }
  }
}

static inline __attribute__((always_inline)) void rows_of_type(const int type, int lo, int hi) {
  switch (avx2.M) {  // a decode step's usual row counts; two weight rows at once while the accumulators fit in registers
    case 1: rows_avx2(type, 2, 1, lo, hi); break;
    case 2: rows_avx2(type, 2, 2, lo, hi); break;
    case 4: rows_avx2(type, 2, 4, lo, hi); break;
    case 8: rows_avx2(type, 1, 8, lo, hi); break;
    case 16: rows_avx2(type, 1, 16, lo, hi); break;
    default: rows_avx2(type, 1, avx2.M, lo, hi);
  }
}

static void avx2_part(int part) {
  const int lo = (int)((long long)avx2.N * part / pool_threads), hi = (int)((long long)avx2.N * (part + 1) / pool_threads);
  switch (avx2.type) {
    case Q4_0: rows_of_type(Q4_0, lo, hi); break;
    case Q4_1: rows_of_type(Q4_1, lo, hi); break;
    case Q5_0: rows_of_type(Q5_0, lo, hi); break;
    case Q5_1: rows_of_type(Q5_1, lo, hi); break;
    case Q4_K: rows_of_type(Q4_K, lo, hi); break;
    case Q5_K: rows_of_type(Q5_K, lo, hi); break;
    case Q6_K: rows_of_type(Q6_K, lo, hi); break;
    default: rows_of_type(Q8_0, lo, hi);
  }
}

// out [M, N] (+)= x [M, K] @ dequant(w)^T, w [N, K] in GGUF's rows of `type` (q4_0, q4_1, q5_0,
// q5_1, q8_0, q4_k, q5_k, q6_k); 1 <= M <= 16, K a multiple of the type's block (the caller checks).
EXPORT void avx2_block_matmul(int type, int M, const float *x, int K, const uint8_t *w, int N, float *out,
                              int accumulate) {
  static struct x_block *records;
  static size_t allocated;  // records' blocks, kept between calls
  const size_t needed = (size_t)M * (K / 32);
  pool_lock();
  if (needed > allocated) {
    free(records);
    records = malloc(needed * sizeof *records);
    if (records == NULL) abort();
    allocated = needed;
  }
  for (size_t i = 0; i < needed; i++) records[i] = quantize_block(x + 32 * i);  // x's rows are K / 32 blocks each
  avx2.x = records, avx2.w = w, avx2.out = out;
  avx2.type = type, avx2.M = M, avx2.K = K, avx2.N = N, avx2.accumulate = accumulate;
  pool_run_sized(avx2_part, (size_t)N * row_bytes(type, K));
  pool_unlock();
}

// avx2_dequantize: w [rows, K] in `type` -> out [rows, K] f32, as gguf.quants.dequantize (each weight
// f q + c of its decoded block: the products are exact, so one rounding, as gguf's): a prompt's
// strips of weights for the BLAS GEMM. Rows are split among the pool's threads.
static struct {  // the current avx2_dequantize call
  const uint8_t *w;
  float *out;
  int type, rows, K;
} dq;

static void dequantize_part(int part) {
  const int lo = (int)((long long)dq.rows * part / pool_threads), hi = (int)((long long)dq.rows * (part + 1) / pool_threads);
  const size_t bytes = row_bytes(dq.type, dq.K);
  for (int n = lo; n < hi; n++) {
    struct superblock scales = {0};
    float *out = dq.out + (size_t)n * dq.K;
    for (int b = 0; b < dq.K / 32; b++) {
      const int j = b % group_blocks(dq.type);
      const struct weight_block w = decode_block(dq.type, dq.w + (size_t)n * bytes, b - j, j, &scales);
      const __m256 f = _mm256_set1_ps(w.factor), c = _mm256_set1_ps(w.constant);
      const __m256i half[2] = {w.low, w.high};
      for (int i = 0; i < 4; i++) {  // 8 weights at a time: int16 -> int32 -> f32
        const __m128i q = i % 2 ? _mm256_extracti128_si256(half[i / 2], 1) : _mm256_castsi256_si128(half[i / 2]);
        _mm256_storeu_ps(out + 32 * b + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(q)), f, c));
      }
    }
  }
}

EXPORT void avx2_dequantize(int type, const uint8_t *w, int rows, int K, float *out) {
  pool_lock();
  dq.w = w, dq.out = out, dq.type = type, dq.rows = rows, dq.K = K;
  pool_run_sized(dequantize_part, (size_t)rows * K * sizeof(float));
  pool_unlock();
}
#endif
