"""Logprobs, echo, prompt forms, n > 1, penalties and logit_bias through the official openai client,
checked against transformers (eager, f32) on the same weights: its log-softmax, and its argmax
under OpenAI's penalty formula written out here."""

import httpx
import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

import pyllm
from conftest import hf_logits, make_tiny_model
from test_server import client, serving

MODEL = "tiny-logprobs"
HELLO = [{"role": "user", "content": "Hello there!"}]
BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, transformers model); vocab = the 258 tokens of the byte tokenizer, so every id has bytes."""
    model_dir = tmp_path_factory.mktemp("logprobs") / MODEL
    return model_dir, make_tiny_model(model_dir, vocab_size=258, max_position_embeddings=512)


@pytest.fixture(scope="module")
def served(tiny):
    llm = pyllm.LLM(str(tiny[0]), show_progress=False)
    with serving(llm, MODEL) as (url, _):
        yield url, llm


@pytest.fixture(scope="module")
def hf_tokenizer(tiny):
    return PreTrainedTokenizerFast(tokenizer_file=str(tiny[0] / "tokenizer.json"))


def token_bytes(hf_tokenizer, token_id: int) -> bytes:
    text = hf_tokenizer.convert_ids_to_tokens(token_id)
    return text.encode() if token_id < 2 else bytes(BYTE_OF[c] for c in text)


def hf_log_softmax(model, ids) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(hf_logits(model, ids)).double(), -1).numpy()


def hf_greedy(model, ids, steps, adjust=lambda logits, out: logits):
    """transformers' greedy continuation -> (token ids, raw log-softmax row of each step)."""
    out, rows = [], []
    for _ in range(steps):
        logprobs = hf_log_softmax(model, ids + out)[-1]
        rows.append(logprobs)
        out.append(int(np.argmax(adjust(logprobs.copy(), out))))
    return out, rows


def test_chat_logprobs_equal_transformers(served, tiny, hf_tokenizer):
    url, llm = served
    c = client(url)
    prompt = httpx.post(url + "/tokenize", json={"messages": HELLO}, timeout=10).json()["tokens"]
    expected, rows = hf_greedy(tiny[1], prompt, 8)
    whole = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0, logprobs=True,
                                      top_logprobs=5, extra_body={"ignore_eos": True})
    chunks = list(c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=5, stream=True, extra_body={"ignore_eos": True}))
    streamed = [entry for ch in chunks if ch.choices and ch.choices[0].logprobs
                for entry in ch.choices[0].logprobs.content]
    for content in (whole.choices[0].logprobs.content, streamed):
        assert len(content) == 8
        for entry, token, row in zip(content, expected, rows):
            assert bytes(entry.bytes) == token_bytes(hf_tokenizer, token)
            assert entry.logprob == pytest.approx(row[token], abs=1e-3)
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(np.sort(row)[::-1][:5], abs=1e-3)
            assert bytes(entry.top_logprobs[0].bytes) == token_bytes(hf_tokenizer, token)
    assert "".join(e.token for e in streamed) == whole.choices[0].message.content


def test_echo_prompt_logprobs_equal_transformers(served, tiny):
    url, _ = served
    ids = [5, 70, 71, 72, 9, 100, 33, 40]
    reference = hf_log_softmax(tiny[1], ids)
    c = client(url)
    scored = c.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx([reference[i, t] for i, t in enumerate(ids[1:])], abs=1e-3)
    assert all(max(top.values()) == pytest.approx(reference[i].max(), abs=1e-3)
               for i, top in enumerate(lp.top_logprobs[1:]))
    assert scored.usage.prompt_tokens == len(ids) and scored.usage.completion_tokens == 0  # no BOS added
    one = c.completions.create(model=MODEL, prompt=[ids, ids[:4]], max_tokens=1, echo=True, logprobs=1,
                               temperature=0)
    assert [ch.index for ch in one.choices] == [0, 1]
    # batched with another prompt: the same up to BLAS's summation order (NumPy's GEMM without the C kernels)
    assert one.choices[0].logprobs.token_logprobs[1:-1] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert one.choices[0].logprobs.token_logprobs[-1] == pytest.approx(reference[-1].max(), abs=1e-3)
    assert len(one.choices[1].logprobs.tokens) == 5
    long = [int(t) for t in np.random.default_rng(0).integers(2, 258, 300)]  # prefilled in two chunks
    reference = hf_log_softmax(tiny[1], long)
    scored = c.completions.create(model=MODEL, prompt=long, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [reference[i, t] for i, t in enumerate(long[1:])], abs=1e-3)


