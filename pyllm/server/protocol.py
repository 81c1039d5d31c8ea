"""OpenAI request validation for /v1/chat/completions and /v1/completions.

Every field either works as OpenAI documents it, is accepted because it cannot change the output
(user, metadata, ...), or is accepted only at its neutral value (best_of=1, no suffix, ...):
anything else is a 400 naming the field, never silently ignored.
"""

from dataclasses import dataclass, field

from ..errors import PyllmError
from ..sampling import MAX_TOP_LOGPROBS, SamplingParams
from .errors import RequestError
from .messages import parse_messages
from .tools import ToolChoice, parse_response_format, parse_tools

OPENAI_TEMPERATURE = 1.0  # OpenAI's default when a request gives none (pyllm's own default is greedy)
MAX_N = 16                # choices per prompt
MAX_CHOICES = 64          # choices per request: prompts x n
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "repetition_penalty", "ignore_eos",
                   "presence_penalty", "frequency_penalty")
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "n", "logprobs", "logit_bias", "cache_salt",
                 *SAMPLING_FIELDS}
# fields that cannot change the generated text
IGNORED_FIELDS = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
                  "prompt_cache_retention", "parallel_tool_calls"}
# fields that change the output, accepted only at the value that means "off"
NEUTRAL_VALUES = {
    "best_of": (1,), "suffix": ("",), "functions": ([],), "function_call": ("none",),
    "modalities": (["text"],), "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (),
    "verbosity": (),
}
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "tools", "functions", "tool_choice",
             "function_call", "response_format", "modalities", "audio", "prediction", "reasoning_effort",
             "web_search_options", "verbosity", "parallel_tool_calls"}
COMPLETION_ONLY = {"prompt", "echo", "suffix", "best_of"}
ALL_FIELDS = COMMON_FIELDS | IGNORED_FIELDS | set(NEUTRAL_VALUES) | CHAT_ONLY | COMPLETION_ONLY


@dataclass
class GenerationRequest:
    chat: bool
    model: str | None
    messages: list[dict] | None = None
    prompts: list | None = None           # completions: each a string or a token id list; one choice set each
    max_tokens: int | None = None         # None: whatever the context window leaves
    sampling: dict = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    logprobs: int | None = None           # None: off; else how many top alternatives per token
    echo: bool = False                    # completions: the prompt (and its logprobs) comes first
    response_schema: dict | None = None   # a JSON schema the output must follow
    tool_choice: ToolChoice | None = None
    cache_salt: str = ""                  # KV blocks are shared only among requests with the same salt (vLLM's)

    def sampling_params(self, n_prompt: int, context: int, vocab_size: int) -> SamplingParams:
        """The request's sampling once its prompt length is known; checks it fits the context."""
        max_tokens = self.max_tokens if self.max_tokens is not None else context - n_prompt
        if n_prompt + max(max_tokens, 1) > context:
            if self.max_tokens is None:
                message = f"the prompt ({n_prompt} tokens) leaves no room in the context window of {context} tokens"
            else:
                message = (f"the prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
                           f"tokens exceeds the context window of {context} tokens")
            raise RequestError(message, param="messages" if self.chat else "prompt", code="context_length_exceeded")
        outside = [t for t in self.sampling.get("logit_bias", {}) if t >= vocab_size]
        if outside:
            raise RequestError(f"logit_bias: token id {outside[0]} is outside the vocabulary of {vocab_size}",
                               param="logit_bias")
        return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs,
                              # echo always scores the prompt (max_tokens may be 0); the logprobs show if asked
                              prompt_logprobs=(self.logprobs or 0) if self.echo else None,
                              **{"temperature": OPENAI_TEMPERATURE, **self.sampling})


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


def _int_field(body, name, low=1, high=None):
    value = body.get(name)
    if value is not None and (type(value) is not int or value < low or high is not None and value > high):
        raise RequestError(f"{name} must be an integer >= {low}" + (f" and <= {high}" if high is not None else "")
                           + f", not {value!r}", param=name)
    return value


def _bool_field(body, name) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise RequestError(f"{name} must be a boolean", param=name)
    return bool(value)


