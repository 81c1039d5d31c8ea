"""pyllm bench: load time, prefill and decode speed, batched decode, memory, bandwidth — and
transformers on the same weights, prompt and dtype in the same run, with the ratios.

Every speed is the best of --rounds rounds, and each round takes every measurement in turn (ours,
the matmul roofline, transformers), so both sides of a ratio see the machine at the same speeds.
Writes bench.json, bench.md and bench.png into --out. Run it with nothing else on the machine.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from pyllm.progress import progress

PROMPT_TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
               "changed how knowledge travelled across Europe. ")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    ids = tokenizer.encode(PROMPT_TEXT * (n_tokens // 8 + 1), add_special_tokens=False)
    return ids[:n_tokens]


PAUSE_S = 0.3  # before each measurement: the threads of whatever ran last (ours or torch's) stop spinning


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_best(measures: dict, rounds: int, on_measured=lambda best: None) -> dict:
    """{name: seconds}, each measurement's best over `rounds` rounds with every measurement taken in
    turn within a round: this machine's speed drifts (by up to several times on a shared one), and
    interleaving lets a drift reach both sides of a ratio alike. Each measure returns its seconds;
    on_measured(best so far) follows every measurement (bench saves them, so nothing is lost)."""
    best = {}
    for _ in progress(range(rounds), desc="measuring", unit="round"):
        for name, measure in measures.items():
            time.sleep(PAUSE_S)
            best[name] = min(best.get(name, float("inf")), measure())
            on_measured(best)
    return best


def can_plot() -> bool:
    """matplotlib is there, or one line says which extra brings it and that the plot is skipped."""
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        print("matplotlib is not installed: the PNG plot is skipped (pip install 'pyllm[bench]' brings it); "
              "JSON and markdown are written", file=sys.stderr)
        return False


def save_partial(out_dir: Path, results: dict, best: dict):
    """What is measured so far ({measure: best seconds}), as JSON and markdown, replaced as it grows."""
    partial = {**results, "partial": True, "best_seconds": best}
    rows = "\n".join(f"| {name} | {seconds:.4f} |" for name, seconds in best.items())
    (out_dir / "bench.json").write_text(json.dumps(partial, indent=2))
    (out_dir / "bench.md").write_text(f"# pyllm bench (partial): {results['model']}\n\n"
                                      f"| measurement | best seconds so far |\n|---|---|\n{rows}\n")


def matmul_measure(total_bytes: int, rows: int, n=1536, k=576):
    """Seconds of the CPU backend's matmul_transb with `rows` rows of activations streaming
    `total_bytes` of f32 weights shaped like a decoder layer's [n, k] (a measure, and those bytes):
    the ceiling of decode at that batch size, since every step streams all the weights once."""
    from pyllm.backends.cpu import CpuBackend
    matmul_transb = CpuBackend.matmul_transb
    count = max(1, total_bytes // (n * k * 4))
    weights = np.random.default_rng(0).standard_normal((count, n, k), dtype=np.float32)  # [count, n, k]
    x = np.random.default_rng(1).standard_normal((rows, k), dtype=np.float32)           # [rows, k]
    return (lambda: timed(lambda: [matmul_transb(x, w) for w in weights])), weights.nbytes


def pyllm_measures(llm, ids, batches, decode_tokens, side):
    """{f"{side} ...": measure}: prefill of ids, and decode_tokens at each batch size (seconds from the
    engine's own decode timing)."""
    from pyllm.model import prefill
    short = ids[:16]

    def decode(batch):
        prompts = [short[i % 4:] for i in range(batch)]  # distinct prompts of slightly different lengths
        outs = llm.generate(prompts, max_tokens=decode_tokens, ignore_eos=True)
        return max(o.stats["decode_s"] for o in outs)
    measures = {f"{side} prefill": lambda: timed(lambda: prefill(llm.model, llm.model.new_cache(len(ids) + 1), ids))}
    measures.update({f"{side} decode b{b}": lambda b=b: decode(b) for b in [1] + batches})
    return measures


def speeds(best, side, n_prompt, batches, decode_tokens) -> dict:
    """tokens/s from interleaved_best's seconds."""
    r = {"prefill_tok_s": n_prompt / best[f"{side} prefill"]}
    r.update({f"decode_b{b}_tok_s": b * (decode_tokens - 1) / best[f"{side} decode b{b}"] for b in [1] + batches})
    return r


def load_pyllm(args, backend, dtype):
    import pyllm
    start = time.perf_counter()
    llm = pyllm.LLM(args.model, backend=backend, dtype=dtype)
    return llm, {"load_s": time.perf_counter() - start, "weight_bytes": llm.model.weights.nbytes(),
                 "dtype": llm.backend.dtype}


def transformers_measures(args, ids):
    """transformers on the same weights in f32 with eager attention: load seconds, and measures of
    prefill (logits of the last token only, as generate asks) and of decode at batch 1."""
    import torch
    from transformers import AutoModelForCausalLM
    start = time.perf_counter()
    path = Path(args.model)
    source = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name) if path.is_file() else \
        dict(pretrained_model_name_or_path=path)  # a GGUF file, dequantized by transformers: the same weights
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32, attn_implementation="eager").eval()
    load_s = time.perf_counter() - start
    prompt, short = torch.tensor([ids]), torch.tensor([ids[:16]])

    def decode():  # seconds from the first new token to the last: decode_tokens - 1 steps
        streamer = TokenTimes()
        model.generate(short, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False,
                       pad_token_id=0, streamer=streamer)
        return streamer.times[-1] - streamer.times[1]

    no_grad = torch.no_grad()  # as a decorator: each measure runs without autograd
    return load_s, {"transformers prefill": no_grad(lambda: timed(lambda: model(prompt, logits_to_keep=1))),
                    "transformers decode b1": no_grad(decode)}


