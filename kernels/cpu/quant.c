// Decode matmul on GGML block-quantized weights (llama.cpp's formats, bytes as GGUF stores them),
// with the activations quantized to int8 and the dot products on AVX-512 VNNI.
// This file: the activations, the formats of 32-weight blocks (q4_0, q4_1, q5_0, q5_1, q8_0) and
// the call; quant_k.c: the K-quants (q4_k, q5_k, q6_k: superblocks of 256); dequantize.c: to f32.
//
// Why: a decode step streams every weight once, so its time is the weights' bytes over memory
// bandwidth: 4.5-bit weights read ~7x fewer bytes than f32. Dequantized to f32, every 16 weights
// would take a widening, a convert and a scale before their FMA; with int8 activations one
// vpdpbusd does 64 multiply-adds on the weights' own small integers, and the scales come per block.
//
// The activations, xq (quantize_activations): each row of x is cut into blocks of 32, a block b
// gets d = max|x| / 127 and q = round-half-even(x / d) clamped to +-127 (d = 0: q = 0). In two
// layers, a second row per row of x holds its rounding error x - d q quantized the same way: the
// two together carry x to ~1/127 of one layer's error (one layer moves a logit of SmolLM2 by up to
// ~0.5: the norms' outlier channels set their blocks' scales), for 2x the dot products and the same
// weight reads. Blocks go in groups of 16 (QX_GROUP: a block per 32-bit lane of a zmm), zero-padded
// past K. xq is one record of QX_RECORD bytes per (group g, record m), records 0 .. M - 1 rows of x
// (M x layers: then M .. 2M - 1 their second layers), record (g, m) at (g * records + m) * QX_RECORD:
//   QX_Q        8 x 64 bytes: vector u (0..7), lane j (bytes 4j..4j+3) = q of elements 4u..4u+3
//               of block j, so one vpdpbusd of a weight vector laid out the same way adds four
//               products of each of 16 blocks into that block's lane; u 0..3 are the block's
//               first half (elements 0..15), u 4..7 its second
//   QX_D        f32 [16]: d of each block
//   QX_DSUM     f32 [16]: d * sum(q) (the weight format's per-block min multiplies it)
//   QX_SUM      int32 [16]: sum(q) of each block, QX_SUM_LO, QX_SUM_HI: of its halves
// The weights are decoded into the same layout, a group of 16 blocks at a time, in registers.
#include "cpu.h"
#include "quant_blocks.h"
#ifdef __AVX512F__
#define PREFETCH_BYTES 4096  // how far ahead a thread prefetches its weights (GGUF's layout: per row, split over a strip)
#define XQ_IN_L1 32768       // xq bytes of a weight row that stay in L1 without strips

EXPORT size_t activation_bytes(int M, int K) { return (size_t)((K / 32 + QX_GROUP - 1) / QX_GROUP) * M * QX_RECORD; }

