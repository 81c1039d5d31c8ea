// BROKEN ON PURPOSE: block row-sum whose lane 0s write the per-warp partials
// to shared memory and warp 0 reads them back without a __syncthreads() in
// between. Warp 0 may run ahead of the others (the emulator's round-robin
// schedule always lets it), so it reads partials that are not written yet.
extern "C" __global__ void reduce_missing_sync(const float* x, float* out, int ncols) {
  __shared__ float partial[32];
  const float* row = x + (long long)blockIdx.x * ncols;
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  const int nwarps = (blockDim.x + warpSize - 1) / warpSize;
  float v = 0.0f;
  for (int i = threadIdx.x; i < ncols; i += blockDim.x) v += row[i];
  for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) partial[warp] = v;
  // missing: __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? partial[lane] : 0.0f;
    for (int offset = warpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) out[blockIdx.x] = v;
  }
}
