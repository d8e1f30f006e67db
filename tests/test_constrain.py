"""Constrained decoding with the real embedded model: JSON schemas, regular expressions, choices; per-row masks
inside one batch; clear errors for bad schemas."""
import json
import re

import jsonschema
import pytest
import torch

from mmchat.constrain import Constraint, _strict, allocate_bitmask, from_response_format, unpack_bitmask
from mmchat.errors import MMChatError
from mmchat.generate import SamplingParams, generate

# Four shapes a small model must fill: nested objects, enums, arrays, numbers with bounds.
SCHEMAS = {
    "nested": ({
        "type": "object",
        "properties": {
            "customer": {"type": "object", "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 16},
                "address": {"type": "object", "properties": {
                    "city": {"type": "string", "minLength": 1, "maxLength": 16},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}},
                "required": ["name", "address"]},
            "vip": {"type": "boolean"}},
        "required": ["customer", "vip"]},
        "Give the customer's name, city and zip code as JSON."),
    "enums": ({
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "language": {"type": "string", "enum": ["en", "fr", "de"]},
            "priority": {"enum": [1, 2, 3]}},
        "required": ["sentiment", "language", "priority"]},
        "Classify this review as JSON: 'The parcel came late and the box was broken.'"),
    "arrays": ({
        "type": "object",
        "properties": {
            "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 12},
                               "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["name", "qty"]}},
            "tags": {"type": "array", "maxItems": 2, "items": {"enum": ["gift", "urgent", "fragile"]}}},
        "required": ["items", "tags"]},
        "List the items of a shopping order as JSON."),
    "numbers": ({
        "type": "object",
        "properties": {
            "temperature": {"type": "number", "minimum": -30, "maximum": 45},
            "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
            "wind": {"type": "number", "exclusiveMinimum": 0, "maximum": 200}},
        "required": ["temperature", "humidity", "wind"]},
        "Give today's weather in Paris as JSON."),
}


@pytest.mark.slow
def test_100_schema_constrained_generations_all_validate(smollm2):
    """25 sampled answers per schema (seeds 0..24), decoded as one batch per schema in which each row carries
    its own matcher: every one parses, validates, and ends on its own (the grammar closes, end-of-sequence)."""
    llm = smollm2
    texts = []
    for name, (schema, question) in SCHEMAS.items():
        c = llm.constraint(json_schema=schema)
        prompt = llm.render_chat([{"role": "user", "content": question}])
        params = [SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95, repetition_penalty=1.1, seed=seed,
                                 constraint=c) for seed in range(25)]
        out = [[] for _ in params]
        reasons = [None] * len(params)
        for step in generate(llm.model, [prompt] * len(params), params, llm.eos_token_ids):
            for t in step:
                if t.finish_reason != "stop":
                    out[t.seq].append(t.token)
                reasons[t.seq] = t.finish_reason
        group = [llm.decode(ids) for ids in out]
        for text, reason in zip(group, reasons):
            assert reason == "stop", f"{name}: cut off before the JSON closed: {text!r}"
            jsonschema.validate(json.loads(text), schema)
        assert len(set(group)) > 5, f"{name}: different seeds should give different answers: {group[:3]}"
        texts += group
    assert len(texts) == 100


@pytest.mark.slow
def test_chat_response_format_json_schema_through_the_engine(smollm2):
    schema, question = SCHEMAS["enums"]
    rf = {"type": "json_schema", "json_schema": {"name": "review", "schema": schema, "strict": True}}
    for seed in (1, 2):
        text = smollm2.chat(question, response_format=rf, seed=seed, max_tokens=48)
        jsonschema.validate(json.loads(text), schema)
    text = smollm2.chat("Give a JSON object with two keys, name and age, for a cat.",
                        response_format={"type": "json_object"}, seed=3, max_tokens=200, temperature=0)
    assert isinstance(json.loads(text), dict)


def test_regex_and_choice(smollm2):
    llm = smollm2
    date = llm.generate("The shop opened on", max_tokens=16, seed=0,
                        constraint=llm.constraint(regex=r" [0-9]{4}-[0-9]{2}-[0-9]{2}"))
    assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", date), date
    options = ["refund", "exchange", "repair"]
    c = Constraint.choice(options, llm.tokenizer, llm.config.vocab_size, llm.eos_token_ids)
    answers = {llm.chat("My kettle broke. What do I want?", constraint=c, seed=s, max_tokens=8) for s in range(3)}
    assert answers <= set(options) and answers


