"""The CUDA backend: hand-written kernels (kernels/*.cu) plus cuBLAS, on a GPU or on the CPU.

`CudaBackend` holds all of the logic and runs unchanged on the two devices of cuda_device.py
(CuPy on a GPU, cuda-emu on the CPU), which supply only what differs: the array module, the
matmul, the kernel compiler/launcher and the GPU's limits.

Arrays are kept in the storage dtype: float32, float16, or bf16 as uint16 bits (NumPy and CuPy
have no bfloat16; kernels see __nv_bfloat16, cuBLAS sees CUDA_R_16BF). Every kernel computes in
f32. Every kernel family is compiled when the backend starts, so a kernel that does not compile
stops it with one line. Weights are uploaded once, GGML block formats as stored (cuda_quant.py:
kernels/quant.cu multiplies and looks rows up on them), the KV pool lives on the device, and a step
sends up token ids and its tokens' positions and block tables (one small int32 upload, shared by
every layer: rope and attention take the whole step in one launch each) and brings back logits
rows. A decode step replays its CUDA graph (cuda_graph.py) once its shape has been seen twice.
`launches` counts kernel launches, cuBLAS calls and graph replays; a launch over an empty grid is
skipped (CuPy would run one block of it).
"""

import re
import weakref

import numpy as np

from ..dtypes import convert, storage_dtype
from ..errors import PyllmError
from . import kernels_dir, nvrtc
from ..weights import QuantizedMatrix
from .base import BLOCK_TOKENS, CacheSlot, Step
from .cuda_attention import (ATTENTION_THREADS, StepTokens, attention_max_keys, attention_shared_bytes,
                             attention_splits, shared_memory_opt_in, token_rows)
from .cuda_device import check_dtype_on
from .cuda_graph import DecodeGraphs
from .cuda_quant import DeviceBlocks, QuantizedOps
from .kernel_source import expand_local_includes
from .reference import rope_tables

SCALAR_TYPES = {"f32": "float", "f16": "__half", "bf16": "__nv_bfloat16"}  # SCALAR_T per dtype
ROW_THREADS = 256        # rms_norm, gather, softmax: one block per row
SWIGLU_THREADS = 256     # one thread per output
ROPE_THREADS = 128       # one block per token
_ERROR_LINE = re.compile(r"^.*\berror\b.*$", re.M)


def first_error_line(log: str) -> str:
    """The compiler's first line naming an error (else the log's first line), for a one-line message."""
    match = _ERROR_LINE.search(log)
    return (match.group(0) if match else log.strip().partition("\n")[0]).strip()


