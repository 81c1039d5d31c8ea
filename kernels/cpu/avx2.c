// avx2_block_matmul: a decode step's matmul on the 32-weight block formats (q4_0, q4_1, q5_0,
// q5_1, q8_0, rows as GGUF stores them) with AVX2 and FMA, for CPUs without AVX-512 (Zen 1-3,
// Intel's client cores), where the other ops of a step stay on the NumPy reference. Without it
// such a CPU dequantizes every matrix to f32 at every step.
//
// The activations: each row of x [M, K] is cut into blocks of 32; block b gets d = max|x| / 127
// and q = round-half-even(x / d) in int8 (d = 0: q = 0), with s = d sum(q); in two layers a
// second record per row holds the rounding error x - d q quantized the same way (quant.c's
// activations, without its lane layout: a record here is a row's blocks in k order).
//
// One thread: its share of the weight rows; per row and block, the 32 weights decoded once into
// a ymm of bytes (weight j in byte j: q4 nibbles, q5 with qh's bit as 16, q8_0 signed), then per
// record: vpmaddubsw (weights as unsigned bytes times the signed activations: pairs in int16,
// which 31 x 127 x 2 cannot overflow) and vpmaddwd by ones give 8 int32 partial sums, converted
// and multiplied by d_w d_x into the record's 8-lane f32 accumulator; a scalar per record
// collects the block's constant term: d_w (-c) s_x for q4_0 (c = 8) and q5_0 (c = 16), stored
// as q - c; m_w s_x for q4_1 and q5_1 (d q + m). q8_0's signed weights take the sign trick
// (vpsignb: |w| times x with w's sign, |w| <= 128 keeps the pairs in int16). The row's output is
// the lane sum plus the scalar (two layers: both records').
//
// Numerics: each block's integer dot product is exact; d_w d_x times it in f32, summed in k
// order per lane: next to an f32 dot product with the dequantized weights, only the
// activations' int8 rounding and the summation order differ (quant.c's bound holds).
#include "cpu.h"
#ifdef PYLLM_AVX2

#define MAX_RECORDS 32  // rows of x a call takes (16) times layers (2)

struct x_block {  // one block of 32 of a row of x
  float d;        // its scale
  float dsum;     // d sum(q)
  int8_t q[32];
};

static struct {  // the current avx2_block_matmul call
  const struct x_block *x;  // [records, K / 32]: rows 0 .. M - 1, then their second layers
  const uint8_t *w;
  float *out;
  int type, M, records, K, N, accumulate;
} avx2;

static inline __m256 keep256(__m256 v) {  // v as computed: no contraction of d q into an FMA
  __asm__("" : "+x"(v));
  return v;
}

// v [32] -> its block (the layout above)
static struct x_block quantize_block(const float *v) {
  struct x_block b = {0};
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 top = _mm256_setzero_ps();
  for (int i = 0; i < 32; i += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + i)));
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  b.d = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t))) / 127.0f;
  if (b.d == 0.0f) return b;
  int sum = 0;
  for (int i = 0; i < 32; i += 8) {  // cvtps rounds half to even (the MXCSR default)
    __m256i r = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(v + i), _mm256_set1_ps(b.d)));
    r = _mm256_max_epi32(_mm256_min_epi32(r, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
    int32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, r);
    for (int j = 0; j < 8; j++) b.q[i + j] = (int8_t)lanes[j], sum += lanes[j];
  }
  b.dsum = b.d * (float)sum;
  return b;
}

// x [M, K] -> avx2.x's records, in `layers` layers
static void quantize_rows(int M, int layers, int K, const float *x, struct x_block *out) {
  const int blocks = K / 32;
  for (int m = 0; m < M; m++)
    for (int b = 0; b < blocks; b++) {
      const float *v = x + (size_t)m * K + 32 * b;
      const struct x_block first = quantize_block(v);
      out[(size_t)m * blocks + b] = first;
      if (layers == 2) {
        float error[32];
        for (int i = 0; i < 32; i += 8) {
          const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(first.q + i)));
          const __m256 dq = keep256(_mm256_mul_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(first.d)));
          _mm256_storeu_ps(error + i, _mm256_sub_ps(_mm256_loadu_ps(v + i), dq));
        }
        out[(size_t)(M + m) * blocks + b] = quantize_block(error);
      }
    }
}

