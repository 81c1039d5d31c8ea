// avx2_block_matmul: a decode step's matmul on GGML's block formats (q4_0, q4_1, q5_0, q5_1,
// q8_0, q4_k, q5_k, q6_k, rows as GGUF stores them) with AVX2, FMA and F16C, for CPUs without
// AVX-512 (Zen 1-3, Intel's client cores). Without it such a CPU dequantizes every matrix to f32
// at every step.
//
// The activations, as llama.cpp's Q8_0: each row of x [M, K] is cut into blocks of 32; block b
// gets d = max|x| / 127 and q = round-half-even(x / d) in int8, clamped to +-127 (d = 0: q = 0),
// and s = d sum(q). In two layers (quant.c's: ~1/127 of one layer's error, at a decode step's few
// rows), the rounding error x - d q is quantized as well, on the grid d / 254: q2 = round(254 (x -
// d q) / d), |q2| <= 127, and the block is carried as one int16 per element, 254 q + q2, with
// scale d / 254 (and s the same). A row is padded with empty blocks (d = s = 0) to a multiple of 8.
//
// The weights: a tile of 8 blocks at a time, decoded as avx2_blocks.h says, each into 32 bytes
// with a factor f and a constant c per unit of s.
//
// One block's dot product with a block of x, one layer: vpmaddubsw (unsigned weights times signed
// q; q8_0: |w| times q with w's signs) gives 16 int16 pair sums (|.| <= 128 x 127 x 2 < 2^15);
// two layers: the weights widened to int16, vpmaddwd with 254 q + q2 gives 8 int32. A tile's 8
// such vectors are summed into one int32 per block (vphaddw while the sums fit int16, vphaddd),
// converted, and multiplied by f d_x into an 8-lane f32 accumulator per row of x, c s_x beside; a
// lane keeps its tile position (row, block parity), so an output is the sum of its row's lanes.
//
// Threads take guided shares (pool_share) of 16 weight rows at a time; an interleaved matrix's
// row groups go to avx2_interleaved.c. Here a share runs a tile's rows at a time (a last short
// tile repeats its last row, software prefetch runs a tile's rows ahead); each tile is decoded
// once for the M rows of x.
//
// Numerics: each block's integer dot product is exact; next to an f32 dot product with the
// dequantized weights only the activations' rounding and the summation order differ.
#include "avx2_blocks.h"
#ifdef PYLLM_AVX2

struct avx2_call avx2_call;

static inline __m256 keep256(__m256 v) {  // v as computed: hides a product from contraction into an FMA
  __asm__("" : "+x"(v));
  return v;
}

// round-half-even(v / d) (cvtps: the MXCSR default) clamped to +-127: a d far below FLT_MIN is inexact
static inline __m256i int8_grid(__m256 v, float d) {
  const __m256i limit = _mm256_set1_epi32(127), q = _mm256_cvtps_epi32(_mm256_div_ps(v, _mm256_set1_ps(d)));
  return _mm256_max_epi32(_mm256_min_epi32(q, limit), _mm256_sub_epi32(_mm256_setzero_si256(), limit));
}

static inline int sum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

