// Warp shuffle semantics. Each lane's value is 100 + its linear thread id.
// Case c uses mode modes[c] (0 idx, 1 up, 2 down, 3 xor), operand bs[c] and
// width widths[c]; out[c * nthreads + tid] receives the shuffled value.
#include <cuda_fp16.h>

extern "C" __global__ void shuffle_cases(const int* modes, const int* bs, const int* widths,
                                         int ncases, int* out) {
  const int tid = threadIdx.x, n = blockDim.x;
  const int v = 100 + tid;
  for (int c = 0; c < ncases; ++c) {
    int r;
    switch (modes[c]) {
      case 0: r = __shfl_sync(0xffffffffu, v, bs[c], widths[c]); break;
      case 1: r = __shfl_up_sync(0xffffffffu, v, bs[c], widths[c]); break;
      case 2: r = __shfl_down_sync(0xffffffffu, v, bs[c], widths[c]); break;
      default: r = __shfl_xor_sync(0xffffffffu, v, bs[c], widths[c]); break;
    }
    out[c * n + tid] = r;
  }
}

// Only lanes 0-15 take part (mask 0x0000ffff). out[2*tid] reads lane tid^1
// (a participant), out[2*tid+1] reads lane tid^16, which never published.
extern "C" __global__ void shuffle_half_warp(int* out) {
  const int tid = threadIdx.x;
  if (tid < 16) {
    out[2 * tid] = __shfl_xor_sync(0x0000ffffu, 100 + tid, 1);
    out[2 * tid + 1] = __shfl_xor_sync(0x0000ffffu, 100 + tid, 16);
  }
}

// Doubles and halves travel through shuffles as well.
extern "C" __global__ void shuffle_types(double* d_out, float* f_out) {
  const int tid = threadIdx.x;
  d_out[tid] = __shfl_down_sync(0xffffffffu, 0.5 + tid, 1);
  __half h = __shfl_xor_sync(0xffffffffu, __float2half(tid * 0.25f), 2);
  f_out[tid] = __half2float(h);
}
