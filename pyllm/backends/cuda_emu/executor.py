"""CuPy-like front end of the CUDA emulator: ``Module`` and ``Kernel``.

``Module(code=..., options=("-DSCALAR_T=__half",)).get_function("name")``
returns a ``Kernel`` called as ``kernel(grid, block, args, shared_mem=0)``,
like ``cupy.RawModule``/``cupy.RawKernel``. NumPy arrays stand in for device
arrays: they are passed by pointer and written in place.

Arguments follow CuPy's rules, checked against the kernel's real parameter
types (params.py).
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from .build import DYN_SHARED_MAX, build_library
from .errors import KernelFault, LaunchError, RaceDetected
from .params import Param, array_fits, as_numpy_scalar, example_dtype, scalar_fits

MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCK_DIM = (1024, 1024, 64)
MAX_GRID_DIM = (2**31 - 1, 65535, 65535)
DEFAULT_SHARED_LIMIT = 48 * 1024  # per block, without the opt-in attribute
OPTIN_SHARED_LIMIT = DYN_SHARED_MAX  # sm_90's cudaDevAttrMaxSharedMemoryPerBlockOptin, the largest

_REVERSE, _FORCE_UCONTEXT = 1, 2
_LIB_LOCKS: dict[str, threading.Lock] = {}
_LIB_LOCKS_GUARD = threading.Lock()


def _dims(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise LaunchError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


def _lib_lock(path: str) -> threading.Lock:
    # dlopen hands out one copy of a library per path, so launches through any
    # Module loading it share the scheduler's global state.
    with _LIB_LOCKS_GUARD:
        return _LIB_LOCKS.setdefault(path, threading.Lock())


class Module:
    """A compiled CUDA source, like ``cupy.RawModule``.

    Give the source as ``code`` or as the ``path`` of a ``.cu`` file (unlike
    CuPy, where ``path`` names a compiled cubin/PTX). ``options`` are NVRTC
    options; only ``-D``/``-U``/``-I`` matter on the host. ``name_expressions``
    is accepted for compatibility and ignored (template kernels are not
    supported). ``race_check`` (default: env ``PYLLM_CUDA_EMU_RACE_CHECK=1``)
    runs every launch under two schedules and raises ``RaceDetected`` if the
    results differ. ``optin_shared_limit`` is the emulated GPU's
    cudaDevAttrMaxSharedMemoryPerBlockOptin (default sm_90's), the most
    shared memory a block may opt in to.
    """

    def __init__(
        self,
        code: str | None = None,
        path: str | os.PathLike | None = None,
        options=(),
        name_expressions=None,
        *,
        race_check: bool | None = None,
        optin_shared_limit: int = OPTIN_SHARED_LIMIT,
    ):
        if (code is None) == (path is None):
            raise ValueError("give exactly one of code= and path=")
        if not DEFAULT_SHARED_LIMIT <= optin_shared_limit <= OPTIN_SHARED_LIMIT:
            raise ValueError(f"optin_shared_limit must lie in [{DEFAULT_SHARED_LIMIT}, {OPTIN_SHARED_LIMIT}]")
        self.optin_shared_limit = optin_shared_limit
        if code is None:
            with open(path, encoding="utf-8") as f:
                code = f.read()
        self.code, self.path, self.options = code, path, tuple(options)
        self.name_expressions = name_expressions
        if race_check is None:
            race_check = os.environ.get("PYLLM_CUDA_EMU_RACE_CHECK", "") not in ("", "0")
        self.race_check = race_check
        self.library_path = str(build_library(code, self.options, path))
        self._lib = ctypes.CDLL(self.library_path)
        self._lock = _lib_lock(self.library_path)
        self._declare_functions()
        self.static_shared_bytes = max(0, int(self._lib.cuda_emu_static_shared_bytes()))
        self._kernels = {}
        for i in range(self._lib.cuda_emu_kernel_count()):
            sig = self._lib.cuda_emu_kernel_signature(i).decode()
            params = tuple(Param.parse(c) for c in sig.split(",")) if sig else ()
            self._kernels[self._lib.cuda_emu_kernel_name(i).decode()] = (i, params)

    def _declare_functions(self) -> None:
        lib = self._lib
        lib.cuda_emu_kernel_count.restype = ctypes.c_int
        lib.cuda_emu_kernel_name.restype = ctypes.c_char_p
        lib.cuda_emu_kernel_name.argtypes = [ctypes.c_int]
        lib.cuda_emu_kernel_signature.restype = ctypes.c_char_p
        lib.cuda_emu_kernel_signature.argtypes = [ctypes.c_int]
        lib.cuda_emu_static_shared_bytes.restype = ctypes.c_longlong
        lib.cuda_emu_last_error.restype = ctypes.c_char_p
        lib.cuda_emu_launch.restype = ctypes.c_int
        lib.cuda_emu_launch.argtypes = [
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_ulonglong,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
        ]

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return tuple(self._kernels)

    def get_function(self, name: str) -> "Kernel":
        if name not in self._kernels:
            raise KeyError(
                f"no __global__ function {name!r} in module; it has {list(self._kernels)}"
            )
        index, params = self._kernels[name]
        return Kernel(self, name, index, params)


class Kernel:
    """One __global__ function, callable like ``cupy.RawKernel``."""

    max_threads_per_block = MAX_THREADS_PER_BLOCK

    def __init__(self, module: Module, name: str, index: int, params: tuple[Param, ...]):
        self.module, self.name, self._index, self.params = module, name, index, params
        # Static shared memory is only known per module, so it counts for every kernel.
        self.shared_size_bytes = module.static_shared_bytes
        self._max_dynamic = DEFAULT_SHARED_LIMIT - self.shared_size_bytes

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        """cudaFuncAttributeMaxDynamicSharedMemorySize; raise it to opt in beyond 48 KiB."""
        return self._max_dynamic

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int) -> None:
        limit = self.module.optin_shared_limit
        if not 0 <= value <= limit - self.shared_size_bytes:
            raise LaunchError(
                f"{self.name}: max_dynamic_shared_size_bytes={value} exceeds the "
                f"opt-in limit {limit} minus {self.shared_size_bytes} static"
            )
        self._max_dynamic = int(value)

    def __call__(self, grid, block, args, *, shared_mem: int = 0) -> None:
        grid3, block3 = _dims(grid, "grid"), _dims(block, "block")
        self._check_config(grid3, block3, int(shared_mem))
        argv, keep_alive, arrays = self._marshal(args)
        if self.module.race_check:
            self._launch_twice(grid3, block3, int(shared_mem), argv, arrays)
        else:
            self._launch(grid3, block3, int(shared_mem), argv, 0)
        del keep_alive

    # ---- checks --------------------------------------------------------------------------
    def _check_config(self, grid, block, shared_mem: int) -> None:
        where = f"kernel {self.name!r}: invalid launch:"
        if min(grid + block) < 1:
            raise LaunchError(
                f"{where} zero-sized grid {grid} or block {block} (CuPy would launch one block: "
                "skip empty launches)"
            )
        threads = block[0] * block[1] * block[2]
        if threads > MAX_THREADS_PER_BLOCK:
            raise LaunchError(f"{where} {threads} threads per block (max {MAX_THREADS_PER_BLOCK})")
        if any(b > m for b, m in zip(block, MAX_BLOCK_DIM)):
            raise LaunchError(
                f"{where} block {block} exceeds the per-dimension limits {MAX_BLOCK_DIM}"
            )
        if any(g > m for g, m in zip(grid, MAX_GRID_DIM)):
            raise LaunchError(
                f"{where} grid {grid} exceeds the per-dimension limits {MAX_GRID_DIM}"
            )
        if self.shared_size_bytes > DEFAULT_SHARED_LIMIT:
            raise LaunchError(
                f"{where} {self.shared_size_bytes} bytes of static shared memory "
                f"(max {DEFAULT_SHARED_LIMIT})"
            )
        if shared_mem < 0 or shared_mem > self._max_dynamic:
            raise LaunchError(
                f"{where} {shared_mem} bytes of dynamic shared memory; with "
                f"{self.shared_size_bytes} static the limit is {self._max_dynamic} "
                "(raise max_dynamic_shared_size_bytes to opt in)"
            )

    def _marshal(self, args):
        if not isinstance(args, (tuple, list)):
            raise LaunchError(
                f"kernel {self.name!r}: args must be a tuple, got {type(args).__name__}"
            )
        if len(args) != len(self.params):
            raise LaunchError(
                f"kernel {self.name!r} takes {len(self.params)} arguments "
                f"({', '.join(map(str, self.params))}), got {len(args)}"
            )
        argv = (ctypes.c_void_p * max(1, len(args)))()
        keep_alive, arrays = [], []
        for i, (arg, p) in enumerate(zip(args, self.params)):
            slot = (
                self._pointer_slot(i, arg, p, arrays) if p.pointer else self._scalar_slot(i, arg, p)
            )
            keep_alive.append(slot)
            argv[i] = ctypes.addressof(slot)
        return argv, keep_alive, arrays

    def _bad_arg(self, i: int, p: Param, got: str) -> LaunchError:
        return LaunchError(f"kernel {self.name!r} argument {i} ({p}): got {got}")

    def _pointer_slot(self, i, arg, p: Param, arrays):
        if arg is None:
            return ctypes.c_void_p(None)
        if not isinstance(arg, np.ndarray):
            raise self._bad_arg(i, p, f"{type(arg).__name__}; pointers take NumPy arrays or None")
        if not arg.flags.c_contiguous:
            raise self._bad_arg(i, p, "a non-contiguous array; pass np.ascontiguousarray(...)")
        if not array_fits(p, arg.dtype):
            raise self._bad_arg(i, p, f"an array of dtype {arg.dtype}")
        arrays.append(arg)
        return ctypes.c_void_p(arg.ctypes.data)

    def _scalar_slot(self, i, arg, p: Param):
        if isinstance(arg, np.ndarray):
            raise self._bad_arg(i, p, "an array; pass a NumPy scalar for a by-value parameter")
        value = as_numpy_scalar(arg)
        if not scalar_fits(p, value.dtype):
            hint = (
                " (CuPy passes Python ints as int64 and floats as float64)"
                if not isinstance(arg, np.generic)
                else ""
            )
            raise self._bad_arg(
                i,
                p,
                f"{type(arg).__name__} -> {value.dtype}{hint}; "
                f"pass e.g. np.{np.dtype(example_dtype(p)).name}(...)",
            )
        slot = (ctypes.c_uint64 * ((p.size + 7) // 8))()  # 8-byte aligned storage
        ctypes.memmove(slot, value.tobytes(), p.size)
        return slot

    # ---- launching -----------------------------------------------------------------------
    def _launch(self, grid, block, shared_mem, argv, flags) -> None:
        if os.environ.get("PYLLM_CUDA_EMU_UCONTEXT", "") not in ("", "0"):
            flags |= _FORCE_UCONTEXT
        lib = self.module._lib
        with self.module._lock:
            rc = lib.cuda_emu_launch(
                self._index,
                (ctypes.c_uint * 3)(*grid),
                (ctypes.c_uint * 3)(*block),
                shared_mem,
                argv,
                flags,
            )
            message = lib.cuda_emu_last_error().decode(errors="replace") if rc else ""
        if rc:
            raise KernelFault(f"kernel {self.name!r}: {message}")

    def _launch_twice(self, grid, block, shared_mem, argv, arrays) -> None:
        """Run in descending then ascending thread order; any difference is a race."""
        unique = list({id(a): a for a in arrays}.values())
        before = [a.copy() for a in unique]
        self._launch(grid, block, shared_mem, argv, _REVERSE)
        reversed_results = [a.copy() for a in unique]
        for a, b in zip(unique, before):
            a[...] = b
        self._launch(grid, block, shared_mem, argv, 0)
        differing = [
            str(i)
            for i, (a, r) in enumerate(zip(unique, reversed_results))
            if not np.array_equal(a.reshape(-1).view(np.uint8), r.reshape(-1).view(np.uint8))
        ]
        if differing:
            raise RaceDetected(
                f"kernel {self.name!r}: array argument(s) #{', #'.join(differing)} (counting arrays "
                "only) differ between ascending and descending thread/block order: the kernel "
                "depends on scheduling (missing __syncthreads/__syncwarp, or racing global writes)"
            )
