"""Tools the model can call: a registry built from Python functions (their signature and docstring make the
OpenAI function schema) or explicit schemas, the built-ins (calendar and reminders, the date and time, a safe
calculator), constrained tool calls and the round trip through the chat template.

The model writes a call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. With tool_choice
"required" or a named function the output is constrained to such calls, whose arguments always validate
against the tool's schema; with "auto" the grammar lets the model choose between a plain answer and calls;
with "none" it answers in text.

    tools = ToolRegistry.builtin(Calendar("cal.db"))
    @tools.register
    def weather(city: str) -> str:
        '''The weather in a city.

        Args:
            city: the city's name'''
    answer = run_chat(llm, [{"role": "user", "content": "What do I have tomorrow?"}], tools)
"""
from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
import secrets
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from ..constrain import JSON_OPTIONS, Constraint, check_json_schema, validate
from ..errors import MMChatError
from .calendar import DAY_PATTERN, TIME_PATTERN, Calendar

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict                       # a JSON schema of an object
    func: Callable[..., Any] | None = None  # None: the caller runs it (tools that came in an OpenAI request)
    # (a user's request, the arguments of the call it should make): shown to the model as example exchanges,
    # which a small model follows far better than a description
    examples: list[tuple[str, dict]] = field(default_factory=list)

    def spec(self) -> dict:
        """The OpenAI `tools` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


# -- schemas from Python functions ----------------------------------------------------------------------------
def _type_schema(hint) -> dict:
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _type_schema(rest[0]) if len(rest) == 1 else {"anyOf": [_type_schema(a) for a in rest]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set) or hint in (list, tuple, set):
        return {"type": "array", **({"items": _type_schema(args[0])} if args else {})}
    if origin is dict or hint is dict:
        return {"type": "object"}
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if hint in simple:
        return {"type": simple[hint]}
    raise MMChatError(f"cannot describe the type {hint!r} as JSON; give the tool's parameters explicitly")


def _doc_parts(doc: str) -> tuple[str, dict[str, str]]:
    """A docstring -> (description, {argument: its description}), from a Google-style `Args:` section or
    reST `:param name:` lines."""
    doc = inspect.cleandoc(doc or "")
    args: dict[str, str] = {}
    for m in re.finditer(r"^:param\s+(\w+):\s*(.+)$", doc, re.M):
        args[m[1]] = m[2].strip()
    section = re.search(r"^(Args|Arguments|Parameters):\s*\n((?:[ \t]+.*\n?|\s*\n)+)", doc, re.M)
    if section:
        for m in re.finditer(r"^[ \t]+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", section[2], re.M):
            args[m[1]] = m[2].strip()
    description = re.split(r"\n\s*\n|^(?:Args|Arguments|Parameters|Returns|Raises):|^:param", doc, maxsplit=1,
                           flags=re.M)[0]
    return " ".join(description.split()), args


def tool_from_function(func: Callable, name: str | None = None, description: str | None = None,
                       parameters: dict | None = None) -> Tool:
    """A Tool from a Python function: name, description and argument descriptions from its docstring, the
    parameters' JSON schema from its type hints (arguments without a default are required)."""
    name = name or func.__name__
    doc_description, doc_args = _doc_parts(func.__doc__ or "")
    if parameters is None:
        hints = typing.get_type_hints(func)
        props, required = {}, []
        for p in inspect.signature(func).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            schema = _type_schema(hints.get(p.name, p.annotation))
            if p.name in doc_args:
                schema["description"] = doc_args[p.name]
            props[p.name] = schema
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
        parameters = {"type": "object", "properties": props, "required": required}
    return make_tool(name, description if description is not None else doc_description, parameters, func)


