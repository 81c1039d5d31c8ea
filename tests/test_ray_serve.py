"""pyllm serve --replicas 2 --threads 1 on a local Ray instance (skipped without the [ray] extra):
the openai client streams through the ingress, turn 2 of a conversation lands on the replica that
holds turn 1, a client that leaves cancels its job on the replica, and a replica killed mid-stream
ends that stream with an error event while the other serves on until Ray has it back."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytest.importorskip("ray.serve")

from conftest import REPO, make_tiny_model  # noqa: E402
from pyllm.benchmarks.serve_bench import free_port  # noqa: E402
from test_server import wait_until  # noqa: E402

MODEL = "tiny-chat"
CONTEXT = 32768  # long streams outlast the test's actions
TURN_1 = [{"role": "user", "content": "Tell me about the lighthouse on the hill, please."}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The server's URL; at the end SIGTERM shuts it down, Ray and its processes with it."""
    root = tmp_path_factory.mktemp("ray")
    make_tiny_model(root / MODEL, max_position_embeddings=CONTEXT)
    port, log = free_port(), root / "serve.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "pyllm", "serve", "--model", str(root / MODEL), "--port",
                                 str(port), "--replicas", "2", "--threads", "1"], cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or up(url), seconds=180)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield url
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down; Ray's handler for it exits with its number
        assert proc.wait(60) in (0, signal.SIGTERM)
        assert "Traceback" not in log.read_text()
        wait_until(lambda: not alive(proc.pid), seconds=30)  # Ray's processes too
    finally:
        if alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def up(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def replicas(url) -> list[dict]:
    return httpx.get(url + "/replicas", timeout=10).json()["replicas"]


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def streamed_turn(url, messages, max_tokens=24) -> tuple[int, str, object]:
    """A streaming chat turn through the openai client -> (replica, text, usage)."""
    with client(url).chat.completions.with_streaming_response.create(
            model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}) as response:
        replica = int(response.headers["x-pyllm-replica"])
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return replica, text, chunks[-1].usage


def test_turn_two_lands_on_the_replica_that_holds_turn_one(base):
    assert [m.id for m in client(base).models.list()] == [MODEL]
    assert [(r["up"], r["threads"]) for r in replicas(base)] == [(True, 1), (True, 1)]
    first, text, usage = streamed_turn(base, TURN_1)
    assert text and usage.completion_tokens == 24 and usage.prompt_tokens_details.cached_tokens == 0
    turn_2 = TURN_1 + [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
    second, _, usage = streamed_turn(base, turn_2)
    assert second == first
    assert usage.prompt_tokens_details.cached_tokens > 0
    metrics = httpx.get(base + "/metrics", timeout=10).text  # the replicas' counters, summed
    assert metric_value(metrics, "pyllm_cached_prompt_tokens_total") >= usage.prompt_tokens_details.cached_tokens
    whole = client(base).chat.completions.create(model=MODEL, messages=TURN_1, max_tokens=24, temperature=0)
    assert whole.choices[0].message.content == text  # the same engine code on every replica


def metric_value(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name)


def test_grammars_logprobs_and_choices_pass_through(base):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    whole = client(base).chat.completions.create(
        model=MODEL, messages=TURN_1, max_tokens=40, seed=1, n=2, logprobs=True, top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert len(whole.choices) == 2
    for choice in whole.choices:
        assert choice.message.content.startswith('{"a":')  # the replica compiled the schema again
        if choice.finish_reason == "stop":  # a random model may run out of tokens first
            assert isinstance(json.loads(choice.message.content)["a"], int)
        assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
    assert sum(len(c.logprobs.content) for c in whole.choices) == whole.usage.completion_tokens


def test_a_client_that_leaves_cancels_its_job_on_the_replica(base):
    body = {"model": MODEL, "messages": TURN_1, "max_tokens": CONTEXT - 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as response:
        replica = int(response.headers["x-pyllm-replica"])
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert replicas(base)[replica]["running"] == 1
    wait_until(lambda: replicas(base)[replica]["running"] == 0)
    with pytest.raises(httpx.ReadTimeout):  # and one that leaves before its whole response
        httpx.post(base + "/v1/chat/completions", json={**body, "stream": False}, timeout=1.5)
    wait_until(lambda: all(r["running"] == 0 for r in replicas(base)))


def test_a_killed_replica_errors_its_streams_and_ray_restarts_it(base):
    before = replicas(base)
    body = {"model": MODEL, "messages": TURN_1, "max_tokens": CONTEXT - 200, "ignore_eos": True, "stream": True}
    started = time.monotonic()
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as response:
        killed = int(response.headers["x-pyllm-replica"])
        frames = []
        for line in response.iter_lines():
            if line:
                frames.append(line)
            if len(frames) == 6:
                os.kill(before[killed]["pid"], signal.SIGKILL)
    assert time.monotonic() - started < 30  # an error event, not a hang
    assert frames[-1] == "data: [DONE]"
    assert "engine replica" in json.loads(frames[-2][len("data: "):])["error"]["message"]

    for n in range(4):  # the other replica serves on
        replica, text, _ = streamed_turn(base, [{"role": "user", "content": f"Question {n}?"}], max_tokens=8)
        assert text
        assert replica != killed or replicas(base)[killed]["up"]  # not before Ray has it back
    wait_until(lambda: (lambda r: r["up"] and r["pid"] != before[killed]["pid"])(replicas(base)[killed]),
               seconds=120)  # Ray started a new process for it
    assert replicas(base)[1 - killed]["pid"] == before[1 - killed]["pid"]
    metrics = httpx.get(base + "/metrics", timeout=10).text
    assert "pyllm_generation_tokens_total" in metrics


def test_an_unreachable_cluster_is_one_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.run([sys.executable, "-m", "pyllm", "serve", "--replicas", "1", "--ray-address", address],
                          capture_output=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 1
    assert proc.stderr.decode().splitlines() == [
        f"error: no Ray cluster at {address} (Connection refused); start one with `ray start --head`"]
