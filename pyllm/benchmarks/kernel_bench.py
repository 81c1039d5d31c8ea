"""Achieved memory bandwidth of each CUDA kernel on a real GPU, against the device's peak.

    python -m pyllm.benchmarks.kernel_bench [--dtype f16] [--rows 4096] [--out bench-out]

Every kernel runs on rows 8192 wide (attention: a decode query over 8192 cached tokens; the
quantized GEMV: 1 and 8 rows against a q4_k weight [16384, 8192], larger than any L2). The
bytes counted are the least the kernel must move (each input read once, each output written
once), so GB/s = bytes / time, timed with CUDA events over repeated launches after a warm-up.
Peak = memoryClockRate (kHz) x 1000 x memoryBusWidth / 8 x 2 (double data rate). Writes
kernel_bench.md and kernel_bench.png. Speed figures need a GPU: cuda-emu is refused, since the
emulator's timings say nothing about a GPU.
"""

import argparse
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pyllm.backends.base import BLOCK_TOKENS, Step

WIDTH = 8192
ATTENTION = dict(heads=32, kv_heads=8, head_dim=128)  # a Llama-3-8B layer: 32 query heads share 8 KV heads


def peak_bytes_per_s(cupy) -> float:
    runtime, device = cupy.cuda.runtime, cupy.cuda.Device().id
    props = runtime.getDeviceProperties(device)
    # CUDA 13 dropped these two fields from cudaDeviceProp; the attributes (36, 37) remain
    clock_khz = props.get("memoryClockRate") or runtime.deviceGetAttribute(36, device)
    bus_bits = props.get("memoryBusWidth") or runtime.deviceGetAttribute(37, device)
    return clock_khz * 1e3 * bus_bits / 8 * 2