// quant_matmul: out [M, N] (+)= x @ dequant(w)^T for a decode step's few rows (M <= 16).
// Work split: each thread (the caller and the pool's workers) takes its own range of weight rows
// (of an interleaved matrix: of row groups, 16 rows each; the last thread also its N % 16 rows in
// GGUF's layout). The weights are read from memory once for all M; software prefetch runs
// PREFETCH_BYTES ahead into L2 (_MM_HINT_T1: L2 tracks more misses at once than L1 does).
//
// An interleaved matrix (interleave.c: what the CPU backend makes of every 32-weight matrix), per
// row group, block by block:
//   decode: W[8] = the 16 rows' block b as u8 in xq's layout (vector u, lane j: weights 4u..4u+3
//     of row j's block), d (and m) = their f32 scales (and mins) per lane: 8 + 2 zmm, live through
//   the activation records: per record m, 8 vpdpbusd, each of block b's xq dwords broadcast to all
//     lanes (in two chains of 4), the block's offset or min and scales in f32, into the record's
//     16-lane accumulator, in a register where M is constant; lane j is row j's output, stored
//     (two layers: added) after the last block. No transposes, gathers or horizontal sums.
//
// GGUF's layout (the rows past the last row group, and matrices the backend did not interleave),
// in batches of QUANT_STRIP rows: first the rows' full groups of 16 blocks (lane j: block j), two
// rows at a time, group by group (each xq vector loaded once for both), or when a row's xq passes
// XQ_IN_L1 (M x K / 512 records: M = 16 at K = 4096 is 106 KB) the whole batch as a strip that
// takes each group in turn, so that group's xq (M records, <= 13 KB) serves the strip from L1.
// Then the rows' tails (K / 32 % 16 blocks: 2 at K = 576, where a padded group would cost as much
// as a full one): quant_tail_rows rows' tails share a group, lanes 0 .. tail - 1 the first row's,
// against call.tail (xq's last records with lane j holding block j % tail; made per call), and
// each row takes its lanes' sums back into its accumulator (quant_add_tail). Last, the batch's
// 16-lane sums at once (quant_store). The blocks' bytes are transposed into the lanes and their
// scales gathered (quant_blocks.h) at every call.
//
// Numerics: each block's sum(q xq) is exact in int32; d dx sum(q xq) (+ m dx sum(xq)) in f32;
// summed in k order (interleaved: each row's blocks in its lane; GGUF's layout: per lane, block j
// of every group, then the 16 lanes): next to an f32 dot product with the dequantized weights,
// only the activations' int8 rounding and the summation order differ.
//
// The 32-weight formats' decoding: quant_blocks.h.
// Offsets, not signs: q4_0 is d (q - 8) with q in 0..15, q5_0 d (q - 16), and q8_0 is signed: it
// is read as q + 128 (one xor), which makes every weight an unsigned byte for vpdpbusd, and
// d dx sum(q xq) = d dx (sum((q + c) xq) - c sum(xq)) with the block's sum from xq: one shift and
// subtract per block and activation row. (The abs/sign trick would cost a masked subtract per
// weight vector and activation row: 8 times as many.)

// block v [32] -> q [32] and its d (the layout: the top of this file)
static inline float block_int8(const float *v, int8_t q[32]) {
  const __m512i limit = _mm512_set1_epi32(127);
  const __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
  const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi))) / 127.0f;
  if (d == 0.0f) {  // q, d and the sums stay zero
    memset(q, 0, 32);
    return d;
  }
  const __m512 scale = _mm512_set1_ps(d);
  for (int h = 0; h < 2; h++) {  // a d far below FLT_MIN is inexact: keep q in range
    __m512i r = _mm512_cvt_roundps_epi32(_mm512_div_ps(h ? hi : lo, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_max_epi32(_mm512_min_epi32(r, limit), _mm512_sub_epi32(_mm512_setzero_si512(), limit));
    _mm_storeu_si128((__m128i *)(q + 16 * h), _mm512_cvtepi32_epi8(r));
  }
  return d;
}

// block v [32] and its int8 blocks (q, d) -> v - d q, its rounding error (d q rounded to f32
// first, as NumPy computes it)
static inline void rounding_error(const float *v, const int8_t q[32], float d, float *error) {
  for (int h = 0; h < 2; h++) {
    const __m512i qh = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * h)));
    const __m512 dq = keep(_mm512_mul_ps(_mm512_cvtepi32_ps(qh), _mm512_set1_ps(d)));
    _mm512_storeu_ps(error + 16 * h, _mm512_sub_ps(_mm512_loadu_ps(v + 16 * h), dq));
  }
}

// one xq record from its blocks' q (bytes: a row of 32 per block, count blocks) and d: q
// transposed to xq's lanes like a q8_0 group, the sums by vpdpbusd of the q with ones
static void write_record(uint8_t *record, const uint8_t bytes[QX_GROUP][32], const float d[QX_GROUP], int count) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i Q[8], sum_lo = _mm512_setzero_si512(), sum_hi = _mm512_setzero_si512();
  transpose_8x16(bytes[0], NULL, 32, count, Q);
  for (int u = 0; u < 4; u++) {
    sum_lo = _mm512_dpbusd_epi32(sum_lo, ones, Q[u]);
    sum_hi = _mm512_dpbusd_epi32(sum_hi, ones, Q[4 + u]);
  }
  for (int u = 0; u < 8; u++) _mm512_storeu_si512(record + 64 * u, Q[u]);
  const __m512i sum = _mm512_add_epi32(sum_lo, sum_hi);
  const __m512 dv = _mm512_loadu_ps(d);
  _mm512_storeu_ps(record + QX_D, dv);
  _mm512_storeu_ps(record + QX_DSUM, _mm512_mul_ps(dv, _mm512_cvtepi32_ps(sum)));
  _mm512_storeu_si512(record + QX_SUM, sum);
  _mm512_storeu_si512(record + QX_SUM_LO, sum_lo);
  _mm512_storeu_si512(record + QX_SUM_HI, sum_hi);
}

