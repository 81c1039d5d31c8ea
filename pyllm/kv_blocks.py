"""BlockPool: a model's KV memory as blocks of BLOCK_TOKENS tokens, shared by its sequences.

Every layer's K and V of a block sit together: keys, values [blocks, layers, KV, BLOCK_TOKENS, D]
on the backend's device. The arrays start small and double as blocks are first needed, up to the
pool's size (a GPU commits memory when it allocates, so a pool sized for a long context costs
nothing until it fills). A sequence's KVCache holds a table of blocks and takes them as it grows;
nothing is reserved up front.

A full block is known by its content: key = hash(parent block's key, its tokens, salt), so one
key stands for the whole prefix up to and including the block. Blocks are refcounted: a
sequence whose tokens start with a cached prefix holds those blocks instead of computing them
(a system prompt, earlier turns of a conversation, the n choices of a request). A block whose
last holder lets go stays cached, least recently used first, until the pool needs it for new
tokens; a block that was never full goes straight back to the free list.
"""

import array
import collections
import hashlib

from .backends.base import BLOCK_TOKENS
from .errors import PyllmError


FIRST_BLOCKS = 64  # blocks allocated when a pool is made; it doubles from there


class PoolFull(PyllmError):
    """No free or cached block is left: a sequence must give its blocks back (preemption)."""


def block_key(parent: int | None, tokens, salt: str = "") -> int:
    """The content key of a full block: its tokens chained to the prefix before them (the same in
    every process, so replicas and a router agree on it)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update((parent or 0).to_bytes(8, "little"))
    digest.update(hashlib.blake2b(salt.encode(), digest_size=16).digest())
    digest.update(array.array("q", tokens).tobytes())
    return int.from_bytes(digest.digest(), "little")


def cacheable_blocks(ids, start: int = 0, parent: int | None = None, salt: str = ""):
    """(first token, key) of each full block of ids from `start` that a prompt could find cached:
    those inside ids[:-1] (its last token is always computed, for its logits), keys chained from
    `parent` (the key of the block before `start`). Lazy: a lookup stops at its first miss."""
    for first in range(start, len(ids) - BLOCK_TOKENS, BLOCK_TOKENS):
        parent = block_key(parent, ids[first:first + BLOCK_TOKENS], salt)
        yield first, parent


def prompt_block_keys(ids, salt: str = "") -> list[int]:
    """The keys of the full blocks a prompt could find cached, as KVCache.match_prefix looks them up."""
    return [key for _, key in cacheable_blocks(ids, salt=salt)]


class BlockPool:
    def __init__(self, backend, config, n_blocks: int, first_blocks: int = FIRST_BLOCKS):
        if n_blocks < 1:
            raise PyllmError(f"the KV pool needs at least one block of {BLOCK_TOKENS} tokens")
        self.backend, self.block_shape = backend, (config.num_layers, config.num_kv_heads, BLOCK_TOKENS, config.head_dim)
        self.keys = backend.zeros((min(first_blocks, n_blocks), *self.block_shape))  # [allocated, layers, KV, BLOCK_TOKENS, D]
        self.values = backend.zeros(self.keys.shape)                                 # the same
        self.n_blocks = n_blocks
        self.refs = [0] * n_blocks            # holders of each block
        self.key_of = [None] * n_blocks       # content key of a full, cached block
        self.by_key: dict[int, int] = {}      # content key -> its block
        self.free = list(range(len(self.keys) - 1, -1, -1))      # allocated, held by no one, no content kept
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, held by no one
        self.lookups = self.hits = 0          # full prompt blocks looked up, and found
        self.copies = 0                       # blocks copied (a partial block shared at a fork)
        self.preemptions = 0                  # sequences that gave their blocks back to let others run

    @property
    def block_bytes(self) -> int:
        return 2 * self.keys[0].size * self.keys.itemsize

    def _grow(self) -> bool:
        """Double the arrays (up to n_blocks), keeping every block's contents -> whether it grew."""
        have = len(self.keys)
        if have == self.n_blocks:
            return False
        more = min(have, self.n_blocks - have)
        extra = self.backend.zeros((more, *self.block_shape))
        self.keys = self.backend.xp.concatenate([self.keys, extra])
        self.values = self.backend.xp.concatenate([self.values, extra])
        self.free = list(range(have + more - 1, have - 1, -1)) + self.free
        return True

    def stats(self) -> dict:
        used = sum(1 for r in self.refs if r)
        return {"blocks": self.n_blocks, "blocks_used": used, "blocks_cached": len(self.lru),
                "blocks_free": self.n_blocks - used - len(self.lru), "blocks_allocated": len(self.keys),
                "prefix_lookups": self.lookups, "prefix_hits": self.hits, "preemptions": self.preemptions}

    def available(self) -> int:
        """Blocks a sequence could take now (free, not yet allocated, or cached and evictable)."""
        return len(self.free) + len(self.lru) + self.n_blocks - len(self.keys)

    def allocate(self) -> int:
        """A block for new tokens, held once: a free one, else the least recently used cached one."""
        if self.free or self._grow():
            block = self.free.pop()
        elif self.lru:
            block, _ = self.lru.popitem(last=False)
            del self.by_key[self.key_of[block]]
            self.key_of[block] = None
        else:
            raise PoolFull(f"the KV pool's {self.n_blocks} blocks of {BLOCK_TOKENS} tokens are all in use")
        self.refs[block] = 1
        return block

    def hold(self, block: int):
        if self.refs[block] == 0:
            self.lru.pop(block, None)
        self.refs[block] += 1

    def release(self, block: int):
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if self.key_of[block] is None:
                self.free.append(block)
            else:
                self.lru[block] = None  # the most recently used end

    def register(self, block: int, key: int):
        """A block has just become full with the tokens `key` stands for: later prompts may share it."""
        if key not in self.by_key and self.key_of[block] is None:
            self.by_key[key] = block
            self.key_of[block] = key

    def lookup(self, key: int) -> int | None:
        """The cached block with this content key, held for the caller, or None."""
        self.lookups += 1
        block = self.by_key.get(key)
        if block is not None:
            self.hits += 1
            self.hold(block)
        return block

    def is_shared(self, block: int) -> bool:
        """Writing into it would change what someone else (or the prefix cache) reads."""
        return self.refs[block] > 1 or self.key_of[block] is not None

    def copy(self, block: int) -> int:
        """A new block holding block's K/V (every layer), for a writer that must not touch the original."""
        fresh = self.allocate()
        self.keys[fresh] = self.keys[block]
        self.values[fresh] = self.values[block]
        self.copies += 1
        return fresh
