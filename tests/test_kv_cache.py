"""The KV pool and caches over it (kv_blocks.py, kv_cache.py): the pool's arrays start small and
double as blocks are needed (a GPU commits memory when it allocates), keeping every block;
decoding token by token through the growth gives the logits of scoring the whole text at once;
content keys, refcounts, LRU eviction and copy on write, counted on the pool itself."""

import numpy as np
import pytest

import pyllm
from pyllm.backends.base import BLOCK_TOKENS
from pyllm.kv_blocks import BlockPool, PoolFull
from pyllm.model import decode, prefill

TEXT = [0, 17, 250, 3, 99, 42, 42, 7, 180, 33, 5, 260, 8, 90, 61, 2] * 3  # 48 tokens


@pytest.fixture(params=["cpu", "cuda-emu"])
def llm(request, tiny_model):
    return pyllm.LLM(str(tiny_model[0]), backend=request.param, dtype="f32", show_progress=False)


def small_pool(llm, blocks, first_blocks=1):
    """The model's pool replaced by one of `blocks` blocks, `first_blocks` of them allocated."""
    llm.model.pool = BlockPool(llm.backend, llm.config, blocks, first_blocks)
    return llm.model.pool


def test_decoding_through_a_growing_pool_matches_scoring_the_text(llm):
    pool = small_pool(llm, 8)
    cache = llm.model.new_cache()
    rows = [prefill(llm.model, cache, TEXT[:5])]
    allocated = {len(pool.keys)}
    for token in TEXT[5:]:
        rows.append(decode(llm.model, [cache], [token])[0])
        allocated.add(len(pool.keys))
    assert allocated == {1, 2, 4}  # 48 tokens: 3 blocks, after two doublings
    np.testing.assert_allclose(np.stack(rows), llm.score(TEXT)[4:], atol=1e-4, rtol=0)


def test_shared_prefix_blocks_are_held_not_copied_and_a_fork_writes_its_own(llm):
    pool = small_pool(llm, 16, 16)
    first = llm.model.new_cache()
    prefill(llm.model, first, TEXT[:40])  # 2 full blocks and 8 tokens
    second = llm.model.new_cache()
    assert second.match_prefix(TEXT[:41]) == 2 * BLOCK_TOKENS and second.blocks == first.blocks[:2]
    assert [pool.refs[b] for b in first.blocks] == [2, 2, 1]
    fork = first.fork()
    assert fork.blocks == first.blocks and pool.copies == 0
    logits = decode(llm.model, [fork], [TEXT[40]])[0]  # writes into the shared partial block: its own copy
    assert pool.copies == 1 and fork.blocks[:2] == first.blocks[:2] and fork.blocks[2] != first.blocks[2]
    np.testing.assert_allclose(logits, llm.score(TEXT[:41])[-1], atol=1e-4)
    np.testing.assert_allclose(decode(llm.model, [first], [TEXT[40]])[0], logits, atol=1e-6)


def test_released_blocks_stay_cached_until_the_pool_needs_them(llm):
    pool = small_pool(llm, 4, 4)
    cache = llm.model.new_cache()
    prefill(llm.model, cache, TEXT[:33])
    cache.release()
    assert pool.stats()["blocks_cached"] == 2 and pool.stats()["blocks_used"] == 0
    again = llm.model.new_cache()
    assert again.match_prefix(TEXT[:40]) == 32  # taken back from the LRU
    again.release()
    other = llm.model.new_cache()
    prefill(llm.model, other, [5] * 60)  # needs all 4 blocks: the cached ones are evicted
    assert pool.stats()["blocks_cached"] == 0 and llm.model.new_cache().match_prefix(TEXT[:40]) == 0
    decode(llm.model, [other], [5])  # 61 tokens: still 4 blocks
    with pytest.raises(PoolFull):
        prefill(llm.model, other, [5] * 8)  # 69 would need a fifth


def test_the_reference_reads_a_shuffled_block_table_as_the_contiguous_cache():
    """The oracle's own gather (reference.cached): blocks in any order, a partial last block."""
    from pyllm.backends.base import CacheSlot
    from pyllm.backends.reference import cached
    rng = np.random.default_rng(0)
    layers, n_kv, dim, rows = 2, 3, 8, 37
    contiguous = rng.standard_normal((layers, n_kv, 48, dim)).astype(np.float32)  # [layers, KV, positions, D]
    table = np.array([5, 0, 3], np.int32)
    pool = np.zeros((6, layers, n_kv, BLOCK_TOKENS, dim), np.float32)
    for i, block in enumerate(table):
        pool[block] = contiguous[:, :, i * BLOCK_TOKENS:(i + 1) * BLOCK_TOKENS]
    slot = CacheSlot(pool, pool, table, rows, 1)
    for layer in range(layers):
        np.testing.assert_array_equal(cached(pool, slot, layer), contiguous[layer, :, :rows])
