"""The CPU backend: the reference backend's operators, with the C kernels of kernels/cpu/ in
their place wherever those are built (AVX-512 and a C compiler; cpu_kernels.py, cpu_quant.py). A
CPU with AVX2 but not AVX-512 gets the same in 8 lanes (cpu_kernels.py's row kernels, attention
and f32 matmuls, the prompt GEMM on block formats, and cpu_avx2.py's decode matmul on them);
f16 and bf16 weights have no kernel there.

Each op tries its kernel and falls back to the reference op where the kernel is missing or
does not take the input; what falls back for a whole model is said once, while it loads.
Weights in their stored format (QuantizedMatrix): GGML block formats run through int8 kernels
(a decode step's few rows quantize their activations once per matmul and dot them with the
blocks), f16 and bf16 through 16-bit kernels (widened in registers; bf16 by vdpbf16ps), and a
prompt's many rows meet weight strips dequantized in cache. A format without a kernel here (bf16
on a CPU without AVX512_BF16) is dequantized by the reference at each use, and the load says so.
"""

import sys

import numpy as np

from ..weights import QuantizedMatrix
from . import cpu_avx2, cpu_kernels, cpu_layers, cpu_quant, reference
from .base import Step
from .reference import ReferenceBackend

MAX_QUANT_ROWS = 16  # rows quant_matmul takes at once: beyond, the dequantizing GEMM
# A decode step of up to this many rows gives the block-format matmuls its activations in two int8
# layers (x's blocks and their rounding error's: ~f32 results), where streaming the weights costs
# more than the second layer's dot products; more rows are compute-bound and take one layer
# (llama.cpp's Q8 numerics). benchmarks/results/quant_bench.md has both's agreement and speed.
TWO_LAYER_ROWS = 4


def activation_layers(rows: int) -> int:
    return 2 if rows <= TWO_LAYER_ROWS else 1


def has_kernel(fmt) -> bool:
    """Every GGML block format has its int8 kernels, f16 and bf16 their 16-bit ones (bf16 decode
    needs AVX512_BF16)."""
    if not cpu_quant.available():
        return False
    return fmt.block_size > 1 or cpu_quant.takes_half(fmt.gguf_type)


def decode_kernel(fmt) -> bool:
    """A decode step's matmul on fmt runs in C: has_kernel's, or without AVX-512 avx2.c's block formats."""
    if cpu_quant.available():
        return has_kernel(fmt)
    return cpu_avx2.takes(fmt) and cpu_avx2.available()


def stored_bytes(m):
    """A QuantizedMatrix's data as the C kernels read it: uint8 [N, row bytes]."""
    return m.data if m.data.dtype == np.uint8 else m.data.view(np.uint8)


def _matrix_product(a, b, xq, add_to):
    """a [M, K] @ b^T for one matrix b (f32 array or QuantizedMatrix) -> [M, N] (into add_to when
    given), or None where no kernel takes it. xq: a's int8 blocks, made on first need, shared."""
    if isinstance(b, np.ndarray):
        return cpu_kernels.matmul_transb(a, b, add_to=add_to)
    if not has_kernel(b.format):
        return None
    rows = a.shape[0]
    if rows <= MAX_QUANT_ROWS and b.format.block_size == 1:
        return cpu_quant.half_matmul(b.format.gguf_type, a, b.data, out=add_to, accumulate=add_to is not None)
    if rows <= MAX_QUANT_ROWS:
        layers = activation_layers(rows)
        if xq[0] is None:
            xq[0] = cpu_quant.quantize_activations(a, layers)
        return cpu_quant.quant_matmul(cpu_quant.kernel_type(b), xq[0], rows, b.shape[1], b.data, out=add_to,
                                      accumulate=add_to is not None, layers=layers)
    return cpu_kernels.quant_gemm(b.format, a, stored_bytes(b), add_to=add_to, interleaved=b.interleaved)


def _avx2_matrix_product(a, b, xq, add_to):
    """Without the AVX-512 kernels, _matrix_product: f32 through cpu_kernels' kernels (a decode
    step's few rows or a prompt's GEMM), a GGML block format through avx2.c (a decode step) or the
    GEMM on strips dequantized in cache (a prompt); else None (NumPy serves: f16 and bf16
    dequantized). xq: unused (avx2.c quantizes a itself)."""
    if isinstance(b, np.ndarray):
        return cpu_kernels.matmul_transb(a, b, add_to=add_to)
    if not decode_kernel(b.format):
        return None
    if a.shape[0] <= cpu_avx2.MAX_ROWS:
        return cpu_avx2.block_matmul(cpu_quant.kernel_type(b), a, b.data, out=add_to, accumulate=add_to is not None,
                                     layers=activation_layers(a.shape[0]))
    return cpu_kernels.quant_gemm(b.format, a, b.data, add_to=add_to, interleaved=b.interleaved)