class TokenTimes:
    """A transformers streamer that keeps when each put arrived: the prompt's, then each new token's
    (so a decode's time never comes from the difference of two separately timed runs)."""

    def __init__(self):
        self.times = []

    def put(self, _tokens):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def write_report(results, out_dir: Path, plots=True):
    ours, hf = results["pyllm"], results.get("transformers")
    rows = [("load (s)", "load_s"), ("prefill tok/s", "prefill_tok_s"), ("decode tok/s (batch 1)", "decode_b1_tok_s")]
    rows += [(f"decode tok/s aggregate (batch {b})", f"decode_b{b}_tok_s") for b in results["batches"]]
    lines = ["| metric | pyllm | transformers | pyllm / transformers |", "|---|---|---|---|"]
    for label, key in rows:
        theirs = hf.get(key) if hf else None
        ratio = f"{ours[key] / theirs:.2f}x" if theirs else "-"
        lines.append(f"| {label} | {ours[key]:.2f} | {theirs:.2f} | {ratio} |" if theirs else
                     f"| {label} | {ours[key]:.2f} | - | - |")
    b1 = ours["decode_b1_tok_s"]
    lines += [
        f"| batched speed-up (batch {b} / batch 1) | {ours[f'decode_b{b}_tok_s'] / b1:.2f}x | | |" for b in results["batches"]]
    lines += [f"| weights (MB) | {ours['weight_bytes'] / 1e6:.1f} | | |",
              f"| peak RSS (MB) | {ours['peak_rss_bytes'] / 1e6:.1f} | | |"]
    if results["backend"] == "cpu":  # the CPU's roofline per batch size; a GPU's is in the kernel table
        lines += roofline_rows(results)
    if results.get("step_split"):
        split = results["step_split"]
        lines += [f"| decode step, batch 1 (ms) | {split['step_ms']:.2f} | | |",
                  f"| of it in the weight-streaming kernels (ms) | {split['matmul_ms']:.2f} | | |",
                  f"| of it the rest: norms, rope, attention, Python (ms) | {split['rest_ms']:.2f} | | |"]
    table = "\n".join(lines)
    if "pyllm_cpu" in results:  # a GPU run also measured the CPU backend
        table += "\n\n" + cpu_vs_gpu_table(results)
    (out_dir / "bench.md").write_text(f"# pyllm bench: {results['model']} ({results['backend']})\n\n{table}\n")
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2))
    if plots:  # last: a failing plot loses no result
        plot(results, out_dir / "bench.png")
        if "pyllm_cpu" in results:
            plot_cpu_vs_gpu(results, out_dir / "cpu_vs_gpu.png")
    return table


