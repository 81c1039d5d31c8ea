"""Quantized weights on the CUDA backend: GGML blocks kept on the device as GGUF stores them.

A block-format QuantizedMatrix uploads as its raw bytes (`DeviceBlocks`, uint8 [N, row bytes]) and
stays so; kernels/quant.cu decodes it where it is used:

* a decode step (up to MATVEC_MAX_ROWS rows): one quant_matvec launch reads each weight block
  once for all rows, decoding it to f32 in registers (results match the reference's dequantized
  product within f32 summation error);
* a prompt (more rows): the weight is dequantized to the compute dtype in strips of rows, each
  multiplied through cuBLAS as a plain matrix;
* a lookup (the embedding, tied or not): only the looked-up rows are dequantized.

f16 and bf16 matrices (QuantizedMatrix of block size 1) upload as plain arrays of the compute dtype.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dtypes import convert
from ..formats import FORMATS, Format
from ..weights import QuantizedMatrix

KERNEL_FORMATS = tuple(name for name, fmt in FORMATS.items() if fmt.block_size > 1)  # kernels/quant.cu has each
MATVEC_MAX_ROWS = 8  # kernels/quant.cu's MATVEC_MAX_ROWS: more rows take the dequantize + cuBLAS path
MATVEC_THREADS = 128  # whole warps, one output column each
DEQUANTIZE_THREADS = 256  # one block per row
STRIP_BYTES = 64 * 2**20  # a prompt's matmul dequantizes at most this much of a weight at a time


@dataclass
class DeviceBlocks:
    """A weight [N, K] on the device in its GGML block format: data uint8 [N, format.row_bytes(K)]."""
    format: Format
    shape: tuple[int, int]
    data: Any

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def strip_rows(k: int, itemsize: int) -> int:
    """Rows of a [N, k] weight dequantized at once for a prompt: STRIP_BYTES of them, at least one."""
    return max(1, STRIP_BYTES // (k * itemsize))


class QuantizedOps:
    """CudaBackend's operations on DeviceBlocks (it supplies _launch, _empty, _product, xp, upload)."""

    def _upload_quantized(self, matrix: QuantizedMatrix):
        """QuantizedMatrix -> DeviceBlocks, or a plain array of the compute dtype for f16/bf16."""
        if matrix.format.block_size == 1:  # straight to the compute dtype, not through an f32 copy
            stored = np.ascontiguousarray(matrix.data).view(matrix.format.storage_dtype())
            return self.xp.asarray(convert(stored, matrix.format.name, self.dtype))
        return DeviceBlocks(matrix.format, matrix.shape, self.xp.asarray(matrix.data))

    def _dequantize(self, w: DeviceBlocks, ids=None, rows=None):
        """The f32 rows ids (device int64 [T]) of w, or its rows slice `rows` -> [T, K] in the compute dtype."""
        data = w.data if rows is None else w.data[rows]
        n_rows = data.shape[0] if ids is None else ids.shape[0]
        out = self._empty((n_rows, w.shape[1]))
        self._launch("quant", f"dequantize_{w.format.name}", (n_rows,), (DEQUANTIZE_THREADS,),
                     (data, ids, out, np.int32(w.shape[1])))
        return out

    def _blocks_product(self, a, w: DeviceBlocks, out, alpha, beta, bias):
        """out = alpha * a [M, K] (contiguous) @ w^T (+ bias [N]) + beta * out, out [M, N] (a view,
        written in place)."""
        n_cols, k = w.shape
        if a.shape[0] <= MATVEC_MAX_ROWS:
            warps = MATVEC_THREADS // 32
            self._launch("quant", f"quant_matvec_{w.format.name}", (-(-n_cols // warps),), (MATVEC_THREADS,),
                         (w.data, a, bias, out, np.int32(n_cols), np.int32(k), np.int32(a.shape[0]),
                          np.int32(out.strides[0] // out.itemsize), np.float32(alpha), np.float32(beta)))
            return
        step = strip_rows(k, out.itemsize)
        for start in range(0, n_cols, step):
            cols = slice(start, min(start + step, n_cols))
            self._product(a, self._dequantize(w, rows=cols), out[:, cols], alpha, beta,
                          None if bias is None else bias[cols])
