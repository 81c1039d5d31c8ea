"""Compile CUDA sources with NVRTC, without a GPU or driver: the compile gate.

NVRTC is called directly through ctypes. The library comes from the pip
package ``nvidia-cuda-nvrtc-cu12`` (``nvidia/cuda_nvrtc/lib/libnvrtc.so.12``
in site-packages); ``cuda_fp16.h``/``cuda_bf16.h`` are not built into NVRTC
12 and come from ``nvidia-cuda-runtime-cu12`` (``nvidia/cuda_runtime/include``),
which is passed with ``-I`` when its version is the NVRTC's own (headers of
another CUDA release are a known cause of compile failures).
``PYLLM_NVRTC_LIBRARY`` may name the library file explicitly; otherwise a
system ``libnvrtc`` is the last resort.

Every compile here is the one ``cupy.RawModule`` makes for the CUDA backend:
the backend's options (``DEFAULT_OPTIONS``, the variant, the headers), then
what CuPy adds to every kernel (``CUPY_ADDED_OPTIONS``: flush-to-zero, device
code by default) and the architecture.

    ptx = compile_ptx(source, "rms_norm.cu", ["-DSCALAR_T=__half"], "sm_80")

Compile failures raise ``NvrtcCompileError`` whose message holds the full
compiler log; a missing library raises ``NvrtcUnavailable``.

Dtype variants of a kernel file
-------------------------------
A ``.cu`` file that is compiled once per dtype declares its variants in a
comment line near the top (within the first 20 lines)::

    // variants: -DSCALAR_T=float -DSCALAR_T=__half -DSCALAR_T=__nv_bfloat16

Whitespace separates variants; a variant that needs several options joins
them with commas (``-DSCALAR_T=__half,-DVEC=8``). Several ``// variants:``
lines add up. A file without such a line is compiled once with no extra
options. ``kernel_variants(path)`` returns the list of option tuples, for
the compile gate, the emulator tests and the CUDA backend alike.

NVRTC pitfalls the gate catches: NVRTC has no ``INFINITY``/``NAN`` macros
(use ``CUDART_INF_F`` from ``<math_constants.h>``), no C/C++ standard headers,
and ``__half * float`` is ambiguous (convert explicitly).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import re
from pathlib import Path

NVRTC_PIP_PACKAGE = "nvidia-cuda-nvrtc-cu12"
CUDA_HEADERS_PIP_PACKAGE = "nvidia-cuda-runtime-cu12"
DEFAULT_OPTIONS = ("--std=c++17",)
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")  # cupy/cuda/compiler.py
_CUDART_VERSION = re.compile(r"^#define\s+CUDART_VERSION\s+(\d+)", re.M)
_VARIANTS_LINE = re.compile(r"^\s*//\s*variants:(.*)$")


class NvrtcError(RuntimeError):
    """Base class for NVRTC problems."""


class NvrtcUnavailable(NvrtcError):
    """libnvrtc could not be found or loaded."""


class NvrtcCompileError(NvrtcError):
    """NVRTC rejected the source; the message contains the whole compiler log."""

    def __init__(self, message: str, log: str):
        super().__init__(message)
        self.log = log


def _nvidia_dirs(package: str) -> list[Path]:
    """Install directories of an ``nvidia.<package>`` pip package (a namespace package)."""
    try:
        spec = importlib.util.find_spec(f"nvidia.{package}")
    except ModuleNotFoundError:
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _library_candidates() -> list[str]:
    explicit = os.environ.get("PYLLM_NVRTC_LIBRARY")
    if explicit:
        return [explicit]
    found = []
    for d in _nvidia_dirs("cuda_nvrtc"):
        found += sorted(glob.glob(str(d / "lib" / "libnvrtc.so.*[0-9]")))
        found += sorted(glob.glob(str(d / "bin" / "nvrtc64_*.dll")))
    system = ctypes.util.find_library("nvrtc")
    return [p for p in found if "builtins" not in p and ".alt." not in p] + (
        [system] if system else []
    )


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    """Load libnvrtc once; raise NvrtcUnavailable naming the pip package if it is missing."""
    errors = []
    for candidate in _library_candidates():
        try:
            lib = ctypes.CDLL(candidate)
            break
        except OSError as exc:
            errors.append(f"{candidate}: {exc}")
    else:
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise NvrtcUnavailable(
            f"libnvrtc not found{detail}; install it with "
            f"`pip install {NVRTC_PIP_PACKAGE} {CUDA_HEADERS_PIP_PACKAGE}`"
        )
    p, c_int, c_size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    strs = ctypes.POINTER(ctypes.c_char_p)
    signatures = {
        "nvrtcVersion": [ctypes.POINTER(c_int), ctypes.POINTER(c_int)],
        "nvrtcCreateProgram": [
            ctypes.POINTER(p),
            ctypes.c_char_p,
            ctypes.c_char_p,
            c_int,
            strs,
            strs,
        ],
        "nvrtcCompileProgram": [p, c_int, strs],
        "nvrtcDestroyProgram": [ctypes.POINTER(p)],
        "nvrtcGetProgramLogSize": [p, ctypes.POINTER(c_size)],
        "nvrtcGetProgramLog": [p, ctypes.c_char_p],
        "nvrtcGetPTXSize": [p, ctypes.POINTER(c_size)],
        "nvrtcGetPTX": [p, ctypes.c_char_p],
        "nvrtcGetCUBINSize": [p, ctypes.POINTER(c_size)],
        "nvrtcGetCUBIN": [p, ctypes.c_char_p],
        "nvrtcGetNumSupportedArchs": [ctypes.POINTER(c_int)],
        "nvrtcGetSupportedArchs": [ctypes.POINTER(c_int)],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = c_int
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    lib.nvrtcGetErrorString.argtypes = [c_int]
    return lib


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    load().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def supported_archs() -> list[int]:
    """The architectures this NVRTC compiles for, as numbers (75, 80, ..., 120)."""
    lib, count = load(), ctypes.c_int()
    _check(lib, lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
    archs = (ctypes.c_int * count.value)()
    _check(lib, lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
    return list(archs)


def header_version(include_dir) -> tuple[int, int] | None:
    """(major, minor) of the CUDA headers in include_dir, from cuda_runtime_api.h's CUDART_VERSION."""
    header = Path(include_dir) / "cuda_runtime_api.h"
    match = _CUDART_VERSION.search(header.read_text(errors="replace")) if header.is_file() else None
    if match is None:
        return None
    number = int(match.group(1))  # 1000 * major + 10 * minor
    return number // 1000, number % 1000 // 10


