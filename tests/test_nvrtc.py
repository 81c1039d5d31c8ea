"""NVRTC compile gate: every kernels/*.cu file, in every declared dtype variant
(see pyllm.backends.nvrtc for the ``// variants:`` convention), plus the
emulator's test kernels, must compile for sm_80 and sm_90.

Each case builds PTX for compute_XX and a CUBIN for sm_XX (the latter runs
ptxas, which checks register and shared-memory limits). Without libnvrtc the
tests skip, unless CI or PYLLM_REQUIRE_NVRTC is set: then they fail, so the
gate cannot silently vanish in CI.
"""

import os
from pathlib import Path

import pytest

from pyllm.backends import nvrtc

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "kernels").glob("*.cu")) + sorted(
    (ROOT / "tests" / "emu_kernels").glob("*.cu")
)
ARCHS = ("sm_80", "sm_90")


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
    source = path.read_text(encoding="utf-8")
    options = [f"-I{path.parent}", *variant]  # quoted includes resolve beside the file, as in the backend
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
