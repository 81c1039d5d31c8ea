"""Backends: the only code that knows the device. `make_backend` picks one by name."""

from ..errors import PyllmError

BACKENDS = ("cpu",)


def make_backend(name: str, config, dtype: str | None = None):
    if name == "cpu":
        from .numpy_backend import NumpyBackend
        if dtype not in (None, "f32"):
            raise PyllmError(f"the cpu backend computes in f32; --dtype {dtype} is for the cuda backend")
        return NumpyBackend(config)
    raise PyllmError(f"unknown backend {name!r}; choose from: {', '.join(BACKENDS)}")
