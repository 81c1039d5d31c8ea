"""ChatSession: chat templates against transformers, prefix reuse across turns through the KV
pool's cached blocks (checked against a cold run of the same history, on an emptied pool),
interrupted answers, a full context window, /reset."""

import json

import pytest

import pyllm
from conftest import interrupt_on_swiglu_call, make_tiny_model, write_byte_tokenizer
from pyllm import PyllmError, SamplingParams
from pyllm.backends.base import BLOCK_TOKENS
from pyllm.chat import ChatSession
from pyllm.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
SYSTEM = "You are terse."
HISTORY = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in one word, please."},
]


def run_turn(session, text, params=None):
    return "".join(session.send(text, params))


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def cold(llm, system, messages, text, params=GREEDY):
    """A fresh session handed the recorded history, on an empty KV pool (nothing cached): what
    the next turn must equal."""
    llm.model.resize_kv_pool(llm.model.kv_memory_bytes)
    session = ChatSession(llm, system, params)
    session.messages = [dict(m) for m in messages]
    answer = run_turn(session, text)
    return answer, session.last_sequence.output_ids


def assert_next_turn_matches_cold(session, text, params=GREEDY):
    history = [dict(m) for m in session.messages]
    answer = run_turn(session, text, params)
    assert session.dropped_turns == 0
    assert (answer, session.last_sequence.output_ids) == cold(session.llm, session.system, history, text, params)


# ---- templates -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.mark.parametrize("system", [SYSTEM, None])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smollm2_dir, hf_smollm2_tokenizer, system, add_generation_prompt):
    tokenizer = Tokenizer(smollm2_dir)
    messages = ([{"role": "system", "content": system}] if system else []) + HISTORY
    expected = hf_smollm2_tokenizer.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)
    assert tokenizer.render_chat(messages, add_generation_prompt) == expected
    expected_ids = hf_smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert tokenizer.encode_chat(messages, add_generation_prompt) == expected_ids["input_ids"]


def test_chatml_when_the_model_has_no_template(tiny_llm):
    messages = [{"role": "system", "content": SYSTEM}] + HISTORY[:2]
    assert tiny_llm.tokenizer.render_chat(messages) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_template_features_render_as_in_transformers(tmp_path):
    """Loop controls, transformers' tojson (no HTML escaping) and the special-token variables."""
    from transformers.utils.chat_template_utils import render_jinja_template
    template = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{{ bos_token }}{{ m['role'] }}: {{ m | tojson }}\n{% endfor %}"
                "{% if add_generation_prompt %}{{ eos_token }}{% endif %}")
    write_byte_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": template}))
    messages = [{"role": "user", "content": "<b>café</b> & \"quotes\""}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "never shown"}]
    (expected,), _ = render_jinja_template(conversations=[messages], chat_template=template,
                                           add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert Tokenizer(tmp_path).render_chat(messages) == expected


def test_bad_message_is_a_pyllm_error(tiny_llm):
    with pytest.raises(PyllmError, match="role"):
        tiny_llm.tokenizer.render_chat([{"role": "user", "content": None}])


# ---- prefix reuse --------------------------------------------------------------------------

def test_turn_two_prefills_only_new_tokens_and_matches_cold(tiny_llm, monkeypatch):
    session = tiny_llm.chat_session(system=SYSTEM, max_tokens=8, ignore_eos=True)
    first_user = "Tell me something about the sea and the ships upon it, please."
    answer1 = run_turn(session, first_user)
    turn1 = session.last_sequence
    fed1 = turn1.prompt_ids + turn1.output_ids[:-1]  # the last token was never fed

    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first_user},
               {"role": "assistant", "content": answer1}]
    prompt2 = tiny_llm.tokenizer.encode_chat(history + [{"role": "user", "content": "Why?"}])
    shared = min(common_prefix(fed1, prompt2), len(prompt2) - 1)
    cached = shared // BLOCK_TOKENS * BLOCK_TOKENS  # the full blocks of what both hold
    expected_prefill = len(prompt2) - cached
    fed = []  # tokens fed per forward step
    forward = tiny_llm.model.forward

    def counting_forward(batch, **kwargs):
        fed.append(len(batch[0][1]))
        return forward(batch, **kwargs)
    monkeypatch.setattr(tiny_llm.model, "forward", counting_forward)
    answer2 = run_turn(session, "Why?")

    assert session.dropped_turns == 0 and session.last_sequence.prompt_ids == prompt2
    assert fed[0] == expected_prefill                       # the prefill step
    assert fed[1:] == [1] * (len(session.last_sequence.output_ids) - 1)  # then one token per step
    assert session.last_sequence.cached_tokens == cached >= len(turn1.prompt_ids) - BLOCK_TOKENS
    assert expected_prefill <= len(prompt2) // 2
    monkeypatch.undo()
    assert (answer2, session.last_sequence.output_ids) == cold(tiny_llm, SYSTEM, history[1:], "Why?")


def test_many_turns_match_cold_runs_with_sampling(tiny_llm):
    params = SamplingParams(max_tokens=4, temperature=0.9, top_k=40, seed=7, ignore_eos=True)
    session = ChatSession(tiny_llm, SYSTEM, params)
    for text in ("hi", "why?", "ok"):  # three turns that just fit the window of 256
        assert_next_turn_matches_cold(session, text, params)


