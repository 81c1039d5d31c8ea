// attention.c's contract (cpu.h; the KV pool's layout and the causal rule are in attention.c's
// header) for CPUs with AVX2 but without AVX-512: every new token of every sequence of a step
// attends causally over its KV cache, in one call. D % 16 == 0.
// Work split: a unit is (sequence, KV head, up to TILE_QUERIES consecutive new tokens); its rows,
// those tokens times the KV head's query heads, walk the sequence's blocks in order, so each
// block's keys and values are read once for all of them. Threads take units from a shared
// counter. A row scores 4 keys at a time (4 dot products reduced together), then the online
// softmax of flash attention per block of 16 keys: a block that raises the row's maximum scales its
// sums so far by exp(old - new); the end divides by the total. Numerics: f32.
#include "cpu.h"
#if defined(PYLLM_AVX2) && !defined(__AVX512F__)
#define TILE_QUERIES 4

static struct {  // the current attention call
  const float *q, *k, *v;  // k, v: the KV pool
  const int32_t *const *tables;
  const int *length, *count;
  int *row;                // q's row of each sequence's first new token
  int *unit_start;         // sequence s's units: unit_start[s] .. unit_start[s + 1] - 1, KV heads x tiles
  float *out, scale;
  int S, H, KV, D, layer, layers, n_units;
  atomic_int next_unit;
} att;

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

// o [D] = o * rescale + p [n] @ values [n, D], 32 floats of o in registers at a time (then 16)
static void weigh_block(float *o, float rescale, const float *p, int n, const float *values, int D) {
  const __m256 factor = _mm256_set1_ps(rescale);
  int d = 0;
  for (; d + 32 <= D; d += 32) {
    __m256 a[4];
    for (int i = 0; i < 4; i++) a[i] = _mm256_mul_ps(_mm256_loadu_ps(o + d + 8 * i), factor);
    for (int j = 0; j < n; j++) {
      const __m256 w = _mm256_set1_ps(p[j]);
      for (int i = 0; i < 4; i++) a[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(values + (size_t)j * D + d + 8 * i), a[i]);
    }
    for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + d + 8 * i, a[i]);
  }
  if (d < D) {  // D % 32 == 16
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(o + d), factor), a1 = _mm256_mul_ps(_mm256_loadu_ps(o + d + 8), factor);
    for (int j = 0; j < n; j++) {
      const __m256 w = _mm256_set1_ps(p[j]);
      a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(values + (size_t)j * D + d), a0);
      a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(values + (size_t)j * D + d + 8), a1);
    }
    _mm256_storeu_ps(o + d, a0), _mm256_storeu_ps(o + d + 8, a1);
  }
}

