// quant_blocks.cuh -- decoders of the GGML block formats, as GGUF stores them (pyllm/formats.py
// has the layouts and the NumPy dequantizers these mirror, operation for operation).
//
// A weight row is a run of blocks of Block::WEIGHTS weights in Block::BYTES bytes each. Every
// decoder turns one 8-weight group of a block, weights 8j .. 8j + 7, into f32:
//   Block::decode8(block, j, w)    0 <= j < Block::WEIGHTS / 8,  w[8] written.
// An 8-weight group never straddles a scale: q6_k's scales cover 16 weights, the others' 32 or
// more. Blocks sit at any byte offset (34, 18, 22 ... bytes each), so every field is read byte by
// byte; f16 fields are little-endian.
#pragma once

#include <cuda_fp16.h>

__device__ __forceinline__ float f16_at(const unsigned char* p) {
  return __half2float(__ushort_as_half((unsigned short)(p[0] | (p[1] << 8))));
}

// The 32-weight formats: an f16 scale d, for the _1 formats an f16 min m after it, for 5-bit q a
// 32-bit mask of high bits (bit k for weight k), then q: whole int8 bytes (q8_0), or nibbles
// (weight k < 16 in the low nibble of byte k, weight k >= 16 in the high nibble of byte k - 16).
//   q8_0: w = d*q   q4_0: w = d*(q - 8)   q5_0: w = d*(q - 16)   q4_1, q5_1: w = d*q + m
template <int BITS, bool HAS_MIN>
struct Block32 {
  static constexpr int WEIGHTS = 32;
  static constexpr int BYTES = 2 + (HAS_MIN ? 2 : 0) + (BITS == 5 ? 4 : 0) + WEIGHTS * (BITS == 8 ? 8 : 4) / 8;
  static constexpr int OFFSET = BITS == 8 ? 0 : 1 << (BITS - 1);  // of the formats without a min

  __device__ static void decode8(const unsigned char* block, int j, float* w) {
    const float d = f16_at(block), m = HAS_MIN ? f16_at(block + 2) : 0.0f;
    const unsigned char* high_bits = block + (HAS_MIN ? 4 : 2);
    const unsigned char* qs = high_bits + (BITS == 5 ? 4 : 0);
    for (int i = 0; i < 8; ++i) {
      const int k = 8 * j + i;
      int q;
      if (BITS == 8) {
        q = (signed char)qs[k];
      } else {
        q = (qs[k & 15] >> (4 * (k >> 4))) & 15;
        if (BITS == 5) q |= ((high_bits[j] >> i) & 1) << 4;  // byte j holds weights 8j .. 8j + 7's bits
      }
      w[i] = HAS_MIN ? d * (float)q + m : d * (float)(q - OFFSET);
    }
  }
};

// q4_k and q5_k: 256 weights in 8 sub-blocks of 32. f16 d and dmin, 12 bytes of 6-bit scales s
// and mins m (one each per sub-block, packed as kscale_min unpacks them), for q5_k 32 bytes of high
// bits (bit s of byte l: weight l of sub-block s), then 128 bytes of nibbles (sub-blocks 2c and
// 2c + 1 are the low and high nibbles of bytes 32c .. 32c + 31). w = (d*s)*q - dmin*m.
__device__ __forceinline__ void kscale_min(const unsigned char* packed, int s, int* scale, int* min) {
  if (s < 4) {
    *scale = packed[s] & 63;
    *min = packed[s + 4] & 63;
  } else {  // low 4 bits in byte s + 4, top 2 bits in the spare top bits of bytes s - 4 (scales) and s (mins)
    *scale = (packed[s + 4] & 15) | ((packed[s - 4] >> 6) << 4);
    *min = (packed[s + 4] >> 4) | ((packed[s] >> 6) << 4);
  }
}

template <int BITS>
struct BlockK {
  static constexpr int WEIGHTS = 256;
  static constexpr int BYTES = 4 + 12 + (BITS == 5 ? 32 : 0) + 128;

  __device__ static void decode8(const unsigned char* block, int j, float* w) {
    const int s = j / 4, first = 8 * (j % 4);  // sub-block s, its weights first .. first + 7
    int scale, min;
    kscale_min(block + 4, s, &scale, &min);
    const float ds = f16_at(block) * (float)scale, dm = f16_at(block + 2) * (float)min;
    const unsigned char* high_bits = block + 16;
    const unsigned char* qs = high_bits + (BITS == 5 ? 32 : 0) + 32 * (s / 2);
    for (int i = 0; i < 8; ++i) {
      const int l = first + i;
      int q = (qs[l] >> (4 * (s & 1))) & 15;
      if (BITS == 5) q |= ((high_bits[l] >> s) & 1) << 4;
      w[i] = ds * (float)q - dm;
    }
  }
};

// q6_k: 256 weights in two halves of 128. 128 bytes of low nibbles (in half h, weight r < 64 is the
// low nibble of byte 64h + r, r >= 64 the high nibble of byte 64h + r - 64), 64 bytes of high bit
// pairs (bits 2(r / 32) .. +1 of byte 128 + 32h + r % 32), 16 int8 scales s (one per 16 weights),
// f16 d. w = (d*s)*(q - 32).
struct BlockQ6K {
  static constexpr int WEIGHTS = 256;
  static constexpr int BYTES = 128 + 64 + 16 + 2;

  __device__ static void decode8(const unsigned char* block, int j, float* w) {
    const int first = 8 * j, half = first / 128;
    const float ds = f16_at(block + 208) * (float)(signed char)block[192 + first / 16];
    const unsigned char* low = block + 64 * half;
    const unsigned char* high = block + 128 + 32 * half;
    for (int i = 0; i < 8; ++i) {
      const int r = first % 128 + i;
      const int q = ((low[r & 63] >> (4 * (r >> 6))) & 15) | (((high[r & 31] >> (2 * (r >> 5))) & 3) << 4);
      w[i] = ds * (float)(q - 32);
    }
  }
};

using BlockQ8_0 = Block32<8, false>;
using BlockQ4_0 = Block32<4, false>;
using BlockQ4_1 = Block32<4, true>;
using BlockQ5_0 = Block32<5, false>;
using BlockQ5_1 = Block32<5, true>;
using BlockQ4K = BlockK<4>;
using BlockQ5K = BlockK<5>;