// quantize_activations (the layout: the top of this file): x [M, K] in `layers` (1, 2) layers;
// each block of x is quantized once, its second layer made from that block's own q and d.
EXPORT void quantize_activations(int M, int layers, int K, const float *x, void *xq) {
  const int blocks = K / 32, groups = (blocks + QX_GROUP - 1) / QX_GROUP, records = M * layers;
  for (int g = 0; g < groups; g++)
    for (int m = 0; m < M; m++) {
      uint8_t bytes[QX_GROUP][32], second[QX_GROUP][32];
      float d[QX_GROUP] = {0}, d2[QX_GROUP] = {0};
      const int count = blocks - g * QX_GROUP < QX_GROUP ? blocks - g * QX_GROUP : QX_GROUP;
      for (int j = 0; j < count; j++) {
        const float *block = x + (size_t)m * K + (size_t)(g * QX_GROUP + j) * 32;
        d[j] = block_int8(block, (int8_t *)bytes[j]);
        if (layers == 2) {
          float error[32];
          rounding_error(block, (const int8_t *)bytes[j], d[j], error);
          d2[j] = block_int8(error, (int8_t *)second[j]);
        }
      }
      uint8_t *record = (uint8_t *)xq + ((size_t)g * records + m) * QX_RECORD;
      write_record(record, bytes, d, count);
      if (layers == 2) write_record(record + (size_t)M * QX_RECORD, second, d2, count);
    }
}

static inline __attribute__((always_inline)) void as_unsigned(__m512i W[8]) {  // q8_0 as q + 128 for vpdpbusd
  for (int u = 0; u < 8; u++) W[u] = _mm512_xor_si512(W[u], _mm512_set1_epi8((char)0x80));
}

// log2 of c, the offset-format weights' shift to unsigned (q4_0: q - 8, q5_0: q - 16, q8_0: q + 128 - 128)
static inline __attribute__((always_inline)) int offset_shift(const int type) {
  return type == Q4_0 ? 3 : type == Q5_0 ? 4 : 7;
}

// The activation side, per row m of xq (record x + m QX_RECORD), for n (1, 2) weight groups:
// q4_0, q5_0, q8_0: d dx (sum((q + c) xq) - c sum(xq)), c = 1 << shift; q4_1, q5_1: d dx sum(q xq)
// + m dx sum(xq).
static inline __attribute__((always_inline)) void groups_times_offset(const int n, const __m512i *const *W,
                                                                      const __m512 *dw, const int shift, int M,
                                                                      const uint8_t *x, __m512 *const *acc) {
  for (int m = 0; m < M; m++, x += QX_RECORD) {
    __m512i s[2];
    xq_sums(n, W, x, M, s);
    const __m512i offset = _mm512_sll_epi32(_mm512_loadu_si512(x + QX_SUM), _mm_cvtsi32_si128(shift));
    const __m512 dx = _mm512_loadu_ps((const float *)(x + QX_D));
    for (int i = 0; i < n; i++)
      acc[i][m] = plus_offset_terms(acc[i][m], s[i], offset, dx, dw[i]);
  }
}

// n (1, 2) groups of `count` blocks in GGUF's layout, group i at w[i] (lanes: as BLOCK), against M
// rows of xq at x into acc[i]: a pair of weight rows shares each xq load.
static inline __attribute__((always_inline)) void groups32(const int type, const int n, const uint8_t *const *w,
                                                           const int32_t *lanes, const int count, int M,
                                                           const uint8_t *x, __m512 *const *acc) {
  struct block_group g[2];
  const __m512i *W[2];
  __m512 d[2], mins[2];
  for (int i = 0; i < n; i++) {
    decode_blocks32(type, w[i], lanes, count, &g[i]);
    if (type == Q8_0) as_unsigned(g[i].W);
    W[i] = g[i].W, d[i] = g[i].d, mins[i] = g[i].m;
  }
  if (type == Q4_1 || type == Q5_1)
    groups_times_min(n, W, d, mins, M, x, acc);
  else
    groups_times_offset(n, W, d, offset_shift(type), M, x, acc);
}

