// variants: -DSCALAR_T=float -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16
// Row sums written once over SCALAR_T and compiled per dtype with -D (the
// "variants" dtype pattern). Reduces with __shfl_down_sync and keeps the
// per-warp partials in dynamic (extern) shared memory: launch with
// shared_mem = 4 * number of warps.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef SCALAR_T
#define SCALAR_T float
#endif

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = warpSize / 2; offset > 0; offset /= 2)
    v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // complete in lane 0 only
}

extern "C" __global__ void row_sum_var(const SCALAR_T* __restrict__ x, float* __restrict__ out,
                                       int ncols) {
  extern __shared__ float warp_partials[];
  const SCALAR_T* row = x + (long long)blockIdx.x * ncols;
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  const int nwarps = (blockDim.x + warpSize - 1) / warpSize;
  float acc = 0.0f;
  for (int i = threadIdx.x; i < ncols; i += blockDim.x) acc += static_cast<float>(row[i]);
  acc = warp_sum(acc);
  if (lane == 0) warp_partials[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = warp_sum(lane < nwarps ? warp_partials[lane] : 0.0f);
    if (lane == 0) out[blockIdx.x] = acc;
  }
}
