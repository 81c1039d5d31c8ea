"""kernels/cpu/, the CPU backend's C kernels: matmul (a few rows: decode steps; many: prompts),
rms_norm, swiglu, qkv_rope, and causal attention for a whole step's sequences at once (decode,
prefill, or a mix).

Built once by the host C compiler ($CC, else cc) with -O3 -march=native into the build cache
(keyed by the sources, the compiler and this CPU) and loaded with ctypes; the kernels share each
call among their own threads, one per core. Nothing depends on them: with no compiler, or
PYLLM_CPU_KERNELS=0, every function here gives None and the NumPy path serves. A CPU with AVX2
but not AVX-512 builds every function here in 8 lanes (and cpu_avx2.py's block matmul in place
of cpu_quant.py's).
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
import time

import numpy as np

from ..errors import PyllmError
from ..progress import progress
from . import build_cache_dir, kernel_threads, kernels_dir
from .base import BLOCK_TOKENS

SOURCES = "cpu"  # kernels/cpu/: *.c built into one library, sharing cpu.h
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden"]
# the skinny kernel's time grows with the rows (8 at a time), the many-row matmul's does not below
# its 32-row panel: weights streamed at 8 rows 24.8 vs 18.0 GB/s, 16 rows 17.4 vs 18.1, 24 rows
# 6.4 vs 17.2 (56 MB of SmolLM2-shaped weights, measured here)
MAX_ROWS = 16


def _this_cpu() -> bytes:
    """What -march=native depends on: the CPU model and feature flags."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"".join(sorted({line for line in f if line.startswith((b"model name", b"flags"))}))
    except OSError:
        return platform.processor().encode()


def _build(compiler: list[str]):
    sources = sorted((kernels_dir() / SOURCES).glob("*.[ch]"))
    if not sources:
        raise PyllmError(f"no C kernel sources in {kernels_dir() / SOURCES}")
    version = subprocess.run([*compiler, "--version"], capture_output=True, check=True).stdout
    key = hashlib.sha256(b"\0".join([*(path.read_bytes() for path in sources), version, " ".join(FLAGS).encode(),
                                     _this_cpu()]))
    library = build_cache_dir("cpu") / f"kernels-{key.hexdigest()[:24]}.so"
    if not library.exists():
        fd, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(fd)
        try:
            with progress(total=1, desc="build CPU kernels (once)", unit="library") as bar:  # ~4 s
                subprocess.run([*compiler, *FLAGS, *[str(path) for path in sources if path.suffix == ".c"], "-o",
                                partial], capture_output=True, check=True)
                bar.update(1)
            os.replace(partial, library)  # atomic: other processes and threads see all of it or none
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return ctypes.CDLL(str(library))


@functools.lru_cache(maxsize=None)  # thread-safe enough: a second first call builds to its own file
def built():
    """The kernels' library as this CPU builds it, its threads started: the AVX-512 kernels, or on
    a CPU with AVX2 but not AVX-512 avx2.c's (cpu_avx2.py) and stream_read; None without a
    compiler, sources or either instruction set, or with PYLLM_CPU_KERNELS=0."""
    if os.environ.get("PYLLM_CPU_KERNELS", "1") == "0":
        return None
    try:
        library = _build(shlex.split(os.environ.get("CC", "cc")))  # CC may be "ccache gcc"
        start, stream = library.start_threads, library.stream_read
    except (OSError, ValueError, PyllmError, subprocess.CalledProcessError, AttributeError):
        return None  # no compiler or no kernel sources; AttributeError: built without AVX2 or AVX-512
    start.argtypes, start.restype = [ctypes.c_int], ctypes.c_int
    stream.argtypes, stream.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_double  # data, floats
    start(kernel_threads())
    return library


