// runtime.cpp -- the block scheduler behind cuda_emu.h (see the execution
// model described there). Linked into every emulated module; all state is
// private to the module and a launch runs on the calling OS thread.
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>

#include "cuda_emu_runtime.h"

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

// Defined by the generated part of each module, next to the extern __shared__ aliases.
extern "C" unsigned char* cuda_emu_dyn_shared_base() CUDA_EMU_HIDDEN;

namespace cuda_emu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024, kGuardBytes = 4096;  // virtual; only touched pages cost memory
constexpr uint64_t kPoison = ~0ull;  // what a lane reads from a lane that did not take part
constexpr int kForceUcontext = 2;    // launch flag, for testing the portable path

enum State : uint8_t { kRunnable, kWaitBarrier, kWaitWarp, kDone };

struct Fiber {
  void* sp;  // saved stack pointer (assembly switch)
  uint3 tid;
  State state;
  ucontext_t uc;  // portable switch
};

struct Warp {
  uint32_t live;     // lanes that exist and have not exited
  uint32_t waiting;  // lanes blocked in a rendezvous
  uint32_t mask[32];
  uint8_t op[32];
  int8_t src[32];
  uint64_t value[32];
  uint64_t result[32];
};

Fiber g_fibers[kMaxThreads];
Warp g_warps[kMaxThreads / 32];
int g_nthreads, g_done, g_bar_arrived, g_bar_true, g_bar_count;
Fiber* g_cur;
bool g_use_ucontext, g_failed;
void* g_sched_sp;
ucontext_t g_sched_uc;
Invoker g_invoke;
void* g_fn;
void** g_args;
unsigned char* g_stacks;
int g_stack_count;
char g_error[4096];

// ---- context switching --------------------------------------------------------
#if defined(__x86_64__)
// Saves the callee-saved registers and SSE/x87 control words on the current
// stack, stores the stack pointer in *save and continues on `load`.
extern "C" void cuda_emu_ctx_switch(void** save, void* load) CUDA_EMU_HIDDEN;
extern "C" void cuda_emu_ctx_start() CUDA_EMU_HIDDEN;
__asm__(R"(
  .text
  .p2align 4
  .type cuda_emu_ctx_switch,@function
cuda_emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_ctx_switch,.-cuda_emu_ctx_switch
  .p2align 4
  .type cuda_emu_ctx_start,@function
cuda_emu_ctx_start:
  callq *%rbx
  ud2
  .size cuda_emu_ctx_start,.-cuda_emu_ctx_start
)");
constexpr bool kHaveAsmSwitch = true;

// The assembly switch returns through forged frames, which a CET shadow
// stack would reject; glibc's swapcontext knows how to handle one.
bool shadow_stack_active() {
  static const bool active = [] {
    unsigned long features = 0;
    return syscall(SYS_arch_prctl, 0x5005 /* ARCH_SHSTK_STATUS */, &features) == 0 && (features & 1);
  }();
  return active;
}
#else
constexpr bool kHaveAsmSwitch = false;
bool shadow_stack_active() { return false; }
void cuda_emu_ctx_switch(void**, void*) {}
void cuda_emu_ctx_start() {}
#endif

[[noreturn]] void fiber_main();

void fiber_init(Fiber& f, unsigned char* stack_lo) {
  if (g_use_ucontext) {
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = stack_lo;
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, (void (*)())fiber_main, 0);
    return;
  }
  // Frame popped by the first switch: control words, r15..r12, rbx = entry
  // point, rbp, return address = trampoline. 8 slots keep `top` 16-aligned
  // when the trampoline calls fiber_main, as the ABI requires.
  void** sp = reinterpret_cast<void**>(
      (reinterpret_cast<uintptr_t>(stack_lo) + kStackBytes) & ~uintptr_t(15));
  *--sp = reinterpret_cast<void*>(&cuda_emu_ctx_start);
  *--sp = nullptr;                                   // rbp
  *--sp = reinterpret_cast<void*>(&fiber_main);      // rbx
  for (int i = 0; i < 4; ++i) *--sp = nullptr;       // r12..r15
  *--sp = reinterpret_cast<void*>(0x037full << 32 | 0x1f80ull);  // default x87 cw, mxcsr
  f.sp = sp;
}

