// variants: -DSCALAR_T=float -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16
// Causal attention with grouped-query heads, one sequence, for decode (T = 1) and prefill alike:
//   out[t, h] = sum_j p_j v[g, j],  p = softmax_j(q[t, h] . k[g, j] / sqrt(D)) over j <= offset + t,
// where g = h / (H / KV) is the key/value head that query head h shares with its group (HF's
// repeat_kv) and offset = tokens cached before query 0. Scores, softmax and the weighted sum of V
// happen in one kernel; the scores never leave shared memory.
//
// Launch: grid = (T, H), block = 128 threads (whole warps); one block computes one query token of
// one query head. Dynamic shared memory, in floats (mirrored by attention_shared_bytes in
// pyllm/backends/cuda_backend.py): q [D] | scores [kv_len] | partial sums [n_slices * D],
// with n_slices = max(1, blockDim.x / D).
// Memory: q, out [T, H, D] contiguous (out may be one sequence's rows of a step's output). Keys and
// values are the model's KV pools [blocks, layers, KV, BLOCK_TOKENS, D] (common.cuh), read at
// `layer` block by block through the sequence's table (int32, ceil(kv_len / BLOCK_TOKENS) entries
// or more): key j is row j % BLOCK_TOKENS of block table[j / BLOCK_TOKENS], whose rows of one head
// are contiguous [BLOCK_TOKENS, D]. Blocks may sit anywhere in the pool and be shared.
// Numerics: all f32. q is staged pre-scaled by 1/sqrt(D); each thread scores whole keys (a D-long
// dot product, so scoring needs no reduction); the softmax subtracts the row maximum
// (common.cuh: warp shuffles plus shared memory); the weighted sum of V accumulates in f32 and
// each output is rounded to SCALAR_T once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

extern "C" __global__ void attention(const SCALAR_T* __restrict__ q, const SCALAR_T* __restrict__ k_pool,
                                     const SCALAR_T* __restrict__ v_pool, const int* __restrict__ table,
                                     SCALAR_T* __restrict__ out, int n_kv, int head_dim, int layers, int layer,
                                     int kv_len, int offset) {
  extern __shared__ float shared[];
  __shared__ float scratch[32];
  const int token = blockIdx.x, head = blockIdx.y, n_heads = gridDim.y;
  const long long row = ((long long)token * n_heads + head) * head_dim;  // of q and out
  const PoolHead cache = pool_head(table, layers, layer, n_kv, head / (n_heads / n_kv), head_dim);
  const int n_keys = min(kv_len, offset + token + 1);  // causal: keys 0 .. offset + token
  float* q_scaled = shared;                  // [D]
  float* scores = shared + head_dim;         // [kv_len]; probabilities after the softmax
  float* partial = scores + kv_len;          // [n_slices, D]

  // 1. Stage this query in f32, already scaled by 1/sqrt(D).
  const float scale = 1.0f / sqrtf((float)head_dim);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) q_scaled[d] = static_cast<float>(q[row + d]) * scale;
  __syncthreads();

  // 2. Scores: thread i takes keys i, i + 128, ... (row i % 16 of the blocks at table[i / 16],
  //    table[i / 16 + 8], ...); each a full dot product in f32.
  for (int j = threadIdx.x; j < n_keys; j += blockDim.x) {
    const SCALAR_T* key = k_pool + cache.row(j);
    float dot = 0.0f;
    for (int d = 0; d < head_dim; ++d) dot += q_scaled[d] * static_cast<float>(key[d]);
    scores[j] = dot;
  }
  __syncthreads();

  // 3. Softmax over the visible keys, in shared memory (a thread reads only what it wrote until
  //    softmax_row's first barrier, and writes only its own entries after the last).
  softmax_row(scores, n_keys, n_keys, scratch);
  __syncthreads();

  // 4. Weighted sum of V. The threads form n_slices slices of D threads; thread (slice, d) adds
  //    p_j * v[j, d] over keys j = slice, slice + n_slices, ... Neighbouring threads read
  //    neighbouring d, so each slice reads a value row in one coalesced sweep.
  const int n_slices = max(1, (int)blockDim.x / head_dim), slice = threadIdx.x / head_dim;
  if (slice < n_slices) {
    for (int d = threadIdx.x % head_dim; d < head_dim; d += blockDim.x) {  // d loops only if D > 128
      float acc = 0.0f;
      for (int j = slice; j < n_keys; j += n_slices)
        acc += scores[j] * static_cast<float>(v_pool[cache.row(j) + d]);
      partial[slice * head_dim + d] = acc;
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < n_slices; ++s) acc += partial[s * head_dim + d];
    out[row + d] = static_cast<SCALAR_T>(acc);
  }
}
