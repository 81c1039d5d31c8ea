// avx2_blocks.h: GGML's block formats decoded in AVX2 registers, for avx2.c (the decode matmul)
// and avx2_dequantize.c (a prompt's weight strips).
//
// A tile is 8 blocks of 32: a K-quant superblock (one row), else 2 consecutive blocks of 4 rows,
// so that a row's blocks (18 for K = 576) fill whole tiles. Each block is decoded into 32 bytes
// (q4 nibbles and q5 with its fifth bit as 16, unsigned; q6_k's q unsigned, 0..63; q8_0 signed),
// with per block a factor f (d, or K-quants' d sc; q6_k: d, with its int8 scales of 16 applied to
// the sums of the block's halves) and a constant c per unit of the activations' d sum(q): -8 d
// (q4_0), -16 d (q5_0), m (q4_1, q5_1), -dmin m (q4_k, q5_k), 0 (q8_0; q6_k subtracts its 32 in
// the integers).
#pragma once
#include "cpu.h"
#ifdef PYLLM_AVX2

#define TILE 8  // blocks of 32 decoded together, one per lane
#define MAX_ROWS 16  // rows of x an avx2_block_matmul call takes

struct avx2_call {      // the current avx2_block_matmul call (avx2.c)
  const uint8_t *q;    // [M, padded, 32 x layers bytes] x's blocks: int8 q, or (two layers) int16 254 q + q2
  const float *d;      // [M, padded] their scales (0: padding)
  const float *dsum;   // [M, padded] d sum(q)
  const uint8_t *w;
  float *out;
  int type, M, layers, K, N, padded, accumulate;
  int interleaved;     // w in the interleaved layout (interleave.c): its row groups go to avx2_group_rows
  atomic_int next_unit;  // the threads' shares: the first unit (avx2.c's avx2_part) none has taken
};
extern struct avx2_call avx2_call;
void avx2_group_rows(int lo, int hi);  // avx2_interleaved.c: the call's row groups lo .. hi - 1

// fn(type, M, L, lo, hi) with the call's rows of x (M) and layers (L) as constants where a decode
// step's usual counts make them so
#define WITH_CONSTANT_ROWS(fn, type, lo, hi)                                                        \
  do {                                                                                              \
    if (avx2_call.layers == 2) {                                                                    \
      switch (avx2_call.M) {                                                                        \
        case 1: fn(type, 1, 2, lo, hi); break;                                                      \
        case 2: fn(type, 2, 2, lo, hi); break;                                                      \
        case 4: fn(type, 4, 2, lo, hi); break;                                                      \
        default: fn(type, avx2_call.M, 2, lo, hi);                                                  \
      }                                                                                             \
      break;                                                                                        \
    }                                                                                               \
    switch (avx2_call.M) {                                                                          \
      case 1: fn(type, 1, 1, lo, hi); break;                                                        \
      case 2: fn(type, 2, 1, lo, hi); break;                                                        \
      case 4: fn(type, 4, 1, lo, hi); break;                                                        \
      case 8: fn(type, 8, 1, lo, hi); break;                                                        \
      case 16: fn(type, 16, 1, lo, hi); break;                                                      \
      default: fn(type, avx2_call.M, 1, lo, hi);                                                    \
    }                                                                                               \
  } while (0)

// rows first .. first + count - 1 of w [N, K] in `type` (| INTERLEAVED), or rows picked[0 .. count - 1],
// -> out [count, K] f32, as gguf dequantizes (avx2_dequantize.c)
void avx2_dequantize_rows(int type, const uint8_t *w, int N, int K, int first, int count, const int32_t *picked,
                          float *out);

