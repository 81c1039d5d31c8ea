// avx2_group_rows: avx2_block_matmul's rows of an interleaved matrix (interleave.c: the 32-weight
// formats' rows 16 at a time, block b of the 16 rows side by side, lane j = row j), with AVX2:
// a ymm holds half a row group, 8 rows, so each lane sums its own row's dot product and no
// horizontal sums are needed.
//
// One block (32 weights) of 8 rows: 8 vectors W[u], lane i = row i's weights 4u .. 4u + 3 as
// bytes (q4 and q5 unsigned, their offset -8 / -16 in the constant; q8_0 signed). The interleaved
// qs vector t (64 bytes, lane j = bytes 4t .. 4t + 3 of row j's qs) gives, for half h (its bytes
// 32h .. 32h + 31), W[t] from its low nibbles and W[t + 4] from its high ones.
// Against one row of x (avx2.c's activations): one layer, W[u] times the broadcast bytes 4u ..
// 4u + 3 of x's block (vpmaddubsw; q8_0: |W| times x with W's signs), int16 pair sums added over
// u while they fit (4-bit: 8 x 2 x 15 x 127 < 2^15; 5-bit: 4 at a time), then vpmaddwd to int32;
// two layers, W[u] widened to int16 (vpunpck*bw: rows 0, 1, 4, 5 and rows 2, 3, 6, 7), vpmaddwd
// with x's int16 elements 4u .. 4u + 3 broadcast, and one vphaddd at the block's end puts row i
// in lane i. The block's int32 sums, converted, times d d_x, plus the constant times d_x sum(q),
// go into an f32 accumulator per row of x.
// Numerics: as avx2.c (each block's integer dot product is exact); blocks are summed in k order.
#include "avx2_blocks.h"
#ifdef PYLLM_AVX2
#define PREFETCH_BYTES 2048  // how far ahead of its reads a row group's pass prefetches (kernels.md)

// the constant per unit of x's d sum(q) (avx2_blocks.h's c, per row): q4_0 -8 d, q5_0 -16 d, q4_1
// and q5_1 m (q8_0 has none: has_constant)
static inline __m256 group_constant(const int type, __m256 d, __m256 m) {
  if (type == Q4_1 || type == Q5_1) return m;
  return _mm256_mul_ps(d, _mm256_set1_ps(type == Q4_0 ? -8.0f : -16.0f));
}

// the fifth bits of q5's weights 4u .. 4u + 3 (bits 4u .. 4u + 3 of each lane's qh) as 16 in each byte
static inline __m256i fifth_bits(__m256i qh, int u) {
  const __m256i dword_bytes = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                                0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
  const __m256i byte = _mm256_shuffle_epi8(qh, _mm256_add_epi8(dword_bytes, _mm256_set1_epi8((char)(u / 2))));
  const __m256i bit = _mm256_set1_epi32(0x08040201 << (4 * (u % 2)));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(byte, bit), bit), _mm256_set1_epi8(16));
}

// half h of the group of 16 blocks at g -> W[8], d (and m) of its 8 rows
static inline __attribute__((always_inline)) void decode_half(const int type, const uint8_t *g, int h, __m256i W[8],
                                                              __m256 *d, __m256 *m) {
  const struct interleaved_layout L = interleaved_layout(type);
  if (type == Q8_0) {
    for (int u = 0; u < 8; u++) W[u] = load32(g + 64 * u + 32 * h);
  } else {
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int t = 0; t < 4; t++) {
      const __m256i G = load32(g + 64 * t + 32 * h);
      W[t] = _mm256_and_si256(G, low), W[t + 4] = _mm256_and_si256(_mm256_srli_epi16(G, 4), low);
    }
    if (L.qh >= 0) {
      const __m256i qh = load32(g + L.qh + 32 * h);
      for (int u = 0; u < 8; u++) W[u] = _mm256_or_si256(W[u], fifth_bits(qh, u));
    }
  }
  *d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + L.d + 16 * h)));
  *m = L.m >= 0 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + L.m + 16 * h))) : _mm256_setzero_ps();
}

// where x's int16 elements 4u .. 4u + 3 sit in a two-layer block (avx2.c's order: 0..7, 16..23, 8..15, 24..31)
static inline int two_layer_at(int u) { return 4 * (u % 2) + 16 * (u / 2 % 2) + 8 * (u / 4); }

