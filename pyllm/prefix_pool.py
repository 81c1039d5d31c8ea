"""PrefixPool: idle KV caches of finished conversations, found by the token prefix they share with a prompt.

The pool is keyed by token content only (never by a client-chosen id); a job that reuses an entry
computes on its own copy, so no entry is ever shared by running jobs. Idle entries are evicted
least-recently-used.
"""

import itertools
from dataclasses import dataclass

from .chat import reusable_prefix


@dataclass(eq=False)
class PoolEntry:
    ids: list[int]     # the tokens whose K/V the cache holds, in order
    cache: object
    last_used: int


class PrefixPool:
    def __init__(self, bytes_per_token: int):
        self.bytes_per_token = bytes_per_token
        self.entries: list[PoolEntry] = []
        self._clock = itertools.count()

    @property
    def bytes(self) -> int:
        return sum(len(e.ids) for e in self.entries) * self.bytes_per_token

    def put(self, ids, cache):
        """Keep a cache; entries holding a prefix of its tokens are now redundant and go."""
        ids = list(ids)
        self.entries = [e for e in self.entries if ids[:len(e.ids)] != e.ids]
        self.entries.append(PoolEntry(ids, cache, next(self._clock)))

    def match(self, ids):
        """-> (entry, tokens reusable) for the longest common prefix; at least one prompt token
        is left to prefill, since the last one must be fed to get logits."""
        best, best_n = None, 0
        for entry in self.entries:
            n = reusable_prefix(entry.ids, ids)
            if n > best_n:
                best, best_n = entry, n
        if best is not None:
            best.last_used = next(self._clock)
        return best, best_n

    def evict_lru(self) -> bool:
        if not self.entries:
            return False
        self.entries.remove(min(self.entries, key=lambda e: e.last_used))
        return True
