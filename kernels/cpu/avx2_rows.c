// rows.c's kernels, rms_norm, swiglu and qkv_rope (rows.h: their arguments, split and calls), for
// CPUs with AVX2 but without AVX-512: a row (a token) is 8 lanes at a time with a masked tail.
#include "cpu.h"
#if defined(PYLLM_AVX2) && !defined(__AVX512F__)
#include "rows.h"

// a row's sum of squares: 8 partial sums, added at the end
static void norm_row(int r) {
  const float *x = norm.x + (size_t)r * norm.width;
  float *out = norm.out + (size_t)r * norm.width;
  __m256 squares = _mm256_setzero_ps();
  for (int i = 0; i < norm.width; i += 8) {
    const __m256 v = _mm256_maskload_ps(x + i, lanes8(norm.width - i));
    squares = _mm256_fmadd_ps(v, v, squares);
  }
  const __m256 scale = _mm256_set1_ps(1.0f / sqrtf(sum8(squares) / norm.width + norm.eps));
  for (int i = 0; i < norm.width; i += 8) {
    const __m256i m = lanes8(norm.width - i);
    _mm256_maskstore_ps(out + i, m, _mm256_mul_ps(_mm256_mul_ps(_mm256_maskload_ps(x + i, m), scale),
                                                  _mm256_maskload_ps(norm.weight + i, m)));
  }
}

static void glu_row(int r) {
  const float *gate = glu.gate_up + (size_t)r * 2 * glu.width, *up = gate + glu.width;
  float *out = glu.out + (size_t)r * glu.width;
  for (int i = 0; i < glu.width; i += 8) {
    const __m256i m = lanes8(glu.width - i);
    const __m256 g = _mm256_maskload_ps(gate + i, m);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_maskstore_ps(out + i, m, _mm256_mul_ps(silu, _mm256_maskload_ps(up + i, m)));
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
    for (int i = 0; i < half; i += 8) {
      const __m256i m = lanes8(half - i);
      __m256 x1 = _mm256_maskload_ps(x + i, m), x2 = _mm256_maskload_ps(x + half + i, m);
      if (b) x1 = _mm256_add_ps(x1, _mm256_maskload_ps(b + i, m)), x2 = _mm256_add_ps(x2, _mm256_maskload_ps(b + half + i, m));
      if (g < qkv.KV) {  // query or key: rotate
        const __m256 cs = _mm256_maskload_ps(c + i, m), sn_i = _mm256_maskload_ps(sn + i, m);
        const __m256 r1 = _mm256_sub_ps(_mm256_mul_ps(x1, cs), _mm256_mul_ps(x2, sn_i));
        x2 = _mm256_add_ps(_mm256_mul_ps(x2, cs), _mm256_mul_ps(x1, sn_i));
        x1 = r1;
      }
      _mm256_maskstore_ps(out + i, m, x1);
      _mm256_maskstore_ps(out + half + i, m, x2);
    }
  }
}
#endif
