// rows.c's and avx2_rows.c's shared half: the row kernels' arguments, their split among the
// threads and the exported calls (the contracts in cpu.h). The including file defines what one
// row takes, in its lanes: norm_row (rms_norm), glu_row (swiglu) and qkv_row (qkv_rope).
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

static void norm_row(int r);  // the including file's, in its lanes
static void glu_row(int r);
static void qkv_row(int t);

// rms_norm: out [T, width] = x / sqrt(mean(x^2) + eps) * weight, as HF's LlamaRMSNorm (f32 statistics)
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
