"""The CUDA backend: hand-written kernels (kernels/*.cu) plus cuBLAS, on a GPU or on the CPU.

`CudaBackend` holds all of the logic and runs unchanged on two devices, which supply only what
differs: the array module, the matmul, and the kernel compiler/launcher.

* `CupyDevice` ("cuda"): CuPy arrays, cuBLAS gemmEx with f32 compute, cupy.RawModule (NVRTC).
* `EmuDevice` ("cuda-emu"): NumPy arrays, NumPy matmul in f32 rounded once to the storage dtype
  (what cuBLAS does with f32 compute), and the cuda_emu executor, which runs the same .cu files on
  the CPU with CUDA semantics. Slow, but it proves the kernels without a GPU.

Arrays are kept in the storage dtype: float32, float16, or bf16 as uint16 bits (NumPy and CuPy
have no bfloat16; kernels see __nv_bfloat16, cuBLAS sees CUDA_R_16BF). Every kernel computes in
f32. Weights are uploaded once, the KV cache lives on the device, and a decode step sends up
token ids and brings back logits rows. `launches` counts kernel launches and cuBLAS calls.
"""

import numpy as np

from ..dtypes import convert, storage_dtype
from ..errors import PyllmError
from . import kernels_dir, nvrtc
from ..weights import QuantizedMatrix
from .base import Step
from .reference import rope_tables

SCALAR_TYPES = {"f32": "float", "f16": "__half", "bf16": "__nv_bfloat16"}  # SCALAR_T per dtype
ROW_THREADS = 256        # rms_norm, gather, softmax: one block per row
SWIGLU_THREADS = 256     # one thread per output
ROPE_THREADS = 128       # one block per token
ATTENTION_THREADS = 128  # one block per (token, query head)
CUDA_DATA_TYPES = {"f32": 0, "f16": 2, "bf16": 14}  # cudaDataType_t: CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF
CUBLAS_COMPUTE_32F = 68  # cublasComputeType_t: f32 accumulation for every storage dtype


