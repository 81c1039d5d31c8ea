// The interleaved layout of the 32-weight formats (q4_0, q4_1, q5_0, q5_1, q8_0): each row's full
// groups of 16 blocks reordered so that quant_matmul loads a group's decoded vectors directly
// (quant_blocks.h: interleaved_layout) instead of transposing 16 blocks and gathering their
// scales at every decode step. The same bytes in another order: a row keeps its size, and its
// tail (K / 32 % 16 blocks) stays as GGUF stores it.
// interleave_rows reorders a matrix in place once, when the CPU backend takes a model's weights;
// dequantize_rows (dequantize.c) reads such rows through deinterleave_row.
#include "cpu.h"
#include "quant_blocks.h"
#ifdef __AVX512F__

static inline void move(uint8_t *block_at, uint8_t *group_at, int bytes, int to_interleaved) {
  if (to_interleaved)
    memcpy(group_at, block_at, bytes);
  else
    memcpy(block_at, group_at, bytes);
}

// one group: GGUF's 16 blocks at gguf <-> the interleaved layout at group, either way (to_interleaved)
static void move_group(int type, uint8_t *gguf, uint8_t *group, int to_interleaved) {
  const struct interleaved_layout L = interleaved_layout(type);
  const size_t stride = row_bytes(type, 32);
  for (int j = 0; j < QX_GROUP; j++) {
    uint8_t *block = gguf + j * stride;
    for (int t = 0; t < L.qs_bytes / 4; t++) move(block + L.qs + 4 * t, group + 64 * t + 4 * j, 4, to_interleaved);
    move(block, group + L.d + 2 * j, 2, to_interleaved);
    if (L.m >= 0) move(block + 2, group + L.m + 2 * j, 2, to_interleaved);
    if (L.qh >= 0) move(block + L.block_qh, group + L.qh + 4 * j, 4, to_interleaved);
  }
}

// w [N, row_bytes(type, K)] of a 32-weight format, GGUF's layout -> the interleaved one, in place
EXPORT void interleave_rows(int type, uint8_t *w, int N, int K) {
  const size_t group_bytes = QX_GROUP * row_bytes(type, 32), bytes = row_bytes(type, K);
  uint8_t gguf[QX_GROUP * 34];  // a group's blocks (q8_0's are the largest)
  for (size_t n = 0; n < (size_t)N; n++)
    for (int g = 0; g < K / 32 / QX_GROUP; g++) {
      uint8_t *group = w + n * bytes + g * group_bytes;
      memcpy(gguf, group, group_bytes);
      move_group(type, gguf, group, 1);
    }
}

// one interleaved row of K -> the same row in GGUF's layout at out [row_bytes(type, K)]
void deinterleave_row(int type, const uint8_t *row, int K, uint8_t *out) {
  const size_t group_bytes = QX_GROUP * row_bytes(type, 32), full = K / 32 / QX_GROUP;
  for (size_t g = 0; g < full; g++) move_group(type, out + g * group_bytes, (uint8_t *)row + g * group_bytes, 0);
  memcpy(out + full * group_bytes, row + full * group_bytes, row_bytes(type, K) - full * group_bytes);
}
#endif
