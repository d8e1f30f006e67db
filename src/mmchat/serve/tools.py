"""Tool calling over the OpenAI API: `tools`, `tool_choice`, `parallel_tool_calls`, assistant messages with
`tool_calls` and `tool` messages, in OpenAI's response shapes.

The model writes calls in its native form, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
(chat/tools.py), under a grammar built from the request's tools: with "required" or a named function only calls
can be written, with "auto" either a plain answer or calls, so a call's arguments always validate against its
tool's schema. The output is turned back into `message.tool_calls` (arguments as a JSON string) and
finish_reason "tool_calls"; while streaming, each call goes out as deltas with its index.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from fastapi import Request

from ..chat.tools import (CALL_CLOSE, CALL_OPEN, Tool, ToolRegistry, parse_tool_calls, prepare_messages,
                          resolve_choice, tool_constraint)
from ..errors import MMChatError
from .openai import APIError


@dataclass
class ToolPlan:
    mode: str             # "none", "auto" or "required" (a named function is "required" with one tool)
    allowed: list[Tool]   # what the model may call
    parallel: bool        # more than one call in one answer

    @property
    def constrained(self) -> bool:
        return self.mode != "none" and bool(self.allowed)


def plan(req) -> ToolPlan | None:
    """The request's tools and tool_choice -> a ToolPlan (None without tools); APIError 400 naming the field."""
    if req.tools is None:
        if req.tool_choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None
    try:
        registry = ToolRegistry.from_openai(req.tools)
    except MMChatError as e:
        raise APIError(400, str(e), "tools") from None
    try:
        mode, allowed = resolve_choice(registry, req.tool_choice)
    except MMChatError as e:
        raise APIError(400, str(e), "tool_choice") from None
    return ToolPlan(mode, allowed, req.parallel_tool_calls is not False)


def chat_messages(req) -> list[dict]:
    """The request's messages as dicts for the chat template (developer is system; tool calls and tool results
    kept with their ids)."""
    out = []
    for m in req.messages:
        d = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            d["content"] = m.text() or None
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def uses_tools(messages: list[dict], tools: ToolPlan | None) -> bool:
    return tools is not None or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def render(llm, messages: list[dict], tools: ToolPlan | None) -> list[int]:
    """Token ids of the prompt: the tools described the way the template (or, for one that knows no tools,
    chat/tools.py) shows them, earlier calls and their results fed back through the template."""
    offered = tools.allowed if tools is not None and tools.mode != "none" else []
    try:
        chat, specs = prepare_messages(messages, offered, llm.template)
        text = llm.template.render(chat, add_generation_prompt=True, tools=specs)
    except MMChatError as e:
        raise APIError(400, str(e), "messages") from None
    return llm.tokenizer.encode(text, add_bos=False)


def constraint(llm, tools: ToolPlan):
    """The grammar of the answer for this plan (None for tool_choice none); a tool schema the grammar compiler
    cannot use is the client's 400."""
    try:
        return tool_constraint(tools.allowed, tools.mode, tools.parallel, llm.tokenizer, llm.config.vocab_size,
                               llm.eos_token_ids)
    except MMChatError as e:
        raise APIError(400, f"the tools cannot be used for constrained calls: {e}", "tools") from None


_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.S)


def _new_id() -> str:
    return "call_" + secrets.token_hex(12)


def _arguments(body: str) -> tuple[str, str] | None:
    """The JSON between the tags -> (name, arguments as JSON text), or None when it is not a whole call."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    return value["name"], json.dumps(value.get("arguments", {}), ensure_ascii=False)


def split_output(text: str) -> tuple[str | None, list[dict]]:
    """A whole answer -> (content, tool_calls with arguments as JSON text). An answer of calls has no content:
    a call cut off by max_tokens is left out (its arguments would not validate)."""
    content, calls = parse_tool_calls(text)
    return (None, calls) if text.lstrip().startswith(CALL_OPEN) else (content, calls)


def finish_reason(reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and reason == "stop" else reason


class CallStream:
    """One streamed choice: text deltas in, OpenAI deltas out. Until the first character it is not known whether
    the answer is text or calls; text then streams as content, and each call goes out once it is complete (so a
    call cut off by max_tokens never reaches the client), as a delta with its index, id, type and name and one
    with its arguments."""

    def __init__(self):
        self.buffer = ""
        self.kind: str | None = None   # None (undecided), "text" or "calls"
        self.done = 0                   # characters of buffer already turned into calls
        self.calls: list[dict] = []     # {"id", "name", "arguments"}

    def feed(self, text: str) -> list[dict]:
        self.buffer += text
        if self.kind is None:
            if not self.buffer.strip():
                return []
            self.kind = "calls" if self.buffer.lstrip().startswith(CALL_OPEN[0]) else "text"
            if self.kind == "text":
                return [{"content": self.buffer}]
        elif self.kind == "text":
            return [{"content": text}] if text else []
        return self._calls()

    def _calls(self) -> list[dict]:
        out = []
        while m := _CALL.search(self.buffer, self.done):
            self.done = m.end()
            parsed = _arguments(m[1])
            if parsed is None:  # cannot happen under the grammar; never send what would not validate
                continue
            call = {"id": _new_id(), "name": parsed[0], "arguments": parsed[1]}
            self.calls.append(call)
            index = len(self.calls) - 1
            out.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                        "function": {"name": call["name"], "arguments": ""}}]})
            out.append({"tool_calls": [{"index": index, "function": {"arguments": call["arguments"]}}]})
        return out

    def finish(self) -> list[dict]:
        """At the end of the answer: text still held back (an answer of only whitespace)."""
        if self.kind is None and self.buffer:
            self.kind = "text"
            return [{"content": self.buffer}]
        return []

    @property
    def complete_calls(self) -> list[dict]:
        return self.calls


# -- the web page's built-in tools ----------------------------------------------------------------------------------
def add_routes(app, read_json):
    """/api/tools: the built-in tools' specs (the web page offers them to the model); /api/tools/route: which tool
    a message asks for (by the tools' example requests), /api/tools/call: run one call here. The calendar lives
    in $MMCHAT_HOME/calendar.db, the same as the terminal chat's."""
    from ..chat import assistant
    registry: list[ToolRegistry] = []

    def builtins() -> ToolRegistry:
        if not registry:
            registry.append(assistant.builtin_tools())
        return registry[0]

    @app.get("/api/tools")
    async def tool_specs():
        return builtins().specs()

    @app.post("/api/tools/route")
    async def tool_route(request: Request):
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("message"), str):
            raise APIError(400, "send {\"message\": TEXT}", "message")
        return {"tool": assistant.route(builtins(), body["message"])}

    @app.post("/api/tools/call")
    async def tool_call(request: Request):
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise APIError(400, "send {\"name\": TOOL, \"arguments\": JSON TEXT}", "name")
        # a bad call or a tool that raises comes back as {"error": ...} in the result, for the model to read
        return {"result": builtins().call(body["name"], body.get("arguments") or "{}")}