def _logit_bias(value) -> dict[int, float]:
    """JSON object keys are strings: {"50256": -100} -> {50256: -100}."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isdigit() for k in value):
        raise RequestError("logit_bias must map token ids (as strings) to numbers", param="logit_bias")
    return {int(k): v for k, v in value.items()}


def _logprobs(body: dict, chat: bool) -> int | None:
    if not chat:
        return _int_field(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    top = _int_field(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if not _bool_field(body, "logprobs"):
        if top is not None:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def _common(body: dict, chat: bool) -> GenerationRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_fields(body, chat)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    stream = _bool_field(body, "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and isinstance(options.get("include_usage", False), bool)):
        raise RequestError("stream_options must be {\"include_usage\": bool}", param="stream_options")
    if options is not None and not stream:
        raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
    max_tokens = _int_field(body, "max_tokens", 0 if body.get("echo") is True else 1)
    if chat and body.get("max_completion_tokens") is not None:
        if max_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        max_tokens = _int_field(body, "max_completion_tokens")
    sampling = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    if body.get("logit_bias") is not None:
        sampling["logit_bias"] = _logit_bias(body["logit_bias"])
    stop = sampling.get("stop", [])
    if not isinstance(stop, (str, list)) or isinstance(stop, list) and len(stop) > 4:
        raise RequestError("stop must be a string or a list of at most 4 strings", param="stop")
    if not isinstance(sampling.get("ignore_eos", False), bool):
        raise RequestError("ignore_eos must be a boolean", param="ignore_eos")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise RequestError("cache_salt must be a non-empty string", param="cache_salt")
    request = GenerationRequest(chat, model, max_tokens=max_tokens, sampling=sampling, stream=stream,
                                include_usage=bool(options and options.get("include_usage")),
                                n=_int_field(body, "n", 1, MAX_N) or 1, logprobs=_logprobs(body, chat),
                                echo=_bool_field(body, "echo"), cache_salt=salt or "")
    try:  # validates every sampling field now, before the prompt is tokenized
        request.sampling_params(0, 1 << 62, 1 << 62)
    except PyllmError as exc:  # its messages start with the field's name
        raise RequestError(str(exc), param=str(exc).split()[0]) from None
    return request


def parse_chat(body) -> GenerationRequest:
    request = _common(body, chat=True)
    request.messages = parse_messages(body.get("messages"))
    request.response_schema = parse_response_format(body.get("response_format"))
    request.tool_choice = parse_tools(body.get("tools"), body.get("tool_choice"))
    if request.response_schema is not None and request.tool_choice and request.tool_choice.forced:
        raise RequestError("give response_format or a forced tool_choice, not both", param="tool_choice")
    return request


def parse_completion(body) -> GenerationRequest:
    request = _common(body, chat=False)
    if request.echo and request.stream:
        raise RequestError("echo is not supported with stream: true", param="echo", code="unsupported_parameter")
    if request.max_tokens == 0 and not request.echo:
        raise RequestError("max_tokens must be an integer >= 1 (0 only with echo: true)", param="max_tokens")
    request.prompts = parse_prompts(body.get("prompt"))
    if len(request.prompts) * request.n > MAX_CHOICES:
        raise RequestError(f"{len(request.prompts)} prompts x n={request.n} is more than the "
                           f"{MAX_CHOICES} choices one request may ask for", param="n")
    return request


def parse_prompts(prompt) -> list:
    """A string, a token id list, or a non-empty list of either (a batch) -> the list of prompts."""
    batch = prompt if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt) \
        else [prompt]
    for one in batch:
        is_ids = isinstance(one, list) and one and all(type(t) is int for t in one)
        if not (isinstance(one, str) and one) and not is_ids:
            raise RequestError("prompt must be a non-empty string, a token id list, or a list of either",
                               param="prompt")
    return batch


def parse_tokenize(body):
    """/tokenize takes a model (optional), add_special_tokens (for a prompt), and either a prompt
    or chat messages -> (model, messages, prompt, add_special_tokens)."""
    if not isinstance(body, dict) or set(body) - {"model", "prompt", "messages", "add_special_tokens"} or \
            ("prompt" in body) == ("messages" in body):
        raise RequestError("/tokenize takes {\"model\", \"prompt\", \"add_special_tokens\"} or "
                           "{\"model\", \"messages\"}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    add_special = body.get("add_special_tokens", True)
    if not isinstance(add_special, bool):
        raise RequestError("add_special_tokens must be a boolean", param="add_special_tokens")
    if "prompt" in body:
        prompts = parse_prompts(body["prompt"])
        if len(prompts) != 1:
            raise RequestError("/tokenize takes one prompt", param="prompt")
        return model, None, prompts[0], add_special
    return model, parse_messages(body["messages"]), None, add_special


def parse_detokenize(body) -> list[int]:
    if not isinstance(body, dict) or set(body) - {"model", "tokens"} or not isinstance(body.get("tokens"), list) \
            or not all(type(t) is int and t >= 0 for t in body["tokens"]):
        raise RequestError("/detokenize takes {\"model\", \"tokens\": [token ids]}", param="tokens")
    return body["tokens"]
