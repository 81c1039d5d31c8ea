"""PrefixRouter: which engine replica a request goes to, prefix-affine with a load bound.

Each replica's recently routed prompt blocks are remembered by content key (the block_key chain
every replica computes, so the router knows what a replica's KV pool probably holds without
asking). A request goes to the replica whose remembered blocks cover the most of its leading
blocks, unless that replica has more than `threshold` requests in flight beyond the least loaded
one; with no match, or past the threshold, it takes the less loaded of two replicas drawn at
random (power of two choices). Replicas marked down get nothing while any other is up; one that
comes back starts with nothing remembered (a restarted process has an empty pool).

Pure bookkeeping: no Ray, no I/O, one event loop's thread.
"""

import collections
import random

QUEUE_THRESHOLD = 4        # requests in flight a cache-holding replica may have beyond the least loaded
REMEMBERED_BLOCKS = 65536  # block keys remembered per replica, least recently routed dropped first


class PrefixRouter:
    def __init__(self, n_replicas: int, threshold: int = QUEUE_THRESHOLD, remembered: int = REMEMBERED_BLOCKS,
                 rng: random.Random | None = None):
        self.threshold, self.remembered, self.rng = threshold, remembered, rng or random.Random()
        self.in_flight = [0] * n_replicas   # requests routed and not yet finished, per replica
        self.up = [True] * n_replicas
        self.blocks = [collections.OrderedDict() for _ in range(n_replicas)]  # block key -> None, oldest first

    def matched(self, replica: int, keys: list[int]) -> int:
        """Leading keys the replica is remembered to hold (keys chain: a hit vouches for its prefix)."""
        held = self.blocks[replica]
        return next((i for i, key in enumerate(keys) if key not in held), len(keys))

    def pick(self, keys: list[int]) -> int:
        """The replica for a request whose prompt has these leading block keys."""
        candidates = [r for r, up in enumerate(self.up) if up] or list(range(len(self.up)))
        least = min(self.in_flight[r] for r in candidates)
        matched = {r: self.matched(r, keys) for r in candidates}
        best = max(candidates, key=lambda r: (matched[r], -self.in_flight[r]))
        if matched[best] and self.in_flight[best] - least <= self.threshold:
            return best
        pair = self.rng.sample(candidates, min(2, len(candidates)))
        return min(pair, key=lambda r: self.in_flight[r])

    def started(self, replica: int, keys: list[int]):
        """A request went to the replica: its prompt's blocks will be there."""
        self.in_flight[replica] += 1
        held = self.blocks[replica]
        for key in keys:
            held[key] = None
            held.move_to_end(key)
        while len(held) > self.remembered:
            held.popitem(last=False)

    def finished(self, replica: int):
        self.in_flight[replica] -= 1

    def down(self, replica: int):
        """The replica died: nothing goes to it while another is up, and its pool is gone."""
        self.up[replica] = False
        self.blocks[replica].clear()

    def back(self, replica: int):
        self.up[replica] = True
