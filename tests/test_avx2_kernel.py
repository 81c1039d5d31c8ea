"""kernels/cpu/avx2.c (through pyllm.backends.cpu_avx2), the decode matmul for CPUs with AVX2 but
not AVX-512, against the same NumPy references as quant.c's kernel (test_quant_kernels.py): x
quantized as the kernel rounds it and multiplied in float64 with gguf's dequantized weights, and
in two layers within 1/30 of one layer's error next to the exact product. It is built on every
AVX2 CPU, AVX-512 ones included, so CI tests it on both.
"""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from test_quant_kernels import check, two_layers, weights

from pyllm.backends import cpu_avx2

pytestmark = pytest.mark.skipif(not cpu_avx2.available(), reason="the AVX2 kernel is not built (no AVX2, FMA, F16C)")

FORMATS_32 = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
rng = np.random.default_rng(1)


@pytest.mark.parametrize("qtype", FORMATS_32, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 2, 5, 8, 16])
def test_block_matmul_matches_the_reference(qtype, M):
    """Rows not a multiple of the threads' shares (N = 1, 37), K from one block to 48."""
    for K in (32, 96, 576, 1536):
        for N in (1, 37):
            w = weights(qtype, N, K)
            x = rng.standard_normal((M, K)).astype(np.float32)
            x[0, :32] = 0.0  # a block of zeros: d = 0
            check(cpu_avx2.block_matmul(qtype, x, w), x, w, qtype)


@pytest.mark.parametrize("qtype", FORMATS_32, ids=lambda t: t.name)
def test_two_layers_and_accumulate(qtype):
    K = 576
    errors = {1: 0.0, 2: 0.0}
    for M in (1, 4, 16):
        w = weights(qtype, 37, K)
        x = rng.standard_normal((M, K)).astype(np.float32)
        x[:, [5, K // 2]] = [40.0, -60.0]  # a norm's outlier channels
        dense = gguf.quants.dequantize(w, qtype).astype(np.float64)
        first, second = two_layers(x)
        emulated = (first + second) @ dense.T
        out = cpu_avx2.block_matmul(qtype, x, w, layers=2)
        np.testing.assert_allclose(out, emulated, atol=1e-4 * np.abs(emulated).max(), rtol=0)
        exact = x.astype(np.float64) @ dense.T
        errors[2] = max(errors[2], np.abs(out - exact).max() / np.abs(exact).max())
        errors[1] = max(errors[1], np.abs(cpu_avx2.block_matmul(qtype, x, w) - exact).max() / np.abs(exact).max())
        base = rng.standard_normal(out.shape).astype(np.float32)
        added = cpu_avx2.block_matmul(qtype, x, w, out=base.copy(), accumulate=True, layers=2)
        np.testing.assert_allclose(added, base + out, atol=1e-5 * np.abs(base + out).max(), rtol=0)
    assert errors[2] <= errors[1] / 30, f"{qtype.name}: {errors}"


def test_wrapper_errors():
    w = weights(T.Q4_0, 4, 64)
    x = np.ones((2, 64), np.float32)
    for bad in (lambda: cpu_avx2.block_matmul(T.Q4_K, x, w),  # not a 32-weight format
                lambda: cpu_avx2.block_matmul(T.Q4_0, np.ones((17, 64), np.float32), w),  # too many rows
                lambda: cpu_avx2.block_matmul(T.Q4_0, np.ones((2, 48), np.float32), w),  # K not whole blocks
                lambda: cpu_avx2.block_matmul(T.Q4_0, np.ones((2, 96), np.float32), w),  # w's rows are 64
                lambda: cpu_avx2.block_matmul(T.Q4_0, x, w, layers=3),
                lambda: cpu_avx2.block_matmul(T.Q4_0, x, w, accumulate=True),  # nothing to add into
                lambda: cpu_avx2.block_matmul(T.Q4_0, x, w, out=np.empty((2, 5), np.float32))):
        with pytest.raises(ValueError):
            bad()
