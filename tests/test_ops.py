"""Each reference operator against transformers' own module or a plain PyTorch reference, and
the CPU backend's C kernels against both (tests taking `kernels` run through the C kernels and
through the CPU backend's fallback to the reference)."""

import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama as hf

from pyllm.backends import cpu_kernels
from pyllm.backends import reference as ops
from pyllm.backends.base import BLOCK_TOKENS, CacheSlot, Step
from pyllm.backends.cpu import CpuBackend

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.fixture(params=["c", "numpy"])
def kernels(request, monkeypatch):
    """Runs a test through kernels/cpu/ (skipped where it cannot be built: AVX-512, or a decode
    step's kernels with AVX2 alone) and through NumPy alone."""
    if request.param == "numpy":
        monkeypatch.setattr(cpu_kernels, "_avx512_library", lambda: None)
        monkeypatch.setattr(cpu_kernels, "_kernel_library", lambda: None)
    elif not cpu_kernels.kernels_available():
        pytest.skip("no C compiler or neither AVX2 nor AVX-512 here: the NumPy path serves")
    return request.param


def test_gather_picks_rows():
    table, ids = randn(50, 8), np.array([3, 0, 49, 3])
    expected = torch.nn.functional.embedding(torch.from_numpy(ids), torch.from_numpy(table)).numpy()
    np.testing.assert_array_equal(ops.gather(table, ids), expected)


@pytest.mark.parametrize("rows,hidden", [(7, 100), (7, 576), (300, 576)])  # C: a tail; one thread; all
def test_rms_norm_matches_llama_rmsnorm(kernels, rows, hidden):
    x, w = randn(rows, hidden), randn(hidden)
    module = hf.LlamaRMSNorm(hidden, eps=1e-5)
    module.weight.data = torch.from_numpy(w)
    expected = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(CpuBackend.rms_norm(x, w, 1e-5), expected, atol=1e-5)
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-5), expected, atol=1e-5)


@pytest.mark.parametrize("theta,head_dim", [(10000.0, 64), (500000.0, 24)])
def test_rope_matches_hf_rotary_embedding(theta, head_dim):
    config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, rope_theta=theta,
                                      max_position_embeddings=512)
    positions = np.array([0, 1, 5, 37, 300, 511])
    q, k = randn(len(positions), 3, head_dim), randn(len(positions), 1, head_dim)
    cos_t, sin_t = hf.LlamaRotaryEmbedding(config)(torch.zeros(1), torch.from_numpy(positions)[None])
    # transformers wants [batch, heads, seq, dim]
    q_hf, k_hf = hf.apply_rotary_pos_emb(torch.from_numpy(q).transpose(0, 1)[None],
                                         torch.from_numpy(k).transpose(0, 1)[None], cos_t, sin_t)
    cos, sin = ops.rope_tables(theta, head_dim, 512)
    # torch's f32 cos/sin of angles near 500 rad may be an ulp off the correctly rounded value
    np.testing.assert_allclose(ops.rope(q, positions, cos, sin), q_hf[0].transpose(0, 1).numpy(), atol=6e-5)
    np.testing.assert_allclose(ops.rope(k, positions, cos, sin), k_hf[0].transpose(0, 1).numpy(), atol=6e-5)


