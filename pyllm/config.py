"""ModelConfig: the architecture numbers of a Llama-family model, validated once from config.json."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PyllmError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    dtype: str = "f32"  # storage dtype of the checkpoint: f32 | f16 | bf16

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise PyllmError(f"unsupported architecture {self.architecture!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise PyllmError(f"config.json: {name} must be a positive integer, "
                                 f"found {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise PyllmError(f"config.json: num_attention_heads ({self.num_heads}) is not a "
                             f"multiple of num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise PyllmError(f"config.json: head_dim must be even for rope, found {self.head_dim}")
        if self.dtype not in DTYPES.values():
            raise PyllmError(f"unsupported dtype {self.dtype!r}; supported: float32, float16, bfloat16")

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        architecture = (raw.get("architectures") or ["?"])[0]
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
        if rope_type != "default":
            raise PyllmError(f"unsupported rope_scaling type {rope_type!r}; only plain rope is implemented")
        torch_dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if torch_dtype not in DTYPES:
            raise PyllmError(f"unsupported dtype {torch_dtype!r}; supported: {', '.join(DTYPES)}")
        heads = raw.get("num_attention_heads")
        hidden = raw.get("hidden_size")
        eos = raw.get("eos_token_id")
        try:
            return cls(
                architecture=architecture,
                vocab_size=raw.get("vocab_size"),
                hidden_size=hidden,
                intermediate_size=raw.get("intermediate_size"),
                num_layers=raw.get("num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or (hidden // heads if hidden and heads else None),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
                max_position_embeddings=raw.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=architecture == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
                dtype=DTYPES[torch_dtype],
            )
        except TypeError as exc:  # a required number is missing or has the wrong type
            raise PyllmError(f"config.json: {exc}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise PyllmError(f"missing file: {path}")
        raw = read_json_object(path)
        generation = Path(model_dir) / "generation_config.json"
        if generation.is_file():  # generation_config's eos list wins: chat models add <|im_end|> there
            gen = read_json_object(generation)
            raw = {**raw, **{k: gen[k] for k in ("bos_token_id", "eos_token_id") if gen.get(k) is not None}}
        return cls.from_dict(raw)


def read_json_object(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PyllmError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PyllmError(f"{path} must hold a JSON object")
    return raw
