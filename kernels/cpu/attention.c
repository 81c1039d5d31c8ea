// attention: the new tokens of every sequence in a step attend causally over their KV caches, in
// one call (a decode step: one token each; a prompt: many; or a mix).
// q [T, H, D] (rope applied), sequence s owning the next count[s] rows -> out [T, H, D]. The keys
// and values are a KV pool's k, v [blocks, layers, KV, BLOCK_TOKENS, D] (pyllm/kv_blocks.py):
// sequence s reads its first length[s] positions (the new tokens' included) at layer `layer`,
// position p in block tables[s][p / BLOCK_TOKENS], row p % BLOCK_TOKENS. Blocks come in any order
// and may be shared by several sequences (all read-only here). New token i sits at position
// length[s] - count[s] + i and sees keys 0 .. that. Query head h uses KV head h / (H / KV), as
// HF's repeat_kv. D % 16 == 0.
// Written once for AVX-512 (16 lanes) and AVX2 (8 lanes) in lanes.h's operations.
// Work split: units of (sequence, KV head, tile of queries[, segment of keys]), planned by
// attention_units.h; threads take them from a shared counter, costliest first, and the call ends
// by merging a split unit's segments (merge_segments).
// Two layouts: a unit of few rows (a decode step's) scores one row against a chunk's keys at a
// time (row_scores); a unit of many rows (a prompt's tile) holds its queries transposed, so a key
// is one broadcast against LANES rows in the vector lanes (scores_tile).
// Numerics: f32. A score is the dot product of the scaled query and a key. The softmax is online,
// as in flash attention: a row keeps its running maximum and total, a chunk that raises the
// maximum rescales the row's sums so far by exp(old - new), so exp never sees a positive
// argument; the end divides by the total. A split unit's segments each run it over their keys, and
// the merge rescales each segment's sums by exp(its maximum - the largest) before adding them.
#include "cpu.h"
#include "attention_tiles.h"
#include "attention_units.h"
#if defined(__AVX512F__) || defined(PYLLM_AVX2)
_Static_assert(BLOCK_TOKENS == 16 && CHUNK % BLOCK_TOKENS == 0,
               "a chunk is whole blocks (row_scores reads a block at a time)");
#define PREFETCH_FLOATS 512  // a touch per 2 KB of the next chunk's blocks (chunk_blocks)

static struct {  // the current attention call
  const float *q, *k, *v;  // k, v: the KV pool
  const int32_t *const *tables;
  const int *length, *count;
  int *row;  // q's row of each sequence's first new token
  struct unit *units;
  float *segment_sums;  // [segments, FEW_ROWS, D + 2]: per row of a segment its o [D], maximum, total
  float *out, scale;
  int S, H, KV, D, layer, layers, n_units;
  atomic_int next_unit;
} att;

// where row r of a unit lives in q and out [T, H, D]: query r / group, head g * group + r % group
static inline size_t unit_row(const struct unit *u, int r) {
  const int group = att.H / att.KV;
  return ((size_t)(att.row[u->s] + u->first + r / group) * att.H + u->g * group + r % group) * att.D;
}

// chunk c of the unit's keys (c .. to - 1) -> its keys n; keys, values = its blocks [BLOCK_TOKENS, D] at
// the layer and KV head. The next chunk's blocks are touched every PREFETCH_FLOATS (into L2): that
// starts the L2 streamer on each of them while this chunk is worked, which otherwise stops at
// every block's end (blocks lie apart) and restarts only on the next block's first misses.
static int chunk_blocks(const struct unit *u, int c, int to, const float **keys, const float **values) {
  const int32_t *table = att.tables[u->s];
  const int end = to - c < 2 * CHUNK ? to : c + 2 * CHUNK;
  for (int b = c / BLOCK_TOKENS, i = 0; b * BLOCK_TOKENS < end; b++, i++) {
    const float *k = att.k + kv_block(table[b], att.layers, att.layer, att.KV, u->g, att.D);
    const float *v = att.v + (k - att.k);
    if (i < CHUNK / BLOCK_TOKENS) {
      keys[i] = k, values[i] = v;
      continue;
    }
    for (int f = 0; f < BLOCK_TOKENS * att.D; f += PREFETCH_FLOATS)
      _mm_prefetch((const char *)(k + f), _MM_HINT_T1), _mm_prefetch((const char *)(v + f), _MM_HINT_T1);
  }
  return to - c < CHUNK ? to - c : CHUNK;
}

