"""pyllm.formats against the gguf package: the same bits out of every dequantizer and quantizer."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from pyllm.errors import PyllmError
from pyllm.formats import FORMATS, QUANTIZE_CHOICES, Format, format_named, format_of_gguf_type

BLOCK_FORMATS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
FLOAT_FORMATS = ["f32", "f16", "bf16"]
QUANTIZED_HERE = ["q8_0", "q4_0", "q4_1", "q5_0", "bf16"]
# Byte offsets of each block's f16 scale fields (d, and the min/dmin where there is one), from ggml-common.h.
F16_FIELDS = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2],
              "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}


def qtype(name: str) -> Q:
    return Q[name.upper()]


def bits(x: np.ndarray) -> np.ndarray:
    """f32 [...] -> uint32 [...]: compare floats bit for bit (signed zeros and NaNs included)."""
    assert x.dtype == np.float32
    return np.ascontiguousarray(x).view(np.uint32)


def random_blocks(name: str, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, blocks_per_row * block_bytes]: random bytes with sane f16 scales in ±[1e-3, 1]."""
    rng = np.random.default_rng(seed)
    fmt = FORMATS[name]
    b = rng.integers(0, 256, size=(rows, blocks_per_row, fmt.block_bytes), dtype=np.uint8)
    for offset in F16_FIELDS[name]:
        scale = rng.choice([-1, 1], size=(rows, blocks_per_row)) * 10 ** rng.uniform(-3, 0, (rows, blocks_per_row))
        b[..., offset:offset + 2] = scale.astype("<f2")[..., None].view(np.uint8)
    return b.reshape(rows, -1)


