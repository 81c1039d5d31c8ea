"""One command that measures the CUDA backend on a real GPU, and runs as a smoke test under cuda-emu.

    python -m benchmarks.gpu_check --out DIR                  # on a machine with an NVIDIA GPU
    python -m benchmarks.gpu_check --out DIR --backend cuda-emu --model ../shared/models/story --smoke

Sections, in order (each one's failure is recorded and the next one runs):
  device      the GPU's name, memory and peak bandwidth (memory clock x bus width)
  parity      the CuPy halves of tests/test_cuda_backend.py and tests/test_kernels.py (pytest, GPU only)
  kernels     every kernel's bandwidth against the peak at large shapes (kernel_bench, GPU only)
  speed       prefill and decode tok/s of the model in f32, bf16, q8_0 and q4_1, eager and as graphs
  agreement   teacher-forced argmax agreement of f16 and bf16 with f32 on --agreement-model
Writes DIR/gpu_check.json and DIR/gpu_check.md. Nothing is fetched and nothing installed: the GPU
machine needs python3 with numpy, torch, transformers and cupy, plus this repository and the
pure-Python packages pyllm imports (README "Carrying pyllm to a GPU machine"). Without the model
on that machine, the speed section uses random weights in SmolLM2-135M's shape and says so.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench import interleaved_best, prompt_ids, pyllm_measures
from .dtype_agreement import argmax_agreement

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "smollm2-135m-instruct"
# the story model: ../shared beside a checkout, or a shared/ folder inside one (what travels to a GPU machine)
DEFAULT_AGREEMENT_MODEL = next((d for d in (REPO / "shared" / "models" / "story", REPO.parent / "shared" / "models" / "story")
                                if d.exists()), REPO.parent / "shared" / "models" / "story")
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
FORMATS = {"f32": dict(dtype="f32"), "bf16": dict(dtype="bf16"),  # name -> pyllm.LLM arguments
           "q8_0": dict(dtype="f32", quantize="q8_0"), "q4_1": dict(dtype="f32", quantize="q4_1")}
DECODE_BATCHES = (1, 8)  # pyllm_measures' batch 1, then these
ROUNDS = 2
PARITY_TESTS = ("tests/test_cuda_backend.py", "tests/test_kernels.py")


def say(message):
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def write_byte_tokenizer(model_dir: Path):
    """A byte-level BPE tokenizer with no merges: ids 0-1 specials, 2..257 the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<s>": 0, "</s>": 1, **{ch: i + 2 for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def random_llama(model_dir: Path, **shape) -> Path:
    """A Llama of that shape with transformers' random initialisation, saved with a byte tokenizer."""
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    write_byte_tokenizer(model_dir)
    return model_dir


