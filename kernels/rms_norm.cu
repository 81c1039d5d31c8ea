// variants: -DSCALAR_T=float -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16
// RMS norm of each row, as HF's LlamaRMSNorm: out = x / sqrt(mean(x^2) + eps) * weight.
//
// Launch: grid = rows, block = 256 threads (whole warps); one block normalizes one row, its
// threads striding along the row (thread i takes columns i, i + 256, ...).
// Numerics: x is widened to f32, each thread sums its squares in f32, the block adds those up
// (warp shuffles, then shared memory: common.cuh), and each output is rounded to SCALAR_T once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

extern "C" __global__ void rms_norm(const SCALAR_T* __restrict__ x, const SCALAR_T* __restrict__ weight,
                                    SCALAR_T* __restrict__ out, int n_cols, float eps) {
  __shared__ float scratch[32];
  const long long row_start = (long long)blockIdx.x * n_cols;
  float sum_sq = 0.0f;
  for (int i = threadIdx.x; i < n_cols; i += blockDim.x) {
    const float v = static_cast<float>(x[row_start + i]);
    sum_sq += v * v;
  }
  const float scale = 1.0f / sqrtf(block_sum(sum_sq, scratch) / n_cols + eps);
  for (int i = threadIdx.x; i < n_cols; i += blockDim.x)
    out[row_start + i] =
        static_cast<SCALAR_T>(static_cast<float>(x[row_start + i]) * scale * static_cast<float>(weight[i]));
}