void switch_to(Fiber& f) {
  if (g_use_ucontext) swapcontext(&g_sched_uc, &f.uc);
  else cuda_emu_ctx_switch(&g_sched_sp, f.sp);
}

void yield() {
  if (g_use_ucontext) swapcontext(&g_cur->uc, &g_sched_uc);
  else cuda_emu_ctx_switch(&g_cur->sp, g_sched_sp);
}

// One mapping holds every fiber stack, each above an inaccessible guard page
// so that a stack overflow faults instead of corrupting its neighbour.
bool ensure_stacks(int n) {
  if (n <= g_stack_count) return true;
  const size_t each = kStackBytes + kGuardBytes;
  if (g_stacks) munmap(g_stacks, each * g_stack_count);
  void* p = mmap(nullptr, each * n, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) { g_stacks = nullptr; g_stack_count = 0; return false; }
  g_stacks = static_cast<unsigned char*>(p);
  for (int i = 0; i < n; ++i) mprotect(g_stacks + i * each, kGuardBytes, PROT_NONE);
  g_stack_count = n;
  return true;
}

// ---- shared memory -------------------------------------------------------------------
// All __shared__ variables of the module live in its TLS segment, which
// dl_iterate_phdr locates for the calling thread.
struct TlsBlock { uintptr_t probe, start, size; };

int find_tls(dl_phdr_info* info, size_t, void* data) {
  auto* tb = static_cast<TlsBlock*>(data);
  auto start = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
  for (int i = 0; start && i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_TLS && tb->probe >= start && tb->probe < start + ph.p_memsz) {
      tb->start = start;
      tb->size = ph.p_memsz;
      return 1;
    }
  }
  return 0;
}

TlsBlock shared_block() {
  TlsBlock tb{reinterpret_cast<uintptr_t>(cuda_emu_dyn_shared_base()), 0, 0};
  dl_iterate_phdr(find_tls, &tb);
  return tb;
}

// Fills static shared memory and the requested part of the dynamic buffer
// with 0xff bytes, so reads before writes give NaN (floats) or -1 (ints).
void poison_shared(const TlsBlock& tb, size_t dyn_bytes) {
  auto* dyn = cuda_emu_dyn_shared_base();
  std::memset(dyn, 0xff, dyn_bytes);
  if (!tb.size) return;
  auto* lo = reinterpret_cast<unsigned char*>(tb.start);
  std::memset(lo, 0xff, dyn - lo);
  unsigned char* after = dyn + CUDA_EMU_DYN_SHARED_MAX;
  std::memset(after, 0xff, lo + tb.size - after);
}

// ---- errors -------------------------------------------------------------------------
int vreport(const char* fmt, va_list ap) {
  size_t k = std::strlen(g_error);
  vsnprintf(g_error + k, sizeof g_error - k, fmt, ap);
  return -1;
}

int report(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vreport(fmt, ap);
  va_end(ap);
  return -1;
}

const char* op_name(int op) {
  return op == kShfl ? "__shfl*_sync" : op == kVote ? "a vote (__ballot/__all/__any_sync)" : "__syncwarp";
}

// ---- warps ---------------------------------------------------------------------------
unsigned lane_of(const Fiber* f) { return static_cast<unsigned>(f - g_fibers) & 31u; }
Warp& warp_of(const Fiber* f) { return g_warps[(f - g_fibers) >> 5]; }

