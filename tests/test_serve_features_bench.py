"""serve_features_bench runs end to end on a tiny model (a smoke run: 3 tokens, one round)."""

from conftest import make_tiny_model
from pyllm.benchmarks import serve_features_bench


def test_serve_features_bench_smoke(tmp_path):
    make_tiny_model(tmp_path / "tiny")
    serve_features_bench.main(["--model", str(tmp_path / "tiny"), "--tokens", "3", "--rounds", "1",
                               "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "serve_features_bench.md").read_text()
    assert all(f"| {name} |" in table for name in serve_features_bench.VARIANTS)
    assert (tmp_path / "out" / "serve_features_bench.json").is_file()
    assert (tmp_path / "out" / "serve_features_bench.png").read_bytes()[:4] == b"\x89PNG"
