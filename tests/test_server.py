"""pyllm serve: the openai client, SSE framing, every error status, conversation reuse, 64 concurrent
clients, disconnects, graceful shutdown, batched == one-at-a-time, a KV pool smaller than the load. The server runs
in-process (uvicorn in a thread on a pre-bound loopback socket) or, for signals, as a subprocess."""

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import pyllm
import pyllm.scheduler
from conftest import REPO, make_tiny_model
from pyllm import SamplingParams
from pyllm.backends.base import BLOCK_TOKENS
from pyllm.server.run import make_server
from pyllm.server.protocol import ALL_FIELDS

MODEL = "tiny-chat"
CONTEXT = 32768  # long streams (~0.3 ms a token) outlast the test's actions
LONG = CONTEXT - 100
HELLO = [{"role": "user", "content": "Hello there!"}]


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def full_blocks(n: int) -> int:
    """Tokens of the whole KV blocks in the first n."""
    return n // BLOCK_TOKENS * BLOCK_TOKENS


@contextlib.contextmanager
def serving(llm, model_id=MODEL, **options):
    """A live server on a free loopback port -> (base url, Server); always shut down and joined."""
    # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = make_server(llm, model_id, port=sock.getsockname()[1], log_level="warning", **options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("serve") / MODEL
    make_tiny_model(model_dir, max_position_embeddings=CONTEXT)
    return model_dir


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return pyllm.LLM(str(tiny_dir), show_progress=False)


@pytest.fixture(scope="module")
def base(llm):
    with serving(llm, max_running=16, max_queue=128) as (url, _):
        yield url


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def sse_chunks(url, path, body, **kwargs) -> list[dict]:
    """POST a streaming request; checks the SSE framing and returns the JSON chunks before [DONE]."""
    with httpx.stream("POST", url + path, json=body, timeout=60, **kwargs) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    frames = raw.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: ") and "\n" not in f for f in frames[:-1])
    return [json.loads(f[len("data: "):]) for f in frames[:-2]]


def metric(url, name) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name)


def wait_until(predicate, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- the API through the official client ------------------------------------------------------

def test_openai_client_chat_and_completions(base, llm):
    c = client(base)
    assert [m.id for m in c.models.list()] == [MODEL]
    whole = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stream=True) if ch.choices)
    expected = llm.generate(llm.tokenizer.encode_chat(HELLO), max_tokens=12)
    assert whole.choices[0].message.content == streamed == expected.text
    assert whole.choices[0].finish_reason == expected.finish_reason
    assert whole.usage.completion_tokens == len(expected.token_ids)
    seeded = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, seed=3)  # OpenAI's default: T=1
    assert seeded.choices[0].message.content == llm.generate(llm.tokenizer.encode_chat(HELLO), max_tokens=12,
                                                             temperature=1.0, seed=3).text

    text = c.completions.create(model=MODEL, prompt="Once upon", max_tokens=10, temperature=0,
                                extra_body={"ignore_eos": True})
    pieces = [ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt="Once upon", max_tokens=10,
                                                                temperature=0, stream=True,
                                                                extra_body={"ignore_eos": True})]
    expected = llm.generate("Once upon", max_tokens=10, ignore_eos=True)
    assert text.choices[0].text == "".join(pieces) == expected.text
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 10


def test_sse_chunk_shapes(base):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    chunks = sse_chunks(base, "/v1/chat/completions", body)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])

    chunks = sse_chunks(base, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 4, "stream": True})
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_tokenize_health_metrics(base, llm):
    r = httpx.post(base + "/tokenize", json={"messages": HELLO}, timeout=10).json()
    assert r["tokens"] == llm.tokenizer.encode_chat(HELLO) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CONTEXT
    assert httpx.get(base + "/health", timeout=10).json() == {"status": "ok"}
    page = httpx.get(base + "/", timeout=10)
    assert page.headers["content-type"].startswith("text/html") and "/v1/chat/completions" in page.text
    text = httpx.get(base + "/metrics", timeout=10).text
    for name in ("pyllm_requests_total", "pyllm_prompt_tokens_total", "pyllm_generation_tokens_total",
                 "pyllm_running_sequences", "pyllm_waiting_sequences", "pyllm_batch_size_bucket",
                 "pyllm_time_to_first_token_seconds_bucket", "pyllm_time_per_output_token_seconds_bucket",
                 "pyllm_kv_blocks_used", "pyllm_kv_blocks_cached", "pyllm_kv_blocks_free",
                 "pyllm_prefix_cache_hits_total", "pyllm_preemptions_total"):
        assert re.search(rf"^{name}(\{{.*\}})? \d", text, re.MULTILINE), name
    (engine,) = httpx.get(base + "/replicas", timeout=10).json()["replicas"]  # this process, the one engine
    assert engine["replica"] == 0 and engine["up"] and engine["pid"] == os.getpid() and engine["rss_bytes"] > 0


