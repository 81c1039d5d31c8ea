"""Serving benchmark: 1, 4, 8 and 16 concurrent streaming clients against `pyllm serve` on loopback.

Starts the server as a subprocess (SmolLM2 by default) and stops it at the end. Each level runs its
clients for a fixed time: every client sends one streaming chat request after another (fixed
length: ignore_eos), and a request started in the window runs to its end. Measures time to first
token, time per output token, inter-token latency (p50/p95), output tokens/s (all replicas
together), errors and the RSS of the server and of each engine replica (/replicas) idle and after
each level. Writes serve_bench.json, serve_bench.md, serve_bench.png.

    python -m pyllm.benchmarks.serve_bench [--model DIR] [--duration 30] [--levels 1,4,8,16] [--out DIR]
                                           [--replicas N --threads T]   # N engine replicas on Ray Serve

Run it with nothing else on the machine; only 127.0.0.1 is ever contacted.
"""

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

TOPICS = ["the sea", "a lighthouse", "winter in the mountains", "a clockmaker", "the first snow", "a small robot",
          "an old library", "a desert city", "the night train", "a garden"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, max_running: int, options=()) -> subprocess.Popen:
    command = [sys.executable, "-m", "pyllm", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-running", str(max_running), *options] + (["--model", model] if model else [])
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # a first run may pull and convert the default model
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start (exit code {proc.poll()})")


def stop_server(proc: subprocess.Popen):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(http, url, model, n, max_tokens) -> dict:
    """One streaming chat request -> its timings (seconds) and token count."""
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0.7, "seed": n,
            "messages": [{"role": "user", "content": f"Write a short story about {TOPICS[n % len(TOPICS)]}."}]}
    start, arrivals, tokens = time.perf_counter(), [], 0
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError("no tokens")
    return {"ttft": arrivals[0] - start, "itl": list(np.diff(arrivals)), "tokens": tokens,
            "tpot": (arrivals[-1] - arrivals[0]) / (tokens - 1) if tokens > 1 else None}


async def run_level(url, model, clients, duration, max_tokens) -> dict:
    results, errors = [], []
    counter = iter(range(10**9))

    async def client(http):
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline:
            try:
                results.append(await one_request(http, url, model, next(counter), max_tokens))
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.5)  # a failing server is not hammered

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return summarize(clients, results, errors, time.perf_counter() - start)


def pct(values, q):
    return float(np.percentile(values, q)) if values else None


def summarize(clients, results, errors, wall) -> dict:
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    itl = [x for r in results for x in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": wall, "output_tok_s": tokens / wall, "output_tokens": tokens,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "tpot_p50": pct(tpot, 50), "tpot_p95": pct(tpot, 95),
            "itl_p50": pct(itl, 50), "itl_p95": pct(itl, 95)}


def replica_rss_mb(url) -> list[float]:
    """Each engine replica's resident memory (the server itself when it runs one engine)."""
    return [r["rss_bytes"] / 2**20 for r in httpx.get(url + "/replicas", timeout=10).json()["replicas"]]


def mb_list(values) -> str:
    return " / ".join(f"{v:.0f}" for v in values)


def ms(value) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def write_report(report: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_bench.json").write_text(json.dumps(report, indent=2))
    title = (f"# pyllm serve: {report['model']}, {report['engines']}, {report['duration_s']} s per level, "
             f"{report['max_tokens']} tokens a request")
    header = ("| clients | requests | errors | output tok/s | TTFT p50 / p95 (ms) | TPOT p50 / p95 (ms) "
              "| ITL p50 / p95 (ms) | server RSS after (MB) | replica RSS after (MB) |")
    lines = [title, "", f"Server RSS idle: {report['rss_idle_mb']:.0f} MB; each engine replica's: "
             f"{mb_list(report['replica_rss_idle_mb'])} MB", "", header, "|---" * 9 + "|"]
    for r in report["levels"]:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['output_tok_s']:.1f} "
                     f"| {ms(r['ttft_p50'])} / {ms(r['ttft_p95'])} | {ms(r['tpot_p50'])} / {ms(r['tpot_p95'])} "
                     f"| {ms(r['itl_p50'])} / {ms(r['itl_p95'])} | {r['rss_after_mb']:.0f} "
                     f"| {mb_list(r['replica_rss_after_mb'])} |")
    (out / "serve_bench.md").write_text("\n".join(lines) + "\n")
    plot(report, out / "serve_bench.png")


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    levels = report["levels"]
    x = [r["clients"] for r in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(x, [r["output_tok_s"] for r in levels], "o-")
    left.set(title="output throughput", xlabel="concurrent clients", ylabel="tokens/s")
    for key, label in (("ttft", "time to first token"), ("itl", "inter-token latency")):
        for q, style in (("p50", "o-"), ("p95", "s--")):
            right.plot(x, [(r[f"{key}_{q}"] or 0) * 1000 for r in levels], style, label=f"{label} {q}")
    right.set(title="latency", xlabel="concurrent clients", ylabel="ms", yscale="log")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    fig.suptitle(f"pyllm serve — {report['model']}, {report['engines']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the server's default, SmolLM2)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency level")
    parser.add_argument("--levels", default="1,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench-out/serve")
    parser.add_argument("--replicas", type=int, help="engine replicas on Ray Serve (default: one engine in the server)")
    parser.add_argument("--threads", type=int, help="the C kernels' threads per engine (default: every core)")
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.levels.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    options = [*(["--replicas", str(args.replicas)] if args.replicas else []),
               *(["--threads", str(args.threads)] if args.threads else [])]
    engines = (f"{args.replicas} replica(s) on Ray" if args.replicas else "one engine") + \
        (f", {args.threads} thread(s) each" if args.threads else "")
    proc = start_server(args.model, port, max_running=max(levels), options=options)
    try:
        server = psutil.Process(proc.pid)
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        httpx.post(url + "/v1/chat/completions", timeout=60,  # warm-up: first-use allocations are not load
                   json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        time.sleep(1.0)
        report = {"model": model, "engines": engines, "replicas": args.replicas, "threads": args.threads,
                  "duration_s": args.duration, "max_tokens": args.max_tokens,
                  "rss_idle_mb": server.memory_info().rss / 2**20, "replica_rss_idle_mb": replica_rss_mb(url),
                  "levels": []}
        for clients in levels:
            level = asyncio.run(run_level(url, model, clients, args.duration, args.max_tokens))
            time.sleep(1.0)  # the server goes idle and hands freed memory back
            level["rss_after_mb"] = server.memory_info().rss / 2**20
            level["replica_rss_after_mb"] = replica_rss_mb(url)
            report["levels"].append(level)
            print(f"{clients:3d} clients: {level['output_tok_s']:.1f} tok/s, TTFT p50 {ms(level['ttft_p50'])} ms, "
                  f"ITL p50 {ms(level['itl_p50'])} ms, {level['errors']} errors", flush=True)
    finally:
        stop_server(proc)
    write_report(report, Path(args.out))
    print(f"wrote {args.out}/serve_bench.{{json,md,png}}")


if __name__ == "__main__":
    main()