static inline float f16_at(const uint8_t *p) {
  uint16_t h;
  memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

struct weight_block {
  __m256i q;  // weight j in byte j: unsigned (q8_0: signed)
  float d;    // its scale
  float bias; // the constant term per unit of s_x: -c d (q4_0, q5_0), m (q4_1, q5_1), 0 (q8_0)
};

// GGUF's block at p (type's layout: d, [m], [qh], qs) -> its 32 weights as bytes
static inline __attribute__((always_inline)) struct weight_block decode_block(const int type, const uint8_t *p) {
  struct weight_block b;
  b.d = f16_at(p);
  if (type == Q8_0) {
    b.q = _mm256_loadu_si256((const __m256i *)(p + 2)), b.bias = 0.0f;
    return b;
  }
  const int has_min = type == Q4_1 || type == Q5_1, has_qh = type == Q5_0 || type == Q5_1;
  const uint8_t *qs = p + 2 + 2 * has_min + 4 * has_qh;
  const __m128i bytes = _mm_loadu_si128((const __m128i *)qs);  // weight j, j + 16 in byte j's nibbles
  b.q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0F));
  if (has_qh) {  // byte j + 16 where bit j of qh is set: byte j holds qh's byte j / 8, tested at bit j % 8
    int32_t qh;
    memcpy(&qh, p + 2 + 2 * has_min, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(qh), _mm256_setr_epi64x(0, 0x0101010101010101LL,
                                                                                        0x0202020202020202LL,
                                                                                        0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    b.q = _mm256_or_si256(b.q, _mm256_and_si256(set, _mm256_set1_epi8(16)));
  }
  b.bias = has_min ? f16_at(p + 2) : -(type == Q4_0 ? 8.0f : 16.0f) * b.d;
  return b;
}

static inline __m256i block_dot(const int type, __m256i w, const int8_t *q) {  // 8 int32 partial sums of w . q
  const __m256i x = _mm256_loadu_si256((const __m256i *)q);
  const __m256i pairs = type == Q8_0 ? _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
                                     : _mm256_maddubs_epi16(w, x);
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

static inline float lane_sum(__m256 v) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// weight rows lo .. hi - 1 against every record, R records (constant where the caller makes it)
static inline __attribute__((always_inline)) void rows_avx2(const int type, const int R, int lo, int hi) {
  const int blocks = avx2.K / 32, x_rows = avx2.M;
  const size_t stride = type == Q4_0 ? 18 : type == Q4_1 ? 20 : type == Q5_0 ? 22 : type == Q5_1 ? 24 : 34;  // a block's bytes
  for (int n = lo; n < hi; n++) {
    const uint8_t *w = avx2.w + (size_t)n * blocks * stride;
    __m256 acc[MAX_RECORDS];
    float constant[MAX_RECORDS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps(), constant[r] = 0.0f;
    for (int b = 0; b < blocks; b++) {
      _mm_prefetch((const char *)(w + (b + 16) * stride), _MM_HINT_T0);
      const struct weight_block wb = decode_block(type, w + b * stride);
      for (int r = 0; r < R; r++) {
        const struct x_block *x = avx2.x + (size_t)r * blocks + b;
        const __m256 dots = _mm256_cvtepi32_ps(block_dot(type, wb.q, x->q));
        acc[r] = _mm256_fmadd_ps(dots, _mm256_set1_ps(wb.d * x->d), acc[r]);
        constant[r] += wb.bias * x->dsum;
      }
    }
    for (int m = 0; m < x_rows; m++) {
      float sum = 0.0f;
      for (int r = m; r < R; r += x_rows) sum += lane_sum(acc[r]) + constant[r];  // the row's layers
      float *out = avx2.out + (size_t)m * avx2.N + n;
      *out = avx2.accumulate ? *out + sum : sum;
    }
  }
}

static inline __attribute__((always_inline)) void rows_of_type(const int type, int lo, int hi) {
  switch (avx2.records) {  // a decode step's usual record counts: 1 row in 1 or 2 layers, 4 x 2, 8, 16
    case 1: rows_avx2(type, 1, lo, hi); break;
    case 2: rows_avx2(type, 2, lo, hi); break;
    case 8: rows_avx2(type, 8, lo, hi); break;
    case 16: rows_avx2(type, 16, lo, hi); break;
    default: rows_avx2(type, avx2.records, lo, hi);
  }
}

static void avx2_part(int part) {
  const int lo = (int)((long long)avx2.N * part / pool_threads), hi = (int)((long long)avx2.N * (part + 1) / pool_threads);
  switch (avx2.type) {
    case Q4_0: rows_of_type(Q4_0, lo, hi); break;
    case Q4_1: rows_of_type(Q4_1, lo, hi); break;
    case Q5_0: rows_of_type(Q5_0, lo, hi); break;
    case Q5_1: rows_of_type(Q5_1, lo, hi); break;
    default: rows_of_type(Q8_0, lo, hi);
  }
}

// out [M, N] (+)= x [M, K] @ dequant(w)^T, w [N, K] in GGUF's rows of `type` (q4_0, q4_1, q5_0,
// q5_1, q8_0), x quantized in `layers` (1, 2) int8 layers; 1 <= M <= 16, K a multiple of 32
// (the caller checks).
EXPORT void avx2_block_matmul(int type, int M, int layers, const float *x, int K, const uint8_t *w, int N,
                              float *out, int accumulate) {
  static struct x_block *records;
  static size_t allocated;  // records' blocks, kept between calls
  const size_t needed = (size_t)M * layers * (K / 32);
  pool_lock();
  if (needed > allocated) {
    free(records);
    records = malloc(needed * sizeof *records);
    if (records == NULL) abort();
    allocated = needed;
  }
  quantize_rows(M, layers, K, x, records);
  avx2.x = records, avx2.w = w, avx2.out = out;
  avx2.type = type, avx2.M = M, avx2.records = M * layers, avx2.K = K, avx2.N = N, avx2.accumulate = accumulate;
  pool_run_sized(avx2_part, (size_t)N * K / 2);
  pool_unlock();
}
#endif
