"""The CUDA emulator runs the test kernels in tests/emu_kernels with CUDA semantics.

Results are compared with NumPy; the deliberately broken kernels in
tests/broken_kernels must come out wrong, which shows the emulator enforces
barriers and shuffle semantics instead of papering over bugs.
"""

import functools
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import GPUS
from pyllm.backends.cuda_emu import CompileError, KernelFault, LaunchError, Module, RaceDetected
from pyllm.backends.nvrtc import kernel_variants

HERE = Path(__file__).resolve().parent
KERNELS, BROKEN = HERE / "emu_kernels", HERE / "broken_kernels"
RNG = np.random.default_rng(0)
POISON = -1  # what a lane reads from a lane that did not take part (all bits set)


@functools.lru_cache(maxsize=None)
def module(path: Path, options=(), race_check=False, **limits) -> Module:
    return Module(path=path, options=options, race_check=race_check, **limits)


@np.errstate(all="ignore")
def bf16_bits(x: np.ndarray) -> np.ndarray:
    """Independent RNE reference for float32 -> bfloat16: pick the nearer of the two
    neighbouring bf16 values in float64, ties to the even mantissa."""
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32)
    mag = bits & 0x7FFFFFFF
    lo_bits = mag & 0xFFFF0000
    lo = lo_bits.view(np.float32).astype(np.float64)
    exponent = np.maximum((mag >> 23) & 0xFF, 1).astype(np.int64)
    hi = lo + np.ldexp(1.0, exponent - 127 - 7)  # next bf16 magnitude, may exceed FLT_MAX
    ax = np.abs(x.astype(np.float64))
    d_lo, d_hi = ax - lo, hi - ax
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & ((lo_bits >> 16) & 1 == 1))
    pick_hi &= mag < 0x7F800000  # inf stays inf
    out = ((np.where(pick_hi, lo_bits + 0x10000, lo_bits) >> 16) | ((bits >> 16) & 0x8000)).astype(
        np.uint16
    )
    return np.where(np.isnan(x), np.uint16(0x7FFF), out)


def as_storage(x32: np.ndarray, dtype: str) -> np.ndarray:
    """Device array for a dtype name plus the float32 values it really holds."""
    if dtype == "f32":
        return x32, x32
    if dtype == "f16":
        h = x32.astype(np.float16)
        return h, h.astype(np.float32)
    b = bf16_bits(x32)
    return b, (b.astype(np.uint32) << 16).view(np.float32)