def test_completion_logprobs_and_prompt_forms(served, tiny, hf_tokenizer):
    url, llm = served
    c = client(url)
    ids = httpx.post(url + "/tokenize", json={"prompt": "Once", "add_special_tokens": False}, timeout=10).json()
    assert httpx.post(url + "/detokenize", json={"tokens": ids["tokens"]}, timeout=10).json() == {"prompt": "Once"}
    info = httpx.get(url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and "im_start" in info["chat_template"]
    expected, rows = hf_greedy(tiny[1], ids["tokens"], 6)
    out = c.completions.create(model=MODEL, prompt="Once", max_tokens=6, temperature=0, logprobs=3,
                               extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([row[t] for row, t in zip(rows, expected)], abs=1e-3)
    assert [len(top) for top in lp.top_logprobs] == [3] * 6  # the sampled token is the best: no fourth
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    batch = c.completions.create(model=MODEL, prompt=["Once", "Twice"], max_tokens=3, temperature=0)
    by_ids = c.completions.create(model=MODEL, prompt=[ids["tokens"]], max_tokens=3, temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_ids.choices[0].text == hf_tokenizer.decode(expected[:3])


def test_n_choices_share_one_prefill(served, monkeypatch):
    url, llm = served
    c = client(url)
    out = c.chat.completions.create(model=MODEL, messages=HELLO, n=3, max_tokens=10, seed=5, logprobs=True,
                                    extra_body={"ignore_eos": True})
    assert [ch.index for ch in out.choices] == [0, 1, 2] and len({ch.message.content for ch in out.choices}) == 3
    assert out.usage.completion_tokens == 30 and all(len(ch.logprobs.content) == 10 for ch in out.choices)
    single = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, seed=5,
                                       extra_body={"ignore_eos": True})
    assert single.choices[0].message.content == out.choices[0].message.content  # choice 0: the seed's own stream
    fed = []
    forward = llm.model.forward
    monkeypatch.setattr(llm.model, "forward", lambda batch, **kw: fed.append(sum(len(t) for _, t in batch))
                        or forward(batch, **kw))
    prompt = list(range(40, 90))
    texts = c.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=10, seed=5,
                                 extra_body={"ignore_eos": True})
    assert len(texts.choices) == 3 and texts.usage.completion_tokens == 30
    assert sum(fed) == len(prompt) + 3 * 9  # the prompt once, then each choice's fed-back tokens
    streamed = list(c.completions.create(model=MODEL, prompt="Hi", n=2, max_tokens=4, stream=True, seed=1))
    assert {ch.choices[0].index for ch in streamed} == {0, 1}


def test_penalties_and_logit_bias_follow_openai(served, tiny, hf_tokenizer):
    url, _ = served
    c = client(url)
    prompt = httpx.post(url + "/tokenize", json={"prompt": "aaaa"}, timeout=10).json()["tokens"]

    def penalized(logits, out):  # OpenAI's formula, on the generated tokens
        for token in set(out):
            logits[token] -= 1.5 * out.count(token) + 0.5
        logits[65] += 3.0
        return logits
    expected, rows = hf_greedy(tiny[1], prompt, 10, penalized)
    out = c.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, frequency_penalty=1.5,
                               presence_penalty=0.5, logit_bias={"65": 3.0}, logprobs=0,
                               extra_body={"ignore_eos": True})
    assert "".join(out.choices[0].logprobs.tokens) == hf_tokenizer.decode(expected)
    assert out.choices[0].logprobs.token_logprobs == pytest.approx([r[t] for r, t in zip(rows, expected)], abs=1e-3)
    forced = c.completions.create(model=MODEL, prompt=prompt, max_tokens=5, logit_bias={"70": 100},
                                  extra_body={"ignore_eos": True})
    assert forced.choices[0].text == hf_tokenizer.decode([70] * 5)