def make_tool(name: str, description: str, parameters: dict | None, func: Callable | None = None,
              examples: list[tuple[str, dict]] = ()) -> Tool:
    """A checked Tool: a valid name and a valid JSON schema of an object; MMChatError naming the tool if not."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise MMChatError(f"tool name {name!r} is not valid; use 1-64 letters, digits, _ or -")
    parameters = parameters if parameters is not None else {"type": "object", "properties": {}}
    parameters = check_json_schema(parameters, f"the parameters of tool '{name}'")
    if parameters.get("type", "object") != "object":
        raise MMChatError(f"the parameters of tool '{name}' must be a JSON schema of an object "
                          f"(got type {parameters.get('type')!r})")
    for request, arguments in examples:
        validate(arguments, parameters, f"the example arguments of tool '{name}'")
    return Tool(name, description or "", parameters, func, list(examples))


class ToolRegistry:
    """Named tools. `register` is also a decorator; `call` runs one call and returns its result as text."""

    def __init__(self, tools: list[Tool] = ()):
        self.tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, tool: Tool) -> Tool:
        if tool.name in self.tools:
            raise MMChatError(f"a tool named '{tool.name}' is already registered")
        self.tools[tool.name] = tool
        return tool

    def register(self, func: Callable | None = None, *, name: str | None = None, description: str | None = None,
                 parameters: dict | None = None):
        """`@tools.register` or `tools.register(func, name=..., parameters={...})`."""
        def wrap(f):
            self.add(tool_from_function(f, name, description, parameters))
            return f
        return wrap(func) if func is not None else wrap

    @classmethod
    def from_openai(cls, specs: list[dict]) -> "ToolRegistry":
        """The `tools` of an OpenAI request (the caller runs them; they have no Python function here)."""
        if not isinstance(specs, list):
            raise MMChatError("tools must be a list of {\"type\": \"function\", \"function\": {...}}")
        reg = cls()
        for spec in specs:
            fn = spec.get("function") if isinstance(spec, dict) else None
            if not isinstance(spec, dict) or spec.get("type", "function") != "function" or not isinstance(fn, dict):
                raise MMChatError(f"each tool must be {{\"type\": \"function\", \"function\": {{...}}}}; "
                                  f"got {str(spec)[:80]}")
            reg.add(make_tool(fn.get("name"), fn.get("description", ""), fn.get("parameters")))
        return reg

    @classmethod
    def builtin(cls, calendar: Calendar | None = None) -> "ToolRegistry":
        """The date and time, the calculator and (given a calendar) the calendar and reminder tools."""
        reg = cls([make_tool("current_datetime", "The current date, weekday and time.",
                             {"type": "object", "properties": {}}, current_datetime,
                             [("What time is it?", {}), ("What is the date today?", {})]),
                   make_tool("calculator", "Evaluate an arithmetic expression, e.g. (12.5 * 4) / 3 or sqrt(2).",
                             {"type": "object", "properties": {"expression": {
                                 "type": "string", "pattern": r"^[0-9a-z+\-*/%^(). ,]{1,80}$"}},
                              "required": ["expression"]}, calculate,
                             [("What is 12 times 7?", {"expression": "12 * 7"}),
                              ("How much is 120 divided by 8, plus 3?", {"expression": "120 / 8 + 3"})])])
        for tool in calendar_tools(calendar) if calendar is not None else ():
            reg.add(tool)
        return reg

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def specs(self) -> list[dict]:
        return [t.spec() for t in self.tools.values()]

    def call(self, name: str, arguments: str | dict) -> str:
        """Run one call; the result as JSON text. Bad arguments and a tool that raises give an error result
        ({"error": ...}) rather than an exception, so the model sees it and the conversation goes on."""
        tool = self.tools.get(name)
        if tool is None:
            return json.dumps({"error": f"there is no tool named '{name}'"})
        if tool.func is None:
            raise MMChatError(f"tool '{name}' has no Python function here; its caller must run it")
        try:
            args = json.loads(arguments) if isinstance(arguments, str) else dict(arguments)
            if not isinstance(args, dict):
                raise MMChatError("the arguments must be a JSON object")
            validate(args, tool.parameters, f"the arguments of '{name}'")
        except (json.JSONDecodeError, MMChatError, TypeError, ValueError) as e:
            return json.dumps({"error": f"bad arguments for '{name}': {e}"})
        try:
            result = tool.func(**args)
        except Exception as e:  # a tool's own failure is the model's (and user's) to see, not a crash
            return json.dumps({"error": f"{name} failed: {e}"})
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


# -- built-in tools -------------------------------------------------------------------------------------------
def current_datetime() -> dict:
    now = datetime.now().astimezone()
    return {"date": now.date().isoformat(), "weekday": now.strftime("%A"), "time": now.strftime("%H:%M"),
            "timezone": now.strftime("%Z")}


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
          "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
          "floor": math.floor, "ceil": math.ceil}
_CONSTS = {"pi": math.pi, "e": math.e}


def calculate(expression: str) -> dict:
    """Arithmetic on numbers only: the expression is parsed with `ast` and walked node by node (no eval), so
    names, attributes and calls other than a few math functions are refused; huge powers too."""
    try:
        tree = ast.parse(str(expression).replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise MMChatError(f"'{expression}' is not an arithmetic expression") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(b) > 1000 or abs(a) > 1e100):
                raise MMChatError("that power is too large to compute")
            if isinstance(node.op, (ast.Mult,)) and isinstance(a, int) and isinstance(b, int) and \
                    abs(a).bit_length() + abs(b).bit_length() > 4096:
                raise MMChatError("that product is too large to compute")
            return _BINARY[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
                and not node.keywords:
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise MMChatError(f"'{ast.unparse(node)}' is not allowed; use numbers, + - * / // % ** and "
                          f"{', '.join(_FUNCS)}")
    try:
        value = ev(tree)
    except ZeroDivisionError:
        raise MMChatError("division by zero") from None
    except (ValueError, OverflowError, TypeError) as e:
        raise MMChatError(f"cannot compute '{expression}': {e}") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return {"expression": expression, "result": value}


def calendar_tools(cal: Calendar) -> list[Tool]:
    day = {"type": "string", "pattern": DAY_PATTERN, "description": "YYYY-MM-DD, today, tomorrow or a weekday"}
    time = {"type": "string", "pattern": TIME_PATTERN, "description": "HH:MM, 24-hour"}
    title = {"type": "string", "minLength": 1, "maxLength": 40}
    event_id = {"type": "integer", "minimum": 1}
    obj = lambda props, required: {"type": "object", "properties": props, "required": required}  # noqa: E731
    return [
        make_tool("add_event", "Add an event to the calendar.",
                  obj({"title": title, "day": day, "time": time}, ["title", "day", "time"]),
                  lambda title, day, time=None: cal.add_event(title, day, time),
                  [("Add Gym on 2025-01-07 at 07:15.", {"title": "Gym", "day": "2025-01-07", "time": "07:15"}),
                   ("Put a call with Bob in my calendar for 2024-06-21, 16:00.",
                    {"title": "Call with Bob", "day": "2024-06-21", "time": "16:00"})]),
        make_tool("list_events", "The events of one day, or of a range of days (from day to end_day).",
                  obj({"day": day, "end_day": day}, ["day"]),
                  lambda day, end_day=None: {"day": cal._day(day), "events": cal.events_between(day, end_day or day)},
                  [("What is on my calendar on 2025-02-14?", {"day": "2025-02-14"}),
                   ("What do I have on 2025-03-09?", {"day": "2025-03-09"}),
                   ("What do I have tomorrow?", {"day": "tomorrow"})]),
        make_tool("move_event", "Move an event (by its id) to another day and/or time.",
                  obj({"id": event_id, "day": day, "time": time}, ["id"]),
                  lambda id, day=None, time=None: cal.move_event(id, day, time),
                  [("Move event 4 to 2025-05-02 at 10:00.", {"id": 4, "day": "2025-05-02", "time": "10:00"})]),
        make_tool("delete_event", "Delete an event by its id.", obj({"id": event_id}, ["id"]),
                  lambda id: {"deleted": cal.delete_event(id)},
                  [("Remove event 7 from my calendar.", {"id": 7})]),
        make_tool("add_reminder", "Remind the user of something on a day, at a time.",
                  obj({"text": title, "day": day, "time": time}, ["text", "day"]),
                  lambda text, day, time=None: cal.add_reminder(text, day, time),
                  [("Remind me to water the plants on 2025-04-11 at 08:00.",
                    {"text": "Water the plants", "day": "2025-04-11", "time": "08:00"})]),
        make_tool("list_reminders", "The reminders not yet done.", obj({}, []), lambda: cal.reminders(),
                  [("What are my reminders?", {})]),
    ]


# -- calling from the model -----------------------------------------------------------------------------------
def _call_schema(tool: Tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"]}


def resolve_choice(tools: ToolRegistry, tool_choice) -> tuple[str, list[Tool]]:
    """OpenAI's tool_choice -> ("none" | "auto" | "required", the tools the model may call)."""
    if tool_choice is None:
        tool_choice = "auto" if len(tools) else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise MMChatError(f"tool_choice must be none, auto, required or a function; got {tool_choice!r}")
        if tool_choice != "none" and not len(tools):
            raise MMChatError(f"tool_choice {tool_choice!r} needs tools")
        return tool_choice, list(tools.tools.values())
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if name is None:
        raise MMChatError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
    if name not in tools:
        raise MMChatError(f"tool_choice names '{name}', which is not among the tools")
    return "required", [tools.tools[name]]


