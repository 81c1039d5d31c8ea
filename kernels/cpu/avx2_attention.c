// attention.c's contract (cpu.h; the KV pool's layout and the causal rule are in attention.c's
// header) for CPUs with AVX2 but without AVX-512: every new token of every sequence of a step
// attends causally over its KV cache, in one call. D % 16 == 0.
// Work split: a unit is (sequence, KV head, up to TILE_ROWS / group consecutive new tokens); its
// rows, those tokens times the KV head's query heads, walk the sequence's keys in chunks of CHUNK
// (whole blocks), so each chunk's keys and values are read once for all of them. Threads take
// units from a shared counter, costliest first.
// Two layouts, as attention.c: a unit of few rows (a decode step's) scores one row against 4 keys
// at a time (4 dot products reduced together); a unit of many rows (a prompt's tile) holds its
// queries transposed, so a key is one broadcast against 8 rows in the vector lanes, and its
// softmax runs 8 rows at a time. Both weigh the values 4 rows at a time, each value row loaded
// once for the 4. The softmax is flash attention's, per chunk: a chunk that raises a row's
// maximum scales its sums so far by exp(old - new); the end divides by the total. Numerics: f32.
#include "cpu.h"
#if defined(PYLLM_AVX2) && !defined(__AVX512F__)
#define CHUNK 32      // keys (and values) per chunk, 2 blocks: 2 x 8 KB at D = 64
#define TILE_ROWS 48  // rows per unit: its transposed queries and sums (2 x 12 KB at D = 64), with a chunk, stay in L1/L2
_Static_assert(CHUNK % BLOCK_TOKENS == 0, "a chunk is whole blocks");

struct unit {
  int s, g, first, n;  // sequence, KV head, its first query (0 = the sequence's first new token), queries
  long cost;           // rows x keys seen by the last query
};

static struct {  // the current attention call
  const float *q, *k, *v;  // k, v: the KV pool
  const int32_t *const *tables;
  const int *length, *count;
  int *row;  // q's row of each sequence's first new token
  struct unit *units;
  float *out, scale;
  int S, H, KV, D, layer, layers, n_units;
  atomic_int next_unit;
} att;

static int costlier_first(const void *a, const void *b) {
  const long x = ((const struct unit *)a)->cost, y = ((const struct unit *)b)->cost;
  return (x < y) - (x > y);
}

// where row r of a unit lives in q and out [T, H, D]: query r / group, head g * group + r % group
static inline size_t unit_row(const struct unit *u, int r) {
  const int group = att.H / att.KV;
  return ((size_t)(att.row[u->s] + u->first + r / group) * att.H + u->g * group + r % group) * att.D;
}

// chunk c of the unit's keys_seen keys -> its keys n; keys[i], values[i]: its blocks [BLOCK_TOKENS, D]
static int chunk_blocks(const struct unit *u, int c, int keys_seen, const float **keys, const float **values) {
  const int32_t *table = att.tables[u->s];
  for (int b = c / BLOCK_TOKENS, i = 0; b * BLOCK_TOKENS < keys_seen && i < CHUNK / BLOCK_TOKENS; b++, i++) {
    keys[i] = att.k + kv_block(table[b], att.layers, att.layer, att.KV, u->g, att.D);
    values[i] = att.v + (keys[i] - att.k);
  }
  return keys_seen - c < CHUNK ? keys_seen - c : CHUNK;
}

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

// scores [4 keys, V x 8 rows] of key[0 .. 3] [D] against V x 8 query rows held transposed,
// query_t [D, rows_stride]: 4 x V accumulators; per d, V loads and 4 broadcasts
static inline __attribute__((always_inline)) void scores_t(const int V, const float *query_t, int rows_stride,
                                                           const float *const key[4], int D, float *s) {
  __m256 acc[4][3];
  for (int j = 0; j < 4; j++)
    for (int v = 0; v < V; v++) acc[j][v] = _mm256_setzero_ps();
  for (int d = 0; d < D; d++) {
    __m256 q[3];
    for (int v = 0; v < V; v++) q[v] = _mm256_loadu_ps(query_t + (size_t)d * rows_stride + 8 * v);
    for (int j = 0; j < 4; j++) {
      const __m256 k = _mm256_broadcast_ss(key[j] + d);
      for (int v = 0; v < V; v++) acc[j][v] = _mm256_fmadd_ps(k, q[v], acc[j][v]);
    }
  }
  for (int j = 0; j < 4; j++)
    for (int v = 0; v < V; v++) _mm256_storeu_ps(s + (size_t)j * rows_stride + 8 * v, acc[j][v]);
}

