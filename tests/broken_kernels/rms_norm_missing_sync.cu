// BROKEN ON PURPOSE: kernels/rms_norm.cu with its block reduction written out inline and the
// __syncthreads() between parking the per-warp partial sums in shared memory and reading them
// back removed. Warps that run ahead read partials not yet written (under the emulator: shared
// memory's 0xff poison, i.e. NaN), so rows come out wrong; the race check flags it as well.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

__device__ float warp_sum(float v) {
  for (int lane_mask = 16; lane_mask > 0; lane_mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, lane_mask);
  return v;
}

extern "C" __global__ void rms_norm(const SCALAR_T* __restrict__ x, const SCALAR_T* __restrict__ weight,
                                    SCALAR_T* __restrict__ out, int n_cols, float eps) {
  __shared__ float scratch[32];
  const long long row_start = (long long)blockIdx.x * n_cols;
  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < n_cols; i += blockDim.x) {
    const float v = static_cast<float>(x[row_start + i]);
    sum_sq += v * v;
  }
  sum_sq = warp_sum(sum_sq);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = sum_sq;
  // missing: __syncthreads();
  sum_sq = warp_sum(threadIdx.x % 32 < blockDim.x / 32 ? scratch[threadIdx.x % 32] : 0.0f);
  const float scale = 1.0f / sqrtf(sum_sq / n_cols + eps);
  for (int i = threadIdx.x; i < n_cols; i += blockDim.x)
    out[row_start + i] =
        static_cast<SCALAR_T>(static_cast<float>(x[row_start + i]) * scale * static_cast<float>(weight[i]));
}
