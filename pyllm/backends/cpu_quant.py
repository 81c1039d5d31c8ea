"""ctypes wrappers of kernels/cpu/quant.c, quant_k.c, half.c and interleave.c: decode matmuls on
weights as GGUF stores them (the bytes of a tensor, row by row): GGML blocks with int8 activations,
f16 and bf16; and dequantization. A 32-weight format's matrix may be interleaved once (interleave:
the same bytes, 16 rows a group, in the order quant_matmul and, without AVX-512, cpu_avx2's
kernels load them); the kernels then take its type | INTERLEAVED.

    xq = quantize_activations(x, layers)          # x [M, K] f32 -> opaque uint8 buffer (1 or 2 int8 layers)
    out = quant_matmul(gguf_type, xq, M, K, w, layers=layers)  # w uint8 [N, row_bytes] -> x @ dequant(w)^T [M, N]
    out = half_matmul(gguf_type, x, w)            # w [N, K] 16-bit (f16, or bf16 bits) -> x @ w^T

The C side trusts its inputs: everything is checked here (ValueError).
"""

import ctypes
import functools

import numpy as np

from ..formats import FORMATS
from .cpu_kernels import INTERLEAVED, _address, _avx512_library, _kernel_library

BLOCK_FORMATS = {fmt.gguf_type: fmt for fmt in FORMATS.values() if fmt.block_size > 1}  # quant_matmul's
STORED_FORMATS = {fmt.gguf_type: fmt for fmt in FORMATS.values() if fmt.name != "f32"}  # dequantize's
HALF_FORMATS = {fmt.gguf_type: fmt for fmt in STORED_FORMATS.values() if fmt.block_size == 1}  # half_matmul's
MAX_ROWS = 16  # quant_matmul's rows of x per call
INTERLEAVED_FORMATS = {t: fmt for t, fmt in BLOCK_FORMATS.items() if fmt.block_size == 32}


def kernel_type(m) -> int:
    """A QuantizedMatrix's type as the kernels take it: its GGML type, | INTERLEAVED where it is."""
    return m.format.gguf_type | (INTERLEAVED if m.interleaved else 0)


@functools.lru_cache(maxsize=None)
def _quant_library():
    library = _avx512_library()
    if library is None:
        return None
    try:
        size, quantize, matmul = library.activation_bytes, library.quantize_activations, library.quant_matmul
        dequantize, picked = library.dequantize, library.dequantize_picked
        half, takes_bf16 = library.half_matmul, library.half_takes_bf16
    except AttributeError:
        return None
    size.argtypes, size.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_size_t
    # M, layers, K, x, xq
    quantize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    quantize.restype = None
    # type, M, layers, xq, K, w, N, out, accumulate
    matmul.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    matmul.restype = None
    # type, w, rows, K, out
    dequantize.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    dequantize.restype = None
    # type, w, N, K, rows, count, out
    picked.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_void_p]
    picked.restype = None
    # type, M, x, K, w, N, out, accumulate
    half.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                     ctypes.c_void_p, ctypes.c_int]
    half.restype = None
    takes_bf16.argtypes, takes_bf16.restype = [], ctypes.c_int
    return library


def available() -> bool:
    """The kernels built (AVX-512) and have quant_matmul."""
    return _quant_library() is not None


def _kernels():
    library = _quant_library()
    if library is None:
        raise RuntimeError("the CPU quant kernels are not available (no compiler or no AVX-512)")
    return library


def row_bytes(gguf_type, K: int, formats=STORED_FORMATS) -> int:
    """Bytes of one row of K weights in gguf_type (ValueError: not one of `formats`, or K not whole blocks)."""
    try:
        interleaved = int(gguf_type) & INTERLEAVED
        fmt = (INTERLEAVED_FORMATS if interleaved else formats)[int(gguf_type) & ~INTERLEAVED]
        fmt = formats[fmt.gguf_type]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"GGML type {gguf_type!r} is not one of {sorted(formats)} (| {INTERLEAVED} for "
                         f"{sorted(INTERLEAVED_FORMATS)})") from None
    if K <= 0 or K % fmt.block_size:
        raise ValueError(f"K = {K} is not a positive multiple of GGML type {int(gguf_type)}'s block of {fmt.block_size}")
    return fmt.row_bytes(K)


def _check_weights(gguf_type, w, K, formats=STORED_FORMATS):
    if not isinstance(w, np.ndarray) or w.dtype != np.uint8 or w.ndim != 2 or not w.flags.c_contiguous:
        raise ValueError("w must be a C-contiguous uint8 array [rows, row_bytes]")
    if w.shape[1] != row_bytes(gguf_type, K, formats) or w.shape[0] == 0:
        raise ValueError(f"w {w.shape} is not [rows, {row_bytes(gguf_type, K)}] for K = {K} in GGML type "
                         f"{int(gguf_type)}")


def activation_bytes(M: int, K: int, layers: int = 1) -> int:
    return _kernels().activation_bytes(M * layers, K)


def activation_buffer(M: int, K: int, layers: int = 1) -> np.ndarray:
    """Room for quantize_activations' blocks of M rows of K in `layers` layers: uint8, 64-byte
    aligned (quant.c's loads)."""
    size = activation_bytes(M, K, layers)
    buffer = np.empty(size + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start:start + size]


