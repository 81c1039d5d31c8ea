// cuda_emu_fp16.h -- host versions of __half and __nv_bfloat16.
// Both are 16-bit storage types; conversions round exactly like the CUDA
// intrinsics (round-to-nearest-even, subnormals, inf; NaN becomes the
// canonical 0x7fff). Arithmetic goes through float and rounds once per
// operation. The conversion constructors and operator float() mirror
// cuda_fp16.h, so expressions that are ambiguous under NVRTC (`h * 2.0f`)
// are ambiguous here too.
#ifndef PYLLM_CUDA_EMU_FP16_H
#define PYLLM_CUDA_EMU_FP16_H

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace cuda_emu {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Rounds the integer `m` right by `s` bits, ties to even.
inline uint32_t shift_rne(uint32_t m, int s) {
  uint32_t r = m >> s, rem = m & ((1u << s) - 1), half = 1u << (s - 1);
  return r + (rem > half || (rem == half && (r & 1u)));
}

inline unsigned short float2half_bits(float f) {
  uint32_t x = f32_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;                       // NaN
  if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520: inf
  if (ax <= 0x33000000u) return (unsigned short)sign;          // <= 2^-25: zero
  int e = (int)(ax >> 23) - 127;
  uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
  if (e < -14)  // half subnormal: count units of 2^-24
    return (unsigned short)(sign | shift_rne(mant, -e - 1));
  // normal: the carry of a rounded-up mantissa correctly bumps the exponent
  return (unsigned short)(sign | shift_rne(((uint32_t)(e + 15) << 23) | (ax & 0x7fffffu), 13));
}

inline float half_bits2float(unsigned short h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
  if (e != 0) return bits_f32(sign | ((e + 112) << 23) | (m << 13));
  float v = (float)m * 5.9604644775390625e-8f;  // subnormal: m * 2^-24, exact
  return sign ? -v : v;
}

inline unsigned short float2bf16_bits(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_bits2float(unsigned short b) { return bits_f32((uint32_t)b << 16); }

}  // namespace cuda_emu

struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

// One macro defines both 16-bit types so their interfaces cannot drift apart.
#define CUDA_EMU_16BIT_TYPE(T, RAW, TO_BITS, TO_FLOAT)                               \
  struct alignas(2) T {                                                              \
    unsigned short __x;                                                              \
    T() = default;                                                                   \
    T(const RAW& r) : __x(r.x) {}                                                    \
    T(float f) : __x(cuda_emu::TO_BITS(f)) {}                                        \
    T(double d) : __x(cuda_emu::TO_BITS((float)d)) {}                                \
    template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>        \
    T(I i) : __x(cuda_emu::TO_BITS((float)i)) {}                                     \
    operator float() const { return cuda_emu::TO_FLOAT(__x); }                       \
    operator RAW() const { return RAW{__x}; }                                        \
    T& operator+=(const T& o) { return *this = T(float(*this) + float(o)); }         \
    T& operator-=(const T& o) { return *this = T(float(*this) - float(o)); }         \
    T& operator*=(const T& o) { return *this = T(float(*this) * float(o)); }         \
    T& operator/=(const T& o) { return *this = T(float(*this) / float(o)); }         \
  };                                                                                 \
  inline T operator+(const T& a, const T& b) { return T(float(a) + float(b)); }      \
  inline T operator-(const T& a, const T& b) { return T(float(a) - float(b)); }      \
  inline T operator*(const T& a, const T& b) { return T(float(a) * float(b)); }      \
  inline T operator/(const T& a, const T& b) { return T(float(a) / float(b)); }      \
  inline T operator-(const T& a) { T r; r.__x = (unsigned short)(a.__x ^ 0x8000u); return r; } \
  inline T operator+(const T& a) { return a; }                                       \
  inline bool operator==(const T& a, const T& b) { return float(a) == float(b); }    \
  inline bool operator!=(const T& a, const T& b) { return float(a) != float(b); }    \
  inline bool operator<(const T& a, const T& b) { return float(a) < float(b); }      \
  inline bool operator>(const T& a, const T& b) { return float(a) > float(b); }      \
  inline bool operator<=(const T& a, const T& b) { return float(a) <= float(b); }    \
  inline bool operator>=(const T& a, const T& b) { return float(a) >= float(b); }

CUDA_EMU_16BIT_TYPE(__half, __half_raw, float2half_bits, half_bits2float)
CUDA_EMU_16BIT_TYPE(__nv_bfloat16, __nv_bfloat16_raw, float2bf16_bits, bf16_bits2float)
#undef CUDA_EMU_16BIT_TYPE

struct alignas(4) __half2 {
  __half x, y;
  __half2() = default;
  __half2(__half a, __half b) : x(a), y(b) {}
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
};
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

// ---- conversions -----------------------------------------------------------
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return float(b); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half_raw{u}; }
inline __half __short_as_half(short s) { return __half_raw{(unsigned short)s}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 b) { return (short)b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16_raw{u}; }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return __nv_bfloat16_raw{(unsigned short)s}; }
inline __half __int2half_rn(int i) { return __half((float)i); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __nv_bfloat16((float)i); }