// o [R rows, stride D] (Z x 8 columns from column d) += p [R, n] @ values [n, D] (value row j is
// row j % 16 of blocks[j / 16]), p[r, j] at p[r * row_stride + j * key_stride]: R x Z accumulators,
// each value row loaded once for the R rows
static inline __attribute__((always_inline)) void weigh_values(const int R, const int Z, const float *p, int row_stride,
                                                               int key_stride, const float *const *blocks, int d, int D,
                                                               int n, float *o) {
  __m256 acc[4][3];
  for (int r = 0; r < R; r++)
    for (int z = 0; z < Z; z++) acc[r][z] = _mm256_loadu_ps(o + (size_t)r * D + 8 * z);
  for (int j = 0; j < n; j++) {
    const float *values = blocks[j / BLOCK_TOKENS] + (size_t)(j % BLOCK_TOKENS) * D + d;
    __m256 v[3];
    for (int z = 0; z < Z; z++) v[z] = _mm256_loadu_ps(values + 8 * z);
    for (int r = 0; r < R; r++) {
      const __m256 weight = _mm256_broadcast_ss(p + (size_t)r * row_stride + (size_t)j * key_stride);
      for (int z = 0; z < Z; z++) acc[r][z] = _mm256_fmadd_ps(weight, v[z], acc[r][z]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int z = 0; z < Z; z++) _mm256_storeu_ps(o + (size_t)r * D + 8 * z, acc[r][z]);
}

// weigh_values with R (1 .. 4) and Z (1 .. 3) as constants
static void weigh(int R, int Z, const float *p, int row_stride, int key_stride, const float *const *blocks, int d,
                  int n, float *o) {
  const int D = att.D;
#define WEIGH_Z(r) \
  switch (Z) { \
    case 1: weigh_values(r, 1, p, row_stride, key_stride, blocks, d, D, n, o); break; \
    case 2: weigh_values(r, 2, p, row_stride, key_stride, blocks, d, D, n, o); break; \
    default: weigh_values(r, 3, p, row_stride, key_stride, blocks, d, D, n, o); }
  switch (R) {
    case 1: WEIGH_Z(1) break;
    case 2: WEIGH_Z(2) break;
    case 3: WEIGH_Z(3) break;
    default: WEIGH_Z(4)
  }
#undef WEIGH_Z
}

// o [R, D] += the weights of chunk c (n keys; p[r, j] at p[r * row_stride + j * key_stride]) @ its
// values, 4 rows at a time, each group up to the keys its last (latest) row sees
static void weigh_chunk(const struct unit *u, const float *p, int row_stride, int key_stride,
                        const float *const *values, int first_position, int c, int n, float *o) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group;
  for (int r = 0; r < R; r += 4) {
    const int rows = R - r < 4 ? R - r : 4;
    int seen = first_position + (r + rows - 1) / group + 1 - c;
    seen = seen > n ? n : seen;
    if (seen <= 0) continue;
    for (int d = 0; d < D; d += 24)
      weigh(rows, D - d < 24 ? (D - d) / 8 : 3, p + (size_t)r * row_stride, row_stride, key_stride, values, d, seen,
            o + (size_t)r * D + d);
  }
}

// out rows of the unit = o / total
static void write_unit(const struct unit *u, const float *o, const float *total) {
  const int D = att.D, R = u->n * (att.H / att.KV);
  for (int r = 0; r < R; r++) {
    float *out = att.out + unit_row(u, r);
    const __m256 inverse = _mm256_set1_ps(1.0f / total[r]);
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_loadu_ps(o + (size_t)r * D + d), inverse));
  }
}

