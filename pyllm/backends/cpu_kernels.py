"""kernels/skinny_matmul.c, the CPU backend's one C kernel, for batched decode.

Built on first use by the host C compiler ($CC, else cc) with -O3 -march=native into the build
cache (keyed by the source, the compiler and this CPU), and loaded with ctypes, which releases
the GIL during the call, so the backend's threads run it on every core at once. Nothing depends
on it: with no compiler, no AVX-512, or PYLLM_CPU_KERNELS=0, skinny_matmul() gives None and the
NumPy path serves.
"""

import ctypes
import functools
import hashlib
import os
import platform
import subprocess

from . import build_cache_dir, kernels_dir

SOURCE = "skinny_matmul.c"
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
ROWS = range(2, 9)  # the entry points skinny_matmul_2 .. skinny_matmul_8
_ARGTYPES = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
             ctypes.c_int]  # x, K, w, first weight row, end weight row, out, out row stride


def _this_cpu() -> bytes:
    """What -march=native depends on: the CPU model and feature flags."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"".join(sorted({line for line in f if line.startswith((b"model name", b"flags"))}))
    except OSError:
        return platform.processor().encode()


def _build(compiler: str):
    source = kernels_dir() / SOURCE
    version = subprocess.run([compiler, "--version"], capture_output=True, check=True).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), version, " ".join(FLAGS).encode(), _this_cpu()]))
    library = build_cache_dir("cpu") / f"skinny_matmul-{key.hexdigest()[:24]}.so"
    if not library.exists():
        partial = library.with_suffix(f".{os.getpid()}.partial")
        subprocess.run([compiler, *FLAGS, str(source), "-o", str(partial)], capture_output=True, check=True)
        os.replace(partial, library)  # atomic: a concurrent process sees the whole library or none
    return ctypes.CDLL(str(library))


@functools.lru_cache(maxsize=None)
def _functions() -> dict | None:
    if os.environ.get("PYLLM_CPU_KERNELS", "1") == "0":
        return None
    try:
        library = _build(os.environ.get("CC", "cc"))
        functions = {rows: getattr(library, f"skinny_matmul_{rows}") for rows in ROWS}
    except (OSError, subprocess.CalledProcessError, AttributeError):  # no compiler, or built without AVX-512
        return None
    for function in functions.values():
        function.argtypes, function.restype = _ARGTYPES, None
    return functions


def skinny_matmul(rows: int):
    """The C function for `rows` activation rows, or None where the kernel is not available:
    f(x, K, w, lo, hi, out, ldo) sets out[m, n] = x[m] . w[n] for weight rows lo <= n < hi."""
    functions = _functions()
    return functions.get(rows) if functions else None
