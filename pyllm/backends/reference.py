"""The reference backend: every operator in plain NumPy, op by op, in float32.

This is the readable truth: no kernel is called from here. It is tested against transformers,
and every other backend (the C kernels of cpu.py, the CUDA kernels) is tested against it.
Shapes use T = new tokens (all sequences of a batch concatenated), H = query heads,
KV = key/value heads, D = head_dim, L = cached + new tokens. A weight may be a QuantizedMatrix:
it is dequantized (the rows gather needs, or the whole matrix for a matmul) right where it is used.
"""

import numpy as np

from ..weights import QuantizedMatrix
from .base import BLOCK_TOKENS, Step


def gather(table, ids):
    """Embedding lookup: table [vocab, hidden] (array or QuantizedMatrix), ids [T] -> [T, hidden]."""
    return table.dequantize(ids) if isinstance(table, QuantizedMatrix) else table[ids]


def rms_norm(x, weight, eps):
    """x [T, hidden], weight [hidden] -> [T, hidden]; statistics in f32 as HF's LlamaRMSNorm."""
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(variance + np.float32(eps))) * weight


def rope_tables(theta, head_dim, max_positions):
    """cos, sin [max_positions, head_dim // 2] in f32.

    The angles are rounded to f32 exactly as HF's default rope computes them; cos and sin of
    those angles are then taken in f64 and rounded once, so they are as accurate as f32 allows.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.power(np.float32(theta), exponent)).astype(np.float32)  # [D/2]
    freqs = (np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def rope(x, positions, cos, sin):
    """Rotary embedding, HF rotate_half layout: x [T, heads, D], positions [T] -> [T, heads, D].

    The first and second halves of each head form the (real, imaginary) pairs.
    """
    half = x.shape[-1] // 2
    c = cos[positions][:, None, :]  # [T, 1, D/2]
    s = sin[positions][:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def matmul_transb(a, b, alpha=1.0, beta=0.0, c=None, bias=None):
    """C = alpha * A @ B^T (+ bias) + beta * C: a [M, K], b [N, K] (array, QuantizedMatrix, or a
    tuple of them: their products side by side), bias [N], c [M, N] (updated in place)."""
    product = times_transposed(a, b)  # [M, N]
    if alpha != 1.0:
        product *= np.float32(alpha)
    if bias is not None:
        product += bias
    if c is None or beta == 0.0:
        return product
    if beta != 1.0:
        c *= np.float32(beta)
    c += product
    return c


DENSE_ROWS = 4096  # rows of a QuantizedMatrix dequantized at a time: no f32 copy of a whole matrix


def times_transposed(a, b):
    """a [M, K] @ b^T -> [M, N] f32 (b as in matmul_transb)."""
    if isinstance(b, tuple):
        return np.concatenate([times_transposed(a, part) for part in b], axis=1)
    if not isinstance(b, QuantizedMatrix):
        return a @ b.T
    out = np.empty((a.shape[0], b.shape[0]), np.float32)  # [M, N]
    for n in range(0, b.shape[0], DENSE_ROWS):
        stop = min(n + DENSE_ROWS, b.shape[0])
        out[:, n:stop] = a @ b.dequantize(np.arange(n, stop)).T
    return out


def dense(b):
    """A weight as one f32 matrix [N, K]: a QuantizedMatrix dequantized, a tuple stacked."""
    if isinstance(b, tuple):
        return np.concatenate([dense(part) for part in b])
    return b.dequantize() if isinstance(b, QuantizedMatrix) else b


def swiglu(gate_up):
    """gate_up [T, 2 * inter] (gate | up) -> silu(gate) * up [T, inter]."""
    gate, up = np.split(gate_up, 2, axis=-1)
    with np.errstate(over="ignore"):  # exp(-gate) = inf for gate < -88 gives silu = -0, as it should
        return gate / (1.0 + np.exp(-gate)) * up


def softmax_causal(scores, offset):
    """Masked causal softmax over the last axis, in place: scores [heads, q_len, kv_len].

    Query i sits at absolute position offset + i and sees keys 0..offset+i. Fully masked
    rows (none arise in a causal model, but callers may build them) give zeros, never NaN.
    """
    scores /= _exp_causal(scores, offset, rows_may_be_empty=True)
    return scores


def _exp_causal(scores, offset, rows_may_be_empty):
    """softmax_causal without the division: scores become exp(score - row max), zero where
    masked, and the row totals [heads, q_len, 1] are returned (1 for a fully masked row).
    Attention divides after P.V instead, on head_dim columns rather than kv_len, and skips the
    care for rows without a visible key, which a causal query never has."""
    q_len, kv_len = scores.shape[-2:]
    first_hidden = offset + 1  # keys before it are visible to every query: no mask to apply there
    if first_hidden < kv_len:  # never in a decode step, which sees its whole cache
        hidden = np.arange(first_hidden, kv_len)[None, :] > (offset + np.arange(q_len))[:, None]
        np.copyto(scores[..., first_hidden:], -np.inf, where=hidden)  # hidden [q_len, kv_len - first_hidden]
    row_max = scores.max(axis=-1, keepdims=True)
    if rows_may_be_empty:
        row_max[~np.isfinite(row_max)] = 0.0  # a fully masked row: exp(-inf - 0) = 0, not NaN
    np.subtract(scores, row_max, out=scores)
    np.exp(scores, out=scores)
    total = scores.sum(axis=-1, keepdims=True)
    if rows_may_be_empty:
        total[total == 0.0] = 1.0
    return total


QUERY_BLOCK = 128  # long prompts attend block by block, skipping keys the causal mask hides


def attention(q, k, v, offset):
    """Grouped-query causal attention over a sequence's cache.

    q [T, H, D] (rope applied), k, v [KV, L, D] (the cache up to the last new token),
    offset = tokens cached before the first query -> [T, H, D].
    Query head h reads key/value head h // (H // KV), as HF's repeat_kv.
    """
    if q.shape[0] <= QUERY_BLOCK:
        return _attention_block(q, k, v, offset)
    return np.concatenate([
        _attention_block(q[start:start + QUERY_BLOCK], k[:, :offset + start + QUERY_BLOCK],
                         v[:, :offset + start + QUERY_BLOCK], offset + start)
        for start in range(0, q.shape[0], QUERY_BLOCK)])


def _attention_block(q, k, v, offset):
    n_tokens, n_heads, head_dim = q.shape
    n_kv = k.shape[0]
    group = n_heads // n_kv
    # [KV, group * T, D]: heads sharing a KV head stacked so one matmul serves the group
    q_grouped = q.transpose(1, 0, 2).reshape(n_kv, group * n_tokens, head_dim) * np.float32(head_dim ** -0.5)
    scores = q_grouped @ k.transpose(0, 2, 1)  # [KV, group * T, L], already scaled (q is the smaller side)
    totals = _exp_causal(scores.reshape(n_heads, n_tokens, -1), offset,  # [H, T, 1]
                         rows_may_be_empty=False)
    out = scores @ v  # [KV, group * T, D]
    out /= totals.reshape(n_kv, group * n_tokens, 1)
    return out.reshape(n_heads, n_tokens, head_dim).transpose(1, 0, 2)


def cache_rows(slot, positions):
    """Where positions [n] of a slot sit in the pool -> (blocks [n], rows in them [n])."""
    return slot.table[positions // BLOCK_TOKENS], positions % BLOCK_TOKENS


def qkv_rope_cache(qkv, bias, step: Step, layer, cos, sin):
    """A step's fused projections qkv [T, (H + 2 KV) * D] (+ bias) -> q [T, H, D] with rope; each
    slot's rope(k) and v go to positions rows - n_new .. rows - 1 of its blocks at `layer`."""
    n_kv, dim = step.slots[0].keys.shape[2], step.slots[0].keys.shape[4]
    positions = np.concatenate([np.arange(slot.rows - slot.n_new, slot.rows) for slot in step.slots])  # [T]
    heads = (qkv if bias is None else qkv + bias).reshape(qkv.shape[0], -1, dim)  # [T, H + 2 KV, D]
    rotated = rope(heads[:, :-n_kv], positions, cos, sin)                         # [T, H + KV, D]
    for slot, start in zip(step.slots, step.starts):
        blocks, rows = cache_rows(slot, np.arange(slot.rows - slot.n_new, slot.rows))
        slot.keys[blocks, layer, :, rows] = rotated[start:start + slot.n_new, -n_kv:]  # [n_new, KV, D]
        slot.values[blocks, layer, :, rows] = heads[start:start + slot.n_new, -n_kv:]
    return rotated[:, :-n_kv]


