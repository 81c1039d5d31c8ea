// The lane operations rows.c and attention.c are written in, once for both instruction sets:
// 16 lanes with AVX-512, 8 with AVX2. A mask_t selects lanes (AVX-512: a mask register; AVX2: all
// bits of a lane set, or none); load and store take one, vload and vstore move whole vectors.
#pragma once
#include "cpu.h"
#if defined(__AVX512F__) || defined(PYLLM_AVX2)
#ifdef __AVX512F__
#define LANES 16
typedef __m512 lanes_t;
typedef __mmask16 mask_t;
static inline mask_t lanes(int left) {  // lanes 0 .. left - 1, left >= 1
  return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
}
static inline lanes_t load(const float *p, mask_t m) { return _mm512_maskz_loadu_ps(m, p); }
static inline void store(float *p, mask_t m, lanes_t v) { _mm512_mask_storeu_ps(p, m, v); }
static inline lanes_t all(float x) { return _mm512_set1_ps(x); }
static inline lanes_t add(lanes_t a, lanes_t b) { return _mm512_add_ps(a, b); }
static inline lanes_t sub(lanes_t a, lanes_t b) { return _mm512_sub_ps(a, b); }
static inline lanes_t mul(lanes_t a, lanes_t b) { return _mm512_mul_ps(a, b); }
static inline lanes_t divide(lanes_t a, lanes_t b) { return _mm512_div_ps(a, b); }
static inline lanes_t fmadd(lanes_t a, lanes_t b, lanes_t c) { return _mm512_fmadd_ps(a, b, c); }
static inline lanes_t exp_lanes(lanes_t x) { return exp512(x); }
static inline float sum_lanes(lanes_t v) { return _mm512_reduce_add_ps(v); }
static inline lanes_t vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, lanes_t v) { _mm512_storeu_ps(p, v); }
static inline lanes_t maximum(lanes_t a, lanes_t b) { return _mm512_max_ps(a, b); }
typedef __m512i ints_t;
static inline ints_t load_ints(const int *p) { return _mm512_loadu_si512(p); }
static inline mask_t no_lanes(void) { return 0; }
static inline mask_t every_lane(void) { return 0xFFFF; }
static inline mask_t seen_by(int key, ints_t position) {  // the lanes whose position >= key
  return _mm512_cmp_epi32_mask(_mm512_set1_epi32(key), position, _MM_CMPINT_LE);
}
static inline lanes_t zero_unless(mask_t m, lanes_t v) { return _mm512_maskz_mov_ps(m, v); }
static inline lanes_t max_where(mask_t m, lanes_t top, lanes_t v) { return _mm512_mask_max_ps(top, m, top, v); }
#else  // AVX2
#define LANES 8
typedef __m256 lanes_t;
typedef __m256i mask_t;
static inline mask_t lanes(int left) { return lanes8(left); }
static inline lanes_t load(const float *p, mask_t m) { return _mm256_maskload_ps(p, m); }
static inline void store(float *p, mask_t m, lanes_t v) {  // vmaskmovps' stores are microcoded on AMD: full ones go plain
  if (_mm256_movemask_ps(_mm256_castsi256_ps(m)) == 0xFF) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, m, v);
}
static inline lanes_t all(float x) { return _mm256_set1_ps(x); }
static inline lanes_t add(lanes_t a, lanes_t b) { return _mm256_add_ps(a, b); }
static inline lanes_t sub(lanes_t a, lanes_t b) { return _mm256_sub_ps(a, b); }
static inline lanes_t mul(lanes_t a, lanes_t b) { return _mm256_mul_ps(a, b); }
static inline lanes_t divide(lanes_t a, lanes_t b) { return _mm256_div_ps(a, b); }
static inline lanes_t fmadd(lanes_t a, lanes_t b, lanes_t c) { return _mm256_fmadd_ps(a, b, c); }
static inline lanes_t exp_lanes(lanes_t x) { return exp256(x); }
static inline float sum_lanes(lanes_t v) { return sum8(v); }
static inline lanes_t vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, lanes_t v) { _mm256_storeu_ps(p, v); }
static inline lanes_t maximum(lanes_t a, lanes_t b) { return _mm256_max_ps(a, b); }
typedef __m256i ints_t;
static inline ints_t load_ints(const int *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline mask_t no_lanes(void) { return _mm256_setzero_si256(); }
static inline mask_t every_lane(void) { return _mm256_set1_epi32(-1); }
static inline mask_t seen_by(int key, ints_t position) {  // the lanes whose position >= key
  return _mm256_xor_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(key), position), every_lane());
}
static inline lanes_t zero_unless(mask_t m, lanes_t v) { return _mm256_and_ps(_mm256_castsi256_ps(m), v); }
static inline lanes_t max_where(mask_t m, lanes_t top, lanes_t v) {
  return _mm256_max_ps(top, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, _mm256_castsi256_ps(m)));
}
#endif
#endif
