// attention.c's register tiles: one query row's scores against a block of 16 keys (their 16
// accumulators reduced together), 16 V query rows held transposed against 8 keys (a key is one
// broadcast against 16 rows), and weights @ values for up to 4 rows x 64 columns, the value rows
// read block by block (BLOCK_TOKENS rows of a KV pool's block each).
// Numerics: f32 with FMA. scores16 sums each lane's terms over d, then the 16 lanes as a tree;
// scores_t sums over d in order; weigh_values sums over the keys in order.
#pragma once
#include "cpu.h"
#ifdef __AVX512F__
// lane j = the sum of a[j]'s 16 lanes: halves, then quarters, then pairs within quarters, then the
// lane order put right (45 operations, where 16 separate reductions take ~130)
static inline __attribute__((always_inline)) __m512 sum16(const __m512 a[16]) {
  __m512 half[8], quarter[4], pair[2];
  for (int i = 0; i < 8; i++)  // half[i]: a[2i] in lanes 0-7, a[2i+1] in 8-15, each folded to 8
    half[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                            _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++)  // quarter[i]: 128-bit lane c holds a[4i + c] folded to 4
    quarter[i] = _mm512_add_ps(_mm512_shuffle_f32x4(half[2 * i], half[2 * i + 1], 0x88),
                               _mm512_shuffle_f32x4(half[2 * i], half[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++)  // pair[i], lane c: a[8i + c] in two partial sums, then a[8i + 4 + c]
    pair[i] = _mm512_add_ps(_mm512_shuffle_ps(quarter[2 * i], quarter[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_ps(quarter[2 * i], quarter[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4c + i now holds key c + 4i
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(pair[0], pair[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(pair[0], pair[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), sums);
}

// scores of one query row q [D] against 16 keys [16, D]
static inline __attribute__((always_inline)) __m512 scores16(const float *q, const float *keys, int D) {
  __m512 a[16];
  for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 16) {
    const __m512 qd = _mm512_loadu_ps(q + d);
    for (int j = 0; j < 16; j++) a[j] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(keys + (size_t)j * D + d), a[j]);
  }
  return sum16(a);
}

// o [R rows, stride D] (16 Z columns) += p [R, n] @ values [n, D] (the same columns, from column d;
// value row j is row j % 16 of blocks[j / 16] [16, D]), p[r, j] at p[r * row_stride + j * key_stride]:
// R x Z accumulators, each value row loaded once for the R rows
static inline __attribute__((always_inline)) void weigh_values(const int R, const int Z, const float *p, int row_stride,
                                                               int key_stride, const float *const *blocks, int d, int D,
                                                               int n, float *o) {
  __m512 acc[4][4];
  for (int r = 0; r < R; r++)
    for (int z = 0; z < Z; z++) acc[r][z] = _mm512_loadu_ps(o + (size_t)r * D + 16 * z);
  for (int b = 0; b * BLOCK_TOKENS < n; b++) {
    const float *values = blocks[b] + d;
    for (int j = b * BLOCK_TOKENS, end = n - j < BLOCK_TOKENS ? n : j + BLOCK_TOKENS; j < end; j++, values += D) {
      __m512 v[4];
      for (int z = 0; z < Z; z++) v[z] = _mm512_loadu_ps(values + 16 * z);
      for (int r = 0; r < R; r++) {
        const __m512 weight = _mm512_set1_ps(p[r * row_stride + j * key_stride]);
        for (int z = 0; z < Z; z++) acc[r][z] = _mm512_fmadd_ps(weight, v[z], acc[r][z]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int z = 0; z < Z; z++) _mm512_storeu_ps(o + (size_t)r * D + 16 * z, acc[r][z]);
}
typedef void (*weigh_fn)(const float *p, int row_stride, int key_stride, const float *const *blocks, int d, int D,
                         int n, float *o);
#define WEIGH(R, Z) \
  static void weigh_##R##_##Z(const float *p, int row_stride, int key_stride, const float *const *blocks, int d, \
                              int D, int n, float *o) { weigh_values(R, Z, p, row_stride, key_stride, blocks, d, D, n, o); }
WEIGH(1, 1) WEIGH(1, 2) WEIGH(1, 3) WEIGH(1, 4) WEIGH(2, 1) WEIGH(2, 2) WEIGH(2, 3) WEIGH(2, 4)
WEIGH(3, 1) WEIGH(3, 2) WEIGH(3, 3) WEIGH(3, 4) WEIGH(4, 1) WEIGH(4, 2) WEIGH(4, 3) WEIGH(4, 4)
static const weigh_fn WEIGHS[5][5] = {{0}, {0, weigh_1_1, weigh_1_2, weigh_1_3, weigh_1_4},
                                      {0, weigh_2_1, weigh_2_2, weigh_2_3, weigh_2_4},
                                      {0, weigh_3_1, weigh_3_2, weigh_3_3, weigh_3_4},
                                      {0, weigh_4_1, weigh_4_2, weigh_4_3, weigh_4_4}};

// scores [keys, 16 V rows] of 8 keys (key[0 .. 7] [D]) against 16 V query rows held transposed,
// query_t [D, rows_stride]: 8 x V accumulators; per d, V loads and 8 broadcasts
static inline __attribute__((always_inline)) void scores_t(const int V, const float *query_t, int rows_stride,
                                                           const float *const *key, int D, float *s) {
  __m512 acc[8][3];
  for (int j = 0; j < 8; j++)
    for (int v = 0; v < V; v++) acc[j][v] = _mm512_setzero_ps();
  for (int d = 0; d < D; d++) {
    __m512 q[3];
    for (int v = 0; v < V; v++) q[v] = _mm512_loadu_ps(query_t + (size_t)d * rows_stride + 16 * v);
    for (int j = 0; j < 8; j++) {
      const __m512 k = _mm512_set1_ps(key[j][d]);
      for (int v = 0; v < V; v++) acc[j][v] = _mm512_fmadd_ps(k, q[v], acc[j][v]);
    }
  }
  for (int j = 0; j < 8; j++)
    for (int v = 0; v < V; v++) _mm512_storeu_ps(s + (size_t)j * rows_stride + 16 * v, acc[j][v]);
}
typedef void (*scores_fn)(const float *query_t, int rows_stride, const float *const *key, int D, float *s);
#define SCORES(V) \
  static void scores_##V(const float *query_t, int rows_stride, const float *const *key, int D, float *s) { \
    scores_t(V, query_t, rows_stride, key, D, s); }
SCORES(1) SCORES(2) SCORES(3)
static const scores_fn SCORES_T[4] = {0, scores_1, scores_2, scores_3};
#endif
