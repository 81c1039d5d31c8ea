"""Every CUDA kernel (kernels/*.cu) against its reference operator (pyllm.backends.reference).

Each runs through the CUDA backend on the cuda-emu executor (CPU, CUDA semantics) and, where
there is a GPU, through CuPy (skipped otherwise), in f32, f16 and bf16, on shapes with tails and
several warps and blocks (hidden 576 and 100, head_dim 64, GQA 9/3, KV lengths 1, 37 and 300).
16-bit inputs are rounded first and the NumPy operator runs on the rounded values, so what may
differ is the output's own rounding: half a unit in its last place, plus f32 slack.
A deliberately broken rms_norm (tests/broken_kernels) must fail under the executor.
"""

import functools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pyllm.backends import reference as ops
from pyllm.backends.base import Step
from pyllm.backends.cuda_backend import CudaBackend
from pyllm.backends.cuda_device import CupyDevice, EmuDevice
from pyllm.backends.cuda_emu import Module, RaceDetected
from pyllm.dtypes import convert
from pyllm.errors import PyllmError

BROKEN = Path(__file__).resolve().parent / "broken_kernels"
DTYPES = ("f32", "f16", "bf16")
HALF_ULP = {"f32": 0.0, "f16": 2.0**-11, "bf16": 2.0**-8}  # relative rounding error of one store
# f32 arithmetic's share of the error: cuda-emu runs the kernels' own operation order; a GPU also
# fuses multiply-adds (NVRTC), flushes subnormals (CuPy's -ftz=true) and orders cuBLAS's sums its way
F32_SLACK = {"cuda-emu": 1e-5, "cuda": 1e-4}
H, KV, D = 9, 3, 64  # SmolLM2-135M's attention: 9 query heads share 3 key/value heads
rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


@functools.cache
def _device(name):
    return EmuDevice() if name == "cuda-emu" else CupyDevice()


def config(head_dim=D, theta=10000.0, max_positions=512):
    return SimpleNamespace(rope_theta=theta, head_dim=head_dim, max_position_embeddings=max_positions,
                           dtype="f32")


@functools.cache
def backend(device_name, dtype, head_dim=D, theta=10000.0) -> CudaBackend:
    return CudaBackend(config(head_dim, theta), dtype, _device(device_name))


@pytest.fixture(params=["cuda-emu", "cuda"])
def device(request):
    if request.param == "cuda":
        try:
            _device("cuda")
        except PyllmError as exc:
            pytest.skip(f"no GPU for the CuPy run: {exc}")
    return request.param


def put(be, x32):
    """Round a host f32 array to the backend's dtype -> (device array, a copy of the f32 values it holds)."""
    stored = convert(x32, "f32", be.dtype)
    return be.upload(stored), np.array(convert(stored, be.dtype, "f32"))


def check(be, out, expected, roundings=1):
    """Equal up to `roundings` roundings to the storage dtype, plus f32 slack. The final rounding
    errs relative to each value, earlier ones relative to intermediates: bounded by the largest value."""
    half_ulp, largest, slack = HALF_ULP[be.dtype], np.abs(expected).max(), F32_SLACK[be.name]
    np.testing.assert_allclose(be.to_host(out), expected, rtol=half_ulp + slack,
                               atol=((roundings - 1) * half_ulp + slack) * largest)


# ---- row kernels -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [100, 576])
def test_rms_norm(device, dtype, hidden):
    be = backend(device, dtype)
    (x, xv), (w, wv) = put(be, randn(7, hidden, scale=3.0)), put(be, 1.0 + randn(hidden, scale=0.3))
    check(be, be.rms_norm(x, w, 1e-5), ops.rms_norm(xv, wv, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [100, 1536])
def test_swiglu(device, dtype, inter):
    be = backend(device, dtype)
    gate_up, values = put(be, randn(5, 2 * inter, scale=3.0))
    check(be, be.swiglu(gate_up), ops.swiglu(values))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_copies_rows_bit_for_bit(device, dtype):
    be = backend(device, dtype)
    table, values = put(be, randn(300, 576))
    ids = np.array([3, 0, 299, 3, 17])
    np.testing.assert_array_equal(be.to_host(be.gather(table, be.upload_ids(ids))), values[ids])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (1, 37), (5, 37), (4, 300)])
