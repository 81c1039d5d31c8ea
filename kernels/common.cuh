// common.cuh -- block-wide reductions and the row softmax shared by the kernels.
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
