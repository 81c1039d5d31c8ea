// common.cuh -- block-wide reductions, the row softmax, and KV-pool addressing shared by the kernels.
//
// A reduction runs in two rounds of warp shuffles: every warp folds its 32 values with
// __shfl_xor_sync (after which every lane holds the warp's result), lane 0 of each warp parks
// that result in shared memory, and after a barrier every warp folds the parked partials the same
// way. So every thread gets the block's result without a further broadcast. Blocks must consist
// of whole warps (a multiple of 32 threads), because the shuffles name all 32 lanes.
#pragma once

#include <math_constants.h>

struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <class Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
  for (int lane_mask = 16; lane_mask > 0; lane_mask /= 2)
    v = op(v, __shfl_xor_sync(0xffffffffu, v, lane_mask));
  return v;
}

// scratch: 32 floats of shared memory; identity: op's neutral element, for lanes past the last warp.
template <class Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch, Op op, float identity) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce(v, op);
  __syncthreads();  // a previous reduction may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();  // every warp's partial is parked before anyone reads them
  return warp_reduce(lane < (int)blockDim.x / 32 ? scratch[lane] : identity, op);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  return block_reduce(v, scratch, SumOp(), 0.0f);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  return block_reduce(v, scratch, MaxOp(), -CUDART_INF_F);
}

// Softmax of row[0, n_cols) in place, by the whole block, where only row[0, n_visible) is
// unmasked (n_visible may be <= 0): masked entries become 0, so a fully masked row is all zeros,
// never NaN. Three passes in f32: the maximum, the sum of exp(x - max), then exp(x - max) / sum.
// Subtracting the maximum keeps every exp() <= 1; recomputing exp() in the last pass (instead of
// storing it in between) rounds a 16-bit row only once.
template <class T>
__device__ void softmax_row(T* row, int n_visible, int n_cols, float* scratch) {
  float row_max = -CUDART_INF_F;
  for (int j = threadIdx.x; j < n_visible; j += blockDim.x)
    row_max = fmaxf(row_max, static_cast<float>(row[j]));
  row_max = block_max(row_max, scratch);
  if (row_max == -CUDART_INF_F) row_max = 0.0f;  // every visible score is -inf: all exp() are 0
  float total = 0.0f;
  for (int j = threadIdx.x; j < n_visible; j += blockDim.x)
    total += expf(static_cast<float>(row[j]) - row_max);
  total = block_sum(total, scratch);
  const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
  for (int j = threadIdx.x; j < n_cols; j += blockDim.x)
    row[j] = static_cast<T>(j < n_visible ? expf(static_cast<float>(row[j]) - row_max) * inv_total : 0.0f);
}

// The KV pool (pyllm/kv_blocks.py): keys, values [blocks, layers, KV, BLOCK_TOKENS, D] each, so one
// layer's rows of one KV head in a block are contiguous [BLOCK_TOKENS, D]. A sequence's token at
// position p sits in block table[p / BLOCK_TOKENS], row p % BLOCK_TOKENS; its table lists the
// sequence's blocks in token order, in any order of block ids, and blocks may be shared.
constexpr int BLOCK_TOKENS = 16;  // pyllm/backends/base.py's BLOCK_TOKENS (tests/test_kernels.py checks)

// Where one layer's rows of one KV head sit in the pool, through a sequence's table: row(p) is
// the offset in elements, from the pool's start, of the row of position p.
struct PoolHead {
  const int* table;
  long long block_stride;  // layers * KV * BLOCK_TOKENS * D: from one block to the next
  long long head_start;    // (layer * KV + kv_head) * BLOCK_TOKENS * D: this head's rows in a block
  int head_dim;
  __device__ __forceinline__ long long row(int p) const {
    return table[p / BLOCK_TOKENS] * block_stride + head_start + (long long)(p % BLOCK_TOKENS) * head_dim;
  }
};

__device__ __forceinline__ PoolHead pool_head(const int* table, int layers, int layer, int n_kv, int kv_head,
                                              int head_dim) {
  const long long rows = (long long)BLOCK_TOKENS * head_dim;  // one head's [BLOCK_TOKENS, D] in a block
  return {table, layers * n_kv * rows, (layer * n_kv + kv_head) * rows, head_dim};
}
