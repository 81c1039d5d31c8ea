"""ctypes wrapper of kernels/cpu/avx2.c and avx2_dequantize.c: a decode step's matmul on GGML's
block formats (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, rows as GGUF stores them) for CPUs
with AVX2 but without AVX-512, where the AVX-512 kernels (cpu_quant.py) are not built, and their
dequantization (gather's rows; a prompt's weight strips are avx2_dequantize.c's inside
cpu_kernels.quant_gemm).

    out = block_matmul(gguf_type, x, w, layers=2)   # x [M <= 16, K] f32, w uint8 [N, row_bytes] -> [M, N]
    dense = dequantize(gguf_type, w, K)             # -> f32 [N, K], as gguf dequantizes

x is quantized inside the call to int8 blocks of 32 (llama.cpp's Q8_0), in one layer or two (as
cpu_quant's: the second is the first's rounding error, here on the grid d / 254, so that a block
travels as one int16 254 q + q2). The C side trusts its inputs: everything is checked here (ValueError).
"""

import ctypes
import functools

import numpy as np

from ..formats import FORMATS
from .cpu_kernels import _address, built
from .cpu_quant import _output

BLOCK_FORMATS = {fmt.gguf_type: fmt for fmt in FORMATS.values() if fmt.block_size > 1}  # what it takes
MAX_ROWS = 16  # rows of x per call


@functools.lru_cache(maxsize=None)
def _library():
    """built(), where it holds avx2.c's kernels; else None."""
    library = built()
    if library is None or not hasattr(library, "avx2_block_matmul"):
        return None
    # type, M, layers, x, K, w, N, out, accumulate
    library.avx2_block_matmul.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                          ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    # type, w, rows, K, out
    library.avx2_dequantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    library.avx2_block_matmul.restype = library.avx2_dequantize.restype = None
    return library


def _kernels():
    library = _library()
    if library is None:
        raise RuntimeError("the AVX2 block kernels are not available (no compiler, or no AVX2/FMA/F16C)")
    return library


def available() -> bool:
    """The kernels built: a compiler, and a CPU with AVX2, FMA and F16C."""
    return _library() is not None


def takes(fmt) -> bool:
    return fmt.gguf_type in BLOCK_FORMATS


def _format(gguf_type):
    fmt = BLOCK_FORMATS.get(int(gguf_type))
    if fmt is None:
        raise ValueError(f"GGML type {gguf_type!r} is not one of {sorted(BLOCK_FORMATS)}")
    return fmt


def _check_rows(w, fmt, K):
    if (not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2 or not w.flags.c_contiguous
            or w.shape[0] == 0 or w.shape[1] != fmt.row_bytes(K)):
        raise ValueError(f"w must be a C-contiguous uint8 array [N, {fmt.row_bytes(K)}] for K = {K} in {fmt.name}")


def dequantize(gguf_type, w, K) -> np.ndarray:
    """w uint8 [N, row_bytes] in gguf_type, rows of K weights -> f32 [N, K], as gguf.quants.dequantize."""
    library, fmt = _kernels(), _format(gguf_type)
    if K < fmt.block_size or K % fmt.block_size:
        raise ValueError(f"K = {K} is not a positive multiple of {fmt.name}'s block of {fmt.block_size}")
    _check_rows(w, fmt, K)
    out = np.empty((w.shape[0], K), np.float32)
    library.avx2_dequantize(fmt.gguf_type, _address(w), w.shape[0], K, _address(out))
    return out


def block_matmul(gguf_type, x, w, out=None, accumulate=False, layers=1) -> np.ndarray:
    """x [M, K] f32 @ dequant(w)^T -> out [M, N] f32 (added into out when accumulate); w uint8
    [N, row_bytes] in gguf_type (a GGML block format); x in `layers` (1, 2) int8 layers; 1 <= M <= 16,
    K a multiple of its block."""
    library, fmt = _kernels(), _format(gguf_type)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if layers not in (1, 2):
        raise ValueError(f"layers must be 1 or 2, not {layers!r}")
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.shape[1] < fmt.block_size or x.shape[1] % fmt.block_size:
        raise ValueError(f"x {x.shape} must be [M, K] with 1 <= M <= {MAX_ROWS} and K a positive multiple of "
                         f"{fmt.name}'s block of {fmt.block_size}")
    M, K = x.shape
    _check_rows(w, fmt, K)
    N = w.shape[0]
    out = _output(out, M, N, accumulate)
    library.avx2_block_matmul(fmt.gguf_type, M, layers, _address(x), K, _address(w), N, _address(out),
                              int(bool(accumulate)))
    return out
