"""pyllm bench runs end to end (on a tiny model) and writes its three reports."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_writes_json_markdown_and_png(tiny_model, tmp_path):
    model_dir, _ = tiny_model
    result = subprocess.run(
        [sys.executable, "-m", "pyllm", "bench", "--model", str(model_dir), "--out", str(tmp_path),
         "--prompt-tokens", "40", "--decode-tokens", "6", "--batches", "2", "--rounds", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    for key in ("prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s", "peak_rss_bytes", "load_s"):
        assert report["pyllm"][key] > 0
    assert report["transformers"]["decode_b1_tok_s"] > 0 and report["rounds"] == 2
    assert "| decode tok/s (batch 1) |" in (tmp_path / "bench.md").read_text()
    assert set(report["matmul_gb_s"]) == {"1", "2"} and min(report["matmul_gb_s"].values()) > 0
    assert "| batch 2 / batch 1 ceiling from the matmul alone |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_vs_gpu_report(tmp_path):
    """The CPU-vs-GPU section a `--backend cuda` run adds (GPU figures made up: none here)."""
    from benchmarks.bench import write_report
    speeds = {"prefill_tok_s": 600.0, "decode_b1_tok_s": 40.0, "decode_b8_tok_s": 130.0}
    gpu = {**{k: v * 10 for k, v in speeds.items()}, "load_s": 1.0, "weight_bytes": 5e8, "peak_rss_bytes": 1e9}
    results = {"model": "m", "backend": "cuda", "machine": "test", "batches": [8],
               "pyllm": gpu, "pyllm_cpu": speeds}
    table = write_report(results, tmp_path)
    assert "| decode tok/s (batch 8) | 130.0 | 1300.0 | 10.0x |" in table
    assert (tmp_path / "cpu_vs_gpu.png").read_bytes()[:4] == b"\x89PNG"
