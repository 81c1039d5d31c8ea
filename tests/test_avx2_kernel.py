"""kernels/cpu/avx2.c and avx2_interleaved.c (through pyllm.backends.cpu_avx2), the decode matmul for
CPUs with AVX2 but not AVX-512, on rows as GGUF stores them and interleaved (16 rows a group, the
rows past the last group as stored), against gguf's dequantized weights (and its dequantizer, bit
for bit): x quantized as the kernel rounds it (per 32: d = max|x| / 127 in f32, q = round-half-even(x / d) in int8,
llama.cpp's Q8_0; in two layers also the rounding error's blocks) and multiplied in float64, where
only the kernel's f32 summation may differ (1e-4 of the output's scale); and against the exact
product, where the rounding adds up to 1/254 of a block's max per activation (two layers: 1/254^2). Weights as in test_quant_kernels.py (gguf's quantizer where it has one, else random
bytes with sane f16 scales).
It is built on every AVX2 CPU, AVX-512 ones included, so CI tests it on both.
"""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from test_quant_kernels import FORMATS, depths, weights

from pyllm.backends import cpu_avx2, cpu_kernels, cpu_quant
from pyllm.backends.cpu_kernels import INTERLEAVED

pytestmark = pytest.mark.skipif(not cpu_avx2.available(), reason="the AVX2 kernel is not built (no AVX2, FMA, F16C)")

rng = np.random.default_rng(1)


def layouts(qtype, w, K):
    """(type, rows) as the kernels take w: GGUF's layout, and for a 32-weight format interleaved too."""
    yield qtype, w
    if qtype in cpu_quant.INTERLEAVED_FORMATS:
        yield qtype | INTERLEAVED, cpu_quant.interleave(qtype, w.copy(), K)


def int8_blocks(x):
    """x [M, K] -> (q, d) as the kernel rounds it: per block of 32, q [M, K / 32, 32] f32 integers, d [M, K / 32, 1] f32."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    q = np.clip(np.rint(blocks / np.where(d == 0, np.float32(1), d)), -127, 127)
    return np.where(d == 0, np.float32(0), q).astype(np.float32), d


def rounded(x, layers):
    """x [M, K] -> what the kernel's int8 layers carry of it, f64 [M, K]: one layer's d q, or two:
    (254 q + q2) d / 254, q2 the rounding error x - d q (d q in f32) on the grid d / 254."""
    q, d = int8_blocks(x)
    if layers == 1:
        return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)
    fine = d / np.float32(254)
    error = x.reshape(q.shape) - q * d  # f32, as the kernel rounds d q
    q2 = np.clip(np.rint(error / np.where(fine == 0, np.float32(1), fine)), -127, 127)
    return ((254 * q + q2).astype(np.float64) * fine.astype(np.float64)).reshape(x.shape)


def check(out, x, w, qtype, layers):
    dense = gguf.quants.dequantize(w, qtype).astype(np.float64)
    want = rounded(x, layers) @ dense.T
    assert np.abs(out - want).max() <= 1e-4 * np.abs(want).max(), f"{qtype.name} {x.shape} x {w.shape}"
    # an activation's rounding error is at most half its block's step, max / 254 (two layers:
    # max / 254^2): at most that times the block's |weights| summed, per block of the output's dot product
    half_steps = np.abs(x.astype(np.float64)).reshape(x.shape[0], -1, 32).max(axis=-1) / 254 ** layers  # [M, K / 32]
    bound = half_steps @ np.abs(dense).reshape(dense.shape[0], -1, 32).sum(axis=-1).T  # [M, N]
    error = np.abs(out - x.astype(np.float64) @ dense.T)
    assert (error <= 1.001 * bound + 1e-4 * np.abs(want).max()).all(), f"{qtype.name}: {layers} int8 layers too far off"


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("M, layers", [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (8, 1), (16, 1),
                                       (1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (16, 2)])
def test_block_matmul_matches_the_reference(qtype, M, layers):
    """Rows not a multiple of the threads' shares or of a tile's 4 (N = 1, 37), one block to 48
    (K-quants: one superblock to three; odd block counts), a block of zeros, a norm's outlier
    channels; interleaved: no row group (N = 1), groups and a tail (37), three groups (48)."""
    for K in depths(qtype):
        for N in (1, 37, 48):
            w = weights(qtype, N, K)
            x = rng.standard_normal((M, K)).astype(np.float32)
            x[0, :32] = 0.0  # d = 0
            x[-1, [5, K // 2]] = [40.0, -60.0]
            for kind, rows in layouts(qtype, w, K):
                check(cpu_avx2.block_matmul(kind, x, rows, layers=layers), x, w, qtype, layers)


def test_two_layers_carry_more_of_x():
    """The second layer: the output moves ~100x closer to x's exact product."""
    w = weights(T.Q8_0, 64, 256)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    exact = x.astype(np.float64) @ gguf.quants.dequantize(w, T.Q8_0).astype(np.float64).T
    one, two = (np.abs(cpu_avx2.block_matmul(T.Q8_0, x, w, layers=layers) - exact).max() for layers in (1, 2))
    assert two < one / 30, (one, two)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_accumulate(qtype):
    K = depths(qtype)[-1]
    x = rng.standard_normal((4, K)).astype(np.float32)
    for kind, w in layouts(qtype, weights(qtype, 37, K), K):
        out = cpu_avx2.block_matmul(kind, x, w)
        base = rng.standard_normal(out.shape).astype(np.float32)
        added = cpu_avx2.block_matmul(kind, x, w, out=base.copy(), accumulate=True)
        np.testing.assert_allclose(added, base + out, atol=1e-5 * np.abs(base + out).max(), rtol=0)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_dequantize_is_gguf_bit_for_bit(qtype):
    """avx2_dequantize (a prompt's weight strips, gather's rows) against gguf's dequantizer, 37 rows
    (split among the threads unevenly) at every depth, in both layouts; picked rows in any order."""
    picked = np.array([36, 0, 17, 17, 5])
    for K in depths(qtype):
        w = weights(qtype, 37, K)
        want = gguf.quants.dequantize(w, qtype)
        for kind, rows in layouts(qtype, w, K):
            np.testing.assert_array_equal(cpu_avx2.dequantize(kind, rows, K), want)
            np.testing.assert_array_equal(cpu_avx2.dequantize(kind, rows, K, rows=picked), want[picked])


