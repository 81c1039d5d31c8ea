"""What kernels/attention.cu (and rope.cu's cache write) read of a step, and what fits one of its
blocks: the step's tokens, its shared memory, and how many blocks split a token's keys
(flash-decoding). Plain functions of a GPU's limits, so tests can ask them of a T4, an A100 and an
H100 alike."""

from typing import Any, NamedTuple

import numpy as np

ATTENTION_THREADS = 128  # one block per (token, query head)
DEFAULT_SHARED_BYTES = 48 * 1024  # a block's static + dynamic shared memory without opting in
MIN_SPLIT_KEYS = 256  # a split's fewest keys where splitting only fills the GPU: shorter, merging costs more


class StepTokens(NamedTuple):
    """A step as the kernels read it, on the device."""
    tokens: Any    # int32 [T, 2]: each token's position in its sequence, where its sequence's table starts
    tables: Any    # int32: every sequence's block table, one after another
    max_keys: int  # the most keys any token sees


def token_rows(slots, table_starts) -> np.ndarray:
    """Host int32 [T, 2] of StepTokens.tokens: the new tokens of each slot (base.CacheSlot), at
    positions rows - n_new .. rows - 1, with its table starting at table_starts[s]."""
    return np.concatenate([np.stack([np.arange(slot.rows - slot.n_new, slot.rows), np.full(slot.n_new, start)], axis=1)
                           for slot, start in zip(slots, table_starts)]).astype(np.int32)


def attention_shared_bytes(head_dim: int, chunk: int, threads: int = ATTENTION_THREADS) -> int:
    """Dynamic shared memory of kernels/attention.cu: q [D] | scores [chunk] | partial sums."""
    n_slices = max(1, threads // head_dim)
    return 4 * (head_dim + chunk + n_slices * head_dim)


def attention_max_keys(head_dim: int, static_bytes: int, optin_bytes: int, threads: int = ATTENTION_THREADS) -> int:
    """The most keys one attention block can score: their attention_shared_bytes fit a block beside
    its static shared memory."""
    return (optin_bytes - static_bytes) // 4 - attention_shared_bytes(head_dim, 0, threads) // 4


def attention_splits(max_keys: int, pairs: int, multiprocessors: int, longest_chunk: int) -> int:
    """How many blocks share each (token, head)'s keys (flash-decoding) in a step whose longest
    sequence sees max_keys keys over `pairs` (token, head) pairs: enough that each block's scores fit
    its shared memory (longest_chunk keys), and while the pairs alone give fewer than two blocks per
    multiprocessor, more, of at least MIN_SPLIT_KEYS keys each, up to filling it."""
    fit = -(-max_keys // longest_chunk)
    fill = 1 if pairs == 0 or pairs >= 2 * multiprocessors else min(-(-2 * multiprocessors // pairs), -(-max_keys // MIN_SPLIT_KEYS))
    return max(1, fit, fill)


def shared_memory_opt_in(static_bytes: int, dynamic_bytes: int, optin_bytes: int) -> int | None:
    """The max_dynamic_shared_size_bytes to set before such a launch: None within the default
    48 KiB, past it the device's whole opt-in range, so that setting it once serves every launch."""
    return optin_bytes - static_bytes if static_bytes + dynamic_bytes > DEFAULT_SHARED_BYTES else None