# ---- interrupted answers ---------------------------------------------------------------------

def test_closing_the_answer_mid_stream_records_what_was_shown(tiny_llm):
    session = ChatSession(tiny_llm, SYSTEM, SamplingParams(max_tokens=40, ignore_eos=True))
    answer = session.send("Count to ten.")
    shown = "".join(next(answer) for _ in range(3))
    answer.close()
    assert session.last_sequence.finish_reason == "abort"
    assert len(session.last_sequence.output_ids) < 40
    assert session.messages == [{"role": "user", "content": "Count to ten."},
                                {"role": "assistant", "content": shown}]
    assert_next_turn_matches_cold(session, "Go on.")


def test_ctrl_c_inside_a_forward_keeps_the_session_consistent(tiny_llm, monkeypatch):
    """KeyboardInterrupt in the middle of a layer: part of the cache was written, none committed."""
    session = ChatSession(tiny_llm, SYSTEM, SamplingParams(max_tokens=40, ignore_eos=True))
    interrupt_on_swiglu_call(monkeypatch, tiny_llm.backend, 2 * tiny_llm.config.num_layers + 2)  # 3rd forward
    with pytest.raises(KeyboardInterrupt):
        run_turn(session, "Count to ten.")
    monkeypatch.undo()
    seq = session.last_sequence
    assert seq.finish_reason == "abort" and len(seq.output_ids) == 2
    assert seq.cache.length == 0 and tiny_llm.model.pool.stats()["blocks_used"] == 0  # every block given back
    assert_next_turn_matches_cold(session, "Go on.")


def test_an_answer_never_started_is_not_recorded(tiny_llm):
    session = ChatSession(tiny_llm, SYSTEM, GREEDY)
    run_turn(session, "First question.")
    session.send("A question nobody waits for.")  # dropped without iterating
    assert len(session.messages) == 2
    assert_next_turn_matches_cold(session, "Second question.")


# ---- a full context window -------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_llm(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("ctx64") / "model"
    make_tiny_model(model_dir, max_position_embeddings=64)
    return pyllm.LLM(str(model_dir), show_progress=False)


def test_full_window_drops_oldest_turns(small_llm):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    session = ChatSession(small_llm, None, params)
    run_turn(session, "hi")
    for text in ("yo", "ok", "go", "hm"):
        before = [dict(m) for m in session.messages]
        answer = run_turn(session, text)
        assert session.dropped_turns >= 1
        kept = session.messages[:-2]
        assert kept == before[len(before) - len(kept):]  # the oldest went first
        assert (answer, session.last_sequence.output_ids) == cold(small_llm, None, kept, text, params)
        assert len(session.last_sequence.prompt_ids) + 6 <= 64


def test_message_longer_than_the_window(small_llm):
    session = ChatSession(small_llm, None, SamplingParams(max_tokens=6, ignore_eos=True))
    run_turn(session, "hi")
    history = [dict(m) for m in session.messages]
    with pytest.raises(PyllmError, match="too long") as info:
        session.send("x" * 80)
    assert "\n" not in str(info.value)
    assert session.messages == history  # nothing dropped for a message that cannot fit anyway
    run_turn(session, "ok")  # still usable


def test_answer_cut_by_the_window_then_next_turn(small_llm):
    session = ChatSession(small_llm, None, SamplingParams(max_tokens=20, ignore_eos=True))
    run_turn(session, "12345678")  # 58 prompt tokens: room for 6 fed tokens in a window of 64
    seq = session.last_sequence
    assert seq.finish_reason == "length"
    assert len(seq.output_ids) == 64 - len(seq.prompt_ids) + 1  # 64 fed, and the last one sampled
    run_turn(session, "hi")
    assert session.dropped_turns == 1


# ---- reset -----------------------------------------------------------------------------------

def test_reset_starts_over(tiny_llm):
    session = ChatSession(tiny_llm, SYSTEM, GREEDY)
    run_turn(session, "Remember the number 7.")
    answer = session.send("And 8?")
    next(answer)
    session.reset()  # also ends the answer in flight
    assert session.messages == [] and tiny_llm.model.pool.stats()["blocks_used"] == 0
    assert (run_turn(session, "Hello."), session.last_sequence.output_ids) == cold(tiny_llm, SYSTEM, [], "Hello.")


# ---- the real model --------------------------------------------------------------------------

def test_smollm2_second_turn_matches_cold(smollm2_dir):
    llm = pyllm.LLM(str(smollm2_dir), show_progress=False)
    params = SamplingParams(max_tokens=3)
    session = ChatSession(llm, None, params)
    run_turn(session, "What is the capital of France?")
    prompt1 = session.last_sequence.prompt_ids
    assert_next_turn_matches_cold(session, "And of Italy?", params)
    turn2 = session.last_sequence
    assert turn2.cached_tokens >= len(prompt1) // BLOCK_TOKENS * BLOCK_TOKENS  # its full blocks
    assert len(turn2.prompt_ids) - turn2.cached_tokens < len(turn2.prompt_ids) // 2