def test_wrapper_errors():
    w = weights(T.Q4_0, 4, 64)
    x = np.ones((2, 64), np.float32)
    for bad in (lambda: cpu_avx2.block_matmul(T.F16, x, w),  # not a block format
                lambda: cpu_avx2.block_matmul(T.Q4_0, np.ones((17, 64), np.float32), w),  # too many rows
                lambda: cpu_avx2.block_matmul(T.Q4_0, x, w, layers=3),
                lambda: cpu_avx2.block_matmul(T.Q4_0, np.ones((2, 48), np.float32), w),  # K not whole blocks
                lambda: cpu_avx2.block_matmul(T.Q4_K, x, w),  # K not whole superblocks
                lambda: cpu_avx2.block_matmul(T.Q4_0, np.ones((2, 96), np.float32), w),  # w's rows are 64
                lambda: cpu_avx2.block_matmul(T.Q4_0, x, w, accumulate=True),  # nothing to add into
                lambda: cpu_avx2.block_matmul(T.Q4_0, x, w, out=np.empty((2, 5), np.float32)),
                lambda: cpu_avx2.dequantize(T.Q4_0, w, 96),  # w's rows are 64
                lambda: cpu_avx2.dequantize(T.Q4_K, w, 64),  # K not whole superblocks
                lambda: cpu_avx2.dequantize(T.BF16, w, 64),  # not a block format
                lambda: cpu_avx2.block_matmul(T.Q4_K | INTERLEAVED, np.ones((2, 256), np.float32),
                                              weights(T.Q4_K, 4, 256)),  # only 32-weight formats interleave
                lambda: cpu_avx2.dequantize(T.Q4_0, w, 64, rows=[4])):  # no row 4
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("M, N, K", [(17, 1, 32), (33, 7, 40), (512, 13, 576), (100, 37, 1536)])
def test_gemm_f32(M, N, K):
    """gemm.c (16-row panels and runs of 6 weight rows on AVX2, 32 and 12 on AVX-512), f32: M a
    partial panel, N not a multiple of a run, K not a multiple of 8; each output one f32 sum."""
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64).T
    scale = np.sqrt(K) * 1e-6 * np.abs(x).max() * np.abs(w).max()
    np.testing.assert_allclose(cpu_kernels.matmul_transb(x, w), want, atol=scale, rtol=0)
    base = rng.standard_normal((M, N)).astype(np.float32)
    np.testing.assert_allclose(cpu_kernels.matmul_transb(x, w, add_to=base.copy()), base + want, atol=scale, rtol=0)


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_gemm_on_blocks_is_the_f32_gemm_on_gguf_weights(qtype):
    """quant_gemm: the f32 GEMM on strips dequantized as gguf does (AVX2: avx2_dequantize.c's), bit
    for bit the f32 GEMM on gguf's dequantized matrix."""
    for K in depths(qtype):
        w = weights(qtype, 37, K)
        x = rng.standard_normal((40, K)).astype(np.float32)
        want = cpu_kernels.matmul_transb(x, gguf.quants.dequantize(w, qtype).astype(np.float32))
        for kind, rows in layouts(qtype, w, K):
            out = cpu_kernels.quant_gemm(cpu_avx2.BLOCK_FORMATS[qtype], x, rows, interleaved=bool(kind & INTERLEAVED))
            np.testing.assert_array_equal(out, want)