// one group (as groups32's) of one weight row
static inline __attribute__((always_inline)) void group32(const int type, const uint8_t *w, const int32_t *lanes,
                                                          const int count, int M, const uint8_t *x, __m512 *acc) {
  groups32(type, 1, &w, lanes, count, M, x, &acc);
}

static struct quant_call call;  // the current quant_matmul call

// A thread's weight rows lo .. hi - 1 in GGUF's layout, in batches of QUANT_STRIP rows: each row's
// full groups (strips of call.strip rows take each group in turn), then the rows' tails packed into
// groups (lanes 0 .. tail - 1 row r, the next tail lanes row r + 1, ...) against call.tail; M
// constant where it is 1 or 2.
static inline __attribute__((always_inline)) void rows32_m(const int type, const int M, int lo, int hi) {
  const int blocks = call.K / 32, full = blocks / QX_GROUP, tail = blocks % QX_GROUP, strip = call.strip;
  const int per = quant_tail_rows(tail);
  const size_t stride = row_bytes(type, 32), bytes = row_bytes(type, call.K), group_bytes = QX_GROUP * stride;
  int32_t packed[QX_GROUP];  // the blocks of a group of tails
  for (int j = 0; j < QX_GROUP; j++) packed[j] = tail ? j / tail * (int32_t)bytes + j % tail * (int32_t)stride : 0;
  for (int n0 = lo; n0 < hi; n0 += QUANT_STRIP) {
    const int rows = hi - n0 < QUANT_STRIP ? hi - n0 : QUANT_STRIP;
    const uint8_t *w = call.w + (size_t)n0 * bytes;
    __m512 acc[QUANT_STRIP][MAX_QUANT_ROWS];
    for (int r = 0; r < rows; r++)
      for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    if (strip == 1)  // row by row, two at a time: a pair shares each xq load
      for (int r = 0; r < rows; r += 2)
        for (int g = 0; g < full; g++) {
          const uint8_t *b = w + r * bytes + g * group_bytes, *x = call.xq + (size_t)g * M * QX_RECORD;
          const uint8_t *pair[2] = {b, b + bytes};
          __m512 *accs[2] = {acc[r], acc[r + 1]};
          for (int i = 0; i < 2 && r + i < rows; i++)
            for (size_t line = 0; line < group_bytes; line += 64)
              _mm_prefetch((const char *)pair[i] + PREFETCH_BYTES + line, _MM_HINT_T1);
          if (r + 1 < rows)
            groups32(type, 2, pair, NULL, QX_GROUP, M, x, accs);
          else
            group32(type, b, NULL, QX_GROUP, M, x, acc[r]);
        }
    else  // strips of QUANT_STRIP rows take each group in turn
      for (int s = 0; s < rows; s += QUANT_STRIP)
        for (int g = 0; g < full; g++)
          for (int r = s; r < s + QUANT_STRIP && r < rows; r++) {
            const uint8_t *b = w + r * bytes + g * group_bytes;
            for (size_t line = 0; line < group_bytes; line += 64)
              _mm_prefetch((const char *)b + PREFETCH_BYTES / QUANT_STRIP + line, _MM_HINT_T1);
            group32(type, b, NULL, QX_GROUP, M, call.xq + (size_t)g * M * QX_RECORD, acc[r]);
          }
    for (int r = 0; r < rows && tail; r += per) {
      const int n = rows - r < per ? rows - r : per;
      __m512 sums[MAX_QUANT_ROWS];
      for (int m = 0; m < M; m++) sums[m] = _mm512_setzero_ps();
      group32(type, w + r * bytes + full * group_bytes, packed, n * tail, M, call.tail, sums);
      for (int i = 0; i < n; i++) quant_add_tail(M, sums, i * tail, tail, acc[r + i]);
    }
    quant_store(&call, n0, rows, acc);
  }
}

