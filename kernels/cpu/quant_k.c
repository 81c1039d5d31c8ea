// quant_matmul and dequantize_rows for the K-quants (see quant.c for the call, xq and the
// 32-weight formats): superblocks of 256 weights, as 8 blocks of 32 with their own scales
// (q6_k: 16 of 16). A group of xq (16 blocks of 32) is two superblocks, lanes 0..7 the first.
//   q4_k: d, dmin (f16), scales[12] (8 6-bit scales and mins), qs[128]: weight = d sc q - dmin m,
//         block s's q in the low (s even) or high nibbles of qs[32 (s / 2) ..] (144 bytes)
//   q5_k: d, dmin, scales[12], qh[32] (bit s of qh[e]: weight e of block s's fifth bit), qs[128] (176)
//   q6_k: ql[128], qh[64], scales[16] (int8), d: weight = d sc (q - 32), q 6 bits (210 bytes)
// No Q8_K activations: xq's per-32 blocks carry d and the sums of their halves, which is what the
// per-32 (q6_k: per-16) scales and mins need.
#include "cpu.h"
#ifdef __AVX512F__
#define PREFETCH_BYTES 4096  // as quant.c

// Decode, per group: the superblocks' values -> W[8] u8 in xq's layout (vector u, lane j:
// weights 4u..4u+3 of block j), picked out of the loaded bytes with vpermt2d (lane j needs one
// dword of its superblock), nibbles by a per-lane shift; per-lane f32 scales. Two vpermt2d and a
// blend per vector bound q4_k at M = 1 (40 GB/s from L3 where q4_1 streams at 51).
// q4_k / q5_k: lane j = block s = j % 8 of superblock j / 8: dword 8 (s / 2) + u of its qs, nibble s % 2.
static inline void qs_nibbles(const uint8_t *qs, size_t stride, const int count, __m512i W[8]) {
  const __m512i a0 = _mm512_loadu_si512(qs), b0 = _mm512_loadu_si512(qs + 64);  // blocks 0..3, 4..7
  const __m512i a1 = count > 1 ? _mm512_loadu_si512(qs + stride) : _mm512_setzero_si512();
  const __m512i b1 = count > 1 ? _mm512_loadu_si512(qs + stride + 64) : _mm512_setzero_si512();
  const __m512i base = _mm512_setr_epi32(0, 0, 8, 8, 0, 0, 8, 8, 16, 16, 24, 24, 16, 16, 24, 24);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  for (int u = 0; u < 8; u++) {
    const __m512i index = _mm512_add_epi32(base, _mm512_set1_epi32(u));
    const __m512i d = _mm512_mask_blend_epi32(0xF0F0, _mm512_permutex2var_epi32(a0, index, a1),
                                              _mm512_permutex2var_epi32(b0, index, b1));
    W[u] = _mm512_and_si512(_mm512_srlv_epi32(d, shifts), _mm512_set1_epi8(0x0F));
  }
}

// q4_k / q5_k's d sc and -dmin m per lane from the 16-byte headers (d, dmin, 6-bit scales s[12]):
// sc j < 4: s[j] & 63, j >= 4: s[j + 4] & 15 | s[j - 4] >> 6 << 4; m j < 4: s[j + 4] & 63,
// j >= 4: s[j + 4] >> 4 | s[j] >> 6 << 4 -- by vpshufb, both superblocks at once (128-bit lanes)
static inline void scales_mins(const uint8_t *w, size_t stride, const int count, __m512 *dw, __m512 *mw) {
  const __m128i second = count > 1 ? _mm_loadu_si128((const __m128i *)(w + stride)) : _mm_setzero_si128();
  const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)w)), second, 1);
  const char Z = (char)0x80;  // vpshufb: zero
  const __m256i low = _mm256_shuffle_epi8(v, _mm256_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, Z, Z, Z, Z,
                                                              4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, Z, Z, Z, Z));
  const __m256i mask = _mm256_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0,
                                        63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0);
  const __m256i high_nibble = _mm256_shuffle_epi8(_mm256_srli_epi16(v, 4), _mm256_setr_epi8(
      Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, 12, 13, 14, 15, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, 12, 13, 14, 15));
  const __m256i top = _mm256_shuffle_epi8(v, _mm256_setr_epi8(Z, Z, Z, Z, 4, 5, 6, 7, Z, Z, Z, Z, 8, 9, 10, 11,
                                                              Z, Z, Z, Z, 4, 5, 6, 7, Z, Z, Z, Z, 8, 9, 10, 11));
  const __m256i nibble = _mm256_set1_epi8(0x0F), two_bits = _mm256_set1_epi8((char)0xC0);
  const __m256i r = _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(low, mask), _mm256_and_si256(high_nibble, nibble)),
                                    _mm256_srli_epi16(_mm256_and_si256(top, two_bits), 2));
  // r, per superblock: sc[8], m[8] -> [sc of both, m of both]
  const __m256i sorted = _mm256_permute4x64_epi64(r, 0xD8);
  const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(sorted)));
  const __m512 m = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(sorted, 1)));
  const __m256i d_words = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 8, 8, 8, 8, 8);  // d of each superblock
  const __m512 d = _mm512_cvtph_ps(_mm256_permutexvar_epi16(d_words, v));
  const __m512 dmin = _mm512_cvtph_ps(_mm256_permutexvar_epi16(_mm256_add_epi16(d_words, _mm256_set1_epi16(1)), v));
  *dw = _mm512_mul_ps(d, sc);
  *mw = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), dmin), m);
}