def roofline_rows(results) -> list[str]:
    """Achieved weight streaming at each batch size beside the backend's matmul at that many rows,
    measured in the same run, and the batched speed-up that matmul alone would allow."""
    ours, bandwidth = results["pyllm"], results["matmul_gb_s"]
    rows = []
    for b in [1] + results["batches"]:
        achieved = ours["weight_bytes"] * ours[f"decode_b{b}_tok_s"] / b / 1e9  # weights x steps/s
        rows.append(f"| achieved GB/s at batch {b} (weights x steps/s) | {achieved:.1f} | | "
                    f"{achieved / bandwidth[str(b)]:.0%} of the {b}-row matmul |")
    rows += [f"| {b}-row matmul GB/s (CPU backend, same run) | {bandwidth[str(b)]:.1f} | | |"
             for b in [1] + results["batches"]]
    rows += [f"| batch {b} / batch 1 ceiling from the matmul alone | "
             f"{b * bandwidth[str(b)] / bandwidth['1']:.2f}x | | |" for b in results["batches"]]
    return rows


def speed_keys(results):
    return [("prefill tok/s", "prefill_tok_s")] + [
        (f"decode tok/s (batch {b})", f"decode_b{b}_tok_s") for b in [1] + results["batches"]]


def cpu_vs_gpu_table(results) -> str:
    cpu, gpu = results["pyllm_cpu"], results["pyllm"]
    lines = [f"| metric | pyllm cpu | pyllm {results['backend']} | {results['backend']} / cpu |", "|---|---|---|---|"]
    lines += [f"| {label} | {cpu[key]:.1f} | {gpu[key]:.1f} | {gpu[key] / cpu[key]:.1f}x |"
              for label, key in speed_keys(results)]
    return "\n".join(lines)


