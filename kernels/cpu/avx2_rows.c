// rows.c's kernels, rms_norm, swiglu and qkv_rope, for CPUs with AVX2 but without AVX-512: the
// same contracts (cpu.h), a row 8 lanes at a time with a masked tail. A decode step's rows run on
// the caller; a prompt's many are split evenly among the pool's threads (pool_run_sized).
#include "cpu.h"
#if defined(PYLLM_AVX2) && !defined(__AVX512F__)

static struct {  // the current row kernel call
  void (*row)(int r);
  int rows;
} each_row;

static void rows_part(int part) {
  const int lo = (int)((long long)each_row.rows * part / pool_threads);
  const int hi = (int)((long long)each_row.rows * (part + 1) / pool_threads);
  for (int r = lo; r < hi; r++) each_row.row(r);
}

static void for_each_row(void (*row)(int r), int rows, size_t bytes) {  // with the pool taken
  each_row.row = row, each_row.rows = rows;
  pool_run_sized(rows_part, bytes);
}

static struct {  // the current rms_norm call
  const float *x, *weight;
  float *out;
  int width;
  float eps;
} norm;

// rms_norm: out [T, width] = x / sqrt(mean(x^2) + eps) * weight, as HF's LlamaRMSNorm (f32
// statistics: 8 partial sums of squares, added at the end)
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

EXPORT void rms_norm(int T, int width, const float *x, const float *weight, float eps, float *out) {
  pool_lock();
  norm.x = x, norm.weight = weight, norm.out = out, norm.width = width, norm.eps = eps;
  for_each_row(norm_row, T, sizeof(float) * (size_t)T * width);
  pool_unlock();
}

static struct {  // the current swiglu call
  const float *gate_up;
  float *out;
  int width;
} glu;

// swiglu: out [T, width] = silu(gate) * up = gate / (1 + exp(-gate)) * up, gate_up [T, 2 width] (gate | up)
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

EXPORT void swiglu(int T, int width, const float *gate_up, float *out) {
  pool_lock();
  glu.gate_up = gate_up, glu.out = out, glu.width = width;
  for_each_row(glu_row, T, sizeof(float) * 2 * (size_t)T * width);
  pool_unlock();
}

static struct {  // the current qkv_rope call
  const float *qkv, *bias, *cos, *sin;
  float *k, *v, *q;  // k, v: the KV pool
  const int32_t *const *tables;
  const int *sequence, *position;  // per row: its sequence, and its position
  int H, KV, D, layer, layers;
} qkv;

// qkv_rope, one token (rows.c states the rule): rope on its query and key heads, values copied
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

// A step's rows through the KV pool's block tables, as rows.c's qkv_rope. D % 2 == 0.
EXPORT void qkv_rope(int S, int H, int KV, int D, int layer, int layers, const float *qkv_in, const float *bias,
                     const float *cos, const float *sin, float *k, float *v, const int32_t *const *tables,
                     const int *length, const int *count, float *q) {
  int T = 0;
  for (int s = 0; s < S; s++) T += count[s];
  int *per_row = rows_of_step(S, length, count, T);  // sequences, then positions
  pool_lock();
  qkv.qkv = qkv_in, qkv.bias = bias, qkv.cos = cos, qkv.sin = sin, qkv.k = k, qkv.v = v, qkv.q = q;
  qkv.tables = tables, qkv.sequence = per_row, qkv.position = per_row + T;
  qkv.H = H, qkv.KV = KV, qkv.D = D, qkv.layer = layer, qkv.layers = layers;
  for_each_row(qkv_row, T, sizeof(float) * (size_t)T * (H + 2 * KV) * D);
  pool_unlock();
  free(per_row);
}
#endif