// q5_k: + 16 where bit s of qh[4u + i] is set (lane j: block s = j % 8)
static inline void q5k_fifth_bits(const uint8_t *qh, size_t stride, const int count, __m512i W[8]) {
  const __m256i second = count > 1 ? _mm256_loadu_si256((const __m256i *)(qh + stride)) : _mm256_setzero_si256();
  const __m512i h = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)qh)), second, 1);
  const __m512i base = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 8, 8, 8, 8, 8);
  const __m512i bit = _mm512_setr_epi32(0x01010101, 0x02020202, 0x04040404, 0x08080808, 0x10101010, 0x20202020,
                                        0x40404040, (int)0x80808080, 0x01010101, 0x02020202, 0x04040404, 0x08080808,
                                        0x10101010, 0x20202020, 0x40404040, (int)0x80808080);
  for (int u = 0; u < 8; u++) {
    const __m512i dwords = _mm512_permutexvar_epi32(_mm512_add_epi32(base, _mm512_set1_epi32(u)), h);
    const __mmask64 set = _mm512_test_epi8_mask(dwords, bit);
    W[u] = _mm512_mask_add_epi8(W[u], set, W[u], _mm512_set1_epi8(16));
  }
}

// q6_k: lane j = block b = j % 8 (H = b / 4, g = b % 4) of superblock j / 8: low 4 bits in dword
// 16 H + 8 (g % 2) + u of ql, nibble g / 2; high 2 in dword 8 H + u of qh, bits 2g, 2g + 1.
// The scales: lane j's first half (u 0..3) scales[2b], its second scales[2b + 1].
static inline void q6k_decode(const uint8_t *w, size_t stride, const int count, __m512i W[8], __m512 *dw0,
                              __m512 *dw1) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i a0 = _mm512_loadu_si512(w), b0 = _mm512_loadu_si512(w + 64), h0 = _mm512_loadu_si512(w + 128);
  const __m512i a1 = count > 1 ? _mm512_loadu_si512(w + stride) : zero;
  const __m512i b1 = count > 1 ? _mm512_loadu_si512(w + stride + 64) : zero;
  const __m512i h1 = count > 1 ? _mm512_loadu_si512(w + stride + 128) : zero;
  const __m512i low_base = _mm512_setr_epi32(0, 8, 0, 8, 0, 8, 0, 8, 16, 24, 16, 24, 16, 24, 16, 24);
  const __m512i high_base = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
  const __m512i nibble_shift = _mm512_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4);
  const __m512i high_shift = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
  for (int u = 0; u < 8; u++) {
    const __m512i du = _mm512_set1_epi32(u);
    const __m512i index = _mm512_add_epi32(low_base, du);
    const __m512i low = _mm512_mask_blend_epi32(0xF0F0, _mm512_permutex2var_epi32(a0, index, a1),
                                                _mm512_permutex2var_epi32(b0, index, b1));
    const __m512i high = _mm512_permutex2var_epi32(h0, _mm512_add_epi32(high_base, du), h1);
    // low nibble | (two high bits << 4): vpternlogd A | (B & C)
    const __m512i nibbles = _mm512_and_si512(_mm512_srlv_epi32(low, nibble_shift), _mm512_set1_epi8(0x0F));
    const __m512i tops = _mm512_slli_epi32(_mm512_srlv_epi32(high, high_shift), 4);
    W[u] = _mm512_ternarylogic_epi32(nibbles, tops, _mm512_set1_epi8(0x30), 0xF8);
  }
  // scales: per superblock [even bytes, odd bytes] -> [evens of both, odds of both]
  const __m128i second = count > 1 ? _mm_loadu_si128((const __m128i *)(w + stride + 192)) : _mm_setzero_si128();
  const __m256i s = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(w + 192))), second, 1);
  const __m256i even_odd = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i sorted = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(s, even_odd), 0xD8);
  uint16_t d0, d1 = 0;
  memcpy(&d0, w + 208, 2);
  if (count > 1) memcpy(&d1, w + stride + 208, 2);
  const __m512 d = _mm512_cvtph_ps(_mm256_mask_blend_epi16(0xFF00, _mm256_set1_epi16((short)d0),
                                                            _mm256_set1_epi16((short)d1)));
  *dw0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(sorted))));
  *dw1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(sorted, 1))));
}