// A thread's row groups lo .. hi - 1 of an interleaved matrix (interleave.c): per row group, block
// by block, the group of the 16 rows' block b decoded once (lane j: row j) against block b of each
// of the M records, each of its xq dwords broadcast to every lane (one vpdpbusd a vector); a
// lane's f32 accumulator is its row's output (the records' two layers added at the end). M
// constant where the caller makes it one.
static inline __attribute__((always_inline)) void row_groups32_m(const int type, const int M, int lo, int hi) {
  const int blocks = call.K / 32, x_rows = call.layers == 2 ? M / 2 : M;
  const size_t group_bytes = QX_GROUP * row_bytes(type, 32);
  for (int rg = lo; rg < hi; rg++) {
    const uint8_t *w = call.w + (size_t)rg * blocks * group_bytes;
    __m512 acc[MAX_QUANT_ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++, w += group_bytes) {
      for (size_t line = 0; line < group_bytes; line += 64)
        _mm_prefetch((const char *)w + PREFETCH_BYTES + line, _MM_HINT_T1);
      struct block_group g;
      decode_interleaved32(type, w, &g);
      if (type == Q8_0) as_unsigned(g.W);
      const uint8_t *x = call.xq + (size_t)(b / QX_GROUP) * M * QX_RECORD + 4 * (b % QX_GROUP);  // block b's lane
      for (int m = 0; m < M; m++, x += QX_RECORD) {
        __m512i lo_sum = _mm512_setzero_si512(), hi_sum = _mm512_setzero_si512();  // two chains
        for (int u = 0; u < 4; u++) {
          lo_sum = _mm512_dpbusd_epi32(lo_sum, g.W[u], _mm512_set1_epi32(*(const int32_t *)(x + 64 * u)));
          hi_sum = _mm512_dpbusd_epi32(hi_sum, g.W[4 + u], _mm512_set1_epi32(*(const int32_t *)(x + 64 * (4 + u))));
        }
        const __m512i s = _mm512_add_epi32(lo_sum, hi_sum);
        const __m512 dx = _mm512_set1_ps(*(const float *)(x + QX_D));
        if (type == Q4_1 || type == Q5_1)
          acc[m] = plus_min_terms(acc[m], s, dx, g.d, g.m, _mm512_set1_ps(*(const float *)(x + QX_DSUM)));
        else
          acc[m] = plus_offset_terms(acc[m], s, _mm512_set1_epi32(*(const int32_t *)(x + QX_SUM) << offset_shift(type)),
                                     dx, g.d);
      }
    }
    for (int m = 0; m < x_rows; m++) {
      float *out = call.out + (size_t)m * call.N + (size_t)rg * QX_GROUP;
      __m512 sums = x_rows < M ? _mm512_add_ps(acc[m], acc[m + x_rows]) : acc[m];
      if (call.accumulate) sums = _mm512_add_ps(sums, _mm512_loadu_ps(out));
      _mm512_storeu_ps(out, sums);
    }
  }
}

// a thread's share of the call: row groups lo .. hi - 1 (interleaved) or rows lo .. hi - 1 (GGUF's
// layout), with M constant for a decode step's usual record counts: 1, 2 (one row in two layers), 8, 16
static inline __attribute__((always_inline)) void rows32(const int type, const int row_groups, int lo, int hi) {
#define BY_M(m) (row_groups ? row_groups32_m(type, m, lo, hi) : rows32_m(type, m, lo, hi))
  switch (call.M) {
    case 1: BY_M(1); break;
    case 2: BY_M(2); break;
    case 8: BY_M(8); break;
    case 16: BY_M(16); break;
    default: BY_M(call.M);
  }
#undef BY_M
}

static void rows_q4_0(int row_groups, int lo, int hi) { rows32(Q4_0, row_groups, lo, hi); }
static void rows_q4_1(int row_groups, int lo, int hi) { rows32(Q4_1, row_groups, lo, hi); }
static void rows_q5_0(int row_groups, int lo, int hi) { rows32(Q5_0, row_groups, lo, hi); }
static void rows_q5_1(int row_groups, int lo, int hi) { rows32(Q5_1, row_groups, lo, hi); }
static void rows_q8_0(int row_groups, int lo, int hi) { rows32(Q8_0, row_groups, lo, hi); }

static void rows_of(int type, int row_groups, int lo, int hi) {
  switch (type) {
    case Q4_0: rows_q4_0(row_groups, lo, hi); break;
    case Q4_1: rows_q4_1(row_groups, lo, hi); break;
    case Q5_0: rows_q5_0(row_groups, lo, hi); break;
    case Q5_1: rows_q5_1(row_groups, lo, hi); break;
    case Q8_0: rows_q8_0(row_groups, lo, hi); break;
    default: quant_rows_k(&call, lo, hi);
  }
}

_Static_assert(QUANT_STRIP == 8, "quant_store sums 8 rows at a time");

