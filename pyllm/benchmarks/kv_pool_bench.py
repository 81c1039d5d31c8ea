"""The paged KV pool under load, on `pyllm serve` with a small pool (SmolLM2 by default):

  early stops   24 concurrent chat requests with max_tokens 400 that stop on their own: the
                peak of pyllm_running_sequences (all 24 in one batch), against what reserving
                prompt + max_tokens per request would admit in the same pool
  shared prompt 16 concurrent requests sharing a 600-token system prompt: the cached tokens each
                reports, the prompt tokens prefilled in all, and the pool's peak blocks in use
                (the prompt held once) against 16 private copies

Writes kv_pool_bench.json and kv_pool_bench.md.

    python -m pyllm.benchmarks.kv_pool_bench [--model FILE] [--kv-memory-gb 0.25] [--out DIR]
"""

import argparse
import asyncio
import json
import re
from pathlib import Path

import httpx

from .serve_bench import TOPICS, free_port, start_server, stop_server

BLOCK_TOKENS = 16


def metrics(url) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(pyllm_\w+) ([\d.e+-]+)$", text, re.MULTILINE)}


async def chat(http, url, messages, max_tokens) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    usage = None
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    return usage


async def run_all(url, requests) -> tuple[list[dict], dict]:
    """Every request at once, the server's gauges polled meanwhile -> (usages, peaks)."""
    peaks = {"pyllm_running_sequences": 0.0, "pyllm_kv_blocks_used": 0.0}
    done = False

    async def poll():
        async with httpx.AsyncClient(timeout=10) as http:
            while not done:
                text = (await http.get(url + "/metrics")).text
                for name in peaks:
                    value = float(re.search(rf"^{name} ([\d.e+-]+)$", text, re.MULTILINE).group(1))
                    peaks[name] = max(peaks[name], value)
                await asyncio.sleep(0.05)
    poller = asyncio.create_task(poll())
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        usages = await asyncio.gather(*(chat(http, url, m, n) for m, n in requests))
    done = True
    await poller
    return usages, peaks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--kv-memory-gb", type=float, default=0.25)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.model, port, 32, ["--kv-memory-gb", str(args.kv_memory_gb)])
    try:
        before = metrics(url)
        pool_tokens = before["pyllm_kv_blocks"] * BLOCK_TOKENS
        early = [([{"role": "user", "content": f"In one sentence, what is {TOPICS[i % len(TOPICS)]}? ({i})"}], 400)
                 for i in range(24)]
        usages, peaks = asyncio.run(run_all(url, early))
        longest_prompt = max(u["prompt_tokens"] for u in usages)
        result = {"kv_memory_gb": args.kv_memory_gb, "pool_tokens": pool_tokens, "early_stops": {
            "requests": 24, "peak_running_sequences": peaks["pyllm_running_sequences"],
            "reservation_would_admit": int(pool_tokens // (longest_prompt + 400)),
            "completion_tokens": [u["completion_tokens"] for u in usages]}}
        system = " ".join(f"Rule {i}: answer politely and briefly." for i in range(61))  # a system prompt of ~600 tokens
        shared = [([{"role": "system", "content": system}, {"role": "user", "content": f"Say {i}."}], 8)
                  for i in range(16)]
        mid = metrics(url)
        usages, peaks = asyncio.run(run_all(url, shared))
        after = metrics(url)
        cached = sorted(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
        prompt = usages[0]["prompt_tokens"]
        result["shared_prompt"] = {
            "requests": 16, "prompt_tokens": prompt, "cached_tokens": cached,
            "prefilled_tokens": 16 * prompt - sum(cached),
            "peak_blocks_used": peaks["pyllm_kv_blocks_used"],
            "private_copies_would_hold": 16 * -(-(prompt + 8) // BLOCK_TOKENS),
            "prefix_hits": after["pyllm_prefix_cache_hits_total"] - mid["pyllm_prefix_cache_hits_total"]}
    finally:
        stop_server(proc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_pool_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    e, s = result["early_stops"], result["shared_prompt"]
    md = [f"# pyllm kv_pool_bench\n", f"Pool: {args.kv_memory_gb} GB = {pool_tokens:.0f} tokens in blocks of {BLOCK_TOKENS}.\n",
          "| scenario | result |", "|---|---|",
          f"| 24 chats, max_tokens 400, stopping early | peak running sequences {e['peak_running_sequences']:.0f}; "
          f"reserving prompt + max_tokens would admit {e['reservation_would_admit']}; answers "
          f"{min(e['completion_tokens'])}-{max(e['completion_tokens'])} tokens |",
          f"| 16 requests sharing a {s['prompt_tokens']}-token prompt | cached tokens {s['cached_tokens'][0]} (first) "
          f"and {min(s['cached_tokens'][1:])}-{max(s['cached_tokens'])} (the others); {s['prefilled_tokens']} prompt "
          f"tokens prefilled in all; peak {s['peak_blocks_used']:.0f} blocks in use against "
          f"{s['private_copies_would_hold']} for private copies |"]
    (out / "kv_pool_bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
