"""pyllm bench: load time, prefill and decode speed, batched decode, memory, bandwidth — and
transformers on the same weights, prompt and dtype in the same run, with the ratios.

Writes bench.json, bench.md and bench.png into --out. Run it with nothing else on the machine.
"""

import argparse
import json
import platform
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


def matmul_bandwidth(total_bytes: int, rows: int, n=1536, k=576, repeats=3) -> float:
    """GB/s of the CPU backend's matmul_transb with `rows` rows of activations, streaming
    `total_bytes` of f32 weights shaped like a decoder layer's [n, k]: the ceiling of decode at
    that batch size, since every step streams all the weights once."""
    from pyllm.backends.numpy_backend import matmul_transb
    count = max(1, total_bytes // (n * k * 4))
    weights = np.random.default_rng(0).standard_normal((count, n, k), dtype=np.float32)  # [count, n, k]
    x = np.ones((rows, k), np.float32)  # [rows, k]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            matmul_transb(x, w)
        best = min(best, time.perf_counter() - start)
    return weights.nbytes / best / 1e9


def best_of(fn, repeats=2):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_pyllm(args, ids, batches):
    import pyllm
    from pyllm.model import prefill
    start = time.perf_counter()
    llm = pyllm.LLM(args.model, backend=args.backend, dtype=args.dtype)
    r = {"load_s": time.perf_counter() - start, "weight_bytes": llm.model.weights.nbytes(), "dtype": llm.backend.dtype}
    prefill_s = best_of(lambda: prefill(llm.model, llm.model.new_cache(len(ids) + 1), ids))
    r["prefill_tok_s"] = len(ids) / prefill_s
    short = ids[:16]
    for batch in progress([1] + batches, desc="pyllm decode", unit="batch"):
        prompts = [short[i % 4:] for i in range(batch)]  # distinct prompts of slightly different lengths
        outs = llm.generate(prompts, max_tokens=args.decode_tokens, ignore_eos=True)
        decode_s = max(o.stats["decode_s"] for o in outs)
        r[f"decode_b{batch}_tok_s"] = batch * (args.decode_tokens - 1) / decode_s
    r["peak_rss_bytes"] = peak_rss_bytes()
    return r, llm


def bench_transformers(args, ids):
    import torch
    from transformers import AutoModelForCausalLM
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    r = {"load_s": time.perf_counter() - start}
    prompt = torch.tensor([ids])
    with torch.no_grad():
        r["prefill_tok_s"] = len(ids) / best_of(lambda: model(prompt, logits_to_keep=1))
        short = prompt[:, :16]

        def generate(n):
            return best_of(lambda: model.generate(short, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                  pad_token_id=0), repeats=1)
        r["decode_b1_tok_s"] = (args.decode_tokens - 1) / (generate(args.decode_tokens) - generate(1))
    return r


def write_report(results, out_dir: Path):
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
    table = "\n".join(lines)
    if "pyllm_cpu" in results:  # a GPU run also measured the CPU backend
        table += "\n\n" + cpu_vs_gpu_table(results)
        plot_cpu_vs_gpu(results, out_dir / "cpu_vs_gpu.png")
    (out_dir / "bench.md").write_text(f"# pyllm bench: {results['model']} ({results['backend']})\n\n{table}\n")
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / "bench.png")
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
    if args.prompt_tokens < 1 or args.decode_tokens < 2 or min(batches, default=1) < 1:
        from pyllm.errors import PyllmError
        raise PyllmError("bench needs --prompt-tokens >= 1, --decode-tokens >= 2 and batch sizes >= 1")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from pyllm.tokenizer import Tokenizer
    ids = prompt_ids(Tokenizer(args.model), args.prompt_tokens)
    ours, llm = bench_pyllm(args, ids, batches)
    results = {"model": args.model, "backend": args.backend, "machine": f"{platform.machine()}, {_cores()} cores",
               "prompt_tokens": len(ids), "decode_tokens": args.decode_tokens, "batches": batches,
               "pyllm": ours}
    if args.backend == "cpu":
        results["matmul_gb_s"] = {str(b): matmul_bandwidth(min(ours["weight_bytes"], 512 << 20), b)
                                  for b in progress([1] + batches, desc="matmul roofline", unit="batch")}
    del llm
    if not args.no_hf:
        try:
            results["transformers"] = bench_transformers(args, ids)
        except ImportError:
            print("transformers/torch not installed: skipping the comparison")
    if args.backend == "cuda":  # the CPU backend in the same run, and per-kernel bandwidth against the peak
        results["pyllm_cpu"], _ = bench_pyllm(argparse.Namespace(**{**vars(args), "backend": "cpu", "dtype": None}),
                                              ids, batches)
        from benchmarks.kernel_bench import report
        results["kernels"] = report(out_dir, "cuda", ours["dtype"])
    print(write_report(results, out_dir))
    print(f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'bench.md'}, {out_dir / 'bench.png'}")


def _cores() -> int:
    from pyllm.backends import CORES
    return CORES
