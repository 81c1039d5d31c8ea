"""Every CUDA kernel (kernels/*.cu) against its reference operator (pyllm.backends.reference).

Each runs through the CUDA backend on the cuda-emu executor (CPU, CUDA semantics) and, where
there is a GPU, through CuPy (skipped otherwise), in f32, f16 and bf16, on shapes with tails and
several warps and blocks (hidden 576 and 100, head_dim 64, GQA 9/3). Attention and the fused
KV write go through block tables into a pool of two layers, the second at work: ragged batches,
blocks shared by several sequences, partial last blocks, shuffled block ids, KV lengths 1, 15,
16, 17, 37 and 300.
16-bit inputs are rounded first and the NumPy operator runs on the rounded values, so what may
differ is the output's own rounding: half a unit in its last place, plus f32 slack.
A deliberately broken rms_norm (tests/broken_kernels) must fail under the executor.
"""

import functools
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pyllm.backends import kernels_dir, reference as ops
from pyllm.backends.base import BLOCK_TOKENS, Step
from pyllm.backends.cuda_attention import attention_splits
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
LAYERS, LAYER = 2, 1  # the pool holds two layers' K/V; a step's kernels work on the second
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


# ---- the KV pool: a step's sequences and their block tables -------------------------------
def test_the_kernels_block_tokens_are_the_pools():
    header = (kernels_dir() / "common.cuh").read_text()
    assert re.search(r"constexpr int BLOCK_TOKENS = (\d+);", header).group(1) == str(BLOCK_TOKENS)


def block_tables(rows, shares=None, spare=3):
    """Tables for sequences of `rows` tokens (cached + new) over one pool with `spare` blocks no
    one holds, block ids shuffled; shares {i: (j, n)}: sequence i's first n blocks are sequence
    j's -> (tables, blocks in the pool)."""
    counts = [-(-r // BLOCK_TOKENS) for r in rows]
    ids = iter(rng.permutation(sum(counts) + spare).astype(np.int32))
    tables = [np.array([next(ids) for _ in range(count)], np.int32) for count in counts]
    for i, (j, n) in (shares or {}).items():
        tables[i][:n] = tables[j][:n]
    return tables, sum(counts) + spare


def pool_step(keys, values, tables, rows, new):
    """The Step of sequences with those tables, rows (cached + new) and new tokens over one pool."""
    return Step([(keys, values, table, r, n) for table, r, n in zip(tables, rows, new)],
                [int(s) for s in np.cumsum([0, *new])])


def put_pools(be, n_blocks, n_kv=KV, layers=LAYERS):
    """Random keys and values pools [blocks, layers, KV, BLOCK_TOKENS, D], as put() gives them."""
    shape = (n_blocks, layers, n_kv, BLOCK_TOKENS, D)
    return put(be, randn(*shape)), put(be, randn(*shape))


# rows (cached + new), new tokens, shared blocks {i: (j, n)} per sequence. The ragged batch holds
# every KV length; its sequences 3 and 4 read blocks of sequence 5 (a shared prompt) and write
# their own; the forks decode over the same two full blocks, each into its own partial third.
RAGGED = ([1, 15, 16, 17, 37, 300], [1, 15, 1, 1, 5, 4], {3: (5, 1), 4: (5, 2)})
FORKS = ([40, 40, 40], [1, 1, 1], {1: (0, 2), 2: (0, 2)})


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
@pytest.mark.parametrize("rows, new, shares", [([37], [1], None), ([37], [37], None), ([305], [5], None),
                                               RAGGED, FORKS], ids=["decode", "prefill", "chunk", "ragged", "forks"])
def test_qkv_rope_cache_through_block_tables(device, dtype, with_bias, rows, new, shares):
    be, reference = backend(device, dtype), ops.ReferenceBackend(config())
    tables, n_blocks = block_tables(rows, shares)
    qkv, qkv_values = put(be, randn(sum(new), (H + 2 * KV) * D))
    bias, bias_values = put(be, randn((H + 2 * KV) * D)) if with_bias else (None, None)
    (keys, key_values), (values, value_values) = put_pools(be, n_blocks)
    q_expected = reference.qkv_rope_cache(qkv_values, bias_values,
                                          pool_step(key_values, value_values, tables, rows, new), LAYER)
    check(be, be.qkv_rope_cache(qkv, bias, pool_step(keys, values, tables, rows, new), LAYER), q_expected)
    check(be, keys, key_values)  # every other row, block and layer untouched
    check(be, values, value_values)


# ---- attention ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, new, shares", [([1], [1], None), ([17], [1], None), ([300], [1], None),
                                               ([37], [37], None), ([300], [5], None), RAGGED, FORKS],
                         ids=["decode-1", "decode-17", "decode-300", "prefill-37", "chunk-300", "ragged", "forks"])