def cases(be, rows: int, width: int = WIDTH):
    """[(kernel, shape, bytes moved, run())] over random inputs in the backend's dtype."""
    from pyllm.dtypes import convert
    from pyllm.formats import FORMATS
    from pyllm.weights import QuantizedMatrix
    rng, item = np.random.default_rng(0), np.dtype(be.storage).itemsize
    heads, kv_heads, dim = ATTENTION["heads"], ATTENTION["kv_heads"], ATTENTION["head_dim"]

    def rand(*shape):
        return be.upload(convert(rng.standard_normal(shape, dtype=np.float32), "f32", be.dtype))

    x, weight, gate_up = rand(rows, width), rand(width), rand(rows, 2 * width)  # x [rows, 8192]
    scores = rand(1, rows, width)  # softmax works in place: its own copy keeps x as it was
    ids, positions = be.upload_ids(rng.integers(0, rows, rows)), be.upload_ids(np.arange(rows))
    qkv_heads = width // dim  # x read as rows of a fused q|k|v projection: 48 + 2 x 8 heads of 128
    rows_blocks, width_blocks = -(-rows // BLOCK_TOKENS), -(-width // BLOCK_TOKENS)
    rows_pool = [be.zeros((rows_blocks, 1, kv_heads, BLOCK_TOKENS, dim)) for _ in "kv"]  # [blocks, layers, KV, 16, D]
    rows_step = Step([(*rows_pool, np.arange(rows_blocks, dtype=np.int32), rows, rows)], [0, rows])
    width_pool = [rand(width_blocks, 1, kv_heads, BLOCK_TOKENS, dim) for _ in "kv"]  # blocks in shuffled order
    decode_step = Step([(*width_pool, rng.permutation(width_blocks).astype(np.int32), width, 1)], [0, 1])
    q_one = rand(1, heads, dim)
    angles = rows * dim * 4  # the f32 cos and sin rows: rows x D/2 x 4 bytes x 2 tables
    q4_k = FORMATS["q4_k"]  # random blocks with finite scales d, dmin: the speed does not depend on the values
    raw = rng.integers(0, 256, (2 * width, width // q4_k.block_size, q4_k.block_bytes), dtype=np.uint8)
    raw[..., 0:4] = np.full(2, 1e-3, np.float16).view(np.uint8)
    blocks = be.upload(QuantizedMatrix(q4_k, (2 * width, width), raw.reshape(2 * width, -1)))
    x_decode = rand(8, width)

    def matvec(m):  # m rows of x against the q4_k weight: the weight, x and the output each moved once
        return (f"quant_matvec q4_k ({m} row{'s' * (m > 1)})", f"{m}x{width} @ ({2 * width}x{width})^T",
                blocks.nbytes + m * 3 * width * item, lambda: be.matmul_transb(x_decode[:m], blocks))
    return [
        ("rms_norm", f"{rows}x{width}", (2 * rows + 1) * width * item, lambda: be.rms_norm(x, weight, 1e-5)),
        ("swiglu", f"{rows}x(2x{width})", 3 * rows * width * item, lambda: be.swiglu(gate_up)),
        ("gather", f"{rows}x{width}", 2 * rows * width * item + 8 * rows, lambda: be.gather(x, ids)),
        ("softmax_causal", f"1x{rows}x{width}", 2 * rows * width * item,
         lambda: be.softmax_causal(scores, width)),
        ("rope", f"{rows}x{qkv_heads}x{dim}", 2 * rows * width * item + angles + 8 * rows,
         lambda: be.rope(x.reshape(rows, qkv_heads, dim), positions)),
        ("qkv_rope_cache", f"{rows}x({qkv_heads - 2 * kv_heads}+2x{kv_heads})x{dim}",
         2 * rows * width * item + angles, lambda: be.qkv_rope_cache(x, None, rows_step, 0)),
        ("attention (decode)", f"{heads}/{kv_heads} heads x {width} keys x {dim}",
         (2 * kv_heads * width + 2 * heads) * dim * item + 4 * width_blocks,
         lambda: be.step_attention(q_one, decode_step, 0)),
        matvec(1),
        matvec(8),
    ]


def device_name(cupy) -> str:
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else name


def time_per_call(cupy, run, repeats: int = 20) -> float:
    """Seconds per call, from CUDA events around `repeats` calls after a warm-up."""
    for _ in range(3):
        run()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / repeats


def kernel_bandwidth(backend: str = "cuda", dtype: str = "f16", rows: int = 4096) -> dict:
    """Measure every kernel: {"device", "peak_gb_s", "dtype", "kernels": [{name, shape, bytes, us, gb_s}]}."""
    from pyllm.backends.cuda_backend import CudaBackend
    from pyllm.backends.cuda_device import CupyDevice
    if backend != "cuda":
        raise SystemExit(f"kernel_bench measures GPU speed; --backend {backend} has no meaningful timings "
                         "(cuda-emu runs the kernels on the CPU). Use --backend cuda on a GPU.")
    device = CupyDevice()
    cupy = device.xp
    config = SimpleNamespace(rope_theta=10000.0, head_dim=ATTENTION["head_dim"], max_position_embeddings=rows,
                             dtype=dtype)  # rope tables for positions 0 .. rows - 1
    be = CudaBackend(config, dtype, device)
    kernels = []
    for name, shape, nbytes, run in cases(be, rows):
        seconds = time_per_call(cupy, run)
        kernels.append({"name": name, "shape": shape, "bytes": nbytes, "us": seconds * 1e6,
                        "gb_s": nbytes / seconds / 1e9})
    return {"device": device_name(cupy), "peak_gb_s": peak_bytes_per_s(cupy) / 1e9, "dtype": dtype, "kernels": kernels}


def table(result: dict) -> str:
    peak = result["peak_gb_s"]
    lines = [f"{result['device']}, {result['dtype']}, peak {peak:.0f} GB/s (memory clock x bus width x 2)", "",
             "| kernel | shape | MB moved | us | GB/s | of peak |", "|---|---|---|---|---|---|"]
    for k in result["kernels"]:
        lines.append(f"| {k['name']} | {k['shape']} | {k['bytes'] / 1e6:.1f} | {k['us']:.1f} | "
                     f"{k['gb_s']:.0f} | {k['gb_s'] / peak:.0%} |")
    return "\n".join(lines)


def plot(result: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [k["name"] for k in result["kernels"]]
    achieved = [k["gb_s"] for k in result["kernels"]]
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.bar(names, achieved)
    ax.axhline(result["peak_gb_s"], color="grey", linestyle="--", label=f"peak {result['peak_gb_s']:.0f} GB/s")
    for bar, value in zip(bars, achieved):
        ax.annotate(f"{value / result['peak_gb_s']:.0%}", (bar.get_x() + bar.get_width() / 2, value),
                    ha="center", va="bottom")
    ax.set_ylabel("GB/s")
    ax.set_title(f"kernel bandwidth on {result['device']} ({result['dtype']}, rows {WIDTH} wide)")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(out_dir, backend: str = "cuda", dtype: str = "f16", rows: int = 4096) -> dict:
    """Measure, write kernel_bench.md and kernel_bench.png into out_dir, print the table."""
    result = kernel_bandwidth(backend, dtype, rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_bench.md").write_text(f"# CUDA kernel bandwidth\n\n{table(result)}\n")
    plot(result, out / "kernel_bench.png")
    print(f"{table(result)}\n\nwrote {out / 'kernel_bench.md'}, {out / 'kernel_bench.png'}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f16")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    from pyllm.errors import PyllmError
    try:
        report(args.out, args.backend, args.dtype, args.rows)
    except PyllmError as exc:  # no CuPy, GPU or driver: one line, as the CLI reports it
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
