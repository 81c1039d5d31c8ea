"""A GGUF file's header read straight from disk: metadata as plain Python, and where each tensor's
bytes are, without mapping the file.

Why not gguf.GGUFReader here: it builds NumPy views of every metadata item (two per vocabulary
string, ~200k for a 49k vocabulary), which costs more memory than a 4-bit 135M model's weights.
This reader keeps only what a load needs; tensors are then read with one readinto each
(gguf_model.py). The converter and the tests still use GGUFReader.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata
count; each metadata item a string key, u32 value type and value; each tensor a string name, u32
dims, u64 extent per dim (fastest first), u32 GGML type, u64 offset into the data section, which
starts at the next multiple of general.alignment (32 by default) after the header.
"""

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PyllmError

MAGIC = b"GGUF"
# metadata value type -> NumPy dtype of the scalar (8 string, 9 array are read apart)
SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
           12: "<f8"}
BOOL, STRING, ARRAY = 7, 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    gguf_type: int
    shape: tuple[int, ...]  # GGUF's order: the fastest-moving axis first
    offset: int             # of its first byte in the file


class _Truncated(Exception):
    """The header goes on past the bytes read so far."""


class _Cursor:
    """Reads little-endian values from a bytes-like header, advancing."""

    def __init__(self, data, path, size):
        self.data, self.at, self.path, self.size = data, 0, path, size  # size: the file's bytes

    def take(self, n: int):
        if n > self.size:  # a corrupt length: never read the whole file chasing it
            raise PyllmError(f"{self.path} is not a valid GGUF file (a header length of {n} bytes)")
        if self.at + n > len(self.data):
            raise _Truncated
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def scalar(self, kind: int):
        dtype = np.dtype(SCALARS[kind])
        value = np.frombuffer(self.take(dtype.itemsize), dtype)[0].item()
        return bool(value) if kind == BOOL else value

    def string(self) -> str:
        return bytes(self.take(self.scalar(10))).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_kind, count = self.scalar(4), self.scalar(10)
            if count > self.size:
                raise PyllmError(f"{self.path} is not a valid GGUF file (an array of {count} items)")
            if item_kind == STRING:
                return [self.string() for _ in range(count)]
            if item_kind in SCALARS:
                dtype = np.dtype(SCALARS[item_kind])
                values = np.frombuffer(self.take(dtype.itemsize * count), dtype).tolist()
                return [bool(v) for v in values] if item_kind == BOOL else values
            return [self.value(item_kind) for _ in range(count)]
        if kind not in SCALARS:
            raise PyllmError(f"{self.path} is not a valid GGUF file (unknown metadata type {kind})")
        return self.scalar(kind)


def read_header(path) -> tuple[dict, list[TensorInfo]]:
    """(metadata {key: str | int | float | bool | list}, tensors in file order) of a GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise PyllmError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] != MAGIC:
            raise PyllmError(f"{path} is not a valid GGUF file (no GGUF magic)")
        version, n_tensors, n_fields = struct.unpack("<IQQ", head[4:])
        if version not in (2, 3):
            raise PyllmError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        size, chunk = path.stat().st_size, 1 << 20
        data = bytearray()
        while True:  # the header is read in growing chunks until it parses
            data += f.read(chunk - len(data))
            try:
                return _parse(_Cursor(memoryview(data), path, size), n_tensors, n_fields, size)
            except _Truncated:
                if 24 + len(data) >= size:
                    raise PyllmError(f"{path} is not a valid GGUF file (its header ends early)") from None
                chunk *= 4


def _parse(cursor, n_tensors, n_fields, size):
    if max(n_fields, n_tensors) > size:
        raise PyllmError(f"{cursor.path} is not a valid GGUF file ({n_fields} metadata items, {n_tensors} tensors)")
    meta = {}
    for _ in range(n_fields):
        key = cursor.string()
        meta[key] = cursor.value(cursor.scalar(4))
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = cursor.scalar(4)
        shape = tuple(cursor.scalar(10) for _ in range(dims))
        infos.append((name, cursor.scalar(4), shape, cursor.scalar(10)))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise PyllmError(f"{cursor.path} is not a valid GGUF file (general.alignment is {alignment!r})")
    start = -(-(24 + cursor.at) // alignment) * alignment
    tensors = [TensorInfo(name, kind, shape, start + offset) for name, kind, shape, offset in infos]
    if any(t.offset > size for t in tensors):
        raise PyllmError(f"{cursor.path} is not a valid GGUF file (a tensor lies past its end)")
    return meta, tensors
