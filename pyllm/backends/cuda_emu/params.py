"""Kernel parameters as a compiled cuda_emu module reports them, and the arguments each accepts.

Arguments follow CuPy's rules and are checked against the kernel's real
parameter types (which the compiled module reports):

* ``np.ndarray`` (C-contiguous) or ``None`` for pointer parameters; the dtype
  must fit the pointee: float32 for ``float*``, float16 or uint16 bits for
  ``__half*``, uint16 bits (or ml_dtypes bfloat16) for ``__nv_bfloat16*``,
  any dtype for ``void*``/``char*``; struct pointees (``float4*``) take any
  dtype whose itemsize divides the struct size.
* NumPy scalars by value, e.g. ``np.int32`` for ``int``, ``np.float32`` for
  ``float``. Python scalars are converted the way CuPy converts them (int ->
  int64, float -> float64), so a Python int for an ``int`` parameter is
  rejected: on a GPU CuPy would pass 8 bytes where the kernel reads 4.
"""

from dataclasses import dataclass

import numpy as np

from .errors import LaunchError

_KIND_NAMES = {
    "f": "float",
    "i": "int",
    "u": "uint",
    "?": "bool",
    "h": "__half",
    "b": "__nv_bfloat16",
    "v": "void",
    "o": "struct",
}


@dataclass(frozen=True)
class Param:
    """One kernel parameter as the compiled module describes it."""

    pointer: bool
    const: bool
    kind: str  # see _KIND_NAMES
    size: int  # bytes of the value, or of the pointee for pointers

    @classmethod
    def parse(cls, code: str) -> "Param":
        return cls(code[0] == "p", code[1] == "c", code[2], int(code[3:]))

    def __str__(self) -> str:
        base = _KIND_NAMES[self.kind]
        if self.kind in "fiu":
            base += str(8 * self.size)
        elif self.kind == "o":
            base += f" of {self.size} bytes"
        return f"{'const ' if self.const else ''}{base}*" if self.pointer else base


def as_numpy_scalar(value):
    """CuPy's conversion of Python scalars (cupy/cuda/function.pyx, _pointer)."""
    if isinstance(value, np.generic):
        return value
    if isinstance(value, int):  # bool too, as in CuPy
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    if isinstance(value, complex):
        return np.complex128(value)
    raise LaunchError(f"unsupported kernel argument type {type(value).__name__}")


def _is_bits16(dt: np.dtype) -> bool:
    return dt.kind in "iu" and dt.itemsize == 2


def array_fits(p: Param, dt: np.dtype) -> bool:
    if p.kind == "v" or (p.kind in "iu" and p.size == 1):
        return True
    if p.kind == "o":
        return p.size % dt.itemsize == 0
    if p.kind == "h":
        return dt == np.float16 or _is_bits16(dt)
    if p.kind == "b":
        return dt.name == "bfloat16" or _is_bits16(dt)
    if p.kind == "?":
        return dt.itemsize == 1
    same_family = dt.kind == "f" if p.kind == "f" else dt.kind in "iu"
    return same_family and dt.itemsize == p.size


def scalar_fits(p: Param, dt: np.dtype) -> bool:
    if dt.itemsize != p.size:
        return False
    if p.kind == "o":
        return True
    if p.kind in "hb":
        return array_fits(p, dt)
    return {"f": dt.kind == "f", "?": dt.kind == "b"}.get(p.kind, dt.kind in "iu")


def example_dtype(p: Param) -> str:
    if p.kind == "f":
        return {4: "float32", 8: "float64"}.get(p.size, "float32")
    if p.kind in "iu":
        return f"{'int' if p.kind == 'i' else 'uint'}{8 * p.size}"
    return {"h": "float16", "b": "uint16", "?": "bool"}.get(p.kind, "uint8")