// The activation side, as quant.c's (per row m: vpdpbusd per weight vector, then f32).
// q4_k / q5_k: d sc dx sum(q xq) - dmin m dx sum(xq) per block.

// q6_k: dx (d sc0 (sum(q xq) - 32 sum(xq)) over the first half + the same over the second, sc1).
static inline __attribute__((always_inline)) void rows_times_halves(const __m512i W[8], __m512 dw0, __m512 dw1, int M,
                                                                    const uint8_t *x, __m512 *acc) {
  for (int m = 0; m < M; m++, x += QX_RECORD) {
    __m512i s0, s1;
    xq_dots(W, x, &s0, &s1);
    s0 = _mm512_sub_epi32(s0, _mm512_slli_epi32(_mm512_loadu_si512(x + QX_SUM_LO), 5));
    s1 = _mm512_sub_epi32(s1, _mm512_slli_epi32(_mm512_loadu_si512(x + QX_SUM_HI), 5));
    const __m512 halves = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), dw1, _mm512_mul_ps(_mm512_cvtepi32_ps(s0), dw0));
    acc[m] = _mm512_fmadd_ps(halves, _mm512_loadu_ps((const float *)(x + QX_D)), acc[m]);
  }
}

// One group: the superblock at w and (count 2) the one at w + stride, against M rows of xq at x.
static inline __attribute__((always_inline)) void group_k(const int type, const uint8_t *w, const size_t stride,
                                                          const int count, int M, const uint8_t *x, __m512 *acc) {
  __m512i W[8];
  __m512 dw, mw;
  switch (type) {
    case Q4_K:
      qs_nibbles(w + 16, stride, count, W), scales_mins(w, stride, count, &dw, &mw);
      rows_times_min(W, dw, mw, M, x, acc);
      break;
    case Q5_K:
      qs_nibbles(w + 48, stride, count, W), q5k_fifth_bits(w + 16, stride, count, W);
      scales_mins(w, stride, count, &dw, &mw);
      rows_times_min(W, dw, mw, M, x, acc);
      break;
    default:  // Q6_K
      q6k_decode(w, stride, count, W, &dw, &mw);
      rows_times_halves(W, dw, mw, M, x, acc);
  }
}

// A thread's weight rows, as quant.c's rows32_m: groups of two superblocks; when K / 256 is odd,
// the rows' last superblocks two to a group (lanes 0..7 row r, 8..15 row r + 1) against c->tail.
static inline __attribute__((always_inline)) void rows_k_m(const int type, const int M, const struct quant_call *c,
                                                           int lo, int hi) {
  const int supers = c->K / 256, strip = c->strip, per = quant_tail_rows(supers % 2 * 8);
  const size_t stride = type == Q4_K ? 144 : type == Q5_K ? 176 : 210, bytes = stride * supers;
  for (int n0 = lo; n0 < hi; n0 += QUANT_STRIP) {
    const int rows = hi - n0 < QUANT_STRIP ? hi - n0 : QUANT_STRIP;
    const uint8_t *w = c->w + (size_t)n0 * bytes;
    __m512 acc[QUANT_STRIP][MAX_QUANT_ROWS];
    for (int r = 0; r < rows; r++)
      for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    for (int s = 0; s < rows; s += strip)
      for (int g = 0; g < supers / 2; g++)
        for (int r = s; r < s + strip && r < rows; r++) {
          const uint8_t *b = w + r * bytes + 2 * g * stride;
          for (size_t line = 0; line < 2 * stride; line += 64)
            _mm_prefetch((const char *)b + PREFETCH_BYTES / strip + line, _MM_HINT_T0);
          group_k(type, b, stride, 2, M, c->xq + (size_t)g * M * QX_RECORD, acc[r]);
        }
    for (int r = 0; r < rows && per; r += per) {
      const int n = rows - r < per ? rows - r : per;
      __m512 sums[MAX_QUANT_ROWS];
      for (int m = 0; m < M; m++) sums[m] = _mm512_setzero_ps();
      group_k(type, w + r * bytes + (supers - 1) * stride, bytes, n, M, c->tail, sums);
      for (int i = 0; i < n; i++) quant_add_tail(M, sums, 8 * i, 8, acc[r + i]);
    }
    quant_store(c, n0, rows, acc);
  }
}

