// attention: the new tokens of every sequence in a step attend causally over their KV caches, in
// one call (a decode step: one token each; a prompt: many; or a mix).
// q [T, H, D] (rope applied), sequence s owning the next count[s] rows -> out [T, H, D]. Sequence s
// reads layer `layer` of k[s], v[s] [layers, KV, capacity[s], D], its first length[s] rows (the new
// tokens' included): new token i sits at position length[s] - count[s] + i and sees keys 0 .. that.
// Query head h uses KV head h / (H / KV), as HF's repeat_kv. D % 16 == 0.
// Work split: a unit is (sequence, KV head, tile of consecutive queries); its rows, the tile's
// queries times the KV head's query heads (about TILE_ROWS), share each chunk of CHUNK keys and
// values while it is in L1. Threads take units from a shared counter, costliest first.
// Two layouts: a unit of few rows (a decode step's) scores one row against 16 keys at a time,
// their 16 accumulators reduced together; a unit of many rows (a prompt's tile) holds its queries
// transposed, so a key is one broadcast against 16 rows in the vector lanes.
// Numerics: f32. A score is the dot product of the scaled query and a key. The softmax is online,
// as in flash attention: a row keeps its running maximum and total, a chunk that raises the
// maximum rescales the row's sums so far by exp(old - new), so exp never sees a positive
// argument; the end divides by the total.
#include "cpu.h"
#ifdef __AVX512F__
#define CHUNK 64      // keys (and values) per chunk: 2 x 16 KB at D = 64
#define TILE_ROWS 48  // rows per unit: its scores, queries and sums (3 x 12 KB at D = 64) stay in L1/L2

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

// o [R rows, stride D] (16 Z columns) += p [R, n] @ values [n, D] (same columns), p[r, j] at
// p[r * row_stride + j * key_stride]: R x Z accumulators, each value row loaded once for the R rows
static inline __attribute__((always_inline)) void weigh_values(const int R, const int Z, const float *p, int row_stride,
                                                               int key_stride, const float *values, int D, int n, float *o) {
  __m512 acc[4][4];
  for (int r = 0; r < R; r++)
    for (int z = 0; z < Z; z++) acc[r][z] = _mm512_loadu_ps(o + (size_t)r * D + 16 * z);
  for (int j = 0; j < n; j++) {
    __m512 v[4];
    for (int z = 0; z < Z; z++) v[z] = _mm512_loadu_ps(values + (size_t)j * D + 16 * z);
    for (int r = 0; r < R; r++) {
      const __m512 weight = _mm512_set1_ps(p[r * row_stride + j * key_stride]);
      for (int z = 0; z < Z; z++) acc[r][z] = _mm512_fmadd_ps(weight, v[z], acc[r][z]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int z = 0; z < Z; z++) _mm512_storeu_ps(o + (size_t)r * D + 16 * z, acc[r][z]);
}
typedef void (*weigh_fn)(const float *p, int row_stride, int key_stride, const float *values, int D, int n, float *o);
#define WEIGH(R, Z) \
  static void weigh_##R##_##Z(const float *p, int row_stride, int key_stride, const float *values, int D, int n, \
                              float *o) { weigh_values(R, Z, p, row_stride, key_stride, values, D, n, o); }
WEIGH(1, 1) WEIGH(1, 2) WEIGH(1, 3) WEIGH(1, 4) WEIGH(2, 1) WEIGH(2, 2) WEIGH(2, 3) WEIGH(2, 4)
WEIGH(3, 1) WEIGH(3, 2) WEIGH(3, 3) WEIGH(3, 4) WEIGH(4, 1) WEIGH(4, 2) WEIGH(4, 3) WEIGH(4, 4)
static const weigh_fn WEIGHS[5][5] = {{0}, {0, weigh_1_1, weigh_1_2, weigh_1_3, weigh_1_4},
                                      {0, weigh_2_1, weigh_2_2, weigh_2_3, weigh_2_4},
                                      {0, weigh_3_1, weigh_3_2, weigh_3_3, weigh_3_4},
                                      {0, weigh_4_1, weigh_4_2, weigh_4_3, weigh_4_4}};

struct unit {
  int s, g, first, n;  // sequence, KV head, its first query (0 = the sequence's first new token), queries
  long cost;           // rows x keys seen by the last query
};

static struct {  // the current attention call
  const float *q, *const *k, *const *v;
  const int *length, *capacity, *count;
  int *row;  // q's row of each sequence's first new token
  struct unit *units;
  float *out, scale;
  int S, H, KV, D, layer, n_units;
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

// o [R, D] += the weights of chunk c (n keys; p[r, j] at p[r * row_stride + j * key_stride]) @ its values,
// 4 rows at a time, each group up to the keys its last (latest) row sees
static void weigh_chunk(const struct unit *u, const float *p, int row_stride, int key_stride, const float *values,
                        int first_position, int c, int n, float *o) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group;
  for (int r = 0; r < R; r += 4) {
    const int rows = R - r < 4 ? R - r : 4;
    int seen = first_position + (r + rows - 1) / group + 1 - c;
    seen = seen > n ? n : seen;
    if (seen <= 0) continue;
    for (int d = 0; d < D; d += 64)
      WEIGHS[rows][D - d < 64 ? (D - d) / 16 : 4](p + (size_t)r * row_stride, row_stride, key_stride,
                                                  values + (size_t)c * D + d, D, seen, o + (size_t)r * D + d);
  }
}

// out rows of the unit = o / total
static void write_unit(const struct unit *u, const float *o, const float *total) {
  const int D = att.D, R = u->n * (att.H / att.KV);
  for (int r = 0; r < R; r++) {
    float *out = att.out + unit_row(u, r);
    const __m512 inverse = _mm512_set1_ps(1.0f / total[r]);
    for (int d = 0; d < D; d += 16) _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_loadu_ps(o + (size_t)r * D + d), inverse));
  }
}

