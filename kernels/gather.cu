// variants: -DSCALAR_T=float -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16
// Row gather: out[r] = table[ids[r]]; the embedding lookup, and picking each sequence's last
// hidden state. A pure copy, so values pass bit for bit in every dtype.
//
// Launch: grid = number of ids, block = 256 threads; one block copies one row, its threads
// striding along the row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

extern "C" __global__ void gather(const SCALAR_T* __restrict__ table, const long long* __restrict__ ids,
                                  SCALAR_T* __restrict__ out, int n_cols) {
  const SCALAR_T* src = table + ids[blockIdx.x] * n_cols;
  SCALAR_T* dst = out + (long long)blockIdx.x * n_cols;
  for (int i = threadIdx.x; i < n_cols; i += blockDim.x) dst[i] = src[i];
}