static inline __attribute__((always_inline)) void rows_k(const int type, const struct quant_call *c, int lo, int hi) {
  if (c->M == 1)
    rows_k_m(type, 1, c, lo, hi);
  else if (c->M == 2)  // one row in two layers
    rows_k_m(type, 2, c, lo, hi);
  else
    rows_k_m(type, c->M, c, lo, hi);
}

static void rows_q4_k(const struct quant_call *c, int lo, int hi) { rows_k(Q4_K, c, lo, hi); }
static void rows_q5_k(const struct quant_call *c, int lo, int hi) { rows_k(Q5_K, c, lo, hi); }
static void rows_q6_k(const struct quant_call *c, int lo, int hi) { rows_k(Q6_K, c, lo, hi); }

void quant_rows_k(const struct quant_call *c, int lo, int hi) {
  switch (c->type) {
    case Q4_K: rows_q4_k(c, lo, hi); break;
    case Q5_K: rows_q5_k(c, lo, hi); break;
    default: rows_q6_k(c, lo, hi);
  }
}

// dequantize_rows_k: bit-exact to gguf.quants (sub-block scale d sc and min dmin m rounded to f32
// first, then (d sc) q - (dmin m) in two roundings: keep() blocks FMA contraction)

static inline float f16(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

static void dequantize_q45k(int type, const uint8_t *b, float *out) {
  const float d = f16(b), dmin = f16(b + 2);
  const uint8_t *s = b + 4, *qh = b + 16, *qs = b + (type == Q5_K ? 48 : 16);
  uint8_t sc[8], mn[8];
  for (int j = 0; j < 4; j++) {
    sc[j] = s[j] & 63, mn[j] = s[j + 4] & 63;
    sc[j + 4] = (uint8_t)((s[j + 8] & 15) | (s[j] >> 6) << 4);
    mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | (s[j + 4] >> 6) << 4);
  }
  const __m128i nibble = _mm_set1_epi8(0x0F);
  for (int sub = 0; sub < 8; sub++) {
    const __m512 scale = _mm512_set1_ps(d * (float)sc[sub]), min = _mm512_set1_ps(dmin * (float)mn[sub]);
    for (int h = 0; h < 2; h++) {
      const __m128i bytes = _mm_loadu_si128((const __m128i *)(qs + 32 * (sub / 2) + 16 * h));
      __m512i q = _mm512_cvtepu8_epi32(_mm_and_si128(sub % 2 ? _mm_srli_epi16(bytes, 4) : bytes, nibble));
      if (type == Q5_K) {
        const __m128i bits = _mm_loadu_si128((const __m128i *)(qh + 16 * h));
        const __mmask16 set = _mm_test_epi8_mask(bits, _mm_set1_epi8((char)(1 << sub)));
        q = _mm512_mask_add_epi32(q, set, q, _mm512_set1_epi32(16));
      }
      _mm512_storeu_ps(out + 32 * sub + 16 * h, _mm512_sub_ps(keep(_mm512_mul_ps(scale, _mm512_cvtepi32_ps(q))), min));
    }
  }
}

static void dequantize_q6k(const uint8_t *b, float *out) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t *sc = (const int8_t *)(b + 192);
  const float d = f16(b + 208);
  const __m128i nibble = _mm_set1_epi8(0x0F), two = _mm_set1_epi8(3);
  for (int H = 0; H < 2; H++)
    for (int g = 0; g < 4; g++)
      for (int h = 0; h < 2; h++) {
        const __m128i bytes = _mm_loadu_si128((const __m128i *)(ql + 64 * H + 32 * (g % 2) + 16 * h));
        const __m128i low = _mm_and_si128(g / 2 ? _mm_srli_epi16(bytes, 4) : bytes, nibble);
        const __m128i high = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(qh + 32 * H + 16 * h)),
                                                         _mm_cvtsi32_si128(2 * g)), two);
        const __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_or_si128(low, _mm_slli_epi16(high, 4))),
                                           _mm512_set1_epi32(32));
        _mm512_storeu_ps(out + 128 * H + 32 * g + 16 * h,
                         _mm512_mul_ps(_mm512_set1_ps(d * (float)sc[8 * H + 2 * g + h]), _mm512_cvtepi32_ps(q)));
      }
}

void dequantize_rows_k(int type, const uint8_t *w, int rows, int K, float *out) {
  const size_t stride = row_bytes(type, 256), supers = (size_t)rows * (K / 256);
  for (size_t b = 0; b < supers; b++)
    if (type == Q6_K)
      dequantize_q6k(w + b * stride, out + b * 256);
    else
      dequantize_q45k(type, w + b * stride, out + b * 256);
}
#endif