// Completes the rendezvous for `mask` once every live lane it names is waiting.
void try_complete(Warp& w, Fiber* base, uint32_t mask) {
  uint32_t need = mask & w.live;
  if ((w.waiting & need) != need) return;
  int first = __builtin_ctz(need);
  uint32_t ballot = 0;
  for (uint32_t m = need; m; m &= m - 1) {
    int l = __builtin_ctz(m);
    if (w.mask[l] != mask || w.op[l] != w.op[first])
      device_fault("lane %d is in %s with mask 0x%08x while lane %d is in %s with mask 0x%08x "
                   "(undefined in CUDA: lanes named in a mask must make the same call)",
                   first, op_name(w.op[first]), mask, l, op_name(w.op[l]), w.mask[l]);
    if (w.value[l]) ballot |= 1u << l;
  }
  for (uint32_t m = need; m; m &= m - 1) {
    int l = __builtin_ctz(m), j = w.src[l];
    if (w.op[l] != kShfl) w.result[l] = ballot;
    else w.result[l] = (need >> j) & 1u ? w.value[j] : kPoison;
    base[l].state = kRunnable;
  }
  w.waiting &= ~need;
}

void lane_exited(Fiber* f) {
  Warp& w = warp_of(f);
  Fiber* base = f - lane_of(f);
  w.live &= ~(1u << lane_of(f));
  for (uint32_t m = w.waiting; m; m &= m - 1) {
    int l = __builtin_ctz(m);
    if (w.waiting >> l & 1u) try_complete(w, base, w.mask[l]);
  }
}

void fiber_main() {
  g_invoke(g_fn, g_args);
  g_cur->state = kDone;
  ++g_done;
  lane_exited(g_cur);
  yield();
  __builtin_unreachable();
}

// ---- blocks ---------------------------------------------------------------------------
int report_deadlock() {
  int bar = 0, warp = 0, done = 0;
  const Fiber* example = nullptr;
  for (int i = 0; i < g_nthreads; ++i) {
    State s = g_fibers[i].state;
    bar += s == kWaitBarrier;
    done += s == kDone;
    if (s == kWaitWarp && !warp++) example = &g_fibers[i];
  }
  report("block (%u,%u,%u): deadlock: %d thread(s) wait at __syncthreads(), %d in a warp "
         "operation, %d exited. CUDA requires every thread of the block to reach each "
         "__syncthreads(), and every live lane named in a warp operation's mask to join it.",
         blockIdx.x, blockIdx.y, blockIdx.z, bar, warp, done);
  if (example) {
    const Warp& w = warp_of(example);
    unsigned l = lane_of(example);
    report(" E.g. thread (%u,%u,%u) waits in %s with mask 0x%08x; lanes not there: 0x%08x.",
           example->tid.x, example->tid.y, example->tid.z, op_name(w.op[l]), w.mask[l],
           w.mask[l] & w.live & ~w.waiting);
  }
  return -1;
}

void init_block() {
  const unsigned bx = blockDim.x, by = blockDim.y;
  const size_t each = kStackBytes + kGuardBytes;
  for (int i = 0; i < g_nthreads; ++i) {
    Fiber& f = g_fibers[i];
    unsigned u = static_cast<unsigned>(i);
    f.tid = uint3{u % bx, (u / bx) % by, u / (bx * by)};
    f.state = kRunnable;
    fiber_init(f, g_stacks + i * each + kGuardBytes);
  }
  for (int w = 0; w * 32 < g_nthreads; ++w) {
    int lanes = g_nthreads - w * 32;
    g_warps[w].live = lanes >= 32 ? ~0u : (1u << lanes) - 1u;
    g_warps[w].waiting = 0;
  }
  g_done = g_bar_arrived = g_bar_true = 0;
}

// Resumes every runnable fiber once per round until all have exited.
int run_block(bool reverse) {
  init_block();
  while (g_done < g_nthreads) {
    bool ran = false;
    for (int k = 0; k < g_nthreads; ++k) {
      Fiber& f = g_fibers[reverse ? g_nthreads - 1 - k : k];
      if (f.state != kRunnable) continue;
      ran = true;
      g_cur = &f;
      threadIdx = f.tid;
      switch_to(f);
      if (g_failed) return -1;
    }
    if (!ran) return report_deadlock();
  }
  return 0;
}

}  // namespace

