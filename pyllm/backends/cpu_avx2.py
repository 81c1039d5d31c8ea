"""ctypes wrapper of kernels/cpu/avx2.c, avx2_interleaved.c and avx2_dequantize.c: a decode step's
matmul on GGML's block formats (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k, rows as GGUF stores
them) for CPUs with AVX2 but without AVX-512, where the AVX-512 kernels (cpu_quant.py) are not
built, and their dequantization (gather's rows; a prompt's weight strips are avx2_dequantize.c's
inside cpu_kernels.quant_gemm). A 32-weight format's matrix may be interleaved first
(cpu_quant.interleave, as for AVX-512); the calls then take gguf_type | INTERLEAVED.

    out = block_matmul(gguf_type, x, w, layers=2)   # x [M <= 16, K] f32, w uint8 [N, row_bytes] -> [M, N]
    dense = dequantize(gguf_type, w, K)             # -> f32 [N, K], as gguf dequantizes
    picked = dequantize(gguf_type, w, K, rows=ids)  # -> f32 [T, K]: rows ids [T]

x is quantized inside the call to int8 blocks of 32 (llama.cpp's Q8_0), in one layer or two (as
cpu_quant's: the second is the first's rounding error, here on the grid d / 254, so that a block
travels as one int16 254 q + q2). The C side trusts its inputs: everything is checked here (ValueError).
"""

import ctypes
import functools

import numpy as np

from ..formats import FORMATS
from .cpu_kernels import INTERLEAVED, _address, built
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
    # type, w, N, K, picked rows (or NULL), count, out
    library.avx2_dequantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_int, ctypes.c_void_p]
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
    """gguf_type's format (| INTERLEAVED: a 32-weight format's) -> (the format, the type the C side takes)."""
    try:
        kind = int(gguf_type)
    except (TypeError, ValueError):
        kind = None
    fmt = BLOCK_FORMATS.get(kind & ~INTERLEAVED) if kind is not None else None
    if fmt is None or (kind & INTERLEAVED and fmt.block_size != 32):
        raise ValueError(f"GGML type {gguf_type!r} is not one of {sorted(BLOCK_FORMATS)} (| {INTERLEAVED} for "
                         f"those with blocks of 32)")
    return fmt, kind


def _check_rows(w, fmt, K):
    if (not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2 or not w.flags.c_contiguous
            or w.shape[0] == 0 or w.shape[1] != fmt.row_bytes(K)):
        raise ValueError(f"w must be a C-contiguous uint8 array [N, {fmt.row_bytes(K)}] for K = {K} in {fmt.name}")


def dequantize(gguf_type, w, K, rows=None) -> np.ndarray:
    """w uint8 [N, row_bytes] in gguf_type, rows of K weights -> f32 [N, K], as gguf.quants.dequantize,
    or only `rows` (ids [T]) -> [T, K]. With INTERLEAVED, w is a whole interleaved matrix (its rows are
    not w's rows)."""
    library, (fmt, kind) = _kernels(), _format(gguf_type)
    if K < fmt.block_size or K % fmt.block_size:
        raise ValueError(f"K = {K} is not a positive multiple of {fmt.name}'s block of {fmt.block_size}")
    _check_rows(w, fmt, K)
    ids = None if rows is None else np.ascontiguousarray(rows, dtype=np.int32).reshape(-1)
    if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise ValueError(f"rows {rows} are not all in 0 .. {w.shape[0] - 1}")
    count = w.shape[0] if ids is None else ids.size
    out = np.empty((count, K), np.float32)
    if count == 0:
        return out.reshape(*np.shape(rows), K)
    library.avx2_dequantize(kind, _address(w), w.shape[0], K, None if ids is None else _address(ids), count,
                            _address(out))
    return out if rows is None else out.reshape(*np.shape(rows), K)


def block_matmul(gguf_type, x, w, out=None, accumulate=False, layers=1) -> np.ndarray:
    """x [M, K] f32 @ dequant(w)^T -> out [M, N] f32 (added into out when accumulate); w uint8
    [N, row_bytes] in gguf_type (a GGML block format, | INTERLEAVED: interleaved); x in `layers` (1, 2)
    int8 layers; 1 <= M <= 16, K a multiple of its block."""
    library, (fmt, kind) = _kernels(), _format(gguf_type)
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
    library.avx2_block_matmul(kind, M, layers, _address(x), K, _address(w), N, _address(out),
                              int(bool(accumulate)))
    return out
