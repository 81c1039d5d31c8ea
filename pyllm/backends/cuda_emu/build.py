"""Compile a CUDA source file into a host shared library for the emulator.

Steps, all with the host C++ compiler (``$CXX`` or ``g++``):

1. Preprocess the unchanged ``.cu`` source with ``cuda_emu.h`` force-included
   and ``include/`` (stub ``cuda_fp16.h`` etc.) on the include path. In the
   preprocessed text ``__global__`` has become a marker attribute, so kernel
   names are found even when macros generate the kernels.
2. Append a generated kernel table (name, invoker, parameter signature) and
   the definition of the dynamic shared-memory buffer that every
   ``extern __shared__`` array aliases.
3. Compile that at ``-O2`` and link it with the runtime object (built once).

Libraries are cached under ``$XDG_CACHE_HOME/pyllm/cuda_emu`` (default
``~/.cache/pyllm/cuda_emu``), keyed by the source, the local headers it
includes, the options, the emulator's own files and the compiler version.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

from .. import build_cache_dir
from .errors import CompileError

EMU_DIR = Path(__file__).resolve().parent
HEADER = EMU_DIR / "cuda_emu.h"
STUB_INCLUDE = EMU_DIR / "include"
RUNTIME_SOURCE = EMU_DIR / "runtime.cpp"
DYN_SHARED_MAX = 227 * 1024  # keep in sync with CUDA_EMU_DYN_SHARED_MAX
BUILD_VERSION = "1"

# -fno-strict-aliasing: kernels type-pun freely (float4 loads of float data).
# -fno-math-errno: device math never sets errno; lets sqrtf become one instruction.
CXX_FLAGS = [
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-fno-math-errno",
    "-Wno-attributes",
]

_GLOBAL_MARK = "__attribute__((cuda_emu_global))"
_ATTRIBUTE = re.compile(r"__attribute__\s*\(\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)\)")
_FUNC_NAME = re.compile(r"\s*(?:[\w:]+\s+|\*\s*)*?(\w+)\s*\(")
_STATEMENT = re.compile(r"[^;{}]*;")
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def cache_dir() -> Path:
    return build_cache_dir("cuda_emu")


def compiler() -> str:
    return os.environ.get("CXX", "g++")


@functools.lru_cache(maxsize=None)
def _compiler_id(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise CompileError(
            f"cuda_emu needs a host C++ compiler; running {cxx!r} failed: {exc}"
        ) from exc
    return out.stdout.splitlines()[0] if out.stdout else cxx


@functools.lru_cache(maxsize=None)
def _emulator_digest() -> str:
    h = hashlib.sha256(BUILD_VERSION.encode())
    for path in sorted([*EMU_DIR.glob("*.h"), RUNTIME_SOURCE, *STUB_INCLUDE.glob("*")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def host_options(options) -> list[str]:
    """Keep the NVRTC/nvcc options that matter on the host: macros and include paths.

    Everything else (architecture, -std, fast math, line info) only steers
    device code generation and is dropped.
    """
    out, opts = [], list(options)
    long_forms = {
        "--define-macro=": "-D",
        "--undefine-macro=": "-U",
        "--include-path=": "-I",
        "--pre-include=": "-include",
    }
    i = 0
    while i < len(opts):
        opt = opts[i]
        if opt in ("-D", "-U", "-I", "-include") and i + 1 < len(opts):
            out += [opt, opts[i + 1]]
            i += 1
        elif opt.startswith(("-D", "-U", "-I")):
            out.append(opt)
        else:
            for prefix, flag in long_forms.items():
                if opt.startswith(prefix):
                    out += (
                        [flag, opt[len(prefix) :]]
                        if flag == "-include"
                        else [flag + opt[len(prefix) :]]
                    )
        i += 1
    return out


def _include_dirs(host_opts: list[str], source_dir: Path | None) -> list[Path]:
    dirs = [source_dir] if source_dir else []
    for i, opt in enumerate(host_opts):
        if opt == "-I" and i + 1 < len(host_opts):
            dirs.append(Path(host_opts[i + 1]))
        elif opt.startswith("-I") and len(opt) > 2:
            dirs.append(Path(opt[2:]))
    return dirs


def _hash_local_includes(h, text: str, dirs: list[Path], seen: set) -> None:
    """Hash the quoted #include files the source can see, so editing them invalidates the cache."""
    for name in _LOCAL_INCLUDE.findall(text):
        for d in dirs:
            path = (d / name).resolve()
            if path.is_file():
                if path not in seen:
                    seen.add(path)
                    content = path.read_text(errors="replace")
                    h.update(str(path).encode() + b"\0" + content.encode())
                    _hash_local_includes(h, content, [path.parent, *dirs], seen)
                break


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(
            f"cuda_emu: {what} failed (exit {proc.returncode}).\n"
            f"command: {' '.join(cmd)}\n{proc.stderr.strip()}"
        )


def _runtime_object(cxx: str) -> Path:
    key = hashlib.sha256(
        f"{_emulator_digest()}|{_compiler_id(cxx)}|{CXX_FLAGS}".encode()
    ).hexdigest()
    obj = cache_dir() / f"runtime-{key[:24]}.o"
    if not obj.exists():
        tmp = obj.with_name(f"{obj.name}.{os.getpid()}.tmp")
        _run([cxx, *CXX_FLAGS, "-c", str(RUNTIME_SOURCE), "-o", str(tmp)], "building the runtime")
        os.replace(tmp, obj)
    return obj


