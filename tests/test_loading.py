"""Loading: config fields, tied embeddings under either name, memory, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import pyllm
from pyllm import PyllmError
from pyllm.config import ModelConfig
from conftest import hf_logits, make_tiny_model

PROMPT = [0, 5, 77, 123, 9]


@pytest.fixture()
def model_dir(tmp_path):
    make_tiny_model(tmp_path, "llama-gqa-untied")
    return tmp_path


def edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_tied_matrix_stored_only_as_lm_head(tmp_path):
    reference = make_tiny_model(tmp_path, "llama-mha-tied")
    tensors = load_file(tmp_path / "model.safetensors")
    embed = tensors.pop("model.embed_tokens.weight")
    tensors["lm_head.weight"] = embed
    save_file(tensors, tmp_path / "model.safetensors")
    llm = pyllm.LLM(str(tmp_path), show_progress=False)
    np.testing.assert_allclose(llm.score(PROMPT), hf_logits(reference, PROMPT), atol=1e-4, rtol=0)


def test_rope_theta_inside_rope_parameters_and_eos_list(model_dir):
    edit_config(model_dir, rope_parameters={"rope_type": "default", "rope_theta": 1234.0}, eos_token_id=[1, 7])
    (model_dir / "generation_config.json").unlink(missing_ok=True)
    config = ModelConfig.from_dir(model_dir)
    assert config.rope_theta == 1234.0 and config.eos_token_ids == [1, 7]


@pytest.mark.parametrize("change,message", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
    (dict(torch_dtype="int8", dtype=None), "unsupported dtype 'int8'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope_scaling type 'yarn'"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    (dict(hidden_size=None), "hidden_size must be a positive integer"),
])
def test_bad_config_is_one_line(model_dir, change, message):
    edit_config(model_dir, **change)
    with pytest.raises(PyllmError, match=message) as err:
        pyllm.LLM(str(model_dir), show_progress=False)
    assert "\n" not in str(err.value)


def test_missing_files(tmp_path, model_dir):
    with pytest.raises(PyllmError, match="missing file: .*config.json"):
        pyllm.LLM(str(tmp_path / "nowhere"), show_progress=False)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(PyllmError, match="missing file: .*model.safetensors"):
        pyllm.LLM(str(model_dir), show_progress=False)


def test_missing_tensor_and_wrong_shape(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(PyllmError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        pyllm.LLM(str(model_dir), show_progress=False)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((160, 63), np.float32)
    save_file(tensors, model_dir / "model.safetensors")
    with pytest.raises(PyllmError, match=r"model.layers.1.mlp.up_proj.weight has shape \[160, 63\], expected \[160, 64\]"):
        pyllm.LLM(str(model_dir), show_progress=False)


@pytest.mark.parametrize("corruption", [b"\x00\x00", b"\xff" * 8 + b"{}", (20).to_bytes(8, "little") + b"not json at all!!!!!"])
def test_corrupt_safetensors_header(model_dir, corruption):
    (model_dir / "model.safetensors").write_bytes(corruption)
    with pytest.raises(PyllmError, match="corrupt safetensors header"):
        pyllm.LLM(str(model_dir), show_progress=False)


def test_prompt_too_long_and_bad_ids(tiny_llm):
    with pytest.raises(PyllmError, match="prompt too long: 300 tokens, the context window is 256"):
        tiny_llm.generate([5] * 300, max_tokens=4)
    with pytest.raises(PyllmError, match="token id out of range"):
        tiny_llm.generate([5, 100000], max_tokens=4)


# VmHWM (peak RSS of this address space) rather than ru_maxrss, which a child inherits from pytest
PEAK_RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024"
PEAK_RSS_SCRIPT = f"""
import sys, pyllm
llm = pyllm.LLM(sys.argv[1], show_progress=False)
print({PEAK_RSS}, llm.model.weights.nbytes())
"""
BASELINE_SCRIPT = f"""
import pyllm.engine, pyllm.weights
print({PEAK_RSS})
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_rss_after_load_is_at_most_1_3x_the_f32_weights(tmp_path, dtype):
    """A ~100 MB model: loading must not hold a second copy of the file (f32) or of the model (bf16)."""
    make_tiny_model(tmp_path, "llama-gqa-untied", dtype=dtype, hidden_size=512, intermediate_size=1536,
                    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, vocab_size=4096)
    baseline = int(subprocess.run([sys.executable, "-c", BASELINE_SCRIPT], capture_output=True, text=True,
                                  check=True).stdout)
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout.split()
    peak, weight_bytes = int(out[0]), int(out[1])
    assert peak - baseline <= 1.3 * weight_bytes, (peak - baseline) / weight_bytes


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "bf16"])
def test_quantize_while_loading_matches_transformers_on_the_same_rounded_weights(tmp_path, fmt):
    """--quantize: every matrix rounded as gguf's quantizer rounds it, norms kept; transformers with
    the same rounded matrices is the oracle (the reference backend, and the C kernels on a prompt of
    more than 16 tokens, which multiply the stored weights in f32: within 1e-4)."""
    import gguf
    import torch
    qtype = gguf.GGMLQuantizationType[fmt.upper()]
    reference = make_tiny_model(tmp_path, "llama-gqa-untied")
    with torch.no_grad():
        for param in reference.parameters():
            if param.ndim == 2:
                rounded = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(rounded.astype(np.float32)))
    expected = hf_logits(reference, PROMPT)
    llm = pyllm.LLM(str(tmp_path), backend="reference", quantize=fmt, show_progress=False)
    assert llm.model.weights.layers[0].gate_up.format.name == fmt and llm.model.weights.embed.format.name == fmt
    np.testing.assert_allclose(llm.score(PROMPT), expected, atol=1e-4, rtol=0)
    cpu, prompt = pyllm.LLM(str(tmp_path), backend="cpu", quantize=fmt, show_progress=False), PROMPT * 4
    np.testing.assert_allclose(cpu.score(prompt), hf_logits(reference, prompt), atol=1e-4, rtol=0)


def test_quantize_refuses_rows_that_are_not_whole_blocks(tmp_path):
    make_tiny_model(tmp_path, "llama-gqa-untied", intermediate_size=100)  # down_proj rows of 100
    with pytest.raises(PyllmError, match="cannot quantize tensor model.layers.0.mlp.down_proj.weight to q4_0: "
                                         "its rows hold 100 weights") as err:
        pyllm.LLM(str(tmp_path), quantize="q4_0", show_progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(PyllmError, match="unknown --quantize 'q3_k'"):
        pyllm.LLM(str(tmp_path), quantize="q3_k", show_progress=False)
