// variants: -DSCALAR_T=float -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16
// Causal attention with grouped-query heads for a whole step (every sequence's new tokens, decode
// and prefill alike) in one launch, the keys optionally split across blocks (flash-decoding):
//   out[t, h] = sum_j p_j v[g, j],  p = softmax_j(q[t, h] . k[g, j] / sqrt(D)) over j <= position(t),
// where g = h / (H / KV) is the key/value head that query head h shares with its group (HF's
// repeat_kv) and position(t) is token t's place in its own sequence.
//
// Tokens: tokens[2t] = position(t), tokens[2t + 1] = where its sequence's block table starts in
// `tables` (int32, every sequence's table one after another). Keys and values are the model's KV
// pools [blocks, layers, KV, BLOCK_TOKENS, D] (common.cuh), read at `layer` through the table: key
// j is row j % BLOCK_TOKENS of block table[j / BLOCK_TOKENS]. Blocks may sit anywhere and be shared.
// q, out [T, H, D] contiguous.
//
// attention -- launch: grid = (T, H, splits), block = 128 threads (whole warps); block (t, h, z)
// takes token t's keys z * chunk .. min(position(t) + 1, (z + 1) * chunk) - 1 for query head h
// (none: a split past a short sequence's keys). Dynamic shared memory, in floats (mirrored by
// attention_shared_bytes in pyllm/backends/cuda_backend.py): q [D] | scores [chunk] | partial sums
// [n_slices * D], n_slices = max(1, blockDim.x / D).
//   splits == 1: out[t, h] directly, rounded to SCALAR_T once.
//   splits > 1: partial[z, t, h] = sum_j e_j v_j with e_j = exp(s_j - m_z) over the split's keys,
//   and stats[z, t, h] = (m_z, sum_j e_j) (m_z = -inf, 0 for no keys), all f32; then
// attention_merge -- launch: grid = (T, H), block = 128 threads; block (t, h) rescales every
// split's partial to the largest m_z: out = sum_z exp(m_z - m) partial_z / sum_z exp(m_z - m) sum_z.
// Numerics: all f32. q is staged pre-scaled by 1/sqrt(D); each thread scores whole keys (a D-long
// dot product, so scoring needs no reduction); the maximum comes by warp shuffles (common.cuh); the
// weighted sum of V accumulates in f32 and is divided by the sum of the exponentials at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

extern "C" __global__ void attention(const SCALAR_T* __restrict__ q, const SCALAR_T* __restrict__ k_pool,
                                     const SCALAR_T* __restrict__ v_pool, const int* __restrict__ tokens,
                                     const int* __restrict__ tables, SCALAR_T* __restrict__ out,
                                     float* __restrict__ partial, float* __restrict__ stats, int n_kv, int head_dim,
                                     int layers, int layer, int chunk) {
  extern __shared__ float shared[];
  __shared__ float scratch[32];
  const int token = blockIdx.x, head = blockIdx.y, split = blockIdx.z;
  const int n_tokens = gridDim.x, n_heads = gridDim.y, splits = gridDim.z;
  const long long pair = (long long)token * n_heads + head;  // (t, h): its row of q and out is pair * D
  const PoolHead cache = pool_head(tables + tokens[2 * token + 1], layers, layer, n_kv, head / (n_heads / n_kv),
                                   head_dim);
  const int first = split * chunk, n_keys = min(tokens[2 * token] + 1 - first, chunk);  // may be <= 0
  float* q_scaled = shared;                  // [D]
  float* scores = shared + head_dim;         // [chunk]; exp(score - max) after step 3
  float* partial_sums = scores + chunk;      // [n_slices, D]

  // 1. Stage this query in f32, already scaled by 1/sqrt(D).
  const float scale = 1.0f / sqrtf((float)head_dim);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_scaled[d] = static_cast<float>(q[pair * head_dim + d]) * scale;
  __syncthreads();

  // 2. Scores: thread i takes this split's keys i, i + 128, ...; each a full dot product in f32.
  float row_max = -CUDART_INF_F;
  for (int j = threadIdx.x; j < n_keys; j += blockDim.x) {
    const SCALAR_T* key = k_pool + cache.row(first + j);
    float dot = 0.0f;
    for (int d = 0; d < head_dim; ++d) dot += q_scaled[d] * static_cast<float>(key[d]);
    scores[j] = dot;
    row_max = fmaxf(row_max, dot);
  }

  // 3. e_j = exp(s_j - max) in place (each thread its own entries) and their sum.
  row_max = block_max(row_max, scratch);
  float total = 0.0f;
  for (int j = threadIdx.x; j < n_keys; j += blockDim.x) {
    scores[j] = expf(scores[j] - row_max);
    total += scores[j];
  }
  total = block_sum(total, scratch);  // its barriers also publish every thread's scores[j]

  // 4. Weighted sum of V. The threads form n_slices slices of D threads; thread (slice, d) adds
  //    e_j * v[j, d] over keys j = slice, slice + n_slices, ... Neighbouring threads read
  //    neighbouring d, so each slice reads a value row in one coalesced sweep.
  const int n_slices = max(1, (int)blockDim.x / head_dim), slice = threadIdx.x / head_dim;
  if (slice < n_slices) {
    for (int d = threadIdx.x % head_dim; d < head_dim; d += blockDim.x) {  // d loops only if D > 128
      float acc = 0.0f;
      for (int j = slice; j < n_keys; j += n_slices) acc += scores[j] * static_cast<float>(v_pool[cache.row(first + j) + d]);
      partial_sums[slice * head_dim + d] = acc;
    }
  }
  __syncthreads();
  const long long part = (long long)split * n_tokens * n_heads + pair;  // (z, t, h)
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < n_slices; ++s) acc += partial_sums[s * head_dim + d];
    if (splits == 1)
      out[pair * head_dim + d] = static_cast<SCALAR_T>(acc / total);
    else
      partial[part * head_dim + d] = acc;
  }
  if (splits > 1 && threadIdx.x == 0) {
    stats[2 * part] = row_max;
    stats[2 * part + 1] = total;
  }
}

extern "C" __global__ void attention_merge(const float* __restrict__ partial, const float* __restrict__ stats,
                                           SCALAR_T* __restrict__ out, int head_dim, int splits) {
  const long long pair = (long long)blockIdx.x * gridDim.y + blockIdx.y, pairs = (long long)gridDim.x * gridDim.y;
  float row_max = -CUDART_INF_F;
  for (int z = 0; z < splits; ++z) row_max = fmaxf(row_max, stats[2 * (z * pairs + pair)]);
  float total = 0.0f;  // split 0 always holds key 0, so row_max is finite and the weights are well defined
  for (int z = 0; z < splits; ++z) total += stats[2 * (z * pairs + pair) + 1] * expf(stats[2 * (z * pairs + pair)] - row_max);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int z = 0; z < splits; ++z)
      acc += partial[(z * pairs + pair) * head_dim + d] * expf(stats[2 * (z * pairs + pair)] - row_max);
    out[pair * head_dim + d] = static_cast<SCALAR_T>(acc / total);
  }
}
