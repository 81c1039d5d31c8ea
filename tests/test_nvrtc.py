"""NVRTC compile gate: every kernels/*.cu file, in every declared dtype variant
(see pyllm.backends.nvrtc for the ``// variants:`` convention), plus the
emulator's test kernels, must compile as the CUDA backend compiles them under
CuPy (local headers expanded, CuPy's own options) for sm_75, sm_80, sm_86,
sm_89 and sm_90, and for sm_100 and sm_120 where this NVRTC knows them.

Each case builds PTX for compute_XX and a CUBIN for sm_XX (the latter runs
ptxas, which checks register and shared-memory limits); the quantized GEMV's
PTX must also use no local memory (its sums stay in registers). Without libnvrtc the
tests skip, unless CI or PYLLM_REQUIRE_NVRTC is set: then they fail, so the
gate cannot silently vanish in CI.
"""

import os
from pathlib import Path

import pytest

from pyllm.backends import nvrtc
from pyllm.backends.cuda_quant import KERNEL_FORMATS
from pyllm.backends.kernel_source import expand_local_includes

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "kernels").glob("*.cu")) + sorted(
    (ROOT / "tests" / "emu_kernels").glob("*.cu")
)
REQUIRED_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")  # T4, A100, A10/3090, L4/4090, H100
NEWER_ARCHS = ("sm_100", "sm_120")  # B200, RTX 50: where this NVRTC compiles for them


def _archs() -> tuple[str, ...]:
    try:
        known = nvrtc.supported_archs()
    except nvrtc.NvrtcUnavailable:
        known = []
    return REQUIRED_ARCHS + tuple(a for a in NEWER_ARCHS if int(a[3:]) in known)


ARCHS = _archs()


def _cases():
    for path in SOURCES:
        for variant in nvrtc.kernel_variants(path):
            for arch in ARCHS:
                label = f"{path.relative_to(ROOT)}[{' '.join(variant) or 'default'}]-{arch}"
                yield pytest.param(path, variant, arch, id=label)


@pytest.fixture(scope="module")
def nvrtc_available():
    try:
        nvrtc.load()
    except nvrtc.NvrtcUnavailable as exc:
        if os.environ.get("CI") or os.environ.get("PYLLM_REQUIRE_NVRTC"):
            pytest.fail(f"NVRTC gate required here but unavailable: {exc}")
        pytest.skip(f"NVRTC unavailable: {exc}")


def test_cases_are_not_vacuous():
    cases = list(_cases())
    assert any("emu_kernels" in c.id for c in cases)
    assert len(cases) >= 2 * len(SOURCES)


@pytest.mark.usefixtures("nvrtc_available")
@pytest.mark.parametrize("path, variant, arch", list(_cases()))
def test_kernel_compiles(path, variant, arch):
    source = expand_local_includes(path)  # what the backend hands CuPy
    options = list(variant)
    ptx = nvrtc.compile_ptx(source, path.name, options, arch)
    entries = nvrtc.ptx_entries(ptx)
    assert entries, f"{path.name} defines no __global__ function"
    mangled = [e for e in entries if e.startswith("_Z")]
    assert not mangled, f'kernels must be extern "C" so get_function(name) finds them: {mangled}'
    cubin = nvrtc.compile_cubin(source, path.name, options, arch)
    assert cubin[:4] == b"\x7fELF"


@pytest.mark.usefixtures("nvrtc_available")
def test_syntax_error_reports_the_log():
    source = 'extern "C" __global__ void broken(float* x) { x[0] = 1.0f + ; }\n'
    with pytest.raises(nvrtc.NvrtcCompileError) as info:
        nvrtc.compile_ptx(source, "broken.cu", [], "sm_80")
    message = str(info.value)
    assert "broken.cu(1): error" in message and "expected an expression" in message
    assert info.value.log in message


@pytest.mark.usefixtures("nvrtc_available")
def test_half_types_and_variant_options_reach_the_compiler():
    source = (
        "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
        'extern "C" __global__ void k(SCALAR_T* x) { x[0] = x[1]; }\n'
    )
    for variant in nvrtc.kernel_variants(
        "// variants: -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16\n"
    ):
        assert nvrtc.ptx_entries(
            nvrtc.compile_ptx(source, "k.cu", list(variant), "compute_90")
        ) == ["k"]
    with pytest.raises(nvrtc.NvrtcCompileError, match="SCALAR_T"):
        nvrtc.compile_ptx(source, "k.cu", [], "sm_80")