# ---- errors ------------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
BAD_BODIES = [
    ({"messages": HELLO, "n": 17}, "n"), ({"messages": HELLO, "n": 0}, "n"), ({"messages": HELLO, "n": True}, "n"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"), ({"messages": HELLO, "logprobs": 3}, "logprobs"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {}}]}, "tools[0]"),
    ({"messages": HELLO, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"messages": HELLO, "tool_choice": "required"}, "tool_choice"),
    ({"messages": HELLO, "tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": HELLO, "response_format": {"type": "yaml"}}, "response_format"),
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}}, "response_format"),
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "required": 5}}}}, "response_format"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "objekt"}}}], "tool_choice": "required"}, "tools"),
    ({"messages": HELLO, "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"messages": HELLO, "presence_penalty": "x"}, "presence_penalty"),
    ({"messages": HELLO, "logit_bias": {"5": 101}}, "logit_bias"), ({"messages": HELLO, "logit_bias": {"a": 1}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"messages": HELLO, "bogus": 1}, "bogus"), ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"), ({"messages": HELLO, "max_tokens": True}, "max_tokens"),
    ({"messages": HELLO, "stop": 5}, "stop"), ({"messages": HELLO, "top_p": 2}, "top_p"),
    ({"messages": HELLO, "seed": -1}, "seed"), ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_invalid_parameters_are_400(base, body, param):
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=10)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == param


def test_malformed_input_is_400_and_server_keeps_serving(base):
    for raw in [b"{", b"[1, 2]", b"\xff\xfe", b"null", b'{"prompt": {"a": 1}}', b'{"prompt": [1, -5]}',
                b'{"prompt": ["a", 5]}', b'{"prompt": []}', b'{"prompt": [[1], []]}', b'{"prompt": [99999]}',
                b'{"prompt": "x", "max_tokens": 0}', b'{"prompt": "x", "echo": true, "stream": true}',
                b'{"prompt": "x", "logprobs": 21}', b'{"prompt": ["x"], "n": 16, "logprobs": true}',
                b'{"prompt": [[1]] , "n": 9}'.replace(b"[[1]]", b"[" + b",".join([b"[1]"] * 8) + b"]"),
                b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b"[" * 100 + b"]" * 100 + b"}"]:
        r = httpx.post(base + "/v1/completions", content=raw, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", raw
    r = httpx.post(base + "/v1/completions", json={"prompt": "x" * 30000, "max_tokens": 5000}, timeout=10)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "30000" in message and "5000" in message and str(CONTEXT) in message
    assert httpx.get(base + "/nope", timeout=10).status_code == 404
    r = httpx.post(base + "/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client(base).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


def test_fuzzed_bodies_are_never_a_500(base):
    values = [None, True, 0, 1, -1, 0.5, 1e308, "", "x", "none", [], [1], ["a"], [[1]], {}, {"a": 1},
              {"type": "text"}, {"include_usage": True}, HELLO, [{"role": ["x"]}], [{"role": "user"}], 10**30]
    rng = random.Random(0)
    with httpx.Client(timeout=30) as http:
        for _ in range(300):
            body = {f: rng.choice(values) for f in rng.sample(sorted(ALL_FIELDS), rng.randint(1, 6))}
            body["max_tokens"] = 2  # fuzzed elsewhere; keeps every generation short
            r = http.post(base + rng.choice(["/v1/chat/completions", "/v1/completions", "/tokenize"]), json=body)
            assert r.status_code == 200 or r.status_code == 400 and r.json()["error"]["message"], body


def test_api_key_body_limit_and_cors(llm):
    with serving(llm, api_key="sekret", max_body_bytes=4096, cors_origin="http://app.test") as (url, _):
        r = httpx.options(url + "/v1/chat/completions", timeout=10, headers={
            "Origin": "http://app.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.test"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sekret"}):
            r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO}, headers=headers, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert client(url, "sekret").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
        r = httpx.post(url + "/v1/completions", json={"prompt": "x" * 5000}, timeout=10,
                       headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 413 and r.json()["error"]["message"]
        assert httpx.get(url + "/health", timeout=10).status_code == 200


def test_queue_full_is_503_with_retry_after(llm):
    long = {"prompt": "a", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with serving(llm, max_running=1, max_queue=1) as (url, _), httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # the first token: this one is running
            with http.stream("POST", url + "/v1/completions", json=long):
                wait_until(lambda: metric(url, "pyllm_waiting_sequences") == 1)
                r = http.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 2})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "server_error"
        wait_until(lambda: metric(url, "pyllm_running_sequences") + metric(url, "pyllm_waiting_sequences") == 0)
        assert http.post(url + "/v1/completions", json={"prompt": "b", "max_tokens": 2}).status_code == 200


# ---- conversation reuse ------------------------------------------------------------------------

def test_conversation_reuse_matches_cold_run(base, llm):
    c = client(base)
    sampling = {"temperature": 0.8, "seed": 7, "max_tokens": 12}
    opening = [{"role": "user", "content": "A conversation no other test has."}]
    first = c.chat.completions.create(model=MODEL, messages=opening, **sampling)
    history = opening + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "Tell me more."}]
    second = c.chat.completions.create(model=MODEL, messages=history, **sampling)
    assert second.usage.prompt_tokens_details.cached_tokens >= full_blocks(first.usage.prompt_tokens)
    cold = llm.generate(llm.tokenizer.encode_chat(history), SamplingParams(**sampling))
    assert second.choices[0].message.content == cold.text
    assert second.usage.completion_tokens == len(cold.token_ids)
    # another conversation reuses only the whole blocks it shares with what is cached
    other = [{"role": "user", "content": "Zebra? " * 8}]
    shared = common_prefix(llm.tokenizer.encode_chat(other), llm.tokenizer.encode_chat(history))
    reply = c.chat.completions.create(model=MODEL, messages=other, max_tokens=2)
    assert reply.usage.prompt_tokens_details.cached_tokens == full_blocks(shared)


def test_cache_salt_keeps_requests_from_sharing_blocks(base):
    def cached(**extra):
        body = {"messages": [{"role": "user", "content": "A salted question, long enough for blocks. " * 3}],
                "max_tokens": 1, **extra}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached(cache_salt="tenant-a") == 0  # salts no other request has: nothing to share
    assert cached(cache_salt="tenant-b") == 0  # the same prompt, another salt: nothing shared
    assert cached(cache_salt="tenant-a") > 0
    r = httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "cache_salt": 7}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_smollm2_chat_and_reuse(smollm2_dir):
    llm = pyllm.LLM(str(smollm2_dir), show_progress=False)
    with serving(llm, smollm2_dir.name) as (url, _):
        c = client(url)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        answer = c.chat.completions.create(model=smollm2_dir.name, messages=messages, max_tokens=16, temperature=0)
        assert "Paris" in answer.choices[0].message.content
        messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                     {"role": "user", "content": "And of Italy?"}]
        chunks = list(c.chat.completions.create(model=smollm2_dir.name, messages=messages, max_tokens=16,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= full_blocks(answer.usage.prompt_tokens)
        assert text == llm.generate(llm.tokenizer.encode_chat(messages), max_tokens=16).text

        prompts = ["The tallest mountain is", "def add(a, b):", "Roses are red,", "In 1492,"]
        batched = run_concurrently(url, [{"prompt": p, "max_tokens": 12, "ignore_eos": True, "temperature": 0}
                                         for p in prompts])
        assert batched == [llm.generate(p, max_tokens=12, ignore_eos=True).text for p in prompts]


# ---- concurrency, disconnects, shutdown ----------------------------------------------------------

def run_concurrently(url, bodies, path="/v1/completions") -> list[str]:
    """Stream every body at once over its own connection -> the texts, in order. A body with
    messages goes to /v1/chat/completions."""
    async def one(http, body):
        text = ""
        async with http.stream("POST", url + ("/v1/chat/completions" if "messages" in body else path),
                               json={**body, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["text"] if "text" in choice else choice["delta"].get("content", "")
        return text

    async def main():
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*(one(http, body) for body in bodies))
    return asyncio.run(main())


def test_64_concurrent_clients_match_one_at_a_time(base, llm):
    """Every fourth client asks for logprobs, and four more are held to a JSON schema meanwhile."""
    prompts = [f"Story {i}:" for i in range(64)]
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["n"], "additionalProperties": False}
    constrained = [{"messages": [{"role": "user", "content": f"Number {i}"}], "max_tokens": 40, "seed": i,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
                   for i in range(4)]
    texts = run_concurrently(base, [{"prompt": p, "max_tokens": 16, "ignore_eos": True, "temperature": 0,
                                     **({"logprobs": 2} if i % 4 == 0 else {})} for i, p in enumerate(prompts)]
                             + constrained)
    assert texts[:64] == [llm.generate(p, max_tokens=16, ignore_eos=True).text for p in prompts]
    assert all(set(json.loads(text)) == {"n"} for text in texts[64:])
    assert metric(base, 'pyllm_batch_size_bucket{le="8"}') < metric(base, 'pyllm_batch_size_bucket{le="16"}')


def test_disconnected_clients_are_dropped(base):
    before = metric(base, 'pyllm_requests_total{endpoint="/v1/completions",status="499"}')
    chat_before = metric(base, 'pyllm_requests_total{endpoint="/v1/chat/completions",status="499"}')

    async def read_a_bit_then_leave(extra):
        body = {"prompt": "Go on", "max_tokens": LONG, "ignore_eos": True, "stream": True, **extra}
        if "response_format" in body:  # a grammar that holds the stream open: a very long string
            body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        async with httpx.AsyncClient(timeout=30) as http, http.stream("POST", base + path, json=body) as r:
            lines = r.aiter_lines()
            for _ in range(3):
                await lines.__anext__()

    async def wait_then_leave():  # not streaming: the server notices the disconnect all the same
        async with httpx.AsyncClient(timeout=0.5) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(base + "/v1/completions", json={"prompt": "Go on", "max_tokens": LONG,
                                                                  "ignore_eos": True})

    async def main():
        long_string = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string",
                                                                                      "minLength": LONG}}}
        await asyncio.gather(*(read_a_bit_then_leave(extra) for extra in
                               [{}, {"logprobs": 5}, {"response_format": long_string}, {"n": 2}]), wait_then_leave())
    asyncio.run(main())
    wait_until(lambda: metric(base, "pyllm_running_sequences") == 0, 5)
    generated = metric(base, "pyllm_generation_tokens_total")
    time.sleep(0.2)
    assert metric(base, "pyllm_generation_tokens_total") == generated  # nothing left generating
    assert metric(base, 'pyllm_requests_total{endpoint="/v1/completions",status="499"}') == before + 4
    assert metric(base, 'pyllm_requests_total{endpoint="/v1/chat/completions",status="499"}') == chat_before + 1
    assert client(base).completions.create(model=MODEL, prompt="still here", max_tokens=2).choices


