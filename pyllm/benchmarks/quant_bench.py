"""GGUF files in their own formats: pyllm against llama.cpp on the same file, beside the machine's
memory-read roofline, all measured in one run.

    python -m pyllm.benchmarks.quant_bench --files a.gguf b.gguf [--peer llama.cpp] [--out DIR]

Per file: decode tok/s at batch 1 and each --batches size, prefill tok/s of a --prompt-tokens
prompt, weight GB/s of a batch-1 decode step (the file's bytes x steps/s) beside the roofline (a C
loop reading 512 MB on every core, kernels/cpu/stream.c, and the same loop over the file's own size:
its ceiling where the cache holds it), peak RSS of loading it and generating (a
fresh process), and the perplexity of benchmarks/data/quality_text.txt for pyllm (as a prompt, and
teacher-forced through decode steps: the int8 kernels, one sequence and a batch of 5), llama.cpp and
transformers on the same file, with pyllm's argmax agreement against transformers; and where a
batch-1 step's time goes (step_split.py: the weight-streaming kernels' GB/s beside the same-run
read), with a 30-layer step of tiny matrices. Every speed is the best of --rounds rounds, each round
taking every measurement in turn (all files, both engines, the roofline, the splits), so a drift in
the machine's speed reaches both sides of a ratio alike. llama.cpp (llama-cpp-python) is optional: with
--peer llama.cpp it must import. Writes quant_bench.{json,md,png}. Run it with nothing else running.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pyllm.benchmarks.bench import can_plot, interleaved_best, prompt_ids, pyllm_measures, speeds, timed
from pyllm.benchmarks.step_split import TINY_FORMATS, decode_split, splits, tiny_step_ms

QUALITY_TEXT = Path(__file__).resolve().parent / "data" / "quality_text.txt"
ROOFLINE_BYTES = 512 << 20
SPLIT_STEPS = 64
# VmHWM (peak RSS of this address space) rather than ru_maxrss, which a child inherits from its parent
RSS_SCRIPT = ("import sys, pyllm\n"
              "def status(key):\n"
              "    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024\n"
              "base = status('VmRSS')\n"
              "llm = pyllm.LLM(sys.argv[1], show_progress=False)\n"
              "llm.generate('Once upon a time', max_tokens=8)\n"
              "print(status('VmHWM') - base)\n")


def rss_growth(path) -> int:
    """Bytes by which a fresh process's peak RSS exceeds a bare `import pyllm` after it loads
    `path` and generates 8 tokens."""
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip().splitlines()[-1])
    return int(result.stdout.split()[-1])


def roofline_measure(n_bytes=ROOFLINE_BYTES):
    """A measure of the C read loop over n_bytes: seconds. 512 MB is the memory roofline; a read of
    a file's own size is that file's ceiling where a large cache holds it (the weights of a small
    model may live in L3 between decode steps, so a step can beat the 512 MB read)."""
    from pyllm.backends import cpu_kernels
    data = np.ones(n_bytes // 4, np.float32)

    def measure():  # the second of two reads: warm wherever the cache holds the buffer, as a decode step's weights are
        cpu_kernels.stream_read(data)
        return timed(lambda: cpu_kernels.stream_read(data))
    return measure


def llama_cpp_model(path, n_ctx):
    import llama_cpp
    from pyllm.backends import CORES
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=CORES,
                           n_threads_batch=CORES, logits_all=True, verbose=False)


def llama_cpp_measures(model, ids, decode_tokens, name):
    """llama.cpp's prefill of ids and greedy decode of decode_tokens (seconds of the decode only)."""
    def prefill():
        model.reset()
        return timed(lambda: model.eval(ids))

    def decode():
        model.reset()
        model.eval(ids[:16])
        start = time.perf_counter()
        for _ in range(decode_tokens - 1):
            model.eval([int(np.argmax(model.scores[model.n_tokens - 1]))])
        return time.perf_counter() - start
    return {f"{name} llama.cpp prefill": prefill, f"{name} llama.cpp decode b1": decode}


def log_softmax(logits):
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def perplexity(logits, ids) -> float:
    """exp of the mean negative log-likelihood of ids[1:] under logits [len(ids), vocab]."""
    return float(np.exp(-log_softmax(logits[:-1])[np.arange(len(ids) - 1), ids[1:]].mean()))


def decode_teacher_forced(llm, ids, copies=1):
    """Logits [len(ids), vocab] of ids fed one token a step, in a batch of `copies` sequences of the
    same text (each step then has that many rows): the first copy's."""
    caches = [llm.model.new_cache(len(ids)) for _ in range(copies)]
    return np.concatenate([llm.model.forward([(cache, [token]) for cache in caches])[:1] for token in ids])


