"""What a real GPU and real CuPy do that the CUDA backend must meet, checked without one.

Under cuda-emu, run as a T4, an A100 and an H100 (their shared-memory opt-in limits): attention
past 48 KiB of shared memory and up to each GPU's limit, one clear line past it; every kernel
family compiled at backend start, a broken one reported in one line; local headers expanded into
the compiled source, so a header edit changes CuPy's cache key; bf16 refused before sm_80; `empty`
arrays full of NaN (a GPU hands out old memory); empty launches skipped (CuPy would run one block
of a zero-sized grid); gemm operands checked as cuBLAS checks them. CupyDevice runs here on a
stand-in for the few CuPy calls it makes; on a GPU, the cuBLAS math mode is read back.
"""

import shutil
import sys
import tomllib
import types
from types import SimpleNamespace

import numpy as np
import pytest
from packaging.requirements import Requirement

import pyllm
from conftest import GPUS, REPO
from pyllm.backends import nvrtc, reference as ops
from pyllm.backends.cuda_attention import attention_max_keys, attention_splits, shared_memory_opt_in
from pyllm.backends.cuda_backend import CudaBackend
from pyllm.backends.cuda_device import CUBLAS_MATH_MODE, CupyDevice, EmuDevice, GpuLimits
from pyllm.backends.cuda_emu import LaunchError
from pyllm.dtypes import convert
from pyllm.errors import PyllmError

D = 128  # Llama 3's head_dim, where the issue's token limits are quoted
rng = np.random.default_rng(0)


def config(max_positions=16, head_dim=D):
    return SimpleNamespace(rope_theta=10000.0, head_dim=head_dim, max_position_embeddings=max_positions, dtype="f32")


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---- shared memory: opt in past 48 KiB, split the keys past the GPU's limit ---------------------
def test_shared_memory_decisions():
    assert shared_memory_opt_in(128, 48 * 1024 - 128, 227 * 1024) is None  # exactly the default
    assert shared_memory_opt_in(128, 48 * 1024 - 124, 227 * 1024) == 227 * 1024 - 128  # the whole range
    tokens = {name: attention_max_keys(D, 128, gpu.shared_optin_bytes) for name, gpu in GPUS.items()}
    assert tokens == {"T4": 16_096, "A100": 41_440, "H100": 57_824}


@pytest.mark.parametrize("gpu", ["T4", "A100"])
def test_attention_fills_the_gpus_shared_memory_and_splits_the_keys_past_it(gpu):
    be = CudaBackend(config(), "f32", EmuDevice(GPUS[gpu]))
    kernel = be._function("attention", "attention")
    longest = attention_max_keys(D, kernel.shared_size_bytes, GPUS[gpu].shared_optin_bytes)
    q, k, v = randn(1, 1, D), randn(1, longest + 1, D), randn(1, longest + 1, D)
    for kv_len in (12_300, longest):  # just past 48 KiB, then the whole opt-in range: one block each
        out = be.attention(q, k[:, :kv_len], v[:, :kv_len], kv_len - 1, splits=1)
        np.testing.assert_allclose(out, ops.attention(q, k[:, :kv_len], v[:, :kv_len], kv_len - 1), atol=1e-5)
    assert kernel.max_dynamic_shared_size_bytes == GPUS[gpu].shared_optin_bytes - kernel.shared_size_bytes
    with pytest.raises(LaunchError):  # the emulated GPU allows not a byte more
        kernel.max_dynamic_shared_size_bytes += 4
    assert attention_splits(longest + 1, 1 * 1, 1, longest) == 2  # past it the keys split in two, each fitting
    out = be.attention(q, k, v, longest)
    np.testing.assert_allclose(out, ops.attention(q, k, v, longest), atol=1e-5)


# ---- building: headers expanded, every family at start, failures in one line -----------------
def kernels_copy(tmp_path, monkeypatch):
    shutil.copytree(pyllm.backends.kernels_dir(), tmp_path / "kernels", ignore=shutil.ignore_patterns("cpu"))
    monkeypatch.setattr("pyllm.backends.cuda_backend.kernels_dir", lambda: tmp_path / "kernels")
    return tmp_path / "kernels"


