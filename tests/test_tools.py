"""Tools: schemas from Python functions, the built-ins (calendar, reminders, date and time, calculator), tool calls
from the real embedded model under tool_choice required / named / auto, and the result round trip."""
import json
from datetime import date
from typing import Literal

import jsonschema
import pytest

from mmchat.chat.calendar import Calendar, parse_day
from mmchat.chat.tools import (ToolRegistry, calculate, chat_once, make_tool, parse_tool_calls, prepare_messages,
                               run_chat, tool_constraint, tool_from_function)
from mmchat.chat.template import ChatTemplate
from mmchat.errors import MMChatError

TODAY = date(2026, 11, 30)  # a Monday


def book_table(restaurant: str, people: int, day: str, vegetarian: bool = False,
               seating: Literal["inside", "terrace"] = "inside", note: str | None = None) -> dict:
    """Book a table at a restaurant.

    Args:
        restaurant: the restaurant's name
        people: how many guests
        day (str): the day, YYYY-MM-DD
        vegetarian: whether a vegetarian menu is needed
    """
    return {"booked": restaurant, "people": people}


def test_schema_from_signature_and_docstring():
    t = tool_from_function(book_table)
    assert t.name == "book_table" and t.description == "Book a table at a restaurant."
    p = t.parameters
    assert p["required"] == ["restaurant", "people", "day"]
    assert p["properties"]["people"] == {"type": "integer", "description": "how many guests"}
    assert p["properties"]["day"]["description"] == "the day, YYYY-MM-DD"
    assert p["properties"]["vegetarian"]["type"] == "boolean"
    assert p["properties"]["seating"] == {"enum": ["inside", "terrace"]}
    assert p["properties"]["note"] == {"type": "string"}
    jsonschema.Draft202012Validator.check_schema(p)
    assert t.spec()["function"]["name"] == "book_table"


def test_registry_call_validates_and_reports_errors_as_results():
    tools = ToolRegistry()
    tools.register(book_table)

    @tools.register(name="explode", description="Always fails.")
    def boom():
        raise RuntimeError("the oven is on fire")

    ok = json.loads(tools.call("book_table", '{"restaurant": "Lupo", "people": 2, "day": "2026-12-01"}'))
    assert ok == {"booked": "Lupo", "people": 2}
    assert "bad arguments" in json.loads(tools.call("book_table", '{"restaurant": "Lupo"}'))["error"]
    assert "bad arguments" in json.loads(tools.call("book_table", '{"people": "two"'))["error"]
    assert "oven is on fire" in json.loads(tools.call("explode", "{}"))["error"]
    assert "no tool named" in json.loads(tools.call("nope", "{}"))["error"]
    with pytest.raises(MMChatError, match="already registered"):
        tools.register(book_table)


@pytest.mark.parametrize("spec, words", [
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}},
     "parameters of tool 'f'"),
    ({"type": "function", "function": {"name": "bad name!", "parameters": {}}}, "not valid"),
    ({"type": "function", "function": {"name": "g", "parameters": {"type": "string"}}}, "schema of an object"),
    ({"type": "retrieval"}, "must be"),
])
def test_broken_tool_schemas_are_clear_errors(spec, words):
    with pytest.raises(MMChatError, match=words):
        ToolRegistry.from_openai([spec])


@pytest.mark.parametrize("expr, value", [("2 + 3 * 4", 14), ("(1 + 2) ** 3 / 9", 3), ("sqrt(16) + abs(-2)", 6),
                                         ("7 // 2 + 7 % 2", 4), ("2^10", 1024), ("-3.5 * 2", -7), ("round(pi, 2)", 3.14)])
def test_calculator(expr, value):
    assert calculate(expr)["result"] == value


@pytest.mark.parametrize("expr", ["__import__('os').system('ls')", "open('x')", "(1).__class__", "9 ** 9 ** 9",
                                  "x + 1", "1 / 0", "lambda: 1", "[1, 2]"])
