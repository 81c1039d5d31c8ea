"""The two devices the CUDA backend runs on; each supplies only what differs between them.

* `CupyDevice` ("cuda"): CuPy arrays, cuBLAS gemmEx with f32 compute, cupy.RawModule (NVRTC).
* `EmuDevice` ("cuda-emu"): NumPy arrays, NumPy matmul in f32 rounded once to the storage dtype
  (what cuBLAS does with f32 compute), and the cuda_emu executor, which runs the same .cu files on
  the CPU with CUDA semantics. It models a GPU's limits (`GpuLimits`), takes only the gemm
  operands cuBLAS takes, and fills `empty` arrays with NaN, since a GPU hands out old memory.

Both capture a stretch of launches and gemms as a graph and replay it (cuda_graph.py): CuPy by
stream capture on a stream of its own (nothing runs while it captures), cuda-emu by recording
the calls instead of running them, then running the record.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..dtypes import convert, storage_dtype
from ..errors import PyllmError
from . import nvrtc

CUDA_DATA_TYPES = {"f32": 0, "f16": 2, "bf16": 14}  # cudaDataType_t: CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF
CUBLAS_COMPUTE_32F = 68  # cublasComputeType_t: f32 accumulation for every storage dtype
# cublasMath_t: CUBLAS_DEFAULT_MATH (0, no TF32) | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION
# (16): split-K partial sums stay f32, never reduced in f16/bf16. CuPy names neither flag.
CUBLAS_MATH_MODE = 0 | 16


@dataclass(frozen=True)
class GpuLimits:
    """What the backend must know of a GPU: its compute capability (75 for 7.5), the shared memory
    one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin), in bytes, and its
    multiprocessors (cudaDevAttrMultiProcessorCount: how many blocks it takes to keep it busy)."""

    compute_capability: int
    shared_optin_bytes: int
    multiprocessors: int


SM90_LIMITS = GpuLimits(90, 227 * 1024, 132)  # H100 / H200: what cuda-emu models unless told otherwise


def check_dtype_on(dtype: str, limits: GpuLimits):
    """bf16 needs compute capability 8.0 (cuBLAS has no bf16 gemm before Ampere)."""
    if dtype == "bf16" and limits.compute_capability < 80:
        major, minor = divmod(limits.compute_capability, 10)
        raise PyllmError(f"--dtype bf16 needs a GPU of compute capability 8.0 or newer; this one is "
                         f"{major}.{minor}: use --dtype f16 or f32")


def gemm_operands(a, b, c) -> tuple[int, int, int, int, int, int]:
    """cuBLAS's view of c = a @ b.T, a [M, K], b [N, K], c [M, N] (row-major, rows contiguous):
    the column-major c^T = b a^T as (m, n, k, lda, ldb, ldc) = (N, M, K, b's, a's, c's row
    strides), checked as cuBLAS checks them: lda, ldb >= K (op T, op N), ldc >= N."""
    (rows, depth), cols = a.shape, b.shape[0]
    if b.shape[1] != depth or c.shape != (rows, cols) or not a.dtype == b.dtype == c.dtype:
        raise ValueError(f"gemm: a {a.shape}, b {b.shape}, c {c.shape} ({a.dtype}, {b.dtype}, {c.dtype}) "
                         "are not a [M, K], b [N, K], c [M, N] of one dtype")
    lda, ldb, ldc = _row_stride(b), _row_stride(a), _row_stride(c)
    if min(lda, ldb) < max(1, depth) or ldc < max(1, cols):
        raise ValueError(f"gemm: leading dimensions {lda}, {ldb}, {ldc} are below cuBLAS's minimum "
                         f"{max(1, depth)}, {max(1, depth)}, {max(1, cols)}")
    return cols, rows, depth, lda, ldb, ldc


def _row_stride(x) -> int:
    if x.ndim != 2 or (x.shape[1] > 1 and x.strides[1] != x.itemsize) or x.strides[0] % x.itemsize:
        raise ValueError("cuBLAS needs matrices whose rows are contiguous")
    return x.strides[0] // x.itemsize


@dataclass
class Capture:
    """What a capture made: the replayable graph, and every array allocated while capturing (kept
    as long as the graph, which writes them)."""
    graph: Any = None
    kept: list = field(default_factory=list)


class Capturing:
    """What both devices do about a capture in progress (`capturing`, a Capture, or None)."""
    capturing = None

    def _kept(self, array):
        """A newly allocated array, kept with the graph being captured, if any."""
        if self.capturing is not None:
            self.capturing.kept.append(array)
        return array


class CupyDevice(Capturing):
    """A real GPU through CuPy."""

    name = "cuda"

    def __init__(self):
        try:
            import cupy
        except ImportError:
            raise PyllmError("--backend cuda needs CuPy, which is not installed "
                             "(pip install 'cupy-cuda12x[ctk]')") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            missing = "no CUDA GPU found" if "NoDevice" in str(exc) else "no working CUDA driver"
            raise PyllmError(f"--backend cuda: {missing} ({exc})") from None
        if count == 0:
            raise PyllmError("--backend cuda: CuPy finds no CUDA GPU")
        self.xp = cupy
        gpu = cupy.cuda.Device()
        self.limits = GpuLimits(int(gpu.compute_capability), gpu.attributes["MaxSharedMemoryPerBlockOptin"],
                                gpu.attributes["MultiProcessorCount"])
        self.compile_error = cupy.cuda.compiler.CompileException
        self.include_dir = nvrtc.cuda_include_dir(cupy.cuda.nvrtc.getVersion())  # None: CuPy's own headers
        cupy.cuda.cublas.setMathMode(cupy.cuda.device.get_cublas_handle(), CUBLAS_MATH_MODE)

    def compile(self, source: str, options: tuple):
        """A RawModule compiled now (CuPy compiles lazily, at the first launch)."""
        include = (f"-I{self.include_dir}",) if self.include_dir else ()
        module = self.xp.RawModule(code=source, options=options + include)
        module.compile()
        return module

    def launch(self, kernel, grid, block, args, shared_mem):
        kernel(grid, block, args, shared_mem=shared_mem)

    def empty(self, shape, dtype: str):
        return self._kept(self.xp.empty(shape, storage_dtype(dtype)))

    @contextmanager
    def capture(self):
        """Launches and gemms inside are captured on a stream of its own (relaxed mode, CuPy's
        default), not run; the graph replays on the current stream, in order with other work."""
        self.xp.cuda.Device().synchronize()
        stream, self.capturing = self.xp.cuda.Stream(non_blocking=True), Capture()
        try:
            with stream:
                stream.begin_capture()
                try:
                    yield self.capturing
                finally:
                    self.capturing.graph = stream.end_capture()
        finally:
            self.capturing = None

    def replay(self, graph):
        graph.launch(stream=self.xp.cuda.get_current_stream())

    def copy_in(self, device_array, host_array):
        device_array.set(host_array)  # on the current stream, before the replay that reads it

    def gemm(self, a, b, c, alpha: float, beta: float, dtype: str):
        """c = alpha * a @ b.T + beta * c; a [M, K], b [N, K], c [M, N], rows contiguous.

        cuBLAS is column-major, where our row-major c [M, N] reads as c^T [N, M]. So it is asked
        for c^T = b a^T: first operand b transposed (OP_T), second operand a as stored (OP_N)."""
        from cupy.cuda import cublas, device
        m, n, k, lda, ldb, ldc = gemm_operands(a, b, c)
        kind = CUDA_DATA_TYPES[dtype]
        scalars = np.array([alpha, beta], np.float32)  # host pointers, read at the call (also when captured)
        handle = device.get_cublas_handle()
        cublas.setStream(handle, self.xp.cuda.get_current_stream().ptr)  # a capture's stream while capturing
        cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, m, n, k,
                      scalars.ctypes.data, b.data.ptr, kind, lda, a.data.ptr, kind, ldb,
                      scalars[1:].ctypes.data, c.data.ptr, kind, ldc, CUBLAS_COMPUTE_32F,
                      cublas.CUBLAS_GEMM_DEFAULT)

    def to_numpy(self, x) -> np.ndarray:
        return x.get()


class EmuDevice(Capturing):
    """The CPU: NumPy arrays stand in for device memory, cuda_emu runs the kernels."""

    name = "cuda-emu"
    xp = np

    def __init__(self, limits: GpuLimits = SM90_LIMITS):
        from .cuda_emu import CompileError
        self.limits, self.compile_error = limits, CompileError

    @contextmanager
    def capture(self):
        """Launches and gemms inside are recorded (the Capture's graph: a list of calls), not run,
        as a capturing CUDA stream does."""
        self.capturing = Capture(graph=[])
        try:
            yield self.capturing
        finally:
            self.capturing = None

    def replay(self, graph):
        for run, args in graph:
            run(*args)

    def copy_in(self, device_array, host_array):
        device_array[...] = host_array

    def compile(self, source: str, options: tuple):
        from .cuda_emu import Module
        return Module(code=source, options=options, optin_shared_limit=self.limits.shared_optin_bytes)

    def _run_or_record(self, run, *args):
        if self.capturing is not None:
            self.capturing.graph.append((run, args))
        else:
            run(*args)

    def launch(self, kernel, grid, block, args, shared_mem):
        self._run_or_record(self._run, kernel, grid, block, tuple(_flat_alias(a) for a in args), shared_mem)

    @staticmethod
    def _run(kernel, grid, block, args, shared_mem):
        kernel(grid, block, args, shared_mem=shared_mem)

    def empty(self, shape, dtype: str):
        """NaN everywhere: an element a kernel fails to write shows, as old GPU memory would."""
        return self._kept(np.full(shape, convert(np.array(np.nan, np.float32), "f32", dtype), storage_dtype(dtype)))

    def gemm(self, a, b, c, alpha: float, beta: float, dtype: str):
        """c = alpha * a @ b.T + beta * c in f32, rounded once to the storage dtype, like cuBLAS."""
        gemm_operands(a, b, c)
        self._run_or_record(self._gemm, a, b, c, alpha, beta, dtype)

    @staticmethod
    def _gemm(a, b, c, alpha: float, beta: float, dtype: str):
        product = convert(a, dtype, "f32") @ convert(b, dtype, "f32").T
        if alpha != 1.0:
            product *= np.float32(alpha)
        if beta != 0.0:
            product += np.float32(beta) * convert(c, dtype, "f32")
        c[...] = convert(product, "f32", dtype)

    def to_numpy(self, x) -> np.ndarray:
        """A copy, as from a GPU: the device array may be written again (a graph's output is)."""
        return x.copy()


def _flat_alias(x):
    """A strided NumPy view as the C-contiguous 1-D array starting at its first element, so the
    executor accepts it: like a GPU kernel, the kernel gets a bare pointer and its own strides."""
    if not isinstance(x, np.ndarray) or x.flags.c_contiguous:
        return x
    extent = sum((n - 1) * s for n, s in zip(x.shape, x.strides)) // x.itemsize + 1
    return np.lib.stride_tricks.as_strided(x, shape=(extent,), strides=(x.itemsize,))
