"""benchmarks.gpu_check, the command a GPU session runs, end to end under cuda-emu (its GPU-only
sections skipped, each saying why), and the random SmolLM2-shaped model it measures where the
real one is not on the GPU machine."""

import json
import subprocess
import sys

import pyllm
from conftest import REPO, SHARED, needs_shared
from pyllm.benchmarks.gpu_check import SMOLLM2_135M, random_llama


@needs_shared
def test_the_smoke_run_under_cuda_emu_writes_every_section(tmp_path):
    story = SHARED / "models" / "story"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--backend", "cuda-emu",
               "--model", str(story), "--agreement-model", str(story), "--smoke"]
    subprocess.run(command, cwd=REPO, check=True, timeout=300)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for section in ("device", "parity", "kernels"):
        assert "GPU" in report[section]["skipped"]
    layers = json.loads((story / "config.json").read_text())["num_hidden_layers"]
    for name in ("f32", "bf16", "q8_0", "q4_1"):
        speed = report["speed"][name]
        assert speed["prefill_tok_s"] > 0
        assert all(speed[f"decode_b{b}_{mode}_tok_s"] > 0 for b in (1, 8) for mode in ("eager", "graph"))
        assert speed["launches_per_decode_step_eager"] <= 10 * layers + 4  # layers, then gather, norm, vocab
        assert speed["launches_per_decode_step_graph"] == 1
    assert report["agreement"]["positions"] == 32 and report["agreement"]["bf16"] >= 0.9
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| f32 |" in markdown and "| q4_1 |" in markdown


def test_the_random_model_in_a_shape_loads_and_generates(tmp_path):
    shape = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300}
    llm = pyllm.LLM(str(random_llama(tmp_path, **shape)), backend="cuda-emu", show_progress=False)
    assert (llm.config.num_layers, llm.config.num_kv_heads, llm.config.vocab_size) == (2, 2, 300)
    assert len(llm.generate("Hi", max_tokens=4, ignore_eos=True).token_ids) == 4