def test_calculator_refuses_anything_but_arithmetic(expr):
    with pytest.raises(MMChatError):
        calculate(expr)


def test_calendar_add_list_move_delete(tmp_path):
    cal = Calendar(tmp_path / "cal.db", today=TODAY)
    a = cal.add_event("Dentist", "tomorrow", "09:30")
    cal.add_event("Team lunch", "2026-12-01", "12:00")
    cal.add_event("Yoga", "friday", "18:00")
    cal.add_event("Holiday", "2026-12-01")  # all day
    assert a["day"] == "2026-12-01" and parse_day("friday", TODAY).isoformat() == "2026-12-04"
    tomorrow = cal.events_on("tomorrow")
    assert [e["title"] for e in tomorrow] == ["Holiday", "Dentist", "Team lunch"]
    assert [e["title"] for e in cal.events_between("today", "2026-12-06")][-1] == "Yoga"
    moved = cal.move_event(a["id"], "2026-12-02", "10:00")
    assert (moved["day"], moved["time"]) == ("2026-12-02", "10:00")
    cal.delete_event(a["id"])
    assert all(e["title"] != "Dentist" for e in cal.events_between("2026-11-30", "2026-12-31"))
    r = cal.add_reminder("Call mum", "today", "18:00")
    assert cal.reminders()[0]["text"] == "Call mum" and r["due"] == "2026-11-30 18:00"
    cal.close()
    again = Calendar(tmp_path / "cal.db", today=TODAY)  # persisted (WAL) and readable by a new connection
    assert len(again.events_between("2026-11-01", "2026-12-31")) == 3
    assert again.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(MMChatError, match="not a day"):
        again.add_event("x", "next blursday")
    with pytest.raises(MMChatError, match="no event"):
        again.move_event(999, "today")


def test_tool_calls_parse_and_render_through_a_template_without_tools():
    text = '<tool_call>{"name": "add_event", "arguments": {"title": "Gym"}}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content is None and calls[0]["function"]["name"] == "add_event"
    assert json.loads(calls[0]["function"]["arguments"]) == {"title": "Gym"}
    assert parse_tool_calls("just text") == ("just text", [])
    tools = ToolRegistry.builtin()
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"result": 4}'}]
    chat, specs = prepare_messages(msgs, list(tools.tools.values()), ChatTemplate(None))
    assert specs is None and chat[0]["role"] == "system" and "calculator" in chat[0]["content"]
    rendered = ChatTemplate(None).render(chat)
    assert '<tool_call>{"name": "add_event"' in rendered and "<tool_response>\n{\"result\": 4}" in rendered


@pytest.fixture
def calendar():
    cal = Calendar(":memory:", today=TODAY)
    yield cal
    cal.close()


@pytest.mark.slow
def test_required_tool_calls_always_validate(smollm2, calendar):
    """Sampled calls under tool_choice required: each names a known tool, its arguments validate."""
    tools = ToolRegistry.builtin(calendar)
    for seed in range(4):
        r = chat_once(smollm2, [{"role": "user", "content": "What is 17 times 23?"}], tools, "required",
                      parallel_tool_calls=False, seed=seed, temperature=0.8, max_tokens=160)
        assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1
        fn = r.tool_calls[0]["function"]
        jsonschema.validate(json.loads(fn["arguments"]), tools.tools[fn["name"]].parameters)


@pytest.mark.slow
def test_named_tool_and_the_result_round_trip(smollm2, calendar):
    tools = ToolRegistry.builtin(calendar)
    r = run_chat(smollm2, "What is 17 times 23? Use the calculator.", tools,
                 {"type": "function", "function": {"name": "calculator"}}, seed=0, max_tokens=64)
    call = next(m for m in r.messages if m.get("tool_calls"))["tool_calls"][0]
    assert call["function"]["name"] == "calculator"
    result = next(m for m in r.messages if m["role"] == "tool")
    assert result["tool_call_id"] == call["id"]
    expr = json.loads(call["function"]["arguments"])["expression"]
    assert json.loads(result["content"]).get("result") == calculate(expr)["result"] or \
        "error" in json.loads(result["content"])
    assert r.finish_reason in ("stop", "length") and r.content  # then the model answered in text


