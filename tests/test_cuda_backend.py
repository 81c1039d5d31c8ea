"""The whole CUDA backend against the NumPy backend on tiny random models.

Runs through cuda-emu (the kernels executed on the CPU with CUDA semantics) and, where there is a
GPU, through CuPy (skipped otherwise): f32 logits within 1e-4 with identical greedy tokens, f16
and bf16 logits within 2% of the logit range, at most 10 launches per decoder layer in a decode
step, only ids and the block tables up and logits down per step, and on the story model
(../shared) teacher-forced argmax agreement of f16 and bf16 with f32.
"""

from types import SimpleNamespace

import numpy as np
import pytest

import pyllm
from conftest import SHARED, TINY_VARIANTS, make_tiny_model, needs_shared
from pyllm.backends.cuda_backend import CudaBackend
from pyllm.backends.cuda_device import CupyDevice, EmuDevice
from pyllm.errors import PyllmError
from pyllm.model import decode, prefill

PROMPT = [0, 17, 250, 3, 99, 42, 42, 7, 180, 33, 5, 260]


def gpu_problem() -> str | None:
    try:
        CupyDevice()
    except PyllmError as exc:
        return str(exc)
    return None


@pytest.fixture(params=["cuda-emu", "cuda"])
def backend(request):
    if request.param == "cuda" and gpu_problem():
        pytest.skip(f"no GPU for the CuPy run: {gpu_problem()}")
    return request.param


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny(request, tmp_path_factory):
    """(model dir, the NumPy backend's LLM) for each tiny architecture variant."""
    model_dir = tmp_path_factory.mktemp(request.param)
    make_tiny_model(model_dir, request.param)
    return str(model_dir), pyllm.LLM(str(model_dir), show_progress=False)


def decode_logits(llm, steps=8):
    """Prefill PROMPT, then greedy decode steps -> logits of every step [steps + 1, vocab]."""
    cache = llm.model.new_cache()
    rows = [prefill(llm.model, cache, PROMPT)]
    for _ in range(steps):
        rows.append(decode(llm.model, [cache], [int(np.argmax(rows[-1]))])[0])
    return np.stack(rows)


def test_f32_logits_and_greedy_tokens_match_numpy(tiny, backend):
    model_dir, cpu = tiny
    llm = pyllm.LLM(model_dir, backend=backend, dtype="f32", show_progress=False)
    np.testing.assert_allclose(llm.score(PROMPT), cpu.score(PROMPT), atol=1e-4, rtol=0)
    np.testing.assert_allclose(decode_logits(llm), decode_logits(cpu), atol=1e-4, rtol=0)
    greedy = dict(max_tokens=24, temperature=0, ignore_eos=True)
    assert llm.generate(PROMPT, **greedy).token_ids == cpu.generate(PROMPT, **greedy).token_ids


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_logits_within_2_percent_of_range(tiny, backend, dtype):
    model_dir, cpu = tiny
    llm = pyllm.LLM(model_dir, backend=backend, dtype=dtype, show_progress=False)
    for ours, reference in [(llm.score(PROMPT), cpu.score(PROMPT)), (decode_logits(llm), decode_logits(cpu))]:
        spread = reference.max(axis=-1) - reference.min(axis=-1)  # [positions]
        assert (np.abs(ours - reference).max(axis=-1) <= 0.02 * spread).all()


def test_ragged_batch_equals_one_at_a_time(tiny_model, backend):
    llm = pyllm.LLM(str(tiny_model[0]), backend=backend, dtype="f32", show_progress=False)
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3]]
    singles = [llm.generate(p, max_tokens=8, ignore_eos=True).token_ids for p in prompts]
    assert [o.token_ids for o in llm.generate(prompts, max_tokens=8, ignore_eos=True)] == singles
    batch_logits = llm.model.forward([(llm.model.new_cache(), p) for p in prompts])
    for prompt, row in zip(prompts, batch_logits):  # cuBLAS may order a batch's sums its own way
        np.testing.assert_allclose(row, llm.score(prompt)[-1], atol=1e-5 if backend == "cuda-emu" else 1e-4)


def decode_step_launches(model_dir, backend, batch):
    llm = pyllm.LLM(str(model_dir), backend=backend, show_progress=False)
    caches = [llm.model.new_cache() for _ in range(batch)]
    for i, cache in enumerate(caches):
        prefill(llm.model, cache, PROMPT[i % 3:])
    before = llm.backend.launches
    decode(llm.model, caches, [5] * batch)
    return llm.backend.launches - before