def cached(pool, slot, layer):
    """A slot's keys (or values) at `layer` from the pool [blocks, layers, KV, BLOCK_TOKENS, D] -> [KV, rows, D]."""
    blocks = pool[slot.table[:-(-slot.rows // BLOCK_TOKENS)], layer]  # [blocks, KV, BLOCK_TOKENS, D]
    return blocks.transpose(1, 0, 2, 3).reshape(blocks.shape[1], -1, blocks.shape[3])[:, :slot.rows]


def step_attention(q, step: Step, layer):
    """q [T, H, D] -> [T, H, D]: each sequence's rows attend over its own cache at `layer`."""
    outs = [attention(q[start:start + slot.n_new], cached(slot.keys, slot, layer), cached(slot.values, slot, layer),
                      slot.rows - slot.n_new)
            for slot, start in zip(step.slots, step.starts)]
    return outs[0] if len(outs) == 1 else np.concatenate(outs)


class ReferenceBackend:
    """Weights and KV cache are NumPy float32 arrays (or QuantizedMatrix weights)."""

    name = "reference"
    xp = np
    dtype = "f32"

    gather = staticmethod(gather)
    rms_norm = staticmethod(rms_norm)
    matmul_transb = project_to_vocab = staticmethod(matmul_transb)
    swiglu = staticmethod(swiglu)
    softmax_causal = staticmethod(softmax_causal)
    attention = staticmethod(attention)
    step_attention = staticmethod(step_attention)

    def __init__(self, config):
        self.cos, self.sin = rope_tables(config.rope_theta, config.head_dim, config.max_position_embeddings)

    def rope(self, x, positions):
        return rope(x, positions, self.cos, self.sin)

    def decode_replay(self, logits_of, ids, step: Step):
        """Nothing to replay: every step runs its ops."""
        return None

    def decoder_layers(self, x, step: Step, layers):
        """No fused form here: the model runs the layers op by op."""
        return None

    def qkv_rope_cache(self, qkv, bias, step: Step, layer):
        return qkv_rope_cache(qkv, bias, step, layer, self.cos, self.sin)

    def upload(self, host_array):
        """A host weight -> the backend's (here: the same object)."""
        return host_array

    def upload_ids(self, ids):
        """Host int64 ids or positions [T] -> backend array."""
        return ids

    def zeros(self, shape):
        return np.zeros(shape, np.float32)

    def to_host(self, x):
        return np.asarray(x, dtype=np.float32)