// v [32] -> its block at out (32 x layers bytes, the layout above); returns its scale, sets *dsum
static float quantize_block(const float *v, int layers, uint8_t *out, float *dsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 top = _mm256_setzero_ps();
  for (int i = 0; i < 32; i += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
  const float d = max8(top) / 127.0f, d2 = d / 254.0f;
  *dsum = 0.0f;
  if (d == 0.0f) {
    memset(out, 0, 32 * (size_t)layers);
    return 0.0f;
  }
  __m256i q[4], sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; i++) {
    const __m256 x = _mm256_loadu_ps(v + 8 * i);
    q[i] = int8_grid(x, d);
    if (layers == 2) {  // 254 q + q2, q2 the rounding error's on d / 254's grid (d q in f32 first)
      const __m256 error = _mm256_sub_ps(x, keep256(_mm256_mul_ps(_mm256_cvtepi32_ps(q[i]), _mm256_set1_ps(d))));
      q[i] = _mm256_add_epi32(_mm256_mullo_epi32(q[i], _mm256_set1_epi32(254)), int8_grid(error, d2));
    }
    sum = _mm256_add_epi32(sum, q[i]);
  }
  *dsum = (layers == 2 ? d2 : d) * (float)sum_epi32(sum);
  if (layers == 2) {  // in block_dot's order: elements 0..7, 16..23, then 8..15, 24..31 (packs work per 128-bit half)
    for (int h = 0; h < 2; h++)
      _mm256_storeu_si256((__m256i *)out + h, _mm256_permute4x64_epi64(_mm256_packs_epi32(q[h], q[h + 2]), 0xD8));
    return d2;
  }
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256((__m256i *)out, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return d;
}

// How many halvings of one int8 layer's 16 int16 pair sums stay in int16 (each doubles the
// bound): 4-bit weights 3 (8 x 15 x 127 x 2 < 2^15), 5-bit 2; q8_0's and q6_k's go to int32 at once.
static inline int int16_halvings(int type) {
  return type == Q4_0 || type == Q4_1 || type == Q4_K ? 3 : type == Q5_0 || type == Q5_1 || type == Q5_K ? 2 : 0;
}

// weight block w (decoded) . x's block at q (L layers) -> one layer's 16 int16 pair sums (where
// int16_halvings), else 8 int32 partial sums (two layers: |.| <= 4 x 128 x 32385)
static inline __attribute__((always_inline)) __m256i block_dot(const int type, const int L, __m256i w, const uint8_t *q) {
  const __m256i ones = _mm256_set1_epi16(1);
  if (L == 2) {  // weights to int16 per 128-bit half (elements 0..7, 16..23; 8..15, 24..31), times 254 q + q2
    const __m256i widen = type == Q8_0 ? _mm256_cmpgt_epi8(_mm256_setzero_si256(), w) : _mm256_setzero_si256();
    __m256i low = _mm256_unpacklo_epi8(w, widen), high = _mm256_unpackhi_epi8(w, widen);
    if (type == Q6_K) {
      low = _mm256_sub_epi16(low, _mm256_set1_epi16(32));
      high = _mm256_sub_epi16(high, _mm256_set1_epi16(32));
    }
    return _mm256_add_epi32(_mm256_madd_epi16(low, _mm256_loadu_si256((const __m256i *)q)),
                            _mm256_madd_epi16(high, _mm256_loadu_si256((const __m256i *)q + 1)));
  }
  const __m256i x = _mm256_loadu_si256((const __m256i *)q);
  if (int16_halvings(type)) return _mm256_maddubs_epi16(w, x);
  if (type == Q8_0) return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)), ones);
  const __m256i minus_32 = _mm256_maddubs_epi16(_mm256_set1_epi8(32), x);  // q6_k
  return _mm256_madd_epi16(_mm256_sub_epi16(_mm256_maddubs_epi16(w, x), minus_32), ones);
}

// v[8], block_dot's -> lane i: the sum of v[i]'s lanes in f32 (q6_k: each half times its scale).
// Pairwise sums (vphaddw, vphaddd) keep each 128-bit half's (a block's halves): they are added last.
static inline __attribute__((always_inline)) __m256 tile_sums(const int type, const int L, const __m256i v[TILE],
                                                               const struct tile *head) {
  const int halvings = L == 1 ? int16_halvings(type) : 0;
  if (halvings == 3) {  // per half: v0..v7 in int16
    const __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(v[0], v[1]), _mm256_hadd_epi16(v[2], v[3])),
                                        _mm256_hadd_epi16(_mm256_hadd_epi16(v[4], v[5]), _mm256_hadd_epi16(v[6], v[7])));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(h)),
                                               _mm256_cvtepi16_epi32(_mm256_extracti128_si256(h, 1))));
  }
  __m256i a, b;  // per half: v0..v3, v4..v7 in int32
  if (halvings == 2) {
    const __m256i ones = _mm256_set1_epi16(1);
    a = _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(v[0], v[1]), _mm256_hadd_epi16(v[2], v[3])), ones);
    b = _mm256_madd_epi16(_mm256_hadd_epi16(_mm256_hadd_epi16(v[4], v[5]), _mm256_hadd_epi16(v[6], v[7])), ones);
  } else {
    a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  }
  const __m256i first = _mm256_permute2x128_si256(a, b, 0x20), second = _mm256_permute2x128_si256(a, b, 0x31);
  if (type == Q6_K)
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(second), head->second, _mm256_mul_ps(_mm256_cvtepi32_ps(first), head->first));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(first, second));
}