def attention_shared_bytes(head_dim: int, kv_len: int, threads: int = ATTENTION_THREADS) -> int:
    """Dynamic shared memory of kernels/attention.cu: q [D] | scores [kv_len] | partial sums."""
    n_slices = max(1, threads // head_dim)
    return 4 * (head_dim + kv_len + n_slices * head_dim)


class CupyDevice:
    """A real GPU through CuPy."""

    name = "cuda"

    def __init__(self):
        try:
            import cupy
        except ImportError:
            raise PyllmError("--backend cuda needs CuPy, which is not installed "
                             "(pip install cupy-cuda12x)") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            missing = "no CUDA GPU found" if "NoDevice" in str(exc) else "no working CUDA driver"
            raise PyllmError(f"--backend cuda: {missing} ({exc})") from None
        if count == 0:
            raise PyllmError("--backend cuda: CuPy finds no CUDA GPU")
        self.xp = cupy

    def compile(self, source: str, options: tuple):
        include = nvrtc.cuda_include_dir()  # cuda_fp16.h for NVRTC, if CuPy's toolkit lacks it
        return self.xp.RawModule(code=source, options=options + ((f"-I{include}",) if include else ()))

    def launch(self, kernel, grid, block, args, shared_mem):
        kernel(grid, block, args, shared_mem=shared_mem)

    def gemm(self, a, b, c, alpha: float, beta: float, dtype: str):
        """c = alpha * a @ b.T + beta * c; a [M, K], b [N, K], c [M, N], rows contiguous.

        cuBLAS is column-major, where our row-major c [M, N] reads as c^T [N, M]. So it is asked
        for c^T = b a^T: first operand b transposed (OP_T), second operand a as stored (OP_N)."""
        from cupy.cuda import cublas, device
        (m, k), n, kind = a.shape, b.shape[0], CUDA_DATA_TYPES[dtype]
        scalars = np.array([alpha, beta], np.float32)  # host pointers, f32 as the compute type wants
        cublas.gemmEx(device.get_cublas_handle(), cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, m, k,
                      scalars.ctypes.data, b.data.ptr, kind, _row_stride(b),
                      a.data.ptr, kind, _row_stride(a), scalars[1:].ctypes.data,
                      c.data.ptr, kind, _row_stride(c), CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)

    def to_numpy(self, x) -> np.ndarray:
        return x.get()


class EmuDevice:
    """The CPU: NumPy arrays stand in for device memory, cuda_emu runs the kernels."""

    name = "cuda-emu"
    xp = np

    def compile(self, source: str, options: tuple):
        from .cuda_emu import Module
        return Module(code=source, options=options)

    def launch(self, kernel, grid, block, args, shared_mem):
        kernel(grid, block, tuple(_flat_alias(a) for a in args), shared_mem=shared_mem)

    def gemm(self, a, b, c, alpha: float, beta: float, dtype: str):
        """c = alpha * a @ b.T + beta * c in f32, rounded once to the storage dtype, like cuBLAS."""
        product = convert(a, dtype, "f32") @ convert(b, dtype, "f32").T
        if alpha != 1.0:
            product *= np.float32(alpha)
        if beta != 0.0:
            product += np.float32(beta) * convert(c, dtype, "f32")
        c[...] = convert(product, "f32", dtype)

    def to_numpy(self, x) -> np.ndarray:
        return x


def _row_stride(x) -> int:
    if x.strides[-1] != x.itemsize:
        raise ValueError("cuBLAS needs matrices whose rows are contiguous")
    return x.strides[0] // x.itemsize


def _flat_alias(x):
    """A strided NumPy view as the C-contiguous 1-D array starting at its first element, so the
    executor accepts it: like a GPU kernel, the kernel gets a bare pointer and its own strides."""
    if not isinstance(x, np.ndarray) or x.flags.c_contiguous:
        return x
    extent = sum((n - 1) * s for n, s in zip(x.shape, x.strides)) // x.itemsize + 1
    return np.lib.stride_tricks.as_strided(x, shape=(extent,), strides=(x.itemsize,))


class CudaBackend:
    """Kernels and cuBLAS over a device (CupyDevice or EmuDevice); the contract of base.Backend."""

    def __init__(self, config, dtype: str | None, device):
        self.device, self.name, self.xp = device, device.name, device.xp
        self.dtype = dtype or config.dtype
        self.storage = storage_dtype(self.dtype)
        cos, sin = rope_tables(config.rope_theta, config.head_dim, config.max_position_embeddings)
        self.cos, self.sin = self.xp.asarray(cos), self.xp.asarray(sin)  # [positions, D/2] f32
        self.launches = 0
        self._modules, self._functions = {}, {}

    # ---- kernels ------------------------------------------------------------------------
    def _function(self, family: str, name: str):
        """Kernel `name` of kernels/<family>.cu for this dtype, compiled on first use."""
        if family not in self._modules:
            path = kernels_dir() / f"{family}.cu"
            scalar = f"-DSCALAR_T={SCALAR_TYPES[self.dtype]}"
            variant = next(v for v in nvrtc.kernel_variants(path) if scalar in v)
            options = (*nvrtc.DEFAULT_OPTIONS, *variant, f"-I{path.parent}")
            self._modules[family] = self.device.compile(path.read_text(encoding="utf-8"), options)
        if (family, name) not in self._functions:
            self._functions[family, name] = self._modules[family].get_function(name)
        return self._functions[family, name]

    def _launch(self, family, name, grid, block, args, shared_mem=0):
        self.launches += 1
        self.device.launch(self._function(family, name), grid, block, args, shared_mem)

    def _gemm(self, a, b, c, alpha, beta):
        self.launches += 1
        self.device.gemm(a, b, c, alpha, beta, self.dtype)

    def _empty(self, shape):
        return self.xp.empty(shape, self.storage)

    # ---- operators (shapes as in base.Backend) --------------------------------------------
    def gather(self, table, ids):
        """table [rows, hidden], ids [n] (int64 on the device) -> [n, hidden]."""
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
        """A step's qkv [T, (H + 2 KV) * D] (+ bias) -> q [T, H, D] with rope; one launch per
        sequence writes its q rows and its rope(k), v cache rows (each cache has its own capacity)."""
        n_kv, dim = step.slots[0].keys.shape[1], step.slots[0].keys.shape[3]
        n_heads = qkv.shape[1] // dim - 2 * n_kv
        q = self._empty((qkv.shape[0], n_heads, dim))
        for slot, row in zip(step.slots, step.starts):
            n = slot.n_new
            self._launch("rope", "qkv_rope_cache", (int(n),), (ROPE_THREADS,),
                         (qkv[row:row + n], bias, self.cos, self.sin, q[row:row + n], slot.keys[layer],
                          slot.values[layer], np.int32(n_heads), np.int32(n_kv), np.int32(dim),
                          np.int32(slot.rows - n), np.int32(slot.keys.shape[2])))
        return q

    def matmul_transb(self, a, b, alpha=1.0, beta=0.0, c=None, bias=None):
        """C = alpha * A @ B^T (+ bias) + beta * C: a [M, K], b [N, K], bias [N], c [M, N] (in place)."""
        accumulate = c is not None and beta != 0.0
        out = c if accumulate else self._empty((a.shape[0], b.shape[0]))
        self._gemm(a, b, out, alpha, beta if accumulate else 0.0)
        if bias is not None:  # gemm has no bias term: add it as the rank-1 product ones [M, 1] @ bias [1, N]
            ones = self.upload(convert(np.ones((a.shape[0], 1), np.float32), "f32", self.dtype))
            self._gemm(ones, bias.reshape(-1, 1), out, 1.0, 1.0)
        return out

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

    def step_attention(self, q, step: Step, layer):
        """q [T, H, D] -> [T, H, D]: one attention launch per sequence over its cache."""
        outs = [self.attention(q[row:row + slot.n_new], slot.keys[layer, :, :slot.rows],
                               slot.values[layer, :, :slot.rows], slot.rows - slot.n_new)
                for slot, row in zip(step.slots, step.starts)]
        return outs[0] if len(outs) == 1 else self.xp.concatenate(outs)

    def attention(self, q, k, v, offset):
        """q [T, H, D], k, v [KV, L, D] (views into the cache: rows contiguous, heads strided) -> [T, H, D]."""
        q = self.xp.ascontiguousarray(q)
        (n_tokens, n_heads, dim), (n_kv, kv_len, _) = q.shape, k.shape
        if k.strides != v.strides or k.strides[1:] != (dim * k.itemsize, k.itemsize):
            raise ValueError("attention needs k and v with contiguous rows and equal strides")
        out = self._empty(q.shape)
        shared = attention_shared_bytes(dim, kv_len)
        kernel = self._function("attention", "attention")
        if shared > kernel.max_dynamic_shared_size_bytes:  # long contexts opt in beyond 48 KiB
            kernel.max_dynamic_shared_size_bytes = shared
        self._launch("attention", "attention", (n_tokens, n_heads), (ATTENTION_THREADS,),
                     (q, k, v, out, np.int32(n_kv), np.int32(dim), np.int32(kv_len),
                      np.int64(k.strides[0] // k.itemsize), np.int32(offset)), shared)
        return out

    # ---- memory -------------------------------------------------------------------------
    def upload(self, host_array):
        """Host array, already in the storage dtype (weights.load_weights) -> device array."""
        for part in host_array if isinstance(host_array, tuple) else (host_array,):
            if isinstance(part, QuantizedMatrix):
                raise PyllmError(f"the {self.name} backend does not compute on {part.format.name} weights yet; "
                                 f"use --backend cpu, or a safetensors model without --quantize")
        if host_array.dtype == np.float32 and self.dtype != "f32":  # an f32 GGUF tensor for a 16-bit run
            host_array = convert(host_array, "f32", self.dtype)
        return self.xp.asarray(host_array)

    def upload_ids(self, ids):
        """Host int64 ids or positions [T] -> device array."""
        return self.xp.asarray(np.asarray(ids, dtype=np.int64))

    def zeros(self, shape):
        return self.xp.zeros(shape, self.storage)

    def to_host(self, x) -> np.ndarray:
        """Device array of the storage dtype -> host float32."""
        return convert(self.device.to_numpy(x), self.dtype, "f32")