// o [R, D] += the weights of chunk c (n keys; p[r, j] at p[r * row_stride + j * key_stride]) @ its
// values (chunk_blocks'), 4 rows at a time, each group up to the keys its last (latest) row sees
static void weigh_chunk(const struct unit *u, const float *p, int row_stride, int key_stride,
                        const float *const *values, int first_position, int c, int n, float *o) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group;
  for (int r = 0; r < R; r += WEIGH_ROWS) {
    const int rows = R - r < WEIGH_ROWS ? R - r : WEIGH_ROWS;
    int seen = first_position + (r + rows - 1) / group + 1 - c;
    seen = seen > n ? n : seen;
    if (seen <= 0) continue;
    for (int d = 0, columns = weigh_columns(rows); d < D; d += columns)
      weigh(rows, D - d < columns ? (D - d) / LANES : columns / LANES, p + (size_t)r * row_stride,
            row_stride, key_stride, values, d, D, seen, o + (size_t)r * D + d);
  }
}

// out rows of the unit = o / total
static void write_unit(const struct unit *u, const float *o, const float *total) {
  const int D = att.D, R = u->n * (att.H / att.KV);
  for (int r = 0; r < R; r++) {
    float *out = att.out + unit_row(u, r);
    const lanes_t inverse = all(1.0f / total[r]);
    for (int d = 0; d < D; d += LANES) vstore(out + d, mul(vload(o + (size_t)r * D + d), inverse));
  }
}

// A unit of few rows (a decode step's): scores row by row (keys past the row's last scored as they
// are, then masked). Rows are query-major (row r: query
// r / group, head g * group + r % group), so the rows a weigh_values call takes together see
// nearly the same keys. Scratch: 3 R (D or CHUNK) + 2 R floats.
static void attend_few(const struct unit *u, float *scratch) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group;
  const int first_position = att.length[u->s] - att.count[u->s] + u->first;
  float *query = scratch, *o = query + (size_t)R * D, *p = o + (size_t)R * D;  // [R, D], [R, D], [R, CHUNK]
  float *top = p + (size_t)R * CHUNK, *total = top + R;                         // [R], [R]
  for (int r = 0; r < R; r++) {
    const float *q = att.q + unit_row(u, r);
    for (int d = 0; d < D; d += LANES) vstore(query + (size_t)r * D + d, mul(vload(q + d), all(att.scale)));
    memset(o + (size_t)r * D, 0, sizeof(float) * D);
    top[r] = -INFINITY, total[r] = 0.0f;
  }
  for (int c = u->from; c < u->to; c += CHUNK) {
    const float *keys[CHUNK / BLOCK_TOKENS], *values[CHUNK / BLOCK_TOKENS];
    const int n = chunk_blocks(u, c, u->to, keys, values);
    for (int r = 0; r < R; r++) {
      float *pr = p + (size_t)r * CHUNK;
      int seen = first_position + r / group + 1 - c;  // keys of this chunk row r sees
      seen = seen < 0 ? 0 : seen > n ? n : seen;
      const float chunk_top = row_scores(query + (size_t)r * D, keys, seen, D, pr);
      if (seen == 0 || chunk_top == -INFINITY) {  // nothing visible here (or only -inf scores)
        memset(pr, 0, sizeof(float) * CHUNK);
        continue;
      }
      const float new_top = chunk_top > top[r] ? chunk_top : top[r];
      const float rescale = expf(top[r] - new_top);  // 0 on the first chunk
      lanes_t sum = all(0.0f);
      for (int j = 0; j < CHUNK; j += LANES) {
        const lanes_t e = zero_unless(j < seen ? lanes(seen - j) : no_lanes(), exp_lanes(sub(vload(pr + j), all(new_top))));
        vstore(pr + j, e);
        sum = add(sum, e);
      }
      total[r] = total[r] * rescale + sum_lanes(sum);
      if (rescale != 1.0f)
        for (int d = 0; d < D; d += LANES) vstore(o + (size_t)r * D + d, mul(vload(o + (size_t)r * D + d), all(rescale)));
      top[r] = new_top;
    }
    weigh_chunk(u, p, CHUNK, 1, values, first_position, c, n, o);
  }
  if (u->segment < 0) {
    write_unit(u, o, total);
    return;
  }
  float *kept = att.segment_sums + (size_t)u->segment * FEW_ROWS * (D + 2);
  for (int r = 0; r < R; r++, kept += D + 2) {
    memcpy(kept, o + (size_t)r * D, sizeof(float) * D);
    kept[D] = top[r], kept[D + 1] = total[r];
  }
}