// The tile of rows row[0 .. R - 1] (R = 8 / B) at blocks b0 .. b0 + B - 1 (B = 8: one superblock),
// lane i = r B + b: its blocks decoded into w, their heads returned. A 32-weight format's odd last
// block leaves its partner zero (and repeats its head).
static inline __attribute__((always_inline)) struct tile decode_tile(const int type, const uint8_t *const *row,
                                                                      int b0, int blocks, __m256i w[TILE]) {
  if (group_blocks(type) == TILE) {
    const uint8_t *p = row[0] + (size_t)(b0 / TILE) * row_bytes(type, 32 * TILE);
#pragma GCC unroll 8
    for (int j = 0; j < TILE; j++) w[j] = decode_block(type, p, j);
    return superblock_head(type, p);
  }
  const int B = 2;
  const uint8_t *at[TILE];
  for (int i = 0; i < TILE; i++) {
    const int b = b0 + i % B < blocks ? b0 + i % B : blocks - 1;
    at[i] = row[i / B] + (size_t)b * row_bytes(type, 32);
  }
#pragma GCC unroll 8
  for (int i = 0; i < TILE; i++) w[i] = b0 + i % B < blocks ? decode_block(type, at[i], 0) : _mm256_setzero_si256();
  return block_heads(type, at);
}

// weight rows lo .. hi - 1 against the M rows of x in L layers (M, L constant where the caller makes them)
static inline __attribute__((always_inline)) void rows_avx2(const int type, const int M, const int L, int lo, int hi) {
  const int B = group_blocks(type) == TILE ? TILE : 2, R = TILE / B;  // a tile's blocks and rows
  const size_t bytes = row_bytes(type, avx2_call.K);
  const int blocks = avx2_call.K / 32;
  for (int n0 = lo; n0 < hi; n0 += R) {
    const uint8_t *row[TILE];
    for (int r = 0; r < R; r++) row[r] = avx2_call.w + (size_t)(n0 + r < hi ? n0 + r : hi - 1) * bytes;
    __m256 acc[MAX_ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    for (int b0 = 0; b0 < blocks; b0 += B) {
      const size_t ahead = (size_t)R * bytes + (size_t)b0 * row_bytes(type, 32);  // the next tile rows' same bytes
      for (int r = 0; r < R; r++)  // 4 rows side by side are more streams than the hardware prefetcher keeps up with
        for (size_t line = 0; line < B * row_bytes(type, 32); line += 64)
          _mm_prefetch((const char *)row[r] + ahead + line, _MM_HINT_T0);
      __m256i w[TILE];
      const struct tile head = decode_tile(type, row, b0, blocks, w);
      for (int m = 0; m < M; m++) {
        const size_t at = (size_t)m * avx2_call.padded + b0;  // x's block b0
        __m256i dots[TILE];
#pragma GCC unroll 8
        for (int i = 0; i < TILE; i++)
          dots[i] = block_dot(type, L, w[i], avx2_call.q + (at + i % B) * 32 * L);
        // x's scales and sums per lane: the tile's blocks (B = 2: the pair, in each row's lanes)
        const __m256 d = B == TILE ? _mm256_loadu_ps(avx2_call.d + at)
                                   : _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(avx2_call.d + at)));
        acc[m] = _mm256_fmadd_ps(tile_sums(type, L, dots, &head), _mm256_mul_ps(head.factor, d), acc[m]);
        if (has_constant(type)) {
          const __m256 dsum = B == TILE ? _mm256_loadu_ps(avx2_call.dsum + at)
                                        : _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(avx2_call.dsum + at)));
          acc[m] = _mm256_fmadd_ps(head.constant, dsum, acc[m]);
        }
      }
    }
    for (int m = 0; m < M; m++) {
      float sums[TILE];  // B = 2: row r's lanes 2r, 2r + 1 summed in lane r % 2 + 4 (r / 2)
      if (B == TILE) sums[0] = sum8(acc[m]);
      else _mm256_storeu_ps(sums, _mm256_hadd_ps(acc[m], acc[m]));
      for (int r = 0; r < R && n0 + r < hi; r++) {
        const float sum = B == TILE ? sums[0] : sums[r % 2 + 4 * (r / 2)];
        float *out = avx2_call.out + (size_t)m * avx2_call.N + n0 + r;
        *out = avx2_call.accumulate ? *out + sum : sum;
      }
    }
  }
}

