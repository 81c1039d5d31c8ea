"""Where a decode step's time goes, for the benchmarks' reports.

    decode_split(llm)   one sequence's decode steps: ms per step, of which in the weight-streaming
                        kernels (the decoder layers' matmuls as kernels/cpu/layers.c counts them,
                        and the vocabulary projection), and the rest (norms, rope, attention,
                        gathers, Python and the calls into C)
    splits(llm)         whether decode_split runs for llm (the CPU backend's one-call layers)
    tiny_step_ms(fmt)   a decode step of a 30-layer model with tiny matrices (f32, or a block
                        format): almost no weight traffic, so what a step costs beyond its
                        arithmetic (dispatch)

python -m pyllm.benchmarks.step_split [--model FILE.gguf | DIR] prints both.
"""

import argparse
import statistics
import time

import numpy as np

from ..backends import cpu_layers, make_backend
from ..config import ModelConfig
from ..formats import format_named
from ..model import LlamaModel
from ..weights import LayerWeights, ModelWeights, QuantizedMatrix


def splits(llm) -> bool:
    """Whether decode_split can time llm's steps: the CPU backend with its one-call layers."""
    return cpu_layers.decoder_matmul_seconds(False) is not None and getattr(llm.backend, "name", "") == "cpu"


def decode_split(llm, steps=48, sequences=1) -> dict | None:
    """{step_ms, matmul_ms, rest_ms} per step of `sequences` sequences decoding `steps` tokens each
    through the CPU backend's one-call layers, or None where those do not run (splits(llm) false)."""
    model, backend = llm.model, llm.backend
    if not splits(llm):
        return None
    caches = [model.new_cache(steps + 2) for _ in range(sequences)]
    model.forward([(cache, [1 + s]) for s, cache in enumerate(caches)])  # warm: the layer table, the caches' C form
    vocab_seconds = 0.0

    def timed_projection(x, weight, project=backend.project_to_vocab):
        nonlocal vocab_seconds
        start = time.perf_counter()
        out = project(x, weight)
        vocab_seconds += time.perf_counter() - start
        return out
    backend.project_to_vocab = timed_projection  # this instance only, until the del below
    cpu_layers.decoder_matmul_seconds(True)
    start = time.perf_counter()
    try:
        for token in range(steps):
            model.forward([(cache, [2 + token + s]) for s, cache in enumerate(caches)])
    finally:
        layers_seconds = cpu_layers.decoder_matmul_seconds(False)
        del backend.project_to_vocab
    total = time.perf_counter() - start
    matmul = layers_seconds + vocab_seconds
    return {"step_ms": 1e3 * total / steps, "matmul_ms": 1e3 * matmul / steps, "rest_ms": 1e3 * (total - matmul) / steps}


TINY_FORMATS = ("f32", "q8_0")  # the tiny step's matrices: plain f32 rows, and int8 blocks


def tiny_model(layers=30, fmt="q8_0", seed=0) -> LlamaModel:
    """A random llama of `layers` layers with 64-wide matrices in `fmt` (f32: plain arrays) on the
    CPU backend, each matrix handed to it as a loader does (upload: interleaved where it would be)."""
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=True,
                         attention_bias=False)
    rng = np.random.default_rng(seed)
    block, backend = format_named(fmt), make_backend("cpu", config)

    def matrix(rows, cols):  # [rows, cols]
        values = (0.1 * rng.standard_normal((rows, cols))).astype(np.float32)
        return backend.upload(values if fmt == "f32" else QuantizedMatrix.quantize(values, block, "random"))
    ones = np.ones(64, np.float32)
    embed = matrix(256, 64)
    stack = [LayerWeights(ones, matrix(128, 64), None, matrix(64, 64), ones, matrix(256, 64), matrix(64, 128))
             for _ in range(layers)]
    return LlamaModel(config, backend, ModelWeights(embed, stack, ones, embed))


def tiny_step_ms(fmt="q8_0", steps=300) -> float:
    """Median ms of one decode step (one sequence) of tiny_model(fmt=fmt)."""
    model = tiny_model(fmt=fmt)
    cache = model.new_cache(steps + 2)
    model.forward([(cache, [1])])
    times = []
    for token in range(steps):
        start = time.perf_counter()
        model.forward([(cache, [token % 256])])
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def describe(split: dict, weight_bytes: int) -> str:
    gbs = weight_bytes / (split["matmul_ms"] * 1e-3) / 1e9
    return (f"decode step {split['step_ms']:.2f} ms = {split['matmul_ms']:.2f} ms in the weight-streaming kernels "
            f"({gbs:.1f} GB/s) + {split['rest_ms']:.2f} ms the rest")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a GGUF file or model directory (default: the default model)")
    args = parser.parse_args(argv)
    import pyllm
    llm = pyllm.LLM(args.model, show_progress=False)
    split = decode_split(llm)
    print(describe(split, llm.model.weights.nbytes()) if split else "the CPU kernels do not run here: no split")
    for fmt in TINY_FORMATS:
        print(f"a 30-layer decode step of tiny {fmt} matrices: {tiny_step_ms(fmt):.3f} ms")


if __name__ == "__main__":
    main()