// unit u of sequence s: KV head g, new tokens first .. first + n - 1; scratch: R (2 D + 2) floats
static void attend_unit(int s, int g, int first, int n, float *scratch) {
  const int D = att.D, group = att.H / att.KV, R = n * group;
  const int first_position = att.length[s] - att.count[s] + first;
  float *query = scratch, *o = query + (size_t)R * D, *top = o + (size_t)R * D, *total = top + R;
  for (int r = 0; r < R; r++) {  // row r: new token first + r / group, query head g group + r % group
    const float *q = att.q + ((size_t)(att.row[s] + first + r / group) * att.H + g * group + r % group) * D;
    for (int d = 0; d < D; d += 8)
      _mm256_storeu_ps(query + (size_t)r * D + d, _mm256_mul_ps(_mm256_loadu_ps(q + d), _mm256_set1_ps(att.scale)));
    memset(o + (size_t)r * D, 0, sizeof(float) * D);
    top[r] = -INFINITY, total[r] = 0.0f;
  }
  const int32_t *table = att.tables[s];
  for (int c = 0; c < first_position + n; c += BLOCK_TOKENS) {  // the block of keys c .. c + 15
    const float *keys = att.k + kv_block(table[c / BLOCK_TOKENS], att.layers, att.layer, att.KV, g, D);
    const float *values = att.v + (keys - att.k);
    const float *key[BLOCK_TOKENS];
    for (int j = 0; j < BLOCK_TOKENS; j++) key[j] = keys + (size_t)j * D;
    for (int r = 0; r < R; r++) {
      int seen = first_position + r / group + 1 - c;  // keys of this block row r sees
      if (seen <= 0) continue;
      seen = seen > BLOCK_TOKENS ? BLOCK_TOKENS : seen;
      float p[BLOCK_TOKENS] = {0};
      for (int j = 0; j < seen; j += 4) _mm_storeu_ps(p + j, scores4(query + (size_t)r * D, key + j, D));
      float block_top = p[0];
      for (int j = 1; j < seen; j++) block_top = p[j] > block_top ? p[j] : block_top;
      const float new_top = block_top > top[r] ? block_top : top[r];
      const float rescale = expf(top[r] - new_top);  // 0 on the first block
      __m256 sum = _mm256_setzero_ps();
      for (int j = 0; j < BLOCK_TOKENS; j += 8) {  // keys past `seen` weigh 0
        const __m256 e = _mm256_and_ps(_mm256_castsi256_ps(lanes8(seen - j)),
                                       exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), _mm256_set1_ps(new_top))));
        _mm256_storeu_ps(p + j, e);
        sum = _mm256_add_ps(sum, e);
      }
      total[r] = total[r] * rescale + sum8(sum), top[r] = new_top;
      weigh_block(o + (size_t)r * D, rescale, p, seen, values, D);
    }
  }
  for (int r = 0; r < R; r++) {
    float *out = att.out + ((size_t)(att.row[s] + first + r / group) * att.H + g * group + r % group) * D;
    const __m256 inverse = _mm256_set1_ps(1.0f / total[r]);
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_loadu_ps(o + (size_t)r * D + d), inverse));
  }
}

static void attention_part(int part) {
  (void)part;
  float *scratch = malloc(sizeof(float) * (size_t)TILE_QUERIES * (att.H / att.KV) * (2 * att.D + 2));
  if (scratch == NULL) abort();
  for (int u; (u = atomic_fetch_add(&att.next_unit, 1)) < att.n_units;) {
    int s = 0;
    while (att.unit_start[s + 1] <= u) s++;
    const int i = u - att.unit_start[s], tiles = (att.count[s] + TILE_QUERIES - 1) / TILE_QUERIES;
    const int first = i % tiles * TILE_QUERIES, n = att.count[s] - first;
    attend_unit(s, i / tiles, first, n < TILE_QUERIES ? n : TILE_QUERIES, scratch);
  }
  free(scratch);
}

// q [T, H, D] (rope applied), sequence s owning the next count[s] rows -> out [T, H, D]; keys and
// values: KV pool k, v [blocks, layers, KV, BLOCK_TOKENS, D], sequence s's first length[s]
// positions at layer `layer` through tables[s] (attention.c)
EXPORT void attention(int S, int H, int KV, int D, float scale, int layer, int layers, const float *q, const float *k,
                      const float *v, const int32_t *const *tables, const int *length, const int *count, float *out) {
  int *index = malloc(sizeof(int) * (2 * (size_t)S + 1));  // row, then unit_start
  if (index == NULL) abort();
  size_t bytes = 0;  // keys and values read: the threads wake only for a call that reads enough
  index[S] = 0;
  for (int s = 0; s < S; s++) {
    index[s] = s ? index[s - 1] + count[s - 1] : 0;
    index[S + s + 1] = index[S + s] + KV * ((count[s] + TILE_QUERIES - 1) / TILE_QUERIES);
    bytes += 2 * sizeof(float) * (size_t)length[s] * KV * D * ((count[s] + TILE_QUERIES - 1) / TILE_QUERIES);
  }
  pool_lock();
  att.q = q, att.k = k, att.v = v, att.tables = tables, att.length = length, att.count = count, att.out = out;
  att.row = index, att.unit_start = index + S, att.scale = scale, att.n_units = index[2 * S];
  att.S = S, att.H = H, att.KV = KV, att.D = D, att.layer = layer, att.layers = layers;
  atomic_store(&att.next_unit, 0);
  pool_run_sized(attention_part, bytes);
  pool_unlock();
  free(index);
}
#endif