def quality(path, llm, ids, peer):
    """Perplexities of ids under each engine, and pyllm's argmax agreement with transformers:
    decoding one sequence (activations in two int8 layers) and in a batch of TWO_LAYER_ROWS + 1
    (one layer)."""
    from pyllm.backends.cpu import TWO_LAYER_ROWS
    import torch
    from transformers import AutoModelForCausalLM
    reference = AutoModelForCausalLM.from_pretrained(Path(path).parent, gguf_file=Path(path).name,
                                                     dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    decoded = decode_teacher_forced(llm, ids)
    batched = decode_teacher_forced(llm, ids, TWO_LAYER_ROWS + 1)
    prompt = llm.score(ids)
    result = {"transformers_ppl": perplexity(expected, ids), "pyllm_prompt_ppl": perplexity(prompt, ids),
              "pyllm_decode_ppl": perplexity(decoded, ids),
              "pyllm_decode_argmax_agreement": float((decoded.argmax(-1) == expected.argmax(-1)).mean()),
              "pyllm_batched_decode_ppl": perplexity(batched, ids),
              "pyllm_batched_decode_argmax_agreement": float((batched.argmax(-1) == expected.argmax(-1)).mean()),
              "pyllm_prompt_argmax_agreement": float((prompt.argmax(-1) == expected.argmax(-1)).mean())}
    if peer is not None:
        peer.reset()
        peer.eval(ids)
        result["llama_cpp_ppl"] = perplexity(np.asarray(peer.scores[:len(ids)]), ids)
    return result


def macs_per_token(weights, vocabulary=True) -> int:
    """Multiply-adds of one token's matmuls: every layer matrix, and the vocabulary projection
    (which a prompt makes for its last token only)."""
    def size(m):
        return sum(size(part) for part in m) if isinstance(m, tuple) else m.shape[0] * m.shape[1]
    return vocabulary * size(weights.lm_head) + sum(size(getattr(layer, name)) for layer in weights.layers
                                                    for name in ("qkv", "o", "gate_up", "down"))


def write_report(results, out_dir: Path, plots=True) -> str:
    roof = results["roofline_gb_s"]
    lines = [f"Same-run C read roofline: {roof:.1f} GB/s ({results['machine']}). Best of {results['rounds']} "
             f"interleaved rounds; prefill of {results['prompt_tokens']} tokens, decode of "
             f"{results['decode_tokens']} tokens.", "",
             "| file | MB | pyllm decode b1 | llama.cpp b1 | ratio | GB/s (of 512 MB read; of same-size read) | "
             "pyllm prefill | llama.cpp prefill | ratio | " + " | ".join(f"pyllm b{b} (x b1)" for b in results["batches"]) +
             " | peak RSS MB |", "|---" * (10 + len(results["batches"])) + "|"]
    for name, r in results["files"].items():
        ours, peer = r["pyllm"], r.get("llama.cpp", {})
        gb_s = r["bytes"] * ours["decode_b1_tok_s"] / 1e9
        ratio = lambda key: f"{ours[key] / peer[key]:.2f}x" if key in peer else "-"  # noqa: E731
        value = lambda d, key: f"{d[key]:.1f}" if key in d else "-"  # noqa: E731
        batched = " | ".join(f"{ours[f'decode_b{b}_tok_s']:.1f} ({ours[f'decode_b{b}_tok_s'] / ours['decode_b1_tok_s']:.2f}x)"
                             for b in results["batches"])
        lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {ours['decode_b1_tok_s']:.1f} | {value(peer, 'decode_b1_tok_s')} | "
                     f"{ratio('decode_b1_tok_s')} | {gb_s:.1f} ({gb_s / roof:.0%}; {gb_s / r['same_size_read_gb_s']:.0%}) | "
                     f"{ours['prefill_tok_s']:.1f} | "
                     f"{value(peer, 'prefill_tok_s')} | {ratio('prefill_tok_s')} | {batched} | {r['rss_bytes'] / 1e6:.0f} |")
    scheme = ("activations as two int8 layers, a batch of 5 one int8 layer" if results.get("kernels") in ("AVX-512", "AVX2")
              else "f32 NumPy at both")
    lines += ["", f"Kernels: {results.get('kernels')}. Decode: one sequence and a batch of 5 ({scheme}); "
              "agreement: teacher-forced argmax against transformers on the same file.", "",
              "| file | transformers ppl | pyllm ppl (prompt) | pyllm ppl (decode b1) | agreement | "
              "pyllm ppl (decode, batch of 5) | agreement | llama.cpp ppl |", "|---" * 8 + "|"]
    for name, r in results["files"].items():
        q = r["quality"]
        rel = lambda key: f"{q[key]:.3f} ({q[key] / q['transformers_ppl'] - 1:+.2%})"  # noqa: E731
        lines.append(f"| {name} | {q['transformers_ppl']:.3f} | {q['pyllm_prompt_ppl']:.3f} | {rel('pyllm_decode_ppl')} | "
                     f"{q['pyllm_decode_argmax_agreement']:.1%} | {rel('pyllm_batched_decode_ppl')} | "
                     f"{q['pyllm_batched_decode_argmax_agreement']:.1%} | {q.get('llama_cpp_ppl', float('nan')):.3f} |")
    if "int8_dot_gmac_s" in results:
        peak = results["int8_dot_gmac_s"]
        fma = results["fma_gflop_s"]
        lines += ["", "Compute ceilings, same run (kernels/cpu/stream.c's loops on every core): a batched decode "
                  f"step's is int8 dot products (peak {peak:.0f} G multiply-adds/s; its ceiling = peak / the "
                  "model's multiply-adds per token); a prompt's f32 FMAs, since it computes on the stored weights "
                  f"dequantized (peak {fma:.0f} GFLOPS; prefill GFLOPS counts the decoder matmuls' 2 flops per "
                  "multiply-add).", "",
                  "| file | M multiply-adds / token | int8-compute ceiling tok/s | " +
                  " | ".join(f"pyllm b{b} (of ceiling)" for b in results["batches"]) +
                  " | prefill GFLOPS (of FMA peak) |", "|---" * (4 + len(results["batches"])) + "|"]
        for name, r in results["files"].items():
            ceiling = peak * 1e9 / r["macs_per_token"]
            prefill_gflop_s = 2 * r["decoder_macs_per_token"] * r["pyllm"]["prefill_tok_s"] / 1e9
            lines.append(f"| {name} | {r['macs_per_token'] / 1e6:.1f} | {ceiling:.0f} | " + " | ".join(
                f"{r['pyllm'][f'decode_b{b}_tok_s']:.1f} ({r['pyllm'][f'decode_b{b}_tok_s'] / ceiling:.0%})"
                for b in results["batches"]) + f" | {prefill_gflop_s:.0f} ({prefill_gflop_s / fma:.0%}) |")
    lines += ["", f"Where a batch-1 decode step's time goes (one sequence, {SPLIT_STEPS} steps in each interleaved "
              "round; the round whose kernels were fastest): the weight-streaming kernels (decoder matmuls and the "
              "vocabulary projection) against the rest (norms, rope, attention, Python and the calls into C), with the "
              "kernels' GB/s of the file beside the same-run 512 MB read. A 30-layer step of 64-wide matrices (pure "
              "dispatch, best of the rounds): " +
              ", ".join(f"{fmt} {ms:.3f} ms" for fmt, ms in results["tiny_step_ms"].items()) + ".", "",
              "| file | step ms | weight-streaming kernels ms | their GB/s (of the read) | the rest ms |",
              "|---|---|---|---|---|"]
    for name, r in results["files"].items():
        split = r.get("pyllm_step_split")
        if split:
            gb_s = r["bytes"] / split["matmul_ms"] / 1e6
            lines.append(f"| {name} | {split['step_ms']:.2f} | {split['matmul_ms']:.2f} | {gb_s:.1f} ({gb_s / roof:.0%}) "
                         f"| {split['rest_ms']:.2f} |")
    table = "\n".join(lines)
    (out_dir / "quant_bench.md").write_text(f"# pyllm quant_bench\n\n{table}\n")
    (out_dir / "quant_bench.json").write_text(json.dumps(results, indent=2))
    if plots:  # last: a failing plot loses no result
        plot(results, out_dir / "quant_bench.png")
    return table


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results["files"])
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in [(axes[0], "decode_b1_tok_s", "decode, batch 1"), (axes[1], "prefill_tok_s", "prefill")]:
        for offset, engine, color in [(-0.2, "pyllm", "tab:blue"), (0.2, "llama.cpp", "tab:green")]:
            values = [results["files"][n].get(engine, {}).get(key, 0.0) for n in names]
            ax.bar_label(ax.bar(x + offset, values, 0.4, label=engine, color=color), fmt="%.0f")
        if key == "decode_b1_tok_s":  # the roofline: every step reads the file's bytes once
            ax.plot(x, [results["roofline_gb_s"] * 1e9 / results["files"][n]["bytes"] for n in names], "r_",
                    markersize=30, label="read roofline")
        ax.set_xticks(x, names)
        ax.set_ylabel("tokens / s")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"pyllm vs llama.cpp, same files, same run ({results['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def split_measure(llm, kept: dict, name: str):
    """A measure: seconds in the weight-streaming kernels per batch-1 step (decode_split); kept[name]
    holds the whole split of the round whose kernels were fastest."""
    def measure():
        split = decode_split(llm, SPLIT_STEPS)
        if name not in kept or split["matmul_ms"] < kept[name]["matmul_ms"]:
            kept[name] = split
        return split["matmul_ms"] / 1e3
    return measure


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="+", required=True, help="GGUF files")
    parser.add_argument("--peer", choices=["llama.cpp"], help="also run llama.cpp (llama-cpp-python) on each file")
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--batches", default="4,8")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.peer:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            parser.error("--peer llama.cpp needs llama-cpp-python in this environment (pip install llama-cpp-python)")
    plots = can_plot()
    import platform

    import pyllm
    from pyllm.backends import CORES, cpu_kernels
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",") if b]
    measures, files, kept_splits = {"roofline": roofline_measure()}, {}, {}
    measures.update({f"tiny step {fmt}": lambda fmt=fmt: tiny_step_ms(fmt) / 1e3 for fmt in TINY_FORMATS})
    if cpu_kernels.int8_dot_peak(1000) is not None:  # seconds per unit of work: the best round is the peak
        measures["int8 dot"] = lambda: 1.0 / cpu_kernels.int8_dot_peak()
        measures["fma"] = lambda: 1.0 / cpu_kernels.fma_peak()
    for path in map(Path, args.files):
        name = path.stem
        llm = pyllm.LLM(str(path), show_progress=False)
        ids = prompt_ids(llm.tokenizer, args.prompt_tokens)
        peer = llama_cpp_model(path, n_ctx=1024) if args.peer else None
        text = llm.tokenizer.encode(QUALITY_TEXT.read_text())[:512]
        files[name] = {"path": str(path), "bytes": path.stat().st_size, "rss_bytes": rss_growth(path),
                       "macs_per_token": macs_per_token(llm.model.weights),
                       "decoder_macs_per_token": macs_per_token(llm.model.weights, vocabulary=False),
                       "quality": quality(path, llm, text, peer), "llm": llm, "ids": ids}
        measures[f"{name} same-size read"] = roofline_measure(path.stat().st_size // 64 * 64)
        measures.update(pyllm_measures(llm, ids, batches, args.decode_tokens, f"{name} pyllm"))
        if splits(llm):
            measures[f"{name} pyllm split"] = split_measure(llm, kept_splits, name)
        if peer is not None:
            measures.update(llama_cpp_measures(peer, ids, args.decode_tokens, name))
    best = interleaved_best(measures, args.rounds)
    kernels = ("AVX-512" if cpu_kernels.avx512_available() else "AVX2" if cpu_kernels.kernels_available()
               else "NumPy")
    results = {"machine": f"{platform.machine()}, {CORES} cores", "kernels": kernels, "rounds": args.rounds,
               "batches": batches,
               "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
               "roofline_gb_s": ROOFLINE_BYTES / best["roofline"] / 1e9, "files": {}}
    if "int8 dot" in best:
        results["int8_dot_gmac_s"] = 1e-9 / best["int8 dot"]
        results["fma_gflop_s"] = 1e-9 / best["fma"]
    for name, f in files.items():
        entry = {k: v for k, v in f.items() if k not in ("llm", "ids")}
        entry["pyllm"] = speeds(best, f"{name} pyllm", len(f["ids"]), batches, args.decode_tokens)
        entry["same_size_read_gb_s"] = f["bytes"] // 64 * 64 / best[f"{name} same-size read"] / 1e9
        if args.peer:
            entry["llama.cpp"] = {"prefill_tok_s": len(f["ids"]) / best[f"{name} llama.cpp prefill"],
                                  "decode_b1_tok_s": (args.decode_tokens - 1) / best[f"{name} llama.cpp decode b1"]}
        entry["pyllm_step_split"] = kept_splits.get(name)
        results["files"][name] = entry
    results["tiny_step_ms"] = {fmt: 1e3 * best[f"tiny step {fmt}"] for fmt in TINY_FORMATS}
    print(write_report(results, out_dir, plots))


if __name__ == "__main__":
    main()
