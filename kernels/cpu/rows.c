// Row kernels, rms_norm, swiglu and qkv_rope: a row (a token) is LANES floats at a time with a
// masked tail, in 16 lanes (AVX-512) or, on a CPU without it, 8 (AVX2): one method, through
// lanes.h's few lane operations.
#include "cpu.h"
#if defined(__AVX512F__) || defined(PYLLM_AVX2)
#include "lanes.h"

// Rows are split evenly among the threads, or all run on the caller when the call is too small to
// pay for the handoff (a decode step's few rows of rms_norm and swiglu). qkv_rope splits from far
// fewer floats (QKV_SERIAL_FLOATS): its rows read the k and v columns the decode matmul's last
// thread wrote and write KV-cache lines no cache holds, which cost the caller alone more than the
// handoff once a row is a few KB (SmolLM2's: 3.75 KB; a tiny test model's 0.5 KB stays serial).
#define SERIAL_FLOATS 32768
#define QKV_SERIAL_FLOATS 512

static struct {  // the current row kernel call
  void (*row)(int r);
  int rows;
} each_row;

static void rows_part(int part) {
  const int lo = (int)((long long)each_row.rows * part / pool_threads);
  const int hi = (int)((long long)each_row.rows * (part + 1) / pool_threads);
  for (int r = lo; r < hi; r++) each_row.row(r);
}

static void for_each_row(void (*row)(int r), int rows, long floats) {  // with call_lock held
  each_row.row = row, each_row.rows = rows;
  if (floats < SERIAL_FLOATS)
    for (int r = 0; r < rows; r++) row(r);
  else
    pool_run(rows_part);
}

static struct {  // the current rms_norm call
  const float *x, *weight;
  float *out;
  int width;
  float eps;
} norm;

static struct {  // the current swiglu call
  const float *gate_up;
  float *out;
  int width;
} glu;

static struct {  // the current qkv_rope call
  const float *qkv, *bias, *cos, *sin;
  float *k, *v, *q;  // k, v: the KV pool
  const int32_t *const *tables;
  const int *sequence, *position;  // per row: its sequence, and its position
  int H, KV, D, layer, layers;
} qkv;

// a row's sum of squares: LANES partial sums, added at the end
static void norm_row(int r) {
  const float *x = norm.x + (size_t)r * norm.width;
  float *out = norm.out + (size_t)r * norm.width;
  lanes_t squares = all(0.0f);
  for (int i = 0; i < norm.width; i += LANES) {
    const lanes_t v = load(x + i, lanes(norm.width - i));
    squares = fmadd(v, v, squares);
  }
  const lanes_t scale = all(1.0f / sqrtf(sum_lanes(squares) / norm.width + norm.eps));
  for (int i = 0; i < norm.width; i += LANES) {
    const mask_t m = lanes(norm.width - i);
    store(out + i, m, mul(mul(load(x + i, m), scale), load(norm.weight + i, m)));
  }
}

static void glu_row(int r) {
  const float *gate = glu.gate_up + (size_t)r * 2 * glu.width, *up = gate + glu.width;
  float *out = glu.out + (size_t)r * glu.width;
  for (int i = 0; i < glu.width; i += LANES) {
    const mask_t m = lanes(glu.width - i);
    const lanes_t g = load(gate + i, m);
    const lanes_t silu = divide(g, add(all(1.0f), exp_lanes(sub(all(0.0f), g))));
    store(out + i, m, mul(silu, load(up + i, m)));
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
    for (int i = 0; i < half; i += LANES) {
      const mask_t m = lanes(half - i);
      lanes_t x1 = load(x + i, m), x2 = load(x + half + i, m);
      if (b) x1 = add(x1, load(b + i, m)), x2 = add(x2, load(b + half + i, m));
      if (g < qkv.KV) {  // query or key: rotate
        const lanes_t cs = load(c + i, m), sn_i = load(sn + i, m);
        const lanes_t r1 = sub(mul(x1, cs), mul(x2, sn_i));
        x2 = add(mul(x2, cs), mul(x1, sn_i));
        x1 = r1;
      }
      store(out + i, m, x1);
      store(out + half + i, m, x2);
    }
  }
}
EXPORT void rms_norm(int T, int width, const float *x, const float *weight, float eps, float *out) {
  pool_lock();
  norm.x = x, norm.weight = weight, norm.out = out, norm.width = width, norm.eps = eps;
  for_each_row(norm_row, T, (long)T * width);
  pool_unlock();
}

// swiglu: out [T, width] = silu(gate) * up = gate / (1 + exp(-gate)) * up, gate_up [T, 2 width] (gate | up)
EXPORT void swiglu(int T, int width, const float *gate_up, float *out) {
  pool_lock();
  glu.gate_up = gate_up, glu.out = out, glu.width = width;
  for_each_row(glu_row, T, (long)T * width);
  pool_unlock();
}

// qkv_rope: one token's fused projections qkv [(H + 2 KV) * D] (+ bias): rope (HF's rotate_half
// layout: the first and second halves of a head are the pairs) on its H query heads -> q [H, D],
// and on its KV key heads -> k at the layer, in its position's block and row; its value heads ->
// the same place in v. Its position also picks the row of the cos, sin tables [positions, D / 2].
// A step's rows: sequence s owns count[s] consecutive rows, the last of its length[s] tokens, and
// writes them at layer `layer` of the KV pool k, v [blocks, layers, KV, BLOCK_TOKENS, D] through
// its block table tables[s], as attention reads them (writers of one call write distinct rows). D % 2 == 0.
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
  for_each_row(qkv_row, T, (long)T * (H + 2 * KV) * D * (SERIAL_FLOATS / QKV_SERIAL_FLOATS));
  pool_unlock();
  free(per_row);
}
#endif
