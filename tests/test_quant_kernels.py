"""The CPU quant kernels (kernels/cpu/quant.c, quant_k.c through pyllm.backends.cpu_quant) against
gguf.quants and NumPy.

dequantize must be bit-exact to gguf.quants.dequantize for every format. quant_matmul is checked
against a NumPy reference that quantizes the activations the same way (per 32: d = max|x| / 127
in f32, q = round-half-even(x / d), clamped to +-127) and multiplies in float64: what may differ
is the kernel's f32 summation (1e-4 of the output's scale); and loosely against the f32 product
(the int8 activations' rounding: 5% of an output's typical size). Weights for q8_0, q4_0, q4_1 and q5_0 come from
gguf.quants.quantize; for q5_1 and the K-quants (which gguf cannot quantize) they are random bytes
with sane f16 scales.
"""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from pyllm.backends import cpu_quant

pytestmark = pytest.mark.skipif(not cpu_quant.available(), reason="CPU quant kernels not built (no AVX-512)")

FORMATS = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K)
QUANTIZABLE = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0)
F16_FIELDS = {T.Q5_1: (0, 2), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}  # byte offsets in a block
K_QUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)
ALL_ROWS = (T.Q4_1, T.Q4_K)  # M = 1..16 for these, a subset for the others
rng = np.random.default_rng(0)


def depths(qtype):
    return (256, 768) if qtype in K_QUANTS else (32, 96, 576, 1536)


