"""The Llama decoder, written once against the backend interface.

A forward step takes a ragged batch: each sequence brings its own KV cache and its own new
tokens. Linear layers run on all new tokens concatenated; attention runs per sequence.
"""

import numpy as np

from .kv_cache import KVCache


class LlamaModel:
    def __init__(self, config, backend, weights):
        self.config = config
        self.backend = backend
        self.weights = weights

    def new_cache(self, capacity: int | None = None) -> KVCache:
        return KVCache(self.backend, self.config, capacity or self.config.max_position_embeddings)

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
        # each sequence's caches and rows, the same for every layer: a backend may write and attend
        # for all sequences at once
        slots = [cache.step_slot(n) for (cache, _), n in zip(batch, lengths)]
        for layer_index, layer in enumerate(w.layers):
            h = be.rms_norm(x, layer.input_norm, cfg.rms_norm_eps)
            attn = self._attention(layer_index, layer, h, batch, starts, slots)
            x = be.matmul_transb(attn, layer.o, beta=1.0, c=x)  # residual add fused into the matmul
            h = be.rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            x = be.matmul_transb(be.swiglu(be.matmul_transb(h, layer.gate_up)), layer.down, beta=1.0, c=x)
        for (cache, _), n in zip(batch, lengths):
            cache.advance(n)
        if not all_logits and len(ids) > len(batch):  # in a pure decode step every row already is a last token
            x = be.gather(x, be.upload_ids(starts[1:] - 1))  # [batch, hidden]: each sequence's last token
        return be.to_host(be.matmul_transb(be.rms_norm(x, w.norm, cfg.rms_norm_eps), w.lm_head))

    def _attention(self, layer_index, layer, h, batch, starts, slots):
        """h [T, hidden] -> attention output [T, H * D], each sequence over its own cache."""
        be = self.backend
        qkv = be.matmul_transb(h, layer.qkv)  # [T, (H + 2 KV) * D]; the bias is added with rope
        q = be.qkv_rope_cache(qkv, layer.qkv_bias, slots, layer_index)  # [T, H, D]; rope(k), v into the caches
        out = be.batch_attention(q, slots, layer_index)  # [T, H, D], or None: per sequence
        if out is None:
            outs = []
            for (cache, _), start, end in zip(batch, starts[:-1], starts[1:]):
                keys, values = cache.view(layer_index, end - start)  # [KV, length + t, D]
                outs.append(be.attention(q[start:end], keys, values, cache.length))
            out = outs[0] if len(outs) == 1 else be.xp.concatenate(outs)  # [T, H, D]
        return out.reshape(out.shape[0], -1)


def prefill(model, cache, prompt_ids):
    """Run a prompt through the model, filling the cache -> logits of its last token [vocab]."""
    return model.forward([(cache, prompt_ids)])[0]


def decode(model, caches, last_tokens):
    """One decode step for several sequences at once -> logits [len(caches), vocab]."""
    return model.forward([(cache, [token]) for cache, token in zip(caches, last_tokens)])
