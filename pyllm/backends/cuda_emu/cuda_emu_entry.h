// cuda_emu_entry.h -- glue between the generated per-module kernel table and
// the scheduler: calls a kernel with arguments unpacked from a void* array
// (as cuLaunchKernel takes them) and describes its parameters to Python.
#ifndef PYLLM_CUDA_EMU_ENTRY_H
#define PYLLM_CUDA_EMU_ENTRY_H

#include <cstddef>
#include <cstdio>
#include <type_traits>
#include <utility>

#include "cuda_emu_fp16.h"
#include "cuda_emu_runtime.h"

namespace cuda_emu {

// One letter per C type: f float, i/u integer, ? bool, h __half,
// b __nv_bfloat16, v void, o anything else (structs, pointers).
template <class T>
constexpr char kind_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same<U, __half>::value) return 'h';
  else if constexpr (std::is_same<U, __nv_bfloat16>::value) return 'b';
  else if constexpr (std::is_same<U, bool>::value) return '?';
  else if constexpr (std::is_floating_point<U>::value) return 'f';
  else if constexpr (std::is_integral<U>::value) return std::is_signed<U>::value ? 'i' : 'u';
  else if constexpr (std::is_void<U>::value) return 'v';
  else return 'o';
}

template <class T>
constexpr size_t size_of() {
  if constexpr (std::is_void<T>::value) return 0;
  else return sizeof(T);
}

// "p<c|m><kind><bytes>" for a pointer to const/mutable data, "s-<kind><bytes>" by value.
template <class T>
int describe(char* out, size_t n) {
  if constexpr (std::is_pointer<T>::value) {
    using P = std::remove_pointer_t<T>;
    return snprintf(out, n, "p%c%c%zu", std::is_const<P>::value ? 'c' : 'm', kind_of<P>(), size_of<P>());
  } else {
    return snprintf(out, n, "s-%c%zu", kind_of<T>(), sizeof(T));
  }
}

template <class F> struct Entry;

template <class... A>
struct Entry<void (*)(A...)> {
  template <size_t... I>
  static void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    (void)args;
    f(*static_cast<std::decay_t<A>*>(args[I])...);
  }
  static void invoke(void* fn, void** args) {
    call(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
  }
  static const char* signature() {
    static char buf[16 * (sizeof...(A) + 1)];
    size_t k = 0;
    ((k += describe<std::decay_t<A>>(buf + k, sizeof buf - k), buf[k++] = ','), ...);
    buf[k ? k - 1 : 0] = '\0';
    return buf;
  }
};

}  // namespace cuda_emu

#endif
