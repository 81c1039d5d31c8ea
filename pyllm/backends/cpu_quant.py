"""ctypes wrappers of kernels/cpu/quant.c and quant_k.c: decode matmuls on GGML block-quantized
weights (the bytes of a GGUF tensor, row by row) with int8 activations, and dequantization.

    xq = quantize_activations(x)                  # x [M, K] f32 -> opaque uint8 buffer
    out = quant_matmul(gguf_type, xq, M, K, w)    # w uint8 [N, row_bytes] -> x @ dequant(w)^T [M, N]

The C side trusts its inputs: everything is checked here (ValueError).
"""

import ctypes
import functools

import numpy as np

from ..formats import FORMATS
from .cpu_kernels import _address, _library

BLOCK_FORMATS = {fmt.gguf_type: fmt for fmt in FORMATS.values() if fmt.block_size > 1}  # what the kernels take
MAX_ROWS = 16  # quant_matmul's rows of x per call


@functools.lru_cache(maxsize=None)
def _quant_library():
    library = _library()
    if library is None:
        return None
    try:
        size, quantize, matmul, dequantize = (library.activation_bytes, library.quantize_activations,
                                              library.quant_matmul, library.dequantize)
    except AttributeError:
        return None
    size.argtypes, size.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_size_t
    # M, K, x, xq
    quantize.argtypes, quantize.restype = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p], None
    # type, M, xq, K, w, N, out, accumulate
    matmul.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_void_p, ctypes.c_int]
    matmul.restype = None
    # type, w, rows, K, out
    dequantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    dequantize.restype = None
    return library


def available() -> bool:
    """The kernels built (AVX-512) and have quant_matmul."""
    return _quant_library() is not None


def _kernels():
    library = _quant_library()
    if library is None:
        raise RuntimeError("the CPU quant kernels are not available (no compiler or no AVX-512)")
    return library


def row_bytes(gguf_type, K: int) -> int:
    """Bytes of one row of K weights in gguf_type (ValueError: not a type here, or K not whole blocks)."""
    try:
        fmt = BLOCK_FORMATS[int(gguf_type)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"GGML type {gguf_type!r} is not one of {sorted(BLOCK_FORMATS)}") from None
    if K <= 0 or K % fmt.block_size:
        raise ValueError(f"K = {K} is not a positive multiple of GGML type {int(gguf_type)}'s block of {fmt.block_size}")
    return fmt.row_bytes(K)


def _check_weights(gguf_type, w, K):
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2 or not w.flags.c_contiguous:
        raise ValueError("w must be a C-contiguous uint8 array [rows, row_bytes]")
    if w.shape[1] != row_bytes(gguf_type, K) or w.shape[0] == 0:
        raise ValueError(f"w {w.shape} is not [rows, {row_bytes(gguf_type, K)}] for K = {K} in GGML type "
                         f"{int(gguf_type)}")


def activation_bytes(M: int, K: int) -> int:
    return _kernels().activation_bytes(M, K)


def activation_buffer(M: int, K: int) -> np.ndarray:
    """Room for quantize_activations' blocks of M rows of K: uint8, 64-byte aligned (quant.c's loads)."""
    size = activation_bytes(M, K)
    buffer = np.empty(size + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + size]


def quantize_activations(x) -> np.ndarray:
    """x [M, K] (K a multiple of 32) -> xq, an opaque uint8 buffer (64-byte aligned) for quant_matmul:
    per block of 32, d = max|x| / 127 and q = round-half-even(x / d) in int8, with its sums."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 32 or x.shape[1] % 32:
        raise ValueError(f"x {x.shape} must be [M >= 1, K] with K a positive multiple of 32")
    M, K = x.shape
    xq = activation_buffer(M, K)
    _kernels().quantize_activations(M, K, _address(x), _address(xq))
    return xq


def quant_matmul(gguf_type, xq, M: int, K: int, w, out=None, accumulate=False) -> np.ndarray:
    """x @ dequant(w)^T -> out [M, N] f32 (added into out when accumulate), x given as
    xq = quantize_activations(x [M, K]); w uint8 [N, row_bytes(gguf_type, K)]; 1 <= M <= 16."""
    if not isinstance(M, (int, np.integer)) or not 1 <= M <= MAX_ROWS:
        raise ValueError(f"M = {M} is not in 1..{MAX_ROWS}")
    _check_weights(gguf_type, w, K)
    library = _kernels()
    if (not isinstance(xq, np.ndarray) or xq.dtype != np.uint8 or not xq.flags.c_contiguous
            or xq.size != library.activation_bytes(M, K)):
        raise ValueError(f"xq must be quantize_activations' buffer for [{M}, {K}]")
    N = w.shape[0]
    if out is None:
        if accumulate:
            raise ValueError("accumulate needs out")
        out = np.empty((M, N), np.float32)
    elif (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (M, N)
          or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous f32 array [{M}, {N}]")
    library.quant_matmul(int(gguf_type), M, _address(xq), K, _address(w), N, _address(out), int(bool(accumulate)))
    return out


def dequantize(gguf_type, w, K: int) -> np.ndarray:
    """uint8 [rows, row_bytes] in gguf_type -> f32 [rows, K], bit-exact to gguf.quants.dequantize."""
    _check_weights(gguf_type, w, K)
    out = np.empty((w.shape[0], K), np.float32)
    _kernels().dequantize(int(gguf_type), _address(w), w.shape[0], K, _address(out))
    return out
