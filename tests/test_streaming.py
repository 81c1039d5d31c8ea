"""Streaming: IncrementalDetokenizer on real and byte-split tokenizers, stop strings in streamed
pieces, and engine streams that concatenate to the generated text."""

import dataclasses
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

from conftest import SHARED, needs_shared, write_byte_tokenizer
from pyllm import SamplingParams
from pyllm.sequence import Sequence
from pyllm.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. She said: \"Hello, world!\"",
    "def square(x):\n    return x ** 2  # fast\n\nprint([square(i) for i in range(10)])",
    "3.14159265358979 + 2.71828 = 5.85987; 1,000,000 items at $12.50",
    "我爱北京天安门，天安门上太阳升。机器学习很有趣！",
    "Emoji: 😀🎉👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷🇯🇵 done",
    "naïve café résumé — “quotes” and ‘single’ · ½ ≠ ∞",
    "  leading spaces,\ttabs\n\nand  double  spaces ",
]


def stream_text(tokenizer, prompt_ids, ids):
    """Feed ids one by one -> the list of pieces (the last one from flush)."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [detok.add(t) for t in ids] + [detok.flush()]


def random_texts(seed, count):
    rng = random.Random(seed)
    return rng, ["".join(rng.sample(TEXTS, rng.randint(1, 3))) for _ in range(count)]


# ---- byte-level BPE (SmolLM2, and a tokenizer with one token per byte) ----------------------

@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return Tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("bytes")
    write_byte_tokenizer(model_dir)
    return Tokenizer(model_dir)


def check_byte_level(tokenizer, seed):
    """Random texts split at a random token boundary: pieces == decode(generated ids), no U+FFFD."""
    rng, texts = random_texts(seed, 150)
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        boundaries = [i for i in range(len(ids)) if "\ufffd" not in tokenizer.decode(ids[:i])
                      and "\ufffd" not in tokenizer.decode(ids[i:])]
        cut = rng.choice(boundaries)
        for prompt in (ids[:cut], []):
            pieces = stream_text(tokenizer, prompt, ids[cut:])
            assert "".join(pieces) == tokenizer.decode(ids[cut:])
            assert not any("\ufffd" in p for p in pieces), pieces


def test_smollm2_pieces_equal_decode(smollm2_tokenizer):
    check_byte_level(smollm2_tokenizer, seed=1)


def test_byte_tokenizer_pieces_equal_decode(byte_tokenizer):
    check_byte_level(byte_tokenizer, seed=2)


def test_emoji_split_into_bytes_is_held_until_complete(byte_tokenizer):
    ids = byte_tokenizer.encode("a😀b", add_special_tokens=False)
    assert len(ids) == 6  # one token per byte
    assert stream_text(byte_tokenizer, [], ids) == ["a", "", "", "", "😀", "b", ""]


def test_random_ids_concatenate_to_decode(smollm2_tokenizer, byte_tokenizer):
    """Arbitrary token soup, invalid UTF-8 included: the pieces still add up to decode(ids)."""
    rng = np.random.default_rng(5)
    for tokenizer in (smollm2_tokenizer, byte_tokenizer):
        for _ in range(100):
            ids = rng.integers(0, tokenizer.vocab_size, size=rng.integers(1, 40)).tolist()
            assert "".join(stream_text(tokenizer, [], ids)) == tokenizer.decode(ids)


# ---- SentencePiece style: a leading space stripped by the decoder, byte fallback ------------

def write_spm_byte_fallback_tokenizer(model_dir, words=("the", "cat", "sat", "on", "mat", "a")):
    """Llama-style BPE: '▁' for spaces, byte fallback for everything outside a tiny vocabulary."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = []
    for word in ("▁" + w for w in words):
        for ch in word:
            vocab.setdefault(ch, len(vocab))
        for end in range(2, len(word) + 1):
            merges.append((word[:end - 1], word[end - 1]))
            vocab.setdefault(word[:end], len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def check_spm(tokenizer, texts, rng):
    """Pieces after a prompt == decode(prompt + generated) minus decode(prompt): the text a reader
    sees appended, leading space included."""
    checked = 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for cut in sorted(rng.sample(range(1, len(ids)), min(len(ids) - 1, 6))):
            before, whole = tokenizer.decode(ids[:cut]), tokenizer.decode(ids)
            if "\ufffd" in before or not whole.startswith(before):
                continue  # the prompt ends inside a character: no text of its own to append to
            pieces = stream_text(tokenizer, ids[:cut], ids[cut:])
            assert "".join(pieces) == whole[len(before):], (text, cut)
            assert "\ufffd" in whole or not any("\ufffd" in p for p in pieces)
            checked += 1
    assert checked > len(texts)


def test_spm_byte_fallback_pieces(tmp_path):
    write_spm_byte_fallback_tokenizer(tmp_path)
    tokenizer = Tokenizer(tmp_path)
    ids = tokenizer.encode("the cat 😀😀😀 sat", add_special_tokens=False)
    assert len(ids) > 14  # the emoji really are byte tokens
    rng, texts = random_texts(3, 40)
    check_spm(tokenizer, texts + ["the cat 😀😀😀 sat on the mat"] * 20, rng)


def test_spm_prompt_ending_in_several_split_emoji(tmp_path):
    """The context window must not start inside a character, or a byte-fallback run decodes to U+FFFD."""
    write_spm_byte_fallback_tokenizer(tmp_path)
    tokenizer = Tokenizer(tmp_path)
    prompt = tokenizer.encode("the cat 😀😀", add_special_tokens=False)
    generated = tokenizer.encode("😀😀", add_special_tokens=False)[1:]  # drop the '▁' the normalizer adds
    assert "".join(stream_text(tokenizer, prompt, generated)) == "😀😀"


@needs_shared
def test_story_tokenizer_pieces_keep_the_leading_space():
    tokenizer = Tokenizer(SHARED / "models" / "story")
    prompt = tokenizer.encode("Once upon a time")
    generated = [tokenizer.hf.token_to_id(t) for t in ("▁", "there▁was▁a▁", "little▁girl▁named▁", "Lily")]
    pieces = [p for p in stream_text(tokenizer, prompt, generated) if p]
    assert pieces[0] == " " and "".join(pieces) == " there was a little girl named Lily"
    rng, texts = random_texts(4, 60)
    check_spm(tokenizer, texts, rng)


# ---- stop strings, through a Sequence fed scripted tokens -----------------------------------

def scripted(tokenizer, text, params, prompt="Q:"):
    """Run a Sequence whose model 'chooses' the tokens of text -> (pieces, sequence)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    cache = SimpleNamespace(length=0, capacity=10**6)
    seq = Sequence(tokenizer.encode(prompt), params, cache, tokenizer, eos_ids=[])
    pieces = []
    for token in ids:
        logits = np.zeros(tokenizer.vocab_size, dtype=np.float32)
        logits[token] = 1.0
        pieces.append(seq.add_token_from(logits))
        if seq.finished:
            break
    return pieces, seq


@pytest.mark.parametrize("text,stop,expected", [
    ("The answer is 42. END of story.", ["END"], "The answer is 42. "),
    ("The answer is 42. END of story.", [". E", "story"], "The answer is 42"),
    ("one two three four", ["three", "two"], "one "),           # the earliest stop wins
    ("price: 12😀 euros", ["😀"], "price: 12"),                  # a stop made of split bytes
    ("ENDLESS END here", ["END "], "ENDLESS "),
])
def test_stop_strings(byte_tokenizer, smollm2_tokenizer, text, stop, expected):
    for tokenizer in (byte_tokenizer, smollm2_tokenizer):
        pieces, seq = scripted(tokenizer, text, SamplingParams(max_tokens=100, stop=stop))
        assert seq.finish_reason == "stop"
        assert seq.text == "".join(pieces) == expected
        shown = ""
        for piece in pieces:  # at no point does the stream show more than the final text
            shown += piece
            assert expected.startswith(shown)


def test_partial_stop_string_is_released(byte_tokenizer):
    """Text held back because it might start a stop string comes out once it cannot."""
    text = "EN then END? no: EN"
    pieces, seq = scripted(byte_tokenizer, text, SamplingParams(max_tokens=len(text), stop=["END!"]))
    assert seq.finish_reason == "length"
    assert "".join(pieces) == seq.text == text


# ---- the engine: stream() == generate() == decode -------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=1.0, seed=3, top_k=50)])
def test_stream_concatenates_to_generate_text(tiny_llm, kwargs):
    params = SamplingParams(max_tokens=40, ignore_eos=True, **kwargs)
    out = tiny_llm.generate("Hello, streaming world", params)
    pieces = list(tiny_llm.stream("Hello, streaming world", params))
    assert "".join(pieces) == out.text == tiny_llm.tokenizer.decode(out.token_ids)
    assert all(pieces)


@needs_shared
def test_story_model_stream_keeps_the_first_space():
    import pyllm
    llm = pyllm.LLM(str(SHARED / "models" / "story"), show_progress=False)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    for prompt in ("Once upon a time", "Once upon a time there was"):
        out = llm.generate(prompt, params)
        before = llm.tokenizer.decode(out.prompt_ids)
        whole = llm.tokenizer.decode(out.prompt_ids + out.token_ids)
        assert whole.startswith(before)
        assert "".join(llm.stream(prompt, params)) == out.text == whole[len(before):]


def test_engine_stop_string(tiny_llm):
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=8, ignore_eos=True)
    reference = tiny_llm.generate("Stop me", params).text
    at = next(i for i in range(10, len(reference) - 2) if "\ufffd" not in reference[i:i + 2])
    stop = reference[at:at + 2]
    params = dataclasses.replace(params, stop=[stop])
    out = tiny_llm.generate("Stop me", params)
    assert out.finish_reason == "stop"
    assert out.text == reference[:reference.index(stop)]
    assert "".join(tiny_llm.stream("Stop me", params)) == out.text
