"""Model weights: the matrices a backend computes on, and safetensors reading.

A matrix is an array in the backend's dtype, or a QuantizedMatrix: kept in its storage format
(GGML blocks, f16 or bf16 bits) and computed on as it is stored. GGUF files load in their own
formats (gguf_model.py); safetensors load in the backend's dtype, or quantized while loading.

We parse the safetensors header ourselves (8-byte length + JSON) and read each tensor with one
`readinto`, so loading never holds a second copy of the file: f32 lands in place, f16/bf16 pass
through one tensor-sized buffer. Fused matrices (q|k|v, gate|up) are filled slice by slice.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dtypes import SAFETENSORS_DTYPES, STORAGE, convert
from .errors import PyllmError
from .formats import Format, format_named


@dataclass
class QuantizedMatrix:
    """A weight matrix [N, K] in its storage format: row n is data[n] (K / block_size blocks)."""
    format: Format
    shape: tuple[int, int]  # (N, K): the f32 matrix it stands for
    data: np.ndarray        # [N, format.row_bytes(K)] uint8, or [N, K] float16 / uint16 (bf16 bits)
    interleaved: bool = False  # reordered by the CPU backend for its kernels, 16 rows a group (kernels/cpu/interleave.c)

    @classmethod
    def quantize(cls, matrix: np.ndarray, fmt: Format, name: str) -> "QuantizedMatrix":
        """f32 [N, K] -> that matrix in `fmt`; a row length the format cannot hold is a PyllmError."""
        if fmt.quantize is None:
            raise PyllmError(f"pyllm cannot quantize to {fmt.name}")
        if matrix.shape[1] % fmt.block_size:
            raise PyllmError(f"cannot quantize tensor {name} to {fmt.name}: its rows hold {matrix.shape[1]} "
                             f"weights, not a multiple of the format's block of {fmt.block_size}")
        return cls(fmt, matrix.shape, fmt.quantize(matrix))

    def dequantize(self, rows=None) -> np.ndarray:
        """-> f32 [N, K], or only `rows` (ids [T]) -> [T, K]: a gather dequantizes what it looks up."""
        if self.interleaved:  # only the CPU backend's kernels (AVX-512, or AVX2 alone) make and read that layout
            from .backends import cpu_avx2, cpu_quant
            dequantize = cpu_quant.dequantize if cpu_quant.available() else cpu_avx2.dequantize
            return dequantize(cpu_quant.kernel_type(self), self.data, self.shape[1], rows=rows)
        return self.format.dequantize(self.data if rows is None else self.data[rows])

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def stacked(parts):
    """Matrices with the same K one under the other -> one matrix when their formats agree (rows of
    blocks stack like rows of floats), else the tuple itself (the backend multiplies each)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    if all(isinstance(p, QuantizedMatrix) and p.format == parts[0].format for p in parts):
        return QuantizedMatrix(parts[0].format, (sum(p.shape[0] for p in parts), parts[0].shape[1]),
                               np.concatenate([p.data for p in parts]))
    return tuple(parts)