def tool_constraint(tools: list[Tool], mode: str, parallel: bool, tokenizer, vocab_size: int,
                    eos_token_ids: list[int]) -> Constraint | None:
    """The grammar of the answer: calls only (required), a plain answer or calls (auto), or None (none)."""
    if mode == "none" or not tools:
        return None
    from ..constrain import _strict
    call = {"anyOf": [_strict(_call_schema(t)) for t in tools], "x-guidance": JSON_OPTIONS}
    lines = [f"call: {json.dumps(CALL_OPEN)} call_json {json.dumps(CALL_CLOSE)}",
             f"call_json: %json {json.dumps(call)}",
             "calls: call" + ("+" if parallel else "")]
    if mode == "required":
        lines.insert(0, "start: calls")
    else:  # auto: free text that does not start a call, or calls
        lines.insert(0, "start: calls | TEXT")
        lines.append(r"TEXT: /[^<\s](.|\n)*/")
    return Constraint.lark("\n".join(lines), tokenizer, vocab_size, eos_token_ids)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """The model's output -> (its text content or None, OpenAI tool_calls with arguments as JSON text). Only an
    answer that begins with a call is calls (the grammar's call branch): a plain answer that mentions the tag
    later was never constrained, so it stays text."""
    if not text.lstrip().startswith(CALL_OPEN):
        return text, []
    calls = []
    for m in re.finditer(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), text, re.S):
        try:
            value = json.loads(m[1])
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            calls.append({"id": "call_" + secrets.token_hex(8), "type": "function",
                          "function": {"name": value["name"],
                                       "arguments": json.dumps(value.get("arguments", {}), ensure_ascii=False)}})
    if not calls:
        return text, []
    rest = re.sub(re.escape(CALL_OPEN) + r".*?" + re.escape(CALL_CLOSE), "", text, flags=re.S).strip()
    return rest or None, calls


