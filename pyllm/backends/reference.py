"""NumPy operators: the CPU path and the reference the other backends are tested against.

Every operator works in float32. Shapes use T = new tokens (all sequences of a batch
concatenated), H = query heads, KV = key/value heads, D = head_dim, L = cached + new tokens.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import CORES, cpu_kernels

BLOCKED_MAX_ROWS = 8  # without the C kernel, OpenBLAS's small-matrix kernel in blocks wins up to here
_pool = ThreadPoolExecutor(max_workers=max(CORES - 1, 1))


def gather(table, ids):
    """Embedding lookup: table [vocab, hidden], ids [T] -> [T, hidden]."""
    return table[ids]


def rms_norm(x, weight, eps):
    """x [T, hidden], weight [hidden] -> [T, hidden]; statistics in f32 as HF's LlamaRMSNorm."""
    out = cpu_kernels.rms_norm(x, weight, eps)  # the C kernel where built: one pass, no temporaries
    if out is not None:
        return out
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


SKINNY_BLOCK = 64  # weight rows per call: measured best across SmolLM2's shapes at 4 and 8 rows


def _blocked_matmul_transb(a, b):
    """a [M, K] @ b[N, K]^T for 2 <= M <= 8 -> [M, N] through OpenBLAS, where the C kernel is not.

    One big call for a few rows makes OpenBLAS pack the whole weight and run its general kernel
    (~7 GB/s here). Cutting b into blocks of 64 rows keeps each call inside OpenBLAS's
    small-matrix kernel, and the blocks are shared among the cores by Python threads (the GIL is
    released inside matmul): ~1.7x faster. Blocks are views, so the weights keep one layout.
    """
    n_blocks = b.shape[0] // SKINNY_BLOCK
    if n_blocks == 0:
        return a @ b.T
    full = n_blocks * SKINNY_BLOCK
    blocks = b[:full].reshape(n_blocks, SKINNY_BLOCK, -1).transpose(0, 2, 1)  # [n_blocks, K, 64]
    step = -(-n_blocks // CORES)
    futures = [_pool.submit(np.matmul, a, blocks[lo:lo + step]) for lo in range(step, n_blocks, step)]
    results = [np.matmul(a, blocks[:step])] + [f.result() for f in futures]  # each [blocks, M, 64]
    out = np.concatenate(results).transpose(1, 0, 2).reshape(a.shape[0], full)
    return out if full == b.shape[0] else np.concatenate([out, a @ b[full:].T], axis=1)


def matmul_transb(a, b, alpha=1.0, beta=0.0, c=None, bias=None):
    """C = alpha * A @ B^T (+ bias) + beta * C: a [M, K], b [N, K], bias [N], c [M, N] (updated in place)."""
    # the C kernels (cpu_kernels.py) where built: they stream the weights at memory speed for the
    # few rows of a decode step, and share this pool's threads with the other kernels for a prompt;
    # else OpenBLAS, in blocks for a few rows (its general kernel streams them at a fraction of that)
    plain_residual = c is not None and beta == 1.0 and alpha == 1.0 and bias is None
    product = cpu_kernels.matmul_transb(a, b, add_to=c if plain_residual else None)
    if product is not None and plain_residual:
        return product
    if product is None:
        product = _blocked_matmul_transb(a, b) if 1 < a.shape[0] <= BLOCKED_MAX_ROWS else a @ b.T
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


def swiglu(gate_up):
    """gate_up [T, 2 * inter] (gate | up) -> silu(gate) * up [T, inter]."""
    out = cpu_kernels.swiglu(gate_up)  # the C kernel where built
    if out is not None:
        return out
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


class NumpyBackend:
    """The CPU backend: weights and KV cache are NumPy float32 arrays."""

    name = "cpu"
    xp = np
    dtype = "f32"

    gather = staticmethod(gather)
    rms_norm = staticmethod(rms_norm)
    matmul_transb = staticmethod(matmul_transb)
    swiglu = staticmethod(swiglu)
    softmax_causal = staticmethod(softmax_causal)
    attention = staticmethod(attention)

    def __init__(self, config, dtype=None):
        self.cos, self.sin = rope_tables(config.rope_theta, config.head_dim, config.max_position_embeddings)
        cpu_kernels.available()  # built (once per machine) or loaded now, while the model loads, not at its first token

    def rope(self, x, positions):
        return rope(x, positions, self.cos, self.sin)

    def qkv_rope_cache(self, qkv, bias, slots, layer):
        """A step's fused projections qkv [T, (H + 2 KV) * D] (+ bias) -> q [T, H, D] with rope.

        slots: one (k_cache, v_cache [layers, KV, capacity, D], length, n_new) per sequence, in row
        order (KVCache.step_slot): that sequence's rope(k) and v go into rows length - n_new ..
        length - 1 of its caches at `layer`. One op, so this backend ropes the whole batch at once
        (a decode step would otherwise pay a dozen small NumPy calls per sequence) and the cuda one
        fuses each sequence's epilogue into one launch.
        """
        q = cpu_kernels.qkv_rope(qkv, bias, slots, layer, self.cos, self.sin)  # the C kernel where built
        if q is not None:
            return q
        n_kv, dim = slots[0][0].shape[1], slots[0][0].shape[3]
        positions = np.concatenate([np.arange(length - n, length) for _, _, length, n in slots])  # [T]
        heads = (qkv if bias is None else qkv + bias).reshape(qkv.shape[0], -1, dim)  # [T, H + 2 KV, D]
        rotated = rope(heads[:, :-n_kv], positions, self.cos, self.sin)               # [T, H + KV, D]
        row = 0
        for k_cache, v_cache, length, n in slots:
            k_cache[layer, :, length - n:length] = rotated[row:row + n, -n_kv:].transpose(1, 0, 2)
            v_cache[layer, :, length - n:length] = heads[row:row + n, -n_kv:].transpose(1, 0, 2)
            row += n
        return rotated[:, :-n_kv]

    @staticmethod
    def batch_attention(q, slots, layer):
        """A step's attention for every sequence at once: q [T, H, D], the sequences' new tokens in
        order; slots as qkv_rope_cache's, the same list for every layer of the step -> [T, H, D], or
        None (no C kernel here): then the model attends sequence by sequence with attention() above."""
        return cpu_kernels.attention(q, slots, layer)

    def upload(self, host_array):
        """Host f32 array -> backend array (here: the same array)."""
        return host_array

    def upload_ids(self, ids):
        """Host int64 ids or positions [T] -> backend array."""
        return ids

    def zeros(self, shape):
        return np.zeros(shape, np.float32)

    def to_host(self, x):
        return np.asarray(x, dtype=np.float32)
