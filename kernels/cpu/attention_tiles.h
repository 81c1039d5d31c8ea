// attention.c's register tiles, for each instruction set (AVX-512: 16 lanes, AVX2: 8; lanes.h):
//   row_scores: one query row's scores against a chunk's keys (a decode unit's few rows): AVX-512
//     scores a block of 16 keys at a time, their 16 accumulators reduced together; AVX2 4 keys;
//   scores_tile: SCORE_KEYS keys against up to 3 x LANES query rows held transposed (a key is one
//     broadcast against LANES rows);
//   weigh: weights @ values for up to WEIGH_ROWS rows x weigh_columns(rows) columns, each value
//     row loaded once for the rows (weigh_values, written once in lanes.h's operations).
// Numerics: f32 with FMA. scores16 sums each lane's terms over d, then the 16 lanes as a tree;
// scores4 each lane's over d, then its 8 lanes pairwise; scores_t sums over d in order;
// weigh_values sums over the keys in order.
#pragma once
#include "lanes.h"
#ifdef __AVX512F__
#define CHUNK 64            // keys (and values) per chunk, 4 blocks: 2 x 16 KB at D = 64
#define SCORE_KEYS 8        // keys per scores_tile
#define WEIGH_ROWS 4        // rows per weigh
#define WEIGH_VECTORS 4     // columns per weigh, in vectors
static inline int weigh_columns(int rows) { return (void)rows, 64; }  // per weigh (4 vectors)
#elif defined(PYLLM_AVX2)
#define CHUNK 32            // keys (and values) per chunk, 2 blocks: 2 x 8 KB at D = 64, so a chunk, a
                            // unit's transposed queries and its weights stay in L1
#define SCORE_KEYS 4        // keys per scores_tile
#define WEIGH_ROWS 6        // rows per weigh
#define WEIGH_VECTORS 3     // columns per weigh at most, in vectors
// columns per weigh of `rows` rows: its rows x Z accumulators, Z values and a weight fit the 16
// registers (a prompt's 6 rows: 2 vectors; a decode step's few rows: 3)
static inline int weigh_columns(int rows) { return rows <= 3 ? 24 : 16; }
#endif
#if defined(__AVX512F__) || defined(PYLLM_AVX2)

// o [R rows, stride D] (Z x LANES columns from column d) += p [R, n] @ values [n, D] (value row j
// is row j % 16 of blocks[j / 16] [16, D]), p[r, j] at p[r * row_stride + j * key_stride]: R x Z
// accumulators, each value row loaded once for the R rows
static inline __attribute__((always_inline)) void weigh_values(const int R, const int Z, const float *p, int row_stride,
                                                               int key_stride, const float *const *blocks, int d, int D,
                                                               int n, float *o) {
  lanes_t acc[WEIGH_ROWS][WEIGH_VECTORS];
  for (int r = 0; r < R; r++)
    for (int z = 0; z < Z; z++) acc[r][z] = vload(o + (size_t)r * D + LANES * z);
  for (int b = 0; b * BLOCK_TOKENS < n; b++) {
    const float *values = blocks[b] + d;
    for (int j = b * BLOCK_TOKENS, end = n - j < BLOCK_TOKENS ? n : j + BLOCK_TOKENS; j < end; j++, values += D) {
      lanes_t v[WEIGH_VECTORS];
      for (int z = 0; z < Z; z++) {
        v[z] = vload(values + LANES * z);
        __asm__("" : "+x"(v[z]));  // in a register: FMAs that each reload it from L1 make loads the limit
      }
      for (int r = 0; r < R; r++) {
        const lanes_t weight = all(p[(size_t)r * row_stride + (size_t)j * key_stride]);
        for (int z = 0; z < Z; z++) acc[r][z] = fmadd(weight, v[z], acc[r][z]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int z = 0; z < Z; z++) vstore(o + (size_t)r * D + LANES * z, acc[r][z]);
}
#endif

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

// scores of q [D] against keys 0 .. seen - 1 of a chunk (blocks[j / 16] [16, D]) -> pr [seen
// rounded up to 16] (-inf past seen); returns their maximum
static inline __attribute__((always_inline)) float row_scores(const float *q, const float *const *blocks, int seen, int D, float *pr) {
  __m512 row_top = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < seen; j += BLOCK_TOKENS) {
    const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), lanes(seen - j), scores16(q, blocks[j / BLOCK_TOKENS], D));
    _mm512_storeu_ps(pr + j, s);
    row_top = _mm512_max_ps(row_top, s);
  }
  return _mm512_reduce_max_ps(row_top);
}

static inline __attribute__((always_inline)) void scores_tile(int V, const float *query_t, int rows_stride, const float *const *key, int D, float *s) {
  SCORES_T[V](query_t, rows_stride, key, D, s);
}

static inline void weigh(int R, int Z, const float *p, int row_stride, int key_stride, const float *const *blocks,
                         int d, int D, int n, float *o) {
  WEIGHS[R][Z](p, row_stride, key_stride, blocks, d, D, n, o);
}

