"""What logprobs and grammars cost a decode step: SmolLM2 (the default model) decoding one sequence
plain, with logprobs (5 top alternatives), under a JSON-schema grammar, and with both.

The variants run in interleaved rounds (each round runs every variant once, in a rotating order)
so that a machine's drift hits all of them alike; each reports its median decode tokens/s (first
token excluded: it includes the prefill) and its cost per step against plain. Greedy, fixed length
(ignore_eos); the schema asks for more array items than max_tokens can write, so the grammar stays
active to the end. Writes serve_features_bench.json, .md and .png (the plot needs matplotlib).

    python -m pyllm.benchmarks.serve_features_bench [--model DIR] [--tokens 256] [--rounds 5] [--out DIR]

Run it with nothing else on the machine.
"""

import argparse
import json
import platform
import statistics
from pathlib import Path

from ..engine import LLM, StepTimer
from .bench import can_plot
from ..sampling import SamplingParams

PROMPT = [{"role": "user", "content": "List people as JSON: a name, an age and a city for each."}]
SCHEMA = {"type": "array", "minItems": 100_000, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                     "city": {"type": "string"}},
    "required": ["name", "age", "city"], "additionalProperties": False}}
VARIANTS = {"plain": (False, False), "logprobs": (True, False), "grammar": (False, True), "both": (True, True)}


def decode_rate(llm, ids, tokens: int, logprobs: bool, grammar: bool) -> float:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, logprobs=5 if logprobs else None)
    sequence = llm.new_sequence(ids, params, constraint=llm.grammars.json_schema(SCHEMA) if grammar else None)
    timer = StepTimer([sequence])
    for _ in timer.wrap(llm.run([sequence])):
        pass
    assert len(sequence.output_ids) == tokens, "the sequence ended early"
    return timer.stats(sequence)["decode_tok_s"]


def run(model: str | None, tokens: int, rounds: int) -> dict:
    llm = LLM(model, show_progress=False)
    ids = llm.tokenizer.encode_chat(PROMPT)
    llm.grammars.llg_tokenizer()  # built once, as a server does at start
    decode_rate(llm, ids, 2, True, True)  # warm-up
    rates = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(decode_rate(llm, ids, tokens, *VARIANTS[name]))
    plain_step = 1 / statistics.median(rates["plain"])
    return {"model": model or "default (SmolLM2-135M-Instruct)", "tokens": tokens, "rounds": rounds,
            "machine": platform.processor() or platform.machine(),
            "variants": {name: {"decode_tok_s_median": statistics.median(r), "decode_tok_s": r,
                                "extra_ms_per_step": 1000 * (1 / statistics.median(r) - plain_step)}
                         for name, r in rates.items()}}


def markdown(result: dict) -> str:
    lines = [f"# Cost of logprobs and grammars per decode step: {result['model']}", "",
             f"{result['tokens']} greedy tokens, one sequence, median of {result['rounds']} interleaved rounds.", "",
             "| variant | decode tok/s | extra ms / step vs plain |", "|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['decode_tok_s_median']:.1f} | {v['extra_ms_per_step']:+.2f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["variants"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(names, [result["variants"][n]["decode_tok_s_median"] for n in names], color="tab:blue")
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(f"logprobs and grammars: {result['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory or GGUF file (default: SmolLM2, pulled on first use)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    plots = can_plot()
    result = run(args.model, args.tokens, args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_features_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "serve_features_bench.md").write_text(markdown(result))
    if plots:  # last: a failing plot loses no result
        plot(result, out / "serve_features_bench.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
