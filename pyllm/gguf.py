"""GGUF metadata (config, tokenizer) and conversion of a llama-architecture GGUF file into a
Hugging Face model directory (gguf_model.py runs a GGUF file as it is; this is for the oracle).

The result (model.safetensors, config.json, generation_config.json, tokenizer.json,
tokenizer_config.json) loads in transformers and in pyllm alike. Weights are dequantized
tensor by tensor and streamed to a safetensors file written by hand, so neither torch nor
three copies of the model are needed. The tokenizer is rebuilt with the `tokenizers`
library so that it encodes exactly as transformers' own GGUF loader does.
"""

import json
import re
import struct
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .dtypes import convert
from .errors import PyllmError, first_line
from .formats import format_of_gguf_type
from .progress import progress

# dtype option -> (safetensors dtype, config torch_dtype, numpy storage; bf16 is stored as raw bits)
OUT_DTYPES = {"f32": ("F32", "float32", "<f4"), "f16": ("F16", "float16", "<f2"), "bf16": ("BF16", "bfloat16", "<u2")}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
# llama.cpp pre-tokenizer names whose split regex differs from GPT-2's (the same table transformers uses).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {**dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"], _LLAMA3_SPLIT),
           **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], _QWEN2_SPLIT)}


def convert_gguf(gguf_path, out_dir, dtype="f32") -> Path:
    """Write the HF directory for `gguf_path` into `out_dir` (created if needed) and return it."""
    if dtype not in OUT_DTYPES:
        raise PyllmError(f"unknown dtype {dtype!r}; choose one of {', '.join(OUT_DTYPES)}")
    reader = open_gguf(gguf_path)
    meta = field_values(reader)
    # everything that can be rejected is checked before the first byte is written
    names = check_tensors([(t.name, int(t.tensor_type)) for t in reader.tensors], meta)
    config = hf_config(meta, has_output="output.weight" in names, dtype=dtype)
    tokenizer, tokenizer_config = build_tokenizer(meta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(reader, names, config, dtype, out / "model.safetensors")
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json",
                {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config})
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    return out


def open_gguf(path) -> GGUFReader:
    """A memory-mapped reader, or a one-line PyllmError if the file is missing or not GGUF."""
    path = Path(path)
    if not path.is_file():
        raise PyllmError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on foreign or truncated files
        reason = first_line(e)
        raise PyllmError(f"{path} is not a valid GGUF file ({reason})") from None


def field_values(reader) -> dict:
    """Every metadata field of the file as plain Python."""
    return {key: _field_value(field) for key, field in reader.fields.items()}


def _field_value(field):
    """A metadata value as plain Python (str, int, float, bool or list)."""
    try:
        return field.contents()
    except Exception:
        raise PyllmError(f"corrupt GGUF metadata field {field.name!r}") from None


def _require(meta, key):
    if key not in meta:
        raise PyllmError(f"GGUF file lacks metadata key {key!r}")
    return meta[key]


def check_tensors(tensors, meta) -> dict:
    """Map every GGUF tensor name (tensors: (name, GGML type) pairs) to its HF name, rejecting
    anything we cannot run: unknown tensors, missing ones, and storage types outside pyllm.formats
    (one line naming the tensor)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise PyllmError(f"unsupported GGUF architecture {arch!r}; only 'llama' can be converted")
    n_layers = _require(meta, "llama.block_count")
    names = {}
    for name, gguf_type in tensors:
        layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if name in _GLOBAL_NAMES:
            names[name] = _GLOBAL_NAMES[name]
        elif layer and layer[2] in _LAYER_NAMES and int(layer[1]) < n_layers:
            names[name] = f"model.layers.{int(layer[1])}.{_LAYER_NAMES[layer[2]]}.weight"
        else:
            raise PyllmError(f"GGUF tensor {name!r} is not supported (plain llama weights only)")
        format_of_gguf_type(gguf_type, name)
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{kind}.weight" for i in range(n_layers) for kind in _LAYER_NAMES}
    if missing := sorted(expected - set(names)):
        raise PyllmError(f"GGUF file lacks tensor {missing[0]!r} ({len(missing)} missing)")
    return names


def hf_config(meta, has_output, dtype="f32") -> dict:
    """config.json for LlamaForCausalLM from llama.* metadata; rejects features we do not run."""
    hidden = _require(meta, "llama.embedding_length")
    heads = _require(meta, "llama.attention.head_count")
    kv_heads = meta.get("llama.attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise PyllmError("GGUF files with per-layer head counts are not supported")
    for key, value in (("llama.embedding_length", hidden), ("llama.attention.head_count", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise PyllmError(f"GGUF metadata {key} must be a positive integer, found {value!r}")
    head_dim = meta.get("llama.attention.key_length", hidden // heads)
    if meta.get("llama.attention.value_length", head_dim) != head_dim:
        raise PyllmError("GGUF files with different key and value head sizes are not supported")
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise PyllmError("GGUF files with partial rotary embeddings are not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise PyllmError(f"GGUF rope scaling {scaling!r} is not supported")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": _require(meta, "llama.feed_forward_length"),
        "num_hidden_layers": _require(meta, "llama.block_count"),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rms_norm_eps": float(_require(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": _require(meta, "llama.context_length"),
        "vocab_size": meta.get("llama.vocab_size", len(_require(meta, "tokenizer.ggml.tokens"))),
        "tie_word_embeddings": not has_output, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": OUT_DTYPES[dtype][1],
    }
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    for name in ("bos", "eos", "pad"):
        if (token_id := meta.get(f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id")) is not None:
            config[f"{name}_token_id"] = token_id
    return config


def unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's Q/K row permutation: [n_heads*head_dim, in] -> the same shape, HF order.

    llama.cpp stores each head's rows interleaved (pairs x0,x1 rotate together); HF's rotate_half
    wants the first half of the head then the second: gguf row h*d + 2j + s -> HF row h*d + s*d/2 + j.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _cast(x, dtype):
    return convert(np.asarray(x, dtype=np.float32), "f32", dtype)


def _write_weights(reader, names, config, dtype, path):
    """Stream every tensor, dequantized and cast, into a safetensors file."""
    st_dtype, _, storage = OUT_DTYPES[dtype]
    itemsize = np.dtype(storage).itemsize
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists the fastest-moving axis first
        size = int(np.prod(shape)) * itemsize
        header[names[t.name]] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in progress(reader.tensors, desc="convert", unit="tensor"):
            w = dequantize(t.data, t.tensor_type).reshape(header[names[t.name]]["shape"])
            if (kind := t.name.split(".")[-2]) in heads:
                w = unpermute_rope_rows(w, heads[kind])
            f.write(memoryview(np.ascontiguousarray(_cast(w, dtype))).cast("B"))


def _write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def bytes_to_unicode() -> dict:
    """GPT-2's printable spelling of each byte: byte value -> one character."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    spelling, shift = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:  # control and space bytes move past Latin-1 so every token is printable
            spelling[b], shift = chr(256 + shift), shift + 1
    return spelling


