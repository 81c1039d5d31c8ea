"""pyllm bench runs end to end (on a tiny model) and writes its three reports."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_writes_json_markdown_and_png(tiny_model, tmp_path):
    model_dir, _ = tiny_model
    result = subprocess.run(
        [sys.executable, "-m", "pyllm", "bench", "--model", str(model_dir), "--out", str(tmp_path),
         "--prompt-tokens", "40", "--decode-tokens", "6", "--batches", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    for key in ("prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s", "peak_rss_bytes", "load_s"):
        assert report["pyllm"][key] > 0
    assert report["transformers"]["decode_b1_tok_s"] > 0
    assert "| decode tok/s (batch 1) |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
