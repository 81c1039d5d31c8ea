"""Real models against greedy tokens and top-5 logits recorded from transformers (../shared/reference)."""

import json

import numpy as np

import pyllm
from conftest import SHARED, needs_shared

pytestmark = needs_shared


def golden_case(index):
    return json.loads((SHARED / "reference" / "golden_greedy.json").read_text())["cases"][index]


def check_case(llm, case, prompt_ids):
    assert prompt_ids == case["prompt_ids"]
    logits = llm.score(prompt_ids)[-1]
    top5 = np.argsort(-logits)[:5]
    assert top5.tolist() == case["last_position_top5"]
    np.testing.assert_allclose(logits[top5], case["last_position_top5_logits"], atol=1e-4)
    out = llm.generate(prompt_ids, max_tokens=len(case["greedy_new_ids"]), temperature=0)
    assert out.token_ids == case["greedy_new_ids"]


def test_story_model_matches_transformers():
    llm = pyllm.LLM(str(SHARED / "models" / "story"), show_progress=False)
    case = golden_case(0)
    check_case(llm, case, llm.tokenizer.encode(case["prompt"]))
    assert llm.generate(case["prompt"], max_tokens=len(case["greedy_new_ids"])).text == case["greedy_text"]


def test_smollm2_chat_matches_transformers(smollm2_dir):
    llm = pyllm.LLM(str(smollm2_dir), show_progress=False)
    case = golden_case(1)
    assert llm.tokenizer.render_chat(case["chat_messages"]) == case["rendered_prompt"]
    check_case(llm, case, llm.tokenizer.encode_chat(case["chat_messages"]))
