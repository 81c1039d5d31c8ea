"""Per-sequence key/value cache, preallocated on the backend's device."""

from .backends.base import CacheSlot
from .errors import PyllmError


class KVCache:
    """Keys and values of every token a sequence has seen, for every layer.

    Head-major layout, so each head's keys are contiguous rows for the attention matmuls.
    """

    def __init__(self, backend, config, capacity: int):
        if capacity > config.max_position_embeddings:
            capacity = config.max_position_embeddings
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
        self.k = backend.zeros(shape)  # [layers, KV, capacity, D]
        self.v = backend.zeros(shape)  # [layers, KV, capacity, D]
        self.capacity = capacity
        self.length = 0  # tokens cached

    def check_room(self, n_new: int):
        if self.length + n_new > self.capacity:
            raise PyllmError(f"context full: {self.length} cached + {n_new} new tokens exceed "
                             f"the context window of {self.capacity} tokens")

    def step_slot(self, n_new: int) -> CacheSlot:
        """What a step with n_new tokens writes (their rows last) and reads, in every layer;
        length advances in advance()."""
        return CacheSlot(self.k, self.v, self.length + n_new, n_new)

    def copy_prefix_from(self, other: "KVCache", n: int):
        """Start this (empty) cache with the first n tokens of `other`, on the device."""
        self.k[:, :, :n] = other.k[:, :, :n]
        self.v[:, :, :n] = other.v[:, :, :n]
        self.length = n

    def advance(self, n_new: int):
        self.length += n_new

    def truncate(self, length: int):
        """Forget tokens from `length` on (their slots are simply overwritten later)."""
        self.length = min(self.length, length)
