"""Tool calling through the official `openai` client against a real `mmchat serve` process: tool_choice required,
auto, none and a named function, parallel_tool_calls, streamed tool-call deltas, the tool-result round trip, and
clear 400s for broken tools. The tiny random model's calls are only as good as its grammar makes them, which is
the point: whatever it samples, the arguments parse and validate against the tool's schema."""
import json

import jsonschema
import openai
import pytest

from test_serve import start_server, stop_server, tm

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}}
BOOK = {"type": "function", "function": {
    "name": "book_table", "description": "Book a table.",
    "parameters": {"type": "object", "properties": {
        "people": {"type": "integer", "minimum": 1, "maximum": 12},
        "terrace": {"type": "boolean"},
        "time": {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"}},
        "required": ["people", "time"]}}}
TOOLS = [WEATHER, BOOK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


@pytest.fixture(scope="module")
def server():
    folder = tm.workdir() / "llama-serve-tools"
    if not folder.exists():
        tm.save_hf_folder(tm.llama_model(tm.tokenizer().get_vocab_size(), ctx=2048, seed=13), tm.tokenizer(), folder)
    proc, base = start_server(str(folder), "--slots", "4")
    yield base, folder.name
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(server):
    return server[1]


def check_calls(calls):
    """Every call is OpenAI-shaped, names an offered tool and its arguments validate against its schema."""
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
    assert len({c.id for c in calls}) == len(calls)


def test_required_calls_always_validate(client, model):
    for seed in range(6):
        r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=300)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c.message
        assert c.message.content is None and c.message.role == "assistant"
        check_calls(c.message.tool_calls)
        assert len(c.message.tool_calls) == 1


def test_parallel_calls_each_validate(client, model):
    """A random model given parallel calls keeps calling until max_tokens; every finished call validates and the
    one cut off is left out."""
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=1.0, seed=0, max_tokens=200)
    c = r.choices[0]
    check_calls(c.message.tool_calls)
    assert c.message.content is None and c.finish_reason in ("tool_calls", "length")
    if c.finish_reason == "length":
        assert len(c.message.tool_calls) >= 2


def test_named_function_and_no_parallel_calls(client, model):
    for seed in range(3):
        r = client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, parallel_tool_calls=False, temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "book_table"}}, max_tokens=300)
        calls = r.choices[0].message.tool_calls
        check_calls(calls)
        assert len(calls) == 1 and calls[0].function.name == "book_table"


def test_auto_answers_in_text_or_in_valid_calls(client, model):
    kinds = set()
    for seed in range(6):
        r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="auto",
                                           temperature=1.0, seed=seed, max_tokens=60)
        c = r.choices[0]
        if c.message.tool_calls:
            kinds.add("calls")
            assert c.finish_reason in ("tool_calls", "length")
            if c.finish_reason == "tool_calls":
                check_calls(c.message.tool_calls)
        else:
            kinds.add("text")
            assert c.message.content and not c.message.content.lstrip().startswith("<")
            assert c.finish_reason in ("stop", "length")
    assert kinds  # which of the two a random model picks is its own affair


def test_tool_choice_none_answers_in_text(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_streamed_calls_are_deltas_with_an_index_and_equal_the_whole_answer(client, model):
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=4,
              max_tokens=200)
    whole = client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            assert not ch.delta.content  # a call answer has no content
            for d in ch.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    assert slot["id"] is None and d.type == "function"
                    slot["id"] = d.id
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == whole.finish_reason and finish in ("tool_calls", "length")
    assert sorted(calls) == list(range(len(calls)))
    assert [(c["name"], c["arguments"]) for c in calls.values()] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(c["id"] for c in calls.values())