def weights(qtype, N, K):
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal((N, K)).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    w = rng.integers(0, 256, (N, K // block, size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 0.1, w.shape[:2]) * rng.choice([-1.0, 1.0], w.shape[:2])
        w[:, :, offset:offset + 2] = scale.astype(np.float16).view(np.uint8).reshape(*w.shape[:2], 2)
    return w.reshape(N, -1)


def quantized(x):
    """x [M, K] -> (q [M, K / 32, 32] f64, d [M, K / 32, 1] f64, as the kernel rounds)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    q = np.clip(np.rint(blocks / np.where(d == 0, np.float32(1), d)), -127, 127)
    return np.where(d == 0, 0.0, q).astype(np.float64), d.astype(np.float64)


def reference(x, w, qtype):
    q, d = quantized(x)
    return (q * d).reshape(x.shape) @ gguf.quants.dequantize(w, qtype).astype(np.float64).T


def check(out, x, w, qtype):
    want = reference(x, w, qtype)
    scale = np.abs(want).max()
    assert np.abs(out - want).max() <= 1e-4 * scale, f"{qtype.name} {x.shape} x {w.shape}"
    # the int8 rounding's error has a deviation of ~0.6% of an output's typical size |x_m| |w_n| / sqrt(K)
    # (a rounded activation's error ~ 1 / (127 sqrt(12)) of its block's max; seen: <= 2.5%): 5% is 8 sigma
    dense = gguf.quants.dequantize(w, qtype).astype(np.float64)
    typical = np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(dense, axis=1)) / np.sqrt(x.shape[1])
    assert (np.abs(out - x.astype(np.float64) @ dense.T) <= 0.05 * typical).all(), f"{qtype.name}: int8 too far off"


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_dequantize_bit_exact(qtype):
    for K in depths(qtype):
        w = weights(qtype, 7, K)
        got = cpu_quant.dequantize(qtype, w, K)
        want = gguf.quants.dequantize(w, qtype)
        assert got.shape == want.shape == (7, K) and got.dtype == np.float32
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{qtype.name} K={K}"


def test_activation_layout():
    """xq as documented in quant.c: records (group, row) of 832 bytes; q in vector u, lane j bytes
    4j..4j+3 = elements 4u..4u+3 of block j; then d, d * sum, sum, sum of each half."""
    M, K = 3, 576 + 64  # 20 blocks: a full group and a tail of 4
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[1, 32:64] = 0  # a block of zeros: d = 0
    x[2, :32] *= 1e-3
    xq = cpu_quant.quantize_activations(x)
    assert xq.size == 2 * M * 832 and xq.ctypes.data % 64 == 0
    q, d = quantized(x)
    records = xq.reshape(2, M, 832)
    for g in range(2):
        for m in range(M):
            record = records[g, m]
            got_q = record[:512].view(np.int8).reshape(8, 16, 4).transpose(1, 0, 2).reshape(16, 32)
            blocks = range(g * 16, min(g * 16 + 16, K // 32))
            n = len(blocks)
            want_q = q[m, g * 16:g * 16 + n]
            assert np.array_equal(got_q[:n], want_q) and not got_q[n:].any()
            got_d = record[512:576].view(np.float32)
            assert np.array_equal(got_d[:n], d[m, g * 16:g * 16 + n, 0].astype(np.float32)) and not got_d[n:].any()
            sums = record[640:832].view(np.int32).reshape(3, 16)
            assert np.array_equal(sums[0, :n], want_q.sum(-1)) and np.array_equal(sums[1, :n], want_q[:, :16].sum(-1))
            assert np.array_equal(sums[2, :n], want_q[:, 16:].sum(-1))
            dsum = record[576:640].view(np.float32)
            assert np.array_equal(dsum[:n], (got_d[:n] * want_q.sum(-1).astype(np.float32)).astype(np.float32))


@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_quant_matmul(qtype):
    rows = range(1, 17) if qtype in ALL_ROWS else (1, 2, 5, 8, 13, 16)
    for K in depths(qtype):
        for N in (1, 3, 37, 100):
            w = weights(qtype, N, K)
            for M in rows:
                x = rng.standard_normal((M, K)).astype(np.float32)
                out = cpu_quant.quant_matmul(qtype, cpu_quant.quantize_activations(x), M, K, w)
                assert out.shape == (M, N) and out.dtype == np.float32
                check(out, x, w, qtype)


@pytest.mark.parametrize("qtype", (T.Q4_0, T.Q5_1, T.Q8_0, T.Q6_K), ids=lambda t: t.name)
def test_quant_matmul_accumulates(qtype):
    M, K, N = 5, depths(qtype)[-1], 37
    w = weights(qtype, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    xq = cpu_quant.quantize_activations(x)
    product = cpu_quant.quant_matmul(qtype, xq, M, K, w)
    start = rng.standard_normal((M, N)).astype(np.float32)
    out = start.copy()
    assert cpu_quant.quant_matmul(qtype, xq, M, K, w, out=out, accumulate=True) is out
    np.testing.assert_allclose(out, start + product, rtol=0, atol=1e-5 * np.abs(product).max())
    again = np.full((M, N), np.nan, np.float32)
    cpu_quant.quant_matmul(qtype, xq, M, K, w, out=again)  # without accumulate, out is overwritten
    np.testing.assert_array_equal(again, product)


def test_wrapper_errors():
    K, N = 256, 4
    w = weights(T.Q4_K, N, K)
    x = rng.standard_normal((17, K)).astype(np.float32)
    xq = cpu_quant.quantize_activations(x)  # any M quantizes; quant_matmul takes at most 16
    with pytest.raises(ValueError):
        cpu_quant.quant_matmul(T.Q4_K, xq, 17, K, w)
    with pytest.raises(ValueError):
        cpu_quant.quantize_activations(np.zeros((2, 48), np.float32))  # K not a multiple of 32
    xq = cpu_quant.quantize_activations(x[:2, :96])
    with pytest.raises(ValueError):
        cpu_quant.quant_matmul(T.Q4_K, xq, 2, 96, w)  # K not a multiple of 256 for a K-quant
    xq = cpu_quant.quantize_activations(x[:2])
    for bad in (w[:, :-1], w.reshape(-1), w.astype(np.int8), np.asfortranarray(np.repeat(w, 2, axis=0)), w[::2]):
        with pytest.raises(ValueError):
            cpu_quant.quant_matmul(T.Q4_K, xq, 2, K, bad)
    with pytest.raises(ValueError):
        cpu_quant.quant_matmul(T.Q4_K, xq, 3, K, w)  # xq made for 2 rows
    with pytest.raises(ValueError):
        cpu_quant.quant_matmul(T.Q4_K, xq, 2, K, w, out=np.zeros((2, N), np.float64))
    with pytest.raises(ValueError):
        cpu_quant.quant_matmul(T.Q4_K, xq, 2, K, w, out=np.zeros((N, 2), np.float32))
    with pytest.raises(ValueError):
        cpu_quant.quant_matmul(T.Q2_K, xq, 2, K, w)  # not a format the kernels know
    with pytest.raises(ValueError):
        cpu_quant.dequantize(T.Q8_0, w, K)  # w's rows are not q8_0 rows of 256
    with pytest.raises(ValueError):
        cpu_quant.dequantize(T.Q4_0, np.zeros((2, 18), np.uint8), 48)


# ---- the interleaved layout (kernels/cpu/interleave.c) --------------------------------------------
# where GGUF's 32-weight blocks hold their fields: qs (offset, bytes), qh, and whether m follows d
BLOCK_FIELDS = {T.Q4_0: ((2, 16), None, False), T.Q4_1: ((4, 16), None, True), T.Q5_0: ((6, 16), 2, False),
                T.Q5_1: ((8, 16), 4, True), T.Q8_0: ((2, 32), None, False)}


def interleaved_by_the_layout(qtype, w, K):
    """w's rows as the interleaved layout is written down (interleave.c, quant_blocks.h), built from
    GGUF's blocks: per row group of 16 rows, per block b, the 16 rows' block b as one group: quant
    vector t lane j = bytes 4t .. 4t + 3 of row j's block qs, then each block's qh (q5), its f16 d,
    its f16 m (q4_1, q5_1); the rows past the last full row group as they were."""
    (qs, qs_bytes), qh, has_m = BLOCK_FIELDS[qtype]
    stride, out = GGML_QUANT_SIZES[qtype][1], w.copy()
    for r in range(len(w) // 16):
        blocks = w[16 * r:16 * r + 16].reshape(16, K // 32, stride).transpose(1, 0, 2)  # [block, row, bytes]
        pieces = [blocks[:, :, qs:qs + qs_bytes].reshape(K // 32, 16, qs_bytes // 4, 4).transpose(0, 2, 1, 3)]
        pieces += [blocks[:, :, qh:qh + 4]] if qh is not None else []
        pieces += [blocks[:, :, 0:2]] + ([blocks[:, :, 2:4]] if has_m else [])
        groups = np.concatenate([p.reshape(K // 32, -1) for p in pieces], axis=1)  # [block, 16 blocks' bytes]
        out[16 * r:16 * r + 16] = groups.reshape(16, -1)
    return out


@pytest.mark.parametrize("qtype", tuple(BLOCK_FIELDS), ids=lambda t: t.name)
def test_interleaved_rows_compute_what_gguf_rows_do(qtype):
    """interleave reorders each row group of 16 rows as written down and keeps the rows past the
    last one; the kernels on an interleaved matrix (type | INTERLEAVED) compute what they compute on
    GGUF's rows: dequantize (whole, and picked rows) bit-exact to gguf, quant_gemm the same floats,
    quant_matmul the same products summed in another order (each row's blocks in one lane), and
    still within the reference's bound."""
    from pyllm.backends import cpu_kernels
    from pyllm.formats import FORMATS as REGISTRY
    for K in (96, 576, 1536, 1280):
        w = weights(qtype, 37, K)
        rows = cpu_quant.interleave(qtype, w.copy(), K)
        np.testing.assert_array_equal(rows, interleaved_by_the_layout(qtype, w, K))
        kind = int(qtype) | cpu_quant.INTERLEAVED
        np.testing.assert_array_equal(cpu_quant.dequantize(kind, rows, K), gguf.quants.dequantize(w, qtype))
        picked = np.array([36, 0, 17, 31, 32, 17])  # from both row groups and the rows past them
        np.testing.assert_array_equal(cpu_quant.dequantize(kind, rows, K, rows=picked),
                                      gguf.quants.dequantize(w, qtype)[picked])
        for M, layers in ((1, 2), (1, 1), (3, 2), (4, 2), (5, 1), (8, 1), (16, 1), (16, 2)):
            x = rng.standard_normal((M, K)).astype(np.float32)
            xq = cpu_quant.quantize_activations(x, layers)
            out = cpu_quant.quant_matmul(kind, xq, M, K, rows, layers=layers)
            np.testing.assert_allclose(out, cpu_quant.quant_matmul(qtype, xq, M, K, w, layers=layers),
                                       rtol=0, atol=2e-6 * np.abs(out).max())
            if layers == 1:
                check(out, x, w, qtype)
        x = rng.standard_normal((40, K)).astype(np.float32)
        fmt = REGISTRY[qtype.name.lower()]
        np.testing.assert_array_equal(cpu_kernels.quant_gemm(fmt, x, rows, interleaved=True),
                                      cpu_kernels.quant_gemm(fmt, x, w))
    with pytest.raises(ValueError):
        cpu_quant.interleave(T.Q4_K, weights(T.Q4_K, 2, 256), 256)  # only the 32-weight formats interleave
    with pytest.raises(ValueError):
        cpu_quant.interleave(qtype, np.frombuffer(w.tobytes(), np.uint8).reshape(w.shape), K)  # read-only
    with pytest.raises(ValueError):
        cpu_quant.dequantize(kind, rows, K, rows=[37])  # past the matrix


def test_the_cpu_backend_interleaves_what_it_takes():
    """CpuBackend.upload interleaves a 32-weight block matrix (the same bytes, reordered) and not
    the others; the matrix still dequantizes to gguf's values."""
    from pyllm.benchmarks.step_split import tiny_model
    from pyllm.formats import FORMATS as REGISTRY
    from pyllm.weights import QuantizedMatrix
    backend = tiny_model(layers=1).backend
    for qtype, K in ((T.Q4_0, 576), (T.Q8_0, 1536), (T.Q4_K, 512)):
        w = weights(qtype, 19, K)
        taken = backend.upload(QuantizedMatrix(REGISTRY[qtype.name.lower()], (19, K), w.copy()))
        assert taken.interleaved == (qtype != T.Q4_K)
        assert sorted(taken.data.ravel()) == sorted(w.ravel())
        np.testing.assert_array_equal(taken.dequantize(), gguf.quants.dequantize(w, qtype))
        np.testing.assert_array_equal(taken.dequantize(rows=np.array([4, 18, 1])), gguf.quants.dequantize(w, qtype)[[4, 18, 1]])


# ---- the f32-activation kernels over the same blocks (kernels/cpu/matmul.c) --------------------
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 5, 16, 17, 40, 100])
def test_quant_gemm_matches_the_dequantized_product(qtype, M):
    """quant_gemm (a prompt: panels of 32 rows with a ragged last one, strips of 12 weight rows with
    a ragged last one), alone and added into a result: f32 products of exactly the stored weights."""
    from pyllm.backends import cpu_kernels
    from pyllm.formats import FORMATS as REGISTRY
    fmt = REGISTRY[qtype.name.lower()]
    K, N = depths(qtype)[-1], 37
    w, x, c = weights(qtype, N, K), rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((M, N))
    want = x.astype(np.float64) @ gguf.quants.dequantize(w, qtype).astype(np.float64).T
    tolerance = 1e-5 * np.abs(want).max()
    np.testing.assert_allclose(cpu_kernels.quant_gemm(fmt, x, w), want, atol=tolerance, rtol=0)
    added = c.astype(np.float32)
    assert cpu_kernels.quant_gemm(fmt, x, w, add_to=added) is added
    np.testing.assert_allclose(added, c + want, atol=tolerance + 1e-5, rtol=0)
    with pytest.raises(ValueError, match="quant_gemm"):
        cpu_kernels.quant_gemm(fmt, x, w[:, :-1].copy())  # rows of the wrong length are refused


def test_stream_read_sums_what_it_reads():
    from pyllm.backends import cpu_kernels
    data = rng.standard_normal(1_000_003).astype(np.float32)  # not a multiple of the threads' 64-float steps
    assert cpu_kernels.stream_read(data) == pytest.approx(float(data.astype(np.float64).sum()), abs=1e-2)


def two_layers(x):
    """x [M, K] -> (its int8 blocks, its rounding error's int8 blocks) in f64, as the kernel rounds
    (the error x - d q taken in f32, as NumPy computes it)."""
    q, d = quantized(x)
    first = (q * d).reshape(x.shape)
    error = x - first.astype(np.float32)
    q2, d2 = quantized(error)
    return first, (q2 * d2).reshape(x.shape)


@pytest.mark.parametrize("qtype", (T.Q8_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K), ids=lambda t: t.name)
def test_two_activation_layers(qtype):
    """layers=2: each row of x as its int8 blocks plus its rounding error's, accumulated into the
    same outputs: the NumPy emulation within f32 summation error, and next to the exact product
    at most 1/30 of one layer's error (~1/127 in expectation), outlier channels included, as a
    norm's output has them."""
    K = depths(qtype)[-1]
    errors = {1: 0.0, 2: 0.0}  # the largest error next to the exact product, by layers, over every shape
    for M in (1, 2, 4, 7, 16):
        for N in (3, 37):
            w = weights(qtype, N, K)
            x = rng.standard_normal((M, K)).astype(np.float32)
            x[:, [5, K // 2]] = [40.0, -60.0]
            dense = gguf.quants.dequantize(w, qtype).astype(np.float64)
            first, second = two_layers(x)
            emulated = (first + second) @ dense.T
            out = cpu_quant.quant_matmul(qtype, cpu_quant.quantize_activations(x, 2), M, K, w, layers=2)
            np.testing.assert_allclose(out, emulated, atol=1e-4 * np.abs(emulated).max(), rtol=0)
            exact = x.astype(np.float64) @ dense.T
            one_layer = cpu_quant.quant_matmul(qtype, cpu_quant.quantize_activations(x), M, K, w)
            errors[2] = max(errors[2], np.abs(out - exact).max() / np.abs(exact).max())
            errors[1] = max(errors[1], np.abs(one_layer - exact).max() / np.abs(exact).max())
    assert errors[2] <= errors[1] / 30, f"{qtype.name}: {errors}"
    with pytest.raises(ValueError):  # a one-layer buffer for a two-layer call
        cpu_quant.quant_matmul(qtype, cpu_quant.quantize_activations(x), M, K, w, layers=2)
    with pytest.raises(ValueError):
        cpu_quant.quantize_activations(x, layers=3)


# ---- 16-bit weights (kernels/cpu/half.c) ---------------------------------------------------------
HALF = (T.F16, T.BF16)


def half_weights(qtype, N, K):
    """f16 (float16) or bf16 (its bits, uint16) [N, K], as a GGUF stores them, from gguf's quantizer."""
    w = gguf.quants.quantize(rng.standard_normal((N, K)).astype(np.float32), qtype)
    return w if qtype == T.F16 else w.view(np.uint16)


@pytest.mark.parametrize("qtype", HALF, ids=lambda t: t.name)
def test_half_matmul_matches_the_f64_product(qtype):
    """Every M of a decode step, depths with tails of the 16- and 32-weight steps, weight rows not a
    multiple of the batches of 8 or the runs of 4, each output within a bound of its sum of |x w|:
    f16 2^-20 (f32 sums of exact products), bf16 2^-14 (its activations carried as two bf16 layers,
    ~16 bits of each x instead of bf16's 8; one bf16 layer alone errs by up to 2^-9)."""
    if not cpu_quant.takes_half(qtype):
        pytest.skip(f"no {qtype.name} kernel on this CPU (bf16 needs AVX512_BF16)")
    for K in (8, 40, 100, 576):
        for N in (1, 3, 37):
            w = half_weights(qtype, N, K)
            dense = gguf.quants.dequantize(w.view(np.uint8), qtype).astype(np.float64)
            for M in range(1, 17):
                x = rng.standard_normal((M, K)).astype(np.float32)
                want = x.astype(np.float64) @ dense.T
                out = cpu_quant.half_matmul(qtype, x, w)
                assert out.shape == (M, N) and out.dtype == np.float32
                bound = 2.0 ** (-20 if qtype == T.F16 else -14) * (np.abs(x).astype(np.float64) @ np.abs(dense).T)
                assert (np.abs(out - want) <= bound).all(), f"{qtype.name} M={M} K={K} N={N}"
    start = rng.standard_normal((M, N)).astype(np.float32)
    added = start.copy()
    assert cpu_quant.half_matmul(qtype, x, w, out=added, accumulate=True) is added
    np.testing.assert_allclose(added, start + out, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        cpu_quant.half_matmul(qtype, rng.standard_normal((17, K)).astype(np.float32), w)  # M over 16
    with pytest.raises(ValueError):
        cpu_quant.half_matmul(qtype, x[:, :-1], w)  # K disagrees
    with pytest.raises(ValueError):
        cpu_quant.half_matmul(T.Q8_0, x, w)  # not a 16-bit type


@pytest.mark.parametrize("qtype", HALF, ids=lambda t: t.name)
def test_half_formats_dequantize_and_prefill_exactly(qtype):
    """dequantize bit-exact to gguf; quant_gemm (a prompt's rows) on the widened weights."""
    from pyllm.backends import cpu_kernels
    from pyllm.formats import FORMATS as REGISTRY
    K, N, M = 100, 37, 40
    w = half_weights(qtype, N, K).view(np.uint8)
    dense = gguf.quants.dequantize(w, qtype)
    np.testing.assert_array_equal(cpu_quant.dequantize(qtype, w, K), dense)
    x = rng.standard_normal((M, K)).astype(np.float32)
    want = x.astype(np.float64) @ dense.astype(np.float64).T
    np.testing.assert_allclose(cpu_kernels.quant_gemm(REGISTRY[qtype.name.lower()], x, w), want,
                               atol=1e-5 * np.abs(want).max(), rtol=0)
