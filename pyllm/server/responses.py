"""Response objects for /v1/chat/completions and /v1/completions: whole, streamed chunks, usage."""

import time
import uuid
from dataclasses import dataclass, field

from .logprobs import LogprobsShaper, merge_completion_logprobs
from .tools import ToolChoice


@dataclass
class ChoiceResult:
    """One choice, gathered from its updates."""
    text: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None

    def add(self, update):
        self.text += update.text
        self.logprobs += update.logprobs
        self.finish_reason = update.finish_reason or self.finish_reason
        if update.prompt_logprobs is not None:
            self.prompt_logprobs = update.prompt_logprobs


@dataclass
class Echo:
    """What echo puts before a completion: its prompt, as text and token ids."""
    text: str
    ids: list[int]


class Shaper:
    """Builds one request's response objects. logprobs: None when the request did not ask;
    echoes: per choice, for completions with echo: true."""

    def __init__(self, chat: bool, model: str, include_usage: bool = False, logprobs: LogprobsShaper | None = None,
                 tool_choice: ToolChoice | None = None, echoes: list[Echo] | None = None):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.logprobs, self.tool_choice, self.echoes = logprobs, tool_choice, echoes
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.text_offsets: dict[int, int] = {}  # streamed completions: characters sent so far, per choice

    @property
    def buffers_calls(self) -> bool:
        """A forced tool call is streamed whole at the end: its text is the call, not content."""
        return self.tool_choice is not None and self.tool_choice.forced

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _tool_calls(self, result: ChoiceResult) -> list[dict] | None:
        if self.tool_choice is None or self.tool_choice.mode == "none" or result.finish_reason != "stop":
            return None
        return self.tool_choice.parse_call(result.text)

    def whole(self, results: list[ChoiceResult], usage) -> dict:
        return self._envelope(self.object, [self._whole_choice(i, r) for i, r in enumerate(results)],
                              usage=usage_json(usage))

    def _whole_choice(self, index: int, result: ChoiceResult) -> dict:
        choice = {"index": index, "logprobs": None, "finish_reason": result.finish_reason}
        if self.chat:
            calls = self._tool_calls(result)
            message = {"role": "assistant", "content": None if calls else result.text}
            if calls:
                message["tool_calls"], choice["finish_reason"] = calls, "tool_calls"
            choice["message"] = message
            if self.logprobs:
                choice["logprobs"] = self.logprobs.chat(result.logprobs)
            return choice
        echo = self.echoes[index] if self.echoes else None
        choice["text"] = (echo.text if echo else "") + result.text
        if self.logprobs:
            generated = self.logprobs.completion([e.token_id for e in result.logprobs], result.logprobs,
                                                 len(echo.text) if echo else 0)
            choice["logprobs"] = merge_completion_logprobs(
                self.logprobs.completion(echo.ids, result.prompt_logprobs), generated) if echo else generated
        return choice

    def first_chunks(self, n_choices: int) -> list[dict]:
        """Chat streams open each choice with its role."""
        return [self._chunk(self._delta(i, {"role": "assistant", "content": ""}, "", None))
                for i in range(n_choices)] if self.chat else []

    def chunks(self, update, result: ChoiceResult) -> list[dict]:
        """The chunks for one update: its text and logprobs, then its finish reason (if it has
        one) in a chunk of its own; result: the choice so far."""
        index, out = update.choice, []
        text = "" if self.buffers_calls else update.text
        logprobs = None
        if self.logprobs and update.logprobs:
            logprobs = self.logprobs.chat(update.logprobs) if self.chat else self.logprobs.completion(
                [e.token_id for e in update.logprobs], update.logprobs, self.text_offsets.get(index, 0))
        self.text_offsets[index] = self.text_offsets.get(index, 0) + len(update.text)
        if text or logprobs:
            out.append(self._chunk(self._delta(index, {"content": text} if text else {}, text, logprobs)))
        if update.finish_reason:
            calls = self._tool_calls(result) if self.chat else None
            delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]} if calls else {}
            out.append(self._chunk(self._delta(index, delta, "", None, "tool_calls" if calls else update.finish_reason)))
        return out

    def _delta(self, index: int, delta: dict, text: str, logprobs, finish_reason=None) -> dict:
        choice = {"index": index, "logprobs": logprobs, "finish_reason": finish_reason}
        choice.update({"delta": delta} if self.chat else {"text": text})
        return choice

    def _chunk(self, choice: dict) -> dict:
        extra = {"usage": None} if self.include_usage else {}
        return self._envelope(self.object + ".chunk" if self.chat else self.object, [choice], **extra)

    def usage_chunk(self, usage) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else self.object, [], usage=usage_json(usage))


def usage_json(usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}