static inline __attribute__((always_inline)) void rows_of_type(const int type, int lo, int hi) {
  WITH_CONSTANT_ROWS(rows_avx2, type, lo, hi);
}

// GGUF-layout rows lo .. hi - 1 of the call's matrix
static void gguf_rows(int lo, int hi) {
  switch (avx2_call.type) {
    case Q4_0: rows_of_type(Q4_0, lo, hi); break;
    case Q4_1: rows_of_type(Q4_1, lo, hi); break;
    case Q5_0: rows_of_type(Q5_0, lo, hi); break;
    case Q5_1: rows_of_type(Q5_1, lo, hi); break;
    case Q4_K: rows_of_type(Q4_K, lo, hi); break;
    case Q5_K: rows_of_type(Q5_K, lo, hi); break;
    case Q6_K: rows_of_type(Q6_K, lo, hi); break;
    default: rows_of_type(Q8_0, lo, hi);
  }
}

// a thread's shares: units of ROW_GROUP rows, an interleaved matrix's row groups (avx2_group_rows)
// or GGUF-layout rows; the last thread also an interleaved matrix's N % 16 rows in GGUF's layout
static void avx2_part(int part) {
  const int N = avx2_call.N, units = avx2_call.interleaved ? N / ROW_GROUP : (N + ROW_GROUP - 1) / ROW_GROUP;
  for (int first, take; (first = pool_share(&avx2_call.next_unit, units, &take)) < units;) {
    const int last = first + take < units ? first + take : units;
    if (avx2_call.interleaved) avx2_group_rows(first, last);
    else gguf_rows(first * ROW_GROUP, last * ROW_GROUP < N ? last * ROW_GROUP : N);
  }
  if (avx2_call.interleaved && part == pool_threads - 1 && N % ROW_GROUP) gguf_rows(N - N % ROW_GROUP, N);
}

// out [M, N] (+)= x [M, K] @ dequant(w)^T, w [N, K] in GGUF's rows of `type` (q4_0, q4_1, q5_0,
// q5_1, q8_0, q4_k, q5_k, q6_k; INTERLEAVED | a 32-weight format: in interleave.c's layout), x's
// blocks in `layers` (1, 2) int8 layers; 1 <= M <= 16, K a multiple of the type's block (the
// caller checks).
EXPORT void avx2_block_matmul(int type, int M, int layers, const float *x, int K, const uint8_t *w, int N, float *out,
                              int accumulate) {
  static uint8_t *q;
  static float *scales;  // d [M, padded], then dsum [M, padded]
  static size_t allocated;  // blocks, kept between calls
  const int blocks = K / 32, padded = (blocks + TILE - 1) / TILE * TILE;
  const size_t needed = (size_t)M * padded;
  pool_lock();
  if (needed > allocated) {
    free(q), free(scales);
    q = malloc(needed * 64), scales = malloc(needed * 2 * sizeof *scales);  // 64: two layers' bytes
    if (q == NULL || scales == NULL) abort();
    allocated = needed;
  }
  float *d = scales, *dsum = scales + needed;
  for (int m = 0; m < M; m++)
    for (int b = 0; b < padded; b++) {
      const size_t at = (size_t)m * padded + b;
      if (b < blocks) {
        d[at] = quantize_block(x + (size_t)m * K + 32 * b, layers, q + 32 * layers * at, &dsum[at]);
      } else {  // padding: an empty block
        d[at] = dsum[at] = 0.0f;
        memset(q + 32 * layers * at, 0, 32 * (size_t)layers);
      }
    }
  avx2_call.q = q, avx2_call.d = d, avx2_call.dsum = dsum, avx2_call.w = w, avx2_call.out = out;
  avx2_call.type = type & ~INTERLEAVED, avx2_call.interleaved = (type & INTERLEAVED) != 0;
  avx2_call.M = M, avx2_call.layers = layers, avx2_call.K = K, avx2_call.N = N, avx2_call.padded = padded;
  avx2_call.accumulate = accumulate;
  atomic_store(&avx2_call.next_unit, 0);
  pool_run_sized(avx2_part, (size_t)N * row_bytes(type, K));
  pool_unlock();
}

#endif
