// BROKEN ON PURPOSE: warp reduction whose first offset is warpSize instead of
// warpSize / 2. shfl.sync only uses the low 5 bits of the offset, so the first
// step makes every lane read its own value and the sum comes out doubled.
extern "C" __global__ void reduce_wrong_offset(const float* x, float* out, int ncols) {
  const float* row = x + (long long)blockIdx.x * ncols;
  float v = 0.0f;
  for (int i = threadIdx.x; i < ncols; i += blockDim.x) v += row[i];
  for (int offset = warpSize; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}
