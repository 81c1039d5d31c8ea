// avx2_dequantize: rows of w [N, K] in `type` -> f32, as gguf.quants.dequantize (each weight f q + c
// of its decoded block, q6_k's d (sc (q - 32)): the products are exact, so one rounding, as
// gguf's): a prompt's weight strips for gemm.c on CPUs without AVX-512, and the rows `gather`
// looks up. A matrix in interleave.c's layout (type | INTERLEAVED) has each row put back in
// GGUF's first (deinterleave_row). Rows are split among the pool's threads.
#include "avx2_blocks.h"
#ifdef PYLLM_AVX2

// w [rows, K] in `type`, as GGUF stores it -> out [rows, K] (type constant where the caller makes it)
static inline __attribute__((always_inline)) void rows_of(const int type, const uint8_t *w, int rows, int K,
                                                          float *out) {
  const int blocks = K / 32;
  const size_t bytes = row_bytes(type, K);
  for (int n = 0; n < rows; n++)
    for (int b0 = 0; b0 < blocks; b0 += TILE) {  // a superblock, or 8 blocks of the row
      const uint8_t *p = w + (size_t)n * bytes + (size_t)(b0 / TILE) * row_bytes(type, 32 * TILE), *at[TILE];
      for (int i = 0; i < TILE; i++) at[i] = p + (size_t)(b0 + i < blocks ? i : blocks - 1 - b0) * row_bytes(type, 32);
      const struct tile head = group_blocks(type) == TILE ? superblock_head(type, p) : block_heads(type, at);
      float factor[TILE], constant[TILE];
      _mm256_storeu_ps(factor, head.factor), _mm256_storeu_ps(constant, head.constant);
      for (int j = 0; j < TILE && b0 + j < blocks; j++) {
        uint8_t q[32];
        const __m256i block = group_blocks(type) == TILE ? decode_block(type, p, j) : decode_block(type, at[j], 0);
        _mm256_storeu_si256((__m256i *)q, block);
        float *row = out + (size_t)n * K + 32 * (b0 + j);
        for (int i = 0; i < 4; i++) {  // 8 weights at a time: bytes -> int32 -> f32
          const __m128i eight = _mm_loadl_epi64((const __m128i *)(q + 8 * i));
          __m256i v = type == Q8_0 ? _mm256_cvtepi8_epi32(eight) : _mm256_cvtepu8_epi32(eight);
          if (type == Q6_K)
            v = _mm256_mullo_epi32(_mm256_sub_epi32(v, _mm256_set1_epi32(32)),
                                   _mm256_set1_epi32((int8_t)p[192 + 2 * j + i / 2]));  // a half's scale
          _mm256_storeu_ps(row + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(factor[j]),
                                                        _mm256_set1_ps(constant[j])));
        }
      }
    }
}

static void gguf_rows(int type, const uint8_t *w, int rows, int K, float *out) {
  switch (type) {
    case Q4_0: rows_of(Q4_0, w, rows, K, out); break;
    case Q4_1: rows_of(Q4_1, w, rows, K, out); break;
    case Q5_0: rows_of(Q5_0, w, rows, K, out); break;
    case Q5_1: rows_of(Q5_1, w, rows, K, out); break;
    case Q4_K: rows_of(Q4_K, w, rows, K, out); break;
    case Q5_K: rows_of(Q5_K, w, rows, K, out); break;
    case Q6_K: rows_of(Q6_K, w, rows, K, out); break;
    default: rows_of(Q8_0, w, rows, K, out);
  }
}

void avx2_dequantize_rows(int type, const uint8_t *w, int N, int K, int first, int count, const int32_t *picked,
                          float *out) {
  dequantize_matrix_rows_by(gguf_rows, type, w, N, K, first, count, picked, out);
}

static struct {  // the current avx2_dequantize call
  const uint8_t *w;
  const int32_t *picked;
  float *out;
  int type, N, K, count;
} dq;

static void dequantize_part(int part) {
  const int lo = (int)((long long)dq.count * part / pool_threads), hi = (int)((long long)dq.count * (part + 1) / pool_threads);
  avx2_dequantize_rows(dq.type, dq.w, dq.N, dq.K, lo, hi - lo, dq.picked ? dq.picked + lo : NULL,
                       dq.out + (size_t)lo * dq.K);
}

// rows picked[0 .. count - 1] of w [N, K] (picked NULL: rows 0 .. count - 1) -> out [count, K]
EXPORT void avx2_dequantize(int type, const uint8_t *w, int N, int K, const int32_t *picked, int count, float *out) {
  pool_lock();
  dq.w = w, dq.picked = picked, dq.out = out, dq.type = type, dq.N = N, dq.K = K, dq.count = count;
  pool_run_sized(dequantize_part, (size_t)count * K * sizeof(float));
  pool_unlock();
}
#endif
