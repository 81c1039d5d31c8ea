"""kernels/cpu/layers.c from Python: a model's decoder layers as the C structs one call walks
(layer_table, built once per model), and decode steps of up to MAX_ROWS rows through every layer
in that one call (decoder_layers); the benchmarks' split of its time (decoder_matmul_seconds)."""

import ctypes

import numpy as np

from .cpu_kernels import MAX_ROWS, _address, _contiguous_f32, _step_caches, _kernel_library

F32_ROWS = -1  # layers.c: a matrix of f32 rows


class Matrix(ctypes.Structure):  # layers.c's struct matrix
    _fields_ = [("data", ctypes.c_void_p), ("type", ctypes.c_int), ("N", ctypes.c_int)]


MAX_PARTS = 3  # layers.c: q | k | v as separate matrices


class Layer(ctypes.Structure):  # layers.c's struct layer
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv_bias", ctypes.c_void_p),
                ("qkv", Matrix * MAX_PARTS), ("o", Matrix), ("gate_up", Matrix * MAX_PARTS), ("down", Matrix),
                ("qkv_parts", ctypes.c_int), ("gate_up_parts", ctypes.c_int)]


def layer_table(layers):
    """The model's layers in layers.c's form (a ctypes array, built once), or None if a matrix (or
    a part of q|k|v, gate|up) is neither f32 rows nor in a format of the decode kernels
    (cpu.decode_kernel): then op by op."""
    from .cpu import decode_kernel  # here: cpu builds on this module
    from .cpu_quant import kernel_type

    def matrix(m):
        if isinstance(m, np.ndarray) and _contiguous_f32(m):
            return Matrix(_address(m), F32_ROWS, m.shape[0])
        fmt = getattr(m, "format", None)
        if fmt is None or not decode_kernel(fmt) or not m.data.flags.c_contiguous:
            return None
        return Matrix(_address(m.data), kernel_type(m), m.shape[0])
    def parts(m):
        return [matrix(part) for part in (m if isinstance(m, tuple) else (m,))]
    table = (Layer * len(layers))()
    for entry, layer in zip(table, layers):
        qkv, o, gate_up, down = (parts(getattr(layer, name)) for name in ("qkv", "o", "gate_up", "down"))
        vectors = [layer.input_norm, layer.post_norm] + ([] if layer.qkv_bias is None else [layer.qkv_bias])
        if None in qkv + o + gate_up + down or not _contiguous_f32(*vectors):
            return None
        entry.input_norm, entry.post_norm = _address(layer.input_norm), _address(layer.post_norm)
        entry.qkv_bias = None if layer.qkv_bias is None else _address(layer.qkv_bias)
        entry.qkv[:len(qkv)], entry.gate_up[:len(gate_up)] = qkv, gate_up
        entry.qkv_parts, entry.gate_up_parts, (entry.o,), (entry.down,) = len(qkv), len(gate_up), o, down
    return table


def decoder_matmul_seconds(keep_timing: bool) -> float | None:
    """The seconds decoder_layers has spent in its matmuls since the last call (counted only while
    timing is on), then timing on or off from now; None without the kernels. For the benchmarks."""
    library = _kernel_library()
    return None if library is None else library.decoder_matmul_seconds(int(keep_timing))


def decoder_layers(x, table, config, slots, cos, sin, activation_layers=1):
    """x [T, hidden] (T <= MAX_ROWS) through every layer of `table` (layer_table) in one call, the
    step's caches as attention's slots, block-format matrices taking x in `activation_layers` int8
    layers (quant.c; AVX2 alone: avx2.c) -> x advanced in place, or None (no kernels)."""
    library = _kernel_library()
    if library is None or x.shape[0] > MAX_ROWS or not _contiguous_f32(x, cos, sin):
        return None
    caches, (layers, n_kv, head_dim, n_new) = _step_caches(slots)
    if n_new != x.shape[0] or layers != len(table) or head_dim % 16:
        return None
    rows, hidden, inter = x.shape[0], config.hidden_size, config.intermediate_size
    n_heads = config.num_heads
    widest = max(hidden, inter, n_heads * head_dim, (n_heads + 2 * n_kv) * head_dim, 2 * inter)
    scratch = [np.empty((rows, n), np.float32) for n in (hidden, (n_heads + 2 * n_kv) * head_dim, n_heads * head_dim,
                                                        n_heads * head_dim, 2 * inter, inter, widest)]
    from . import cpu_quant  # here: cpu_quant builds on this module
    xq = (cpu_quant.activation_buffer(rows, max(hidden, inter, n_heads * head_dim), activation_layers)
          if cpu_quant.available() else None)
    library.decoder_layers(len(table), ctypes.addressof(table), rows, activation_layers, hidden, inter, n_heads, n_kv, head_dim, config.rms_norm_eps,
                           head_dim ** -0.5, _address(x), len(slots), _address(cos), _address(sin), *caches,
                           *[_address(s) for s in scratch], None if xq is None else _address(xq))
    return x