// the unit's out rows from its segments' sums (u: its first segment): each segment's o and total
// rescaled by exp(its maximum - the largest), summed in key order, then o / total
// Scratch: FEW_ROWS (D + 1) floats.
static void merge_segments(const struct unit *u, float *scratch) {
  const int D = att.D, R = u->n * (att.H / att.KV), stride = FEW_ROWS * (D + 2);
  float *o = scratch, *total = o + (size_t)FEW_ROWS * D;  // [R, D], [R]
  for (int r = 0; r < R; r++) {
    const float *kept = att.segment_sums + (size_t)u->segment * stride + (size_t)r * (D + 2);  // segment 0's row r
    float top = -INFINITY;
    for (int i = 0; i < u->segments; i++) top = kept[(size_t)i * stride + D] > top ? kept[(size_t)i * stride + D] : top;
    memset(o + (size_t)r * D, 0, sizeof(float) * D);
    total[r] = 0.0f;
    for (int i = 0; i < u->segments; i++) {
      const float *segment = kept + (size_t)i * stride;
      const float factor = expf(segment[D] - top);
      total[r] += segment[D + 1] * factor;
      for (int d = 0; d < D; d += LANES)
        vstore(o + (size_t)r * D + d, fmadd(vload(segment + d), all(factor), vload(o + (size_t)r * D + d)));
    }
  }
  write_unit(u, o, total);
}


// A unit of many rows (a prompt's tile): the same chunked online softmax as attend_few, with the
// rows in the vector lanes: queries held transposed, scores and weights as [keys, rows], so a key
// is one broadcast against LANES rows (no reductions), and the softmax runs LANES rows at a time.
// Rows are padded to Rp (a multiple of LANES) with zero queries that see every key.
// Scratch: Rp (2 D + CHUNK + 4) floats.
static void attend_many(const struct unit *u, float *scratch) {
  const int D = att.D, group = att.H / att.KV, R = u->n * group, Rp = (R + LANES - 1) / LANES * LANES, L = att.length[u->s];
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
  for (int c = 0; c < u->to; c += CHUNK) {
    const float *keys[CHUNK / BLOCK_TOKENS], *values[CHUNK / BLOCK_TOKENS];
    const int n = chunk_blocks(u, c, u->to, keys, values);
    for (int j = 0; j < n; j += SCORE_KEYS) {  // past n, the last key stands in (masked below)
      const float *key[SCORE_KEYS];
      for (int i = 0; i < SCORE_KEYS; i++) {
        const int at = j + i < n ? j + i : n - 1;
        key[i] = keys[at / BLOCK_TOKENS] + (size_t)(at % BLOCK_TOKENS) * D;
      }
      for (int v = 0; v < Rp / LANES; v += 3)
        scores_tile(Rp / LANES - v < 3 ? Rp / LANES - v : 3, query_t + LANES * v, Rp, key, D, p + (size_t)j * Rp + LANES * v);
    }
    for (int v = 0; v < Rp; v += LANES) {  // LANES rows at a time; rows are in position order
      const ints_t seen_until = load_ints(position + v);  // a row sees keys up to its position
      const int all_see_chunk = position[v] >= c + n - 1;
      lanes_t chunk_top = all(-INFINITY);
      for (int j = 0; j < n; j++) {
        const mask_t visible = all_see_chunk ? every_lane() : seen_by(c + j, seen_until);
        chunk_top = max_where(visible, chunk_top, vload(p + (size_t)j * Rp + v));
      }
      const lanes_t old_top = vload(top + v), new_top = maximum(old_top, chunk_top);
      const lanes_t factor = exp_lanes(sub(old_top, new_top));  // old_top = -inf: ~0, and o, total are 0
      lanes_t sum = all(0.0f);
      for (int j = 0; j < n; j++) {
        const mask_t visible = all_see_chunk ? every_lane() : seen_by(c + j, seen_until);
        const lanes_t e = zero_unless(visible, exp_lanes(sub(vload(p + (size_t)j * Rp + v), new_top)));
        vstore(p + (size_t)j * Rp + v, e);
        sum = add(sum, e);
      }
      vstore(total + v, fmadd(vload(total + v), factor, sum));
      vstore(top + v, new_top);
      vstore(rescale + v, factor);
    }
    for (int r = 0; r < R; r++)
      for (int d = 0; d < D; d += LANES) vstore(o + (size_t)r * D + d, mul(vload(o + (size_t)r * D + d), all(rescale[r])));
    weigh_chunk(u, p, 1, Rp, values, first_position, c, n, o);
  }
  write_unit(u, o, total);
}

