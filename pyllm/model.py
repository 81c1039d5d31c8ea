"""The Llama decoder, written once against the backend interface.

A forward step takes a ragged batch: each sequence brings its own KV cache and its own new
tokens. Linear layers run on all new tokens concatenated; attention runs per sequence.
"""

import numpy as np

from .backends.base import BLOCK_TOKENS, Step
from .errors import PyllmError
from .kv_blocks import BlockPool
from .kv_cache import KVCache

KV_MEMORY_GB = 4.0  # the KV pool of a model by default (host pages are committed as tokens arrive)


class LlamaModel:
    def __init__(self, config, backend, weights, kv_memory_bytes: int | None = None):
        self.config = config
        self.backend = backend
        self.weights = weights
        self.pool = None  # the KV pool, made at the first cache (kv_memory_bytes, or KV_MEMORY_GB)
        self.kv_memory_bytes = kv_memory_bytes or int(KV_MEMORY_GB * 2**30)

    def kv_pool(self) -> BlockPool:
        if self.pool is None:
            cfg, itemsize = self.config, self.backend.zeros((1,)).itemsize
            block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * BLOCK_TOKENS * cfg.head_dim * itemsize  # K and V
            self.pool = BlockPool(self.backend, cfg, max(1, self.kv_memory_bytes // block_bytes))
        return self.pool

    def resize_kv_pool(self, kv_memory_bytes: int) -> BlockPool:
        """A fresh pool of that size (no cache may hold blocks of the old one) -> the pool."""
        if self.pool is not None and self.pool.stats()["blocks_used"]:
            raise PyllmError("the KV pool cannot be resized while caches hold its blocks")
        self.pool, self.kv_memory_bytes = None, kv_memory_bytes
        return self.kv_pool()

    def new_cache(self, capacity: int | None = None, salt: str = "") -> KVCache:
        """An empty cache of up to `capacity` tokens (default: the context window) in the pool."""
        limit = self.config.max_position_embeddings
        return KVCache(self.kv_pool(), min(capacity or limit, limit), salt)

    def forward(self, batch, all_logits=False):
        """batch: list of (KVCache, new token ids). Returns logits as host f32:
        [len(batch), vocab] for each sequence's last token, or [sum(T), vocab] with all_logits.
        Every cache advances by its new tokens."""
        lengths = [len(ids) for _, ids in batch]
        for (cache, _), n in zip(batch, lengths):
            cache.reserve(n)  # every cache's blocks before any slot: taking them may grow the pool's arrays
        ids = np.concatenate([np.asarray(ids, dtype=np.int64) for _, ids in batch])  # [T]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        step = Step([cache.step_slot(n) for (cache, _), n in zip(batch, lengths)], [int(s) for s in starts])
        decode = len(ids) == len(batch)  # every row is a sequence's last token
        logits = self.backend.decode_replay(self.logits_of, ids, step) if decode and not all_logits else None
        if logits is None:
            last_rows = None if all_logits or decode else starts[1:] - 1
            logits = self.logits_of(self.backend.upload_ids(ids), step, last_rows)
        for cache, new_ids in batch:
            cache.advance(new_ids)
        return self.backend.to_host(logits)

    def logits_of(self, ids, step: Step, last_rows=None):
        """The step's token ids [T] (on the device) through every layer -> logits [T, vocab] on the
        device, or only those of rows last_rows (host [S]) where given."""
        cfg, be, w = self.config, self.backend, self.weights
        x = be.gather(w.embed, ids)  # [T, hidden]
        fused = be.decoder_layers(x, step, w.layers)  # [T, hidden], or None: layer by layer below
        for layer_index, layer in enumerate(w.layers if fused is None else []):
            h = be.rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            qkv = be.matmul_transb(h, layer.qkv)  # [T, (H + 2 KV) * D]; the bias is added with rope
            q = be.qkv_rope_cache(qkv, layer.qkv_bias, step, layer_index)  # [T, H, D]; rope(k), v into the caches
            attn = be.step_attention(q, step, layer_index)  # [T, H, D]
            x = be.matmul_transb(attn.reshape(step.n_tokens, -1), layer.o, beta=1.0, c=x)  # residual add fused
            h = be.rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            x = be.matmul_transb(be.swiglu(be.matmul_transb(h, layer.gate_up)), layer.down, beta=1.0, c=x)
        x = x if fused is None else fused
        if last_rows is not None:
            x = be.gather(x, be.upload_ids(last_rows))  # [S, hidden]: each sequence's last token
        return be.project_to_vocab(be.rms_norm(x, w.norm, cfg.rms_norm_eps), w.lm_head)


def prefill(model, cache, prompt_ids):
    """Run a prompt through the model, filling the cache -> logits of its last token [vocab]."""
    return model.forward([(cache, prompt_ids)])[0]


def decode(model, caches, last_tokens):
    """One decode step for several sequences at once -> logits [len(caches), vocab]."""
    return model.forward([(cache, [token]) for cache, token in zip(caches, last_tokens)])
