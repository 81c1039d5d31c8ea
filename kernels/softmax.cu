// variants: -DSCALAR_T=float -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16
// Masked causal softmax over the last axis of scores [heads, q_len, kv_len], in place. Query i
// sits at absolute position offset + i (offset = tokens cached before it) and sees keys
// 0 .. offset + i; the keys it may not see get probability 0, and a row that sees no key at all
// (offset + i < 0) is all zeros, never NaN.
//
// Launch: grid = (q_len, heads), block = 256 threads; one block handles one row, its threads
// striding along it.
// Numerics (common.cuh, softmax_row): f32 throughout, maximum subtracted before exp(), the max and
// the sum reduced with warp shuffles plus shared memory; each output rounded to SCALAR_T once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

extern "C" __global__ void softmax_causal(SCALAR_T* scores, int q_len, int kv_len, int offset) {
  __shared__ float scratch[32];
  const int query = blockIdx.x;
  SCALAR_T* row = scores + ((long long)blockIdx.y * q_len + query) * kv_len;
  softmax_row(row, min(kv_len, offset + query + 1), kv_len, scratch);
}
