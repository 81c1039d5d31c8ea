// Round trips float -> __half -> float and float -> __nv_bfloat16 -> float,
// also returning the 16-bit patterns.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

extern "C" __global__ void roundtrip(const float* in, float* half_back, unsigned short* half_bits,
                                     float* bf16_back, unsigned short* bf16_bits, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  __half h = __float2half(in[i]);
  __nv_bfloat16 b = __float2bfloat16(in[i]);
  half_back[i] = __half2float(h);
  half_bits[i] = __half_as_ushort(h);
  bf16_back[i] = __bfloat162float(b);
  bf16_bits[i] = __bfloat16_as_ushort(b);
}

// 16-bit arrays in and out: y = x * 2 + 1 computed in float.
extern "C" __global__ void axpb_f16(const __half* x, __half* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2half_rn(__half2float(x[i]) * 2.0f + 1.0f);
}
extern "C" __global__ void axpb_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16_rn(__bfloat162float(x[i]) * 2.0f + 1.0f);
}