class SafetensorsIndex:
    """Where each tensor lives: name -> (file, dtype, shape, byte offset, byte length)."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise PyllmError(f"missing file: {model_dir / 'model.safetensors'} (nor a sharded index)")
        self.entries = {}
        for name in files:
            self._read_header(model_dir / name)

    def _read_header(self, path: Path):
        if not path.is_file():
            raise PyllmError(f"missing file: {path}")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PyllmError(f"corrupt safetensors header in {path}: file is {size} bytes")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise PyllmError(f"corrupt safetensors header in {path}: header length {header_len} "
                                 f"exceeds file size {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise PyllmError(f"corrupt safetensors header in {path}: not valid JSON") from None
        data_start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise PyllmError(f"tensor {name} in {path.name} has unsupported dtype {info['dtype']}; "
                                 f"supported: F32, F16, BF16")
            dtype, np_dtype = SAFETENSORS_DTYPES[info["dtype"]]
            if end - begin != np.dtype(np_dtype).itemsize * int(np.prod(info["shape"])) or data_start + end > size:
                raise PyllmError(f"corrupt safetensors header in {path}: tensor {name} has a bad byte range")
            self.entries[name] = (path, dtype, tuple(info["shape"]), data_start + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple:
        return self.entries[name][2]

    def read_into(self, name: str, out: np.ndarray, out_dtype: str):
        """Fill `out` (any shape with the tensor's element count, C-contiguous) with tensor `name`."""
        if name not in self.entries:
            raise PyllmError(f"missing tensor {name} in the checkpoint")
        path, dtype, shape, offset, nbytes = self.entries[name]
        if out.size != int(np.prod(shape)):
            raise PyllmError(f"tensor {name} has shape {list(shape)}, expected {list(out.shape)}")
        staging = out if dtype == out_dtype else np.empty(out.shape, STORAGE[dtype])
        with open(path, "rb") as f:
            f.seek(offset)
            f.readinto(memoryview(staging.reshape(-1).view(np.uint8)))
        if staging is not out:
            out[...] = convert(staging, dtype, out_dtype)


class LayerWeights:
    """One decoder layer, projections fused so each step makes fewer, larger matmuls (a tuple of
    matrices where the formats of q, k and v, or of gate and up, differ)."""

    def __init__(self, input_norm, qkv, qkv_bias, o, post_norm, gate_up, down):
        self.input_norm = input_norm  # [hidden]
        self.qkv = qkv                # [(H + 2 * KV) * D, hidden]: rows q | k | v
        self.qkv_bias = qkv_bias      # [(H + 2 * KV) * D] or None
        self.o = o                    # [hidden, H * D]
        self.post_norm = post_norm    # [hidden]
        self.gate_up = gate_up        # [2 * inter, hidden]: rows gate | up
        self.down = down              # [hidden, inter]


class ModelWeights:
    def __init__(self, embed, layers, norm, lm_head):
        self.embed = embed      # [vocab, hidden]
        self.layers = layers    # list[LayerWeights]
        self.norm = norm        # [hidden]
        self.lm_head = lm_head  # [vocab, hidden]; the same array as embed when tied

    def nbytes(self) -> int:
        matrices = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for layer in self.layers:
            matrices += [m for m in vars(layer).values() if m is not None]
        return sum(sum(part.nbytes for part in m) if isinstance(m, tuple) else m.nbytes for m in matrices)


def _read_stacked(index, names_and_rows, cols, dtype):
    """Read several tensors into one matrix, one under the other: -> [sum(rows), cols] (or 1-D)."""
    total = sum(rows for _, rows in names_and_rows)
    out = np.empty((total, cols) if cols else (total,), STORAGE[dtype])
    start = 0
    for name, rows in names_and_rows:
        expected = (rows, cols) if cols else (rows,)
        if name in index and index.shape(name) != expected:
            raise PyllmError(f"tensor {name} has shape {list(index.shape(name))}, expected {list(expected)}")
        index.read_into(name, out[start:start + rows], dtype)
        start += rows
    return out


def load_weights(config, model_dir, dtype="f32", upload=lambda a: a, show_progress=True,
                 quantize: str | None = None) -> ModelWeights:
    """Read a checkpoint into ModelWeights of storage dtype `dtype`, every matrix quantized to
    `quantize` if given (norms and biases stay in `dtype`); `upload` moves each one to the
    backend's device as soon as it is read, so the host holds one tensor at a time."""
    from .progress import progress

    index = SafetensorsIndex(model_dir)
    hidden, inter, dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_rows, kv_rows = config.num_heads * dim, config.num_kv_heads * dim
    fmt = format_named(quantize) if quantize else None

    def read(names_and_rows, cols):
        if fmt is None or not cols:
            return upload(_read_stacked(index, names_and_rows, cols, dtype))
        matrix = _read_stacked(index, names_and_rows, cols, "f32")
        return upload(QuantizedMatrix.quantize(matrix, fmt, names_and_rows[0][0]))

    embed_name = "model.embed_tokens.weight"
    if config.tie_word_embeddings and embed_name not in index:
        embed_name = "lm_head.weight"  # some tied checkpoints keep only the output copy
    embed = read([(embed_name, config.vocab_size)], hidden)
    lm_head = embed if config.tie_word_embeddings else read([("lm_head.weight", config.vocab_size)], hidden)
    layers = []
    for i in progress(range(config.num_layers), desc="load", unit="layer", enabled=show_progress):
        p = f"model.layers.{i}."
        attn = [(p + f"self_attn.{n}_proj.weight", r) for n, r in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))]
        bias = [(p + f"self_attn.{n}_proj.bias", r) for n, r in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))]
        layers.append(LayerWeights(
            input_norm=read([(p + "input_layernorm.weight", hidden)], 0),
            qkv=read(attn, hidden),
            qkv_bias=read(bias, 0) if config.attention_bias else None,
            o=read([(p + "self_attn.o_proj.weight", hidden)], q_rows),
            post_norm=read([(p + "post_attention_layernorm.weight", hidden)], 0),
            gate_up=read([(p + "mlp.gate_proj.weight", inter), (p + "mlp.up_proj.weight", inter)], hidden),
            down=read([(p + "mlp.down_proj.weight", hidden)], inter),
        ))
    norm = read([("model.norm.weight", hidden)], 0)
    return ModelWeights(embed, layers, norm, lm_head)
