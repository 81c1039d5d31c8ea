"""Per-sequence key/value cache, preallocated on the backend's device."""

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

    def write(self, layer: int, k, v):
        """Store the new tokens' k, v [T, KV, D] after the cached ones (length advances in advance())."""
        end = self.length + k.shape[0]
        self.k[layer, :, self.length:end] = k.transpose(1, 0, 2)
        self.v[layer, :, self.length:end] = v.transpose(1, 0, 2)

    def view(self, layer: int, n_new: int):
        """k, v [KV, length + n_new, D]: everything attention may read for this step."""
        end = self.length + n_new
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n_new: int):
        self.length += n_new

    def truncate(self, length: int):
        """Forget tokens from `length` on (their slots are simply overwritten later)."""
        self.length = min(self.length, length)
