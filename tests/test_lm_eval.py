"""lm-evaluation-harness as the real client: a local multiple-choice task (YAML + JSONL written
here, no download) scored by `lm_eval --model local-completions` against pyllm serve and by
`lm_eval --model hf` on the same weights: equal per-choice loglikelihoods and accuracy. A
generate_until task through local-chat-completions gives transformers' greedy answers."""

import json
import os
import subprocess
import sys

import pytest

import pyllm
from conftest import REPO, make_tiny_model
from test_server import serving

MODEL = "tiny-eval"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUESTIONS = [("The sky is", ["blue", "green", "loud"], 0), ("Two plus two is", ["three", "four", "five"], 1),
             ("Ice is", ["hot", "cold"], 1), ("A cat says", ["woof", "moo", "meow"], 2)]
MC_TASK = """task: pyllm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
"""
GEN_TASK = """task: pyllm_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = root / MODEL
    make_tiny_model(model_dir, max_position_embeddings=512)
    # the plain fast tokenizer, as tokenizer.json defines it, and a chat template, for transformers' side
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {**config, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML}))
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=data))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=data))
    return root, model_dir, tasks


def lm_eval(root, tasks, task: str, name: str, *args) -> tuple[dict, list[dict]]:
    """Run the lm_eval CLI offline -> (its results for the task, its logged samples)."""
    out = root / name
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OPENAI_API_KEY": "unused", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "lm_eval", "--tasks", task, "--include_path", str(tasks),
                          "--output_path", str(out), "--log_samples", "--seed", "0", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][task]
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


def test_lm_eval_against_pyllm_serve_equals_hf(setup):
    root, model_dir, tasks = setup
    with serving(pyllm.LLM(str(model_dir), show_progress=False), MODEL) as (url, _):
        served, served_samples = lm_eval(root, tasks, "pyllm_mc", "served", "--model", "local-completions",
                                         "--model_args", f"model={MODEL},base_url={url}/v1/completions,"
                                         "num_concurrent=1,max_retries=1")
        chat, chat_samples = lm_eval(root, tasks, "pyllm_gen", "chat", "--model", "local-chat-completions",
                                     "--apply_chat_template", "--model_args",
                                     f"model={MODEL},base_url={url}/v1/chat/completions,num_concurrent=1,max_retries=1")
    hf, hf_samples = lm_eval(root, tasks, "pyllm_mc", "hf", "--model", "hf", "--device", "cpu", "--model_args",
                             f"pretrained={model_dir},dtype=float32,attn_implementation=eager")
    ours = [float(r[0][0]) for s in served_samples for r in s["resps"]]
    theirs = [float(r[0][0]) for s in hf_samples for r in s["resps"]]
    assert len(ours) == sum(len(c) for _, c, _ in QUESTIONS)
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert served["acc,none"] == hf["acc,none"]

    hf_chat, hf_chat_samples = lm_eval(root, tasks, "pyllm_gen", "hf_chat", "--model", "hf", "--device", "cpu",
                                       "--apply_chat_template", "--model_args",
                                       f"pretrained={model_dir},dtype=float32,attn_implementation=eager")
    assert all(s["resps"][0][0] for s in chat_samples)
    assert [s["resps"] for s in chat_samples] == [s["resps"] for s in hf_chat_samples]
    assert chat["exact_match,none"] == hf_chat["exact_match,none"]
