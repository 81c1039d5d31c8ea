"""Sampling: the logit processors against transformers' own, sampling frequencies, seeds, and the
finish conditions (max_tokens, eos lists, ignore_eos) through the engine."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import pyllm
from conftest import hf_logits
from pyllm import PyllmError, SamplingParams
from pyllm.sampling import probabilities, sample

CASES = {
    "temperature": dict(temperature=0.7),
    "hot": dict(temperature=1.8),
    "top_k": dict(temperature=1.0, top_k=7),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "top_p_tiny": dict(temperature=1.0, top_p=0.01),
    "top_p_extreme": dict(temperature=1.0, top_p=1e-20),  # 1 - top_p rounds to 1: the best token must stay
    "min_p": dict(temperature=1.0, min_p=0.1),
    "penalty": dict(temperature=1.0, repetition_penalty=1.5),
    "all": dict(temperature=0.8, top_k=40, top_p=0.85, min_p=0.05, repetition_penalty=1.2),
    "top_k_then_p": dict(temperature=1.3, top_k=12, top_p=0.6),
}


def hf_processors(params: SamplingParams) -> LogitsProcessorList:
    """The processors transformers' generate() builds for these settings, in its order."""
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p))
    if params.min_p:
        procs.append(MinPLogitsWarper(params.min_p))
    return procs


def hf_probabilities(logits, params, seen_ids) -> np.ndarray:
    scores = hf_processors(params)(torch.tensor([seen_ids]), torch.tensor(logits)[None].clone())
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


def random_case(rng, vocab):
    """Logits with a realistic spread (some peaked, some flat) and a history of seen tokens."""
    logits = (rng.standard_normal(vocab) * rng.uniform(0.5, 4.0)).astype(np.float32)
    seen = rng.choice(vocab, size=rng.integers(1, 30)).tolist()
    return logits, seen


@pytest.mark.parametrize("name", CASES)
def test_processors_match_transformers(name):
    params = SamplingParams(**CASES[name])
    rng = np.random.default_rng(list(CASES).index(name))
    for vocab in (50, 1000, 4096):
        for _ in range(8):
            logits, seen = random_case(rng, vocab)
            ours = probabilities(logits, params, seen)
            theirs = hf_probabilities(logits, params, seen)
            assert np.array_equal(ours > 0, theirs > 0), f"{name}: different tokens kept"
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)


def test_filters_actually_filter():
    """Guards the comparison above: these settings must remove tokens, and a different amount each."""
    logits, seen = random_case(np.random.default_rng(7), 1000)
    kept = {name: int((probabilities(logits, SamplingParams(**CASES[name]), seen) > 0).sum())
            for name in ("top_k", "top_p", "top_p_tiny", "top_p_extreme", "min_p", "all")}
    assert kept["top_k"] == 7 and kept["top_p_tiny"] == kept["top_p_extreme"] == 1
    assert all(1 <= n < 1000 for n in kept.values())


def test_greedy_is_argmax_after_repetition_penalty():
    rng = np.random.default_rng(3)
    for _ in range(20):
        logits, seen = random_case(rng, 300)
        params = SamplingParams(temperature=0.0, repetition_penalty=1.7)
        scores = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([seen]), torch.tensor(logits)[None].clone())
        expected = int(scores.argmax())
        assert sample(logits, params, np.random.default_rng(0), seen) == expected
        assert sample(logits, params, np.random.default_rng(99), seen) == expected


def chi2_critical(df: int, z: float = 3.29) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.29: p ~ 0.0005)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("name", ["temperature", "top_k_then_p", "all"])
def test_sampling_frequencies_follow_transformers_distribution(name):
    params = SamplingParams(**CASES[name], seed=1234)
    logits = np.array([2.0, 1.6, 1.5, 0.9, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, 1.1, 0.7], dtype=np.float32)
    seen = [0, 3]
    expected = hf_probabilities(logits, params, seen)
    rng, n = params.new_generator(), 20000
    counts = np.bincount([sample(logits, params, rng, seen) for _ in range(n)], minlength=logits.size)
    assert np.all(counts[expected == 0] == 0), "sampled a token transformers filters out"
    kept = expected > 0
    assert kept.sum() >= 3
    chi2 = float((((counts[kept] - n * expected[kept]) ** 2) / (n * expected[kept])).sum())
    assert chi2 < chi2_critical(int(kept.sum()) - 1), f"chi2 {chi2:.1f}: frequencies do not match"


