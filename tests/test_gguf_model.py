"""GGUF files run in their own formats, checked against transformers loading the same file.

Tiny random llamas are written as GGUF by the tests: every block format (q8_0, q4_0, q4_1, q5_0
through gguf's quantizer; q5_1 and the K-quants from random blocks with sane scales), a mix
like llama.cpp's Q4_K_M, and float formats with q, k, v in different formats (so they run
unfused). Through the reference backend the logits match transformers within 1e-4 and greedy
tokens are identical; through the C kernels (int8 activations at decode: two layers for a few
rows, one for more) teacher-forced argmax and perplexity agree within the issue's bounds.
"""

import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM

import pyllm
from pyllm import PyllmError
from pyllm.backends import cpu_kernels, cpu_layers, cpu_quant
from pyllm.backends.cpu import TWO_LAYER_ROWS
from pyllm.formats import FORMATS
from pyllm.weights import QuantizedMatrix
from pyllm.benchmarks.quant_bench import QUALITY_TEXT, decode_teacher_forced, perplexity, rss_growth
from conftest import SHARED, needs_shared
from test_gguf import gpt2_vocab, hf_weights, write_gguf

HIDDEN, HEADS, KV_HEADS, FFN = 256, 4, 2, 512  # rows of 256: the K-quants' super-block
WEIGHT_STD = 0.15  # large enough that the logits are far from uniform
# q and k at a third of that: random q.k scores would otherwise be far more peaked than a trained
# model's (each attention a near-argmax over keys, where int8 activations flip the choice)
QK_STD = 0.05
# scale fields (f16) of the formats made from random blocks: byte offset, and for the min the
# multiple of d that centres the weights around zero
SCALE_FIELDS = {"q5_1": [(0, None), (2, -16.0)], "q4_k": [(0, None), (2, 7.5)], "q5_k": [(0, None), (2, 15.5)],
                "q6_k": [(208, None)]}
Q4_K_M_LIKE = {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_0, "ffn_gate": Q.Q4_K,
               "ffn_up": Q.Q5_0, "ffn_down": Q.Q6_K, "token_embd": Q.Q8_0, "output": Q.Q6_K}
FLOATS_UNFUSED = {"attn_q": Q.F16, "attn_k": Q.BF16, "attn_v": Q.F32, "attn_output": Q.BF16, "ffn_gate": Q.F16,
                  "ffn_up": Q.Q8_0, "ffn_down": Q.F32, "token_embd": Q.F16, "output": Q.F32}
