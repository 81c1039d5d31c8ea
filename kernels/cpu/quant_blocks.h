// The 32-weight block formats (q4_0, q4_1, q5_0, q5_1, q8_0) decoded 16 blocks at a time into
// zmm registers, a block per lane, for quant.c's decode matmul. From GGUF's layout the blocks'
// bytes are loaded 16 (q8_0: 32) per block and transposed to one block per lane with vpermt2d and
// vshufi32x4; the f16 scales (and q5's high bits) come in a vpgatherdd each. From the interleaved
// layout (interleave.c), which holds a group already in that order, each vector is one load.
#pragma once
#include "cpu.h"
#ifdef __AVX512F__
static inline __m512 half_to_float(__m512i dwords) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dwords)); }

// f16 pairs in dwords -> *low, *high: f32 of each dword's low and high half (one vpermw apart)
static inline void halves_to_float(__m512i dwords, __m512 *low, __m512 *high) {
  const __m512i even_then_odd = _mm512_setr_epi32(  // words 0, 2, .. 30, then 1, 3, .. 31
      0x00020000, 0x00060004, 0x000A0008, 0x000E000C, 0x00120010, 0x00160014, 0x001A0018, 0x001E001C,
      0x00030001, 0x00070005, 0x000B0009, 0x000F000D, 0x00130011, 0x00170015, 0x001B0019, 0x001F001D);
  const __m512i words = _mm512_permutexvar_epi16(even_then_odd, dwords);
  *low = _mm512_cvtph_ps(_mm512_castsi512_si256(words));
  *high = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(words, 1));
}

// The blocks of a group: block j at w + lanes[j], or with lanes NULL at w + j * stride.
#define BLOCK(j) (lanes ? (size_t)lanes[j] : (size_t)(j) * stride)

static inline void transpose_4x16(const uint8_t *w, const int32_t *lanes, size_t stride, int count, __m512i G[4]) {
  // G[t] lane j = dword t of block j's 16 bytes at w (blocks past count: zero)
  __m512i Z[4];  // Z[a]: the 16 bytes of blocks 4a .. 4a + 3, one per 128-bit lane
  for (int a = 0; a < 4; a++) {
    __m128i r[4];
    for (int l = 0; l < 4; l++)
      r[l] = 4 * a + l < count ? _mm_loadu_si128((const __m128i *)(w + BLOCK(4 * a + l)))
                               : _mm_setzero_si128();
    Z[a] = _mm512_inserti32x4(_mm512_castsi128_si512(r[0]), r[1], 1);
    Z[a] = _mm512_inserti32x4(_mm512_inserti32x4(Z[a], r[2], 2), r[3], 3);
  }
  // pick[t'] (t' = 0, 1; +2 for t = 2, 3): lanes 0..7 dword t' of blocks 0..7, lanes 8..15 dword t' + 1
  const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i two = _mm512_set1_epi32(2);
  const __m512i a01 = _mm512_permutex2var_epi32(Z[0], pick, Z[1]), a23 = _mm512_permutex2var_epi32(Z[2], pick, Z[3]);
  const __m512i b01 = _mm512_permutex2var_epi32(Z[0], _mm512_add_epi32(pick, two), Z[1]);
  const __m512i b23 = _mm512_permutex2var_epi32(Z[2], _mm512_add_epi32(pick, two), Z[3]);
  G[0] = _mm512_shuffle_i32x4(a01, a23, 0x44), G[1] = _mm512_shuffle_i32x4(a01, a23, 0xEE);
  G[2] = _mm512_shuffle_i32x4(b01, b23, 0x44), G[3] = _mm512_shuffle_i32x4(b01, b23, 0xEE);
}

static inline void transpose_8x16(const uint8_t *w, const int32_t *lanes, size_t stride, int count, __m512i W[8]) {
  // W[k] lane j = dword k of block j's 32 bytes at w (blocks past count: zero)
  __m512i Z[8];  // Z[a]: blocks 2a, 2a + 1
  for (int a = 0; a < 8; a++) {
    __m256i r[2];
    for (int l = 0; l < 2; l++)
      r[l] = 2 * a + l < count ? _mm256_loadu_si256((const __m256i *)(w + BLOCK(2 * a + l)))
                               : _mm256_setzero_si256();
    Z[a] = _mm512_inserti64x4(_mm512_castsi256_si512(r[0]), r[1], 1);
  }
  // R[p][h] lane 4i + l = dword 4h + i of block 4p + l, from Z[2p] (l = 0, 1) and Z[2p + 1]
  const __m512i pick = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
  const __m512i four = _mm512_set1_epi32(4);
  for (int h = 0; h < 2; h++) {
    const __m512i index = h ? _mm512_add_epi32(pick, four) : pick;
    __m512i R[4], T[4];
    for (int p = 0; p < 4; p++) R[p] = _mm512_permutex2var_epi32(Z[2 * p], index, Z[2 * p + 1]);
    // a 4 x 4 transpose of 128-bit lanes: W[4h + i] = lane i of R[0], R[1], R[2], R[3]
    T[0] = _mm512_shuffle_i32x4(R[0], R[1], 0x44), T[1] = _mm512_shuffle_i32x4(R[0], R[1], 0xEE);
    T[2] = _mm512_shuffle_i32x4(R[2], R[3], 0x44), T[3] = _mm512_shuffle_i32x4(R[2], R[3], 0xEE);
    W[4 * h + 0] = _mm512_shuffle_i32x4(T[0], T[2], 0x88), W[4 * h + 1] = _mm512_shuffle_i32x4(T[0], T[2], 0xDD);
    W[4 * h + 2] = _mm512_shuffle_i32x4(T[1], T[3], 0x88), W[4 * h + 3] = _mm512_shuffle_i32x4(T[1], T[3], 0xDD);
  }
}