// A unit of few rows (a decode step's): scores row by row, 4 keys at a time (keys past the row's
// last scored as they are, then weighed 0). Scratch: R (2 D + CHUNK + 2) floats.
static void attend_few(const struct unit *u, float *scratch) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group;
  const int first_position = att.length[u->s] - att.count[u->s] + u->first;
  float *query = scratch, *o = query + (size_t)R * D, *p = o + (size_t)R * D;  // [R, D], [R, D], [R, CHUNK]
  float *top = p + (size_t)R * CHUNK, *total = top + R;                         // [R], [R]
  for (int r = 0; r < R; r++) {
    const float *q = att.q + unit_row(u, r);
    for (int d = 0; d < D; d += 8)
      _mm256_storeu_ps(query + (size_t)r * D + d, _mm256_mul_ps(_mm256_loadu_ps(q + d), _mm256_set1_ps(att.scale)));
    memset(o + (size_t)r * D, 0, sizeof(float) * D);
    top[r] = -INFINITY, total[r] = 0.0f;
  }
  const int keys_seen = first_position + u->n;  // by the last query
  for (int c = 0; c < keys_seen; c += CHUNK) {
    const float *keys[CHUNK / BLOCK_TOKENS], *values[CHUNK / BLOCK_TOKENS];
    const int n = chunk_blocks(u, c, keys_seen, keys, values);
    for (int r = 0; r < R; r++) {
      float *pr = p + (size_t)r * CHUNK;
      int seen = first_position + r / group + 1 - c;  // keys of this chunk row r sees
      seen = seen < 0 ? 0 : seen > n ? n : seen;
      memset(pr, 0, sizeof(float) * CHUNK);
      if (seen == 0) continue;
      for (int j = 0; j < seen; j += 4) {
        const float *key[4];
        for (int i = 0; i < 4; i++) key[i] = keys[(j + i) / BLOCK_TOKENS] + (size_t)((j + i) % BLOCK_TOKENS) * D;
        _mm_storeu_ps(pr + j, scores4(query + (size_t)r * D, key, D));
      }
      float chunk_top = pr[0];
      for (int j = 1; j < seen; j++) chunk_top = pr[j] > chunk_top ? pr[j] : chunk_top;
      const float new_top = chunk_top > top[r] ? chunk_top : top[r];
      const float rescale = expf(top[r] - new_top);  // 0 on the first chunk
      __m256 sum = _mm256_setzero_ps();
      for (int j = 0; j < seen; j += 8) {  // keys past `seen` weigh 0
        const __m256 e = _mm256_and_ps(_mm256_castsi256_ps(lanes8(seen - j)),
                                       exp256(_mm256_sub_ps(_mm256_loadu_ps(pr + j), _mm256_set1_ps(new_top))));
        _mm256_storeu_ps(pr + j, e);
        sum = _mm256_add_ps(sum, e);
      }
      total[r] = total[r] * rescale + sum8(sum), top[r] = new_top;
      if (rescale != 1.0f)
        for (int d = 0; d < D; d += 8)
          _mm256_storeu_ps(o + (size_t)r * D + d, _mm256_mul_ps(_mm256_loadu_ps(o + (size_t)r * D + d), _mm256_set1_ps(rescale)));
    }
    weigh_chunk(u, p, CHUNK, 1, values, first_position, c, n, o);
  }
  write_unit(u, o, total);
}

// A unit of many rows (a prompt's tile): the same chunked online softmax as attend_few, with the
// rows in the vector lanes: queries held transposed, scores and weights as [keys, rows], so a key
// is one broadcast against 8 rows (no reductions), and the softmax runs 8 rows at a time.
// Rows are padded to Rp (a multiple of 8) with zero queries that see every key.
// Scratch: Rp (2 D + CHUNK + 4) floats.
static void attend_many(const struct unit *u, float *scratch) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group, Rp = (R + 7) / 8 * 8, L = att.length[u->s];
  const int first_position = L - att.count[u->s] + u->first;
  float *query_t = scratch, *o = query_t + (size_t)Rp * D, *p = o + (size_t)Rp * D;  // [D, Rp], [Rp, D], [CHUNK, Rp]
  float *top = p + (size_t)CHUNK * Rp, *total = top + Rp, *rescale = total + Rp;     // [Rp] each
  int *position = (int *)(rescale + Rp);                                              // [Rp]
  for (int r = 0; r < Rp; r++) {
    const float *q = att.q + unit_row(u, r < R ? r : 0);
    for (int d = 0; d < D; d++) query_t[(size_t)d * Rp + r] = r < R ? q[d] * att.scale : 0.0f;
    memset(o + (size_t)r * D, 0, sizeof(float) * D);
    top[r] = -INFINITY, total[r] = 0.0f, position[r] = r < R ? first_position + r / group : L;
  }
  const int keys_seen = first_position + u->n;  // by the last query
  for (int c = 0; c < keys_seen; c += CHUNK) {
    const float *keys[CHUNK / BLOCK_TOKENS], *values[CHUNK / BLOCK_TOKENS];
    const int n = chunk_blocks(u, c, keys_seen, keys, values);
    for (int j = 0; j < n; j += 4) {  // past n, the last key stands in (masked below)
      const float *key[4];
      for (int i = 0; i < 4; i++) {
        const int at = j + i < n ? j + i : n - 1;
        key[i] = keys[at / BLOCK_TOKENS] + (size_t)(at % BLOCK_TOKENS) * D;
      }
      for (int v = 0; v < Rp / 8; v += 3) {
        float *s = p + (size_t)j * Rp + 8 * v;
        switch (Rp / 8 - v) {
          case 1: scores_t(1, query_t + 8 * v, Rp, key, D, s); break;
          case 2: scores_t(2, query_t + 8 * v, Rp, key, D, s); break;
          default: scores_t(3, query_t + 8 * v, Rp, key, D, s);
        }
      }
    }
    for (int v = 0; v < Rp; v += 8) {  // 8 rows at a time; rows are in position order
      const __m256i seen_until = _mm256_loadu_si256((const __m256i *)(position + v));  // a row sees keys up to its position
      const int all_see_chunk = position[v] >= c + n - 1;
      __m256 chunk_top = _mm256_set1_ps(-INFINITY);
      for (int j = 0; j < n; j++) {
        __m256 s = _mm256_loadu_ps(p + (size_t)j * Rp + v);
        if (!all_see_chunk)
          s = _mm256_blendv_ps(s, _mm256_set1_ps(-INFINITY),
                               _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(c + j), seen_until)));
        chunk_top = _mm256_max_ps(chunk_top, s);
      }
      const __m256 old_top = _mm256_loadu_ps(top + v), new_top = _mm256_max_ps(old_top, chunk_top);
      const __m256 factor = exp256(_mm256_sub_ps(old_top, new_top));  // old_top = -inf: ~0, and o, total are 0
      __m256 sum = _mm256_setzero_ps();
      for (int j = 0; j < n; j++) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + (size_t)j * Rp + v), new_top));
        if (!all_see_chunk)
          e = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(c + j), seen_until)), e);
        _mm256_storeu_ps(p + (size_t)j * Rp + v, e);
        sum = _mm256_add_ps(sum, e);
      }
      _mm256_storeu_ps(total + v, _mm256_fmadd_ps(_mm256_loadu_ps(total + v), factor, sum));
      _mm256_storeu_ps(top + v, new_top);
      _mm256_storeu_ps(rescale + v, factor);
    }
    for (int r = 0; r < R; r++)
      for (int d = 0; d < D; d += 8)
        _mm256_storeu_ps(o + (size_t)r * D + d, _mm256_mul_ps(_mm256_loadu_ps(o + (size_t)r * D + d), _mm256_set1_ps(rescale[r])));
    weigh_chunk(u, p, 1, Rp, values, first_position, c, n, o);
  }
  write_unit(u, o, total);
}

