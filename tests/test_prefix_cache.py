"""Prefix caching and preemption over the KV pool, through LLM.generate (the server's scheduler
drives the same LLM.step): a shared prefix is prefilled once and held once, copy-free; the key
chains a block to everything before it and to the salt; a pool too small for the batch preempts
and recomputes, and every output equals its run alone on a roomy pool."""

import numpy as np
import pytest

import pyllm
from conftest import make_tiny_model
from pyllm.backends.base import BLOCK_TOKENS
from pyllm.kv_blocks import BlockPool

GREEDY = dict(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("prefix") / "model"
    make_tiny_model(model_dir, max_position_embeddings=2048)
    return pyllm.LLM(str(model_dir), show_progress=False)


@pytest.fixture
def pool(llm):
    """A fresh pool for each test, so nothing is cached from before."""
    llm.model.pool = BlockPool(llm.backend, llm.config, 512)
    return llm.model.pool


def tokens(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(2, 250, n)]


def count_fed(llm, monkeypatch) -> list:
    """Tokens fed per forward step, per sequence."""
    fed, forward = [], llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda batch, **kw: fed.append([len(ids) for _, ids in batch])
                        or forward(batch, **kw))
    return fed


def test_sixteen_prompts_sharing_600_tokens_prefill_them_once_and_hold_them_once(llm, pool, monkeypatch):
    system = tokens(0, 600)
    prompts = [system + tokens(100 + i, 5) for i in range(16)]
    alone = [llm.generate(p, **GREEDY).token_ids for p in prompts]
    llm.model.pool = pool = BlockPool(llm.backend, llm.config, 512)
    fed = count_fed(llm, monkeypatch)
    outs = llm.generate(prompts, **GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert outs[0].stats["cached_tokens"] == 0
    assert all(o.stats["cached_tokens"] >= 592 for o in outs[1:])
    prefilled = sum(sum(step) for step in fed) - 16 * (GREEDY["max_tokens"] - 1)
    assert prefilled == 605 + 15 * (605 - 592)  # the first prompt whole, then each one's rest past the 37 blocks
    assert pool.copies == 0
    # held once: 37 shared blocks, and per prompt its last partial block and the answer's tokens
    assert pool.stats()["blocks_used"] == 0 and pool.stats()["blocks_cached"] >= 37


def test_eight_forks_of_a_1000_token_prefix_copy_no_kv(llm, pool):
    prefix = tokens(1, 1000)
    first = llm.generate(prefix + [7], **GREEDY)
    assert first.stats["cached_tokens"] == 0
    outs = llm.generate([prefix + [8 + i] for i in range(8)], **GREEDY)
    assert all(o.stats["cached_tokens"] == 992 for o in outs)  # 62 whole blocks of the 1000
    assert pool.copies == 0


def test_n_choices_share_the_prompt_blocks(llm, pool):
    seq = llm.new_sequence(tokens(2, 40), pyllm.SamplingParams(max_tokens=3, temperature=1.0, seed=1))
    seq.extra_choices = 3
    events = list(llm.step([seq]))
    siblings = [s for s, _ in events if s is not seq]
    assert len(siblings) == 3 and all(s.cache.blocks[:2] == seq.cache.blocks[:2] for s in siblings)
    assert [pool.refs[b] for b in seq.cache.blocks[:3]] == [4, 4, 4]  # the partial third: shared until written
    for s in [seq, *siblings]:
        s.cache.release()


def test_a_block_is_shared_only_after_the_same_prefix_and_salt(llm, pool):
    head, block = tokens(3, BLOCK_TOKENS), tokens(4, BLOCK_TOKENS)
    llm.generate(head + block + [9], **GREEDY)
    assert llm.new_sequence(head + block + [5], pyllm.SamplingParams(**GREEDY)).cached_tokens == 32
    assert llm.new_sequence(tokens(5, BLOCK_TOKENS) + block + [5], pyllm.SamplingParams(**GREEDY)).cached_tokens == 0
    salted = llm.new_sequence(head + block + [5], pyllm.SamplingParams(**GREEDY), salt="tenant-b")
    assert salted.cached_tokens == 0


def test_a_pool_too_small_for_the_batch_preempts_and_changes_no_output(llm, pool):
    prompts = [tokens(10 + i, 30 + 7 * i) for i in range(6)]
    params = dict(max_tokens=40, ignore_eos=True)
    roomy = [o.token_ids for o in llm.generate(prompts, **params)]
    llm.model.pool = small = BlockPool(llm.backend, llm.config, 12)  # 192 tokens for ~6 x 90
    outs = llm.generate(prompts, **params)
    assert [o.token_ids for o in outs] == roomy
    assert small.preemptions > 0 and small.stats()["blocks_used"] == 0