@pytest.mark.parametrize("head_dim,with_bias", [(64, False), (20, True)])
def test_qkv_rope_cache_ropes_q_and_k_into_each_sequence_cache(kernels, head_dim, with_bias):
    """The backend's fused epilogue for a ragged batch (block tables of 1, 1 and 4 blocks of a
    pool, in shuffled order) against rope() above: q comes back roped, each sequence's roped k and
    its v land in its positions' blocks and rows at the given layer, and nothing else changes."""
    n_heads, n_kv, counts, starts, layer = 6, 2, [3, 1, 40], [0, 7, 20], 1
    backend = CpuBackend(SimpleNamespace(rope_theta=10000.0, head_dim=head_dim, max_position_embeddings=64))
    qkv = randn(sum(counts), (n_heads + 2 * n_kv) * head_dim)
    bias = randn(qkv.shape[1]) if with_bias else None
    pool_keys, pool_values = (np.zeros((8, 2, n_kv, BLOCK_TOKENS, head_dim), np.float32)  # [blocks, layers, KV, 16, D]
                              for _ in "kv")
    tables = np.split(rng.permutation(8).astype(np.int32), [1, 2, 6])[:3]  # 1, 1 and 4 blocks, in any order
    step = Step([CacheSlot(pool_keys, pool_values, table, start + n, n)
                 for table, start, n in zip(tables, starts, counts)], list(np.cumsum([0] + counts)))
    q = backend.qkv_rope_cache(qkv, bias, step, layer)
    heads = (qkv if bias is None else qkv + bias).reshape(len(qkv), -1, head_dim)  # [T, H + 2 KV, D]
    positions = np.concatenate([np.arange(start, start + n) for start, n in zip(starts, counts)])
    np.testing.assert_allclose(q, ops.rope(heads[:, :n_heads], positions, backend.cos, backend.sin), atol=1e-6)
    keys = ops.rope(heads[:, n_heads:n_heads + n_kv], positions, backend.cos, backend.sin)
    for slot, start, n, first in zip(step.slots, starts, counts, np.cumsum([0] + counts)):
        k, v = ops.cached(pool_keys, slot, layer), ops.cached(pool_values, slot, layer)  # [KV, rows, D]
        np.testing.assert_allclose(k[:, start:], keys[first:first + n].transpose(1, 0, 2), atol=1e-6)
        np.testing.assert_array_equal(v[:, start:], heads[first:first + n, -n_kv:].transpose(1, 0, 2))
        blocks, rows = ops.cache_rows(slot, np.arange(start, start + n))
        pool_keys[blocks, layer, :, rows] = pool_values[blocks, layer, :, rows] = 0
    assert not pool_keys.any() and not pool_values.any()  # nothing else was written


def test_qkv_rope_kernel_refuses_shapes_that_do_not_fit():
    """The C side trusts its shapes, so the wrapper checks them: rows vs new tokens, and room in the table."""
    if not cpu_kernels.kernels_available():
        pytest.skip("no C compiler or neither AVX2 nor AVX-512 here: the NumPy path serves")
    cos = sin = np.zeros((64, 8), np.float32)
    pool, table = np.zeros((1, 1, 2, BLOCK_TOKENS, 16), np.float32), np.zeros(1, np.int32)  # one block of 1 layer
    qkv = randn(3, 8 * 16)  # 4 query heads, 2 KV heads of 16
    with pytest.raises(ValueError, match="qkv_rope"):
        cpu_kernels.qkv_rope(qkv, None, [CacheSlot(pool, pool, table, 2, 2)], 0, cos, sin)  # 3 rows, 2 new tokens
    with pytest.raises(ValueError, match="attention"):  # the step's caches are checked as attention's
        cpu_kernels.qkv_rope(qkv, None, [CacheSlot(pool, pool, table, 17, 3)], 0, cos, sin)  # rows 14..16 in one block
    with pytest.raises(ValueError, match="qkv_rope"):
        cpu_kernels.qkv_rope(qkv, None, [CacheSlot(pool, pool, table, 8, 3)], 1, cos, sin)  # no such layer
    assert cpu_kernels.qkv_rope(qkv, None, [CacheSlot(pool, pool, table, 8, 3)], 0, cos, sin).shape == (3, 4, 16)


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 37), (5, 5), (4, 300)])
def test_softmax_causal_matches_masked_torch_softmax(q_len, kv_len):
    scores = randn(3, q_len, kv_len) * 4
    offset = kv_len - q_len
    mask = torch.arange(kv_len)[None, :] > (offset + torch.arange(q_len))[:, None]
    expected = torch.softmax(torch.from_numpy(scores).masked_fill(mask, float("-inf")), dim=-1).numpy()
    np.testing.assert_allclose(ops.softmax_causal(scores.copy(), offset), expected, atol=1e-6)


def test_softmax_fully_masked_row_gives_zeros():
    scores = randn(2, 3, 4)
    out = ops.softmax_causal(scores, offset=-1)  # query 0 sees no key at all
    assert np.all(out[:, 0] == 0) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:, 1:].sum(-1), 1.0, rtol=1e-6)
    # a row the caller masked itself, where the causal mask hides nothing
    assert np.all(ops.softmax_causal(np.full((2, 1, 5), -np.inf, np.float32), offset=4) == 0)


@pytest.mark.parametrize("rows,inter", [(6, 40), (70, 1000)])
def test_swiglu_matches_llama_mlp_activation(kernels, rows, inter):
    gate_up = randn(rows, 2 * inter)
    gate_up[0, :4] = [-120.0, -90.0, 90.0, 120.0]  # past where exp over- or underflows
    gate, up = torch.from_numpy(gate_up).chunk(2, dim=-1)
    expected = (torch.nn.functional.silu(gate) * up).numpy()
    np.testing.assert_allclose(CpuBackend.swiglu(gate_up), expected, atol=1e-6)
    np.testing.assert_allclose(ops.swiglu(gate_up), expected, atol=1e-6)


