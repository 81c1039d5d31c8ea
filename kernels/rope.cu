// variants: -DSCALAR_T=float -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16
// Rotary position embedding in HF's rotate_half layout: in a head of D values, element i < D/2
// and element i + D/2 form a pair, rotated by the angle of (position, i):
//   (a, b) -> (a cos - b sin, b cos + a sin).
// cos and sin come from the f32 tables [max_positions, D/2] the NumPy backend builds
// (pyllm/backends/reference.py: rope_tables), so both backends rotate by exactly the same numbers.
// Numerics (both kernels): inputs widened to f32, each output rounded to SCALAR_T once; no
// reductions, so no shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

// Rotates pair `i` of one head: reads src[i], src[i + half], adds bias (if any), writes dst.
__device__ __forceinline__ void rotate_pair(const SCALAR_T* src, const SCALAR_T* bias, SCALAR_T* dst, int i,
                                            int half, float cos_a, float sin_a) {
  float a = static_cast<float>(src[i]), b = static_cast<float>(src[i + half]);
  if (bias != nullptr) {
    a += static_cast<float>(bias[i]);
    b += static_cast<float>(bias[i + half]);
  }
  dst[i] = static_cast<SCALAR_T>(a * cos_a - b * sin_a);
  dst[i + half] = static_cast<SCALAR_T>(b * cos_a + a * sin_a);
}

// rope: x [T, heads, D] at positions [T] -> out [T, heads, D].
// Launch: grid = T, block = 128 threads; one block handles one token, thread i its pairs
// i, i + 128, ... of the token's heads * D/2 (head-major, so neighbouring threads touch
// neighbouring elements).
extern "C" __global__ void rope(const SCALAR_T* __restrict__ x, const long long* __restrict__ positions,
                                const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                                SCALAR_T* __restrict__ out, int n_heads, int head_dim) {
  const int half = head_dim / 2;
  const long long token_start = (long long)blockIdx.x * n_heads * head_dim;
  const long long angle_row = positions[blockIdx.x] * half;
  for (int p = threadIdx.x; p < n_heads * half; p += blockDim.x) {
    const int head = p / half, i = p % half;
    const long long head_start = token_start + (long long)head * head_dim;
    rotate_pair(x + head_start, nullptr, out + head_start, i, half, cos_table[angle_row + i],
                sin_table[angle_row + i]);
  }
}

// qkv_rope_cache: a step's whole q/k/v epilogue, every sequence's tokens in one launch. The fused
// projection qkv [T, (H + 2 KV) * D] (heads: H of q, then KV of k, then KV of v), plus bias if
// given -> q [T, H, D] with rope; k with rope and v are written straight into the KV pools
// [blocks, layers, KV, BLOCK_TOKENS, D] (common.cuh) at `layer`. Token t sits at position
// tokens[2t] of its sequence, whose block table starts at tables[tokens[2t + 1]] (attention.cu's
// layout): row p % BLOCK_TOKENS of block table[p / BLOCK_TOKENS].
// Launch: grid = T, block = 128 threads; one block handles one token, thread i its pairs
// i, i + 128, ... of the token's (H + 2 KV) * D/2.
extern "C" __global__ void qkv_rope_cache(const SCALAR_T* __restrict__ qkv, const SCALAR_T* __restrict__ bias,
                                          const float* __restrict__ cos_table,
                                          const float* __restrict__ sin_table, SCALAR_T* __restrict__ q,
                                          SCALAR_T* __restrict__ k_pool, SCALAR_T* __restrict__ v_pool,
                                          const int* __restrict__ tokens, const int* __restrict__ tables,
                                          int n_heads, int n_kv, int head_dim, int layers, int layer) {
  const int half = head_dim / 2, token = blockIdx.x, position = tokens[2 * token];
  const int* table = tables + tokens[2 * token + 1];
  const long long angle_row = (long long)position * half;
  const SCALAR_T* row = qkv + (long long)token * (n_heads + 2 * n_kv) * head_dim;
  for (int p = threadIdx.x; p < (n_heads + 2 * n_kv) * half; p += blockDim.x) {
    const int head = p / half, i = p % half;  // heads 0..H-1 are q, then KV of k, then KV of v
    const SCALAR_T* src = row + head * head_dim;
    const SCALAR_T* src_bias = bias == nullptr ? nullptr : bias + head * head_dim;
    const float cos_a = cos_table[angle_row + i], sin_a = sin_table[angle_row + i];
    if (head < n_heads) {
      rotate_pair(src, src_bias, q + ((long long)token * n_heads + head) * head_dim, i, half, cos_a, sin_a);
    } else {  // k with rope; v stored unrotated: a rotation by angle 0 (cos 1, sin 0) is the identity
      const bool is_k = head < n_heads + n_kv;
      const int kv_head = head - n_heads - (is_k ? 0 : n_kv);
      const long long cache_row = pool_head(table, layers, layer, n_kv, kv_head, head_dim).row(position);
      rotate_pair(src, src_bias, (is_k ? k_pool : v_pool) + cache_row, i, half, is_k ? cos_a : 1.0f,
                  is_k ? sin_a : 0.0f);
    }
  }
}