void quant_store(const struct quant_call *c, int n0, int rows, __m512 (*acc)[MAX_QUANT_ROWS]) {
  // the lane sums of a batch's 8 rows at once, per row m of x (its two layers' lanes added first):
  // halves added (256-bit: two rows a register, 128-bit: four), then pairs of lanes and neighbours:
  // rows r and 4 + r in lanes 4r and 4r + 2 of d
  const __mmask8 live = (__mmask8)((1u << rows) - 1);
  const int x_rows = c->layers == 2 ? c->M / 2 : c->M;
  for (int m = 0; m < x_rows; m++) {
    __m512 v[QUANT_STRIP], a[4], b[2];
    for (int r = 0; r < QUANT_STRIP; r++)
      v[r] = r >= rows ? _mm512_setzero_ps() : x_rows < c->M ? _mm512_add_ps(acc[r][m], acc[r][m + x_rows]) : acc[r][m];
    for (int i = 0; i < 4; i++)
      a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int k = 0; k < 2; k++)
      b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88),
                           _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xDD));
    const __m512 pairs = _mm512_add_ps(_mm512_shuffle_ps(b[0], b[1], 0x44), _mm512_shuffle_ps(b[0], b[1], 0xEE));
    const __m512 d = _mm512_add_ps(pairs, _mm512_permute_ps(pairs, 0xB1));
    const __m512i rows_in_order = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    __m256 sums = _mm512_castps512_ps256(_mm512_permutexvar_ps(rows_in_order, d));
    float *out = c->out + (size_t)m * c->N + n0;
    if (c->accumulate) sums = _mm256_add_ps(sums, _mm256_maskz_loadu_ps(live, out));
    _mm256_mask_storeu_ps(out, live, sums);
  }
}

// weight rows split evenly among the threads; an interleaved matrix's by row groups, its last N % 16
// rows (GGUF's layout) the last thread's too
static void quant_part(int part) {
  if (call.interleaved) {
    const int groups = call.N / QX_GROUP;
    rows_of(call.type, 1, (int)((long long)groups * part / pool_threads), (int)((long long)groups * (part + 1) / pool_threads));
    if (part == pool_threads - 1 && groups * QX_GROUP < call.N) rows_of(call.type, 0, groups * QX_GROUP, call.N);
    return;
  }
  rows_of(call.type, 0, (int)((long long)call.N * part / pool_threads), (int)((long long)call.N * (part + 1) / pool_threads));
}

// out [M, N] (+)= x @ dequant(w)^T, x as xq (quantize_activations of M rows of K in `layers`), w
// [N, K] in `type` (with INTERLEAVED: a 32-weight format's rows in that layout); 1 <= M x layers
// <= MAX_QUANT_ROWS, K a multiple of the type's block (the caller checks).
EXPORT void quant_matmul(int type, int M, int layers, const void *xq, int K, const uint8_t *w, int N, float *out,
                         int accumulate) {
  static uint8_t tail[MAX_QUANT_ROWS * QX_RECORD] __attribute__((aligned(64)));
  pool_lock();
  M *= layers;  // records per group from here on
  call.interleaved = (type & INTERLEAVED) != 0, type &= ~INTERLEAVED;
  call.type = type, call.M = M, call.layers = layers, call.xq = xq, call.K = K, call.w = w, call.N = N, call.out = out;
  call.accumulate = accumulate;
  call.strip = activation_bytes(M, K) > XQ_IN_L1 ? QUANT_STRIP : 1;
  const int blocks = K / 32, full = blocks / QX_GROUP;
  if (blocks % QX_GROUP && (!call.interleaved || N % QX_GROUP)) {  // rows in GGUF's layout have tails:
    // the tail records, lane j = lane j % tail: one row's tail per `tail` lanes
    int32_t lane[QX_GROUP];
    for (int j = 0; j < QX_GROUP; j++) lane[j] = j % (blocks % QX_GROUP);
    const __m512i index = _mm512_loadu_si512(lane);
    const uint8_t *from = (const uint8_t *)xq + (size_t)full * M * QX_RECORD;
    for (int v = 0; v < M * QX_RECORD / 64; v++)
      _mm512_store_si512(tail + 64 * v, _mm512_permutexvar_epi32(index, _mm512_loadu_si512(from + 64 * v)));
    call.tail = tail;
  }
  pool_run_sized(quant_part, (size_t)N * row_bytes(type, K));
  pool_unlock();
}

#endif