def test_constrained_and_free_rows_share_a_batch_without_leaking(smollm2):
    """A row's mask touches only that row: the free row's greedy text is the same alone and next to a
    constrained row."""
    llm = smollm2
    c = llm.constraint(json_schema=SCHEMAS["enums"][0])
    prompt = llm.render_chat([{"role": "user", "content": "Name three fruits."}])
    free = SamplingParams(max_tokens=12, temperature=0)
    alone = [t.token for step in generate(llm.model, [prompt], [free], llm.eos_token_ids) for t in step]
    tied = SamplingParams(max_tokens=40, temperature=0, constraint=c)
    rows = {0: [], 1: []}
    for step in generate(llm.model, [prompt, prompt], [free, tied], llm.eos_token_ids):
        for t in step:
            rows[t.seq].append(t.token)
    assert rows[0] == alone
    value = json.loads(llm.decode(rows[1]))
    jsonschema.validate(value, SCHEMAS["enums"][0])
    assert not llm.decode(alone).startswith("{")  # the free row was not pushed into JSON


def test_bitmask_unpacks_to_the_allowed_tokens():
    bm = allocate_bitmask(2, 70)
    bm[0] = 0
    bm[0, 0] = (1 << 3) | -(1 << 31)    # tokens 3 and 31 (bit 31 is the int32 sign bit)
    bm[0, 2] = 1 << 5                   # token 69
    allowed = unpack_bitmask(bm, 70)
    assert allowed.shape == (2, 70)
    assert torch.nonzero(allowed[0]).flatten().tolist() == [3, 31, 69]
    assert allowed[1].all()


def test_strict_closes_objects_but_keeps_free_form_ones():
    s = _strict({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                                  "c": {"type": "object"}},
                 "$defs": {"d": {"properties": {"e": {"type": "string"}}}}})
    assert s["additionalProperties"] is False
    assert s["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in s["properties"]["c"]
    assert s["$defs"]["d"]["additionalProperties"] is False


@pytest.mark.parametrize("bad, words", [
    ({"type": "objectx"}, "not a valid JSON schema"),
    ({"type": "object", "properties": {"a": {"minimum": "zero"}}}, "properties/a/minimum"),
    ('{"type": "object",', "not valid JSON"),
    ([1, 2], "must be a JSON object"),
])
def test_invalid_json_schema_is_a_clear_error_and_the_model_goes_on(smollm2, bad, words):
    with pytest.raises(MMChatError, match=re.escape(words)):
        smollm2.chat("hi", json_schema=bad, max_tokens=4)
    assert smollm2.chat("Say hello.", max_tokens=4, seed=0)  # the same model still answers


@pytest.mark.parametrize("rf, words", [
    ({"type": "xml"}, "unknown response_format type"),
    ({"type": "json_schema"}, "needs"),
    ("json", "must be an object"),
])
def test_bad_response_format(smollm2, rf, words):
    with pytest.raises(MMChatError, match=words):
        from_response_format(rf, smollm2.tokenizer, smollm2.config.vocab_size, smollm2.eos_token_ids)


def test_bad_regex_and_grammar(smollm2):
    with pytest.raises(MMChatError, match="regular expression"):
        smollm2.constraint(regex="[a-")
    with pytest.raises(MMChatError, match="grammar"):
        smollm2.constraint(grammar="start: undefined_rule")
    with pytest.raises(MMChatError, match="only one"):
        smollm2.constraint(regex="a", json_schema={"type": "object"})


@pytest.mark.slow
def test_generate_command_with_a_json_schema_file(smollm2_path, tmp_path, capsys):
    from mmchat.cli import main
    schema, question = SCHEMAS["numbers"]
    path = tmp_path / "weather.json"
    path.write_text(json.dumps(schema))
    assert main(["generate", "--model", str(smollm2_path), "--chat", question, "--json-schema", str(path),
                 "--seed", "0", "--max-tokens", "64"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    path.write_text('{"type": "object", "required": "name"}')
    assert main(["generate", "--model", str(smollm2_path), "x", "--json-schema", str(path)]) == 2
    assert "not a valid JSON schema at required" in capsys.readouterr().err
