"""kernels/cpu/avx2.c (through pyllm.backends.cpu_avx2), the decode matmul for CPUs with AVX2 but
not AVX-512, against gguf's dequantized weights (and its dequantizer, bit for bit): x quantized as the kernel rounds it (per 32:
d = max|x| / 32767 in f32, q = round-half-even(x / d) in int16) and multiplied in float64, where
only the kernel's f32 summation may differ (1e-4 of the output's scale); and against the exact
product, where the int16 rounding adds ~1/113000 of a block's max per activation. Weights as in
test_quant_kernels.py (gguf's quantizer where it has one, else random bytes with sane f16 scales).
It is built on every AVX2 CPU, AVX-512 ones included, so CI tests it on both.
"""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from test_quant_kernels import FORMATS, depths, weights

from pyllm.backends import cpu_avx2

pytestmark = pytest.mark.skipif(not cpu_avx2.available(), reason="the AVX2 kernel is not built (no AVX2, FMA, F16C)")

rng = np.random.default_rng(1)


def rounded(x):
    """x [M, K] -> its int16 blocks times their scales, f64 [M, K], as the kernel rounds."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(32767)
    q = np.clip(np.rint(blocks / np.where(d == 0, np.float32(1), d)), -32767, 32767)
    return np.where(d == 0, 0.0, q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def check(out, x, w, qtype):
    dense = gguf.quants.dequantize(w, qtype).astype(np.float64)
    want = rounded(x) @ dense.T
    assert np.abs(out - want).max() <= 1e-4 * np.abs(want).max(), f"{qtype.name} {x.shape} x {w.shape}"
    # an activation's int16 rounding error: at most its block's max / 65534, ~1e-5 of a typical output
    typical = np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(dense, axis=1)) / np.sqrt(x.shape[1])
    assert (np.abs(out - x.astype(np.float64) @ dense.T) <= 1e-3 * typical).all(), f"{qtype.name}: int16 too far off"


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 16])
def test_block_matmul_matches_the_reference(qtype, M):
    """Rows not a multiple of the threads' shares or of two (N = 1, 37), one block to 48 (K-quants:
    one superblock to three), a block of zeros, a norm's outlier channels."""
    for K in depths(qtype):
        for N in (1, 37):
            w = weights(qtype, N, K)
            x = rng.standard_normal((M, K)).astype(np.float32)
            x[0, :32] = 0.0  # d = 0
            x[-1, [5, K // 2]] = [40.0, -60.0]
            check(cpu_avx2.block_matmul(qtype, x, w), x, w, qtype)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_accumulate(qtype):
    K = depths(qtype)[-1]
    w = weights(qtype, 37, K)
    x = rng.standard_normal((4, K)).astype(np.float32)
    out = cpu_avx2.block_matmul(qtype, x, w)
    base = rng.standard_normal(out.shape).astype(np.float32)
    added = cpu_avx2.block_matmul(qtype, x, w, out=base.copy(), accumulate=True)
    np.testing.assert_allclose(added, base + out, atol=1e-5 * np.abs(base + out).max(), rtol=0)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_dequantize_is_gguf_bit_for_bit(qtype):
    """avx2_dequantize (a prompt's weight strips) against gguf's dequantizer, 37 rows (split among
    the threads unevenly) at every depth."""
    for K in depths(qtype):
        w = weights(qtype, 37, K)
        np.testing.assert_array_equal(cpu_avx2.dequantize(qtype, w, K), gguf.quants.dequantize(w, qtype))


def test_wrapper_errors():
    w = weights(T.Q4_0, 4, 64)
    x = np.ones((2, 64), np.float32)
    for bad in (lambda: cpu_avx2.block_matmul(T.F16, x, w),  # not a block format
                lambda: cpu_avx2.block_matmul(T.Q4_0, np.ones((17, 64), np.float32), w),  # too many rows
                lambda: cpu_avx2.block_matmul(T.Q4_0, np.ones((2, 48), np.float32), w),  # K not whole blocks
                lambda: cpu_avx2.block_matmul(T.Q4_K, x, w),  # K not whole superblocks
                lambda: cpu_avx2.block_matmul(T.Q4_0, np.ones((2, 96), np.float32), w),  # w's rows are 64
                lambda: cpu_avx2.block_matmul(T.Q4_0, x, w, accumulate=True),  # nothing to add into
                lambda: cpu_avx2.block_matmul(T.Q4_0, x, w, out=np.empty((2, 5), np.float32)),
                lambda: cpu_avx2.dequantize(T.Q4_0, w, 96),  # w's rows are 64
                lambda: cpu_avx2.dequantize(T.Q4_K, w, 64),  # K not whole superblocks
                lambda: cpu_avx2.dequantize(T.BF16, w, 64)):  # not a block format
        with pytest.raises(ValueError):
            bad()
