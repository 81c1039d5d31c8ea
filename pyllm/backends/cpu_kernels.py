"""kernels/decode.c, the CPU backend's C kernels for decode steps: the matmul of a few rows, and
attention of one new token per sequence.

Built on first use by the host C compiler ($CC, else cc) with -O3 -march=native into the build
cache (keyed by the source, the compiler and this CPU) and loaded with ctypes; the kernels share
each call among their own threads, one per core. Nothing depends on them: with no compiler, no
AVX-512, or PYLLM_CPU_KERNELS=0, both functions here give None and the NumPy path serves.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading

import numpy as np

from ..errors import PyllmError
from . import CORES, build_cache_dir, kernels_dir

SOURCE = "decode.c"
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread"]
# the kernel's time grows with the rows (8 at a time) while OpenBLAS's improves: measured on
# SmolLM2's shapes here, 8 rows 15.8 vs 6.6 GB/s, 16 rows 7.4 vs 6.6, 24 rows 4.9 vs 5.6
MAX_ROWS = 16


def _this_cpu() -> bytes:
    """What -march=native depends on: the CPU model and feature flags."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"".join(sorted({line for line in f if line.startswith((b"model name", b"flags"))}))
    except OSError:
        return platform.processor().encode()


def _build(compiler: list[str]):
    source = kernels_dir() / SOURCE
    version = subprocess.run([*compiler, "--version"], capture_output=True, check=True).stdout
    key = hashlib.sha256(b"\0".join([source.read_bytes(), version, " ".join(FLAGS).encode(), _this_cpu()]))
    library = build_cache_dir("cpu") / f"decode-{key.hexdigest()[:24]}.so"
    if not library.exists():
        fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(fd)
        try:
            subprocess.run([*compiler, *FLAGS, str(source), "-o", partial], capture_output=True, check=True)
            os.replace(partial, library)  # atomic: other processes and threads see all of it or none
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return ctypes.CDLL(str(library))


@functools.lru_cache(maxsize=None)  # thread-safe enough: a second first call builds to its own file
def _library():
    if os.environ.get("PYLLM_CPU_KERNELS", "1") == "0":
        return None
    try:
        library = _build(shlex.split(os.environ.get("CC", "cc")))  # CC may be "ccache gcc"
        start, matmul, attention = library.start_threads, library.skinny_matmul, library.decode_attention
    except (OSError, ValueError, PyllmError, subprocess.CalledProcessError, AttributeError):
        return None  # no compiler or no kernel sources; AttributeError: built without AVX-512
    start.argtypes, start.restype = [ctypes.c_int], ctypes.c_int
    # M, x, K, w, N, out
    matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    matmul.restype = None
    # S, H, KV, D, scale, layer, q, k pointers, v pointers, lengths, capacities, out
    attention.argtypes = [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int] + [ctypes.c_void_p] * 6
    attention.restype = None
    start(CORES)
    return library


def available() -> bool:
    return _library() is not None


def skinny_matmul_transb(a, b):
    """a [M, K] @ b [N, K]^T -> [M, N] f32 for 1 <= M <= MAX_ROWS on every core; None where the
    kernel is not available (or b is not a contiguous f32 matrix): the caller's NumPy path serves."""
    if (a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not 1 <= a.shape[0] <= MAX_ROWS
            or b.dtype != np.float32 or not b.flags.c_contiguous):
        return None
    library = _library()
    if library is None:
        return None
    a = np.ascontiguousarray(a, dtype=np.float32)
    out = np.empty((a.shape[0], b.shape[0]), np.float32)  # [M, N]
    library.skinny_matmul(a.shape[0], a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[0], out.ctypes.data)
    return out


_last_step = threading.local()  # a step's slots in C form: its layers all attend over the same caches


def _slot_arrays(slots):
    """(k pointers, v pointers, rows, capacities) as C arrays, or None if a cache is not a
    contiguous f32 array; computed once per step."""
    if getattr(_last_step, "slots", None) is not slots:
        pointers, ints = ctypes.c_void_p * len(slots), ctypes.c_int * len(slots)
        usable = slots and all(k.dtype == v.dtype == np.float32 and k.flags.c_contiguous and v.flags.c_contiguous
                               for k, v, _ in slots)
        _last_step.slots = slots
        _last_step.arrays = (pointers(*[k.ctypes.data for k, _, _ in slots]),
                             pointers(*[v.ctypes.data for _, v, _ in slots]),
                             ints(*[rows for _, _, rows in slots]),
                             ints(*[k.shape[2] for k, _, _ in slots])) if usable else None
    return _last_step.arrays


def decode_attention(q, slots, layer):
    """One new token per sequence over its whole cache: q [S, H, D] (rope applied); slots: per
    sequence (k_cache, v_cache [layers, KV, capacity, D], rows to attend, the new token's included),
    the same list for every layer of a step -> [S, H, D] f32, or None where the kernel is not
    available (or D is not a multiple of 16)."""
    n_seqs, n_heads, head_dim = q.shape
    if head_dim % 16 or q.dtype != np.float32:
        return None
    library = _library()
    arrays = _slot_arrays(slots) if library is not None else None
    if arrays is None:
        return None
    q = np.ascontiguousarray(q)
    out = np.empty_like(q)  # [S, H, D]
    library.decode_attention(n_seqs, n_heads, slots[0][0].shape[1], head_dim, head_dim ** -0.5, layer, q.ctypes.data,
                             *arrays, out.ctypes.data)
    return out