static inline __m512i gather_dwords(const uint8_t *w, const int32_t *lanes, size_t stride, int count) {
  // lane j: block j's 4 bytes at w
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i offsets = lanes ? _mm512_loadu_si512(lanes) : _mm512_mullo_epi32(iota, _mm512_set1_epi32((int)stride));
  const __mmask16 live = count >= QX_GROUP ? 0xFFFF : (__mmask16)((1u << count) - 1);
  return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, offsets, w, 1);
}

static inline void nibbles(const __m512i G[4], __m512i W[8]) {  // weights 0..15 in low nibbles, 16..31 high
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int t = 0; t < 4; t++) {
    W[t] = _mm512_and_si512(G[t], low);
#ifdef __GFNI__  // each byte >> 4 in one affine transform (bit i of the result = bit i + 4)
    W[4 + t] = _mm512_gf2p8affine_epi64_epi8(G[t], _mm512_set1_epi64(0x1020408000000000), 0);
#else
    W[4 + t] = _mm512_and_si512(_mm512_srli_epi32(G[t], 4), low);
#endif
  }
}

static inline void fifth_bits(__m512i qh, __m512i W[8]) {  // + 16 where bit e of the block's qh is set
  // vector u holds weights 4u..4u+3: bits 4(u % 2) .. + 3 of qh's byte u / 2, copied to the lane's
  // four bytes by vpshufb and tested one bit per byte
  const __m512i sixteen = _mm512_set1_epi8(16);
  const __m512i dword_bytes = _mm512_set4_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0);  // dword k: 4k in each byte
  const __m512i bits[2] = {_mm512_set1_epi32(0x08040201), _mm512_set1_epi32((int)0x80402010)};
  for (int u = 0; u < 8; u++) {
    const __m512i byte = _mm512_add_epi8(dword_bytes, _mm512_set1_epi8((char)(u / 2)));
    const __mmask64 set = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, byte), bits[u % 2]);
    W[u] = _mm512_mask_add_epi8(W[u], set, W[u], sixteen);
  }
}

// 16 blocks decoded: W[u] lane j = weights 4u..4u+3 of block j as stored (q4: 0..15, q5: 0..31,
// q8_0: signed), its f32 scale d and (q4_1, q5_1) min m per lane
struct block_group {
  __m512i W[8];
  __m512 d, m;
};

// the `count` blocks at w (lanes: as BLOCK; past count: zero) of a 32-weight format
static inline __attribute__((always_inline)) void decode_blocks32(const int type, const uint8_t *w, const int32_t *lanes,
                                                                  const int count, struct block_group *g) {
  const size_t stride = row_bytes(type, 32);
  __m512i G[4];
  switch (type) {
    case Q4_0:  // d, qs[16]
      transpose_4x16(w + 2, lanes, stride, count, G), nibbles(G, g->W);
      g->d = half_to_float(gather_dwords(w, lanes, stride, count));
      break;
    case Q4_1:  // d, m, qs[16]
      transpose_4x16(w + 4, lanes, stride, count, G), nibbles(G, g->W);
      halves_to_float(gather_dwords(w, lanes, stride, count), &g->d, &g->m);
      break;
    case Q5_0:  // d, qh (bit e: weight e's fifth bit), qs[16]
      transpose_4x16(w + 6, lanes, stride, count, G), nibbles(G, g->W);
      fifth_bits(gather_dwords(w + 2, lanes, stride, count), g->W);
      g->d = half_to_float(gather_dwords(w, lanes, stride, count));
      break;
    case Q5_1:  // d, m, qh, qs[16]
      transpose_4x16(w + 8, lanes, stride, count, G), nibbles(G, g->W);
      fifth_bits(gather_dwords(w + 4, lanes, stride, count), g->W);
      halves_to_float(gather_dwords(w, lanes, stride, count), &g->d, &g->m);
      break;
    default:  // Q8_0: d, qs[32] (int8)
      transpose_8x16(w + 2, lanes, stride, count, g->W);
      g->d = half_to_float(gather_dwords(w, lanes, stride, count));
  }
}

// the group of 16 blocks at w in the interleaved layout
static inline __attribute__((always_inline)) void decode_interleaved32(const int type, const uint8_t *w,
                                                                       struct block_group *g) {
  const struct interleaved_layout L = interleaved_layout(type);
  if (type == Q8_0) {
    for (int u = 0; u < 8; u++) g->W[u] = _mm512_loadu_si512(w + 64 * u);
  } else {
    __m512i G[4];
    for (int t = 0; t < 4; t++) G[t] = _mm512_loadu_si512(w + 64 * t);
    nibbles(G, g->W);
    if (L.qh >= 0) fifth_bits(_mm512_loadu_si512(w + L.qh), g->W);
  }
  g->d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + L.d)));
  if (L.m >= 0) g->m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + L.m)));
}
#endif