def test_matmul_transb_alpha_beta(kernels):
    a, b, c = randn(5, 12), randn(7, 12), randn(5, 7)
    expected = 0.5 * np.einsum("mk,nk->mn", a.astype(np.float64), b) + 2.0 * c
    for matmul in (CpuBackend.matmul_transb, ops.matmul_transb):
        np.testing.assert_allclose(matmul(a, b, alpha=0.5, beta=2.0, c=c.copy()), expected, atol=1e-5)
        np.testing.assert_allclose(matmul(a, b), a.astype(np.float64) @ b.T, atol=1e-5)
        np.testing.assert_allclose(matmul(a, b, beta=1.0, c=c.copy()), a.astype(np.float64) @ b.T + c, atol=1e-5)


@pytest.mark.parametrize("n_heads,n_kv,q_len,kv_len", [(9, 3, 1, 37), (4, 4, 6, 6), (8, 2, 3, 300), (9, 3, 300, 300), (4, 2, 200, 250)])
def test_attention_matches_hf_eager_attention(n_heads, n_kv, q_len, kv_len):
    head_dim = 16
    q, k, v = randn(q_len, n_heads, head_dim), randn(n_kv, kv_len, head_dim), randn(n_kv, kv_len, head_dim)
    offset = kv_len - q_len
    mask = torch.zeros(q_len, kv_len).masked_fill(
        torch.arange(kv_len)[None, :] > (offset + torch.arange(q_len))[:, None], float("-inf"))
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = n_heads // n_kv, False
    expected, _ = hf.eager_attention_forward(
        module, torch.from_numpy(q).transpose(0, 1)[None], torch.from_numpy(k)[None], torch.from_numpy(v)[None],
        mask[None, None], scaling=head_dim ** -0.5)
    np.testing.assert_allclose(ops.attention(q, k, v, offset), expected[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 13, 16, 17, 40, 100])
@pytest.mark.parametrize("n,k", [(576, 576), (101, 70), (3, 16), (130, 5)])
def test_matmul_c_kernels(m, n, k):
    """kernels/cpu/matmul.c: up to 16 rows (in chunks of 8, odd weight rows, k not a multiple of
    16), and gemm.c: more (panels of 32 rows with a ragged last one, runs of 12 weight rows with a
    ragged last one), alone and added into a result. With AVX2 alone: the same in 8 lanes (chunks
    of 4; panels of 16, runs of 6)."""
    a, b, c = randn(m, k), randn(n, k), randn(m, n)
    expected = a.astype(np.float64) @ b.T
    if not cpu_kernels.kernels_available():
        pytest.skip("no C compiler, or neither AVX2 nor AVX-512, here: the NumPy path serves")
    np.testing.assert_allclose(cpu_kernels.matmul_transb(a, b), expected, atol=1e-4)
    added = c.copy()
    assert cpu_kernels.matmul_transb(a, b, add_to=added) is added
    np.testing.assert_allclose(added, c + expected, atol=1e-4)
    with pytest.raises(ValueError):  # a result of the wrong shape is refused, never written past
        cpu_kernels.matmul_transb(a, b, add_to=np.zeros((m, n + 1), np.float32))


