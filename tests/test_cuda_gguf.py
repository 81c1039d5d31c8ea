"""Whole GGUF models in their own formats through the CUDA backend on cuda-emu, against the
reference backend on the same file.

The tiny random llamas of test_gguf_model.py: every block format (q4_0's embedding tied, so the
vocabulary projection reads the quantized table), the Q4_K_M-like mix (q | k | v and gate | up in
different formats) and float formats with q, k, v unfused. Over a text the reference samples: the
prompt (dequantized strips through cuBLAS), and teacher-forced decode of one sequence and of three
at once (the quantized GEMV), held to the CPU kernels' bounds (argmax agreement >= 99%,
perplexity within 0.5%) and, since the kernels decode the weights to f32 exactly as the reference
does, to its logits within 1e-4 of their range. The same for the story model as llama.cpp wrote it
in q8_0, q4_0 and q4_1 (../shared). Also: f16 and bf16 runs within 2% of the logit
range, a quantized decode step launches as many kernels per layer as an f32 one, and the shipped
SmolLM2 Q4_1 file scores a prompt as the reference does.
"""

import numpy as np
import pytest

import pyllm
from pyllm.benchmarks.quant_bench import QUALITY_TEXT, decode_teacher_forced, perplexity
from pyllm.model import decode, prefill
from conftest import needs_shared
from test_gguf import LAYERS
from test_gguf_model import STORY_GGUF, VARIANTS, smollm2_gguf, write_tiny_gguf  # noqa: F401 (a fixture)

TEXT_TOKENS = 16  # decoded one sequence at a time; the batch of three decodes the first BATCH_TOKENS
BATCH_TOKENS = 8
STORY_TOKENS = 24  # of the story model's quality text
# q | k | v in 3 parts and gate | up in 2 (Q4_K_M-like), gate | up in 2 (floats-unfused, whose 16-bit
# q, k, v stack into one matrix on upload); every other variant 9, as test_cuda_backend.py's f32 count
LAUNCHES_PER_LAYER = {"q4_k_m-like": 12, "floats-unfused": 10}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny_gguf(request, tmp_path_factory):
    """(variant, the reference's LLM, cuda-emu's LLM in f32) on one tiny GGUF file."""
    path = str(write_tiny_gguf(tmp_path_factory.mktemp(request.param), request.param))
    return (request.param, pyllm.LLM(path, backend="reference", show_progress=False),
            pyllm.LLM(path, backend="cuda-emu", dtype="f32", show_progress=False))


def check_against_the_reference(reference, emu, ids):
    """cuda-emu's prompt logits and its teacher-forced decode (one sequence over ids, three at once
    over the first BATCH_TOKENS) against the reference's logits of ids."""
    expected = reference.score(ids)  # [len(ids), vocab]
    tolerance = 1e-4 * (expected.max() - expected.min())
    np.testing.assert_allclose(emu.score(ids), expected, atol=tolerance, rtol=0)
    for copies, n in ((1, len(ids)), (3, BATCH_TOKENS)):
        ours = decode_teacher_forced(emu, ids[:n], copies)
        assert (ours.argmax(-1) == expected[:n].argmax(-1)).mean() >= 0.99, copies
        assert abs(perplexity(ours, ids[:n]) / perplexity(expected[:n], ids[:n]) - 1) <= 0.005, copies
        np.testing.assert_allclose(ours, expected[:n], atol=tolerance, rtol=0)


def test_gguf_models_through_cuda_emu_match_the_reference(tiny_gguf):
    _, reference, emu = tiny_gguf
    prompt = [1, 5, 40]
    sampled = reference.generate(prompt, max_tokens=TEXT_TOKENS - 3, temperature=1.0, seed=0, ignore_eos=True)
    check_against_the_reference(reference, emu, prompt + sampled.token_ids)


@needs_shared
@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1"])
def test_story_model_written_by_llama_cpp_through_cuda_emu(name):
    """The story model as llama.cpp quantized it (../shared; its tied embedding in the file's format)."""
    path = str(STORY_GGUF / f"story-{name}.gguf")
    reference = pyllm.LLM(path, backend="reference", show_progress=False)
    emu = pyllm.LLM(path, backend="cuda-emu", dtype="f32", show_progress=False)
    check_against_the_reference(reference, emu, reference.tokenizer.encode(QUALITY_TEXT.read_text())[:STORY_TOKENS])


@pytest.mark.parametrize("quantize", ["q8_0", "q4_1", "bf16"])
def test_a_safetensors_model_quantized_while_loading_runs_on_cuda_emu(tiny_model, quantize):
    """--quantize (the CPU's options) on the CUDA backend: the same blocks as the reference's."""
    path = str(tiny_model[0])
    reference = pyllm.LLM(path, backend="reference", quantize=quantize, show_progress=False)
    emu = pyllm.LLM(path, backend="cuda-emu", dtype="f32", quantize=quantize, show_progress=False)
    prompt = [1, 5, 40]
    check_against_the_reference(reference, emu, prompt + reference.generate(prompt, max_tokens=9, ignore_eos=True).token_ids)


def test_a_quantized_decode_step_launches_what_an_f32_one_does(tiny_gguf, monkeypatch):
    variant, _, emu = tiny_gguf
    monkeypatch.setattr(emu.backend, "use_graphs", False)  # every launch from Python, counted
    cache = emu.model.new_cache()
    prefill(emu.model, cache, [1, 5, 40, 77])
    before = emu.backend.launches
    decode(emu.model, [cache], [9])
    per_layer = LAUNCHES_PER_LAYER.get(variant, 9)
    assert emu.backend.launches - before == 3 + LAYERS * per_layer  # + embedding lookup, final norm, vocab GEMV


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_16_bit_runs_within_2_percent_of_the_logit_range(tmp_path, dtype):
    """The Q4_K_M-like mix in 16 bits (test_cuda_backend.py's bound): the prompt, then 4 decode steps."""
    path = str(write_tiny_gguf(tmp_path, "q4_k_m-like"))
    ids = [1, 5, 40, 77, 200, 290, 3, 9, 120, 260, 2, 17]
    expected = pyllm.LLM(path, backend="reference", show_progress=False).score(ids)
    emu = pyllm.LLM(path, backend="cuda-emu", dtype=dtype, show_progress=False)
    for ours in (emu.score(ids), decode_teacher_forced(emu, ids[:4])):
        spread = expected[:len(ours)].max(-1) - expected[:len(ours)].min(-1)  # [positions]
        assert (np.abs(ours - expected[:len(ours)]).max(-1) <= 0.02 * spread).all()


def test_smollm2_q4_1_through_cuda_emu_scores_as_the_reference(smollm2_gguf):
    """The shipped file (q4_1 layers, its tied embedding in q8_0): a 5-token prompt's logits (every
    matmul the GEMV, the vocabulary projection on the quantized embedding) within 1e-4 of their range."""
    emu = pyllm.LLM(str(smollm2_gguf), backend="cuda-emu", show_progress=False)
    weights = emu.model.weights
    assert type(weights.embed).__name__ == "DeviceBlocks" and weights.lm_head is weights.embed
    prompt = emu.encode_prompt("The capital of France is")
    expected = pyllm.LLM(str(smollm2_gguf), backend="reference", show_progress=False).score(prompt)
    ours = emu.score(prompt)
    np.testing.assert_allclose(ours, expected, atol=1e-4 * (expected.max() - expected.min()), rtol=0)
    assert (ours.argmax(-1) == expected.argmax(-1)).all()
