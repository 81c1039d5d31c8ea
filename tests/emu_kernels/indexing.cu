// Thread/block indexing in 3 dimensions, dynamic shared memory, barriers
// and block-wide votes.

// Each thread writes its 12 index values at its global linear position.
extern "C" __global__ void write_indices(int* out) {
  long long block = blockIdx.x + (long long)gridDim.x * (blockIdx.y + (long long)gridDim.y * blockIdx.z);
  int threads = blockDim.x * blockDim.y * blockDim.z;
  int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  int* rec = out + (block * threads + t) * 12;
  rec[0] = blockIdx.x; rec[1] = blockIdx.y; rec[2] = blockIdx.z;
  rec[3] = threadIdx.x; rec[4] = threadIdx.y; rec[5] = threadIdx.z;
  rec[6] = gridDim.x; rec[7] = gridDim.y; rec[8] = gridDim.z;
  rec[9] = blockDim.x; rec[10] = blockDim.y; rec[11] = blockDim.z;
}

// Reverses each block-sized chunk through dynamic shared memory
// (shared_mem = 4 * blockDim.x). Correct only because of the barrier.
extern "C" __global__ void block_reverse(const float* in, float* out) {
  extern __shared__ float buf[];
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  buf[t] = in[base + t];
  __syncthreads();
  out[base + t] = buf[blockDim.x - 1 - t];
}

// Same, through an extern __shared__ array of another name and type; all
// extern __shared__ arrays start at the same address.
extern "C" __global__ void block_reverse_bytes(const float* in, float* out) {
  extern __shared__ __align__(16) unsigned char raw[];
  float* buf = reinterpret_cast<float*>(raw);
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  buf[t] = in[base + t];
  __syncthreads();
  out[base + t] = buf[blockDim.x - 1 - t];
}

// Per thread: ballot of (t % 3 == 0), all(t < 1000), any(t == 5), and the
// block-wide count of odd threads.
extern "C" __global__ void votes(unsigned* out) {
  const int t = threadIdx.x;
  unsigned* rec = out + (blockIdx.x * blockDim.x + t) * 4;
  rec[0] = __ballot_sync(0xffffffffu, t % 3 == 0);
  rec[1] = __all_sync(0xffffffffu, t < 1000);
  rec[2] = __any_sync(0xffffffffu, t == 5);
  rec[3] = __syncthreads_count(t & 1);
}