@functools.lru_cache(maxsize=None)
def _kernel_library():
    """built(), with the kernels both instruction sets build (matmul.c, gemm.c, rows.c,
    attention.c): a decode step's, which layers.c runs in one call, and a prompt's GEMMs; else
    None."""
    library = built()
    if library is None:
        return None
    try:
        skinny, attention, layers = library.skinny_matmul, library.attention, library.decoder_layers
        matmul, quant_gemm = library.matmul, library.quant_gemm
        timing = library.decoder_matmul_seconds
        norm, glu, rope = library.rms_norm, library.swiglu, library.qkv_rope
        interleave = library.interleave_rows
        peaks = library.int8_dot_loop, library.fma_loop
    except AttributeError:
        return None  # built with neither
    # M, x, K, w, N, out
    skinny.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    skinny.restype = None
    # L, layers, T, activation layers, hidden, inter, H, KV, D, eps, scale, x, S, cos, sin, k pool, v pool,
    # block tables, lengths, counts, h, qkv, q, a, gate_up, act, spare, xq
    layers.argtypes = ([ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 7 + [ctypes.c_float] * 2 + [ctypes.c_void_p]
                       + [ctypes.c_int] + [ctypes.c_void_p] * 15)
    layers.restype = None
    timing.argtypes, timing.restype = [ctypes.c_int], ctypes.c_double  # keep timing
    # T, width, x, weight, eps, out
    norm.argtypes, norm.restype = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                   ctypes.c_void_p], None
    # T, width, gate_up, out
    glu.argtypes, glu.restype = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p], None
    # S, H, KV, D, layer, layers, qkv, bias, cos, sin, k pool, v pool, block tables, lengths, new-token counts, q
    rope.argtypes, rope.restype = [ctypes.c_int] * 6 + [ctypes.c_void_p] * 10, None
    # S, H, KV, D, scale, layer, layers, q, k pool, v pool, block tables, lengths, new-token counts, out
    attention.argtypes = [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 7
    attention.restype = None
    # M, x, K, w, N, out, accumulate
    matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_int]
    # type, M, x, K, w blocks, N, out, accumulate
    quant_gemm.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                           ctypes.c_void_p, ctypes.c_int]
    matmul.restype = quant_gemm.restype = None
    # type, w, N, K
    interleave.argtypes, interleave.restype = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int], None
    for loop in peaks:  # rounds, threads (out), work per round and thread (out) -> a checksum
        loop.argtypes = [ctypes.c_long, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        loop.restype = ctypes.c_float
    return library


@functools.lru_cache(maxsize=None)
def _avx512_library():
    """_kernel_library(), where it holds the AVX-512 kernels as well (quant.c's among them); else None."""
    library = _kernel_library()
    if library is None or not hasattr(library, "quant_matmul"):
        return None  # built without AVX-512
    return library


def _address(array) -> int:
    """Where a C-contiguous array's data starts. A decode step takes ~800 of these: through the
    buffer protocol it costs a third of array.ctypes.data (read-only arrays take that route)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(array))
    except (TypeError, ValueError):
        return array.ctypes.data


def _contiguous_f32(*arrays):
    return all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)


def avx512_available() -> bool:
    """The AVX-512 kernels: every op of the CPU backend, f16 and bf16 weights included."""
    return _avx512_library() is not None


def kernels_available() -> bool:
    """The kernels of every op on f32 and block-format weights, prompts included (AVX-512, or AVX2 alone)."""
    return _kernel_library() is not None


def matmul_transb(a, b, add_to=None):
    """a [M, K] @ b [N, K]^T -> [M, N] f32 on every core, or that product added into add_to [M, N]
    (returned); None where the kernels are not available (or b is not a contiguous f32 matrix):
    the caller's NumPy path serves. Up to MAX_ROWS rows take the kernel that streams the weights,
    more the GEMM (gemm.c)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[0] == 0 or not _contiguous_f32(b):
        return None
    library = _kernel_library()
    if library is None:
        return None
    a = np.ascontiguousarray(a, dtype=np.float32)
    (rows, depth), columns = a.shape, b.shape[0]
    # the many-row kernel adds into add_to itself, given the product's shape (else NumPy adds, or refuses it)
    accumulate = (rows > MAX_ROWS and add_to is not None and add_to.shape == (rows, columns)
                  and _contiguous_f32(add_to))
    out = add_to if accumulate else np.empty((rows, columns), np.float32)  # [M, N]
    if rows <= MAX_ROWS:
        library.skinny_matmul(rows, _address(a), depth, _address(b), columns, _address(out))
    else:
        library.matmul(rows, _address(a), depth, _address(b), columns, _address(out), int(accumulate))
    if add_to is None or accumulate:
        return out
    add_to += out
    return add_to


def _check_blocks(name, fmt, blocks, depth):
    if (blocks.dtype != np.uint8 or blocks.ndim != 2 or depth % fmt.block_size
            or blocks.shape[1] != fmt.row_bytes(depth) or not blocks.flags.c_contiguous):
        raise ValueError(f"{name}: blocks {blocks.shape} {blocks.dtype} are not contiguous rows of {depth} {fmt.name}")


INTERLEAVED = 0x100  # kernels/cpu/cpu.h: | a 32-weight format's type, its rows interleaved (interleave.c)


def quant_gemm(fmt, a, blocks, add_to=None, interleaved=False):
    """a [M, K] @ w^T for w [N, K] stored as GGML blocks of format fmt (blocks: uint8 [N, row
    bytes], interleaved where said) -> [M, N] f32, or added into add_to (returned): many rows (a
    prompt) through the f32 GEMM on weight strips dequantized in cache (interleaved rows put back in
    GGUF's layout first). None without the kernels."""
    library = _kernel_library()
    if library is None:
        return None
    a = np.ascontiguousarray(a, dtype=np.float32)
    (rows, depth), columns = a.shape, blocks.shape[0]
    _check_blocks("quant_gemm", fmt, blocks, depth)
    if add_to is not None and (add_to.shape != (rows, columns) or not _contiguous_f32(add_to)):
        raise ValueError(f"quant_gemm: add_to {add_to.shape} is not a contiguous f32 [{rows}, {columns}]")
    out = add_to if add_to is not None else np.empty((rows, columns), np.float32)  # [M, N]
    kind = fmt.gguf_type | (INTERLEAVED if interleaved else 0)
    library.quant_gemm(kind, rows, _address(a), depth, _address(blocks), columns, _address(out), int(add_to is not None))
    return out


def stream_read(data) -> float:
    """The sum of a contiguous f32 array, read once by every core (the memory-read roofline's
    measure: time it); None without the kernels."""
    library = built()
    if library is None or not _contiguous_f32(data):
        return None
    return library.stream_read(_address(data), data.size)


def _peak(loop_name, rounds) -> float | None:
    """Work per second of one of stream.c's peak loops on every core (timed here, after a warm-up
    that brings each core to speed), or None without the kernels."""
    library = _kernel_library()
    if library is None:
        return None
    loop, threads, per_round = getattr(library, loop_name), ctypes.c_int(), ctypes.c_int()
    loop(rounds // 100, ctypes.byref(threads), ctypes.byref(per_round))
    start = time.perf_counter()
    loop(rounds, ctypes.byref(threads), ctypes.byref(per_round))
    return per_round.value * rounds * threads.value / (time.perf_counter() - start)


def int8_dot_peak(rounds=20_000_000) -> float | None:
    """Multiply-adds per second of int8 dot products on every core (vpdpbusd with AVX-512 VNNI, else
    vpmaddubsw): the int8 compute roofline of batched decode; None without the kernels."""
    return _peak("int8_dot_loop", rounds)


def fma_peak(rounds=20_000_000) -> float | None:
    """f32 flops per second of FMAs on every core: the compute roofline of a prompt's GEMM; None
    without the kernels."""
    return _peak("fma_loop", rounds)


def rms_norm(x, weight, eps):
    """x [T, hidden], weight [hidden] -> [T, hidden] f32, or None (no kernels, or not contiguous f32)."""
    library = _kernel_library()
    if library is None or x.ndim != 2 or weight.shape != x.shape[1:] or not _contiguous_f32(x, weight):
        return None
    out = np.empty_like(x)  # [T, hidden]
    library.rms_norm(x.shape[0], x.shape[1], _address(x), _address(weight), eps, _address(out))
    return out


def swiglu(gate_up):
    """gate_up [T, 2 * inter] (gate | up) -> silu(gate) * up [T, inter] f32, or None (as rms_norm)."""
    library = _kernel_library()
    if library is None or gate_up.ndim != 2 or gate_up.shape[1] % 2 or not _contiguous_f32(gate_up):
        return None
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)  # [T, inter]
    library.swiglu(gate_up.shape[0], out.shape[1], _address(gate_up), _address(out))
    return out


def qkv_rope(qkv, bias, slots, layer, cos, sin):
    """A step's fused projections qkv [T, (H + 2 KV) * D] (+ bias [(H + 2 KV) * D]) -> q [T, H, D]
    with rope, each sequence's rope(k) and v written into its blocks at `layer`; slots (a step's
    CacheSlots), cos and sin as reference.qkv_rope_cache. None where the kernels are not available
    (or qkv, bias, cos or sin is not contiguous f32)."""
    library = _kernel_library()
    if library is None or qkv.ndim != 2 or not _contiguous_f32(qkv, cos, sin, *([] if bias is None else [bias])):
        return None
    caches, (layers, n_kv, head_dim, n_new) = _step_caches(slots)
    n_heads = qkv.shape[1] // head_dim - 2 * n_kv
    if (qkv.shape != (n_new, (n_heads + 2 * n_kv) * head_dim) or n_heads < n_kv or n_heads % n_kv
            or not 0 <= layer < layers or (bias is not None and bias.shape != (qkv.shape[1],))):
        raise ValueError(f"qkv_rope: qkv {qkv.shape} at layer {layer} does not fit caches of {layers} layers, "
                         f"{n_kv} KV heads of {head_dim} and {n_new} new tokens, or its bias")
    q = np.empty((qkv.shape[0], n_heads, head_dim), np.float32)  # [T, H, D]
    library.qkv_rope(len(slots), n_heads, n_kv, head_dim, layer, layers, _address(qkv),
                     None if bias is None else _address(bias), _address(cos), _address(sin), *caches, _address(q))
    return q


_last_step = threading.local()  # a step's slots in C form: all its layers use the same pool and tables


def _pointers(arrays):
    return (ctypes.c_void_p * len(arrays))(*[_address(a) for a in arrays])


def _ints(values):
    return (ctypes.c_int * len(values))(*values)


def _step_caches(slots):
    """A step's caches in C form for qkv_rope and attention, checked (the C side trusts them) and
    computed once per step: (k pool, v pool, block tables, lengths, new-token counts) as C
    arguments; and the pool's [layers, KV, D] the slots share, and the new tokens."""
    if getattr(_last_step, "slots", None) is not slots:
        keys, values = slots[0][:2]
        if (keys.ndim != 5 or keys.shape != values.shape or keys.shape[3] != BLOCK_TOKENS
                or not _contiguous_f32(keys, values)):
            raise ValueError(f"attention: the KV pool's keys {keys.shape} {keys.dtype} and values {values.shape} "
                             f"{values.dtype} are not both contiguous f32 [blocks, layers, KV, {BLOCK_TOKENS}, D]")
        tables, lengths, counts = [], [], []
        for s, (k, v, table, rows, n_new) in enumerate(slots):
            table = np.asarray(table)
            if k is not keys or v is not values:
                raise ValueError(f"attention: sequence {s} reads another KV pool than sequence 0")
            if table.ndim != 1 or table.dtype.kind not in "iu" or not 0 < n_new <= rows <= BLOCK_TOKENS * len(table):
                raise ValueError(f"attention: sequence {s}'s block table {table.shape} {table.dtype} does not hold "
                                 f"its {rows} rows ({n_new} new) in blocks of {BLOCK_TOKENS}")
            used = table[:-(-rows // BLOCK_TOKENS)]
            if used.min() < 0 or used.max() >= len(keys):
                raise ValueError(f"attention: sequence {s}'s block table names blocks outside the pool's {len(keys)}")
            tables.append(np.ascontiguousarray(table, np.int32))
            lengths.append(rows)
            counts.append(n_new)
        _last_step.slots, _last_step.tables = slots, tables  # the C form points into tables
        _last_step.caches = (_address(keys), _address(values), _pointers(tables), _ints(lengths), _ints(counts))
        _last_step.shape = (*keys.shape[1:3], keys.shape[4], sum(counts))
    return _last_step.caches, _last_step.shape


def attention(q, slots, layer):
    """Every sequence's new tokens attend causally over its cache: q [T, H, D] (rope applied, the
    sequences' rows in order); slots: per sequence a CacheSlot (the KV pool's keys and values
    [blocks, layers, KV, BLOCK_TOKENS, D], its block table, rows to attend, new tokens among them),
    the same list for every layer of a step -> [T, H, D] f32, or None where the kernel is not
    available (or D is not a multiple of 16)."""
    library = _kernel_library()
    if library is None or q.shape[-1] % 16 or q.dtype != np.float32:
        return None
    caches, (layers, n_kv, head_dim, n_new) = _step_caches(slots)
    n_tokens, n_heads, _ = q.shape
    if n_tokens != n_new or n_heads % n_kv or q.shape[2] != head_dim or not 0 <= layer < layers:
        raise ValueError(f"attention: q {q.shape} at layer {layer} does not fit caches of {layers} layers, "
                         f"{n_kv} KV heads of {head_dim} and {n_new} new tokens")
    q = np.ascontiguousarray(q)
    out = np.empty_like(q)  # [T, H, D]
    library.attention(len(slots), n_heads, n_kv, head_dim, head_dim ** -0.5, layer, layers, _address(q), *caches,
                      _address(out))
    return out
