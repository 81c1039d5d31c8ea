"""The one registry of weight storage formats: plain floats and llama.cpp's GGML block formats.

A stored weight matrix is 2-D: f32 -> float32 [rows, cols]; f16 -> float16 [rows, cols];
bf16 -> uint16 raw bits [rows, cols]; a block format -> uint8 [rows, cols // block_size * block_bytes],
the bytes gguf.GGUFReader hands back for that type (little-endian). Each row is a run of blocks;
a block holds `block_size` weights in `block_bytes` bytes. Layouts follow ggml-common.h as the
`gguf` package's quants.py decodes them; every dequantizer here matches gguf.quants bit for bit.

Dequantizers take [..., row_bytes] (or [..., cols] for the float formats) and return f32 [..., cols];
quantizers take f32 [..., cols] and return the stored form.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QType

from .dtypes import bf16_bits_to_f32, f32_to_bf16_bits
from .errors import PyllmError

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class Format:
    name: str  # "q4_1"
    block_size: int  # weights per block (1 for f32/f16/bf16)
    block_bytes: int  # bytes per block
    gguf_type: int  # GGMLQuantizationType value
    dequantize: Callable[[np.ndarray], np.ndarray]  # stored [..., row_bytes-or-cols] -> f32 [..., cols]
    quantize: Callable[[np.ndarray], np.ndarray] | None  # f32 [..., cols] -> stored; None: no quantizer here
    description: str  # one line for the README table

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_size

    def row_bytes(self, cols: int) -> int:
        """Bytes one stored row of `cols` weights takes."""
        if cols % self.block_size:
            raise PyllmError(f"a {self.name} row of {cols} weights is not a whole number of "
                             f"{self.block_size}-weight blocks")
        return cols // self.block_size * self.block_bytes

    def storage_dtype(self) -> np.dtype:
        """NumPy dtype of the stored array: float32, float16, uint16 (bf16 bits) or uint8 (blocks)."""
        return np.dtype({"f32": np.float32, "f16": np.float16, "bf16": np.uint16}.get(self.name, np.uint8))


# ---- helpers ------------------------------------------------------------------------------------

def _blocks(data: np.ndarray, block_bytes: int) -> np.ndarray:
    """uint8 [..., row_bytes] -> uint8 [..., n_blocks, block_bytes]."""
    data = np.ascontiguousarray(data).view(np.uint8)
    if data.shape[-1] % block_bytes:
        raise PyllmError(f"{data.shape[-1]} bytes per row is not a whole number of {block_bytes}-byte blocks")
    return data.reshape(*data.shape[:-1], -1, block_bytes)


def _rows(blocks: np.ndarray) -> np.ndarray:
    """[..., n_blocks, k] -> [..., n_blocks * k]: blocks laid end to end again."""
    return blocks.reshape(*blocks.shape[:-2], -1)


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] (a little-endian f16) -> f32 [..., 1]."""
    return np.ascontiguousarray(two_bytes).view("<f2").astype(np.float32)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """f32 [..., 1] -> uint8 [..., 2], the value rounded to f16."""
    return x.astype("<f2").view(np.uint8)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., n] -> uint8 [..., 2n]: all low nibbles, then all high nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [..., 2n] of 4-bit values -> uint8 [..., n]: first half in low nibbles, second in high."""
    half = q.shape[-1] // 2
    return (q[..., :half] & 0x0F) | ((q[..., half:] & 0x0F) << 4)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """f32 [...] -> f32 [...], rounded to the nearest integer with ties away from zero (C's roundf)."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + (a - whole >= 0.5))


def _inverse(d: np.ndarray) -> np.ndarray:
    """f32 [...] -> f32 [...]: 1/d, and 0 where d is 0."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _to_blocks(x: np.ndarray, block_size: int, name: str) -> np.ndarray:
    """f32 [..., cols] -> f32 [..., n_blocks, block_size]."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % block_size:
        raise PyllmError(f"can't quantize rows of {x.shape[-1]} weights to {name}: "
                         f"not a multiple of its block size {block_size}")
    return x.reshape(*x.shape[:-1], -1, block_size)


def _signed_absmax(b: np.ndarray) -> np.ndarray:
    """f32 [..., n_blocks, 32] -> f32 [..., n_blocks, 1]: the element of largest magnitude, sign kept."""
    return np.take_along_axis(b, np.abs(b).argmax(axis=-1, keepdims=True), axis=-1)


# ---- float formats ------------------------------------------------------------------------------

def _as(data: np.ndarray, dtype: str) -> np.ndarray:
    """[..., cols] of `dtype`, or raw uint8 [..., cols * itemsize] -> `dtype` [..., cols]."""
    data = np.asarray(data)
    return np.ascontiguousarray(data).view(dtype) if data.dtype == np.uint8 else data.astype(dtype, copy=False)


def _dequantize_f32(data):  # f32 [..., cols] -> f32 [..., cols]
    return _as(data, "<f4").astype(np.float32, copy=False)


def _dequantize_f16(data):  # f16 [..., cols] -> f32 [..., cols]
    return _as(data, "<f2").astype(np.float32)


def _dequantize_bf16(data):  # uint16 [..., cols] -> f32 [..., cols]
    return bf16_bits_to_f32(_as(data, "<u2"))


# ---- 32-weight block formats --------------------------------------------------------------------

def _dequantize_q8_0(data):  # uint8 [..., n*34] -> f32 [..., n*32]
    b = _blocks(data, 34)
    d, q = _f16(b[..., :2]), b[..., 2:].view(np.int8)
    return _rows(d * q.astype(np.float32))


def _quantize_q8_0(x):  # f32 [..., n*32] -> uint8 [..., n*34]
    b = _to_blocks(x, 32, "q8_0")
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    q = _round_half_away(b * _inverse(d)).astype(np.int8)
    return _rows(np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=-1))


