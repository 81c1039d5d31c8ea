"""Prometheus text exposition for /metrics: request counts, tokens, queue depths, batch sizes, latencies.

Engine-side numbers (tokens, steps, batch sizes, running/waiting, KV bytes) come from the scheduler's
stats; request counts and per-request latencies are recorded here as requests end. Everything here
runs on the event loop's thread, so nothing needs a lock.
"""

import collections

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)   # per bucket, not cumulative
        self.count, self.sum = 0, 0.0

    def observe(self, value: float, times: int = 1):
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += times
                break
        self.count += times
        self.sum += value * times

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self.requests = collections.Counter()   # (endpoint, status) -> count
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)

    def request_done(self, endpoint: str, status: int, usage=None):
        self.requests[endpoint, status] += 1
        if usage is not None and usage.ttft_s is not None:
            self.ttft.observe(usage.ttft_s)
        if usage is not None and usage.tpot_s is not None:
            self.tpot.observe(usage.tpot_s)

    def render(self, stats: dict) -> str:
        lines = _family("pyllm_requests_total", "counter", "Requests by endpoint and HTTP status (499: client left).",
                        [f'pyllm_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                         for (e, s), n in sorted(self.requests.items())])
        lines += _family("pyllm_time_to_first_token_seconds", "histogram", "Request arrival to first generated token.",
                         self.ttft.lines("pyllm_time_to_first_token_seconds"))
        lines += _family("pyllm_time_per_output_token_seconds", "histogram",
                         "Mean time per generated token after the first, per request.",
                         self.tpot.lines("pyllm_time_per_output_token_seconds"))
        batch = Histogram(BATCH_BUCKETS)
        for size, steps in stats["batch_sizes"].items():
            batch.observe(size, steps)
        lines += _family("pyllm_batch_size", "histogram", "Sequences in each engine step.",
                         batch.lines("pyllm_batch_size"))
        for name, kind, help_text, key in SCALARS:
            lines += _family(name, kind, help_text, [f"{name} {stats.get(key, 0)}"])
        return "\n".join(lines) + "\n"


SCALARS = [
    ("pyllm_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", "prompt_tokens"),
    ("pyllm_cached_prompt_tokens_total", "counter", "Prompt tokens whose KV blocks were cached.",
     "cached_tokens"),
    ("pyllm_generation_tokens_total", "counter", "Generated tokens.", "generated_tokens"),
    ("pyllm_engine_steps_total", "counter", "Batched forward steps.", "steps"),
    ("pyllm_running_requests", "gauge", "Requests in the running batch.", "running"),
    ("pyllm_running_sequences", "gauge", "Sequences (choices) in the running batch.", "running_sequences"),
    ("pyllm_waiting_sequences", "gauge", "Requests waiting for admission.", "waiting"),
    ("pyllm_kv_blocks", "gauge", "Blocks of 16 tokens in the KV pool.", "blocks"),
    ("pyllm_kv_blocks_used", "gauge", "KV blocks held by running sequences.", "blocks_used"),
    ("pyllm_kv_blocks_cached", "gauge", "KV blocks held by no one, kept by content for later prompts.",
     "blocks_cached"),
    ("pyllm_kv_blocks_free", "gauge", "KV blocks holding nothing.", "blocks_free"),
    ("pyllm_kv_block_bytes", "gauge", "Bytes of one KV block (K and V, every layer).", "block_bytes"),
    ("pyllm_prefix_cache_queries_total", "counter", "Full prompt blocks looked up in the prefix cache.",
     "prefix_lookups"),
    ("pyllm_prefix_cache_hits_total", "counter", "Full prompt blocks found in the prefix cache.", "prefix_hits"),
    ("pyllm_preemptions_total", "counter", "Sequences that gave their KV blocks back and recomputed later.",
     "preemptions"),
]


def summed_stats(stats: list[dict]) -> dict:
    """Several engines' stats (Scheduler.stats) as one: counts and gauges added, batch sizes
    merged; block_bytes, the same for every replica of a model, as it is."""
    total = {"batch_sizes": collections.Counter()}
    for one in stats:
        total["batch_sizes"].update(one["batch_sizes"])
        for key, value in one.items():
            if key == "block_bytes":
                total[key] = value
            elif key != "batch_sizes":
                total[key] = total.get(key, 0) + value
    return total


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