// A unit of few rows (a decode step's): scores row by row, 16 keys at a time. Rows are query-major
// (row r: query r / group, head g * group + r % group), so the rows a weigh_values call takes
// together see nearly the same keys. Scratch: 3 R (D or CHUNK) + 2 R + 16 D floats.
static void attend_few(const struct unit *u, float *scratch) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group, L = att.length[u->s];
  const int first_position = L - att.count[u->s] + u->first;
  const size_t head = ((size_t)att.layer * att.KV + u->g) * att.capacity[u->s] * D;
  const float *keys = att.k[u->s] + head, *values = att.v[u->s] + head;  // [L, D] each
  float *query = scratch, *o = query + (size_t)R * D, *p = o + (size_t)R * D;  // [R, D], [R, D], [R, CHUNK]
  float *top = p + (size_t)R * CHUNK, *total = top + R, *padded = total + R;    // [R], [R], [16, D]
  for (int r = 0; r < R; r++) {
    const float *q = att.q + unit_row(u, r);
    for (int d = 0; d < D; d += 16)
      _mm512_storeu_ps(query + (size_t)r * D + d, _mm512_mul_ps(_mm512_loadu_ps(q + d), _mm512_set1_ps(att.scale)));
    memset(o + (size_t)r * D, 0, sizeof(float) * D);
    top[r] = -INFINITY, total[r] = 0.0f;
  }
  const int keys_seen = first_position + u->n;  // by the last query
  for (int c = 0; c < keys_seen; c += CHUNK) {
    const int n = keys_seen - c < CHUNK ? keys_seen - c : CHUNK;
    const int last_block = (n - 1) / 16 * 16;  // past the cache's end, its keys come from `padded`
    const int pad = c + last_block + 16 > L;
    if (pad) {
      memset(padded, 0, sizeof(float) * 16 * D);
      memcpy(padded, keys + (size_t)(c + last_block) * D, sizeof(float) * (L - c - last_block) * D);
    }
    for (int r = 0; r < R; r++) {
      float *pr = p + (size_t)r * CHUNK;
      int seen = first_position + r / group + 1 - c;  // keys of this chunk row r sees
      seen = seen < 0 ? 0 : seen > n ? n : seen;
      __m512 row_top = _mm512_set1_ps(-INFINITY);
      for (int j = 0; j < seen; j += 16) {
        const float *block = pad && j == last_block ? padded : keys + (size_t)(c + j) * D;
        const __mmask16 visible = seen - j >= 16 ? 0xFFFF : (__mmask16)((1u << (seen - j)) - 1);
        const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), visible, scores16(query + (size_t)r * D, block, D));
        _mm512_storeu_ps(pr + j, s);
        row_top = _mm512_max_ps(row_top, s);
      }
      const float chunk_top = _mm512_reduce_max_ps(row_top);
      if (seen == 0 || chunk_top == -INFINITY) {  // nothing visible here (or only -inf scores)
        memset(pr, 0, sizeof(float) * CHUNK);
        continue;
      }
      const float new_top = chunk_top > top[r] ? chunk_top : top[r];
      const float rescale = expf(top[r] - new_top);  // 0 on the first chunk
      __m512 sum = _mm512_setzero_ps();
      for (int j = 0; j < CHUNK; j += 16) {
        const __mmask16 visible = j >= seen ? 0 : seen - j >= 16 ? 0xFFFF : (__mmask16)((1u << (seen - j)) - 1);
        const __m512 e = _mm512_maskz_mov_ps(visible, exp512(_mm512_sub_ps(_mm512_loadu_ps(pr + j), _mm512_set1_ps(new_top))));
        _mm512_storeu_ps(pr + j, e);
        sum = _mm512_add_ps(sum, e);
      }
      total[r] = total[r] * rescale + _mm512_reduce_add_ps(sum);
      if (rescale != 1.0f)
        for (int d = 0; d < D; d += 16)
          _mm512_storeu_ps(o + (size_t)r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + (size_t)r * D + d), _mm512_set1_ps(rescale)));
      top[r] = new_top;
    }
    weigh_chunk(u, p, CHUNK, 1, values, first_position, c, n, o);
  }
  write_unit(u, o, total);
}