static void attention_part(int part) {
  (void)part;
  static __thread float *scratch;  // each thread's, kept between calls (a decode step makes one per layer)
  static __thread size_t scratch_floats;
  const int group = att.H / att.KV, rows = TILE_ROWS / group > 0 ? TILE_ROWS / group * group : group;
  const size_t padded = (size_t)(rows + LANES - 1) / LANES * LANES;  // attend_few needs less than attend_many
  const size_t floats = padded * (2 * att.D + CHUNK + 4);
  if (floats > scratch_floats) {
    free(scratch);
    scratch = malloc(sizeof(float) * floats);
    if (scratch == NULL) abort();
    scratch_floats = floats;
  }
  for (int u; (u = atomic_fetch_add(&att.next_unit, 1)) < att.n_units;)
    (att.units[u].n * group >= FEW_ROWS ? attend_many : attend_few)(&att.units[u], scratch);
}

EXPORT void attention(int S, int H, int KV, int D, float scale, int layer, int layers, const float *q, const float *k,
                      const float *v, const int32_t *const *tables, const int *length, const int *count, float *out) {
  pool_lock();  // from here on pool_threads is this call's
  int n_segments;
  const int n_units = plan_units(S, H, KV, length, count, NULL, &n_segments);
  struct unit *units = malloc(sizeof(struct unit) * (n_units > 0 ? n_units : 1));
  int *row = malloc(sizeof(int) * (S > 0 ? S : 1));
  float *segment_sums = malloc(sizeof(float) * ((size_t)n_segments * FEW_ROWS * (D + 2) + (size_t)FEW_ROWS * (D + 1)));
  if (units == NULL || row == NULL || segment_sums == NULL) abort();
  plan_units(S, H, KV, length, count, units, &n_segments);
  for (int s = 0, next_row = 0; s < S; next_row += count[s++]) row[s] = next_row;
  qsort(units, n_units, sizeof(struct unit), costlier_first);
  att.q = q, att.k = k, att.v = v, att.tables = tables, att.length = length, att.count = count;
  att.row = row, att.units = units, att.n_units = n_units, att.out = out, att.scale = scale;
  att.segment_sums = segment_sums;
  att.S = S, att.H = H, att.KV = KV, att.D = D, att.layer = layer, att.layers = layers;
  atomic_store(&att.next_unit, 0);
  size_t cache_bytes = 0;  // the keys and values the call reads
  for (int s = 0; s < S; s++) cache_bytes += (size_t)length[s] * KV * D * 2 * sizeof(float);
  pool_run_sized(attention_part, cache_bytes);
  for (int u = 0; u < n_units; u++)  // past the segments: the merge's scratch
    if (units[u].segments > 0) merge_segments(&units[u], segment_sums + (size_t)n_segments * FEW_ROWS * (D + 2));
  pool_unlock();
  free(units);
  free(row);
  free(segment_sums);
}
#endif