def quantize_activations(x, layers: int = 1) -> np.ndarray:
    """x [M, K] (K a multiple of 32) -> xq, an opaque uint8 buffer (64-byte aligned) for quant_matmul:
    per block of 32, d = max|x| / 127 and q = round-half-even(x / d) in int8, with its sums; with
    layers = 2, also the rounding error x - d q quantized the same way (x to ~1/127 of the error)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 32 or x.shape[1] % 32:
        raise ValueError(f"x {x.shape} must be [M >= 1, K] with K a positive multiple of 32")
    if layers not in (1, 2):
        raise ValueError(f"layers = {layers!r} is not 1 or 2")
    M, K = x.shape
    xq = activation_buffer(M, K, layers)
    _kernels().quantize_activations(M, layers, K, _address(x), _address(xq))
    return xq


def quant_matmul(gguf_type, xq, M: int, K: int, w, out=None, accumulate=False, layers: int = 1) -> np.ndarray:
    """x @ dequant(w)^T -> out [M, N] f32 (added into out when accumulate), x given as
    xq = quantize_activations(x [M, K], layers); w uint8 [N, row_bytes(gguf_type, K)]; 1 <= M <= 16."""
    if not isinstance(M, (int, np.integer)) or not 1 <= M <= MAX_ROWS:
        raise ValueError(f"M = {M} is not in 1..{MAX_ROWS}")
    if layers not in (1, 2):
        raise ValueError(f"layers = {layers!r} is not 1 or 2")
    _check_weights(gguf_type, w, K, BLOCK_FORMATS)
    library = _kernels()
    if (not isinstance(xq, np.ndarray) or xq.dtype != np.uint8 or not xq.flags.c_contiguous
            or xq.size != library.activation_bytes(M * layers, K)):
        raise ValueError(f"xq must be quantize_activations' buffer for [{M}, {K}] in {layers} layers")
    out = _output(out, M, w.shape[0], accumulate)
    library.quant_matmul(int(gguf_type), M, layers, _address(xq), K, _address(w), w.shape[0], _address(out), int(bool(accumulate)))
    return out


def _output(out, M, N, accumulate):
    if out is None:
        if accumulate:
            raise ValueError("accumulate needs out")
        return np.empty((M, N), np.float32)
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (M, N)
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous f32 array [{M}, {N}]")
    return out


def takes_half(gguf_type) -> bool:
    """half_matmul takes this type here: f16 always, bf16 where the CPU has AVX512_BF16."""
    library = _quant_library()
    return (library is not None and int(gguf_type) in HALF_FORMATS
            and (HALF_FORMATS[int(gguf_type)].name == "f16" or bool(library.half_takes_bf16())))


def half_matmul(gguf_type, x, w, out=None, accumulate=False) -> np.ndarray:
    """x [M, K] f32 @ w^T -> out [M, N] f32 (added into out when accumulate); w [N, K] in gguf_type
    f16 (float16) or bf16 (uint16 bits), as a GGUF stores it; 1 <= M <= 16; takes_half(gguf_type)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS or x.shape[1] < 1:
        raise ValueError(f"x {x.shape} must be [M, K] with 1 <= M <= {MAX_ROWS}")
    if not takes_half(gguf_type):
        raise ValueError(f"half_matmul does not take GGML type {gguf_type!r} here")
    M, K = x.shape
    if not isinstance(w, np.ndarray) or w.itemsize != 2 or w.ndim != 2 or not w.flags.c_contiguous or w.shape[1] != K:
        raise ValueError(f"w must be a C-contiguous 16-bit array [N, {K}]")
    out = _output(out, M, w.shape[0], accumulate)
    _kernels().half_matmul(int(gguf_type), M, _address(x), K, _address(w), w.shape[0], _address(out),
                           int(bool(accumulate)))
    return out


def dequantize(gguf_type, w, K: int, rows=None) -> np.ndarray:
    """uint8 [N, row_bytes] in gguf_type -> f32 [N, K], or only `rows` (ids [T]) -> [T, K]; bit-exact
    to gguf.quants.dequantize (f16, bf16: their bytes, w.view(np.uint8)). With INTERLEAVED, w is a
    whole interleaved matrix (its rows are not w's rows)."""
    _check_weights(gguf_type, w, K)
    if rows is None:
        out = np.empty((w.shape[0], K), np.float32)
        _kernels().dequantize(int(gguf_type), _address(w), w.shape[0], K, _address(out))
        return out
    ids = np.ascontiguousarray(rows, dtype=np.int32).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise ValueError(f"rows {rows} are not all in 0 .. {w.shape[0] - 1}")
    out = np.empty((ids.size, K), np.float32)
    _kernels().dequantize_picked(int(gguf_type), _address(w), w.shape[0], K, _address(ids), ids.size, _address(out))
    return out.reshape(*np.shape(rows), K)


def interleave(gguf_type, w, K: int) -> np.ndarray:
    """w uint8 [N, row_bytes] of a 32-weight format in GGUF's layout -> the same array, now in the
    interleaved layout (in place: 16 rows a group; the kernels take gguf_type | INTERLEAVED)."""
    _check_weights(int(gguf_type) | INTERLEAVED, w, K)
    if not w.flags.writeable:
        raise ValueError("w must be writeable: it is interleaved in place")
    library = _kernel_library()
    if library is None:
        raise RuntimeError("the CPU kernels are not available (no compiler, or neither AVX2 nor AVX-512)")
    library.interleave_rows(int(gguf_type), _address(w), w.shape[0], K)
    return w