VARIANTS = {**{name: {} for name in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")},
            "q4_k_m-like": Q4_K_M_LIKE, "floats-unfused": FLOATS_UNFUSED}


def random_blocks(qtype, rows, cols, rng, target):
    """uint8 [rows, row bytes] of random blocks, scales set so the weights have that std."""
    fmt = FORMATS[qtype.name.lower()]
    blocks = rng.integers(0, 256, (rows, cols // fmt.block_size, fmt.block_bytes), dtype=np.uint8)

    def set_scales(d):
        for offset, min_multiple in SCALE_FIELDS[fmt.name]:
            value = d if min_multiple is None else d * min_multiple
            blocks[..., offset:offset + 2] = np.float16(value).reshape(1).view(np.uint8)
    set_scales(1.0)
    std = fmt.dequantize(blocks.reshape(rows, -1)).std()
    set_scales(target / std)
    return blocks.reshape(rows, -1)


def encoder(variant, seed):
    """encode(gguf name, f32 value) -> (raw, type) for write_gguf: the variant's type per tensor kind."""
    rng = np.random.default_rng(seed)

    def encode(name, value):
        if value.ndim == 1:
            return value, Q.F32
        kind = name.split(".")[-2]
        qtype = VARIANTS[variant].get(kind, Q[variant.upper()] if variant in FORMATS else Q.F32)
        std = QK_STD if kind in ("attn_q", "attn_k") else WEIGHT_STD
        if qtype.name.lower() in SCALE_FIELDS:
            return random_blocks(qtype, *value.shape, rng, std), qtype
        value = value * np.float32(std / WEIGHT_STD)
        if qtype == Q.BF16:
            return FORMATS["bf16"].quantize(value), qtype
        return gguf.quants.quantize(value, qtype), qtype
    return encode


def write_tiny_gguf(directory, variant):
    """A tiny random llama in one of VARIANTS' formats (q4_0's embedding tied) -> its GGUF path."""
    vocab = gpt2_vocab()
    weights = hf_weights(len(vocab["tokens"]), tied=variant == "q4_0", seed=3, hidden=HIDDEN, heads=HEADS,
                         kv_heads=KV_HEADS, ffn=FFN, scale=WEIGHT_STD)
    return write_gguf(directory / f"{variant}.gguf", vocab, weights, heads=HEADS, kv_heads=KV_HEADS,
                      encode=encoder(variant, seed=4))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny_gguf(request, tmp_path_factory):
    """(GGUF path, transformers' model loaded from that file) for one variant."""
    path = write_tiny_gguf(tmp_path_factory.mktemp(request.param), request.param)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    return path, reference


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def sampled_text(model, length=160, seed=0):
    """Tokens the model itself samples at temperature 1: a text it finds plausible."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(torch.tensor([[1, 5, 40]]), do_sample=True, top_k=0, max_new_tokens=length - 3,
                             min_new_tokens=length - 3, pad_token_id=2)
    return out[0].tolist()


def test_weights_stay_in_their_formats(tiny_gguf):
    path, _ = tiny_gguf
    llm = pyllm.LLM(str(path), backend="reference", show_progress=False)
    layer = llm.model.weights.layers[0]
    if path.stem == "floats-unfused":
        assert isinstance(layer.qkv, tuple) and [p.format.name for p in layer.qkv[:2]] == ["f16", "bf16"]
        assert isinstance(layer.qkv[2], np.ndarray) and layer.qkv[2].dtype == np.float32
    elif path.stem in FORMATS:
        assert isinstance(layer.qkv, QuantizedMatrix) and layer.qkv.format.name == path.stem  # q | k | v fused
        assert layer.qkv.shape == ((HEADS + 2 * KV_HEADS) * HIDDEN // HEADS, HIDDEN)
        assert layer.qkv.data.nbytes == layer.qkv.shape[0] * FORMATS[path.stem].row_bytes(HIDDEN)


def test_reference_backend_matches_transformers(tiny_gguf):
    path, reference = tiny_gguf
    llm = pyllm.LLM(str(path), backend="reference", show_progress=False)
    prompt = [1, 5, 40, 77, 200, 290, 3, 9, 120, 260, 2, 17]
    np.testing.assert_allclose(llm.score(prompt), hf_logits(reference, prompt), atol=1e-4, rtol=0)
    ours = llm.generate(prompt, max_tokens=16, temperature=0, ignore_eos=True).token_ids
    # greedy: each of our tokens is transformers' argmax given the same text (or ties it within float error)
    logits = hf_logits(reference, prompt + ours)[len(prompt) - 1:-1]  # [16, vocab]: what predicts each token
    assert np.all(logits[np.arange(16), ours] >= logits.max(-1) - 1e-4), (ours, logits.argmax(-1).tolist())


def test_cpu_kernels_agree_with_transformers(tiny_gguf):
    """Decode step by step through the C kernels (teacher-forced on a text the model sampled).
    One sequence (its activations as two int8 layers): argmax agreement >= 99% and perplexity
    within 0.5%. Five at once (one int8 layer, llama.cpp's Q8 scheme, where a step is compute-
    bound): >= 94% and 1%, since these random models' top two logits are often closer than a
    trained model's. A prompt (the dequantizing GEMM): ~exact. With AVX2 alone the same layers
    (avx2.c), and the prompt's strips dequantized by avx2.c for BLAS."""
    if not cpu_kernels.kernels_available():
        pytest.skip("no C compiler or neither AVX2 nor AVX-512 here: the CPU backend is the reference")
    path, reference = tiny_gguf
    llm = pyllm.LLM(str(path), backend="cpu", show_progress=False)
    ids = sampled_text(reference)
    expected = hf_logits(reference, ids)
    assert perplexity(expected, ids) < 0.5 * expected.shape[1]  # the text is far from uniform under the model
    for copies, agreement, ppl in ((1, 0.99, 0.005), (TWO_LAYER_ROWS + 1, 0.94, 0.01)):
        ours = decode_teacher_forced(llm, ids, copies)
        assert (ours.argmax(-1) == expected.argmax(-1)).mean() >= agreement, copies
        assert abs(perplexity(ours, ids) / perplexity(expected, ids) - 1) <= ppl, copies
    prompt_logits = llm.score(ids[:64])
    np.testing.assert_allclose(prompt_logits, expected[:64], atol=2e-3 * np.abs(expected[:64]).max(), rtol=0)


def test_unsupported_tensor_type_is_one_line(tmp_path):
    vocab = gpt2_vocab()
    weights = hf_weights(len(vocab["tokens"]), tied=True, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, ffn=FFN)

    def encode(name, value):
        if name == "blk.1.ffn_down.weight":
            return np.zeros((value.shape[0], value.shape[1] // 256 * 84), np.uint8), Q.Q2_K
        return (value, Q.F32)
    path = write_gguf(tmp_path / "q2k.gguf", vocab, weights, heads=HEADS, kv_heads=KV_HEADS, encode=encode)
    with pytest.raises(PyllmError, match=r"'blk\.1\.ffn_down\.weight'.*Q2_K") as err:
        pyllm.LLM(str(path), show_progress=False)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def smollm2_gguf():
    from pyllm.pull import fetch_gguf
    return fetch_gguf()


def test_smollm2_q4_1_runs_natively_and_knows_paris(smollm2_gguf):
    llm = pyllm.LLM(str(smollm2_gguf), show_progress=False)
    weights = llm.model.weights
    assert weights.embed.format.name == "q8_0" and weights.layers[0].qkv.format.name == "q4_1"
    assert weights.lm_head is weights.embed  # tied, and kept in Q8_0
    chat = llm.chat_session()
    answer = "".join(chat.send("What is the capital of France?"))
    assert "Paris" in answer, answer


def test_peak_memory_of_the_q4_1_file_is_near_its_size(smollm2_gguf):
    """Peak RSS after a short generate, minus that of a bare `import pyllm`: <= 1.2 x file + 50 MB."""
    grown, limit = rss_growth(smollm2_gguf), 1.2 * smollm2_gguf.stat().st_size + 50e6
    assert grown <= limit, f"RSS grew {grown / 1e6:.0f} MB, limit {limit / 1e6:.0f} MB"


def test_all_layers_in_one_call_match_the_ops_bit_for_bit(tiny_gguf):
    """CpuBackend.decoder_layers (kernels/cpu/layers.c) against the same kernels called op by op:
    identical logits for a ragged batch of decode steps, q|k|v in three formats included (f16, bf16
    and f32 parts: the 16-bit kernels inside the one call)."""
    if not cpu_kernels.kernels_available():
        pytest.skip("no C compiler or neither AVX2 nor AVX-512 here: the CPU backend is the reference")
    path, _ = tiny_gguf
    llm = pyllm.LLM(str(path), backend="cpu", show_progress=False)

    def decode_logits():
        caches = [llm.model.new_cache(64) for _ in range(3)]
        for i, cache in enumerate(caches):
            llm.model.forward([(cache, list(range(10 + i, 30 + 3 * i)))])
        return np.concatenate([llm.model.forward([(c, [40 + j + i]) for i, c in enumerate(caches)]) for j in range(4)])
    fused = decode_logits()
    llm.backend.decoder_layers = lambda x, step, layers: None
    np.testing.assert_array_equal(decode_logits(), fused)
    # every matrix (or part) has a kernel here, so the fused path ran (bf16 needs AVX512_BF16)
    every_kernel = path.stem != "floats-unfused" or cpu_quant.takes_half(Q.BF16)
    assert (cpu_layers.layer_table(llm.model.weights.layers) is not None) == every_kernel


STORY_GGUF = SHARED / "models" / "story-gguf"


@needs_shared
@pytest.mark.parametrize("name", ["f32", "q8_0", "q4_0", "q4_1"])
def test_story_model_written_by_llama_cpp(name):
    """The story model as llama.cpp itself wrote and quantized it (../shared, no one here wrote these
    files): the reference backend within 1e-4 of transformers on the same file; the C kernels'
    teacher-forced decode within the same bounds as the random models."""
    path = STORY_GGUF / f"story-{name}.gguf"
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    llm = pyllm.LLM(str(path), backend="reference", show_progress=False)
    ids = llm.tokenizer.encode(QUALITY_TEXT.read_text())[:400]
    expected = hf_logits(reference, ids)
    np.testing.assert_allclose(llm.score(ids), expected, atol=1e-4, rtol=0)
    if cpu_kernels.kernels_available():
        cpu = pyllm.LLM(str(path), backend="cpu", show_progress=False)
        ours = decode_teacher_forced(cpu, ids)
        assert (ours.argmax(-1) == expected.argmax(-1)).mean() >= 0.99
        assert abs(perplexity(ours, ids) / perplexity(expected, ids) - 1) <= 0.005


def small_gguf(path, extra=None, encode=None):
    vocab = gpt2_vocab()
    weights = hf_weights(len(vocab["tokens"]), tied=True, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, ffn=FFN)
    return write_gguf(path, vocab, weights, heads=HEADS, kv_heads=KV_HEADS, extra=extra,
                      encode=encode or (lambda name, value: (value, Q.F32)))


@pytest.mark.parametrize("extra,message", [
    ({"feed_forward_length": 256}, r"'blk\.0\.ffn_gate\.weight' has shape \[512, 256\], but the file's metadata makes it \[256, 256\]"),
    ({"head_count_kv": 1}, r"'blk\.0\.attn_k\.weight' has shape \[128, 256\].*\[64, 256\]"),
    ({"head_count": 0}, "llama.attention.head_count must be a positive integer, found 0"),
])
def test_metadata_that_contradicts_the_tensors_is_one_line(tmp_path, extra, message):
    """The kernels size their buffers from the metadata: a file whose tensors disagree is refused
    before any is read (it would otherwise overrun them)."""
    path = small_gguf(tmp_path / "bad.gguf", extra)
    with pytest.raises(PyllmError, match=message) as err:
        pyllm.LLM(str(path), show_progress=False)
    assert "\n" not in str(err.value)


def test_corrupt_header_fields_are_one_line(tmp_path):
    data = bytearray(small_gguf(tmp_path / "good.gguf").read_bytes())
    huge = bytearray(data)
    huge[16:24] = (2 ** 60).to_bytes(8, "little")  # the metadata count
    (tmp_path / "huge.gguf").write_bytes(huge)
    with pytest.raises(PyllmError, match="not a valid GGUF file"):
        pyllm.LLM(str(tmp_path / "huge.gguf"), show_progress=False)
    key = b"general.alignment"  # a header by hand: no tensors, one item, general.alignment = 0 (u32)
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 0)
    (tmp_path / "align.gguf").write_bytes(header)
    with pytest.raises(PyllmError, match="general.alignment is 0"):
        pyllm.LLM(str(tmp_path / "align.gguf"), show_progress=False)


def test_f32_gguf_runs_in_16_bits_on_the_cuda_emulator(tmp_path):
    path = small_gguf(tmp_path / "f32.gguf")
    llm = pyllm.LLM(str(path), backend="cuda-emu", dtype="f16", show_progress=False)
    assert llm.model.weights.embed.dtype == np.float16
    reference = pyllm.LLM(str(path), backend="reference", show_progress=False)
    prompt = [1, 5, 40, 77]
    np.testing.assert_allclose(llm.score(prompt), reference.score(prompt), atol=0.05, rtol=0)
