"""OpenAI request validation and response shapes for /v1/chat/completions and /v1/completions.

Every field either works as OpenAI documents it, is accepted because it cannot change the output
(user, metadata, ...), or is accepted only at its neutral value (n=1, logprobs off, no tools, ...):
anything else is a 400 naming the field, never silently ignored.
"""

import time
import uuid
from dataclasses import dataclass, field

from ..errors import PyllmError
from ..sampling import SamplingParams


class RequestError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


OPENAI_TEMPERATURE = 1.0  # OpenAI's default when a request gives none (pyllm's own default is greedy)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "repetition_penalty", "ignore_eos")
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", *SAMPLING_FIELDS}
# fields that cannot change the generated text
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                  "prompt_cache_retention", "parallel_tool_calls"}
# fields that change the output, accepted only at the value that means "off"
NEUTRAL_VALUES = {
    "n": (1,), "best_of": (1,), "frequency_penalty": (0,), "presence_penalty": (0,),
    "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},), "echo": (False,), "suffix": ("",),
    "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
    "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (), "prediction": (),
    "reasoning_effort": (), "web_search_options": (), "verbosity": (),
}
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "tools", "functions", "tool_choice",
             "function_call", "response_format", "modalities", "audio", "prediction", "reasoning_effort",
             "web_search_options", "verbosity", "parallel_tool_calls"}
COMPLETION_ONLY = {"prompt", "echo", "suffix", "best_of"}
ALL_FIELDS = COMMON_FIELDS | IGNORED_FIELDS | set(NEUTRAL_VALUES) | CHAT_ONLY | COMPLETION_ONLY
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class GenerationRequest:
    chat: bool
    model: str | None
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None         # None: whatever the context window leaves
    sampling: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False

    def sampling_params(self, n_prompt: int, context: int) -> SamplingParams:
        """The request's sampling once its prompt length is known; checks it fits the context."""
        max_tokens = self.max_tokens if self.max_tokens is not None else context - n_prompt
        if n_prompt + max(max_tokens, 1) > context:
            if self.max_tokens is None:
                message = f"the prompt ({n_prompt} tokens) leaves no room in the context window of {context} tokens"
            else:
                message = (f"the prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
                           f"tokens exceeds the context window of {context} tokens")
            raise RequestError(message, param="messages" if self.chat else "prompt", code="context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens, **{"temperature": OPENAI_TEMPERATURE, **self.sampling})


def _check_fields(body: dict, chat: bool):
    allowed = ALL_FIELDS - (COMPLETION_ONLY if chat else CHAT_ONLY)
    for name, value in body.items():
        if name not in allowed:
            raise RequestError(f"unrecognized request field: {name}", param=name)
        if name in NEUTRAL_VALUES and value is not None and not _is_neutral(value, NEUTRAL_VALUES[name]):
            raise RequestError(f"{name} is not supported by this server", param=name, code="unsupported_parameter")


def _is_neutral(value, neutral) -> bool:
    # True == 1 in Python, so bool-ness must agree: n=true is not n=1
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


def _int_field(body, name):
    value = body.get(name)
    if value is not None and (type(value) is not int or value < 1):
        raise RequestError(f"{name} must be an integer >= 1", param=name)
    return value


def _common(body: dict, chat: bool) -> GenerationRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_fields(body, chat)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    stream = False if body.get("stream") is None else body["stream"]
    options = body.get("stream_options")
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", param="stream")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        raise RequestError("stream_options must be {\"include_usage\": bool}", param="stream_options")
    if options is not None and not stream:
        raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
    max_tokens = _int_field(body, "max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        if max_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        max_tokens = _int_field(body, "max_completion_tokens")
    sampling = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    stop = sampling.get("stop", [])
    if not isinstance(stop, (str, list)) or isinstance(stop, list) and len(stop) > 4:
        raise RequestError("stop must be a string or a list of at most 4 strings", param="stop")
    if not isinstance(sampling.get("ignore_eos", False), bool):
        raise RequestError("ignore_eos must be a boolean", param="ignore_eos")
    try:  # validates every sampling field now, before the prompt is tokenized
        SamplingParams(**sampling)
    except PyllmError as exc:  # its messages start with the field's name
        raise RequestError(str(exc), param=str(exc).split()[0]) from None
    return GenerationRequest(chat, model, max_tokens=max_tokens, sampling=sampling, stream=stream,
                             include_usage=bool(options and options.get("include_usage")))


def parse_chat(body) -> GenerationRequest:
    request = _common(body, chat=True)
    request.messages = _messages(body.get("messages"))
    return request


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message["role"] not in ROLES:
        raise RequestError(f"{where} needs a role: one of {', '.join(ROLES)}", param=where)
    for name, value in message.items():
        if name not in ("role", "content") and value not in (None, [], ""):
            raise RequestError(f"{where}.{name} is not supported by this server", param=f"{where}.{name}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise RequestError(f"{where}.content: only text parts are supported", param=f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    return {"role": ROLES[message["role"]], "content": content}


def parse_completion(body) -> GenerationRequest:
    request = _common(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    request.prompt = _prompt(prompt)
    return request


def _prompt(prompt):
    is_ids = isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not is_ids:
        raise RequestError("prompt must be a non-empty string or token id list (one prompt per request)",
                           param="prompt")
    return prompt


def parse_tokenize(body):
    """/tokenize takes a model (optional) and either a prompt or chat messages -> (model, messages, prompt)."""
    if not isinstance(body, dict) or set(body) - {"model", "prompt", "messages"} or \
            ("prompt" in body) == ("messages" in body):
        raise RequestError("/tokenize takes {\"model\", \"prompt\"} or {\"model\", \"messages\"}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    if "prompt" in body:
        return model, None, _prompt(body["prompt"])
    return model, _messages(body["messages"]), None


class Shaper:
    """Builds one request's response objects: whole, streamed chunks, usage."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def whole(self, text: str, finish_reason: str, usage) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return self._envelope(self.object, [choice], usage=usage_json(usage))

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        extra = {"usage": None} if self.include_usage else {}
        return self._envelope(self.object + ".chunk" if self.chat else self.object, [choice], **extra)

    def usage_chunk(self, usage) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else self.object, [], usage=usage_json(usage))


def usage_json(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}
