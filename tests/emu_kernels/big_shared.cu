// 32 KiB of static shared memory plus a dynamic buffer: launches needing
// more than 48 KiB in total need the max_dynamic_shared_size_bytes opt-in.
extern "C" __global__ void big_shared(const float* in, float* out, int n) {
  __shared__ float stat[8192];
  extern __shared__ float dyn[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    dyn[i] = in[i];
    stat[i % 8192] = 1.0f;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = dyn[n - 1 - i] + stat[i % 8192];
}