def test_tool_result_round_trip(client, model):
    """The call and its result go back through the chat template; the model then answers in text."""
    first = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=300)
    msg = first.choices[0].message
    check_calls(msg.tool_calls)
    result = {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": json.dumps({"sky": "sunny"})}
    follow = [*ASK, msg.model_dump(exclude_none=True), result]
    second = client.chat.completions.create(model=model, messages=follow, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=10)
    assert second.choices[0].message.content and second.choices[0].message.tool_calls is None
    # the result is in the prompt: the same conversation without it is shorter by the result's tokens at least
    without = client.chat.completions.create(model=model, messages=[*ASK, msg.model_dump(exclude_none=True)],
                                             tools=TOOLS, tool_choice="none", temperature=0, max_tokens=1)
    assert second.usage.prompt_tokens > without.usage.prompt_tokens + 3
    # no tools in the second request at all works too (the history still has a call and a result)
    third = client.chat.completions.create(model=model, messages=follow, temperature=0, max_tokens=5)
    assert third.choices[0].message.content


@pytest.mark.parametrize("tools, choice, param, words", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}],
     "auto", "tools", "not a valid JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                    "properties": {"x": {"type": "banana"}}}}}],
     "auto", "tools", "not a valid JSON schema"),
    ([{"type": "function", "function": {"name": "bad name!", "parameters": {}}}], "auto", "tools", "not valid"),
    ([{"type": "function", "function": {"name": "g", "parameters": {"type": "string"}}}], "auto", "tools",
     "schema of an object"),
    ([{"type": "code_interpreter"}], "auto", "tools", "must be"),
    ([WEATHER, WEATHER], "auto", "tools", "already"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice", "not among the tools"),
    (TOOLS, "always", "tool_choice", "tool_choice"),
    (None, "required", "tool_choice", "needs 'tools'"),
])
def test_broken_tools_are_clear_400s(client, model, tools, choice, param, words):
    body = {"tool_choice": choice, **({"tools": tools} if tools is not None else {})}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=ASK, max_tokens=5, extra_body=body)
    err = e.value.body if "message" in (e.value.body or {}) else e.value.body["error"]
    assert err["param"] == param and words in err["message"], err
    assert "\n" not in err["message"] and "Traceback" not in err["message"]
    # and the server goes on answering
    assert client.chat.completions.create(model=model, messages=ASK, max_tokens=2).choices[0].message


def test_bad_tool_messages_are_400s(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, max_tokens=2, messages=[
            *ASK, {"role": "assistant", "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f"}}]}])
    assert "tool_calls" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, max_tokens=2, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"}, messages=ASK)


@pytest.mark.slow
def test_smollm2_weather_round_trip(smollm2_path):
    """The real model: asked about the weather with a weather tool, it calls it (required) with the city, and
    from the tool's result its final answer gives the temperature or the sky."""
    proc, base = start_server(str(smollm2_path), "--slots", "2")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        name = client.models.list().data[0].id
        tool = {"type": "function", "function": {
            "name": "get_weather", "description": "The current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                           "required": ["city"]}}}
        ask = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
        r = client.chat.completions.create(model=name, messages=ask, tools=[tool], tool_choice="required",
                                           temperature=0, max_tokens=60)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls[0].function.name == "get_weather"
        args = json.loads(msg.tool_calls[0].function.arguments)
        jsonschema.validate(args, tool["function"]["parameters"])
        assert "paris" in args["city"].lower()
        follow = [*ask, msg.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": msg.tool_calls[0].id,
                   "content": json.dumps({"city": "Paris", "temperature_c": 23, "sky": "foggy"})}]
        final = client.chat.completions.create(model=name, messages=follow, tools=[tool], temperature=0,
                                               max_tokens=60)
        text = final.choices[0].message.content
        # what the answer says comes from the result (neither is a likely guess about Paris)
        assert final.choices[0].finish_reason in ("stop", "length") and ("23" in text or "fog" in text), text
    finally:
        stop_server(proc)


def test_knowledge_answers_cite_and_decline(client, model):
    """"knowledge": the passages are retrieved before the model answers; the answer cites one and the message
    carries what it cites; an out-of-scope question is declined without the model. (The model is random: what
    is checked is the retrieval, the citation and the decline, not its words.)"""
    from mmchat.chat.knowledge import DONT_KNOW
    ask = [{"role": "system", "content": "You work for Lumen & Loom."},
           {"role": "user", "content": "Do you deliver to Switzerland?"}]
    r = client.chat.completions.create(model=model, messages=ask, max_tokens=12, temperature=0,
                                       extra_body={"knowledge": "sample"})
    msg = r.choices[0].message
    cites = msg.model_extra["citations"]
    assert cites and all(f"[{c['index']}]" in msg.content for c in cites)
    assert any(c["source"] == "shipping.md, Shipping and delivery > International shipping" and "Switzerland" in
               c["text"] for c in cites), cites
    streamed, seen = "", []
    for chunk in client.chat.completions.create(model=model, messages=ask, max_tokens=12, temperature=0,
                                                stream=True, extra_body={"knowledge": "sample"}):
        for ch in chunk.choices:
            streamed += ch.delta.content or ""
            seen += (ch.delta.model_extra or {}).get("citations") or []
    assert streamed == msg.content and seen == cites
    out = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=model, messages=out, max_tokens=12, extra_body={"knowledge": "sample"})
    assert r.choices[0].message.content == DONT_KNOW and r.choices[0].message.model_extra["citations"] == []
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=model, messages=out, max_tokens=12, stream=True, extra_body={"knowledge": "sample"}) if ch.choices)
    assert text == DONT_KNOW
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=out, max_tokens=2, extra_body={"knowledge": "shop"})
    assert "'knowledge'" in str(e.value)