// the 4 bytes at p in every 32-bit lane; the 8 bytes at p in every 64-bit lane
static inline __m256i every_dword(const uint8_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
static inline __m256i every_qword(const uint8_t *p) {
  int64_t v;
  memcpy(&v, p, 8);
  return _mm256_set1_epi64x(v);
}

// W . x's block at q -> 8 int32, lane i: row i's block sum (L layers)
static inline __attribute__((always_inline)) __m256i half_dot(const int type, const int L, const __m256i W[8],
                                                              const __m256i magnitude[8], const uint8_t *q) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (L == 2) {
    __m256i low = _mm256_setzero_si256(), high = _mm256_setzero_si256();
    for (int u = 0; u < 8; u++) {
      const __m256i x = every_qword(q + 2 * two_layer_at(u));
      const __m256i widen = type == Q8_0 ? _mm256_cmpgt_epi8(_mm256_setzero_si256(), W[u]) : _mm256_setzero_si256();
      low = _mm256_add_epi32(low, _mm256_madd_epi16(_mm256_unpacklo_epi8(W[u], widen), x));
      high = _mm256_add_epi32(high, _mm256_madd_epi16(_mm256_unpackhi_epi8(W[u], widen), x));
    }
    return _mm256_hadd_epi32(low, high);  // lanes: rows 0, 1, 2, 3 | 4, 5, 6, 7
  }
  if (type == Q8_0) {
    __m256i sum = _mm256_setzero_si256();
    for (int u = 0; u < 8; u++) {
      const __m256i x = _mm256_sign_epi8(every_dword(q + 4 * u), W[u]);
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude[u], x), ones));
    }
    return sum;
  }
  const int run = type == Q4_0 || type == Q4_1 ? 8 : 4;  // int16 sums that fit
  __m256i sum = _mm256_setzero_si256();
  for (int u0 = 0; u0 < 8; u0 += run) {
    __m256i pairs[8];  // added as a tree, not a chain: the adds of a row wait on fewer before them
    for (int u = 0; u < run; u++) pairs[u] = _mm256_maddubs_epi16(W[u0 + u], every_dword(q + 4 * (u0 + u)));
    for (int width = run / 2; width >= 1; width /= 2)
      for (int i = 0; i < width; i++) pairs[i] = _mm256_add_epi16(pairs[i], pairs[i + width]);
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs[0], ones));
  }
  return sum;
}

// row groups lo .. hi - 1 of the interleaved matrix against the M rows of x in L layers
static inline __attribute__((always_inline)) void groups_avx2(const int type, const int M, const int L, int lo, int hi) {
  const struct avx2_call *c = &avx2_call;
  const int blocks = c->K / 32;
  const size_t group_bytes = (size_t)ROW_GROUP * row_bytes(type, 32);
  for (int r = lo; r < hi; r++)
    for (int h = 0; h < 2; h++) {
      const uint8_t *group = c->w + (size_t)r * ROW_GROUP * row_bytes(type, c->K);
      __m256 acc[MAX_ROWS];
      for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
      for (int b = 0; b < blocks; b++, group += group_bytes) {
        if (h == 0)  // the first half's pass streams the row group; the second finds it in L1
          for (size_t line = 0; line < group_bytes; line += 64)
            _mm_prefetch((const char *)group + PREFETCH_BYTES + line, _MM_HINT_T0);
        __m256i W[8], magnitude[8];
        __m256 d, mins;
        decode_half(type, group, h, W, &d, &mins);
        if (type == Q8_0 && L == 1)
          for (int u = 0; u < 8; u++) magnitude[u] = _mm256_abs_epi8(W[u]);
        const __m256 constant = has_constant(type) ? group_constant(type, d, mins) : d;  // d: unused
        for (int m = 0; m < M; m++) {
          const size_t at = (size_t)m * c->padded + b;  // x's block b of row m
          const __m256 sums = _mm256_cvtepi32_ps(half_dot(type, L, W, magnitude, c->q + at * 32 * L));
          acc[m] = _mm256_fmadd_ps(sums, _mm256_mul_ps(d, _mm256_set1_ps(c->d[at])), acc[m]);
          if (has_constant(type)) acc[m] = _mm256_fmadd_ps(constant, _mm256_set1_ps(c->dsum[at]), acc[m]);
        }
      }
      for (int m = 0; m < M; m++) {
        float *out = c->out + (size_t)m * c->N + (size_t)r * ROW_GROUP + 8 * h;
        _mm256_storeu_ps(out, c->accumulate ? _mm256_add_ps(_mm256_loadu_ps(out), acc[m]) : acc[m]);
      }
    }
}

static inline __attribute__((always_inline)) void groups_of_type(const int type, int lo, int hi) {
  WITH_CONSTANT_ROWS(groups_avx2, type, lo, hi);
}

void avx2_group_rows(int lo, int hi) {
  switch (avx2_call.type) {
    case Q4_0: groups_of_type(Q4_0, lo, hi); break;
    case Q4_1: groups_of_type(Q4_1, lo, hi); break;
    case Q5_0: groups_of_type(Q5_0, lo, hi); break;
    case Q5_1: groups_of_type(Q5_1, lo, hi); break;
    default: groups_of_type(Q8_0, lo, hi);
  }
}
#endif
