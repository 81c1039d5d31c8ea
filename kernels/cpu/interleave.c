// The interleaved layout of the 32-weight formats (q4_0, q4_1, q5_0, q5_1, q8_0): a matrix's rows
// taken 16 at a time (a row group), and in each row group the 16 rows' block b (one per row) put
// side by side as one group (cpu.h: interleaved_layout, lane j = row j of the row group),
// so that quant_matmul (16 rows a vector) and avx2_interleaved.c (8) load a group's decoded vectors
// directly and each lane's sum is its own row's dot product: no transposes, gathers, row tails or
// horizontal sums in a decode step.
// The same bytes in another order: row group r holds the bytes of rows 16r .. 16r + 15, its
// groups in block order; rows past the last full row group (N % 16) stay as GGUF stores them.
// interleave_rows reorders a matrix in place once, when the CPU backend takes a model's weights;
// dequantize.c and avx2_dequantize.c read such a matrix's rows through deinterleave_row.
#include "cpu.h"
#if defined(__AVX512F__) || defined(PYLLM_AVX2)

static inline void move(uint8_t *block_at, uint8_t *group_at, int bytes, int to_interleaved) {
  if (to_interleaved)
    memcpy(group_at, block_at, bytes);
  else
    memcpy(block_at, group_at, bytes);
}

// one GGUF block at `block` <-> lane j of the interleaved group at `group`, either way (to_interleaved)
static void move_lane(int type, uint8_t *block, uint8_t *group, int j, int to_interleaved) {
  const struct interleaved_layout L = interleaved_layout(type);
  for (int t = 0; t < L.qs_bytes / 4; t++) move(block + L.qs + 4 * t, group + 64 * t + 4 * j, 4, to_interleaved);
  move(block, group + L.d + 2 * j, 2, to_interleaved);
  if (L.m >= 0) move(block + 2, group + L.m + 2 * j, 2, to_interleaved);
  if (L.qh >= 0) move(block + L.block_qh, group + L.qh + 4 * j, 4, to_interleaved);
}

// w [N, row_bytes(type, K)] of a 32-weight format, GGUF's layout -> the interleaved one, in place
EXPORT void interleave_rows(int type, uint8_t *w, int N, int K) {
  const size_t stride = row_bytes(type, 32), bytes = row_bytes(type, K), group_bytes = ROW_GROUP * stride;
  uint8_t *rows = malloc(ROW_GROUP * bytes);  // a row group as GGUF holds it
  if (rows == NULL) abort();
  for (size_t n0 = 0; n0 + ROW_GROUP <= (size_t)N; n0 += ROW_GROUP) {
    uint8_t *row_group = w + n0 * bytes;
    memcpy(rows, row_group, ROW_GROUP * bytes);
    for (int b = 0; b < K / 32; b++)
      for (int j = 0; j < ROW_GROUP; j++) move_lane(type, rows + j * bytes + b * stride, row_group + b * group_bytes, j, 1);
  }
  free(rows);
}

// rows first .. first + count - 1 of a matrix w [N, K] (picked NULL), or rows picked[0 .. count - 1],
// -> f32 [count, K] by rows_f32 (contiguous rows as GGUF stores them -> f32: each instruction set's
// dequantizer); type | INTERLEAVED: a matrix in that layout, each row put back in GGUF's first
void dequantize_matrix_rows_by(void (*rows_f32)(int type, const uint8_t *w, int rows, int K, float *out), int type,
                               const uint8_t *w, int N, int K, int first, int count, const int32_t *picked,
                               float *out) {
  const int interleaved = type & INTERLEAVED;
  const size_t bytes = row_bytes(type, K);
  type &= ~INTERLEAVED;
  if (!interleaved && picked == NULL) {
    rows_f32(type, w + (size_t)first * bytes, count, K, out);
    return;
  }
  uint8_t *gguf = interleaved ? malloc(bytes) : NULL;  // a row put back in GGUF's layout
  if (interleaved && gguf == NULL) abort();
  for (int i = 0; i < count; i++) {
    const int n = picked ? picked[i] : first + i;
    if (interleaved) deinterleave_row(type, w, N, K, n, gguf);
    rows_f32(type, interleaved ? gguf : w + (size_t)n * bytes, 1, K, out + (size_t)i * K);
  }
  free(gguf);
}

// row n of an interleaved matrix w [N, K] -> that row in GGUF's layout at out [row_bytes(type, K)]
void deinterleave_row(int type, const uint8_t *w, int N, int K, int n, uint8_t *out) {
  const size_t stride = row_bytes(type, 32), bytes = row_bytes(type, K), group_bytes = ROW_GROUP * stride;
  if (n >= N / ROW_GROUP * ROW_GROUP) {
    memcpy(out, w + (size_t)n * bytes, bytes);
    return;
  }
  uint8_t *row_group = (uint8_t *)w + (size_t)(n - n % ROW_GROUP) * bytes;
  for (int b = 0; b < K / 32; b++) move_lane(type, out + b * stride, row_group + b * group_bytes, n % ROW_GROUP, 0);
}
#endif
