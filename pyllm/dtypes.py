"""Storage dtypes as NumPy sees them: bf16 lives as raw uint16 bits, since NumPy has no bfloat16."""

import numpy as np

from .errors import PyllmError

# safetensors dtype tag -> (our name, NumPy storage dtype)
SAFETENSORS_DTYPES = {"F32": ("f32", np.float32), "F16": ("f16", np.float16), "BF16": ("bf16", np.uint16)}
STORAGE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}


def storage_dtype(name: str) -> np.dtype:
    if name not in STORAGE:
        raise PyllmError(f"unsupported dtype {name!r}; supported: {', '.join(STORAGE)}")
    return np.dtype(STORAGE[name])


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits -> float32 (exact: bf16 is the top half of an f32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bf16 bits, rounding to nearest even as torch and CUDA do; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(x), 0x7FC0, rounded).astype(np.uint16)


def convert(src: np.ndarray, src_dtype: str, dst_dtype: str) -> np.ndarray:
    """Change storage dtype; f32 is the hub every conversion passes through."""
    if src_dtype == dst_dtype:
        return src
    f32 = bf16_bits_to_f32(src) if src_dtype == "bf16" else src.astype(np.float32)
    if dst_dtype == "bf16":
        return f32_to_bf16_bits(f32)
    return f32.astype(STORAGE[dst_dtype])