def test_sigterm_lets_streams_finish(tiny_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pyllm", "serve", "--model", str(tiny_dir), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url), 60)
        body = {"prompt": "Go on", "max_tokens": 1000, "ignore_eos": True, "stream": True,  # < the 5 s grace, if busy
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-3][6:])["choices"][0]["finish_reason"] == "length"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 1000
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_shutdown_ends_streams_after_grace(llm):
    long = {"prompt": "a", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with serving(llm, max_running=1, grace_s=0.3) as (url, server), httpx.Client(timeout=30) as http, \
            http.stream("POST", url + "/v1/completions", json=long) as running, \
            http.stream("POST", url + "/v1/completions", json=long) as waiting:
        lines = running.iter_lines()
        next(lines)
        server.should_exit = True
        rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        frames = [line for line in waiting.iter_lines() if line]
        assert frames[-1] == "data: [DONE]" and "shutting down" in json.loads(frames[-2][6:])["error"]["message"]


def _healthy(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# ---- a KV pool smaller than the load ------------------------------------------------------------

def test_small_kv_pool_preempts_and_loses_nothing(llm):
    """Five 100-token streams on a pool of ~2.5 of them: all run in one batch (nothing is reserved
    for max_tokens), the latest give their blocks back when the pool runs out and recompute later,
    and every answer equals its run alone."""
    block_bytes = llm.model.kv_pool().block_bytes
    blocks = int(2.5 * 100 / BLOCK_TOKENS)
    bodies = [{"prompt": f"P{i}:", "max_tokens": 96, "ignore_eos": True, "temperature": 0} for i in range(5)]
    alone = [llm.generate(b["prompt"], max_tokens=96, ignore_eos=True).text for b in bodies]
    with serving(llm, kv_memory_gb=blocks * block_bytes / 2**30) as (url, server):
        assert server.engine.scheduler.pool.n_blocks == blocks
        assert run_concurrently(url, bodies) == alone
        assert max(server.engine.scheduler.batch_sizes) == 5
        stats = server.engine.scheduler.stats()
        assert stats["blocks_used"] == 0 and stats["blocks_cached"] + stats["blocks_free"] == blocks
        assert stats["preemptions"] > 0
        r = httpx.post(url + "/v1/completions", json={"prompt": "x" * (blocks * BLOCK_TOKENS), "max_tokens": 1},
                       timeout=10)
        assert r.status_code == 400 and "MiB" in r.json()["error"]["message"]
