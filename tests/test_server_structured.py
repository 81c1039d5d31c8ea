"""Structured outputs and tool calls through the official openai client: every sampled document
parses and validates under jsonschema (code nobody here wrote); forced tool calls come back as
tool_calls whose arguments validate; tools under "auto" reach the prompt."""

import json

import httpx
import jsonschema
import pytest

import pyllm
from conftest import make_tiny_model
from test_server import client, serving

MODEL = "tiny-structured"
HELLO = [{"role": "user", "content": "Describe a person."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"enum": ["cat", "dog", None]}, "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["name", "age", "pet", "tags"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("structured") / MODEL
    make_tiny_model(model_dir, max_position_embeddings=2048)
    with serving(pyllm.LLM(str(model_dir), show_progress=False), MODEL) as (base, _):
        yield base


def test_json_schema_outputs_validate_for_20_seeds(url):
    c = client(url)
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(20):
        out = c.chat.completions.create(model=MODEL, messages=HELLO, temperature=1.0, seed=seed, max_tokens=120,
                                        response_format=response_format)
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)
    anything = c.chat.completions.create(model=MODEL, messages=HELLO, temperature=1.0, seed=1, max_tokens=120,
                                         response_format={"type": "json_object"}, n=2)
    assert all(isinstance(json.loads(ch.message.content), dict) for ch in anything.choices
               if ch.finish_reason == "stop")


def test_forced_tool_calls_validate(url):
    c = client(url)
    for seed, tool_choice in enumerate(["required", {"type": "function", "function": {"name": "get_time"}}] * 3):
        out = c.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER, TIME], tool_choice=tool_choice,
                                        temperature=1.0, seed=seed, max_tokens=120)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        if tool_choice != "required":
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    chunks = list(c.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER], tool_choice="required",
                                            temperature=1.0, seed=0, max_tokens=120, stream=True))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and len(deltas) == 1
    jsonschema.validate(json.loads(deltas[0].function.arguments), WEATHER["function"]["parameters"])


def test_auto_tools_reach_the_prompt_and_calls_are_parsed(url):
    c = client(url)
    plain = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0)
    with_tools = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0,
                                           tools=[WEATHER], tool_choice="auto")
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + len("get_weather")
    assert with_tools.choices[0].message.tool_calls is None  # a random model writes no call
    history = HELLO + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    follow_up = c.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=4)
    assert follow_up.choices[0].message is not None

    from pyllm.server.tools import parse_tools
    choice = parse_tools([WEATHER], "auto")
    calls = choice.parse_call('Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                              '</tool_call>')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Oslo"})]
    assert choice.parse_call('<tool_call>{"name": "nope", "arguments": {}}</tool_call>') is None
    assert choice.parse_call("just words") is None


def test_bad_structured_requests_are_400_and_server_stays_healthy(url):
    for body in [{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                    "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}},
                 {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
                 {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}]:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, **body}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["message"] and r.json()["error"]["type"] == \
            "invalid_request_error", body
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert client(url).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
