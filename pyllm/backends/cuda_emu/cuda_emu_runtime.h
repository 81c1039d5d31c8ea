// cuda_emu_runtime.h -- the interface between emulated kernel code and the
// scheduler in runtime.cpp. Kernel sources never include this directly; it
// comes in through cuda_emu.h. Everything here has hidden visibility so that
// every compiled module carries its own private copy of the runtime.
#ifndef PYLLM_CUDA_EMU_RUNTIME_H
#define PYLLM_CUDA_EMU_RUNTIME_H

#include <cstdint>

#define CUDA_EMU_HIDDEN __attribute__((visibility("hidden")))
#define CUDA_EMU_EXPORT extern "C" __attribute__((visibility("default")))

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The CUDA built-in index variables. The scheduler rewrites threadIdx on every
// fiber switch; the others change once per block or per launch.
extern uint3 threadIdx CUDA_EMU_HIDDEN;
extern uint3 blockIdx CUDA_EMU_HIDDEN;
extern dim3 blockDim CUDA_EMU_HIDDEN;
extern dim3 gridDim CUDA_EMU_HIDDEN;

// Largest dynamic shared memory a launch may request (the sm_90 opt-in limit).
#define CUDA_EMU_DYN_SHARED_MAX (227 * 1024)

namespace cuda_emu {

// Kinds of warp rendezvous; lanes meeting with different kinds is an error.
enum WarpOp : uint8_t { kShfl = 1, kVote = 2, kSyncWarp = 3 };

// Block barrier; `op` 0 returns the count of non-zero predicates, 1 their AND,
// 2 their OR (the __syncthreads_count/and/or variants).
int block_barrier(int pred, int op) CUDA_EMU_HIDDEN;

// Warp rendezvous: waits for every live lane named in `mask`, then returns the
// 64-bit value published by lane `src` (or poison when `src` did not take
// part). For kVote/kSyncWarp it returns the ballot of the lanes' values.
uint64_t warp_rendezvous(unsigned mask, WarpOp op, uint64_t value, int src) CUDA_EMU_HIDDEN;

unsigned lane_id() CUDA_EMU_HIDDEN;
unsigned live_lanes() CUDA_EMU_HIDDEN;

// Aborts the launch from inside a kernel (assert, __trap); never returns.
[[noreturn]] void device_fault(const char* fmt, ...) CUDA_EMU_HIDDEN
    __attribute__((format(printf, 1, 2)));

using Invoker = void (*)(void* fn, void** args);

// Runs one kernel launch; returns 0 or -1 with cuda_emu_last_error() set.
int launch(Invoker invoke, void* fn, const unsigned* grid, const unsigned* block,
           unsigned long long dyn_shared, void** args, int flags) CUDA_EMU_HIDDEN;

// Bytes of static __shared__ memory in this module (all kernels together).
long long static_shared_bytes() CUDA_EMU_HIDDEN;

}  // namespace cuda_emu

// Launch flags.
#define CUDA_EMU_REVERSE 1  // schedule blocks and threads in descending order

#endif