def test_step_attention_through_block_tables(device, dtype, rows, new, shares):
    """Decode (1 new token), prefill and a prompt's last chunk, alone and as ragged batches."""
    be = backend(device, dtype)
    tables, n_blocks = block_tables(rows, shares)
    q, q_values = put(be, randn(sum(new), H, D))
    (keys, key_values), (values, value_values) = put_pools(be, n_blocks)
    out = be.step_attention(q, pool_step(keys, values, tables, rows, new), LAYER)
    check(be, out, ops.step_attention(q_values, pool_step(key_values, value_values, tables, rows, new), LAYER))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_attention_over_contiguous_keys_is_the_block_kernel_over_a_copy(device, dtype):
    be = backend(device, dtype)
    q, q_values = put(be, randn(5, H, D))
    (k, k_values), (v, v_values) = put(be, randn(KV, 37, D)), put(be, randn(KV, 37, D))
    check(be, be.attention(q, k, v, 32), ops.attention(q_values, k_values, v_values, 32))


def test_attention_long_context_opts_into_more_shared_memory(device):
    be = backend(device, "f32")
    rows = [12_500]  # its scores need more than the default 48 KiB of shared memory
    tables, n_blocks = block_tables(rows)
    q, q_values = put(be, randn(1, 2, D))
    (keys, key_values), (values, value_values) = put_pools(be, n_blocks, n_kv=1, layers=1)
    out = be.step_attention(q, pool_step(keys, values, tables, rows, [1]), 0)
    check(be, out, ops.step_attention(q_values, pool_step(key_values, value_values, tables, rows, [1]), 0))


# ---- flash-decoding: a decode step's keys split across blocks, then merged ------------------
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("kv_len", [1, 37, 300, 5000])
def test_split_keys_give_the_same_attention(device, dtype, kv_len):
    """A ragged decode step split 1, 2, 3 and 7 ways: the longest sequence sets the chunk, so the
    shorter ones' later splits hold none of their keys (kv_len 1: every split past the first)."""
    be = backend(device, dtype)
    rows, new = [kv_len, max(1, kv_len // 3), 1], [1, 1, 1]
    tables, n_blocks = block_tables(rows)
    q, q_values = put(be, randn(len(rows), H, D))
    (keys, key_values), (values, value_values) = put_pools(be, n_blocks)
    expected = ops.step_attention(q_values, pool_step(key_values, value_values, tables, rows, new), LAYER)
    for splits in (1, 2, 3, 7):
        check(be, be.step_attention(q, pool_step(keys, values, tables, rows, new), LAYER, splits=splits), expected)


def test_a_long_decode_splits_itself_to_fill_the_gpu(device):
    """One sequence of 5,000 keys gives too few (token, head) blocks: the step splits its keys (a
    second launch merges them) and still matches the reference."""
    be = backend(device, "f32")
    tables, n_blocks = block_tables([5000])
    q, q_values = put(be, randn(1, H, D))
    (keys, key_values), (values, value_values) = put_pools(be, n_blocks)
    before = be.launches
    out = be.step_attention(q, pool_step(keys, values, tables, [5000], [1]), LAYER)
    assert be.launches - before == 2
    check(be, out, ops.step_attention(q_values, pool_step(key_values, value_values, tables, [5000], [1]), LAYER))


def test_attention_splits():
    sm90 = 132
    assert attention_splits(5000, 1 * 32, sm90, 57_824) == 9  # 2 x 132 blocks over 32 heads
    assert attention_splits(5000, 1 * 4, sm90, 57_824) == 20  # capped by 256 keys a split
    assert attention_splits(300, 4, sm90, 57_824) == 2 and attention_splits(37, 4, sm90, 57_824) == 1
    assert attention_splits(5000, 8 * 32 + 8, sm90, 57_824) == 1  # a batch that fills the GPU alone
    assert attention_splits(60_000, 512 * 32, sm90, 57_824) == 2  # a long prompt: just enough to fit
    assert attention_splits(1, 0, sm90, 57_824) == 1


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


def test_real_kernels_pass_the_race_check(monkeypatch):
    """Every launch runs twice, threads and blocks in opposite orders; results must not differ."""
    monkeypatch.setenv("PYLLM_CUDA_EMU_RACE_CHECK", "1")
    be = CudaBackend(config(), "f16", EmuDevice())
    (x, xv), (w, wv) = put(be, randn(3, 576)), put(be, randn(576))
    check(be, be.rms_norm(x, w, 1e-5), ops.rms_norm(xv, wv, 1e-5))
    scores, values = put(be, randn(H, 5, 37))
    check(be, be.softmax_causal(scores, 32), ops.softmax_causal(values, 32))
    rows, new, shares = [37, 20], [2, 3], {1: (0, 1)}  # the second reads the first one's first block
    tables, n_blocks = block_tables(rows, shares)
    qkv, qkv_values = put(be, randn(sum(new), (H + 2 * KV) * D))
    (keys, key_values), (values, value_values) = put_pools(be, n_blocks)
    step = pool_step(keys, values, tables, rows, new)
    q = be.qkv_rope_cache(qkv, None, step, LAYER)
    reference_step = pool_step(key_values, value_values, tables, rows, new)
    check(be, q, ops.ReferenceBackend(config()).qkv_rope_cache(qkv_values, None, reference_step, LAYER))
    stored = pool_step(be.to_host(keys), be.to_host(values), tables, rows, new)  # attention reads the rounded q, k, v
    check(be, be.step_attention(q, step, LAYER), ops.step_attention(be.to_host(q), stored, LAYER))