def device_section(backend: str) -> dict:
    if backend != "cuda":
        return {"skipped": f"{backend} runs the kernels on the CPU: no GPU to describe"}
    import cupy
    from .kernel_bench import device_name, peak_bytes_per_s
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return {"name": device_name(cupy), "memory_gib": props["totalGlobalMem"] / 2**30, "peak_gb_s": peak_bytes_per_s(cupy) / 1e9,
            "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}


def parity_section(backend: str, timeout_s: int) -> dict:
    """pytest's summary of the tests' CuPy parameters (the cuda-emu ones run in the normal suite)."""
    if backend != "cuda":
        return {"skipped": "the parity tests' GPU halves need CuPy on a GPU; their cuda-emu halves run in CI"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not emu", *PARITY_TESTS]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    lines = run.stdout.strip().splitlines()
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {"returncode": run.returncode, "summary": lines[-1] if lines else run.stderr[-500:], "failures": failures}


def kernels_section(backend: str) -> dict:
    if backend != "cuda":
        return {"skipped": "kernel bandwidth needs a GPU: cuda-emu's timings say nothing about one"}
    from .kernel_bench import kernel_bandwidth
    return {dtype: kernel_bandwidth("cuda", dtype) for dtype in ("f32", "bf16")}


def measure_format(model: str, backend: str, args_of: dict, prompt_tokens: int, decode_tokens: int) -> dict:
    """bench.py's measures (prefill of prompt_tokens, greedy decode of decode_tokens at each batch
    size), best of ROUNDS interleaved rounds, with launches eager and as graphs; prefill once (a
    prompt never replays a graph)."""
    import pyllm
    llm = pyllm.LLM(model, backend=backend, show_progress=False, **args_of)
    ids = prompt_ids(llm.tokenizer, prompt_tokens)
    result = {"weight_bytes": llm.model.weights.nbytes()}
    for mode, graphs in (("eager", False), ("graph", True)):
        llm.backend.use_graphs = graphs
        result[f"launches_per_decode_step_{mode}"] = decode_launches(llm)
        measures = pyllm_measures(llm, ids, list(DECODE_BATCHES[1:]), decode_tokens, mode)
        if graphs:  # a prompt never replays a graph: its prefill is the eager one
            del measures[f"{mode} prefill"]
        best = interleaved_best(measures, ROUNDS)
        result.update({f"decode_b{b}_{mode}_tok_s": b * (decode_tokens - 1) / best[f"{mode} decode b{b}"]
                       for b in DECODE_BATCHES})
        if not graphs:
            result["prefill_tok_s"] = len(ids) / best[f"{mode} prefill"]
    result["decode_b1_weight_gb_s"] = result["weight_bytes"] * result["decode_b1_graph_tok_s"] / 1e9
    return result


def decode_launches(llm) -> int:
    """Kernel launches, cuBLAS calls and graph replays of a decode step of one sequence, once it is
    warm (with graphs: the shape's eager first step and its capture are behind it)."""
    cache = llm.model.new_cache(8)
    llm.model.forward([(cache, [1])])
    for token in (2, 3):
        before = llm.backend.launches
        llm.model.forward([(cache, [token])])
    return llm.backend.launches - before


def speed_section(model: str, backend: str, prompt_tokens: int, decode_tokens: int) -> dict:
    from ..errors import PyllmError
    result = {}
    for name, args_of in FORMATS.items():
        say(f"speed: {name}")
        try:
            result[name] = measure_format(model, backend, args_of, prompt_tokens, decode_tokens)
        except PyllmError as exc:
            result[name] = {"error": str(exc)}
    return result


def markdown(report: dict) -> str:
    lines = [f"# gpu_check: {report['backend']}, {report['model']}", "", f"{report['seconds']:.0f} s in all.", ""]
    for section in ("device", "parity", "agreement"):
        lines += [f"## {section}", "", "```", json.dumps(report[section], indent=1), "```", ""]
    kernels = report["kernels"]
    lines += ["## kernels", ""]
    not_measured = kernels.get("skipped") or kernels.get("error")
    if not_measured:
        lines += [f"not measured: {not_measured}", ""]
    for dtype, measured in ({} if not_measured else kernels).items():
        lines += [f"{dtype}, peak {measured['peak_gb_s']:.0f} GB/s:", "", "| kernel | shape | us | GB/s | of peak |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k['name']} | {k['shape']} | {k['us']:.1f} | {k['gb_s']:.0f} | {k['gb_s'] / measured['peak_gb_s']:.0%} |"
                  for k in measured["kernels"]]
        lines.append("")
    lines += ["## speed", "", f"model: {report['speed_model']}", "",
              "| format | weights MB | prefill tok/s | decode b1 tok/s eager, graph (x) | decode b8 eager, graph (x) "
              "| b1 graph weight GB/s | launches/step eager, graph |", "|---|---|---|---|---|---|---|"]
    for name, r in report["speed"].items():
        lines.append(f"| {name} | {r['error']} |" if "error" in r else
                     f"| {name} | {r['weight_bytes'] / 1e6:.0f} | {r['prefill_tok_s']:.0f} | {versus(r, 1)} | "
                     f"{versus(r, 8)} | {r['decode_b1_weight_gb_s']:.1f} | "
                     f"{r['launches_per_decode_step_eager']}, {r['launches_per_decode_step_graph']} |")
    return "\n".join(lines) + "\n"


def versus(r: dict, batch: int) -> str:
    eager, graph = r[f"decode_b{batch}_eager_tok_s"], r[f"decode_b{batch}_graph_tok_s"]
    return f"{eager:.1f}, {graph:.1f} ({graph / eager:.2f}x)"


def run_section(report: dict, name: str, fn):
    """report[name] = fn(), or the exception that stopped it (the other sections still run)."""
    say(name)
    try:
        report[name] = fn()
    except Exception as exc:  # noqa: BLE001: a section's failure is a finding, recorded beside the rest
        report[name] = {"error": f"{type(exc).__name__}: {exc}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", choices=["cuda", "cuda-emu"], default="cuda")
    parser.add_argument("--model", help=f"a model directory for the speed section (default: {DEFAULT_MODEL} where it "
                                         "exists, else random weights in SmolLM2-135M's shape)")
    parser.add_argument("--agreement-model", default=str(DEFAULT_AGREEMENT_MODEL),
                        help="a trained model directory for the argmax agreement (default: the story model)")
    parser.add_argument("--smoke", action="store_true", help="short prompts and decodes (a CI run under cuda-emu)")
    parser.add_argument("--parity-timeout", type=int, default=240)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompt_tokens, decode_tokens, agreement_tokens = (24, 6, 32) if args.smoke else (512, 128, 256)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or (str(DEFAULT_MODEL) if DEFAULT_MODEL.exists() else None)
        speed_model = model or "random weights in SmolLM2-135M's shape (the model is not on this machine)"
        report = {"backend": args.backend, "model": model or "SmolLM2-135M shape, random", "speed_model": speed_model}
        run_section(report, "device", lambda: device_section(args.backend))
        run_section(report, "parity", lambda: parity_section(args.backend, args.parity_timeout))
        run_section(report, "kernels", lambda: kernels_section(args.backend))
        model = model or str(random_llama(Path(scratch) / "smollm2-shape", **SMOLLM2_135M))
        run_section(report, "speed", lambda: speed_section(model, args.backend, prompt_tokens, decode_tokens))
        agreement_model = args.agreement_model
        run_section(report, "agreement", lambda: argmax_agreement(agreement_model, args.backend, n_tokens=agreement_tokens)
                    if Path(agreement_model).exists() else {"skipped": f"{agreement_model} is not on this machine"})
    report["seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "gpu_check.md").write_text(markdown(report))
    say(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