// ---- interface used by kernel code ------------------------------------------------------
int block_barrier(int pred, int op) {
  g_cur->state = kWaitBarrier;
  g_bar_true += pred != 0;
  if (++g_bar_arrived == g_nthreads) {  // everyone is here: release all
    g_bar_count = g_bar_true;
    g_bar_arrived = g_bar_true = 0;
    for (int i = 0; i < g_nthreads; ++i) g_fibers[i].state = kRunnable;
  }
  yield();
  return op == 0 ? g_bar_count : op == 1 ? g_bar_count == g_nthreads : g_bar_count != 0;
}

uint64_t warp_rendezvous(unsigned mask, WarpOp op, uint64_t value, int src) {
  Fiber* f = g_cur;
  unsigned lane = lane_of(f);
  if (!(mask >> lane & 1u))
    device_fault("%s with mask 0x%08x, which does not include the calling lane %u", op_name(op), mask, lane);
  Warp& w = warp_of(f);
  w.mask[lane] = mask;
  w.op[lane] = op;
  w.value[lane] = value;
  w.src[lane] = static_cast<int8_t>(src);
  w.waiting |= 1u << lane;
  f->state = kWaitWarp;
  try_complete(w, f - lane, mask);
  yield();
  return w.result[lane];
}

unsigned lane_id() { return lane_of(g_cur); }
unsigned live_lanes() { return warp_of(g_cur).live; }

void device_fault(const char* fmt, ...) {
  report("block (%u,%u,%u), thread (%u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z,
         threadIdx.x, threadIdx.y, threadIdx.z);
  va_list ap;
  va_start(ap, fmt);
  vreport(fmt, ap);
  va_end(ap);
  g_failed = true;
  yield();  // the scheduler sees g_failed and never resumes this fiber
  __builtin_unreachable();
}

long long static_shared_bytes() {
  TlsBlock tb = shared_block();
  return tb.size ? static_cast<long long>(tb.size) - CUDA_EMU_DYN_SHARED_MAX : -1;
}

int launch(Invoker invoke, void* fn, const unsigned* grid, const unsigned* block,
           unsigned long long dyn_shared, void** args, int flags) {
  g_error[0] = '\0';
  g_failed = false;
  const unsigned long long n = 1ull * block[0] * block[1] * block[2];
  if (n == 0 || n > kMaxThreads || dyn_shared > CUDA_EMU_DYN_SHARED_MAX)
    return report("invalid launch configuration");
  if (!ensure_stacks(static_cast<int>(n))) return report("cannot allocate fiber stacks");
  g_nthreads = static_cast<int>(n);
  gridDim = dim3(grid[0], grid[1], grid[2]);
  blockDim = dim3(block[0], block[1], block[2]);
  g_invoke = invoke;
  g_fn = fn;
  g_args = args;
  g_use_ucontext = !kHaveAsmSwitch || (flags & kForceUcontext) || shadow_stack_active();
  const bool reverse = flags & CUDA_EMU_REVERSE;
  const TlsBlock tb = shared_block();
  const unsigned long long gx = grid[0], gxy = gx * grid[1], blocks = gxy * grid[2];
  for (unsigned long long b = 0; b < blocks; ++b) {
    unsigned long long id = reverse ? blocks - 1 - b : b;
    blockIdx = uint3{unsigned(id % gx), unsigned(id % gxy / gx), unsigned(id / gxy)};
    poison_shared(tb, dyn_shared);
    if (run_block(reverse) != 0) return -1;
  }
  return 0;
}

}  // namespace cuda_emu

CUDA_EMU_EXPORT const char* cuda_emu_last_error() { return cuda_emu::g_error; }
CUDA_EMU_EXPORT long long cuda_emu_static_shared_bytes() { return cuda_emu::static_shared_bytes(); }
