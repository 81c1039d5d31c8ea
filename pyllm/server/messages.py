"""Chat messages as OpenAI clients send them -> the plain dicts the chat template renders.

Roles: system (and developer, its new name), user, assistant (text and/or tool_calls) and tool
(a tool's result, answering a tool_call_id). Content is a string or a list of text parts.
"""

import json

from .errors import RequestError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
EXTRA_FIELDS = {"assistant": {"tool_calls", "name", "refusal"}, "tool": {"tool_call_id", "name"},
                "user": {"name"}, "system": {"name"}, "developer": {"name"}}


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message["role"] not in ROLES:
        raise RequestError(f"{where} needs a role: one of {', '.join(ROLES)}", param=where)
    role = message["role"]
    for name, value in message.items():
        if name not in ("role", "content", *EXTRA_FIELDS[role]) and value not in (None, [], ""):
            raise RequestError(f"{where}.{name} is not supported by this server", param=f"{where}.{name}")
    out = {"role": ROLES[role], "content": _content(message.get("content"), where,
                                                    optional=bool(message.get("tool_calls")))}
    if message.get("tool_calls"):
        out["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise RequestError(f"{where}.tool_call_id must be a string", param=f"{where}.tool_call_id")
        out["tool_call_id"] = message["tool_call_id"]
    return out


def _content(content, where: str, optional: bool) -> str:
    if content is None and optional:
        return ""
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise RequestError(f"{where}.content: only text parts are supported", param=f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    return content


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant's earlier calls, their arguments parsed (chat templates render them as JSON)."""
    if not isinstance(calls, list):
        raise RequestError(f"{where} must be a list", param=where)
    parsed = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str)):
            raise RequestError(f"{where}[{i}] needs function.name and function.arguments (a JSON string)",
                               param=f"{where}[{i}]")
        try:
            arguments = json.loads(function["arguments"])
        except ValueError:
            raise RequestError(f"{where}[{i}].function.arguments is not valid JSON", param=f"{where}[{i}]") from None
        parsed.append({"id": call.get("id"), "type": "function",
                       "function": {"name": function["name"], "arguments": arguments}})
    return parsed
