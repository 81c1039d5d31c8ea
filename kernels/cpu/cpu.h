// The CPU backend's C kernels, built into one library from kernels/cpu/*.c by
// pyllm/backends/cpu_kernels.py (host C compiler, -O3 -march=native) and called through ctypes:
//   matmul.c     skinny_matmul (a decode step's few rows) and matmul (a prompt's many rows)
//   rows.c       rms_norm, swiglu, qkv_rope (bias, rope and the KV-cache writes)
//   attention.c  attention (every sequence of a step over its KV cache)
//   pool.c       the thread pool they all share
// Without AVX-512 the sources compile to nothing and the NumPy path serves.
#pragma once
#ifdef __AVX512F__
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXPORT __attribute__((visibility("default")))  // what ctypes calls; the rest stays inside

// The pool (pool.c): a kernel takes the pool, sets its arguments, and pool_run(task) runs
// task(part) for part 0 .. pool_threads - 1, part 0 on the calling thread.
extern int pool_threads;
void pool_lock(void);  // one call at a time, whichever thread makes it
void pool_unlock(void);
void pool_run(void (*task)(int part));

static inline __m512 exp512(__m512 x) {  // for swiglu and softmax
  // exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two steps (Cody-Waite), and
  // exp(r) = 1 + r + r^2 P(r) on |r| <= ln 2 / 2 (Cephes' expf coefficients); within 2 ulp of expf
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));  // 0 .. FLT_MAX
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif
