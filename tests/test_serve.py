"""`mmchat serve` as a real process on loopback, driven by the official `openai` client (sync and async).

Most tests use a tiny random Llama (fast; its text is gibberish but exact and deterministic under greedy
decoding, so the server's answers can be checked against the same model run in this process). One slow test
serves the real SmolLM2 for content."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models as tm  # noqa: E402

KEY = "test-key-123"
MESSAGES = [{"role": "user", "content": "Hello, how are you?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, *extra: str, timeout: float = 180.0, env: dict | None = None):
    """`mmchat serve` on a free loopback port, with `env` added to the environment; returns (process, base URL)."""
    port = free_port()
    log = open(Path(tm.workdir()) / f"serve-{port}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "mmchat", "serve", "--model", model, "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    base = f"http://127.0.0.1:{port}"
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited: {log.read()}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def folder():
    """A tiny random Llama with a 2048-token context, so long answers take a while even on a fast machine."""
    path = tm.workdir() / "llama-serve"
    if not path.exists():
        model = tm.llama_model(tm.tokenizer().get_vocab_size(), ctx=2048, seed=11)
        tm.save_hf_folder(model, tm.tokenizer(), path)
    return path


@pytest.fixture(scope="module")
def server(folder):
    proc, base = start_server(str(folder), "--api-key", KEY, "--slots", "8", "--queue", "4")
    yield base
    stop_server(proc)


@pytest.fixture(scope="module")
def local(folder):
    """The same model in this process, for expected answers."""
    import mmchat
    return mmchat.load(str(folder), progress=False)


@pytest.fixture(scope="module")
def no_eos(local):
    """A logit_bias that keeps the model from ending its answer: it runs until its max_tokens or a cancel."""
    return {str(i): -100 for i in local.eos_token_ids}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_name(folder):
    return folder.name


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_models_lists_the_served_name(client, model_name):
    assert [m.id for m in client.models.list().data] == [model_name]


def test_chat_greedy_matches_the_model_and_usage_is_right(client, local, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_tokens=12)
    expected = local.chat(MESSAGES, temperature=0, max_tokens=12)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == expected
    assert c.index == 0 and c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(local.render_chat(MESSAGES))
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == model_name


def test_stream_equals_non_stream_and_include_usage(client, model_name):
    kw = dict(model=model_name, messages=MESSAGES, temperature=0, max_completion_tokens=15)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stop_string_never_reaches_the_output(client, model_name):
    kw = dict(model=model_name, messages=MESSAGES, temperature=0, max_tokens=30)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[8:11]  # three characters from the middle of the answer
    assert len(stop) == 3
    expected = full[: full.find(stop)]
    r = client.chat.completions.create(stop=[stop, "never-appears"], **kw)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(stop=stop, stream=True, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_n_and_batching_reproducible(server, client, model_name, no_eos):
    kw = dict(model=model_name, messages=MESSAGES, temperature=1.0, max_tokens=16, seed=7)
    a = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    texts = [c.message.content for c in a.choices]
    assert texts[0] != texts[1]  # two samples, not one twice
    assert 2 <= a.usage.completion_tokens <= 32
    b = client.chat.completions.create(n=2, **kw)
    assert [c.message.content for c in b.choices] == texts
    other = client.chat.completions.create(**{**kw, "seed": 8})
    assert other.choices[0].message.content != texts[0]
    # the same seed while other requests decode in the same batch
    with httpx.Client(timeout=60) as h:
        def stream_other():
            return h.stream("POST", server + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                            json={"model": model_name, "messages": [{"role": "user", "content": "noise"}],
                                  "max_tokens": 1000, "stream": True, "temperature": 1.0, "logit_bias": no_eos})
        with stream_other() as s1, stream_other() as s2:
            lines = s1.iter_lines(), s2.iter_lines()  # kept: a dropped line iterator closes its response
            for it in lines:
                next(it)
            batched = client.chat.completions.create(n=1, **kw)
            assert httpx.get(server + "/health").json()["running"] == 2  # the other two were still decoding
    assert batched.choices[0].message.content == texts[0]


def test_logprobs_and_top_logprobs(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token or "\ufffd" in t.token
    stream = list(client.chat.completions.create(model=model_name, messages=MESSAGES, temperature=0, max_tokens=8,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for ch in stream if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert no_logprobs(client, model_name)


def no_logprobs(client, model_name) -> bool:
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=2)
    return r.choices[0].logprobs is None


def test_completions_endpoint(client, local, model_name):
    r = client.completions.create(model=model_name, prompt="Once upon", temperature=0, max_tokens=10, logprobs=2)
    assert r.choices[0].text == local.generate("Once upon", temperature=0, max_tokens=10)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert r.usage.prompt_tokens == len(local.encode("Once upon"))
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=model_name, prompt="Once upon", temperature=0, max_tokens=10, stream=True))
    assert streamed == r.choices[0].text
    two = client.completions.create(model=model_name, prompt=["Once upon", "Hello"], temperature=0, max_tokens=4)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == r.choices[0].text[: len(
        two.choices[0].text)]


@pytest.mark.parametrize("field, value, param", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}], "tools"),
    ("functions", [{"name": "f"}], "functions"),
    ("response_format", {"type": "xml"}, "response_format"),
    ("modalities", ["audio"], "modalities"),
    ("frobnicate", 1, "frobnicate"),
    ("temperature", 5, "temperature"),
    ("temperature", "hot", "temperature"),
    ("top_logprobs", 3, "top_logprobs"),         # without logprobs: true
    ("logit_bias", {"999999": 5}, "logit_bias"),
    ("max_tokens", 100000, "max_tokens"),        # beyond the context window
    ("n", 0, "n"),
    ("messages", [], "messages"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages.0.content"),
])
def test_bad_requests_get_400_in_openai_shape(client, model_name, field, value, param):
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 2, field: value}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=body.pop("messages"), extra_body=body)
    assert e.value.status_code == 400
    err = e.value.body if "message" in (e.value.body or {}) else e.value.body["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_unknown_model_bad_json_huge_body_and_bad_key(server, client, model_name):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/chat/completions", content=b'{"model": "x", "messages": [', headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = json.dumps({"model": model_name, "messages": [{"role": "user", "content": "a" * 10_000_000}]})
    r = httpx.post(server + "/v1/chat/completions", content=big.encode(), headers=auth, timeout=60)
    assert r.status_code == 413 and "at most" in r.json()["error"]["message"]
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(server + "/v1/models").status_code == 401  # no key at all
    assert httpx.get(server + "/health").status_code == 200     # health stays open
    # and everyone else is still served
    assert client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=3).choices[0].message


def test_eight_async_streams_are_batched_and_interleave(server, local, model_name, no_eos):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    bias = {int(k): v for k, v in no_eos.items()}  # every answer runs its full 40 tokens
    expected = [local.chat(p, temperature=0, max_tokens=40, logit_bias=bias) for p in prompts]

    async def main():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)

        async def one(p):
            times, text = [], ""
            stream = await client.chat.completions.create(model=model_name, temperature=0, max_tokens=40,
                                                          messages=[{"role": "user", "content": p}], stream=True,
                                                          logit_bias=no_eos)
            async for ch in stream:
                if ch.choices and ch.choices[0].delta.content:
                    text += ch.choices[0].delta.content
                    times.append(time.perf_counter())
            return text, times

        results = await asyncio.gather(*(one(p) for p in prompts))
        plain = await client.chat.completions.create(model=model_name, temperature=0, max_tokens=40,
                                                     messages=[{"role": "user", "content": prompts[0]}],
                                                     logit_bias=no_eos)
        await client.close()
        return results, plain

    results, plain = asyncio.run(main())
    assert [r[0] for r in results] == expected
    assert plain.choices[0].message.content == expected[0]
    # served together: every stream's tokens arrive while every other stream is still running
    spans = [(t[0], t[-1]) for _, t in results]
    assert max(s for s, _ in spans) < min(e for _, e in spans)
    assert metric(server, "mmchat_max_batch_size") >= 4


def test_full_queue_429_and_disconnect_frees_slots(server, client, model_name, no_eos):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = server + "/v1/chat/completions"
    long = {"model": model_name, "messages": MESSAGES, "max_tokens": 2000, "stream": True, "temperature": 1.0,
            "logit_bias": no_eos}  # each runs until it is cancelled
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=20)) as h:
        streams = [h.stream("POST", url, headers=headers, json=long) for _ in range(12)]
        responses = [s.__enter__() for s in streams]  # 8 get slots, 4 wait in the queue
        try:
            assert all(r.status_code == 200 for r in responses)
            end = time.time() + 10
            while time.time() < end and httpx.get(server + "/health").json()["running"] < 8:
                time.sleep(0.02)
            assert httpx.get(server + "/health").json() | {"status": "ok"} == {
                "status": "ok", "model": model_name, "running": 8, "waiting": 4}
            r = httpx.post(url, headers=headers, json={**long, "stream": False}, timeout=60)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        finally:
            for s in streams:
                s.__exit__(None, None, None)  # the clients go away mid-answer
    end = time.time() + 10
    while time.time() < end and httpx.get(server + "/health").json()["running"]:
        time.sleep(0.05)
    health = httpx.get(server + "/health").json()
    assert health["running"] == 0 and health["waiting"] == 0
    assert metric(server, "mmchat_engine_cancelled_total") >= 12
    assert client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=3).choices[0].message


@pytest.mark.slow
def test_smollm2_over_http(smollm2_path, smollm2):
    """The real model over HTTP: a sensible answer, the same streamed and not, usage counted right. (A request
    whose prompt is cached computes its last position alone; in bf16 that rounding can flip a near tie, so
    only requests that both hit the cache are compared token for token.)"""
    proc, base = start_server(str(smollm2_path), "--slots", "4")
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        q = [{"role": "user", "content": "What is the capital of France?"}]
        name = client.models.list().data[0].id
        r = client.chat.completions.create(model=name, messages=q, temperature=0, max_tokens=24)
        answer = r.choices[0].message.content
        assert "Paris" in answer
        assert len(answer.split()) >= 3 and r.usage.prompt_tokens == len(smollm2.render_chat(q))
        # streamed and not, both with the prompt already cached, give the same text
        text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model=name, messages=q, temperature=0, max_tokens=24, stream=True))
        again = client.chat.completions.create(model=name, messages=q, temperature=0, max_tokens=24)
        assert text == again.choices[0].message.content and "Paris" in text
    finally:
        stop_server(proc)


def test_non_streaming_client_that_gives_up_frees_its_slot(server, model_name, no_eos):
    body = {"model": model_name, "messages": MESSAGES, "max_tokens": 2000, "logit_bias": no_eos}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(60, read=1.0))
    end = time.time() + 10
    while time.time() < end and httpx.get(server + "/health").json()["running"]:
        time.sleep(0.05)
    assert httpx.get(server + "/health").json()["running"] == 0


def test_eight_streams_share_decode_steps(server, model_name, no_eos):
    """8 x 150 tokens take about 150 batched decode steps, not 1200: what makes the aggregate rate of many
    clients a multiple of one client's (the wall-clock ratio is in benchmarks/serve_load.py; on a shared
    machine it is too noisy for a test)."""
    async def stream(client, i, tokens):
        body = {"model": model_name, "messages": [{"role": "user", "content": f"Tell me about number {i}"}],
                "max_tokens": tokens, "stream": True, "logit_bias": no_eos}
        async with client.stream("POST", server + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {KEY}"}) as r:
            return sum([1 async for line in r.aiter_lines() if '"content"' in line])

    async def run(clients, tokens=150):
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(stream(client, i, tokens) for i in range(clients)))

    before = metric(server, "mmchat_engine_decode_steps_total")
    generated = metric(server, "mmchat_engine_generated_tokens_total")
    busy = metric(server, "mmchat_engine_busy_seconds_total")
    start = time.perf_counter()
    asyncio.run(run(8))
    wall = time.perf_counter() - start
    steps = metric(server, "mmchat_engine_decode_steps_total") - before
    assert 0 < metric(server, "mmchat_engine_busy_seconds_total") - busy <= wall
    assert metric(server, "mmchat_engine_generated_tokens_total") - generated == 8 * 150
    assert steps < 2 * 150, steps  # unbatched it would be 8 * 149; arrivals and prefills stagger a little


def test_response_format_json_schema(client, model_name):
    """Even a random model answers with JSON that fits the schema: tokens that would break it are masked."""
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "count"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model_name, messages=MESSAGES, temperature=1.0, seed=3, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert value["answer"] in ("yes", "no") and 0 <= value["count"] <= 9 and set(value) == {"answer", "count"}
    assert r.choices[0].finish_reason == "stop"


def test_openai_parse_with_a_pydantic_model(client, model_name):
    """The `openai` client's parse(): it sends the Pydantic model as a strict json_schema and reads the answer
    back into that model; the schema's enum and bounds hold even for a random model."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Verdict(BaseModel):
        answer: Literal["yes", "no"]
        confidence: int = Field(ge=0, le=9)
        tags: list[Literal["short", "long"]] = Field(max_length=3)

    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    for seed in (1, 2, 3):
        r = parse(model=model_name, messages=MESSAGES, response_format=Verdict, temperature=1.0, seed=seed,
                  max_tokens=60)
        verdict = r.choices[0].message.parsed
        assert isinstance(verdict, Verdict), r.choices[0].message.content
        assert verdict.answer in ("yes", "no") and 0 <= verdict.confidence <= 9
