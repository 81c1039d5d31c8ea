"""Whole-model parity with transformers (eager attention, f32) on random tiny models."""

import numpy as np
import pytest
import torch

import pyllm
from pyllm.backends import cpu_kernels
from pyllm.model import decode, prefill
from conftest import TINY_VARIANTS, hf_logits, make_tiny_model

PROMPT = [0, 17, 250, 3, 99, 42, 42, 7, 180, 33, 5, 260]


@pytest.fixture(scope="module", params=[(name, backend) for name in sorted(TINY_VARIANTS) for backend in ("cpu", "reference")],
                ids=lambda param: "-".join(param))
def variant(request, tmp_path_factory):
    """A tiny model and its transformers reference, run through the CPU backend's C kernels (where
    they build) or through the reference backend: NumPy alone."""
    name, backend = request.param
    if backend == "cpu" and not cpu_kernels.kernels_available():
        pytest.skip("no C compiler or neither AVX2 nor AVX-512 here: the CPU backend would be the reference")
    model_dir = tmp_path_factory.mktemp(name)
    reference = make_tiny_model(model_dir, name)
    return pyllm.LLM(str(model_dir), backend=backend, show_progress=False), reference


def test_prefill_logits_match(variant):
    llm, reference = variant
    ours = llm.score(PROMPT)
    np.testing.assert_allclose(ours, hf_logits(reference, PROMPT), atol=1e-4, rtol=0)


def test_decode_logits_match_over_16_steps(variant):
    llm, reference = variant
    cache = llm.model.new_cache()
    logits = prefill(llm.model, cache, PROMPT)
    ids = list(PROMPT)
    for step in range(16):
        next_id = int(np.argmax(logits))
        ids.append(next_id)
        logits = decode(llm.model, [cache], [next_id])[0]
        np.testing.assert_allclose(logits, hf_logits(reference, ids)[-1], atol=1e-4, rtol=0,
                                   err_msg=f"decode step {step}")


def test_greedy_tokens_match_generate(variant):
    llm, reference = variant
    with torch.no_grad():
        expected = reference.generate(torch.tensor([PROMPT]), max_new_tokens=32, min_new_tokens=32,
                                      do_sample=False, pad_token_id=1)[0, len(PROMPT):].tolist()
    ours = llm.generate(PROMPT, max_tokens=32, temperature=0, ignore_eos=True).token_ids
    assert len(set(expected)) > 3, "a degenerate reference would not test much"
    assert ours == expected


def test_batched_forward_equals_one_at_a_time(tiny_llm):
    """Ragged batch: different prompt lengths, then decode steps with sequences at different positions."""
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5, 4, 3]]
    singles = [tiny_llm.generate(p, max_tokens=12, ignore_eos=True).token_ids for p in prompts]
    batched = [o.token_ids for o in tiny_llm.generate(prompts, max_tokens=12, ignore_eos=True)]
    assert batched == singles
    model = tiny_llm.model
    caches = [model.new_cache() for _ in prompts]
    batch_logits = model.forward(list(zip(caches, prompts)))
    for prompt, row in zip(prompts, batch_logits):
        np.testing.assert_allclose(row, tiny_llm.score(prompt)[-1], atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_as_f32(tmp_path, dtype):
    reference = make_tiny_model(tmp_path, "llama-gqa-untied", dtype=dtype)  # reloaded in f32 by transformers
    llm = pyllm.LLM(str(tmp_path), show_progress=False)
    assert llm.config.dtype == {"bfloat16": "bf16", "float16": "f16"}[dtype]
    np.testing.assert_allclose(llm.score(PROMPT), hf_logits(reference, PROMPT), atol=1e-4, rtol=0)


def test_sharded_checkpoint(tmp_path):
    reference = make_tiny_model(tmp_path / "whole", "qwen2-bias")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((tmp_path / "whole" / name).read_bytes())
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    llm = pyllm.LLM(str(tmp_path / "sharded"), show_progress=False)
    np.testing.assert_allclose(llm.score(PROMPT), hf_logits(reference, PROMPT), atol=1e-4, rtol=0)