def compiled_sources(monkeypatch) -> dict:
    """Record the source of every compile, by its first line (#line 1 "<file>")."""
    sources, compile_ = {}, EmuDevice.compile
    def recording(device, source, options):
        sources[source.partition("\n")[0]] = source
        return compile_(device, source, options)
    monkeypatch.setattr(EmuDevice, "compile", recording)
    return sources


def test_the_compiled_source_holds_its_headers_so_editing_one_changes_it(tmp_path, monkeypatch):
    kernels, sources = kernels_copy(tmp_path, monkeypatch), compiled_sources(monkeypatch)
    CudaBackend(config(), "f32", EmuDevice())
    assert set(sources) == {f'#line 1 "{p.name}"' for p in kernels.glob("*.cu")}  # all, at start
    before = sources['#line 1 "attention.cu"']
    assert '#include "common.cuh"' not in before and "block_reduce" in before
    header = kernels / "common.cuh"
    header.write_text(header.read_text() + "\n// edited\n")
    CudaBackend(config(), "f32", EmuDevice())
    assert sources['#line 1 "attention.cu"'] != before


def test_a_kernel_that_does_not_compile_stops_the_backend_at_start_in_one_line(tmp_path, monkeypatch):
    kernels = kernels_copy(tmp_path, monkeypatch)
    (kernels / "swiglu.cu").write_text((kernels / "swiglu.cu").read_text() + "\nint broken = ;\n")
    with pytest.raises(PyllmError) as info:
        CudaBackend(config(), "f16", EmuDevice())
    message = str(info.value)
    assert "\n" not in message and "kernels/swiglu.cu for f16" in message and "swiglu.cu:" in message