def cuda_include_dir(nvrtc_version: tuple[int, int]) -> str | None:
    """Directory holding cuda_fp16.h and friends from nvidia-cuda-runtime-cu12, if those headers
    are of the CUDA release (major.minor) of the NVRTC that compiles with them; None if not."""
    for d in _nvidia_dirs("cuda_runtime"):
        include = d / "include"
        if (include / "cuda_fp16.h").is_file() and header_version(include) == tuple(nvrtc_version):
            return str(include)
    return None


def _arch_number(arch: str | int) -> str:
    match = re.fullmatch(r"(?:sm_|compute_)?(\d+[a-z]?)", str(arch))
    if not match:
        raise ValueError(f"unrecognised GPU architecture {arch!r}; use e.g. 'sm_80'")
    return match.group(1)


def _check(lib, status: int, what: str) -> None:
    if status != 0:
        raise NvrtcError(f"{what} failed: {lib.nvrtcGetErrorString(status).decode()}")


def _compile(source: str, name: str, options, target: str, want_cubin: bool) -> bytes:
    lib = load()
    include = cuda_include_dir(version())
    opts = [
        *DEFAULT_OPTIONS,
        *options,
        *([f"-I{include}"] if include else []),
        *CUPY_ADDED_OPTIONS,
        f"--gpu-architecture={target}",
    ]
    prog = ctypes.c_void_p()
    _check(
        lib,
        lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        c_opts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        if status != 0:
            log = _read(lib, prog, lib.nvrtcGetProgramLogSize, lib.nvrtcGetProgramLog).decode(
                errors="replace"
            )
            raise NvrtcCompileError(
                f"NVRTC failed to compile {name} for {target} "
                f"({lib.nvrtcGetErrorString(status).decode()}), options {opts}:\n{log}",
                log,
            )
        if want_cubin:
            return _read(lib, prog, lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
        return _read(lib, prog, lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _read(lib, prog, size_fn, get_fn) -> bytes:
    size = ctypes.c_size_t()
    _check(lib, size_fn(prog, ctypes.byref(size)), size_fn.__name__)
    buf = ctypes.create_string_buffer(size.value)
    _check(lib, get_fn(prog, buf), get_fn.__name__)
    return buf.raw[: size.value]


def compile_ptx(source: str, name: str, options: list[str], arch: str) -> str:
    """PTX for virtual architecture compute_XX (``arch`` may be 'sm_80', 'compute_80' or '80')."""
    ptx = _compile(source, name, options, f"compute_{_arch_number(arch)}", want_cubin=False)
    return ptx.rstrip(b"\0").decode()


def compile_cubin(source: str, name: str, options: list[str], arch: str) -> bytes:
    """CUBIN for sm_XX; this also runs ptxas, which checks registers and shared-memory limits."""
    return _compile(source, name, options, f"sm_{_arch_number(arch)}", want_cubin=True)


def ptx_entries(ptx: str) -> list[str]:
    """Names of the kernels (``.entry``) in a PTX module."""
    return re.findall(r"\.entry\s+([\w$]+)", ptx)


def kernel_variants(source_or_path: str | os.PathLike) -> list[tuple[str, ...]]:
    """Option tuples declared by ``// variants:`` lines (see module docstring); [()] if none."""
    text = str(source_or_path)
    if isinstance(source_or_path, os.PathLike) or ("\n" not in text and os.path.isfile(text)):
        text = Path(source_or_path).read_text(encoding="utf-8")
    variants = []
    for line in text.splitlines()[:20]:
        match = _VARIANTS_LINE.match(line)
        if match:
            variants += [tuple(v.split(",")) for v in match.group(1).split()]
    return variants or [()]
