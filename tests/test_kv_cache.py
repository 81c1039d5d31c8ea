"""KV caches: one that may fill the whole context window is allocated as tokens arrive (a GPU
commits memory when it is allocated), and growing it keeps every cached token: decoding token by
token through a growing cache gives the logits of scoring the whole text at once."""

import numpy as np
import pytest

import pyllm
from pyllm.model import decode, prefill

TEXT = [0, 17, 250, 3, 99, 42, 42, 7, 180, 33, 5, 260, 8, 90, 61, 2] * 3  # 48 tokens


@pytest.fixture(params=["cpu", "cuda-emu"])
def llm(request, tiny_model):
    return pyllm.LLM(str(tiny_model[0]), backend=request.param, dtype="f32", show_progress=False)


def test_a_context_window_cache_starts_empty_and_a_sized_one_whole(llm):
    window = llm.config.max_position_embeddings
    cache = llm.model.new_cache()  # what a chat session keeps
    assert cache.capacity == window and cache.k.shape[2] == cache.v.shape[2] == 0
    assert llm.model.new_cache(64).k.shape[2] == 64


def test_decoding_through_a_growing_cache_matches_scoring_the_text(llm):
    cache = llm.model.new_cache()
    rows = [prefill(llm.model, cache, TEXT[:5])]
    allocated = {cache.k.shape[2]}
    for token in TEXT[5:]:
        rows.append(decode(llm.model, [cache], [token])[0])
        allocated.add(cache.k.shape[2])
        assert cache.length <= cache.k.shape[2] <= 2 * cache.length
    assert len(allocated) >= 4  # 5 -> 10 -> 20 -> 40 -> 80 rows: the copies were exercised
    np.testing.assert_allclose(np.stack(rows), llm.score(TEXT)[4:], atol=1e-4, rtol=0)


def test_a_copied_prefix_grows_the_empty_cache(llm):
    source = llm.model.new_cache()
    prefill(llm.model, source, TEXT[:20])
    copy = llm.model.new_cache()
    copy.copy_prefix_from(source, 12)
    assert copy.k.shape[2] >= 12
    np.testing.assert_allclose(decode(llm.model, [copy], [TEXT[12]])[0], llm.score(TEXT[:13])[-1], atol=1e-4)