def test_softmax_causal(device, dtype, q_len, kv_len):
    be = backend(device, dtype)
    scores, values = put(be, randn(H, q_len, kv_len, scale=4.0))
    offset = kv_len - q_len
    check(be, be.softmax_causal(scores, offset), ops.softmax_causal(values, offset))


def test_softmax_fully_masked_row_gives_zeros(device):
    be = backend(device, "f32")
    scores, values = put(be, randn(2, 3, 4))
    out = be.to_host(be.softmax_causal(scores, -1))  # query 0 sees no key at all
    assert np.all(out[:, 0] == 0) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ops.softmax_causal(values, -1), atol=1e-6)


# ---- rope and the fused KV-cache write ---------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("theta, head_dim", [(10000.0, 64), (500000.0, 24)])
def test_rope(device, dtype, theta, head_dim):
    be = backend(device, dtype, head_dim, theta)
    positions = np.array([0, 1, 5, 37, 300, 511])
    x, values = put(be, randn(len(positions), H, head_dim))
    cos, sin = ops.rope_tables(theta, head_dim, 512)
    check(be, be.rope(x, be.upload_ids(positions)), ops.rope(values, positions, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n_new, start", [(1, 36), (37, 0), (5, 300)])
def test_qkv_rope_cache(device, dtype, with_bias, n_new, start):
    be, reference = backend(device, dtype), ops.ReferenceBackend(config())
    qkv, qkv_values = put(be, randn(n_new, (H + 2 * KV) * D))
    bias, bias_values = put(be, randn((H + 2 * KV) * D)) if with_bias else (None, None)
    (k_cache, k_values), (v_cache, v_values) = put(be, randn(KV, 320, D)), put(be, randn(KV, 320, D))
    q_expected = reference.qkv_rope_cache(qkv_values, bias_values,
                                          Step([(k_values[None], v_values[None], start + n_new, n_new)], [0, n_new]), 0)
    q = be.qkv_rope_cache(qkv, bias, Step([(k_cache[None], v_cache[None], start + n_new, n_new)], [0, n_new]), 0)
    check(be, q, q_expected)
    check(be, k_cache, k_values)  # rows outside start .. start + n_new - 1 are untouched
    check(be, v_cache, v_values)


# ---- attention ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (1, 37), (1, 300), (37, 37), (5, 300)])
def test_attention_over_cache_views(device, dtype, q_len, kv_len):
    """Decode (q_len 1) and prefill; k, v are views into a cache with room for 320 tokens."""
    be = backend(device, dtype)
    q, q_values = put(be, randn(q_len, H, D))
    (k_cache, k_values), (v_cache, v_values) = put(be, randn(KV, 320, D)), put(be, randn(KV, 320, D))
    offset = kv_len - q_len
    out = be.attention(q, k_cache[:, :kv_len], v_cache[:, :kv_len], offset)
    check(be, out, ops.attention(q_values, k_values[:, :kv_len], v_values[:, :kv_len], offset))


def test_attention_long_context_opts_into_more_shared_memory(device):
    be = backend(device, "f32")
    kv_len = 12_500  # its scores need more than the default 48 KiB of shared memory
    q, q_values = put(be, randn(1, 2, D))
    (k, k_values), (v, v_values) = put(be, randn(1, kv_len, D)), put(be, randn(1, kv_len, D))
    check(be, be.attention(q, k, v, kv_len - 1), ops.attention(q_values, k_values, v_values, kv_len - 1))


# ---- matmul (cuBLAS on a GPU, NumPy f32 rounded like cuBLAS on the emulator) ---------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_transb(device, dtype, rows, with_bias):
    be = backend(device, dtype)
    (a, av), (b, bv) = put(be, randn(rows, 100)), put(be, randn(37, 100))
    c, cv = put(be, randn(rows, 37))
    bias, bias_v = put(be, randn(37)) if with_bias else (None, None)
    expected = ops.matmul_transb(av, bv, alpha=0.5, beta=2.0, c=cv, bias=bias_v)
    out = be.matmul_transb(a, b, alpha=0.5, beta=2.0, c=c, bias=bias)
    check(be, out, expected, roundings=2 if with_bias else 1)  # the bias is a second rounded gemm
    check(be, be.matmul_transb(a, b), av @ bv.T)


# ---- the executor catches broken kernels -------------------------------------------------
def test_rms_norm_without_its_barrier_fails_under_the_executor():
    x, w = randn(4, 576, scale=3.0), 1.0 + randn(576, scale=0.3)
    expected, out = ops.rms_norm(x, w, 1e-5), np.zeros_like(x)
    args = (x, w, out, np.int32(576), np.float32(1e-5))
    broken = Module(path=BROKEN / "rms_norm_missing_sync.cu", options=("-DSCALAR_T=float",))
    broken.get_function("rms_norm")((4,), (256,), args)
    assert not np.allclose(out, expected, rtol=1e-3, atol=1e-3)
    checked = Module(path=BROKEN / "rms_norm_missing_sync.cu", options=("-DSCALAR_T=float",), race_check=True)
    with pytest.raises(RaceDetected):
        checked.get_function("rms_norm")((4,), (256,), args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_cache_batch_of_sequences(device, dtype):
    """A ragged batch: each sequence's rows go to its own cache, each with its own capacity."""
    be, reference = backend(device, dtype), ops.ReferenceBackend(config())
    qkv, qkv_values = put(be, randn(1 + 4 + 2, (H + 2 * KV) * D))
    caches = [(put(be, randn(KV, capacity, D)), put(be, randn(KV, capacity, D))) for capacity in (9, 300, 40)]
    starts, counts = (8, 290, 0), (1, 4, 2)
    rows = list(np.cumsum([0, *counts]))
    q_expected = reference.qkv_rope_cache(qkv_values, None, Step([(k[1][None], v[1][None], start + n, n) for (k, v), start, n
                                                                  in zip(caches, starts, counts)], rows), 0)
    q = be.qkv_rope_cache(qkv, None, Step([(k[0][None], v[0][None], start + n, n)
                                           for (k, v), start, n in zip(caches, starts, counts)], rows), 0)
    check(be, q, q_expected)
    for k, v in caches:
        check(be, k[0], k[1])
        check(be, v[0], v[1])


def test_real_kernels_pass_the_race_check(monkeypatch):
    """Every launch runs twice, threads and blocks in opposite orders; results must not differ."""
    monkeypatch.setenv("PYLLM_CUDA_EMU_RACE_CHECK", "1")
    be = CudaBackend(config(), "f16", EmuDevice())
    (x, xv), (w, wv) = put(be, randn(3, 576)), put(be, randn(576))
    check(be, be.rms_norm(x, w, 1e-5), ops.rms_norm(xv, wv, 1e-5))
    scores, values = put(be, randn(H, 5, 37))
    check(be, be.softmax_causal(scores, 32), ops.softmax_causal(values, 32))
    qkv, qkv_values = put(be, randn(2, (H + 2 * KV) * D))
    (k, k_values), (v, v_values) = put(be, randn(KV, 37, D)), put(be, randn(KV, 37, D))
    q = be.qkv_rope_cache(qkv, None, Step([(k[None], v[None], 37, 2)], [0, 2]), 0)
    reference = ops.ReferenceBackend(config())
    check(be, q, reference.qkv_rope_cache(qkv_values, None, Step([(k_values[None], v_values[None], 37, 2)], [0, 2]), 0))
    stored = [be.to_host(a) for a in (q, k, v)]  # attention reads the rounded q, k, v
    check(be, be.attention(q, k, v, 35), ops.attention(*stored, 35))
