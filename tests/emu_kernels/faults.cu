// Kernels that are undefined or fail in CUDA; the emulator must report them.

// Thread 0 leaves before the barrier the others wait at.
extern "C" __global__ void exit_before_barrier(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Half the warp shuffles, the other half waits at __syncwarp, all with the full mask.
extern "C" __global__ void divergent_warp_ops(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else __syncwarp();
  out[threadIdx.x] = v;
}

extern "C" __global__ void checked(const int* x) {
  assert(x[threadIdx.x] >= 0);
}
