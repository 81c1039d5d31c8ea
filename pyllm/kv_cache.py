"""KVCache: one sequence's view of the model's BlockPool: its block table and the tokens it holds.

Blocks are taken as the sequence grows (reserve), full ones are registered by content, and a
block someone else also reads is copied before it is written (copy on write: only the partial
last block shared at a fork ever needs it). Dropping the cache gives its blocks back.
"""

import numpy as np

from .backends.base import BLOCK_TOKENS, CacheSlot
from .errors import PyllmError
from .kv_blocks import block_key, cacheable_blocks


class KVCache:
    def __init__(self, pool, capacity: int, salt: str = ""):
        self.pool = pool
        self.capacity = capacity  # tokens this sequence may hold (its context window)
        self.salt = salt          # prefix sharing only among caches with the same salt
        self.blocks: list[int] = []     # held, in token order
        self.tokens: list[int] = []     # whose K/V it holds, in order
        self.keys: list[int] = []       # content key of each full block

    @property
    def length(self) -> int:
        return len(self.tokens)

    def check_room(self, n_new: int):
        if self.length + n_new > self.capacity:
            raise PyllmError(f"context full: {self.length} cached + {n_new} new tokens exceed "
                             f"the context window of {self.capacity} tokens")

    def match_prefix(self, ids) -> int:
        """Extend a cache that holds only whole blocks of ids' start with the cached full blocks
        that follow in ids (at least one token of ids is left to compute, for its logits) -> the
        tokens it holds now."""
        if self.length % BLOCK_TOKENS or self.length != len(self.keys) * BLOCK_TOKENS:
            return self.length
        for start, key in cacheable_blocks(ids, self.length, self.keys[-1] if self.keys else None, self.salt):
            block = self.pool.lookup(key)
            if block is None:
                break
            for unused in self.blocks[len(self.keys):]:  # reserved for tokens now found computed
                self.pool.release(unused)
            del self.blocks[len(self.keys):]
            self.blocks.append(block)
            self.keys.append(key)
            self.tokens += ids[start:start + BLOCK_TOKENS]
        return self.length

    def next_key(self, ids) -> int | None:
        """The content key of the block that ids' next tokens would fill, or None where the cache
        ends inside a block or fewer than a block of ids is left."""
        if self.length % BLOCK_TOKENS or len(ids) - self.length < BLOCK_TOKENS:
            return None
        return self._key_after(ids[self.length:self.length + BLOCK_TOKENS])

    def _key_after(self, block_tokens) -> int:
        """The key of a block of these tokens following the cache's full blocks."""
        return block_key(self.keys[-1] if self.keys else None, block_tokens, self.salt)

    def reserve(self, n_new: int):
        """Blocks for n_new more tokens, and the last partial block made this cache's own; PoolFull
        when the pool has none left (the blocks taken so far stay, for the next try)."""
        self.check_room(n_new)
        if self.length % BLOCK_TOKENS and self.pool.is_shared(self.blocks[-1]):
            old = self.blocks[-1]
            self.blocks[-1] = self.pool.copy(old)
            self.pool.release(old)
        while len(self.blocks) * BLOCK_TOKENS < self.length + n_new:
            self.blocks.append(self.pool.allocate())

    def step_slot(self, n_new: int) -> CacheSlot:
        """What a step with n_new tokens writes (their positions last) and reads, in every layer,
        once reserve(n_new) has taken their blocks; the tokens join in advance()."""
        return CacheSlot(self.pool.keys, self.pool.values, np.asarray(self.blocks, np.int32), self.length + n_new, n_new)

    def advance(self, ids):
        """The step's tokens are in: blocks that filled up become shareable by content."""
        self.tokens += [int(t) for t in ids]
        while len(self.keys) < self.length // BLOCK_TOKENS:
            i = len(self.keys)
            key = self._key_after(self.tokens[i * BLOCK_TOKENS:(i + 1) * BLOCK_TOKENS])
            self.keys.append(key)
            self.pool.register(self.blocks[i], key)

    def fork(self) -> "KVCache":
        """A cache holding the same tokens, sharing every block (the partial last one is copied
        when either writes it)."""
        other = KVCache(self.pool, self.capacity, self.salt)
        other.blocks = self.blocks[:-(-self.length // BLOCK_TOKENS)]  # the blocks its tokens fill
        for block in other.blocks:
            self.pool.hold(block)
        other.tokens, other.keys = list(self.tokens), list(self.keys)
        return other

    def release(self):
        """Every block back to the pool: the cache is empty."""
        for block in self.blocks:
            self.pool.release(block)
        self.blocks, self.tokens, self.keys = [], [], []

    def __del__(self):  # a cache dropped without release() (or at exit) still gives its blocks back
        if getattr(self, "pool", None) is not None:
            self.release()