def kernel_names(preprocessed: str) -> list[str]:
    """Names of the non-template __global__ functions, in order of appearance."""
    names: list[str] = []
    for mark in re.finditer(re.escape(_GLOBAL_MARK), preprocessed):
        start = max(preprocessed.rfind(c, 0, mark.start()) for c in ";{}")
        if re.search(r"\btemplate\b", preprocessed[start + 1 : mark.start()]):
            continue
        tail = _ATTRIBUTE.sub(" ", preprocessed[mark.end() : mark.end() + 4000])
        match = _FUNC_NAME.match(tail)
        if match and match.group(1) not in names:
            names.append(match.group(1))
    return names


def extern_shared_arrays(preprocessed: str) -> dict[str, str]:
    """``extern __shared__ T name[];`` declarations as {name: element type}."""
    arrays: dict[str, str] = {}
    for stmt in _STATEMENT.findall(preprocessed):
        if "thread_local" not in stmt or not re.search(r"\bextern\b", stmt):
            continue
        match = re.search(r"\b(\w+)\s*\[\s*\]\s*;$", stmt.strip())
        if not match:
            continue
        ctype = _ATTRIBUTE.sub(" ", stmt.strip()[: match.start()])
        ctype = re.sub(r"\b(extern|thread_local|static)\b", " ", ctype)
        arrays.setdefault(match.group(1), " ".join(ctype.split()))
    return arrays


def generated_code(names: list[str], shared: dict[str, str]) -> str:
    """The kernel table and shared-memory definitions appended to the preprocessed source."""
    lines = [
        '# 1 "<cuda_emu generated>"',
        f"alignas(16) thread_local unsigned char cuda_emu_dyn_shared[{DYN_SHARED_MAX}];",
    ]
    for name, ctype in shared.items():
        lines.append(
            f"extern thread_local {ctype} {name}[{DYN_SHARED_MAX} / sizeof({ctype})] "
            f'__attribute__((alias("cuda_emu_dyn_shared")));'
        )
    hidden = 'extern "C" __attribute__((visibility("hidden")))'
    export = 'extern "C" __attribute__((visibility("default")))'
    lines.append(
        f"{hidden} unsigned char* cuda_emu_dyn_shared_base() {{ return cuda_emu_dyn_shared; }}"
    )
    lines.append(
        "namespace { struct CudaEmuKernel { const char* name; cuda_emu::Invoker invoke; "
        "void* fn; const char* (*signature)(); };"
    )
    lines.append("const CudaEmuKernel cuda_emu_kernels[] = {")
    for name in names:
        entry = f"cuda_emu::Entry<decltype(&{name})>"
        lines.append(
            f'  {{"{name}", &{entry}::invoke, reinterpret_cast<void*>(&{name}), &{entry}::signature}},'
        )
    lines.append("  {nullptr, nullptr, nullptr, nullptr}}; }")
    lines.append(f"{export} int cuda_emu_kernel_count() {{ return {len(names)}; }}")
    lines.append(
        f"{export} const char* cuda_emu_kernel_name(int i) {{ return cuda_emu_kernels[i].name; }}"
    )
    lines.append(
        f"{export} const char* cuda_emu_kernel_signature(int i) "
        "{ return cuda_emu_kernels[i].signature(); }"
    )
    lines.append(
        f"{export} int cuda_emu_launch(int i, const unsigned* grid, const unsigned* block, "
        "unsigned long long dyn, void** args, int flags) { return cuda_emu::launch("
        "cuda_emu_kernels[i].invoke, cuda_emu_kernels[i].fn, grid, block, dyn, args, flags); }"
    )
    return "\n".join(lines) + "\n"


def build_library(source: str, options=(), path: str | os.PathLike | None = None) -> Path:
    """Compile `source` (read from `path` if given) and return the cached library path."""
    cxx = compiler()
    src_path = Path(path).resolve() if path is not None else None
    source_dir = src_path.parent if src_path else None
    opts = host_options(options)
    h = hashlib.sha256(
        f"{_emulator_digest()}|{_compiler_id(cxx)}|{CXX_FLAGS}|{opts}|{src_path}".encode()
    )
    h.update(source.encode())
    _hash_local_includes(h, source, _include_dirs(opts, source_dir), set())
    lib = cache_dir() / f"{h.hexdigest()[:32]}.so"
    if lib.exists():
        return lib
    runtime = _runtime_object(cxx)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="build-") as tmp:
        tmpdir = Path(tmp)
        if src_path is None:
            src_path = tmpdir / "source.cu"
            src_path.write_text(source)
        pre = tmpdir / "kernel.ii"
        _run(
            [
                cxx,
                "-E",
                "-x",
                "c++",
                "-std=c++17",
                "-include",
                str(HEADER),
                "-I",
                str(STUB_INCLUDE),
                *opts,
                str(src_path),
                "-o",
                str(pre),
            ],
            f"preprocessing {src_path.name}",
        )
        text = pre.read_text()
        code = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        full = tmpdir / "module.ii"
        full.write_text(
            text + "\n" + generated_code(kernel_names(code), extern_shared_arrays(code))
        )
        out = tmpdir / "module.so"
        _run(
            [
                cxx,
                *CXX_FLAGS,
                "-shared",
                "-x",
                "c++-cpp-output",
                str(full),
                "-x",
                "none",
                str(runtime),
                "-o",
                str(out),
                "-ldl",
            ],
            f"compiling {src_path.name}",
        )
        os.replace(out, lib)
    return lib