# ---- through the engine: seeds, max_tokens, eos ---------------------------------------------

def test_same_seed_same_tokens_different_seeds_differ(tiny_llm):
    kwargs = dict(max_tokens=24, temperature=1.0, top_p=0.95, ignore_eos=True)
    first = tiny_llm.generate("Once upon", seed=11, **kwargs)
    again = tiny_llm.generate("Once upon", seed=11, **kwargs)
    others = [tiny_llm.generate("Once upon", seed=s, **kwargs).token_ids for s in (12, 13)]
    assert first.token_ids == again.token_ids and first.text == again.text
    assert all(ids != first.token_ids for ids in others)
    batched = tiny_llm.generate(["Once upon", "Once upon"], seed=11, **kwargs)
    assert [o.token_ids for o in batched] == [first.token_ids] * 2  # one generator per sequence


def test_max_tokens_and_ignore_eos(tiny_llm):
    out = tiny_llm.generate("Hi", max_tokens=9, temperature=1.0, seed=0, ignore_eos=True)
    assert len(out.token_ids) == 9 and out.finish_reason == "length"


@pytest.fixture(scope="module")
def greedy_reference(tiny_model, tiny_llm):
    """transformers' greedy continuation of a prompt, eos or not: 16 argmax steps."""
    prompt_ids = tiny_llm.encode_prompt("The cat sat on")
    ids = list(prompt_ids)
    for _ in range(16):
        ids.append(int(hf_logits(tiny_model[1], ids)[-1].argmax()))
    return prompt_ids, ids[len(prompt_ids):]


def test_ignore_eos_matches_transformers_greedy(tiny_llm, greedy_reference):
    prompt_ids, reference = greedy_reference
    out = tiny_llm.generate(prompt_ids, max_tokens=16, ignore_eos=True)
    assert out.token_ids == reference


def test_stops_on_any_eos_id_of_a_list(tmp_path, tiny_model, greedy_reference):
    """generation_config.json lists two eos ids; generation stops at the first one that appears."""
    prompt_ids, reference = greedy_reference
    stop_at = 5
    eos = reference[stop_at]
    first = reference.index(eos)  # the token may already occur earlier
    model_dir = tmp_path / "eos-list"
    shutil.copytree(tiny_model[0], model_dir)
    never = next(t for t in range(2, 300) if t not in reference)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [never, eos]}))
    llm = pyllm.LLM(str(model_dir), show_progress=False)
    out = llm.generate(prompt_ids, max_tokens=16)
    assert out.finish_reason == "stop"
    assert out.token_ids == reference[:first + 1]
    assert out.text == llm.tokenizer.decode(reference[:first])  # the eos token adds no text
    assert llm.generate(prompt_ids, max_tokens=16, ignore_eos=True).token_ids == reference


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(temperature=float("nan")), dict(temperature="0.5"),
    dict(top_k=-1), dict(top_k=2.5), dict(top_p=0), dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=2),
    dict(repetition_penalty=0), dict(max_tokens=0), dict(max_tokens=3.0), dict(seed=-1), dict(seed="x"),
    dict(stop=[""]), dict(stop=[3]),
])
def test_invalid_params_raise_one_line_pyllm_error(bad):
    with pytest.raises(PyllmError) as info:
        SamplingParams(**bad)
    message = str(info.value)
    assert message and "\n" not in message
    assert next(iter(bad)) in message  # names the offending field


def test_invalid_params_through_generate(tiny_llm):
    with pytest.raises(PyllmError, match="temperature"):
        tiny_llm.generate("Hi", temperature=-0.5)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="END").stop == ["END"]


@pytest.mark.parametrize("settings", [dict(temperature=1e-308), dict(temperature=1.0, repetition_penalty=1e-300)])
def test_extreme_but_valid_settings_still_sample_the_top_token(settings):
    """Overflowing scores must not turn into NaN probabilities (which would fail a whole batch)."""
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    seen = [0] if "repetition_penalty" in settings else []  # 1 / 1e-300: token 0's logit overflows f32
    expected = 0 if seen else 1
    token = sample(logits, SamplingParams(seed=0, **settings), np.random.default_rng(0), seen)
    assert token == expected


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_nan_logits_do_not_raise_and_are_never_picked(temperature):
    logits = np.array([np.nan, 1.0, np.nan], np.float32)
    assert sample(logits, SamplingParams(temperature=temperature, seed=0), np.random.default_rng(0)) == 1
