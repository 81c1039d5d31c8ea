"""Per-sequence key/value cache on the backend's device."""

from .backends.base import CacheSlot
from .errors import PyllmError


class KVCache:
    """Keys and values of every token a sequence has seen, for every layer.

    Head-major layout, so each head's keys are contiguous rows for the attention matmuls.
    A cache sized by its caller (prompt + max_tokens) is allocated whole at once. One that may
    fill the whole context window (`grow`: a chat) is allocated as tokens arrive, doubling up to
    its capacity: a GPU commits device memory when it is allocated, not when it is first touched.
    """

    def __init__(self, backend, config, capacity: int, grow: bool = False):
        self.capacity = min(capacity, config.max_position_embeddings)
        self._backend, self._config = backend, config
        self.k = self.v = None
        self.length = 0  # tokens cached
        self._allocate(0 if grow else self.capacity)

    def _allocate(self, rows: int):
        """Buffers of `rows` rows [layers, KV, rows, D], keeping the cached tokens."""
        cfg = self._config
        shape = (cfg.num_layers, cfg.num_kv_heads, rows, cfg.head_dim)
        k, v = self._backend.zeros(shape), self._backend.zeros(shape)
        if self.k is not None:
            k[:, :, :self.length], v[:, :, :self.length] = self.k[:, :, :self.length], self.v[:, :, :self.length]
        self.k, self.v = k, v

    def _reserve(self, rows: int):
        allocated = self.k.shape[2]
        if rows > allocated:
            self._allocate(min(self.capacity, max(rows, 2 * allocated)))

    def check_room(self, n_new: int):
        if self.length + n_new > self.capacity:
            raise PyllmError(f"context full: {self.length} cached + {n_new} new tokens exceed "
                             f"the context window of {self.capacity} tokens")

    def step_slot(self, n_new: int) -> CacheSlot:
        """What a step with n_new tokens writes (their rows last) and reads, in every layer;
        length advances in advance()."""
        self._reserve(self.length + n_new)
        return CacheSlot(self.k, self.v, self.length + n_new, n_new)

    def copy_prefix_from(self, other: "KVCache", n: int):
        """Start this (empty) cache with the first n tokens of `other`, on the device."""
        self._reserve(n)
        self.k[:, :, :n] = other.k[:, :, :n]
        self.v[:, :, :n] = other.v[:, :, :n]
        self.length = n

    def advance(self, n_new: int):
        self.length += n_new

    def truncate(self, length: int):
        """Forget tokens from `length` on (their slots are simply overwritten later)."""
        self.length = min(self.length, length)