@pytest.mark.parametrize("batch", [1, 8])
def test_at_most_10_launches_per_decoder_layer_in_a_decode_step(tmp_path, backend, batch):
    """Two models that differ only in depth: the extra launches are the extra layers', the same
    for one sequence and for eight (rope and attention take the whole step in one launch each)."""
    counts = {}
    for layers in (2, 4):
        make_tiny_model(tmp_path / str(layers), num_hidden_layers=layers)
        counts[layers] = decode_step_launches(tmp_path / str(layers), backend, batch)
    per_layer = (counts[4] - counts[2]) / 2
    assert per_layer == 9  # rms_norm, qkv gemm, rope+cache write, attention, o gemm (+ residual),
    #                        rms_norm, gate|up gemm, swiglu, down gemm (+ residual)
    assert counts[2] - 2 * per_layer == 3  # embedding gather, final rms_norm, lm_head gemm


def test_decode_step_sends_ids_and_block_tables_up_and_logits_down_only(tiny_model, backend, monkeypatch):
    """The one upload beyond the ids is the step's tokens (position, where its table starts) and
    block tables (int32, all sequences' together), made at the first layer and reused by every
    layer after it: the model has two."""
    llm = pyllm.LLM(str(tiny_model[0]), backend=backend, show_progress=False)
    caches = [llm.model.new_cache() for _ in range(2)]
    for cache in caches:  # the pool's first blocks hold both: no growth on the device in the step
        prefill(llm.model, cache, PROMPT)
    calls = []
    for name in ("upload", "upload_ids", "zeros", "to_host"):
        original = getattr(llm.backend, name)
        monkeypatch.setattr(llm.backend, name, lambda *a, _f=original, _n=name: calls.append((_n, *a)) or _f(*a))
    logits = decode(llm.model, caches, [5, 6])
    assert [call[0] for call in calls] == ["upload_ids", "upload", "to_host"]
    upload = calls[1][1]
    positions = len(PROMPT)  # each sequence's new token
    assert upload.dtype == np.int32 and list(upload[:4]) == [positions, 0, positions, len(caches[0].blocks)]
    assert list(upload[4:]) == caches[0].blocks + caches[1].blocks
    assert logits.shape == (2, llm.config.vocab_size) and llm.config.num_layers == 2


def test_dtype_defaults_to_the_checkpoint_dtype(tmp_path):
    make_tiny_model(tmp_path, dtype="bfloat16")
    llm = pyllm.LLM(str(tmp_path), backend="cuda-emu", show_progress=False)
    assert llm.backend.dtype == "bf16" and llm.model.weights.embed.dtype == np.uint16


def test_cuda_without_a_gpu_stops_with_one_clear_line(tiny_model):
    if not gpu_problem():
        pytest.skip("a GPU is available here")
    with pytest.raises(PyllmError) as info:
        pyllm.LLM(str(tiny_model[0]), backend="cuda", show_progress=False)
    message = str(info.value)
    assert "\n" not in message and any(word in message for word in ("CuPy", "GPU", "driver"))


@pytest.fixture
def bench():
    """benchmarks/ is not installed; pytest's pythonpath makes it importable from the repo root."""
    from pyllm.benchmarks import dtype_agreement, kernel_bench
    return SimpleNamespace(dtype_agreement=dtype_agreement, kernel_bench=kernel_bench)


@needs_shared
def test_story_model_16_bit_argmax_agrees_with_f32(bench):
    """Teacher-forced over 256 tokens of a story through cuda-emu (a few seconds)."""
    result = bench.dtype_agreement.argmax_agreement(SHARED / "models" / "story", backend="cuda-emu")
    assert result["positions"] == 256
    assert result["f16"] >= 0.97 and result["bf16"] >= 0.95, result


def test_kernel_bench_refuses_the_emulator_and_its_cases_run_there(bench):
    with pytest.raises(SystemExit, match="cuda-emu"):
        bench.kernel_bench.kernel_bandwidth("cuda-emu")
    config = SimpleNamespace(rope_theta=10000.0, head_dim=128, max_position_embeddings=4, dtype="bf16")
    be = CudaBackend(config, "bf16", EmuDevice())
    for name, _, nbytes, run in bench.kernel_bench.cases(be, rows=4):  # 4 rows of 8192: shapes only
        assert np.isfinite(be.to_host(run())).all() and nbytes > 0, name
