"""Backends: the only code that knows the device. `make_backend` picks one by name.

reference pure NumPy in f32, op by op (reference.py): what every kernel is tested against.
cpu       the reference with the C kernels of kernels/cpu/ in its place where they build (cpu.py).
cuda      hand-written CUDA kernels and cuBLAS through CuPy on a GPU (cuda_backend.py).
cuda-emu  the same backend with the kernels run on the CPU by cuda_emu: slow, for testing.
"""

import math
import os
import tempfile
from pathlib import Path

from ..errors import PyllmError

BACKENDS = ("cpu", "reference", "cuda", "cuda-emu")


def usable_cores() -> int:
    """CPUs this process may keep busy: its affinity, capped by a cgroup v2 CPU quota (a
    container limited to 2 CPUs on a 64-core host must not start 64 threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


CORES = usable_cores()
THREADS_ENV = "PYLLM_THREADS"  # `pyllm serve --threads T` sets it for itself and each replica


def kernel_threads() -> int:
    """Threads the C kernels run on: $PYLLM_THREADS where set, else every usable core."""
    value = os.environ.get(THREADS_ENV, "")
    return int(value) if value.isdigit() and int(value) >= 1 else CORES


def kernels_dir() -> Path:
    """The kernel sources (kernels/*.cu, kernels/cpu/): inside the package in a wheel, or
    kernels/ of a checkout."""
    backends = Path(__file__).resolve().parent
    candidates = (backends.parent / "kernels", backends.parents[1] / "kernels")
    for candidate in candidates:
        if (candidate / "attention.cu").is_file():
            return candidate
    raise PyllmError(f"kernel sources not found in {' or '.join(map(str, candidates))}")


def build_cache_dir(name: str) -> Path:
    """Where compiled kernels are kept: $XDG_CACHE_HOME/pyllm/NAME (default ~/.cache/pyllm/NAME)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "pyllm" / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home (some CI sandboxes): fall back to the temp dir
        path = Path(tempfile.gettempdir()) / f"pyllm-{name}-{os.getuid()}"
        path.mkdir(parents=True, exist_ok=True)
    return path


def make_backend(name: str, config, dtype: str | None = None):
    if name in ("cpu", "reference") and dtype not in (None, "f32"):
        raise PyllmError(f"the {name} backend computes in f32; --dtype {dtype} is for the cuda backend")
    if name == "cpu":
        from .cpu import CpuBackend
        return CpuBackend(config)
    if name == "reference":
        from .reference import ReferenceBackend
        return ReferenceBackend(config)
    if name in ("cuda", "cuda-emu"):
        from .cuda_backend import CudaBackend
        from .cuda_device import CupyDevice, EmuDevice
        return CudaBackend(config, dtype, CupyDevice() if name == "cuda" else EmuDevice())
    raise PyllmError(f"unknown backend {name!r}; choose from: {', '.join(BACKENDS)}")