# ---- block reductions --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("ncols", [1, 37, 100, 300, 4096])
@pytest.mark.parametrize("threads", [32, 64, 256])
def test_row_sum_template_wrappers(dtype, ncols, threads):
    x, values = as_storage(RNG.standard_normal((5, ncols)).astype(np.float32), dtype)
    out = np.zeros(5, np.float32)
    module(KERNELS / "row_sum.cu").get_function(f"row_sum_{dtype}")(
        5, threads, (x, out, np.int32(ncols))
    )
    np.testing.assert_allclose(out, values.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("options", kernel_variants(KERNELS / "row_sum_var.cu"), ids=str)
@pytest.mark.parametrize("ncols", [1, 37, 300, 4096])
@pytest.mark.parametrize("threads", [32, 96, 256])
def test_row_sum_dtype_variants(options, ncols, threads):
    dtype = {"float": "f32", "__half": "f16", "__nv_bfloat16": "bf16"}[options[0].split("=")[1]]
    x, values = as_storage(RNG.standard_normal((3, ncols)).astype(np.float32), dtype)
    out = np.zeros(3, np.float32)
    kernel = module(KERNELS / "row_sum_var.cu", options).get_function("row_sum_var")
    kernel((3,), (threads,), (x, out, np.int32(ncols)), shared_mem=4 * (threads // 32))
    np.testing.assert_allclose(out, values.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)


def test_rms_norm_sized_launch_is_fast():
    x, out = RNG.standard_normal((64, 4096)).astype(np.float32), np.zeros(64, np.float32)
    kernel = module(KERNELS / "row_sum.cu").get_function("row_sum_f32")
    start = time.perf_counter()
    kernel((64,), (256,), (x, out, np.int32(4096)))
    assert time.perf_counter() - start < 0.5
    np.testing.assert_allclose(out, x.sum(1), rtol=1e-5, atol=1e-3)


# ---- broken kernels must fail ------------------------------------------------------------
def test_missing_syncthreads_gives_wrong_sums():
    x, out = RNG.standard_normal((4, 4096)).astype(np.float32), np.zeros(4, np.float32)
    kernel = module(BROKEN / "reduce_missing_sync.cu").get_function("reduce_missing_sync")
    kernel((4,), (256,), (x, out, np.int32(4096)))
    assert not np.allclose(out, x.sum(1), rtol=1e-3, atol=1e-2)
    checked = module(BROKEN / "reduce_missing_sync.cu", race_check=True).get_function(
        "reduce_missing_sync"
    )
    with pytest.raises(RaceDetected):
        checked((4,), (256,), (x, out, np.int32(4096)))


def test_race_check_passes_a_correct_kernel():
    x, out = RNG.standard_normal((4, 4096)).astype(np.float32), np.zeros(4, np.float32)
    module(KERNELS / "row_sum.cu", race_check=True).get_function("row_sum_f32")(
        4, 256, (x, out, np.int32(4096))
    )
    np.testing.assert_allclose(out, x.sum(1), rtol=1e-5, atol=1e-3)


def test_wrong_shuffle_offset_doubles_the_sum():
    x, out = RNG.standard_normal((4, 100)).astype(np.float32), np.zeros(4, np.float32)
    module(BROKEN / "reduce_wrong_offset.cu").get_function("reduce_wrong_offset")(
        4, 32, (x, out, np.int32(100))
    )
    assert not np.allclose(out, x.sum(1), rtol=1e-3)
    np.testing.assert_allclose(out, 2 * x.sum(1), rtol=1e-5, atol=1e-4)


# ---- indexing, shared memory, barriers, votes --------------------------------------------
@pytest.mark.parametrize("grid, block", [((3, 2, 2), (4, 3, 2)), (5, 64), ((2, 3), (8, 8))])
def test_grid_and_block_indices(grid, block):
    g = tuple(grid) + (1,) * (3 - len(grid)) if isinstance(grid, tuple) else (grid, 1, 1)
    b = tuple(block) + (1,) * (3 - len(block)) if isinstance(block, tuple) else (block, 1, 1)
    out = np.zeros((np.prod(g) * np.prod(b), 12), np.int32)
    module(KERNELS / "indexing.cu").get_function("write_indices")(grid, block, (out,))
    bz, by, bx, tz, ty, tx = np.meshgrid(
        *[np.arange(n) for n in (g[2], g[1], g[0], b[2], b[1], b[0])], indexing="ij"
    )
    expected = np.stack([bx, by, bz, tx, ty, tz] + [np.full_like(bx, v) for v in g + b], -1)
    np.testing.assert_array_equal(out, expected.reshape(-1, 12))


@pytest.mark.parametrize("name", ["block_reverse", "block_reverse_bytes"])
@pytest.mark.parametrize("threads", [1, 33, 128, 1024])
def test_block_reverse_through_dynamic_shared_memory(name, threads):
    x = RNG.standard_normal(3 * threads).astype(np.float32)
    out = np.zeros_like(x)
    module(KERNELS / "indexing.cu").get_function(name)(3, threads, (x, out), shared_mem=4 * threads)
    np.testing.assert_array_equal(out, x.reshape(3, threads)[:, ::-1].ravel())


def test_votes_and_syncthreads_count():
    out = np.zeros((2, 64, 4), np.uint32)
    module(KERNELS / "indexing.cu").get_function("votes")(2, 64, (out,))
    t = np.arange(64)
    ballots = [
        sum(1 << int(lane) for lane in range(32) if (w * 32 + lane) % 3 == 0) for w in range(2)
    ]
    np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to(np.repeat(ballots, 32), (2, 64)))
    assert (out[:, :, 1] == 1).all() and (out[:, :, 3] == 32).all()
    np.testing.assert_array_equal(
        out[:, :, 2], np.broadcast_to((t < 32).astype(np.uint32), (2, 64))
    )


# ---- 16-bit types ------------------------------------------------------------------------
def conversion_inputs() -> np.ndarray:
    specials = np.array(
        [
            0.0,
            -0.0,
            1.0,
            -1.0,
            1 / 3,
            0.1,
            65504,
            65519.996,
            65520,
            65536,
            1e6,
            -1e6,
            np.inf,
            -np.inf,
            np.nan,
            2.0**-24,
            2.0**-25,
            1.5 * 2.0**-25,
            2.0**-14,
            2.0**-14 * (1 - 2.0**-11),
            6e-8,
            3e-8,
            1e-45,
            1.17549435e-38,
            3.4028235e38,
            -3.4028235e38,
            3.3961776e38,
        ],
        np.float32,
    )
    halves = RNG.integers(0, 0x7BFF, 2000).astype(np.uint16)
    half_ties = (
        halves.view(np.float16).astype(np.float32)
        + (halves + 1).view(np.float16).astype(np.float32)
    ) / 2
    bf16_ties = ((RNG.integers(0, 0xFEFF, 2000).astype(np.uint32) << 16) | 0x8000).view(np.float32)
    random = RNG.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([specials, half_ties, -half_ties, bf16_ties, random]).astype(np.float32)


def test_half_and_bfloat16_conversions_round_like_cuda():
    x = conversion_inputs()
    n = x.size
    half_back, bf16_back = np.zeros(n, np.float32), np.zeros(n, np.float32)
    half_bits, bf16_out = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    module(KERNELS / "convert.cu").get_function("roundtrip")(
        (n + 255) // 256, 256, (x, half_back, half_bits, bf16_back, bf16_out, np.int32(n))
    )
    nan = np.isnan(x)
    with np.errstate(over="ignore"):
        ref_half = x.astype(np.float16)
    np.testing.assert_array_equal(half_bits[~nan], ref_half.view(np.uint16)[~nan])
    np.testing.assert_array_equal(half_back[~nan], ref_half.astype(np.float32)[~nan])
    np.testing.assert_array_equal(bf16_out, bf16_bits(x))
    assert (
        (half_bits[nan] == 0x7FFF).all()
        and np.isnan(half_back[nan]).all()
        and np.isnan(bf16_back[nan]).all()
    )


def test_16bit_device_arrays():
    x = RNG.standard_normal(1000).astype(np.float32)
    h, y = x.astype(np.float16), np.zeros(1000, np.float16)
    convert = module(KERNELS / "convert.cu")
    convert.get_function("axpb_f16")(4, 256, (h, y, np.int32(1000)))
    np.testing.assert_array_equal(y, (h.astype(np.float32) * 2 + 1).astype(np.float16))
    b, yb = bf16_bits(x), np.zeros(1000, np.uint16)
    convert.get_function("axpb_bf16")(4, 256, (b, yb, np.int32(1000)))
    np.testing.assert_array_equal(
        yb, bf16_bits((b.astype(np.uint32) << 16).view(np.float32) * 2 + 1)
    )


# ---- warp shuffles -----------------------------------------------------------------------
def shuffle_reference(mode: int, b: int, width: int, lane: int) -> int:
    """Source lane per the CUDA programming guide's description of each intrinsic."""
    segment = lane // width * width
    if mode == 0:
        return segment + b % width
    if mode == 1:
        return lane - b if lane - segment >= b else lane
    if mode == 2:
        return lane + b if lane - segment + b < width else lane
    src = lane ^ b  # xor may read earlier segments, not later ones
    return src if src < segment + width else lane


@pytest.mark.parametrize("threads", [32, 64])
def test_shuffle_semantics(threads):
    cases = [(0, s, w) for w in (32, 16, 8, 4, 2) for s in (0, 1, 3, 5, 31, 40)]
    cases += [(m, d, w) for m in (1, 2) for w in (32, 16, 8, 4) for d in (1, 2, 3, w - 1)]
    cases += [(3, x, w) for w in (32, 16, 8, 4, 2) for x in (1, 2, 4, 8, 16, 3, 31)]
    modes, bs, widths = (np.array(c, np.int32) for c in zip(*cases))
    out = np.zeros((len(cases), threads), np.int32)
    module(KERNELS / "shuffles.cu").get_function("shuffle_cases")(
        1, threads, (modes, bs, widths, np.int32(len(cases)), out)
    )
    for c, (mode, b, width) in enumerate(cases):
        expected = [
            100 + t // 32 * 32 + shuffle_reference(mode, b, width, t % 32) for t in range(threads)
        ]
        assert out[c].tolist() == expected, f"mode {mode}, operand {b}, width {width}"


def test_shuffle_from_lanes_that_did_not_take_part_reads_poison():
    out = np.zeros((32, 2), np.int32)
    module(KERNELS / "shuffles.cu").get_function("shuffle_half_warp")(1, 32, (out,))
    np.testing.assert_array_equal(out[:16, 0], 100 + (np.arange(16) ^ 1))
    assert (out[:16, 1] == POISON).all() and (out[16:] == 0).all()
    # a 48-thread block has no lanes 16-31 in its second warp
    modes, bs, widths = np.array([3], np.int32), np.array([16], np.int32), np.array([32], np.int32)
    out = np.zeros(48, np.int32)
    module(KERNELS / "shuffles.cu").get_function("shuffle_cases")(
        1, 48, (modes, bs, widths, np.int32(1), out)
    )
    np.testing.assert_array_equal(out[:32], 100 + (np.arange(32) ^ 16))
    assert (out[32:] == POISON).all()


def test_shuffle_of_double_and_half():
    d, f = np.zeros(32), np.zeros(32, np.float32)
    module(KERNELS / "shuffles.cu").get_function("shuffle_types")(1, 32, (d, f))
    np.testing.assert_array_equal(d, 0.5 + np.minimum(np.arange(32) + 1, 31))
    np.testing.assert_array_equal(f, (np.arange(32) ^ 2) * 0.25)


def test_portable_ucontext_switching_matches(monkeypatch):
    monkeypatch.setenv("PYLLM_CUDA_EMU_UCONTEXT", "1")
    test_shuffle_semantics(64)
    test_row_sum_template_wrappers("f16", 300, 96)


# ---- failures ----------------------------------------------------------------------------
def test_undefined_behaviour_and_asserts_fail_the_launch():
    faults = module(KERNELS / "faults.cu")
    with pytest.raises(KernelFault, match="deadlock.*1 exited"):
        faults.get_function("exit_before_barrier")(1, 64, (np.zeros(64, np.float32),))
    with pytest.raises(KernelFault, match="__syncwarp"):
        faults.get_function("divergent_warp_ops")(1, 32, (np.zeros(32, np.int32),))
    values = np.arange(64, dtype=np.int32)
    faults.get_function("checked")(1, 64, (values,))
    values[40] = -1
    with pytest.raises(KernelFault, match=r"thread \(40,0,0\).*assertion"):
        faults.get_function("checked")(1, 64, (values,))


def test_launches_cuda_rejects():
    kernel = module(KERNELS / "indexing.cu").get_function("write_indices")
    out = np.zeros(1 << 20, np.int32)
    for grid, block in [
        (1, 1025),
        (1, (1, 1, 65)),
        (1, (33, 32)),
        ((1, 65536), 1),
        (0, 32),
        (1, (2, 0)),
    ]:
        with pytest.raises(LaunchError):
            kernel(grid, block, (out,))
    reverse = module(KERNELS / "indexing.cu").get_function("block_reverse")
    with pytest.raises(LaunchError, match="dynamic shared memory"):
        reverse(1, 32, (out, out), shared_mem=48 * 1024 + 1)


def test_static_plus_dynamic_shared_memory_limit_and_opt_in():
    kernel = module(KERNELS / "big_shared.cu").get_function("big_shared")
    assert kernel.shared_size_bytes == 32 * 1024
    n = 15 * 1024  # 60 KiB of dynamic shared memory
    x, out = RNG.standard_normal(n).astype(np.float32), np.zeros(n, np.float32)
    with pytest.raises(LaunchError, match="opt in"):
        kernel(1, 256, (x, out, np.int32(n)), shared_mem=4 * n)
    kernel(1, 256, (x, out, np.int32(4096)), shared_mem=4 * 4096)  # 48 KiB in total is fine
    with pytest.raises(LaunchError):
        kernel.max_dynamic_shared_size_bytes = 300 * 1024
    kernel.max_dynamic_shared_size_bytes = 64 * 1024
    kernel(1, 256, (x, out, np.int32(n)), shared_mem=4 * n)
    np.testing.assert_array_equal(out, x[::-1] + 1)


@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_opt_in_limit_is_the_emulated_gpus(gpu):
    limit = GPUS[gpu].shared_optin_bytes
    kernel = module(KERNELS / "big_shared.cu", optin_shared_limit=limit).get_function("big_shared")
    room = limit - kernel.shared_size_bytes  # the most dynamic shared memory a block may opt in to
    with pytest.raises(LaunchError, match=f"opt-in limit {limit}"):
        kernel.max_dynamic_shared_size_bytes = room + 4
    kernel.max_dynamic_shared_size_bytes = room
    n = room // 4
    x, out = RNG.standard_normal(n).astype(np.float32), np.zeros(n, np.float32)
    kernel(1, 256, (x, out, np.int32(n)), shared_mem=room)
    np.testing.assert_array_equal(out, x[::-1] + 1)
    with pytest.raises(LaunchError, match="dynamic shared memory"):
        kernel(1, 256, (x, out, np.int32(n)), shared_mem=room + 4)


def test_arguments_must_match_parameter_types():
    kernel = module(KERNELS / "row_sum.cu").get_function("row_sum_f16")
    x, out = np.zeros((2, 8), np.float16), np.zeros(2, np.float32)
    with pytest.raises(LaunchError, match="int64"):
        kernel(2, 32, (x, out, 8))  # CuPy would pass a Python int as 8 bytes
    with pytest.raises(LaunchError, match="float32"):
        kernel(2, 32, (x.astype(np.float32), out, np.int32(8)))
    with pytest.raises(LaunchError, match="takes 3 arguments"):
        kernel(2, 32, (x, out))
    with pytest.raises(LaunchError, match="contiguous"):
        kernel(2, 32, (np.zeros((8, 2), np.float16).T, out, np.int32(8)))


# ---- building ----------------------------------------------------------------------------
MACRO_KERNELS = """
#define FILL(NAME, T) \\
  extern "C" __global__ void NAME(T* x, T v) { x[threadIdx.x] = v + (T)threadIdx.x; }
FILL(fill_f32, float)
FILL(fill_i64, long long)
"""


def test_macro_generated_kernels_and_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    mod = Module(code=MACRO_KERNELS)
    assert mod.kernel_names == ("fill_f32", "fill_i64")
    assert Path(mod.library_path).parent == tmp_path / "pyllm" / "cuda_emu"
    x = np.zeros(8, np.int64)
    mod.get_function("fill_i64")(1, 8, (x, 10))  # a Python int is an int64, as in CuPy
    np.testing.assert_array_equal(x, 10 + np.arange(8))


def test_compile_errors_carry_the_compiler_log():
    with pytest.raises(CompileError, match="undeclared_name"):
        Module(code='extern "C" __global__ void k(float* x) { x[0] = undeclared_name; }')