#elif defined(PYLLM_AVX2)

// 4 keys' dot products with q [D] -> their 4 scores
static inline __m128 scores4(const float *q, const float *const key[4], int D) {
  __m256 a[4];
  for (int i = 0; i < 4; i++) a[i] = _mm256_setzero_ps();
  for (int d = 0; d < D; d += 8) {
    const __m256 x = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 4; i++) a[i] = _mm256_fmadd_ps(x, _mm256_loadu_ps(key[i] + d), a[i]);
  }
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// scores of q [D] against keys 0 .. seen - 1 of a chunk (blocks[j / 16] [16, D]) -> pr [seen
// rounded up to 4] (past seen: the scores of the block's next rows, whatever they hold); returns
// the maximum of the first seen
static inline __attribute__((always_inline)) float row_scores(const float *q, const float *const *blocks, int seen, int D, float *pr) {
  __m128 top = _mm_set1_ps(-INFINITY);
  for (int j = 0; j < seen; j += 4) {  // 4 keys of one block
    const float *first = blocks[j / BLOCK_TOKENS] + (size_t)(j % BLOCK_TOKENS) * D;
    const float *const key[4] = {first, first + D, first + 2 * D, first + 3 * D};
    const __m128 s = scores4(q, key, D);
    _mm_storeu_ps(pr + j, s);
    const __m128 visible = _mm_castsi128_ps(_mm_cmpgt_epi32(_mm_set1_epi32(seen - j), _mm_setr_epi32(0, 1, 2, 3)));
    top = _mm_max_ps(top, _mm_blendv_ps(_mm_set1_ps(-INFINITY), s, visible));
  }
  top = _mm_max_ps(top, _mm_movehl_ps(top, top));
  return _mm_cvtss_f32(_mm_max_ss(top, _mm_movehdup_ps(top)));
}

// scores [4 keys, V x 8 rows] of key[0 .. 3] [D] against V x 8 query rows held transposed,
// query_t [D, rows_stride]: 4 x V accumulators; per d, V loads (kept in registers) and 4 broadcasts
static inline __attribute__((always_inline)) void scores_t(const int V, const float *query_t, int rows_stride,
                                                           const float *const *key, int D, float *s) {
  __m256 acc[4][3];
  for (int j = 0; j < 4; j++)
    for (int v = 0; v < V; v++) acc[j][v] = _mm256_setzero_ps();
  for (int d = 0; d < D; d++) {
    __m256 q[3];
    for (int v = 0; v < V; v++) {
      q[v] = _mm256_loadu_ps(query_t + (size_t)d * rows_stride + 8 * v);
      __asm__("" : "+x"(q[v]));  // in a register: FMAs that each reload it from L1 made loads the limit
    }
    for (int j = 0; j < 4; j++) {
      const __m256 k = _mm256_broadcast_ss(key[j] + d);
      for (int v = 0; v < V; v++) acc[j][v] = _mm256_fmadd_ps(k, q[v], acc[j][v]);
    }
  }
  for (int j = 0; j < 4; j++)
    for (int v = 0; v < V; v++) _mm256_storeu_ps(s + (size_t)j * rows_stride + 8 * v, acc[j][v]);
}

static inline __attribute__((always_inline)) void scores_tile(int V, const float *query_t, int rows_stride, const float *const *key, int D, float *s) {
  switch (V) {
    case 1: scores_t(1, query_t, rows_stride, key, D, s); break;
    case 2: scores_t(2, query_t, rows_stride, key, D, s); break;
    default: scores_t(3, query_t, rows_stride, key, D, s);
  }
}

// weigh_values with R (1 .. WEIGH_ROWS) and Z (up to weigh_columns(R) / 8) as constants
static void weigh(int R, int Z, const float *p, int row_stride, int key_stride, const float *const *blocks, int d,
                  int D, int n, float *o) {
#define WEIGH_Z(r, z) weigh_values(r, z, p, row_stride, key_stride, blocks, d, D, n, o)
#define WEIGH_UP_TO_2(r) \
  if (Z == 1) WEIGH_Z(r, 1); \
  else WEIGH_Z(r, 2);
#define WEIGH_UP_TO_3(r) \
  if (Z < 3) { WEIGH_UP_TO_2(r) } \
  else WEIGH_Z(r, 3);
  switch (R) {
    case 1: WEIGH_UP_TO_3(1) break;
    case 2: WEIGH_UP_TO_3(2) break;
    case 3: WEIGH_UP_TO_3(3) break;
    case 4: WEIGH_UP_TO_2(4) break;
    case 5: WEIGH_UP_TO_2(5) break;
    default: WEIGH_UP_TO_2(6)
  }
#undef WEIGH_UP_TO_3
#undef WEIGH_UP_TO_2
#undef WEIGH_Z
}
#endif