def test_auto_lets_the_model_answer_or_call(smollm2, calendar):
    tools = ToolRegistry.builtin(calendar)
    c = tool_constraint(list(tools.tools.values()), "auto", True, smollm2.tokenizer, smollm2.config.vocab_size,
                        smollm2.eos_token_ids)
    m = c.matcher()
    assert all(m.consume(t) for t in smollm2.encode("Hello! How can I help?"))
    m = c.matcher()
    call = '<tool_call>{"name": "current_datetime", "arguments": {}}</tool_call>'
    assert all(m.consume(t) for t in smollm2.encode(call)) and m.accepting
    m = c.matcher()
    bad = '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}'
    assert not all(m.consume(t) for t in smollm2.encode(bad))  # a wrong argument name is not allowed
    r = chat_once(smollm2, [{"role": "user", "content": "Hi! Who are you?"}], tools, "auto", seed=0,
                  max_tokens=96)
    assert r.finish_reason in ("stop", "length", "tool_calls")
    if r.tool_calls:
        fn = r.tool_calls[0]["function"]
        jsonschema.validate(json.loads(fn["arguments"]), tools.tools[fn["name"]].parameters)
    elif r.finish_reason == "length" and r.content.startswith("<tool_call>"):
        pass  # a call cut off by max_tokens (which way a near tie goes can depend on the machine's load)
    else:
        assert r.content and "<tool_call>" not in r.content


@pytest.mark.slow
def test_personal_assistant_session(smollm2, calendar):
    """Three events added by chat, then "what is on that day?": the calendar store holds them, and the answer
    comes from the list_events result."""
    tools = ToolRegistry.builtin(calendar)
    system = {"role": "system", "content": "You are a personal assistant. Today is 2026-11-30. Use the tools."}
    asks = [("Dentist", "2026-12-03", "09:30"), ("Lunch with Anna", "2026-12-03", "12:30"),
            ("Piano lesson", "2026-12-04", "17:00")]
    for title, day, time in asks:
        r = run_chat(smollm2, [system, {"role": "user", "content": f"Add {title} on {day} at {time}."}], tools,
                     {"type": "function", "function": {"name": "add_event"}}, temperature=0, max_tokens=64)
        assert any(m.get("tool_calls") for m in r.messages)
    stored = calendar.events_between("2026-12-01", "2026-12-31")
    assert [(e["title"], e["day"], e["time"]) for e in stored] == asks
    r = run_chat(smollm2, [system, {"role": "user", "content": "What do I have on 2026-12-03?"}], tools,
                 {"type": "function", "function": {"name": "list_events"}}, temperature=0, max_tokens=64)
    result = json.loads(next(m for m in r.messages if m["role"] == "tool")["content"])
    assert result["day"] == "2026-12-03"
    assert [e["title"] for e in result["events"]] == ["Dentist", "Lunch with Anna"]
    assert r.content


def test_tool_that_raises_and_bad_choice_keep_the_conversation_going(smollm2, calendar):
    tools = ToolRegistry.builtin(calendar)
    tools.add(make_tool("flaky", "Fails every time.", {"type": "object", "properties": {}},
                        lambda: 1 / 0))
    r = run_chat(smollm2, "Run flaky.", tools, {"type": "function", "function": {"name": "flaky"}}, seed=0,
                 max_tokens=48)
    assert "error" in json.loads(next(m for m in r.messages if m["role"] == "tool")["content"])
    assert r.content is not None  # the model still answered
    with pytest.raises(MMChatError, match="not among the tools"):
        chat_once(smollm2, [{"role": "user", "content": "hi"}], tools, {"type": "function",
                                                                         "function": {"name": "nope"}})
    with pytest.raises(MMChatError, match="tool_choice must be"):
        chat_once(smollm2, [{"role": "user", "content": "hi"}], tools, "always")