def plot_cpu_vs_gpu(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = speed_keys(results)
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(9, 4))
    for offset, (name, data) in zip((-0.2, 0.2), [("cpu", results["pyllm_cpu"]), (results["backend"], results["pyllm"])]):
        ax.bar(x + offset, [data[k] for _, k in keys], 0.4, label=f"pyllm {name}")
    ax.set_xticks(x, [label.replace(" tok/s", "") for label, _ in keys])
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (log)")
    ax.set_title(f"{Path(results['model']).name}: CPU vs {results['backend']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ours, hf = results["pyllm"], results.get("transformers") or {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, key) in zip(axes, [("prefill (512-token prompt)", "prefill_tok_s"),
                                       ("decode, batch 1", "decode_b1_tok_s")]):
        names, values = ["pyllm"] + (["transformers"] if key in hf else []), [ours[key]] + ([hf[key]] if key in hf else [])
        bars = ax.bar(names, values, color=["tab:blue", "tab:orange"][:len(values)])
        ax.bar_label(bars, fmt="%.1f")
        ax.set_title(title)
        ax.set_ylabel("tokens / s")
    sizes = [1] + results["batches"]
    axes[2].plot(sizes, [ours[f"decode_b{b}_tok_s"] for b in sizes], "o-", label="pyllm aggregate")
    axes[2].plot(sizes, [ours["decode_b1_tok_s"] * b for b in sizes], "--", color="grey", label="linear")
    if "matmul_gb_s" in results:  # each step streams all weights once, at best at the matmul's rate
        axes[2].plot(sizes, [b * results["matmul_gb_s"][str(b)] * 1e9 / ours["weight_bytes"] for b in sizes], ":",
                     color="tab:red", label="matmul ceiling")
    axes[2].set_xlabel("sequences decoded together")
    axes[2].set_ylabel("tokens / s")
    axes[2].set_title("batched decode")
    axes[2].legend()
    fig.suptitle(f"{Path(results['model']).name} on {results['backend']} ({results['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args):
    if args.backend == "cuda-emu":
        from pyllm.errors import PyllmError
        raise PyllmError("cuda-emu emulates the GPU on the CPU for correctness; it has no speed to report")
    if args.model is None:
        from pyllm.pull import ensure_default_model
        args.model = str(ensure_default_model())
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.prompt_tokens < 1 or args.decode_tokens < 2 or min(batches, default=1) < 1 or args.rounds < 1:
        from pyllm.errors import PyllmError
        raise PyllmError("bench needs --prompt-tokens >= 1, --decode-tokens >= 2, batch sizes >= 1 and --rounds >= 1")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = can_plot()  # what is missing is said before the first measurement
    if not args.no_hf and not _has_transformers():
        print("transformers and torch are not installed: the comparison with transformers is skipped "
              "(pip install transformers torch accelerate)", file=sys.stderr)
        args.no_hf = True
    llm, ours = load_pyllm(args, args.backend, args.dtype)
    ids = prompt_ids(llm.tokenizer, args.prompt_tokens)
    measures = pyllm_measures(llm, ids, batches, args.decode_tokens, "pyllm")
    for measure in measures.values():  # warm-up: kernels built, buffers touched; then memory before the rest loads
        measure()
    ours["peak_rss_bytes"] = peak_rss_bytes()
    results = {"model": args.model, "backend": args.backend, "machine": f"{platform.machine()}, {_cores()} cores",
               "prompt_tokens": len(ids), "decode_tokens": args.decode_tokens, "batches": batches,
               "rounds": args.rounds, "pyllm": ours}
    roofline_bytes = {}
    if args.backend == "cpu":
        for b in [1] + batches:
            measures[f"matmul {b} rows"], roofline_bytes[b] = matmul_measure(min(ours["weight_bytes"], 512 << 20), b)
    if args.backend == "cuda":  # the CPU backend in the same run, and per-kernel bandwidth against the peak
        cpu_llm, results["pyllm_cpu"] = load_pyllm(args, "cpu", None)
        measures.update(pyllm_measures(cpu_llm, ids, batches, args.decode_tokens, "pyllm_cpu"))
    hf_load_s = None
    if not args.no_hf:
        hf_load_s, hf_measures = transformers_measures(args, ids)
        measures.update(hf_measures)
    try:
        best = interleaved_best(measures, args.rounds, lambda best: save_partial(out_dir, results, best))
    except KeyboardInterrupt:
        print(f"\ninterrupted: what was measured is in {out_dir / 'bench.json'} and {out_dir / 'bench.md'}",
              file=sys.stderr)
        raise
    ours.update(speeds(best, "pyllm", len(ids), batches, args.decode_tokens))
    if "pyllm_cpu" in results:
        results["pyllm_cpu"].update(speeds(best, "pyllm_cpu", len(ids), batches, args.decode_tokens))
    if roofline_bytes:
        results["matmul_gb_s"] = {str(b): n_bytes / best[f"matmul {b} rows"] / 1e9 for b, n_bytes in roofline_bytes.items()}
    if hf_load_s is not None:
        results["transformers"] = {"load_s": hf_load_s, "prefill_tok_s": len(ids) / best["transformers prefill"],
                                   "decode_b1_tok_s": (args.decode_tokens - 1) / best["transformers decode b1"]}
    if args.backend == "cuda":
        from pyllm.benchmarks.kernel_bench import report
        results["kernels"] = report(out_dir, "cuda", ours["dtype"])
    from pyllm.benchmarks.step_split import decode_split
    results["step_split"] = decode_split(llm)  # None off the CPU backend's one-call layers
    print(write_report(results, out_dir, plots))
    print(f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}" + (f", {out_dir / 'bench.png'}" if plots else ""))


def _has_transformers() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        return True
    except ImportError:
        return False


def _cores() -> int:
    from pyllm.backends import CORES
    return CORES