def test_the_cuda_extra_brings_a_whole_toolkit():
    """CuPy 14's [ctk] extra pulls NVRTC, the runtime headers and cuBLAS of one CUDA 12 release
    from wheels, so a machine with only the driver runs --backend cuda."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"]
    (cupy,) = [r for r in map(Requirement, extra) if r.name == "cupy-cuda12x"]
    assert "ctk" in cupy.extras and cupy.specifier.contains("14.0.0") and not cupy.specifier.contains("13.6.0")


def test_bf16_before_sm80_is_one_clear_line():
    with pytest.raises(PyllmError, match="compute capability 8.0 .* 7.5"):
        CudaBackend(config(), "bf16", EmuDevice(GPUS["T4"]))
    CudaBackend(config(), "f16", EmuDevice(GPUS["T4"]))


# ---- what a GPU hands out and launches ------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_empty_device_arrays_are_nan_under_the_emulator(dtype):
    assert np.isnan(convert(EmuDevice().empty((3, 70), dtype), dtype, "f32")).all()


def test_empty_launches_are_skipped():
    be = CudaBackend(config(head_dim=64), "f32", EmuDevice())
    x, w = np.zeros((0, 96), np.float32), np.ones(96, np.float32)
    assert be.rms_norm(x, w, 1e-5).shape == (0, 96)
    assert be.swiglu(np.zeros((0, 64), np.float32)).shape == (0, 32)
    assert be.gather(w.reshape(1, -1), np.zeros(0, np.int64)).shape == (0, 96)
    k = randn(1, 5, 64)
    assert be.attention(np.zeros((0, 2, 64), np.float32), k, k, 5).shape == (0, 2, 64)
    assert be.launches == 0


def test_gemm_takes_what_cublas_takes():
    device, wide = EmuDevice(), randn(5, 48)
    a, b, c = wide[:, :40], randn(7, 40), np.zeros((5, 7), np.float32)  # a's rows 48 apart: lda 48 > K
    device.gemm(a, b, c, 1.0, 0.0, "f32")
    np.testing.assert_allclose(c, a @ b.T, rtol=1e-6)
    for bad_a, bad_b, bad_c in [(wide[:, ::2], randn(7, 24), c),    # rows not contiguous
                                (a, randn(7, 41), c),                # K differs
                                (a, b, np.zeros((7, 5), np.float32)),  # c transposed
                                (a, b.astype(np.float16), c)]:       # dtypes differ
        with pytest.raises(ValueError):
            device.gemm(bad_a, bad_b, bad_c, 1.0, 0.0, "f32")


# ---- CupyDevice: the CuPy calls it makes ---------------------------------------------------------
@pytest.fixture
def fake_cupy(monkeypatch):
    """The few CuPy names CupyDevice uses (as CuPy 13 and 14 spell them), as a T4 with NVRTC 12.9;
    every call recorded."""
    calls = []

    class CompileException(Exception):
        pass

    class RawModule:
        def __init__(self, code, options):
            self.code, self.options = code, options

        def compile(self):
            calls.append(("compile", self.options))
            if "broken" in self.code:
                raise CompileException("kern.cu(2): error: expected an expression\n\n1 error detected")

    class Stream:  # records what CupyDevice.capture asks of a stream
        def __init__(self, non_blocking=False):
            self.non_blocking = non_blocking

        def __enter__(self):
            calls.append(("enter", self.non_blocking))

        def __exit__(self, *exc):
            calls.append(("exit",))

        def begin_capture(self):
            calls.append(("begin_capture",))

        def end_capture(self):
            calls.append(("end_capture",))
            return SimpleNamespace(launch=lambda stream: calls.append(("launch", stream)))

    gpu = SimpleNamespace(compute_capability="75", attributes={"MaxSharedMemoryPerBlockOptin": 65536,
                                                                 "MultiProcessorCount": 40},
                          synchronize=lambda: calls.append(("synchronize",)))
    cuda = SimpleNamespace(
        runtime=SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=RuntimeError),
        Device=lambda: gpu, compiler=SimpleNamespace(CompileException=CompileException), Stream=Stream,
        get_current_stream=lambda: "the current stream",
        nvrtc=SimpleNamespace(getVersion=lambda: (12, 9)), device=SimpleNamespace(get_cublas_handle=lambda: 7),
        cublas=SimpleNamespace(setMathMode=lambda handle, mode: calls.append(("setMathMode", handle, mode))))
    cupy = types.ModuleType("cupy")
    cupy.cuda, cupy.RawModule, cupy.asarray, cupy.empty = cuda, RawModule, np.asarray, np.empty
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    return SimpleNamespace(calls=calls, cuda=cuda, CompileException=CompileException)


def test_cupy_device_keeps_reductions_in_f32_reads_limits_and_compiles_at_once(fake_cupy):
    device = CupyDevice()
    assert fake_cupy.calls == [("setMathMode", 7, CUBLAS_MATH_MODE)] and CUBLAS_MATH_MODE == 16
    assert device.limits == GpuLimits(75, 65536, 40)
    device.compile("ok", ("--std=c++17",))
    assert fake_cupy.calls[-1] == ("compile", ("--std=c++17", f"-I{nvrtc.cuda_include_dir((12, 9))}"))
    with pytest.raises(fake_cupy.CompileException):
        device.compile("broken", ())
    fake_cupy.cuda.nvrtc.getVersion = lambda: (12, 4)  # headers of another release: left to CuPy
    CupyDevice().compile("ok", ("--std=c++17",))
    assert fake_cupy.calls[-1] == ("compile", ("--std=c++17",))


def test_cupy_compile_errors_stop_the_backend_in_one_line(fake_cupy, monkeypatch):
    monkeypatch.setattr("pyllm.backends.cuda_backend.expand_local_includes", lambda path: f"broken {path.name}")
    with pytest.raises(PyllmError, match=r"^the cuda backend cannot compile kernels/attention.cu for f16: "
                                         r"kern.cu\(2\): error: expected an expression$"):
        CudaBackend(config(), "f16", CupyDevice())


def test_on_a_gpu_cublas_never_reduces_in_16_bits():
    try:
        CupyDevice()
    except PyllmError as exc:
        pytest.skip(f"needs a GPU and CuPy: {exc}")
    from cupy.cuda import cublas, device
    assert cublas.getMathMode(device.get_cublas_handle()) == CUBLAS_MATH_MODE


def test_cupy_device_captures_on_a_stream_of_its_own_and_replays_on_the_current_one(fake_cupy):
    device = CupyDevice()
    fake_cupy.calls.clear()
    with device.capture() as capture:
        assert fake_cupy.calls == [("synchronize",), ("enter", True), ("begin_capture",)]
        kept = device.empty((2, 3), "f32")
    assert fake_cupy.calls[3:] == [("end_capture",), ("exit",)] and device.capturing is None
    assert capture.kept == [kept]
    device.replay(capture.graph)
    assert fake_cupy.calls[-1] == ("launch", "the current stream")
