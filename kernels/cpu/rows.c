// Row kernels, rms_norm, swiglu and qkv_rope (rows.h: their arguments, split and calls): a row (a
// token) is 16 lanes at a time with a masked tail.
#include "cpu.h"
#ifdef __AVX512F__
#include "rows.h"

static inline __mmask16 lanes(int left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

// a row's sum of squares: 16 partial sums, added at the end
static void norm_row(int r) {
  const float *x = norm.x + (size_t)r * norm.width;
  float *out = norm.out + (size_t)r * norm.width;
  __m512 squares = _mm512_setzero_ps();
  for (int i = 0; i < norm.width; i += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(lanes(norm.width - i), x + i);
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / norm.width + norm.eps));
  for (int i = 0; i < norm.width; i += 16) {
    const __mmask16 m = lanes(norm.width - i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), scale),
                                                    _mm512_maskz_loadu_ps(m, norm.weight + i)));
  }
}

static void glu_row(int r) {
  const float *gate = glu.gate_up + (size_t)r * 2 * glu.width, *up = gate + glu.width;
  float *out = glu.out + (size_t)r * glu.width;
  for (int i = 0; i < glu.width; i += 16) {
    const __mmask16 m = lanes(glu.width - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, up + i)));
  }
}

static void qkv_row(int t) {
  const int D = qkv.D, half = D / 2, position = qkv.position[t];
  const int block = qkv.tables[qkv.sequence[t]][position / BLOCK_TOKENS];
  const float *c = qkv.cos + (size_t)position * half, *sn = qkv.sin + (size_t)position * half;
  const float *row = qkv.qkv + (size_t)t * (qkv.H + 2 * qkv.KV) * D;
  for (int h = 0; h < qkv.H + 2 * qkv.KV; h++) {
    const float *x = row + (size_t)h * D, *b = qkv.bias ? qkv.bias + (size_t)h * D : NULL;
    const int g = h - qkv.H;  // past the query heads: key head g, then value head g - KV
    float *out = qkv_destination(h, t, qkv.H, qkv.KV, D, block, position, qkv.layer, qkv.layers, qkv.q, qkv.k, qkv.v);
    for (int i = 0; i < half; i += 16) {
      const __mmask16 m = lanes(half - i);
      __m512 x1 = _mm512_maskz_loadu_ps(m, x + i), x2 = _mm512_maskz_loadu_ps(m, x + half + i);
      if (b) x1 = _mm512_add_ps(x1, _mm512_maskz_loadu_ps(m, b + i)), x2 = _mm512_add_ps(x2, _mm512_maskz_loadu_ps(m, b + half + i));
      if (g < qkv.KV) {  // query or key: rotate
        const __m512 cs = _mm512_maskz_loadu_ps(m, c + i), sn_i = _mm512_maskz_loadu_ps(m, sn + i);
        const __m512 r1 = _mm512_sub_ps(_mm512_mul_ps(x1, cs), _mm512_mul_ps(x2, sn_i));
        x2 = _mm512_add_ps(_mm512_mul_ps(x2, cs), _mm512_mul_ps(x1, sn_i));
        x1 = r1;
      }
      _mm512_mask_storeu_ps(out + i, m, x1);
      _mm512_mask_storeu_ps(out + half + i, m, x2);
    }
  }
}

#endif
