// cuda_emu.h -- lets g++ compile an unmodified CUDA .cu file for the CPU.
//
// It is force-included (g++ -include cuda_emu.h) ahead of the kernel source;
// the kernel's own #include <cuda_fp16.h> / <cuda_bf16.h> resolve to empty
// stubs in include/.
//
// Execution model (implemented in runtime.cpp):
//  * One OS thread runs a launch, one block at a time.
//  * Each CUDA thread of the block is a fiber with its own small stack. Fibers
//    switch only at __syncthreads() and warp operations (shuffles, votes,
//    __syncwarp), so all plain code between two such points runs atomically.
//  * The scheduler runs in rounds: it resumes every runnable fiber once, in
//    ascending linear thread order, and each fiber runs to its next sync
//    point. All threads of a block therefore advance in lockstep, and a
//    thread that reads shared memory that another thread writes later in the
//    same round (a missing __syncthreads) sees stale data.
//  * __syncthreads() is a real barrier over all threads of the block; if
//    threads exit while others wait there, the launch fails as a deadlock.
//  * A warp operation is a rendezvous of the live lanes named in its mask:
//    every lane publishes its value, and once all have arrived each reads its
//    partner's value. Reading a lane that did not take part yields poison
//    (all bits set: NaN for floats), as CUDA leaves it undefined.
//  * __shared__ variables are thread_local: one instance per OS thread, hence
//    one per emulated block, shared by its fibers. extern __shared__ arrays
//    alias one dynamic buffer. Shared memory is filled with 0xff bytes at the
//    start of every block, so reading it before writing gives NaN / -1.
#ifndef PYLLM_CUDA_EMU_H
#define PYLLM_CUDA_EMU_H

// Standard headers first: the CUDA qualifier macros below must not leak into them.
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <type_traits>
#include <utility>

#include "cuda_emu_runtime.h"
#include "cuda_emu_fp16.h"
#include "cuda_emu_device.h"
#include "cuda_emu_entry.h"

#define PYLLM_CUDA_EMU 1

// __global__ leaves a marker attribute (ignored by g++) that the build step
// finds in the preprocessed source to learn the kernel names.
#define __global__ __attribute__((cuda_emu_global))
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __shared__ thread_local
#define __constant__
#define __managed__
#define __grid_constant__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

// Device-side assert needs no include under NVRTC; it fails the launch here.
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) \
  ((e) ? (void)0 : cuda_emu::device_fault("%s:%d: assertion `%s' failed", __FILE__, __LINE__, #e))
#endif

#endif
