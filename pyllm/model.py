"""The Llama decoder, written once against the backend interface.

A forward step takes a ragged batch: each sequence brings its own KV cache and its own new
tokens. Linear layers run on all new tokens concatenated; attention runs per sequence.
"""

import numpy as np

from .backends.base import Step
from .kv_cache import KVCache


class LlamaModel:
    def __init__(self, config, backend, weights):
        self.config = config
        self.backend = backend
        self.weights = weights

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A cache for `capacity` tokens, allocated at once; without one, the whole context
        window, allocated as tokens arrive."""
        window = self.config.max_position_embeddings
        return KVCache(self.backend, self.config, capacity or window, grow=capacity is None)

    def forward(self, batch, all_logits=False):
        """batch: list of (KVCache, new token ids). Returns logits as host f32:
        [len(batch), vocab] for each sequence's last token, or [sum(T), vocab] with all_logits.
        Every cache advances by its new tokens."""
        cfg, be, w = self.config, self.backend, self.weights
        lengths = [len(ids) for _, ids in batch]
        for (cache, _), n in zip(batch, lengths):
            cache.check_room(n)
        ids = np.concatenate([np.asarray(ids, dtype=np.int64) for _, ids in batch])  # [T]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        x = be.gather(w.embed, be.upload_ids(ids))  # [T, hidden]
        step = Step([cache.step_slot(n) for (cache, _), n in zip(batch, lengths)], [int(s) for s in starts])
        fused = be.decoder_layers(x, step, w.layers)  # [T, hidden], or None: layer by layer below
        for layer_index, layer in enumerate(w.layers if fused is None else []):
            h = be.rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            qkv = be.matmul_transb(h, layer.qkv)  # [T, (H + 2 KV) * D]; the bias is added with rope
            q = be.qkv_rope_cache(qkv, layer.qkv_bias, step, layer_index)  # [T, H, D]; rope(k), v into the caches
            attn = be.step_attention(q, step, layer_index)  # [T, H, D]
            x = be.matmul_transb(attn.reshape(len(ids), -1), layer.o, beta=1.0, c=x)  # residual add fused
            h = be.rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            x = be.matmul_transb(be.swiglu(be.matmul_transb(h, layer.gate_up)), layer.down, beta=1.0, c=x)
        x = x if fused is None else fused
        for (cache, _), n in zip(batch, lengths):
            cache.advance(n)
        if not all_logits and len(ids) > len(batch):  # in a pure decode step every row already is a last token
            x = be.gather(x, be.upload_ids(starts[1:] - 1))  # [batch, hidden]: each sequence's last token
        return be.to_host(be.project_to_vocab(be.rms_norm(x, w.norm, cfg.rms_norm_eps), w.lm_head))


def prefill(model, cache, prompt_ids):
    """Run a prompt through the model, filling the cache -> logits of its last token [vocab]."""
    return model.forward([(cache, prompt_ids)])[0]


def decode(model, caches, last_tokens):
    """One decode step for several sequences at once -> logits [len(caches), vocab]."""
    return model.forward([(cache, [token]) for cache, token in zip(caches, last_tokens)])
