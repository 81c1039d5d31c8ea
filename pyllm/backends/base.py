"""The backend contract: the ops model.py calls, with their shapes, and the per-step record.

Shapes: T = new tokens of a step (all sequences concatenated), H = query heads, KV = key/value
heads, D = head_dim, hidden = the model width. A weight matrix is [N, K] (N outputs, K inputs):
an array in the backend's dtype, or a QuantizedMatrix (pyllm/weights.py) that a backend computes
on as it is stored. A step may also pass a tuple of matrices with the same K; their products come
back side by side (q | k | v or gate | up kept apart because their formats differ).
"""

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol


BLOCK_TOKENS = 16  # tokens per block of the KV pool


class CacheSlot(NamedTuple):
    """What one sequence's step writes and reads in the model's KV pool, the same in every layer:
    its token at position p sits in block table[p // BLOCK_TOKENS], row p % BLOCK_TOKENS."""
    keys: Any    # the pool's keys [blocks, layers, KV, BLOCK_TOKENS, D]
    values: Any  # the pool's values, the same
    table: Any   # host int32 [ceil(rows / BLOCK_TOKENS)]: the sequence's blocks in order
    rows: int    # cached + new tokens: attention reads positions 0 .. rows - 1
    n_new: int   # the new tokens, written at positions rows - n_new .. rows - 1


@dataclass
class Step:
    """One forward step over a ragged batch, built once and handed to every layer."""
    slots: list[CacheSlot]  # per sequence, in row order
    starts: list[int]       # [sequences + 1]: sequence s owns rows starts[s] .. starts[s + 1] - 1
    device: Any = None      # a backend's own form of the step, where it keeps one (a CUDA graph's StepTokens)

    def __post_init__(self):
        self.slots = [CacheSlot(*slot) for slot in self.slots]

    @property
    def n_tokens(self) -> int:
        return self.starts[-1]


class Backend(Protocol):
    name: str   # "reference" | "cpu" | "cuda" | "cuda-emu"
    dtype: str  # compute dtype: f32 | f16 | bf16
    xp: Any     # the array module (numpy or cupy)

    def gather(self, table, ids):
        """table [rows, hidden] (array or QuantizedMatrix), ids [T] -> [T, hidden]."""

    def rms_norm(self, x, weight, eps):
        """x [T, hidden], weight [hidden] -> [T, hidden]."""

    def matmul_transb(self, a, b, alpha=1.0, beta=0.0, c=None, bias=None):
        """alpha * a [M, K] @ b [N, K]^T (+ bias [N]) + beta * c [M, N] (c updated in place)."""

    def decode_replay(self, logits_of, ids, step: Step):
        """A decode step (one new token per sequence, ids [S]) as a replay of what logits_of(ids on
        the device, step) launched before -> logits [S, vocab] on the device; None where the
        backend has no replay for it (the model then calls logits_of itself)."""

    def decoder_layers(self, x, step: Step, layers):
        """x [T, hidden] through every layer at once, where the backend can -> x advanced; None
        where it cannot (the model then runs the ops below layer by layer)."""

    def project_to_vocab(self, x, weight):
        """x [T, hidden] @ weight [vocab, hidden]^T -> logits [T, vocab]: the one matmul read as
        probabilities, which a backend may compute more exactly than the others."""

    def swiglu(self, gate_up):
        """gate_up [T, 2 * inter] (gate | up) -> silu(gate) * up [T, inter]."""

    def qkv_rope_cache(self, qkv, bias, step: Step, layer: int):
        """qkv [T, (H + 2 KV) * D] (+ bias) -> q [T, H, D] roped; rope(k) and v into each slot's cache."""

    def step_attention(self, q, step: Step, layer: int):
        """q [T, H, D] -> [T, H, D]: each sequence's new tokens attend causally over its cache."""

    def upload(self, host_array):
        """A host weight (array or QuantizedMatrix) -> the backend's form of it."""

    def upload_ids(self, ids):
        """Host int64 ids or positions [T] -> backend array."""

    def zeros(self, shape):
        """A zero array of the compute dtype (KV caches)."""

    def to_host(self, x):
        """Backend array -> host float32."""
