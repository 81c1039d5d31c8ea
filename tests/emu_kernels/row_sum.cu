// Row sums with a warp-shuffle block reduction; one block per row.
// Written once as a template __device__ function with one extern "C"
// __global__ wrapper per storage dtype (the "wrapper" dtype pattern).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Sum over the whole block; every thread gets the result.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  const int nwarps = (blockDim.x + warpSize - 1) / warpSize;
  for (int offset = warpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? partial[lane] : 0.0f;
    for (int offset = warpSize / 2; offset > 0; offset /= 2)
      v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

template <typename T>
__device__ void row_sum(const T* __restrict__ x, float* __restrict__ out, int ncols) {
  const T* row = x + (long long)blockIdx.x * ncols;
  float acc = 0.0f;
  for (int i = threadIdx.x; i < ncols; i += blockDim.x) acc += to_float(row[i]);
  float s = block_sum(acc);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

extern "C" __global__ void row_sum_f32(const float* x, float* out, int ncols) { row_sum(x, out, ncols); }
extern "C" __global__ void row_sum_f16(const __half* x, float* out, int ncols) { row_sum(x, out, ncols); }
extern "C" __global__ void row_sum_bf16(const __nv_bfloat16* x, float* out, int ncols) { row_sum(x, out, ncols); }
