// cuda_emu_device.h -- host versions of CUDA device functions: vector types,
// math intrinsics, atomics, barriers, warp shuffles and votes.
// Fast-math intrinsics (__expf, __fdividef, ...) use the accurate libm
// functions; results can differ from the GPU in the last bits.
#ifndef PYLLM_CUDA_EMU_DEVICE_H
#define PYLLM_CUDA_EMU_DEVICE_H

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_emu_runtime.h"

constexpr int warpSize = 32;

// ---- vector types (alignment as in CUDA's vector_types.h) ------------------
#define CUDA_EMU_VEC2(T, N, A) struct alignas(A) N { T x, y; };
#define CUDA_EMU_VEC3(T, N) struct N { T x, y, z; };
#define CUDA_EMU_VEC4(T, N, A) struct alignas(A) N { T x, y, z, w; };
CUDA_EMU_VEC2(float, float2, 8) CUDA_EMU_VEC3(float, float3) CUDA_EMU_VEC4(float, float4, 16)
CUDA_EMU_VEC2(int, int2, 8) CUDA_EMU_VEC3(int, int3) CUDA_EMU_VEC4(int, int4, 16)
CUDA_EMU_VEC2(unsigned int, uint2, 8) CUDA_EMU_VEC4(unsigned int, uint4, 16)
CUDA_EMU_VEC2(unsigned short, ushort2, 4) CUDA_EMU_VEC4(unsigned short, ushort4, 8)
CUDA_EMU_VEC2(double, double2, 16)
#undef CUDA_EMU_VEC2
#undef CUDA_EMU_VEC3
#undef CUDA_EMU_VEC4
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int3 make_int3(int x, int y, int z) { return {x, y, z}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 __half22float2(__half2 v) { return {float(v.x), float(v.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {float(v.x), float(v.y)}; }

// ---- math ------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : x > 0.0f ? x : 0.0f; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline int __float_as_int(float x) { int r; std::memcpy(&r, &x, 4); return r; }
inline unsigned __float_as_uint(float x) { unsigned r; std::memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; std::memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned x) { float r; std::memcpy(&r, &x, 4); return r; }
inline long long __double_as_longlong(double x) { long long r; std::memcpy(&r, &x, 8); return r; }
inline double __longlong_as_double(long long x) { double r; std::memcpy(&r, &x, 8); return r; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline int __mul24(int a, int b) { return ((int)((unsigned)a << 8) >> 8) * ((int)((unsigned)b << 8) >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

// CUDA's global min/max accept mixed argument types (usual arithmetic
// conversions); floating-point versions follow fminf/fmaxf NaN handling.
template <class A, class B, std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value, int> = 0>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) return std::fmin((C)a, (C)b);
  else return (C)b < (C)a ? (C)b : (C)a;
}
template <class A, class B, std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value, int> = 0>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<C>::value) return std::fmax((C)a, (C)b);
  else return (C)a < (C)b ? (C)b : (C)a;
}

// ---- memory access hints, fences -------------------------------------------
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
// Fibers only switch at barriers and warp operations, so fences have nothing to order.
inline void __threadfence() { __asm__ __volatile__("" ::: "memory"); }
inline void __threadfence_block() { __asm__ __volatile__("" ::: "memory"); }
inline void __threadfence_system() { __asm__ __volatile__("" ::: "memory"); }
inline void __nanosleep(unsigned) {}

// ---- atomics: fibers never preempt each other, so plain read-modify-write is atomic
#define CUDA_EMU_ATOMIC(NAME, T, EXPR) \
  inline T NAME(T* p, T v) { T old = *p; *p = (EXPR); return old; }
CUDA_EMU_ATOMIC(atomicAdd, int, old + v)
CUDA_EMU_ATOMIC(atomicAdd, unsigned, old + v)
CUDA_EMU_ATOMIC(atomicAdd, unsigned long long, old + v)
CUDA_EMU_ATOMIC(atomicAdd, float, old + v)
CUDA_EMU_ATOMIC(atomicAdd, double, old + v)
CUDA_EMU_ATOMIC(atomicSub, int, old - v)
CUDA_EMU_ATOMIC(atomicSub, unsigned, old - v)
CUDA_EMU_ATOMIC(atomicExch, int, v)
CUDA_EMU_ATOMIC(atomicExch, unsigned, v)
CUDA_EMU_ATOMIC(atomicExch, unsigned long long, v)
CUDA_EMU_ATOMIC(atomicExch, float, v)
CUDA_EMU_ATOMIC(atomicMax, int, old < v ? v : old)
CUDA_EMU_ATOMIC(atomicMax, unsigned, old < v ? v : old)
CUDA_EMU_ATOMIC(atomicMin, int, v < old ? v : old)
CUDA_EMU_ATOMIC(atomicMin, unsigned, v < old ? v : old)
CUDA_EMU_ATOMIC(atomicAnd, int, old & v)
CUDA_EMU_ATOMIC(atomicAnd, unsigned, old & v)
CUDA_EMU_ATOMIC(atomicOr, int, old | v)
CUDA_EMU_ATOMIC(atomicOr, unsigned, old | v)
CUDA_EMU_ATOMIC(atomicXor, int, old ^ v)
CUDA_EMU_ATOMIC(atomicXor, unsigned, old ^ v)
#undef CUDA_EMU_ATOMIC
template <class T> inline T atomicCAS(T* p, T cmp, T v) {
  T old = *p;
  if (old == cmp) *p = v;
  return old;
}

// ---- block barrier -------------------------------------------------------------
inline void __syncthreads() { cuda_emu::block_barrier(0, 0); }
inline int __syncthreads_count(int pred) { return cuda_emu::block_barrier(pred, 0); }
inline int __syncthreads_and(int pred) { return cuda_emu::block_barrier(pred, 1); }
inline int __syncthreads_or(int pred) { return cuda_emu::block_barrier(pred, 2); }

// ---- warp shuffles ---------------------------------------------------------------
namespace cuda_emu {

enum ShflMode { kUp, kDown, kBfly, kIdx };

// Source lane of shfl.sync as specified in the PTX ISA: b and the clamp are
// cut to 5 bits, `c` packs the segment mask (bits 12:8) and the clamp value
// (bits 4:0), exactly as CUDA's __shfl_*_sync wrappers build it. A source
// outside the lane's segment means "keep your own value".
inline int shfl_source(ShflMode mode, unsigned b, int width) {
  int lane = (int)lane_id();
  int c = ((warpSize - width) << 8) | (mode == kUp ? 0 : 0x1f);
  int bval = (int)(b & 31u), cval = c & 31, segmask = (c >> 8) & 31;
  int max_lane = (lane & segmask) | (cval & ~segmask), min_lane = lane & segmask;
  int j = lane;
  bool in_range = false;
  switch (mode) {
    case kUp: j = lane - bval; in_range = j >= max_lane; break;
    case kDown: j = lane + bval; in_range = j <= max_lane; break;
    case kBfly: j = lane ^ bval; in_range = j <= max_lane; break;
    case kIdx: j = min_lane | (bval & ~segmask); in_range = j <= max_lane; break;
  }
  return in_range ? j : lane;
}

template <class T>
inline T shfl(unsigned mask, T var, ShflMode mode, unsigned b, int width) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_rendezvous(mask, kShfl, bits, shfl_source(mode, b, width));
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace cuda_emu

template <class T> inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return cuda_emu::shfl(mask, var, cuda_emu::kIdx, (unsigned)src_lane, width);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return cuda_emu::shfl(mask, var, cuda_emu::kUp, delta, width);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return cuda_emu::shfl(mask, var, cuda_emu::kDown, delta, width);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return cuda_emu::shfl(mask, var, cuda_emu::kBfly, (unsigned)lane_mask, width);
}

// ---- warp votes --------------------------------------------------------------------
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return (unsigned)cuda_emu::warp_rendezvous(mask, cuda_emu::kVote, pred != 0, 0);
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, !pred) == 0; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cuda_emu::warp_rendezvous(mask, cuda_emu::kSyncWarp, 0, 0);
}
// Fibers cannot observe divergence, so this is the set of lanes that have not exited.
inline unsigned __activemask() { return cuda_emu::live_lanes(); }

// ---- errors raised from device code --------------------------------------------
[[noreturn]] inline void __trap() { cuda_emu::device_fault("__trap() called"); }
[[noreturn]] inline void __brkpt() { cuda_emu::device_fault("__brkpt() called"); }

#endif