def _forked_child_results(a, b, calls=3):
    """Exit codes of children forked now, each making `calls` kernel matmuls far enough apart for
    its workers to fall asleep in between (SIGALRM ends a child that hangs: code -14)."""
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        expected = a.astype(np.float64) @ b.T
        ok = True
        for _ in range(calls):
            ok &= np.allclose(cpu_kernels.matmul_transb(a, b), expected, atol=1e-4)
            time.sleep(0.01)
        os._exit(0 if ok else 1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_skinny_matmul_c_kernel_threads_survive_fork():
    """fork() keeps none of the kernel's worker threads: a child starts its own, and must not
    inherit the parent's sleeping workers as waiters nor a lock held by a call in flight."""
    if not cpu_kernels.kernels_available():
        pytest.skip("no C compiler or neither AVX2 nor AVX-512 here: the reference serves")
    a, b = randn(8, 64), randn(301, 64)
    cpu_kernels.matmul_transb(a, b)
    time.sleep(0.01)  # the parent's workers are asleep
    assert [_forked_child_results(a, b) for _ in range(5)] == [0] * 5
    big_a, big_b = randn(8, 576), randn(4096, 576)
    stop = threading.Event()

    def keep_busy():
        while not stop.is_set():
            cpu_kernels.matmul_transb(big_a, big_b)

    busy = threading.Thread(target=keep_busy)
    busy.start()  # forks while another thread is inside a matmul
    try:
        assert [_forked_child_results(a, b) for _ in range(5)] == [0] * 5
    finally:
        stop.set()
        busy.join()


def test_attention_kernel_refuses_caches_that_do_not_fit():
    """The C side trusts its shapes and block ids, so the wrapper checks them."""
    if not cpu_kernels.kernels_available():
        pytest.skip("no C compiler or neither AVX2 nor AVX-512 here: the model attends per sequence in NumPy")
    pool, q = randn(4, 2, 2, BLOCK_TOKENS, 16), randn(3, 4, 16)  # 4 blocks, 2 layers, 2 KV heads; 4 query heads

    def slot(table, rows, n_new, keys=pool, values=pool):
        return CacheSlot(keys, values, np.array(table, np.int32), rows, n_new)
    assert cpu_kernels.attention(q, [slot([3, 0], 20, 3)], 1).shape == q.shape
    for slots, layer in [([slot([3], 17, 3)], 0),                               # more rows than its blocks hold
                         ([slot([3], 2, 3)], 0),                                # more new tokens than rows
                         ([slot([4], 5, 3)], 0), ([slot([-1], 5, 3)], 0),       # no such block
                         ([slot([3], 5, 3)], 2),                                # no such layer
                         ([slot([3], 5, 3, values=randn(5, 2, 2, BLOCK_TOKENS, 16))], 0),  # k and v differ
                         ([slot([3], 5, 3, *(randn(4, 2, 3, BLOCK_TOKENS, 16),) * 2)], 0),  # 4 query heads on 3 KV
                         ([slot([3], 5, 3, *(randn(2, 2, 8, 16),) * 2)], 0),    # not a pool of blocks
                         ([slot([3], 5, 3, *(randn(4, 2, 2, 8, 16),) * 2)], 0),  # blocks of 8 tokens
                         ([slot([3], 5, 3, *(pool.astype(np.float64),) * 2)], 0),  # f64
                         ([slot([3], 5, 2), slot([1], 5, 1, keys=pool.copy())], 0)]:  # two pools in one step
        with pytest.raises(ValueError, match="attention"):
            cpu_kernels.attention(q, slots, layer)


@pytest.mark.parametrize("environment", [{"CC": "cc -mno-avx2"}, {"CC": "no-such-compiler"}, {"PYLLM_CPU_KERNELS": "0"}])
def test_without_the_c_kernels_the_numpy_path_serves(tmp_path, environment):
    """Built without AVX2 (the sources compile to nothing), no compiler, or turned off."""
    script = ("import numpy as np\n"
              "from pyllm.backends import cpu_kernels\n"
              "from pyllm.backends.cpu import CpuBackend\n"
              "a, b = np.ones((4, 64), np.float32), np.ones((100, 64), np.float32)\n"
              "assert not cpu_kernels.avx512_available() and not cpu_kernels.kernels_available()\n"
              "pool, table = np.ones((1, 1, 1, 16, 16), np.float32), np.zeros(1, np.int32)\n"
              "assert cpu_kernels.attention(np.ones((1, 2, 16), np.float32), [(pool, pool, table, 1, 1)], 0) is None\n"
              "assert cpu_kernels.rms_norm(a, a[0], 1e-5) is None and cpu_kernels.swiglu(a) is None\n"
              "assert (CpuBackend.matmul_transb(a, b) == 64).all()\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), **environment}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_with_avx2_alone_a_decode_step_has_its_kernels(tmp_path):
    """Built without AVX-512 (AVX2 alone, as on Zen 1-3): a step's kernels and the prompt GEMM in 8
    lanes, but not the AVX-512 quantized kernels."""
    script = ("import numpy as np\n"
              "from pyllm.backends import cpu_kernels, cpu_quant\n"
              "from pyllm.backends.cpu import CpuBackend\n"
              "assert not cpu_kernels.avx512_available() and cpu_kernels.kernels_available()\n"
              "assert not cpu_quant.available()\n"
              "a, b = np.ones((4, 64), np.float32), np.ones((100, 64), np.float32)\n"
              "assert (cpu_kernels.matmul_transb(a, b) == 64).all() and cpu_kernels.swiglu(a).shape == (4, 32)\n"
              "assert (cpu_kernels.matmul_transb(np.ones((17, 64), np.float32), b) == 64).all()\n"
              "assert (CpuBackend.matmul_transb(np.ones((17, 64), np.float32), b) == 64).all()\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "CC": "cc -mno-avx512f"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