// ---- pairs -------------------------------------------------------------------
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline __half2 __float2half2_rn(float a) { return __half2(__half(a), __half(a)); }
inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline __half2 __half2half2(__half a) { return __half2(a, a); }
inline __half __low2half(__half2 v) { return v.x; }
inline __half __high2half(__half2 v) { return v.y; }
inline float __low2float(__half2 v) { return float(v.x); }
inline float __high2float(__half2 v) { return float(v.y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b));
}
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 v) { return v.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 v) { return v.y; }
inline float __low2float(__nv_bfloat162 v) { return float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return float(v.y); }

// ---- arithmetic intrinsics, shared by both types ---------------------------
#define CUDA_EMU_16BIT_OPS(T, T2)                                                     \
  inline T __hadd(T a, T b) { return a + b; }                                        \
  inline T __hsub(T a, T b) { return a - b; }                                        \
  inline T __hmul(T a, T b) { return a * b; }                                        \
  inline T __hdiv(T a, T b) { return a / b; }                                        \
  inline T __hneg(T a) { return -a; }                                                \
  inline T __habs(T a) { T r = a; r.__x &= 0x7fffu; return r; }                      \
  inline T __hfma(T a, T b, T c) { return T(float(a) * float(b) + float(c)); }       \
  inline T __hmax(T a, T b) { return T(fmaxf(float(a), float(b))); }                 \
  inline T __hmin(T a, T b) { return T(fminf(float(a), float(b))); }                 \
  inline bool __heq(T a, T b) { return a == b; }                                     \
  inline bool __hne(T a, T b) { return a != b; }                                     \
  inline bool __hlt(T a, T b) { return a < b; }                                      \
  inline bool __hle(T a, T b) { return a <= b; }                                     \
  inline bool __hgt(T a, T b) { return a > b; }                                      \
  inline bool __hge(T a, T b) { return a >= b; }                                     \
  inline bool __hisnan(T a) { return float(a) != float(a); }                         \
  inline int __hisinf(T a) { float f = float(a); return f == INFINITY ? 1 : f == -INFINITY ? -1 : 0; } \
  inline T hexp(T a) { return T(expf(float(a))); }                                   \
  inline T hlog(T a) { return T(logf(float(a))); }                                   \
  inline T hsqrt(T a) { return T(sqrtf(float(a))); }                                 \
  inline T hrsqrt(T a) { return T(1.0f / sqrtf(float(a))); }                         \
  inline T2 __hadd2(T2 a, T2 b) { return T2(a.x + b.x, a.y + b.y); }                 \
  inline T2 __hsub2(T2 a, T2 b) { return T2(a.x - b.x, a.y - b.y); }                 \
  inline T2 __hmul2(T2 a, T2 b) { return T2(a.x * b.x, a.y * b.y); }                 \
  inline T2 __hfma2(T2 a, T2 b, T2 c) { return T2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)); }

CUDA_EMU_16BIT_OPS(__half, __half2)
CUDA_EMU_16BIT_OPS(__nv_bfloat16, __nv_bfloat162)
#undef CUDA_EMU_16BIT_OPS

#endif
