"""A GGUF file as a model, in its own formats: config, tokenizer and weights straight from the file.

Each tensor's blocks are read from the file into place as they are stored (no f32 copy is ever
made; the file is not mapped): GGML blocks and f16/bf16 become QuantizedMatrix, f32 matrices
plain arrays. llama.cpp stores q and k with each head's rows interleaved for its rope; a row is
whole blocks, so undoing that is a reordering of block rows. q|k|v and gate|up stay fused where
their formats agree. Every tensor's shape is checked against the metadata before any is read.
"""

from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import PyllmError
from .formats import format_of_gguf_type
from .gguf import build_tokenizer, check_tensors, hf_config, unpermute_rope_rows
from .gguf_file import read_header
from .progress import progress
from .tokenizer import Tokenizer
from .weights import LayerWeights, ModelWeights, QuantizedMatrix, stacked

_ATTENTION = ("attn_q", "attn_k", "attn_v")
_FEED_FORWARD = ("ffn_gate", "ffn_up")


def is_gguf(path) -> bool:
    """A .gguf name, or a file that starts with GGUF's magic."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


class GGUFModel:
    """An opened GGUF file: .config (ModelConfig), .tokenizer, and load_weights()."""

    def __init__(self, path):
        self.path = Path(path)
        meta, tensors = read_header(path)
        check_tensors([(t.name, t.gguf_type) for t in tensors], meta)  # all named, typed and present, before any is read
        self.tensors = {t.name: t for t in tensors}
        self.config = ModelConfig.from_dict(hf_config(meta, has_output="output.weight" in self.tensors))
        self._check_shapes()  # the kernels size their buffers from the config: every tensor must agree with it
        hf, tokenizer_config = build_tokenizer(meta)
        self.tokenizer = Tokenizer.from_parts(hf, tokenizer_config)

    def _check_shapes(self):
        cfg = self.config
        hidden, inter, q_rows, kv_rows = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim,
                                          cfg.num_kv_heads * cfg.head_dim)
        per_layer = {"attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (q_rows, hidden),
                     "attn_k": (kv_rows, hidden), "attn_v": (kv_rows, hidden), "attn_output": (hidden, q_rows),
                     "ffn_gate": (inter, hidden), "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}
        expected = {"token_embd.weight": (cfg.vocab_size, hidden), "output.weight": (cfg.vocab_size, hidden),
                    "output_norm.weight": (hidden,)}
        expected |= {f"blk.{i}.{kind}.weight": shape for i in range(cfg.num_layers) for kind, shape in per_layer.items()}
        for name, tensor in self.tensors.items():
            shape = tuple(reversed(tensor.shape))  # [rows, cols], as the metadata's numbers give them
            if shape != expected[name]:
                raise PyllmError(f"GGUF tensor {name!r} has shape {list(shape)}, but the file's metadata makes it "
                                 f"{list(expected[name])}")

    def _matrix(self, name, heads=None):
        """Tensor `name` as stored -> QuantizedMatrix [N, K] (f32: an array), q/k rows in HF order."""
        tensor = self.tensors[name]
        fmt = format_of_gguf_type(tensor.gguf_type, name)
        cols, *others = tensor.shape  # GGUF lists the fastest-moving axis first
        rows = int(np.prod(others))  # 1 for a vector
        data = np.empty((rows, fmt.row_bytes(cols)), np.uint8)  # [N, row bytes]
        with open(self.path, "rb") as f:
            f.seek(tensor.offset)
            if f.readinto(memoryview(data).cast("B")) != data.nbytes:
                raise PyllmError(f"{self.path} is truncated: GGUF tensor {name!r} ends past the end of the file")
        data = data.view(fmt.storage_dtype())  # [N, row bytes] or, for f32/f16/bf16, [N, K]
        if heads is not None:
            data = np.ascontiguousarray(unpermute_rope_rows(data, heads))
        return data if fmt.name == "f32" else QuantizedMatrix(fmt, (rows, cols), data)

    def _vector(self, name):
        """A norm's weight [hidden] in f32."""
        matrix = self._matrix(name)
        return (matrix.dequantize() if isinstance(matrix, QuantizedMatrix) else matrix).reshape(-1)

    def load_weights(self, upload=lambda a: a, show_progress=True) -> ModelWeights:
        """Every tensor read in its own format and handed to `upload` (the backend) as it is read."""
        cfg = self.config
        heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
        embed = upload(self._matrix("token_embd.weight"))
        lm_head = upload(self._matrix("output.weight")) if "output.weight" in self.tensors else embed
        layers = []
        for i in progress(range(cfg.num_layers), desc="load", unit="layer", enabled=show_progress):
            name = f"blk.{i}.{{}}.weight".format
            layers.append(LayerWeights(
                input_norm=upload(self._vector(name("attn_norm"))),
                qkv=upload(stacked([self._matrix(name(kind), heads.get(kind)) for kind in _ATTENTION])),
                qkv_bias=None,
                o=upload(self._matrix(name("attn_output"))),
                post_norm=upload(self._vector(name("ffn_norm"))),
                gate_up=upload(stacked([self._matrix(name(kind)) for kind in _FEED_FORWARD])),
                down=upload(self._matrix(name("ffn_down"))),
            ))
        norm = upload(self._vector("output_norm.weight"))
        return ModelWeights(embed, layers, norm, lm_head)