def _dequantize_q4_0(data):  # uint8 [..., n*18] -> f32 [..., n*32]
    b = _blocks(data, 18)
    d, q = _f16(b[..., :2]), _nibbles(b[..., 2:]).astype(np.int8) - 8
    return _rows(d * q.astype(np.float32))


def _quantize_q4_0(x):  # f32 [..., n*32] -> uint8 [..., n*18]
    b = _to_blocks(x, 32, "q4_0")
    d = _signed_absmax(b) / np.float32(-8)  # the extreme weight maps to q = 0, i.e. -8
    q = np.clip(np.trunc(b * _inverse(d) + np.float32(8.5)), 0, 15).astype(np.uint8)
    return _rows(np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=-1))


def _dequantize_q4_1(data):  # uint8 [..., n*20] -> f32 [..., n*32]
    b = _blocks(data, 20)
    d, m, q = _f16(b[..., 0:2]), _f16(b[..., 2:4]), _nibbles(b[..., 4:])
    return _rows(d * q.astype(np.float32) + m)


def _quantize_q4_1(x):  # f32 [..., n*32] -> uint8 [..., n*20]
    b = _to_blocks(x, 32, "q4_1")
    lo, hi = b.min(axis=-1, keepdims=True), b.max(axis=-1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    q = np.clip(np.trunc((b - lo) * _inverse(d) + np.float32(0.5)), 0, 15).astype(np.uint8)
    return _rows(np.concatenate([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], axis=-1))


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh uint8 [..., 4] (bit i = high bit of weight i), qs uint8 [..., 16] -> uint8 [..., 32] in 0..31."""
    return _nibbles(qs) | (np.unpackbits(qh, axis=-1, bitorder="little") << 4)


def _dequantize_q5_0(data):  # uint8 [..., n*22] -> f32 [..., n*32]
    b = _blocks(data, 22)
    d, q = _f16(b[..., :2]), _five_bit(b[..., 2:6], b[..., 6:]).astype(np.int8) - 16
    return _rows(d * q.astype(np.float32))


def _quantize_q5_0(x):  # f32 [..., n*32] -> uint8 [..., n*22]
    b = _to_blocks(x, 32, "q5_0")
    d = _signed_absmax(b) / np.float32(-16)
    q = np.clip(np.trunc(b * _inverse(d) + np.float32(16.5)), 0, 31).astype(np.uint8)
    qh = np.packbits(q >> 4, axis=-1, bitorder="little")  # [..., n, 4]
    return _rows(np.concatenate([_f16_bytes(d), qh, _pack_nibbles(q)], axis=-1))


def _dequantize_q5_1(data):  # uint8 [..., n*24] -> f32 [..., n*32]
    b = _blocks(data, 24)
    d, m, q = _f16(b[..., 0:2]), _f16(b[..., 2:4]), _five_bit(b[..., 4:8], b[..., 8:])
    return _rows(d * q.astype(np.float32) + m)


# ---- K-quants: 256-weight super-blocks ----------------------------------------------------------

def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of q4_k/q5_k, uint8 [..., 12] -> 6-bit (scales, mins), each f32 [..., 8, 1].

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; bytes 8-11 hold the low
    4 bits of scales 4-7 (low nibble) and of mins 4-7 (high nibble), whose top 2 bits are the
    spare top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    sc_lo, mn_lo, extra = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scales = np.concatenate([sc_lo & 0x3F, (extra & 0x0F) | ((sc_lo >> 6) << 4)], axis=-1)
    mins = np.concatenate([mn_lo & 0x3F, (extra >> 4) | ((mn_lo >> 6) << 4)], axis=-1)
    return scales.astype(np.float32)[..., None], mins.astype(np.float32)[..., None]


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [..., 128] -> uint8 [..., 8, 32]: each 32-byte chunk j gives sub-block 2j (low) and 2j+1 (high)."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=-2).reshape(*qs.shape[:-1], 8, 32)


def _dequantize_q4_k(data):  # uint8 [..., n*144] -> f32 [..., n*256]
    b = _blocks(data, 144)
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]  # [..., n, 1, 1]
    scales, mins = _k_scales_mins(b[..., 4:16])
    q = _k_nibbles(b[..., 16:]).astype(np.float32)  # [..., n, 8, 32]
    return _rows(_rows((d * scales) * q - dmin * mins))


def _dequantize_q5_k(data):  # uint8 [..., n*176] -> f32 [..., n*256]
    b = _blocks(data, 176)
    d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]  # [..., n, 1, 1]
    scales, mins = _k_scales_mins(b[..., 4:16])
    qh = (b[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # [..., n, 8, 32]: bit i -> sub-block i
    q = (_k_nibbles(b[..., 48:]) | (qh << 4)).astype(np.float32)
    return _rows(_rows((d * scales) * q - dmin * mins))


def _dequantize_q6_k(data):  # uint8 [..., n*210] -> f32 [..., n*256]
    b = _blocks(data, 210)
    lead = b.shape[:-1]
    # Two halves of 128 weights. Per half: 64 ql bytes give weights 0-63 (low nibbles) and 64-127
    # (high nibbles); 32 qh bytes give 2 high bits to weights 32*s + k from bits 2s..2s+1 of byte k.
    ql = _nibbles(b[..., 0:128].reshape(*lead, 2, 64))  # [..., n, 2, 128]
    qh = (b[..., 128:192].reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    q = (ql | (qh.reshape(*lead, 2, 128) << 4)).astype(np.int8) - 32  # [..., n, 2, 128]
    scales = b[..., 192:208].view(np.int8).astype(np.float32)[..., None]  # [..., n, 16, 1], one per 16 weights
    d = _f16(b[..., 208:210])[..., None]  # [..., n, 1, 1]
    return _rows(_rows((d * scales) * q.reshape(*lead, 16, 16).astype(np.float32)))


# ---- the registry -------------------------------------------------------------------------------

def _quantize_f32(x):  # f32 [..., cols] -> f32 [..., cols]
    return np.asarray(x).astype(np.float32, copy=False)


def _quantize_f16(x):  # f32 [..., cols] -> f16 [..., cols]
    return np.asarray(x).astype(np.float16)


def _quantize_bf16(x):  # f32 [..., cols] -> uint16 [..., cols], round to nearest even
    return f32_to_bf16_bits(np.asarray(x, dtype=np.float32))


_TABLE = [  # name, block_size, block_bytes, gguf type, dequantize, quantize, description
    ("f32", 1, 4, QType.F32, _dequantize_f32, _quantize_f32, "32-bit IEEE float"),
    ("f16", 1, 2, QType.F16, _dequantize_f16, _quantize_f16, "16-bit IEEE half"),
    ("bf16", 1, 2, QType.BF16, _dequantize_bf16, _quantize_bf16, "bfloat16: the top 16 bits of an f32"),
    ("q8_0", 32, 2 + 32, QType.Q8_0, _dequantize_q8_0, _quantize_q8_0,
     "32 weights: f16 scale d, 8-bit signed q; w = d*q"),
    ("q4_0", 32, 2 + 16, QType.Q4_0, _dequantize_q4_0, _quantize_q4_0,
     "32 weights: f16 scale d, 4-bit q; w = d*(q - 8)"),
    ("q4_1", 32, 2 + 2 + 16, QType.Q4_1, _dequantize_q4_1, _quantize_q4_1,
     "32 weights: f16 scale d, f16 min m, 4-bit q; w = d*q + m"),
    ("q5_0", 32, 2 + 4 + 16, QType.Q5_0, _dequantize_q5_0, _quantize_q5_0,
     "32 weights: f16 scale d, 5-bit q (high bits packed apart); w = d*(q - 16)"),
    ("q5_1", 32, 2 + 2 + 4 + 16, QType.Q5_1, _dequantize_q5_1, None,
     "32 weights: f16 scale d, f16 min m, 5-bit q; w = d*q + m"),
    ("q4_k", QK_K, 2 + 2 + 12 + QK_K // 2, QType.Q4_K, _dequantize_q4_k, None,
     "256 weights: f16 d, dmin; 8 x 6-bit scale s, min m; 4-bit q; w = d*s*q - dmin*m"),
    ("q5_k", QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2, QType.Q5_K, _dequantize_q5_k, None,
     "256 weights: f16 d, dmin; 8 x 6-bit scale s, min m; 5-bit q; w = d*s*q - dmin*m"),
    ("q6_k", QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2, QType.Q6_K, _dequantize_q6_k, None,
     "256 weights: f16 d; 16 x 8-bit signed scale s; 6-bit q; w = d*s*(q - 32)"),
]

FORMATS: dict[str, Format] = {row[0]: Format(row[0], row[1], row[2], int(row[3]), *row[4:]) for row in _TABLE}
_BY_GGUF_TYPE = {f.gguf_type: f for f in FORMATS.values()}
QUANTIZE_CHOICES = ("q8_0", "q4_0", "q4_1", "bf16")  # what --quantize offers


def format_named(name: str) -> Format:
    """The format called `name` ("q4_0"); PyllmError listing the supported ones otherwise."""
    if name not in FORMATS:
        raise PyllmError(f"unknown weight format {name!r}; supported: {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of_gguf_type(gguf_type: int, tensor_name: str) -> Format:
    """The format of a GGUF tensor's GGMLQuantizationType; PyllmError naming the tensor otherwise."""
    if gguf_type in _BY_GGUF_TYPE:
        return _BY_GGUF_TYPE[gguf_type]
    try:
        type_name = QType(gguf_type).name
    except ValueError:
        type_name = f"#{gguf_type} (unknown)"
    supported = ", ".join(f.name.upper() for f in FORMATS.values())
    raise PyllmError(f"GGUF tensor {tensor_name!r} has type {type_name}, which pyllm does not run; "
                     f"supported: {supported}")