def awkward_rows(cols: int = 256) -> np.ndarray:
    """f32 [9, cols]: normal data, zeros, large, negative-only, positive-only, tiny, ties, round-half points."""
    rng = np.random.default_rng(1)
    normal = rng.standard_normal(cols).astype(np.float32)
    ties = normal.copy()
    ties[1::32] = -np.abs(normal).max() * 2  # a block extreme that is negative ...
    ties[2::32] = np.abs(normal).max() * 2  # ... and a positive one of equal magnitude after it
    halves = np.tile(np.concatenate([[127.0], np.arange(31) - 15.5]), cols // 32)  # x * (1/d) lands on k + 0.5
    rows = [normal, np.zeros(cols), normal * 1e4, -np.abs(normal) - 0.5, np.abs(normal) + 3.0,
            normal * 1e-6, ties, halves, rng.uniform(-1, 1, cols) * np.repeat(10.0 ** rng.uniform(-3, 3, cols // 32), 32)]
    return np.stack(rows).astype(np.float32)


# ---- dequantize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BLOCK_FORMATS)
def test_dequantize_random_blocks_matches_gguf(name):
    data = random_blocks(name, rows=5, blocks_per_row=48)
    ours = FORMATS[name].dequantize(data)
    theirs = gguf_dequantize(data, qtype(name))
    assert ours.shape == theirs.shape == (5, 48 * FORMATS[name].block_size)
    assert np.all(np.isfinite(ours))
    np.testing.assert_array_equal(bits(ours), bits(theirs))


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_dequantize_gguf_quantized_normal_data(name):
    x = np.random.default_rng(2).standard_normal((7, 32 * 40)).astype(np.float32)
    data = gguf_quantize(x, qtype(name))
    np.testing.assert_array_equal(bits(FORMATS[name].dequantize(data)), bits(gguf_dequantize(data, qtype(name))))


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_dequantize_float_formats_match_gguf(name):
    fmt = FORMATS[name]
    raw = np.random.default_rng(3).integers(0, 256, size=(6, 64 * fmt.block_bytes), dtype=np.uint8)
    stored = raw.view(fmt.storage_dtype())  # every bit pattern, NaNs and infinities too
    theirs = gguf_dequantize(raw, qtype(name))
    np.testing.assert_array_equal(bits(fmt.dequantize(stored)), bits(theirs))
    np.testing.assert_array_equal(bits(fmt.dequantize(raw)), bits(theirs))  # raw bytes, as GGUFReader gives bf16


@pytest.mark.parametrize("name", BLOCK_FORMATS + FLOAT_FORMATS)
def test_dequantize_accepts_one_row_and_leading_dims(name):
    fmt = FORMATS[name]
    if fmt.block_size == 1:
        data = format_named(name).quantize(np.random.default_rng(4).standard_normal((6, 512)).astype(np.float32))
    else:
        data = random_blocks(name, rows=6, blocks_per_row=512 // fmt.block_size, seed=4)
    full = fmt.dequantize(data)
    assert full.dtype == np.float32 and full.shape == (6, 512)
    np.testing.assert_array_equal(bits(fmt.dequantize(data[2])), bits(full[2]))
    np.testing.assert_array_equal(bits(fmt.dequantize(data.reshape(2, 3, -1))), bits(full.reshape(2, 3, 512)))


# ---- quantize -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", QUANTIZED_HERE)
def test_quantize_matches_gguf(name):
    x = awkward_rows()
    ours = FORMATS[name].quantize(x)
    theirs = gguf_quantize(x, qtype(name))
    assert ours.dtype == FORMATS[name].storage_dtype()
    assert ours.shape == (x.shape[0], FORMATS[name].row_bytes(x.shape[1]) // ours.itemsize)
    np.testing.assert_array_equal(ours.view(np.uint8), theirs.view(np.uint8))


def test_q8_0_rounds_halves_away_from_zero():
    x = np.concatenate([[127.0], np.arange(31) - 15.5]).astype(np.float32)[None]  # d = 1 exactly
    q = FORMATS["q8_0"].quantize(x)[0, 2:].view(np.int8)
    np.testing.assert_array_equal(q, np.concatenate([[127], np.where(x[0, 1:] < 0, np.floor(x[0, 1:]),
                                                                      np.ceil(x[0, 1:]))]))


def test_bf16_quantize_keeps_nan_and_infinity():
    x = np.array([[np.nan, -np.nan, np.inf, -np.inf, 3.4e38, 1.0]], dtype=np.float32)
    back = FORMATS["bf16"].dequantize(FORMATS["bf16"].quantize(x))
    assert np.isnan(back[0, :2]).all()
    np.testing.assert_array_equal(back[0, 2:], [np.inf, -np.inf, np.inf, 1.0])  # 3.4e38 rounds up past bf16's max


def test_float_quantizers():
    x = awkward_rows()
    np.testing.assert_array_equal(FORMATS["f32"].quantize(x), x)
    assert FORMATS["f16"].quantize(x).dtype == np.float16
    np.testing.assert_array_equal(FORMATS["f16"].quantize(x), x.astype(np.float16))


# Worst-case |error| / block's max |w|: half a step for rounding formats; a whole step for q4_0/q5_0,
# whose far end (q = 15 or 31) stops one step short of +max; plus f16 rounding of the scales.
TOLERANCE = {"q8_0": 0.5 / 127 + 2 ** -10, "q4_0": 1 / 8 + 2 ** -9, "q5_0": 1 / 16 + 2 ** -9,
             "q4_1": 1 / 15 + 2 ** -9, "bf16": 2 ** -8, "f16": 2 ** -11, "f32": 0.0}


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_round_trip_error_is_bounded(name):
    fmt = FORMATS[name]
    x = awkward_rows()[[0, 2, 3, 4, 6, 8]]  # skip the all-zero, the f16-subnormal and the exactly representable rows
    err = np.abs(fmt.dequantize(fmt.quantize(x)) - x).reshape(x.shape[0], -1, 32)
    block_max = np.abs(x).reshape(x.shape[0], -1, 32).max(axis=-1, keepdims=True)
    assert (err <= TOLERANCE[name] * block_max).all()
    if name != "f32":
        assert (err > TOLERANCE[name] * block_max / 4).any()  # the bound is not vacuous
    zeros = np.zeros((2, 64), np.float32)
    np.testing.assert_array_equal(fmt.dequantize(fmt.quantize(zeros)), zeros)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0"])
def test_quantize_rejects_partial_blocks(name):
    with pytest.raises(PyllmError, match="block"):
        FORMATS[name].quantize(np.ones((2, 48), np.float32))


# ---- registry -----------------------------------------------------------------------------------

def test_registry_matches_gguf_constants():
    assert list(FORMATS) == ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
    for name, fmt in FORMATS.items():
        assert isinstance(fmt, Format) and fmt.name == name
        assert fmt.gguf_type == qtype(name).value
        assert (fmt.block_size, fmt.block_bytes) == GGML_QUANT_SIZES[qtype(name)]
        assert format_of_gguf_type(fmt.gguf_type, "t") is fmt
        assert format_named(name) is fmt
        assert fmt.description and "\n" not in fmt.description
    assert {n for n, f in FORMATS.items() if f.quantize is None} == {"q5_1", "q4_k", "q5_k", "q6_k"}
    assert QUANTIZE_CHOICES == ("q8_0", "q4_0", "q4_1", "bf16")
    assert all(FORMATS[n].quantize is not None for n in QUANTIZE_CHOICES)


def test_storage_dtypes():
    expect = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}
    for name, fmt in FORMATS.items():
        assert fmt.storage_dtype() == np.dtype(expect.get(name, np.uint8))


def test_bits_per_weight():
    got = {n: FORMATS[n].bits_per_weight for n in ["f32", "bf16", "q4_0", "q8_0", "q4_1", "q5_0", "q4_k", "q5_k", "q6_k"]}
    assert got == {"f32": 32.0, "bf16": 16.0, "q4_0": 4.5, "q8_0": 8.5, "q4_1": 5.0, "q5_0": 5.5,
                   "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}


def test_row_bytes():
    assert FORMATS["q4_0"].row_bytes(4096) == 128 * 18
    assert FORMATS["q6_k"].row_bytes(512) == 2 * 210
    assert FORMATS["bf16"].row_bytes(7) == 14
    with pytest.raises(PyllmError, match="q4_k"):
        FORMATS["q4_k"].row_bytes(4096 + 32)
    with pytest.raises(PyllmError, match="100"):
        FORMATS["q8_0"].row_bytes(100)


def test_format_named_unknown():
    with pytest.raises(PyllmError) as info:
        format_named("q3_k")
    assert str(info.value) == ("unknown weight format 'q3_k'; supported: "
                               "f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k")


@pytest.mark.parametrize("qt", [Q.IQ2_XS, Q.Q2_K, Q.Q3_K, Q.Q8_1, Q.I32])
def test_format_of_gguf_type_unsupported(qt):
    with pytest.raises(PyllmError) as info:
        format_of_gguf_type(int(qt), "blk.0.attn_q.weight")
    assert str(info.value) == (f"GGUF tensor 'blk.0.attn_q.weight' has type {qt.name}, which pyllm does not run; "
                               "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K")


def test_format_of_gguf_type_unknown_number():
    with pytest.raises(PyllmError, match=r"'output.weight' has type #999"):
        format_of_gguf_type(999, "output.weight")


def test_gguf_file_round_trip(tmp_path):
    """What GGUFReader hands back for each type is what the format's dequantize takes."""
    rng = np.random.default_rng(5)
    stored = {}
    for name, fmt in FORMATS.items():
        if fmt.block_size == 1:
            stored[name] = fmt.quantize(rng.standard_normal((3, 512)).astype(np.float32))
        else:
            stored[name] = random_blocks(name, rows=3, blocks_per_row=512 // fmt.block_size, seed=6)
    path = tmp_path / "formats.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, data in stored.items():
        writer.add_tensor(name, data, raw_dtype=None if name in ("f32", "f16") else qtype(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = gguf.GGUFReader(str(path)).tensors
    assert len(tensors) == len(FORMATS)
    for t in tensors:
        fmt = format_of_gguf_type(int(t.tensor_type), t.name)
        assert fmt.name == t.name
        w = fmt.dequantize(t.data)
        assert w.shape == (3, 512)
        np.testing.assert_array_equal(bits(w), bits(fmt.dequantize(stored[t.name])))
        np.testing.assert_array_equal(bits(w), bits(gguf_dequantize(t.data, t.tensor_type).reshape(3, 512)))
