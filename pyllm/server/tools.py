"""Structured outputs and tool calls: response_format and tools/tool_choice -> a JSON schema the
output must follow, and the assistant message a finished output becomes.

A forced call (tool_choice "required" or a named function) is generated as one JSON document
{"name": ..., "arguments": {...}} under a grammar whose arguments follow the function's parameter
schema. With "auto" the model is only told about the tools (through its chat template) and a call
is recognised when it writes one, as <tool_call>{...}</tool_call> (Hermes/Qwen style) or as that
JSON document alone.
"""

import json
import re
import uuid
from dataclasses import dataclass, field

from .errors import RequestError

ANY_OBJECT = {"type": "object"}
TOOL_CALL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class ToolChoice:
    tools: list[dict]                   # [{"name", "description", "parameters"}]
    mode: str = "auto"                  # "none" | "auto" | "required" | "function"
    name: str | None = None             # the function a named tool_choice forces
    template_tools: list[dict] = field(default_factory=list)  # the tools as the chat template gets them

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")

    def call_schema(self) -> dict:
        """The schema of a forced call: one of the allowed functions, with its arguments."""
        options = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                    "required": ["name", "arguments"], "additionalProperties": False}
                   for t in self.tools if self.mode == "required" or t["name"] == self.name]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def parse_call(self, text: str) -> list[dict] | None:
        """The output's tool calls in OpenAI's shape, or None when it holds no valid call."""
        found = TOOL_CALL_TAG.findall(text) or [text.strip()]
        calls = []
        for candidate in found:
            try:
                call = json.loads(candidate)
            except ValueError:
                return None
            known = {t["name"] for t in self.tools}
            if not (isinstance(call, dict) and call.get("name") in known and isinstance(call.get("arguments"), dict)):
                return None
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                          "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}})
        return calls


def parse_response_format(value) -> dict | None:
    """response_format -> the JSON schema the output must follow (None: free text)."""
    if value is None or value == {"type": "text"}:
        return None
    if value == {"type": "json_object"}:
        return ANY_OBJECT
    spec = value.get("json_schema") if isinstance(value, dict) and value.get("type") == "json_schema" else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str) or \
            not isinstance(spec.get("schema", {}), dict) or not isinstance(spec.get("strict", False), (bool, type(None))):
        raise RequestError('response_format must be {"type": "text"}, {"type": "json_object"} or {"type": '
                           '"json_schema", "json_schema": {"name", "schema": {...}, "strict"}}',
                           param="response_format")
    return spec.get("schema") or ANY_OBJECT


def parse_tools(tools, tool_choice) -> ToolChoice | None:
    if tools in (None, []):
        if tool_choice not in (None, "none"):
            raise RequestError("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", param="tools")
    parsed = [_tool(t, i) for i, t in enumerate(tools)]
    names = [t["name"] for t in parsed]
    choice = ToolChoice(parsed, template_tools=[{"type": "function", "function": t} for t in parsed])
    if tool_choice in (None, "auto", "none", "required"):
        choice.mode = tool_choice or "auto"
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and \
            isinstance(tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str):
        choice.mode, choice.name = "function", tool_choice["function"]["name"]
        if choice.name not in names:
            raise RequestError(f"tool_choice names the function {choice.name!r}, which is not among the tools "
                               f"({', '.join(names)})", param="tool_choice")
    else:
        raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                           '{"name": ...}}', param="tool_choice")
    return choice


def _tool(tool, index: int) -> dict:
    where = f"tools[{index}]"
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RequestError(f'{where} must be {{"type": "function", "function": {{"name", "description", '
                           f'"parameters"}}}}', param=where)
    parameters = function.get("parameters") or ANY_OBJECT
    if not isinstance(parameters, dict):
        raise RequestError(f"{where}.function.parameters must be a JSON schema object",
                           param=f"{where}.function.parameters")
    return {"name": function["name"], "description": str(function.get("description") or ""),
            "parameters": parameters}


def tools_prompt(choice: ToolChoice) -> str:
    """A system message for chat templates that do not render tools themselves."""
    listing = "\n".join(json.dumps(t) for t in choice.template_tools)
    return ("You may call functions. The available functions, as JSON:\n" + listing + "\nTo call one, reply "
            'with <tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>.')


def messages_for_template(messages: list[dict], choice: ToolChoice | None, renders_tools: bool) -> list[dict]:
    """A template that knows tools gets them as they are; for one that does not, the tools become a
    system message and earlier calls become <tool_call> text in the assistant's content."""
    if renders_tools or choice is None:
        return messages
    out = [{**m, "content": m["content"] + "".join(
        f"<tool_call>{json.dumps(c['function'])}</tool_call>" for c in m.get("tool_calls", []))} for m in messages]
    if out[0]["role"] == "system":
        return [{**out[0], "content": out[0]["content"] + "\n\n" + tools_prompt(choice)}, *out[1:]]
    return [{"role": "system", "content": tools_prompt(choice)}, *out]
