"""pyllm bench runs end to end (on a tiny model), from any directory, and writes its three reports;
without matplotlib it still writes JSON and markdown; Ctrl-C keeps what was measured."""

import json
import signal
import subprocess
import sys
import time

import pytest

from pyllm.backends import cpu_kernels

SMALL = ["--prompt-tokens", "40", "--decode-tokens", "6", "--batches", "2"]
# the bench as a user runs it, with matplotlib made unimportable (as in a venv without the bench extra)
WITHOUT_MATPLOTLIB = ("import sys\n"
                      "class NoMatplotlib:\n"
                      "    def find_spec(self, name, path=None, target=None):\n"
                      "        if name.split('.')[0] == 'matplotlib':\n"
                      "            raise ImportError('No module named matplotlib')\n"
                      "sys.meta_path.insert(0, NoMatplotlib())\n"
                      "from pyllm.cli import main\n"
                      "main(sys.argv[1:])\n")


def bench_command(model_dir, out_dir, *extra):
    return [sys.executable, "-m", "pyllm", "bench", "--model", str(model_dir), "--out", str(out_dir), *SMALL, *extra]


def test_bench_writes_json_markdown_and_png(tiny_model, tmp_path):
    model_dir, _ = tiny_model
    elsewhere = tmp_path / "elsewhere"  # not the checkout: the harness ships inside the package
    elsewhere.mkdir()
    result = subprocess.run(bench_command(model_dir, tmp_path, "--rounds", "2"), cwd=elsewhere,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    for key in ("prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s", "peak_rss_bytes", "load_s"):
        assert report["pyllm"][key] > 0
    assert report["transformers"]["decode_b1_tok_s"] > 0 and report["rounds"] == 2
    assert "| decode tok/s (batch 1) |" in (tmp_path / "bench.md").read_text()
    assert set(report["matmul_gb_s"]) == {"1", "2"} and min(report["matmul_gb_s"].values()) > 0
    assert "| batch 2 / batch 1 ceiling from the matmul alone |" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if cpu_kernels.kernels_available():  # the split of a step: the matmuls as layers.c counts them, and the rest
        split = report["step_split"]
        assert 0 < split["matmul_ms"] < split["step_ms"] and split["rest_ms"] > 0
        assert "| of it in the weight-streaming kernels (ms) |" in (tmp_path / "bench.md").read_text()


def test_cpu_vs_gpu_report(tmp_path):
    """The CPU-vs-GPU section a `--backend cuda` run adds (GPU figures made up: none here)."""
    from pyllm.benchmarks.bench import write_report
    speeds = {"prefill_tok_s": 600.0, "decode_b1_tok_s": 40.0, "decode_b8_tok_s": 130.0}
    gpu = {**{k: v * 10 for k, v in speeds.items()}, "load_s": 1.0, "weight_bytes": 5e8, "peak_rss_bytes": 1e9}
    results = {"model": "m", "backend": "cuda", "machine": "test", "batches": [8],
               "pyllm": gpu, "pyllm_cpu": speeds}
    table = write_report(results, tmp_path)
    assert "| decode tok/s (batch 8) | 130.0 | 1300.0 | 10.0x |" in table
    assert (tmp_path / "cpu_vs_gpu.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_without_matplotlib_still_writes_json_and_markdown(tiny_model, tmp_path):
    model_dir, _ = tiny_model
    result = subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, *bench_command(model_dir, tmp_path, "--rounds", "1",
                                                                                     "--no-hf")[3:]],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pip install 'pyllm[bench]'" in result.stderr and "plot is skipped" in result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert "partial" not in report and report["pyllm"]["decode_b1_tok_s"] > 0
    assert "| decode tok/s (batch 1) |" in (tmp_path / "bench.md").read_text()
    assert not (tmp_path / "bench.png").exists()


def test_ctrl_c_mid_bench_keeps_the_finished_measurements(tiny_model, tmp_path):
    model_dir, _ = tiny_model
    bench = subprocess.Popen(bench_command(model_dir, tmp_path, "--rounds", "50", "--no-hf"), cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "bench.json").exists() and time.monotonic() < deadline and bench.poll() is None:
        time.sleep(0.1)
    bench.send_signal(signal.SIGINT)
    _, stderr = bench.communicate(timeout=60)
    assert bench.returncode == 130, stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["partial"] is True and report["best_seconds"] and min(report["best_seconds"].values()) > 0
    assert "| measurement | best seconds so far |" in (tmp_path / "bench.md").read_text()
    assert "interrupted: what was measured is in" in stderr


def test_quant_bench_reports_speed_quality_and_the_step_split(tmp_path):
    """The per-format benchmark (no peer) on a tiny q8_0 GGUF: speeds, the quality table with one
    sequence and a batch, the split of a step and the tiny-matrix step, JSON, markdown and PNG."""
    import gguf

    from pyllm.benchmarks import quant_bench
    from test_gguf import LAYERS, gpt2_vocab, hf_weights, write_gguf
    if not cpu_kernels.kernels_available():
        pytest.skip("no C kernels here: the split needs the one-call layers")
    vocab = gpt2_vocab()
    weights = hf_weights(len(vocab["tokens"]), tied=True, hidden=64, heads=4, kv_heads=2, ffn=128)
    path = write_gguf(tmp_path / "tiny-q8_0.gguf", vocab, weights, heads=4, kv_heads=2, extra={"context_length": 1024},
                      encode=lambda name, value: (value, gguf.GGMLQuantizationType.F32) if value.ndim == 1 else
                      (gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0))
    quant_bench.main(["--files", str(path), "--out", str(tmp_path), "--prompt-tokens", "32", "--decode-tokens", "6",
                      "--batches", "2", "--rounds", "1"])
    report = json.loads((tmp_path / "quant_bench.json").read_text())
    entry = report["files"]["tiny-q8_0"]
    assert entry["pyllm"]["decode_b1_tok_s"] > 0 and entry["pyllm"]["decode_b2_tok_s"] > 0
    assert 0 < entry["pyllm_step_split"]["matmul_ms"] < entry["pyllm_step_split"]["step_ms"]
    per_layer = 128 * 64 + 64 * 64 + 256 * 64 + 64 * 128  # q|k|v (GQA 4/2 of 16: 64 + 2 x 32 rows), o, gate|up, down
    assert entry["macs_per_token"] == LAYERS * per_layer + 64 * len(vocab["tokens"])  # + the tied vocabulary projection
    assert entry["decoder_macs_per_token"] == LAYERS * per_layer  # a prompt's: its last token alone meets the vocabulary
    assert set(report["tiny_step_ms"]) == {"f32", "q8_0"} and min(report["tiny_step_ms"].values()) > 0
    assert report["int8_dot_gmac_s"] > 0 and report["fma_gflop_s"] > 0  # the compute ceilings, with either set's kernels
    quality = entry["quality"]
    assert quality["pyllm_decode_argmax_agreement"] >= 0.99 and quality["pyllm_batched_decode_argmax_agreement"] > 0.8
    table = (tmp_path / "quant_bench.md").read_text()
    assert "| tiny-q8_0 |" in table and "weight-streaming kernels ms" in table and "of FMA peak" in table
    assert (tmp_path / "quant_bench.png").read_bytes()[:4] == b"\x89PNG"