static inline float f16_at(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

static inline __m256i load32(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

struct tile {        // a tile's 8 blocks, one per lane
  __m256 factor;     // f of each block (above)
  __m256 constant;   // c of each block
  __m256 first;      // q6_k: the scale of each block's first half (weights 0..15)
  __m256 second;     // q6_k: of its second half
};

static inline int has_constant(int type) { return type != Q8_0 && type != Q6_K; }

// blocks of 32 a K-quant superblock holds (1: a 32-weight format)
static inline int group_blocks(int type) { return type == Q4_K || type == Q5_K || type == Q6_K ? 8 : 1; }

// a K-quant superblock at p
static inline __attribute__((always_inline)) struct tile superblock_head(const int type, const uint8_t *p) {
  struct tile t = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  if (type == Q6_K) {  // ql[128], qh[64], scales[16] (block j's halves: 2j, 2j + 1), d
    const __m128i scales = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 192)),
                                            _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    t.factor = _mm256_set1_ps(f16_at(p + 208));
    t.first = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(scales));
    t.second = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(scales, 8)));
    return t;
  }
  // q4_k, q5_k: d, dmin, 6-bit scales and mins in scales[12] (dequantize.c's layout)
  uint32_t u[3];
  memcpy(u, p + 4, 12);
  const uint64_t sc = (u[0] & 0x3F3F3F3Fu) | (uint64_t)((u[2] & 0x0F0F0F0Fu) | (u[0] >> 6 & 0x03030303u) << 4) << 32;
  const uint64_t m = (u[1] & 0x3F3F3F3Fu) | (uint64_t)((u[2] >> 4 & 0x0F0F0F0Fu) | (u[1] >> 6 & 0x03030303u) << 4) << 32;
  const __m256 scales = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc)));
  const __m256 mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)m)));
  t.factor = _mm256_mul_ps(_mm256_set1_ps(f16_at(p)), scales);
  t.constant = _mm256_mul_ps(_mm256_set1_ps(-f16_at(p + 2)), mins);
  return t;
}

// 8 blocks of a 32-weight format, lane i: the block at[i] (d and, q4_1 and q5_1, m in f16 first)
static inline __attribute__((always_inline)) struct tile block_heads(const int type, const uint8_t *const at[TILE]) {
  struct tile t = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int32_t first[TILE];  // each block's first 4 bytes
  for (int i = 0; i < TILE; i++) memcpy(&first[i], at[i], 4);
  const __m256i heads = _mm256_loadu_si256((const __m256i *)first);
  const __m256i halves = _mm256_permute4x64_epi64(  // [d of the 8 blocks, m of them]
      _mm256_packus_epi32(_mm256_and_si256(heads, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(heads, 16)), 0xD8);
  t.factor = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
  if (type == Q4_1 || type == Q5_1) t.constant = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
  if (type == Q4_0 || type == Q5_0) t.constant = _mm256_mul_ps(t.factor, _mm256_set1_ps(type == Q4_0 ? -8.0f : -16.0f));
  return t;
}

// 16 where bit e of `bits` is set, in byte e
static inline __m256i bit_sixteens(uint32_t bits) {
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),  // byte e: byte e / 8 of bits
                                             _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                              2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);  // byte e: bit e % 8
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(16));
}

// block j of the superblock at p (a 32-weight format: the block at p, j = 0) -> its 32 weights'
// integers in bytes, in order (the layout above)
static inline __attribute__((always_inline)) __m256i decode_block(const int type, const uint8_t *p, const int j) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if (type == Q6_K) {  // block j = 4 h + i: nibble i / 2 of ql[64 h + 32 (i % 2) ..], bits 2i of qh[32 h ..]
    const int h = j / 4, i = j % 4;
    const __m256i low = _mm256_and_si256(_mm256_srli_epi16(load32(p + 64 * h + 32 * (i % 2)), 4 * (i / 2)), low4);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(load32(p + 128 + 32 * h), 2 * i), _mm256_set1_epi8(3));
    return _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
  }
  if (type == Q4_K || type == Q5_K) {  // block j: nibble j % 2 of qs[32 (j / 2) ..]; q5_k: qh[32] before qs
    const __m256i qs = load32(p + (type == Q5_K ? 48 : 16) + 32 * (j / 2));
    const __m256i q = _mm256_and_si256(_mm256_srli_epi16(qs, 4 * (j % 2)), low4);
    if (type == Q4_K) return q;
    const __m256i bit = _mm256_and_si256(load32(p + 16), _mm256_set1_epi8((char)(1 << j)));  // + 16 where bit j of qh[e]
    return _mm256_or_si256(q, j < 4 ? _mm256_slli_epi16(bit, 4 - j) : _mm256_srli_epi16(bit, j - 4));
  }
  const uint8_t *b = p;  // d, [m], [qh], qs
  if (type == Q8_0) return load32(b + 2);
  const int has_min = type == Q4_1 || type == Q5_1, has_qh = type == Q5_0 || type == Q5_1;
  const __m128i bytes = _mm_loadu_si128((const __m128i *)(b + 2 + 2 * has_min + 4 * has_qh));  // weights e, e + 16 in byte e
  const __m256i qs = _mm256_broadcastsi128_si256(bytes);
  const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(qs, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), low4);
  if (!has_qh) return q;
  uint32_t qh;
  memcpy(&qh, b + 2 + 2 * has_min, 4);
  return _mm256_or_si256(q, bit_sixteens(qh));
}
#endif