static void attention_part(int part) {
  (void)part;
  static __thread float *scratch;  // each thread's, kept between calls (a decode step makes one per layer)
  static __thread size_t scratch_floats;
  const int group = att.H / att.KV, rows = TILE_ROWS / group > 0 ? TILE_ROWS / group * group : group;
  const size_t floats = (size_t)(rows + 7) / 8 * 8 * (2 * att.D + CHUNK + 4);  // attend_few needs less
  if (floats > scratch_floats) {
    free(scratch);
    scratch = malloc(sizeof(float) * floats);
    if (scratch == NULL) abort();
    scratch_floats = floats;
  }
  for (int u; (u = atomic_fetch_add(&att.next_unit, 1)) < att.n_units;)
    (att.units[u].n * group >= 16 ? attend_many : attend_few)(&att.units[u], scratch);
}

// q [T, H, D] (rope applied), sequence s owning the next count[s] rows -> out [T, H, D]; keys and
// values: KV pool k, v [blocks, layers, KV, BLOCK_TOKENS, D], sequence s's first length[s]
// positions at layer `layer` through tables[s] (attention.c)
EXPORT void attention(int S, int H, int KV, int D, float scale, int layer, int layers, const float *q, const float *k,
                      const float *v, const int32_t *const *tables, const int *length, const int *count, float *out) {
  const int group = H / KV, tile = TILE_ROWS / group > 0 ? TILE_ROWS / group : 1;  // queries per unit
  int n_units = 0;
  for (int s = 0; s < S; s++) n_units += (count[s] + tile - 1) / tile * KV;
  struct unit *units = malloc(sizeof(struct unit) * (n_units > 0 ? n_units : 1));
  int *row = malloc(sizeof(int) * (S > 0 ? S : 1));
  if (units == NULL || row == NULL) abort();
  for (int s = 0, i = 0, next_row = 0; s < S; next_row += count[s++]) {
    row[s] = next_row;
    for (int first = 0; first < count[s]; first += tile)
      for (int g = 0; g < KV; g++) {
        const int n = count[s] - first < tile ? count[s] - first : tile;
        units[i++] = (struct unit){s, g, first, n, (long)n * (length[s] - count[s] + first + n)};
      }
  }
  qsort(units, n_units, sizeof(struct unit), costlier_first);
  pool_lock();
  att.q = q, att.k = k, att.v = v, att.tables = tables, att.length = length, att.count = count;
  att.row = row, att.units = units, att.n_units = n_units, att.out = out, att.scale = scale;
  att.S = S, att.H = H, att.KV = KV, att.D = D, att.layer = layer, att.layers = layers;
  atomic_store(&att.next_unit, 0);
  size_t cache_bytes = 0;  // the keys and values the call reads
  for (int s = 0; s < S; s++) cache_bytes += (size_t)length[s] * KV * D * 2 * sizeof(float);
  pool_run_sized(attention_part, cache_bytes);
  pool_unlock();
  free(units);
  free(row);
}
#endif
