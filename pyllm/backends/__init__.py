"""Backends: the only code that knows the device. `make_backend` picks one by name.

cpu       NumPy in f32 (numpy_backend.py).
cuda      hand-written CUDA kernels and cuBLAS through CuPy on a GPU (cuda_backend.py).
cuda-emu  the same backend with the kernels run on the CPU by cuda_emu: slow, for testing.
"""

from ..errors import PyllmError

BACKENDS = ("cpu", "cuda", "cuda-emu")


def make_backend(name: str, config, dtype: str | None = None):
    if name == "cpu":
        from .numpy_backend import NumpyBackend
        if dtype not in (None, "f32"):
            raise PyllmError(f"the cpu backend computes in f32; --dtype {dtype} is for the cuda backend")
        return NumpyBackend(config)
    if name in ("cuda", "cuda-emu"):
        from .cuda_backend import CudaBackend, CupyDevice, EmuDevice
        return CudaBackend(config, dtype, CupyDevice() if name == "cuda" else EmuDevice())
    raise PyllmError(f"unknown backend {name!r}; choose from: {', '.join(BACKENDS)}")