def build_tokenizer(meta) -> tuple:
    """(tokenizers.Tokenizer, tokenizer_config dict) from the tokenizer.ggml.* metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise PyllmError(f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2, llama")
    tokens = _require(meta, "tokenizer.ggml.tokens")
    try:
        if kind == "gpt2":
            tokenizer = _byte_level_bpe(tokens, _require(meta, "tokenizer.ggml.merges"), meta.get("tokenizer.ggml.pre"))
        else:
            tokenizer = _sentencepiece_bpe(tokens, meta)
    except PyllmError:
        raise
    except Exception as e:  # tokenizers rejects inconsistent vocabularies with its own errors
        raise PyllmError(f"invalid GGUF tokenizer: {first_line(e)}") from None
    special = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if (token_id := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None:
            if not 0 <= token_id < len(tokens):
                raise PyllmError(f"GGUF {name} token id {token_id} is outside the vocabulary")
            special[f"{name}_token"] = tokens[token_id]
    _add_tokens(tokenizer, tokens, meta.get("tokenizer.ggml.token_type") or [], set(special.values()), kind)
    # transformers' GGUF loader adds BOS by default only for sentencepiece vocabularies
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and "bos_token" in special
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in special
    tokenizer.post_processor = _template(tokenizer, special, add_bos, add_eos)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
              "model_max_length": meta.get("llama.context_length", 2048)}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, config


def _byte_level_bpe(tokens, merges, pre):
    """GPT-2 style byte-level BPE; `pre` picks the split regex the merges were learned with."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # some files store tokens as raw text; the model wants them in the byte alphabet
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = _SPLITS.get(pre)
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(tokens, meta):
    """SentencePiece-style BPE: '▁' for spaces, byte fallback, merges from the file or the scores."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = merges_from_scores(tokens, _require(meta, "tokenizer.ggml.scores"))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return tokenizer


def merges_from_scores(tokens, scores) -> list:
    """Every split of a token into two known tokens, best-scored result first.

    Ties keep vocabulary order, then shorter left and right parts go last, as transformers does.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for token, score in dict(zip(tokens, scores)).items():
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        candidates += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def _add_tokens(tokenizer, tokens, types, named_special, kind):
    """CONTROL tokens and the named special tokens match whole as special; USER_DEFINED as plain."""
    alphabet = set(bytes_to_unicode().values())
    # in a byte-level vocabulary a CONTROL token outside the byte alphabet is a llama.cpp mislabel
    control = {t for t, ty in zip(tokens, types) if ty == CONTROL and (kind != "gpt2" or set(t) <= alphabet)}
    special = [t for t in dict.fromkeys(tokens) if t in control or t in named_special]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    vocab = tokenizer.get_vocab()
    plain = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab and t not in named_special]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in plain])


def _template(tokenizer, special, add_bos, add_eos):
    """Post-processor that adds BOS/EOS around each sequence when the file asks for it."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    ids = [(t, tokenizer.token_to_id(t)) for t, wanted in ((bos, add_bos), (eos, add_eos)) if wanted]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
