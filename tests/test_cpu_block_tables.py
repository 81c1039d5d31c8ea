"""kernels/cpu/attention.c and rows.c's qkv_rope (16 lanes with AVX-512, 8 with AVX2 alone) read
and write K/V through block tables, against the reference backend (pyllm/backends/reference.py):
ragged steps (decode, prefill, a mix) over a KV pool whose blocks come shuffled, some shared by
several sequences, last blocks partly full."""

import numpy as np
import pytest

from pyllm.backends import cpu_kernels
from pyllm.backends import reference as ref
from pyllm.backends.base import BLOCK_TOKENS, CacheSlot, Step

pytestmark = pytest.mark.skipif(not cpu_kernels.kernels_available(),
                                reason="no C compiler or neither AVX2 nor AVX-512 here: the reference serves")

rng = np.random.default_rng(0)

LENGTHS = [1, 15, 16, 17, 37, 300]  # rows (cached + new) of a step's sequences
NEW_TOKENS = {"decode": [1] * 6, "prefill": LENGTHS, "mixed": [1, 15, 1, 17, 20, 200]}
LAYERS, SPARE = 3, 5  # the pool's layers, and blocks no table names


def block_tables(lengths, counts):
    """Each sequence's table: shuffled block ids of a pool with SPARE blocks more than the tables
    need; every sequence whose new tokens start past its first block shares that block with the
    first such sequence (read by all of them, written by none) -> (tables, blocks in the pool)."""
    sharers = [s for s, (length, n) in enumerate(zip(lengths, counts)) if length - n >= BLOCK_TOKENS]
    own = [-(-length // BLOCK_TOKENS) - (s in sharers[1:]) for s, length in enumerate(lengths)]
    ids = rng.permutation(sum(own) + SPARE).astype(np.int32)
    tables = np.split(ids, np.cumsum(own))[:len(lengths)]
    for s in sharers[1:]:
        tables[s] = np.concatenate([tables[sharers[0]][:1], tables[s]])
    return tables, len(ids)


def paged_step(lengths, counts, n_kv, head_dim):
    """A Step over a fresh pool [blocks, layers, KV, BLOCK_TOKENS, D] of random keys (x 3: scores
    far from 0) and values, NaN wherever no sequence's rows reach (the rest of a last block, spare
    blocks): what a kernel must never let into a result."""
    tables, n_blocks = block_tables(lengths, counts)
    keys, values = (np.full((n_blocks, LAYERS, n_kv, BLOCK_TOKENS, head_dim), np.nan, np.float32) for _ in "kv")
    slots = [CacheSlot(keys, values, table, length, n) for table, length, n in zip(tables, lengths, counts)]
    for slot in slots:
        blocks, rows = ref.cache_rows(slot, np.arange(slot.rows))
        shape = (slot.rows, LAYERS, n_kv, head_dim)
        keys[blocks, :, :, rows] = 3 * rng.standard_normal(shape, dtype=np.float32)
        values[blocks, :, :, rows] = rng.standard_normal(shape, dtype=np.float32)
    return Step(slots, [int(s) for s in np.cumsum([0] + list(counts))])


@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 32), (2, 1, 80)])
@pytest.mark.parametrize("kind", NEW_TOKENS)
def test_attention_through_block_tables_matches_the_reference(n_heads, n_kv, head_dim, kind):
    """Both layouts (a decode unit's few rows, a prompt tile's many) over keys 1 .. 300 long:
    within one block, exactly one, one more, several chunks, a block shared by several sequences."""
    step = paged_step(LENGTHS, NEW_TOKENS[kind], n_kv, head_dim)
    for layer in range(LAYERS):
        q = 3 * rng.standard_normal((step.n_tokens, n_heads, head_dim), dtype=np.float32)
        # scores reach ~100 before scaling, where an f32 ulp is 8e-6: summation order shows
        np.testing.assert_allclose(cpu_kernels.attention(q, step.slots, layer), ref.step_attention(q, step, layer),
                                   atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(9, 3, 64), (2, 1, 80), (8, 2, 32)])
@pytest.mark.parametrize("lengths,counts", [([300], [1]), ([1000], [3]), ([40, 1000], [1, 2]), ([2000], [1]), ([33], [1])])
def test_decode_of_few_sequences_splits_their_keys_and_matches_the_reference(n_heads, n_kv, head_dim, lengths, counts):
    """Too few decode units for the threads: a unit of many keys has them split into segments that
    are merged at the end (flash decoding); a short one (33 keys) is not split."""
    step = paged_step(lengths, counts, n_kv, head_dim)
    for layer in range(LAYERS):
        q = 3 * rng.standard_normal((step.n_tokens, n_heads, head_dim), dtype=np.float32)
        np.testing.assert_allclose(cpu_kernels.attention(q, step.slots, layer), ref.step_attention(q, step, layer),
                                   atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("n_heads,n_kv,head_dim,with_bias", [(9, 3, 64, False), (6, 2, 20, True)])
@pytest.mark.parametrize("kind", NEW_TOKENS)
def test_qkv_rope_writes_through_block_tables_as_the_reference(n_heads, n_kv, head_dim, with_bias, kind):
    """q, and the whole pool after the writes (each new position's block and row at the layer;
    nothing else, shared blocks untouched), as reference.qkv_rope_cache."""
    counts = NEW_TOKENS[kind]
    step, layer = paged_step(LENGTHS, counts, n_kv, head_dim), 1
    pool = step.slots[0][:2]
    copies = [array.copy() for array in pool]
    reference_step = Step([CacheSlot(*copies, *slot[2:]) for slot in step.slots], step.starts)
    qkv = rng.standard_normal((step.n_tokens, (n_heads + 2 * n_kv) * head_dim), dtype=np.float32)
    bias = rng.standard_normal(qkv.shape[1], dtype=np.float32) if with_bias else None
    cos, sin = ref.rope_tables(10000.0, head_dim, max(LENGTHS))
    q = cpu_kernels.qkv_rope(qkv, bias, step.slots, layer, cos, sin)
    np.testing.assert_allclose(q, ref.qkv_rope_cache(qkv, bias, reference_step, layer, cos, sin), atol=1e-6)
    np.testing.assert_allclose(pool[0], copies[0], atol=1e-6)  # NaN where the reference left NaN
    np.testing.assert_array_equal(pool[1], copies[1])