def product(a, b, add_to=None):
    """a [M, K] @ b [N, K]^T (b one matrix or a tuple: products side by side) -> [M, N] f32, added
    into add_to [M, N] when given (returned); None where a kernel is missing for any part."""
    if a.ndim != 2:
        return None
    a = np.ascontiguousarray(a, dtype=np.float32)
    matrix_product = _matrix_product if cpu_kernels.avx512_available() else _avx2_matrix_product
    xq = [None]
    if not isinstance(b, tuple):
        return matrix_product(a, b, xq, add_to)
    outs = [matrix_product(a, part, xq, None) for part in b]
    if any(out is None for out in outs):
        return None
    out = np.concatenate(outs, axis=1)
    if add_to is None:
        return out
    add_to += out
    return add_to


class CpuBackend(ReferenceBackend):
    """Weights and KV cache in host memory; the C kernels where built, else the reference ops."""

    name = "cpu"

    def __init__(self, config):
        super().__init__(config)
        self.config = config
        self._said = set()  # what fell back, said once
        self._layer_table = None  # (the model's layer list, its layers.c form), built at the first step
        if cpu_kernels.avx512_available():  # built (once per machine) or loaded now, not at the first token
            return
        if cpu_kernels.kernels_available() and cpu_avx2.available():
            self._say("no AVX-512 here: the AVX2 kernels run f32 and GGML block-format weights "
                      "(f16 and bf16 are dequantized at each use)")
        else:
            self._say("the C kernels are not available here (they need AVX2 or AVX-512 and a C compiler, "
                      "or PYLLM_CPU_KERNELS=0 is set): the reference NumPy operators serve")

    def _say(self, message):
        if message not in self._said:
            self._said.add(message)
            print(f"pyllm: {message}", file=sys.stderr)

    def upload(self, weight):
        """Weights stay on the host; a 32-weight block format's matrix is interleaved in place for
        the kernels, 16 rows a group (kernels/cpu/interleave.c); a format without a kernel is named once."""
        if isinstance(weight, tuple):
            return tuple(self.upload(part) for part in weight)
        if not isinstance(weight, QuantizedMatrix):
            return weight
        if not cpu_kernels.avx512_available():  # AVX2 alone: avx2.c's formats
            if not cpu_kernels.kernels_available():
                return weight
            if not decode_kernel(weight.format):
                self._say(f"no C kernel for {weight.format.name} weights here: the reference dequantizes them "
                          "at each use")
                return weight
        elif not has_kernel(weight.format):
            self._say(f"no C kernel for {weight.format.name} weights: the reference dequantizes them at each use")
            return weight
        if weight.format.gguf_type in cpu_quant.INTERLEAVED_FORMATS and not weight.interleaved:
            weight = QuantizedMatrix(weight.format, weight.shape,
                                     cpu_quant.interleave(weight.format.gguf_type, weight.data, weight.shape[1]), True)
        return weight

    def decoder_layers(self, x, step: Step, layers):
        """A decode step's x [T, hidden] through every layer in one C call (layers.c): the same
        kernels, in the same order, as the op-by-op path, without ~9 Python calls per layer."""
        if self._layer_table is None or self._layer_table[0] is not layers:
            self._layer_table = (layers, cpu_layers.layer_table(layers) if cpu_kernels.kernels_available()
                                 else None)
        table = self._layer_table[1]
        if table is None or x.shape[0] > MAX_QUANT_ROWS:
            return None
        return cpu_layers.decoder_layers(x, table, self.config, step.slots, self.cos, self.sin,
                                          activation_layers(x.shape[0]))

    @staticmethod
    def rms_norm(x, weight, eps):
        out = cpu_kernels.rms_norm(x, weight, eps)  # one pass, no temporaries
        return reference.rms_norm(x, weight, eps) if out is None else out

    @staticmethod
    def swiglu(gate_up):
        out = cpu_kernels.swiglu(gate_up)
        return reference.swiglu(gate_up) if out is None else out

    @staticmethod
    def matmul_transb(a, b, alpha=1.0, beta=0.0, c=None, bias=None):
        """As reference.matmul_transb; the kernels take the plain product and the residual add."""
        if alpha == 1.0 and bias is None and (c is None or beta == 0.0 or beta == 1.0):
            out = product(a, b, add_to=c if c is not None and beta == 1.0 else None)
            if out is not None:
                return out
        return reference.matmul_transb(a, b, alpha, beta, c, bias)

    project_to_vocab = matmul_transb

    @staticmethod
    def gather(table, ids):
        if isinstance(table, QuantizedMatrix) and has_kernel(table.format):
            return cpu_quant.dequantize(cpu_quant.kernel_type(table), stored_bytes(table), table.shape[1], rows=ids)
        if isinstance(table, QuantizedMatrix) and decode_kernel(table.format):  # AVX2 alone
            return cpu_avx2.dequantize(cpu_quant.kernel_type(table), table.data, table.shape[1], rows=ids)
        return reference.gather(table, ids)

    def qkv_rope_cache(self, qkv, bias, step: Step, layer):
        q = cpu_kernels.qkv_rope(qkv, bias, step.slots, layer, self.cos, self.sin)
        return reference.qkv_rope_cache(qkv, bias, step, layer, self.cos, self.sin) if q is None else q

    @staticmethod
    def step_attention(q, step: Step, layer):
        out = cpu_kernels.attention(q, step.slots, layer)
        return reference.step_attention(q, step, layer) if out is None else out
