"""The CUDA backend's quantized kernels (kernels/quant.cu, pyllm/backends/cuda_quant.py) against
the reference operators on the same QuantizedMatrix.

Every GGML block format, in f32, f16 and bf16, through cuda-emu and (where there is a GPU) CuPy:
the decode GEMV for 1 to 8 rows (alpha, beta, bias), a prompt's dequantize + cuBLAS path over
several strips, the lookup of quantized rows, and q | k | v parts in different formats side by
side. Shapes have tails: 37 output columns (not whole blocks of 4 warps) and K of 11 blocks (352,
so lanes run unequal numbers of 8-weight groups) or 3 super-blocks (768). Tolerances are
test_kernels.py's: the weights decode exactly as the reference dequantizes them, so what may
differ is f32 summation order and the output's own rounding (and, for a prompt in 16 bits, the
dequantized strip's rounding).
"""

import re

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from pyllm.backends import cuda_quant, kernels_dir, reference as ops
from pyllm.backends.cuda_quant import KERNEL_FORMATS, MATVEC_MAX_ROWS, DeviceBlocks
from pyllm.backends.cuda_backend import CudaBackend
from pyllm.backends.cuda_device import EmuDevice
from pyllm.formats import FORMATS
from pyllm.weights import QuantizedMatrix
from test_kernels import DTYPES, F32_SLACK, backend, check, config, device, put, randn  # noqa: F401
from test_quant_kernels import weights

N = 37


def quantized(name, n=N, k=None):
    fmt = FORMATS[name]
    k = k or (768 if fmt.block_size == 256 else 352)
    return QuantizedMatrix(fmt, (n, k), weights(T[name.upper()], n, k))


def test_every_block_format_has_kernels_and_the_row_bound_is_the_kernels():
    source = (kernels_dir() / "quant.cu").read_text()
    assert re.findall(r"^QUANT_KERNELS\((\w+),", source, re.M) == list(KERNEL_FORMATS)
    assert set(KERNEL_FORMATS) == {name for name, fmt in FORMATS.items() if fmt.block_size > 1}
    assert re.search(r"constexpr int MATVEC_MAX_ROWS = (\d+);", source).group(1) == str(MATVEC_MAX_ROWS)


@pytest.mark.parametrize("name", KERNEL_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matvec_for_1_to_8_rows(device, dtype, name):
    be, w = backend(device, dtype), quantized(name)
    dw = be.upload(w)
    assert isinstance(dw, DeviceBlocks) and dw.data.dtype == np.uint8 and dw.shape == w.shape
    (x, xv), (c, cv) = put(be, randn(MATVEC_MAX_ROWS, w.shape[1])), put(be, randn(MATVEC_MAX_ROWS, N))
    bias, bias_v = put(be, randn(N))
    for rows in range(1, MATVEC_MAX_ROWS + 1):
        launches = be.launches
        check(be, be.matmul_transb(x[:rows], dw), ops.matmul_transb(xv[:rows], w))
        assert be.launches == launches + 1
    expected = ops.matmul_transb(xv[:5], w, alpha=0.5, beta=1.0, c=cv[:5].copy(), bias=bias_v)
    check(be, be.matmul_transb(x[:5], dw, alpha=0.5, beta=1.0, c=c[:5].copy(), bias=bias), expected)


@pytest.mark.parametrize("name", KERNEL_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prompt_dequantizes_strips_for_cublas(device, dtype, name, monkeypatch):
    be, w = backend(device, dtype), quantized(name)
    monkeypatch.setattr(cuda_quant, "STRIP_BYTES", 16 * w.shape[1] * be.storage.itemsize)  # 3 strips of 16 rows
    dw = be.upload(w)
    (x, xv), (c, cv), (bias, bias_v) = put(be, randn(11, w.shape[1])), put(be, randn(11, N)), put(be, randn(N))
    launches = be.launches
    check(be, be.matmul_transb(x, dw), ops.matmul_transb(xv, w), roundings=2)
    assert be.launches == launches + 6  # a dequantize and a gemm per strip
    expected = ops.matmul_transb(xv, w, alpha=0.5, beta=2.0, c=cv.copy(), bias=bias_v)
    check(be, be.matmul_transb(x, dw, alpha=0.5, beta=2.0, c=c, bias=bias), expected, roundings=3)


@pytest.mark.parametrize("name", KERNEL_FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lookup_dequantizes_only_its_rows(device, dtype, name):
    be, w = backend(device, dtype), quantized(name, n=300)
    ids = np.array([3, 0, 299, 3, 17])
    out = be.to_host(be.gather(be.upload(w), be.upload_ids(ids)))
    expected = put(be, ops.gather(w, ids))[1]  # the reference's rows, rounded once to the dtype
    np.testing.assert_allclose(out, expected, rtol=F32_SLACK[be.name] if be.name == "cuda" else 0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 8, 11])
def test_parts_in_different_formats_side_by_side(device, dtype, rows):
    """q | k | v as llama.cpp's Q4_K_M leaves them (q4_k, q4_k, q6_k) plus an f16 and a bf16 part
    (plain arrays on the device), with the residual added in place."""
    be = backend(device, dtype)
    parts = (quantized("q4_k", 64, 256), quantized("q4_k", 32, 256), quantized("q6_k", 32, 256),
             QuantizedMatrix(FORMATS["f16"], (16, 256), FORMATS["f16"].quantize(randn(16, 256))),
             QuantizedMatrix(FORMATS["bf16"], (8, 256), FORMATS["bf16"].quantize(randn(8, 256))))
    uploaded = be.upload(parts)
    assert [type(p).__name__ for p in uploaded] == ["DeviceBlocks"] * 3 + ["ndarray"] * 2
    (x, xv), (c, cv) = put(be, randn(rows, 256)), put(be, randn(rows, 152))
    as_uploaded = parts[:3] + tuple(put(be, ops.dense(p))[1] for p in parts[3:])  # 16-bit parts in the dtype
    expected = ops.matmul_transb(xv, as_uploaded, beta=1.0, c=cv.copy())
    out = be.matmul_transb(x, uploaded, beta=1.0, c=c)
    assert out is c
    check(be, out, expected, roundings=1 if rows <= MATVEC_MAX_ROWS or dtype == "f32" else 2)


def test_quant_kernels_pass_the_race_check(monkeypatch):
    """Every launch runs twice, threads and blocks in opposite orders; results must not differ."""
    monkeypatch.setenv("PYLLM_CUDA_EMU_RACE_CHECK", "1")
    be = CudaBackend(config(), "bf16", EmuDevice())
    for name in ("q5_1", "q4_k", "q6_k"):
        w = quantized(name)
        dw = be.upload(w)
        (x, xv) = put(be, randn(3, w.shape[1]))
        check(be, be.matmul_transb(x, dw), ops.matmul_transb(xv, w))
        ids = np.array([1, 36])
        np.testing.assert_array_equal(be.to_host(be.gather(dw, be.upload_ids(ids))), put(be, ops.gather(w, ids))[1])
