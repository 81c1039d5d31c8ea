// variants: -DSCALAR_T=float -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16
// SwiGLU of the fused gate|up projection: out[t, i] = silu(gate[t, i]) * up[t, i], where row t of
// gate_up [T, 2 * inter] holds gate in its first half and up in its second.
//
// Launch: grid = (T, ceil(inter / 256)), block = 256 threads; each thread computes one output.
// Numerics: f32 throughout (silu(g) = g / (1 + exp(-g)), which is -0, not NaN, when exp
// overflows), rounded to SCALAR_T once. No reduction, so no shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

extern "C" __global__ void swiglu(const SCALAR_T* __restrict__ gate_up, SCALAR_T* __restrict__ out, int inter) {
  const int i = blockIdx.y * blockDim.x + threadIdx.x;
  if (i >= inter) return;
  const long long t = blockIdx.x;
  const float gate = static_cast<float>(gate_up[t * 2 * inter + i]);
  const float up = static_cast<float>(gate_up[t * 2 * inter + inter + i]);
  out[t * inter + i] = static_cast<SCALAR_T>(gate / (1.0f + expf(-gate)) * up);
}