def test_kernel_variants_convention():
    text = "// rms norm\n// variants: -DT=float -DT=__half,-DVEC=8\n// variants: -DT=double\n"
    assert nvrtc.kernel_variants(text) == [
        ("-DT=float",),
        ("-DT=__half", "-DVEC=8"),
        ("-DT=double",),
    ]
    assert nvrtc.kernel_variants('extern "C" __global__ void k() {}\n') == [()]


def test_gate_covers_every_gpu_generation_the_backend_meets():
    assert ARCHS[: len(REQUIRED_ARCHS)] == REQUIRED_ARCHS
    assert {arch for _, _, arch in (c.values for c in _cases())} == set(ARCHS)


@pytest.mark.usefixtures("nvrtc_available")
def test_gate_compiles_with_the_options_cupy_adds():
    """CuPy adds -ftz=true (flush-to-zero) and --device-as-default-execution-space to every
    RawModule: the PTX flushes subnormals, and a helper without __device__ compiles."""
    source = (
        "float twice_plus_one(float v) { return 2.0f * v + 1.0f; }\n"
        'extern "C" __global__ void k(float* x) { x[threadIdx.x] = twice_plus_one(x[threadIdx.x]); }\n'
    )
    ptx = nvrtc.compile_ptx(source, "k.cu", [], "sm_80")
    assert "fma.rn.ftz.f32" in ptx  # NVRTC also contracts the multiply-add into one FMA


@pytest.mark.usefixtures("nvrtc_available")
def test_an_error_in_a_header_names_the_header(tmp_path):
    for path in (ROOT / "kernels").glob("*.cu*"):
        (tmp_path / path.name).write_text(path.read_text())
    header = tmp_path / "common.cuh"
    lines = header.read_text().splitlines()
    broken_line = next(i for i, line in enumerate(lines, 1) if "struct SumOp" in line)
    lines[broken_line - 1] = "struct SumOp = {"
    header.write_text("\n".join(lines))
    with pytest.raises(nvrtc.NvrtcCompileError) as info:
        nvrtc.compile_ptx(expand_local_includes(tmp_path / "rms_norm.cu"), "rms_norm.cu",
                          ["-DSCALAR_T=float"], "sm_80")
    assert f"common.cuh({broken_line}): error" in str(info.value)


def test_runtime_headers_are_used_only_with_the_nvrtc_of_their_release(tmp_path, monkeypatch):
    include = tmp_path / "include"
    include.mkdir()
    (include / "cuda_fp16.h").write_text("")
    (include / "cuda_runtime_api.h").write_text("#define CUDART_VERSION 12040\n")
    monkeypatch.setattr(nvrtc, "_nvidia_dirs", lambda package: [tmp_path])
    assert nvrtc.header_version(include) == (12, 4)
    assert nvrtc.cuda_include_dir((12, 4)) == str(include)
    assert nvrtc.cuda_include_dir((12, 9)) is None  # newer headers, older NVRTC
    assert nvrtc.cuda_include_dir((13, 0)) is None  # CUDA 12 headers would hide CUDA 13's


@pytest.mark.usefixtures("nvrtc_available")
def test_installed_runtime_headers_match_the_installed_nvrtc():
    """The test extra pins nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12 of one release."""
    assert nvrtc.cuda_include_dir(nvrtc.version()) is not None


@pytest.mark.usefixtures("nvrtc_available")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_quantized_kernels_keep_their_sums_in_registers(arch):
    """quant.cu's per-row sums (float acc[8], indexed in unrolled loops) and decoded weights must
    not spill to local memory: every kernel's PTX is free of .local."""
    source = expand_local_includes(ROOT / "kernels" / "quant.cu")
    ptx = nvrtc.compile_ptx(source, "quant.cu", ["-DSCALAR_T=__nv_bfloat16"], arch)
    entries = ptx.split(".entry ")[1:]
    assert len(entries) == 2 * len(KERNEL_FORMATS) and not [e.partition("(")[0] for e in entries if ".local" in e]
