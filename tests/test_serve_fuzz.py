"""Fuzzing the HTTP API of a real `mmchat serve` with hypothesis: request bodies that mix valid values, wrong
types, out-of-range numbers, odd Unicode, unknown fields and non-JSON bytes. Every answer must come within a few
seconds, never be a 5xx, and be either a proper completion (a stream ending in [DONE]) or a 4xx in OpenAI's
error shape. max_tokens is capped low on the server so that the whole run stays well under a minute."""
import json
import sys
import time
from pathlib import Path

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz test needs hypothesis (the 'test' extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402
from test_serve import start_server, stop_server  # noqa: E402

TIMEOUT = 20.0  # seconds one answer may take on a busy 2-core machine before it counts as a hang

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
text = st.text(max_size=60) | st.sampled_from(["", " ", "\x00", "\ud7ff", "😀" * 10, "<|im_end|>", "a" * 500])


def maybe(valid):
    """Mostly a valid value, sometimes anything at all."""
    return st.one_of(valid, valid, valid, junk)


part = st.fixed_dictionaries({"type": maybe(st.sampled_from(["text", "image_url", "input_audio"])),
                              "text": maybe(text)})
message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
     "content": maybe(text | st.lists(part, max_size=2))},
    optional={"name": maybe(st.text(max_size=10)), "extra": junk})
sampling = {
    "stream": maybe(st.booleans()),
    "temperature": maybe(st.floats(-1, 3)),
    "top_p": maybe(st.floats(-0.5, 1.5)),
    "top_k": maybe(st.integers(-2, 100)),
    "max_tokens": maybe(st.integers(-2, 12)),
    "stop": maybe(text | st.lists(text, max_size=5)),
    "seed": maybe(st.integers(-2**63, 2**64)),
    "n": maybe(st.integers(-1, 4)),
    "logit_bias": maybe(st.dictionaries(st.integers(-5, 500).map(str) | st.text(max_size=4),
                                        st.floats(-150, 150), max_size=3)),
    "presence_penalty": maybe(st.floats(-3, 3)),
    "repetition_penalty": maybe(st.floats(-1, 3)),
    "stream_options": maybe(st.fixed_dictionaries({"include_usage": maybe(st.booleans())})),
    "unknown_field": junk,
}
chat_body = st.fixed_dictionaries(
    {"model": maybe(st.just("MODEL")), "messages": maybe(st.lists(message, max_size=4))},
    optional={**sampling, "logprobs": maybe(st.booleans()), "top_logprobs": maybe(st.integers(-1, 25)),
              "max_completion_tokens": maybe(st.integers(-1, 12)),
              "response_format": maybe(st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                                        {"type": "json_schema", "json_schema": {"name": "x",
                                                         "schema": {"type": "object"}}}]))})
completion_body = st.fixed_dictionaries(
    {"model": maybe(st.just("MODEL")),
     "prompt": maybe(text | st.lists(text, max_size=3) | st.lists(st.integers(-5, 500), max_size=6))},
    optional={**sampling, "logprobs": maybe(st.integers(-1, 6)), "echo": junk})
conversation_body = st.fixed_dictionaries(
    {"messages": maybe(st.lists(message, max_size=3))},
    optional={"title": maybe(text), "settings": junk, "system": maybe(text)})
raw_bytes = st.binary(max_size=200) | st.sampled_from([b"", b"{", b"[]", b"null", b'{"model": 1e999}', b"\xff\xfe"])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tm.workdir() / "llama-serve"  # the same tiny random Llama as test_serve.py
    if not folder.exists():
        tm.save_hf_folder(tm.llama_model(tm.tokenizer().get_vocab_size(), ctx=2048, seed=11), tm.tokenizer(), folder)
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("fuzz-data")))  # fuzzed conversations land there
    try:
        proc, base = start_server(str(folder), "--max-tokens-limit", "12", "--slots", "4")
    finally:
        mp.undo()
    with httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        yield client, folder.name
    stop_server(proc)
    assert proc.returncode == 0  # it also shut down cleanly after all that


def check(r: httpx.Response, stream: bool):
    assert r.status_code < 500, r.text[:500]
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
        assert set(err) == {"message", "type", "param", "code"}
    elif stream and r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [x for x in r.text.splitlines() if x]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        for x in lines[:-1]:
            json.loads(x[len("data: "):])
    else:
        r.json()


def post(client, path: str, body, model: str):
    if isinstance(body, bytes):
        content = body
    else:
        if isinstance(body, dict) and body.get("model") == "MODEL":
            body = {**body, "model": model}
        try:
            content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
        except (ValueError, TypeError):
            content = repr(body).encode("utf-8", "surrogatepass")
    start = time.perf_counter()
    r = client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert time.perf_counter() - start < TIMEOUT
    check(r, stream=isinstance(body, dict) and body.get("stream") is True)


FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.mark.slow
def test_fuzz_chat_completions(server):
    client, model = server

    @FUZZ
    @given(chat_body)
    def run(body):
        post(client, "/v1/chat/completions", body, model)
    run()


@pytest.mark.slow
def test_fuzz_completions_conversations_and_raw_bytes(server):
    client, model = server

    @FUZZ
    @given(st.sampled_from(["/v1/completions", "/api/conversations", "/v1/chat/completions"]),
           completion_body | conversation_body | raw_bytes)
    def run(path, body):
        post(client, path, body, model)
    run()
    assert client.get("/health").json()["running"] == 0  # nothing left running
