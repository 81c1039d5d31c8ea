// variants: -DSCALAR_T=float -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16
// Matmuls and lookups on weights kept in their GGML blocks (quant_blocks.cuh decodes them): w is
// uint8 [N, K / WEIGHTS * BYTES], row n of the f32 matrix [N, K] it stands for, K whole blocks.
// Both kernels exist once per format, named <kernel>_<format> (quant_matvec_q4_k, dequantize_q8_0).
//
// quant_matvec_*: out[r, n] = alpha * sum_k x[r, k] w[n, k] (+ bias[n]) + beta * out[r, n] for the
// m <= MATVEC_MAX_ROWS rows of a decode step, so each weight block is read once for all of them.
// Launch: grid = ceil(N / warps per block), block = whole warps (128 threads); one warp computes
// output column n for every row r, lane i taking the 8-weight groups i, i + 32, ... of row n.
// Memory: x [m, K] contiguous; out row r starts at out + r * ld_out (a column range of a wider
// matrix, so q | k | v parts in different formats fill one output side by side); bias may be null.
// Numerics: each weight group is decoded to f32 in registers exactly as pyllm/formats.py
// dequantizes it, multiplied by x widened to f32 and summed in f32 per lane; the lanes' sums
// meet by warp shuffles (common.cuh), and each output is rounded to SCALAR_T once.
//
// dequantize_*: out[r] = the f32 row ids[r] of w (row r where ids is null), rounded to SCALAR_T:
// the embedding lookup of a quantized table, and a prompt's weight strips ahead of cuBLAS.
// Launch: grid = rows, block = 256 threads; one block decodes one row, thread i its groups
// i, i + 256, ...
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"
#include "quant_blocks.cuh"

constexpr int MATVEC_MAX_ROWS = 8;  // pyllm/backends/cuda_quant.py's MATVEC_MAX_ROWS

// Weight row n's blocks, in a matrix of rows of k weights
template <class Block>
__device__ __forceinline__ const unsigned char* block_row(const unsigned char* w, long long n, int k) {
  return w + n * (k / Block::WEIGHTS) * Block::BYTES;
}

// The row's 8-weight group g (of its blocks' WEIGHTS / 8 each) as f32 in wg
template <class Block>
__device__ __forceinline__ void decode_group(const unsigned char* row, int g, float wg[8]) {
  constexpr int GROUPS = Block::WEIGHTS / 8;
  Block::decode8(row + (g / GROUPS) * Block::BYTES, g % GROUPS, wg);
}

template <class Block>
__device__ void quant_matvec(const unsigned char* __restrict__ w, const SCALAR_T* __restrict__ x,
                             const SCALAR_T* __restrict__ bias, SCALAR_T* out, int n_cols, int k, int m,
                             int ld_out, float alpha, float beta) {
  const int lane = threadIdx.x % 32, col = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (col >= n_cols) return;  // the whole warp leaves: its shuffles below never miss a lane
  const unsigned char* row = block_row<Block>(w, col, k);
  float acc[MATVEC_MAX_ROWS] = {};
  for (int g = lane; g < k / 8; g += 32) {
    float wg[8];
    decode_group<Block>(row, g, wg);
#pragma unroll
    for (int r = 0; r < MATVEC_MAX_ROWS; ++r) {
      if (r < m) {
        const SCALAR_T* xg = x + (long long)r * k + 8 * g;
        for (int i = 0; i < 8; ++i) acc[r] += wg[i] * static_cast<float>(xg[i]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < MATVEC_MAX_ROWS; ++r) {
    if (r < m) {
      const float dot = warp_reduce(acc[r], SumOp());
      if (lane == 0) {
        SCALAR_T* o = out + (long long)r * ld_out + col;
        float v = alpha * dot + (bias != nullptr ? static_cast<float>(bias[col]) : 0.0f);
        if (beta != 0.0f) v += beta * static_cast<float>(*o);  // out is not read otherwise: it may hold NaN
        *o = static_cast<SCALAR_T>(v);
      }
    }
  }
}

template <class Block>
__device__ void dequantize_rows(const unsigned char* __restrict__ w, const long long* __restrict__ ids,
                                SCALAR_T* __restrict__ out, int k) {
  const unsigned char* row = block_row<Block>(w, ids != nullptr ? ids[blockIdx.x] : blockIdx.x, k);
  SCALAR_T* dst = out + (long long)blockIdx.x * k;
  for (int g = threadIdx.x; g < k / 8; g += blockDim.x) {
    float wg[8];
    decode_group<Block>(row, g, wg);
    for (int i = 0; i < 8; ++i) dst[8 * g + i] = static_cast<SCALAR_T>(wg[i]);
  }
}

#define QUANT_KERNELS(name, Block)                                                                            \
  extern "C" __global__ void quant_matvec_##name(const unsigned char* __restrict__ w,                        \
                                                 const SCALAR_T* __restrict__ x,                             \
                                                 const SCALAR_T* __restrict__ bias, SCALAR_T* out,           \
                                                 int n_cols, int k, int m, int ld_out, float alpha,          \
                                                 float beta) {                                               \
    quant_matvec<Block>(w, x, bias, out, n_cols, k, m, ld_out, alpha, beta);                                 \
  }                                                                                                           \
  extern "C" __global__ void dequantize_##name(const unsigned char* __restrict__ w,                          \
                                               const long long* __restrict__ ids, SCALAR_T* __restrict__ out, \
                                               int k) {                                                       \
    dequantize_rows<Block>(w, ids, out, k);                                                                   \
  }

QUANT_KERNELS(q8_0, BlockQ8_0)
QUANT_KERNELS(q4_0, BlockQ4_0)
QUANT_KERNELS(q4_1, BlockQ4_1)
QUANT_KERNELS(q5_0, BlockQ5_0)
QUANT_KERNELS(q5_1, BlockQ5_1)
QUANT_KERNELS(q4_k, BlockQ4K)
QUANT_KERNELS(q5_k, BlockQ5K)
QUANT_KERNELS(q6_k, BlockQ6K)