// scores [keys, 16 V rows] of 8 keys (rows key[0 .. 7] of `keys`) against 16 V query rows held
// transposed, query_t [D, rows_stride]: 8 x V accumulators; per d, V loads and 8 broadcasts
static inline __attribute__((always_inline)) void scores_t(const int V, const float *query_t, int rows_stride,
                                                           const float *keys, const int *key, int D, float *s) {
  __m512 acc[8][3];
  for (int j = 0; j < 8; j++)
    for (int v = 0; v < V; v++) acc[j][v] = _mm512_setzero_ps();
  for (int d = 0; d < D; d++) {
    __m512 q[3];
    for (int v = 0; v < V; v++) q[v] = _mm512_loadu_ps(query_t + (size_t)d * rows_stride + 16 * v);
    for (int j = 0; j < 8; j++) {
      const __m512 k = _mm512_set1_ps(keys[(size_t)key[j] * D + d]);
      for (int v = 0; v < V; v++) acc[j][v] = _mm512_fmadd_ps(k, q[v], acc[j][v]);
    }
  }
  for (int j = 0; j < 8; j++)
    for (int v = 0; v < V; v++) _mm512_storeu_ps(s + (size_t)j * rows_stride + 16 * v, acc[j][v]);
}
typedef void (*scores_fn)(const float *query_t, int rows_stride, const float *keys, const int *key, int D, float *s);
#define SCORES(V) \
  static void scores_##V(const float *query_t, int rows_stride, const float *keys, const int *key, int D, float *s) { \
    scores_t(V, query_t, rows_stride, keys, key, D, s); }
SCORES(1) SCORES(2) SCORES(3)
static const scores_fn SCORES_T[4] = {0, scores_1, scores_2, scores_3};