def _signature(tool: Tool) -> str:
    """calculator(expression: string) - Evaluate ...: short, because a small model reads a signature far better
    than a JSON schema (the grammar enforces the schema anyway)."""
    props = tool.parameters.get("properties", {})
    required = set(tool.parameters.get("required", []))
    args = []
    for name, schema in props.items():
        kind = "|".join(map(str, schema["enum"])) if "enum" in schema else schema.get("type", "any")
        note = f" ({schema['description']})" if schema.get("description") else ""
        args.append(f"{name}{'' if name in required else '?'}: {kind}{note}")
    return f"- {tool.name}({', '.join(args)}): {tool.description}"


def tools_system_prompt(tools: list[Tool]) -> str:
    return ("You can call these functions:\n" + "\n".join(_signature(t) for t in tools) +
            "\nTo call one, answer with " + CALL_OPEN + '{"name": "<function name>", "arguments": {...}}' +
            CALL_CLOSE + ". Results come back as <tool_response>. Otherwise answer the user directly.")


def template_knows_tools(template) -> bool:
    return "tool_calls" in template.source or "tools" in template.source


def _call_text(name: str, arguments) -> str:
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CALL_CLOSE


def prepare_messages(messages: list[dict], tools: list[Tool], template) -> tuple[list[dict], list[dict] | None]:
    """Messages (and a `tools` argument) ready for the chat template. A template that knows tools gets them as
    they are; for one that does not (SmolLM2's), the tools are described in the system prompt, followed by the
    tools' example exchanges; calls are written as <tool_call> text and results come back as <tool_response>
    in a user turn."""
    if template_knows_tools(template):
        return messages, [t.spec() for t in tools] or None
    out: list[dict] = []
    if tools:
        intro = tools_system_prompt(tools)
        if messages and messages[0].get("role") == "system":
            out.append({"role": "system", "content": f"{messages[0].get('content') or ''}\n\n{intro}".strip()})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": intro})
        for t in tools:
            for request, arguments in t.examples:
                out += [{"role": "user", "content": request},
                        {"role": "assistant", "content": _call_text(t.name, arguments)}]
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = "".join(_call_text(c["function"]["name"], _loads(c["function"].get("arguments")))
                            for c in m["tool_calls"])
            out.append({"role": "assistant", "content": ((m.get("content") or "") + calls)})
        elif role == "tool":
            response = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + response}
            else:
                out.append({"role": "user", "content": response, "_tool": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool"} for m in out], None


def _loads(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments or {}


@dataclass
class ChatResult:
    content: str | None
    tool_calls: list[dict]
    finish_reason: str          # "stop", "length" or "tool_calls"
    messages: list[dict]        # the whole conversation, tool calls and results included


def chat_once(llm, messages: list[dict], tools: ToolRegistry, tool_choice=None, parallel_tool_calls: bool = True,
              **sampling) -> ChatResult:
    """One model turn with tools: the answer, or the calls it makes (not run)."""
    from ..api import CHAT_DEFAULTS, sampling_params
    mode, allowed = resolve_choice(tools, tool_choice)
    chat, tool_specs = prepare_messages(messages, allowed if mode != "none" else [], llm.template)
    text = llm.template.render(chat, add_generation_prompt=True, tools=tool_specs)
    constraint = tool_constraint(allowed, mode, parallel_tool_calls, llm.tokenizer, llm.config.vocab_size,
                                 llm.eos_token_ids)
    params = sampling_params(CHAT_DEFAULTS, **{**sampling, "constraint": constraint})
    done = llm.complete([llm.tokenizer.encode(text, add_bos=False)], params)[0]
    content, calls = parse_tool_calls(done.text) if mode != "none" else (done.text, [])
    if mode == "required" and not calls:
        raise MMChatError("the answer was cut off before its tool call was complete; raise max_tokens")
    reply = {"role": "assistant", "content": content}
    if calls:
        reply["tool_calls"] = calls
    return ChatResult(content, calls, "tool_calls" if calls else done.finish_reason, [*messages, reply])


def run_chat(llm, messages: list[dict] | str, tools: ToolRegistry, tool_choice=None,
             parallel_tool_calls: bool = True, max_rounds: int = 3, **sampling) -> ChatResult:
    """Answer with tools: the model calls, the calls run, their results go back as tool messages through the
    chat template, until the model answers in text (the last round may not call tools)."""
    messages = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    choice = tool_choice
    for round_ in range(max_rounds):
        last = round_ == max_rounds - 1
        result = chat_once(llm, messages, tools, "none" if last else choice, parallel_tool_calls, **sampling)
        messages = result.messages
        if not result.tool_calls:
            return result
        for call in result.tool_calls:
            fn = call["function"]
            messages.append({"role": "tool", "tool_call_id": call["id"], "name": fn["name"],
                             "content": tools.call(fn["name"], fn["arguments"])})
        # a forced call has been made: now the model answers from its result (a small model told it may call
        # again often does, in a loop); with auto it may chain calls
        choice = "auto" if tool_choice in (None, "auto") else "none"
    return result
