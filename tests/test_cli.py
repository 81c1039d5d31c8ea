"""The command line, run as `python -m pyllm` on tiny models: story, generate --json, chat with piped
stdin, one-line errors, and Ctrl-C in chat (through a pty and in-process)."""

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from tokenizers import Tokenizer as HFTokenizer

import pyllm
from conftest import REPO, SHARED, hf_logits, interrupt_on_swiglu_call, make_tiny_model, needs_shared
from pyllm import SamplingParams
from pyllm.chat import ChatSession
from pyllm.chat_repl import repl


def cli(*args, stdin: str = "", timeout=60):
    """-> (exit code, stdout, stderr without the backend's "pyllm: ..." notices, which a CPU
    without AVX-512 prints at load)."""
    proc = subprocess.run([sys.executable, "-m", "pyllm", *map(str, args)], input=stdin.encode(),
                          capture_output=True, timeout=timeout, cwd=REPO)
    err = "".join(line for line in proc.stderr.decode().splitlines(keepends=True) if not line.startswith("pyllm: "))
    return proc.returncode, proc.stdout.decode(), err


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(model dir, transformers model, LLM) with a context window of 64 tokens."""
    model_dir = tmp_path_factory.mktemp("cli") / "ctx64"
    hf_model = make_tiny_model(model_dir, max_position_embeddings=64)
    return model_dir, hf_model, pyllm.LLM(str(model_dir), show_progress=False)


def chat_answers(llm, lines, params):
    """What `pyllm chat` must print for these input lines, computed with the ChatSession API."""
    session, answers = ChatSession(llm, None, params), []
    for line in lines:
        if line == "/reset":
            session.reset()
        else:
            answers.append("".join(session.send(line)))
    return answers


# ---- story and generate ----------------------------------------------------------------------

def test_story_streams_the_continuation_and_reports_speed(small):
    model_dir, _, llm = small
    rc, out, err = cli("story", "--model", model_dir, "--prompt", "Once", "--max-tokens", 12,
                       "--temperature", 0.8, "--seed", 3)
    expected = llm.generate("Once", SamplingParams(max_tokens=12, temperature=0.8, seed=3))
    assert rc == 0, err
    assert out == "Once" + expected.text + "\n"
    assert err.count("\n") == 1  # just the stats line: no load bar when stderr is not a terminal
    assert f"{len(expected.prompt_ids)} prompt tokens" in err and f"{len(expected.token_ids)} generated" in err
    assert re.search(r"prefill \d+\.\d tok/s, decode \d+\.\d tok/s", err)


@needs_shared
def test_story_on_the_story_model():
    model_dir = SHARED / "models" / "story"
    rc, out, err = cli("story", "--model", model_dir, "--max-tokens", 24)
    expected = pyllm.LLM(str(model_dir), show_progress=False).generate("Once upon a time", max_tokens=24)
    assert rc == 0, err
    assert out == "Once upon a time" + expected.text + "\n"
    assert "tok/s" in err


def test_generate_json_matches_transformers_greedy(small):
    model_dir, hf_model, _ = small
    prompt = "The cat sat on"
    rc, out, err = cli("generate", "--model", model_dir, "--prompt", prompt, "--max-tokens", 12, "--json")
    assert rc == 0, err
    result = json.loads(out)
    tokenizer = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(prompt).ids
    assert result["prompt_ids"] == ids
    while len(ids) < len(result["prompt_ids"]) + 12 and ids[-1] != 1:  # 1 is the eos token
        ids.append(int(hf_logits(hf_model, ids)[-1].argmax()))
    assert result["new_ids"] == ids[len(result["prompt_ids"]):]
    assert result["text"] == tokenizer.decode(result["new_ids"])
    assert result["finish_reason"] == ("stop" if ids[-1] == 1 else "length")
    assert {"prompt_tokens", "generated_tokens", "prefill_tok_s", "decode_tok_s"} <= set(result["timings"])


# ---- chat with piped stdin -------------------------------------------------------------------

def test_chat_reset_and_exit(small):
    model_dir, _, llm = small
    lines = ["hello", "", "/reset", "hello", "more please", "/exit", "never read"]
    rc, out, err = cli("chat", "--model", model_dir, "--max-tokens", 6, stdin="\n".join(lines) + "\n")
    a1, a2, a3 = chat_answers(llm, ["hello", "/reset", "hello", "more please"], SamplingParams(max_tokens=6))
    assert rc == 0, err
    assert a1 == a2
    assert out == f"{a1}\n{a2}\n{a3}\n"
    assert "[conversation reset]" in err


def test_chat_ends_at_eof_and_survives_errors_and_a_full_window(small):
    model_dir, _, llm = small
    lines = ["hi", "yo", "x" * 80, "ok"]  # the long line cannot fit in 64 tokens
    rc, out, err = cli("chat", "--model", model_dir, "--max-tokens", 6, stdin="\n".join(lines))
    expected = chat_answers(llm, ["hi", "yo", "ok"], SamplingParams(max_tokens=6))
    assert rc == 0, err
    assert out == "".join(a + "\n" for a in expected)
    assert "Traceback" not in err
    assert re.search(r"^error: message too long: .*$", err, re.M)
    assert "dropped the 1 oldest turn" in err


# ---- errors: one line, non-zero exit ---------------------------------------------------------

@pytest.fixture(scope="module")
def broken_dirs(tmp_path_factory, small):
    root = tmp_path_factory.mktemp("broken")
    (root / "empty").mkdir()
    (root / "bad-json").mkdir()
    (root / "bad-json" / "config.json").write_text("{not json")
    (root / "list-json").mkdir()
    (root / "list-json" / "config.json").write_text("[1, 2]")
    (root / "bad-weights").mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (root / "bad-weights" / name).write_bytes((small[0] / name).read_bytes())
    (root / "bad-weights" / "model.safetensors").write_bytes(b"\x00" * 64)
    return root


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "model not found"),
    (["generate", "--model", "{broken}/empty", "--prompt", "x"], "missing file"),
    (["generate", "--model", "{broken}/bad-json", "--prompt", "x"], "not valid JSON"),
    (["generate", "--model", "{broken}/list-json", "--prompt", "x"], "must hold a JSON object"),
    (["generate", "--model", "{broken}/bad-weights", "--prompt", "x"], "safetensors"),
    (["generate", "--model", "{small}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "--model", "{small}", "--prompt", "x", "--temperature", "abc"], "invalid float"),
    (["generate", "--model", "{small}", "--prompt", "x", "--max-tokens", "0"], "max_tokens"),
    (["story", "--model", "{small}", "--top-p", "0"], "top_p"),
    (["chat", "--model", "{small}", "--seed", "-3"], "seed"),
    (["generate", "--model", "{small}", "--prompt", "word " * 40], "prompt too long"),
    (["generate", "--model", "{small}"], "required"),
    (["frobnicate"], "invalid choice"),
    (["serve", "--model", "{small}", "--replicas", "0"], "--replicas must be >= 1"),
    (["serve", "--model", "{small}", "--threads", "0"], "--threads must be >= 1"),
    (["serve", "--model", "{small}", "--ray-address", "auto"], "--ray-address needs --replicas"),
])
def test_errors_are_one_line(small, broken_dirs, args, message):
    args = [a.format(small=small[0], broken=broken_dirs) for a in args]
    rc, out, err = cli(*args)
    assert rc != 0
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]


def test_replicas_without_ray_is_one_line(small, tmp_path):
    (tmp_path / "ray.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "pyllm", "serve", "--model", str(small[0]), "--replicas", "2"],
                          capture_output=True, timeout=60, cwd=REPO, env=env)
    lines = proc.stderr.decode().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0] == "error: --replicas needs Ray Serve, and ray is not installed: pip install -e '.[ray]'"


# ---- Ctrl-C ----------------------------------------------------------------------------------

def test_ctrl_c_inside_an_answer_returns_to_the_prompt(small, monkeypatch, capsys):
    """In-process: a KeyboardInterrupt in the middle of a forward stops the answer only."""
    _, _, llm = small
    interrupt_on_swiglu_call(monkeypatch, llm.backend, 2 * llm.config.num_layers + 1)  # 3rd forward
    monkeypatch.setattr(sys, "stdin", io.StringIO("count\nagain\n"))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    repl(llm, None, params)
    out, err = capsys.readouterr()
    partial, answer, rest = out.split("\n")
    assert "[stopped]" in err and rest == ""
    monkeypatch.undo()
    expected = ChatSession(llm, None, params)
    expected.messages = [{"role": "user", "content": "count"}, {"role": "assistant", "content": partial}]
    assert answer == "".join(expected.send("again"))
    full = "".join(ChatSession(llm, None, params).send("count"))
    assert full.startswith(partial) and len(partial) < len(full)


@pytest.fixture(scope="module")
def endless_model(tmp_path_factory):
    """A tiny model with no eos token and a long window: its answers run until interrupted."""
    model_dir = tmp_path_factory.mktemp("cli") / "endless"
    make_tiny_model(model_dir, max_position_embeddings=4096)
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        config = json.loads(path.read_text())
        config.pop("eos_token_id", None)
        path.write_text(json.dumps(config))
    return model_dir


def read_until(fd, seen: bytearray, done, deadline: float):
    """Append what the terminal prints to seen until done(seen) holds."""
    while not done(seen):
        assert time.monotonic() < deadline, f"timed out; the terminal shows {bytes(seen[-300:])!r}"
        if select.select([fd], [], [], 0.1)[0]:
            seen += os.read(fd, 4096)


def test_sigint_in_a_terminal_stops_the_answer(endless_model):
    main, child = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pyllm", "chat", "--model", str(endless_model),
                             "--max-tokens", "3000"], stdin=child, stdout=child, stderr=child, cwd=REPO)
    os.close(child)
    seen, deadline = bytearray(), time.monotonic() + 30
    try:
        read_until(main, seen, lambda s: b"> " in s, deadline)
        os.write(main, b"hello\n")
        read_until(main, seen, lambda s: b"hello\r\n" in s, deadline)
        answer_start = seen.index(b"hello\r\n") + 7
        read_until(main, seen, lambda s: len(s) > answer_start + 60, deadline)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        read_until(main, seen, lambda s: b"[stopped]" in s, deadline)
        read_until(main, seen, lambda s: b"> " in s[s.index(b"[stopped]"):], deadline)  # back at the prompt
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        os.close(main)