// A unit of many rows (a prompt's tile): the same chunked online softmax as attend_few, with the
// rows in the vector lanes: queries held transposed, scores and weights as [keys, rows], so a key
// is one broadcast against 16 rows (no reductions), and the softmax runs 16 rows at a time.
// Rows are padded to Rp (a multiple of 16) with zero queries that see every key.
// Scratch: Rp (2 D + CHUNK + 4) floats.
static void attend_many(const struct unit *u, float *scratch) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group, Rp = (R + 15) / 16 * 16, L = att.length[u->s];
  const int first_position = L - att.count[u->s] + u->first;
  const size_t head = ((size_t)att.layer * att.KV + u->g) * att.capacity[u->s] * D;
  const float *keys = att.k[u->s] + head, *values = att.v[u->s] + head;  // [L, D] each
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
    const int n = keys_seen - c < CHUNK ? keys_seen - c : CHUNK;
    for (int j = 0; j < n; j += 8) {  // past n, the last key stands in (masked below)
      int key[8];
      for (int i = 0; i < 8; i++) key[i] = c + (j + i < n ? j + i : n - 1);
      for (int v = 0; v < Rp / 16; v += 3)
        SCORES_T[Rp / 16 - v < 3 ? Rp / 16 - v : 3](query_t + 16 * v, Rp, keys, key, D, p + (size_t)j * Rp + 16 * v);
    }
    for (int v = 0; v < Rp; v += 16) {  // 16 rows at a time
      const __m512i seen_until = _mm512_loadu_si512(position + v);  // a row sees keys up to its position
      const int all_see_chunk = _mm512_reduce_min_epi32(seen_until) >= c + n - 1;
      __m512 chunk_top = _mm512_set1_ps(-INFINITY);
      for (int j = 0; j < n; j++) {
        const __mmask16 visible = all_see_chunk ? 0xFFFF : _mm512_cmp_epi32_mask(_mm512_set1_epi32(c + j), seen_until, _MM_CMPINT_LE);
        chunk_top = _mm512_mask_max_ps(chunk_top, visible, chunk_top, _mm512_loadu_ps(p + (size_t)j * Rp + v));
      }
      const __m512 old_top = _mm512_loadu_ps(top + v), new_top = _mm512_max_ps(old_top, chunk_top);
      const __m512 factor = exp512(_mm512_sub_ps(old_top, new_top));  // old_top = -inf: ~0, and o, total are 0
      __m512 sum = _mm512_setzero_ps();
      for (int j = 0; j < n; j++) {
        const __mmask16 visible = all_see_chunk ? 0xFFFF : _mm512_cmp_epi32_mask(_mm512_set1_epi32(c + j), seen_until, _MM_CMPINT_LE);
        const __m512 e = _mm512_maskz_mov_ps(visible, exp512(_mm512_sub_ps(_mm512_loadu_ps(p + (size_t)j * Rp + v), new_top)));
        _mm512_storeu_ps(p + (size_t)j * Rp + v, e);
        sum = _mm512_add_ps(sum, e);
      }
      _mm512_storeu_ps(total + v, _mm512_fmadd_ps(_mm512_loadu_ps(total + v), factor, sum));
      _mm512_storeu_ps(top + v, new_top);
      _mm512_storeu_ps(rescale + v, factor);
    }
    for (int r = 0; r < R; r++)
      for (int d = 0; d < D; d += 16)
        _mm512_storeu_ps(o + (size_t)r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + (size_t)r * D + d), _mm512_set1_ps(rescale[r])));
    weigh_chunk(u, p, 1, Rp, values, first_position, c, n, o);
  }
  write_unit(u, o, total);
}

static void attention_part(int part) {
  (void)part;
  static __thread float *scratch;  // each thread's, kept between calls (a decode step makes one per layer)
  static __thread size_t scratch_floats;
  const int group = att.H / att.KV, rows = TILE_ROWS / group > 0 ? TILE_ROWS / group * group : group;
  const size_t padded = (size_t)(rows + 15) / 16 * 16;  // attend_few needs less than attend_many
  const size_t floats = padded * (2 * att.D + CHUNK + 4) + 16 * (size_t)att.D;
  if (floats > scratch_floats) {
    free(scratch);
    scratch = malloc(sizeof(float) * floats);
    if (scratch == NULL) abort();
    scratch_floats = floats;
  }
  for (int u; (u = atomic_fetch_add(&att.next_unit, 1)) < att.n_units;)
    (att.units[u].n * group >= 16 ? attend_many : attend_few)(&att.units[u], scratch);
}

EXPORT void attention(int S, int H, int KV, int D, float scale, int layer, const float *q, const float *const *k,
               const float *const *v, const int *length, const int *capacity, const int *count, float *out) {
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
  att.q = q, att.k = k, att.v = v, att.length = length, att.capacity = capacity, att.count = count;
  att.row = row, att.units = units, att.n_units = n_units, att.out = out, att.scale = scale;
  att.S = S, att.H = H, att.KV = KV, att.D = D, att.layer = layer;
  atomic_store(&att.next_unit, 0);
  size_t cache_bytes = 0;  // the keys and values the call reads
  for (int s = 0; s < S; s++) cache_bytes += (size_t)length[s] * KV * D * 2 * sizeof(float);
  pool_run_sized(attention_part, cache_bytes);
  pool_unlock();
  free(units);
  free(row);
}
#endif