class CudaBackend(QuantizedOps):
    """Kernels and cuBLAS over a device (CupyDevice or EmuDevice); the contract of base.Backend."""

    def __init__(self, config, dtype: str | None, device):
        self.device, self.name, self.xp = device, device.name, device.xp
        self.dtype = dtype or config.dtype
        self.storage = storage_dtype(self.dtype)
        check_dtype_on(self.dtype, device.limits)
        cos, sin = rope_tables(config.rope_theta, config.head_dim, config.max_position_embeddings)
        self.cos, self.sin = self.xp.asarray(cos), self.xp.asarray(sin)  # [positions, D/2] f32
        self.launches = 0
        self._modules = {path.stem: self._compile(path) for path in sorted(kernels_dir().glob("*.cu"))}
        self._functions = {}
        self._attention_opted_in = False
        self._step_tokens_of = None  # (weakref to the Step, its StepTokens), see _step_tokens
        self._max_keys = {}  # head_dim -> attention_max_keys on this GPU
        self.graphs = DecodeGraphs(self)
        self.use_graphs = True  # decode steps replay their CUDA graphs (False: every launch from Python)

    # ---- kernels ------------------------------------------------------------------------
    def _compile(self, path):
        """kernels/<family>.cu for this dtype, its local headers expanded into the source."""
        scalar = f"-DSCALAR_T={SCALAR_TYPES[self.dtype]}"
        variant = next(v for v in nvrtc.kernel_variants(path) if scalar in v)
        try:
            return self.device.compile(expand_local_includes(path), (*nvrtc.DEFAULT_OPTIONS, *variant))
        except self.device.compile_error as exc:
            raise PyllmError(f"the {self.name} backend cannot compile kernels/{path.name} for {self.dtype}: "
                             f"{first_error_line(str(exc))}") from None

    def _function(self, family: str, name: str):
        if (family, name) not in self._functions:
            self._functions[family, name] = self._modules[family].get_function(name)
        return self._functions[family, name]

    def _launch(self, family, name, grid, block, args, shared_mem=0):
        if 0 in grid:  # nothing to compute; CuPy would launch one block of a zero-sized grid
            return
        self.launches += 1
        self.device.launch(self._function(family, name), grid, block, args, shared_mem)

    def _gemm(self, a, b, c, alpha, beta):
        self.launches += 1
        self.device.gemm(a, b, c, alpha, beta, self.dtype)

    def _empty(self, shape):
        return self.device.empty(shape, self.dtype)

    # ---- operators (shapes as in base.Backend) --------------------------------------------
    def gather(self, table, ids):
        """table [rows, hidden] (an array or DeviceBlocks), ids [n] (int64 on the device) -> [n, hidden]."""
        if isinstance(table, DeviceBlocks):
            return self._dequantize(table, ids)
        out = self._empty((ids.shape[0], table.shape[1]))
        self._launch("gather", "gather", (ids.shape[0],), (ROW_THREADS,),
                     (table, ids, out, np.int32(table.shape[1])))
        return out

    def rms_norm(self, x, weight, eps):
        """x [T, hidden], weight [hidden] -> [T, hidden]."""
        out = self._empty(x.shape)
        self._launch("rms_norm", "rms_norm", (x.shape[0],), (ROW_THREADS,),
                     (x, weight, out, np.int32(x.shape[1]), np.float32(eps)))
        return out

    def rope(self, x, positions):
        """x [T, heads, D], positions [T] (int64 on the device) -> [T, heads, D]."""
        x = self.xp.ascontiguousarray(x)
        out = self._empty(x.shape)
        self._launch("rope", "rope", (x.shape[0],), (ROPE_THREADS,),
                     (x, positions, self.cos, self.sin, out, np.int32(x.shape[1]), np.int32(x.shape[2])))
        return out

    def qkv_rope_cache(self, qkv, bias, step: Step, layer):
        """A step's qkv [T, (H + 2 KV) * D] (+ bias) -> q [T, H, D] with rope; one launch writes every
        sequence's q rows and its rope(k), v rows into the pools through its block table."""
        pool = step.slots[0].keys  # [blocks, layers, KV, BLOCK_TOKENS, D]
        layers, n_kv, dim = pool.shape[1], pool.shape[2], pool.shape[4]
        n_heads = qkv.shape[1] // dim - 2 * n_kv
        q = self._empty((qkv.shape[0], n_heads, dim))
        tokens, tables, _ = self._step_tokens(step)
        self._launch("rope", "qkv_rope_cache", (qkv.shape[0],), (ROPE_THREADS,),
                     (qkv, bias, self.cos, self.sin, q, pool, step.slots[0].values, tokens, tables,
                      np.int32(n_heads), np.int32(n_kv), np.int32(dim), np.int32(layers), np.int32(layer)))
        return q

    def matmul_transb(self, a, b, alpha=1.0, beta=0.0, c=None, bias=None):
        """C = alpha * A @ B^T (+ bias) + beta * C: a [M, K], b [N, K] (an array, DeviceBlocks, or a
        tuple of them: their products side by side), bias [N], c [M, N] (in place)."""
        parts, a = (b if isinstance(b, tuple) else (b,)), self.xp.ascontiguousarray(a)  # once for every part
        accumulate = c is not None and beta != 0.0
        out = c if accumulate else self._empty((a.shape[0], sum(part.shape[0] for part in parts)))
        start = 0
        for part in parts:
            cols = slice(start, start + part.shape[0])
            self._product(a, part, out[:, cols], alpha, beta if accumulate else 0.0,
                          None if bias is None else bias[cols])
            start = cols.stop
        return out

    def _product(self, a, b, out, alpha, beta, bias):
        """out = alpha * a [M, K] @ b^T (+ bias [N]) + beta * out for one matrix b [N, K]; out [M, N]
        (a view of the whole output) is written in place."""
        if isinstance(b, DeviceBlocks):
            self._blocks_product(a, b, out, alpha, beta, bias)
            return
        self._gemm(a, b, out, alpha, beta)
        if bias is not None:  # gemm has no bias term: add it as the rank-1 product ones [M, 1] @ bias [1, N]
            ones = self.upload(convert(np.ones((a.shape[0], 1), np.float32), "f32", self.dtype))
            self._gemm(ones, bias.reshape(-1, 1), out, 1.0, 1.0)

    def decoder_layers(self, x, step: Step, layers):
        """No fused form here: the model runs the layers op by op."""
        return None

    def project_to_vocab(self, x, weight):
        return self.matmul_transb(x, weight)

    def swiglu(self, gate_up):
        """gate_up [T, 2 * inter] (gate | up) -> silu(gate) * up [T, inter]."""
        n_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = self._empty((n_tokens, inter))
        grid = (n_tokens, -(-inter // SWIGLU_THREADS))
        self._launch("swiglu", "swiglu", grid, (SWIGLU_THREADS,), (gate_up, out, np.int32(inter)))
        return out

    def softmax_causal(self, scores, offset):
        """Masked causal softmax over the last axis, in place: scores [heads, q_len, kv_len]."""
        heads, q_len, kv_len = scores.shape
        self._launch("softmax", "softmax_causal", (q_len, heads), (ROW_THREADS,),
                     (scores, np.int32(q_len), np.int32(kv_len), np.int32(offset)))
        return scores

    def decode_replay(self, logits_of, ids, step: Step):
        """The step's CUDA graph replayed (cuda_graph.py), or None: graphs off, or a shape's
        first, eager step."""
        return self.graphs.run(logits_of, ids, step) if self.use_graphs else None

    def step_attention(self, q, step: Step, layer, splits: int | None = None):
        """q [T, H, D] -> [T, H, D]: every sequence's tokens over its blocks of the pools in one
        launch (plus a merge where the keys are split: attention_splits, or `splits` if given)."""
        return self._attend(self.xp.ascontiguousarray(q), step.slots[0].keys, step.slots[0].values,
                            self._step_tokens(step), layer, splits)

    def attention(self, q, k, v, offset, splits: int | None = None):
        """q [T, H, D] at positions offset .. offset + T - 1, k, v [KV, offset + T, D] (one sequence's,
        outside any pool) -> [T, H, D]: the same kernel over a one-layer pool that holds k and v in
        blocks 0, 1, ... (a copy; for tests)."""
        n_kv, kv_len, dim = k.shape
        if kv_len != offset + q.shape[0]:
            raise ValueError(f"{kv_len} keys for queries at positions {offset} .. {offset + q.shape[0] - 1}")
        n_blocks = -(-kv_len // BLOCK_TOKENS)

        def pool(x):  # [KV, L, D] -> [n_blocks, 1, KV, BLOCK_TOKENS, D], rows past L zero
            padded = self.xp.zeros((n_kv, n_blocks * BLOCK_TOKENS, dim), x.dtype)
            padded[:, :kv_len] = x
            return self.xp.ascontiguousarray(padded.reshape(n_kv, n_blocks, 1, BLOCK_TOKENS, dim)
                                             .transpose(1, 2, 0, 3, 4))

        slot = CacheSlot(None, None, None, kv_len, q.shape[0])  # one sequence, its table blocks 0, 1, ...
        step = StepTokens(self.upload(token_rows([slot], [0])), self.upload(np.arange(n_blocks, dtype=np.int32)), kv_len)
        return self._attend(self.xp.ascontiguousarray(q), pool(k), pool(v), step, 0, splits)

    def _attend(self, q, k_pool, v_pool, step: StepTokens, layer, splits):
        """kernels/attention.cu: q [T, H, D], each token over its sequence's keys in the pools
        [blocks, layers, KV, BLOCK_TOKENS, D] at `layer`, as `step` places them -> out [T, H, D]."""
        (n_tokens, n_heads, dim), (layers, n_kv) = q.shape, k_pool.shape[1:3]
        out = self._empty(q.shape)
        kernel = self._function("attention", "attention")
        splits = splits or attention_splits(step.max_keys, n_tokens * n_heads, self.device.limits.multiprocessors,
                                            self._attention_max_keys(dim))
        chunk = -(-step.max_keys // splits)
        shared = attention_shared_bytes(dim, chunk)
        self._opt_in_to_shared_memory(kernel, shared)
        partial = stats = None
        if splits > 1:
            partial = self.device.empty((splits, n_tokens, n_heads, dim), "f32")
            stats = self.device.empty((splits, n_tokens, n_heads, 2), "f32")
        self._launch("attention", "attention", (n_tokens, n_heads, splits), (ATTENTION_THREADS,),
                     (q, k_pool, v_pool, step.tokens, step.tables, out, partial, stats, np.int32(n_kv), np.int32(dim),
                      np.int32(layers), np.int32(layer), np.int32(chunk)), shared)
        if splits > 1:
            self._launch("attention", "attention_merge", (n_tokens, n_heads), (ATTENTION_THREADS,),
                         (partial, stats, out, np.int32(dim), np.int32(splits)))
        return out

    def _step_tokens(self, step: Step) -> StepTokens:
        """The step's StepTokens: a graph's own buffers (step.device), or uploaded together at the
        step's first layer (one transfer) and reused by every layer after it."""
        if step.device:
            return step.device
        if self._step_tokens_of is None or self._step_tokens_of[0]() is not step:
            tables = [np.asarray(slot.table, np.int32) for slot in step.slots]
            tokens = token_rows(step.slots, np.cumsum([0] + [len(t) for t in tables]))
            device = self.upload(np.concatenate([tokens.ravel(), *tables]))
            self._step_tokens_of = weakref.ref(step), StepTokens(device[:tokens.size].reshape(tokens.shape),
                                                                 device[tokens.size:],
                                                                 max(slot.rows for slot in step.slots))
        return self._step_tokens_of[1]

    def _attention_max_keys(self, head_dim: int) -> int:
        """The most keys one attention block scores at this head_dim on this GPU (asked of the
        kernel once per head_dim, not at every launch)."""
        if head_dim not in self._max_keys:
            static = self._function("attention", "attention").shared_size_bytes
            self._max_keys[head_dim] = attention_max_keys(head_dim, static, self.device.limits.shared_optin_bytes)
        return self._max_keys[head_dim]

    def _opt_in_to_shared_memory(self, kernel, shared: int):
        """Past 48 KiB of shared memory a block must opt in: once, to the GPU's whole range (the
        splits keep every block within it)."""
        opt_in = shared_memory_opt_in(kernel.shared_size_bytes, shared, self.device.limits.shared_optin_bytes)
        if opt_in is not None and not self._attention_opted_in:
            kernel.max_dynamic_shared_size_bytes = opt_in
            self._attention_opted_in = True

    # ---- memory -------------------------------------------------------------------------
    def upload(self, host_array):
        """Host weight -> device: an array already in the storage dtype (see weights.load_weights;
        f32 GGUF tensors are converted here), a QuantizedMatrix (cuda_quant.py), a tuple of them
        (parts that all became arrays of the compute dtype stack into one); or a step's int32 block tables."""
        self._not_capturing("an array")
        if isinstance(host_array, tuple):
            parts = tuple(self.upload(part) for part in host_array)
            return parts if any(isinstance(part, DeviceBlocks) for part in parts) else self.xp.concatenate(parts)
        if isinstance(host_array, QuantizedMatrix):
            return self._upload_quantized(host_array)
        if host_array.dtype == np.float32 and self.dtype != "f32":  # an f32 GGUF tensor for a 16-bit run
            host_array = convert(host_array, "f32", self.dtype)
        return self.xp.asarray(host_array)

    def upload_ids(self, ids):
        """Host int64 ids or positions [T] -> device array."""
        self._not_capturing("token ids")
        return self.xp.asarray(np.asarray(ids, dtype=np.int64))

    def _not_capturing(self, what: str):
        """A copy from the host cannot be part of a graph (CUDA refuses it while capturing)."""
        if self.device.capturing is not None:
            raise PyllmError(f"{what} uploaded while a CUDA graph is being captured: a graph's inputs "
                             "must sit in its own buffers")

    def zeros(self, shape):
        return self.xp.zeros(shape, self.storage)

    def to_host(self, x) -> np.ndarray:
        """Device array of the storage dtype -> host float32."""
        return convert(self.device.to_numpy(x), self.dtype, "f32")
