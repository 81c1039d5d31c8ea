// Dequantization of GGML blocks to f32 rows, for a prompt's weight strips (matmul.c's quant_gemm),
// the embedding's looked-up rows and the tests: the 32-weight formats here, the K-quants in
// quant_k.c, the 16-bit formats in half.c.
#include "cpu.h"
#ifdef __AVX512F__
static inline float f16(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// dequantize_rows: w [rows, K] -> f32 [rows, K] as gguf.quants.dequantize computes it (bit-exact):
// q4_1's d q + m is two roundings, not an FMA (keep()).

static void dequantize_block32(int type, const uint8_t *b, float *out) {
  const __m512 d = _mm512_set1_ps(f16(b));
  if (type == Q8_0) {
    for (int h = 0; h < 2; h++) {
      const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2 + 16 * h)));
      _mm512_storeu_ps(out + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
    }
    return;
  }
  const int qs = type == Q4_0 ? 2 : type == Q4_1 ? 4 : type == Q5_0 ? 6 : 8;
  const __m128i bytes = _mm_loadu_si128((const __m128i *)(b + qs)), low = _mm_set1_epi8(0x0F);
  __m512i q[2] = {_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low)),
                  _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low))};
  if (type == Q5_0 || type == Q5_1) {
    uint32_t qh;
    memcpy(&qh, b + (type == Q5_0 ? 2 : 4), 4);
    for (int h = 0; h < 2; h++)  // qh's bits are the mask
      q[h] = _mm512_mask_add_epi32(q[h], (__mmask16)(qh >> 16 * h), q[h], _mm512_set1_epi32(16));
  }
  for (int h = 0; h < 2; h++) {
    __m512 v;
    if (type == Q4_1 || type == Q5_1)
      v = _mm512_add_ps(keep(_mm512_mul_ps(d, _mm512_cvtepi32_ps(q[h]))), _mm512_set1_ps(f16(b + 2)));
    else
      v = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(q[h], _mm512_set1_epi32(type == Q4_0 ? 8 : 16))));
    _mm512_storeu_ps(out + 16 * h, v);
  }
}

void dequantize_rows(int type, const uint8_t *w, int rows, int K, float *out) {
  if (type == F16 || type == BF16) {
    dequantize_rows_half(type, (const uint16_t *)w, rows, K, out);
    return;
  }
  if (type == Q4_K || type == Q5_K || type == Q6_K) {
    dequantize_rows_k(type, w, rows, K, out);
    return;
  }
  const size_t stride = row_bytes(type, 32), blocks = (size_t)rows * (K / 32);
  for (size_t b = 0; b < blocks; b++) dequantize_block32(type, w + b * stride, out + b * 32);
}

// rows first .. first + count - 1 of a matrix w [N, K] (picked NULL), or rows picked[0 .. count - 1],
// -> f32 [count, K]; type | INTERLEAVED: a matrix in that layout (interleave.c), each row put back
// in GGUF's layout first
void dequantize_matrix_rows(int type, const uint8_t *w, int N, int K, int first, int count, const int32_t *picked,
                            float *out) {
  dequantize_matrix_rows_by(dequantize_rows, type, w, N, K, first, count, picked, out);
}

EXPORT void dequantize(int type, const uint8_t *w, int rows, int K, float *out) {  // the whole matrix [rows, K]
  dequantize_matrix_rows(type, w, rows, K, 0, rows, NULL, out);
}

EXPORT void dequantize_picked(int type, const uint8_t *w, int N, int K, const int32_t *rows, int count, float *out) {
  dequantize_matrix_rows(type, w, N, K, 0, count, rows, out);
}
#endif
