"""The HTTP server: OpenAI-compatible routes over the continuous-batching engine, SSE streaming, metrics.

    app = create_app(llm, "smollm2", api_key=None)      # then uvicorn.run(app, host="127.0.0.1", port=8000)

Every request, streaming or not, becomes one engine request per choice; all of them decode together in the
engine's loop. A client that goes away has its requests cancelled at once, which frees their slots.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import Counter
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import CHAT_DEFAULTS, LLM, StopStrings
from ..engine import EngineBusy
from ..errors import MMChatError
from ..generate import SamplingParams, TokenOut, with_seed_offset
from ..tokenizer import StreamDecoder
from . import audio as speech_routes
from . import openai as oa
from .limits import Gate, GateLayer, Policy, run_server
from . import knowledge as kb_answers
from . import tools as tool_calls
from . import vision as image_routes

STATIC = Path(__file__).parent / "static"
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/audio/transcriptions", "/v1/audio/speech")


# -- one choice's text ---------------------------------------------------------------------------------------
class ChoiceText:
    """Token ids of one choice -> text deltas: incomplete UTF-8 held back, stop strings cut and held back while
    they could still match, and the tokens kept for logprobs."""

    def __init__(self, index: int, tokenizer, stop: list[str]):
        self.index = index
        self.decoder = StreamDecoder(tokenizer)
        self.stopper = StopStrings(stop)
        self.text = ""
        self.tokens: list[TokenOut] = []  # generated tokens, an end-of-sequence token excluded
        self.finish_reason: str | None = None

    def feed(self, t: TokenOut) -> tuple[str, list[TokenOut]]:
        """-> (text released now, tokens new since the last call)."""
        new = []
        delta = ""
        if t.finish_reason != "stop":  # "stop" from the engine: an end-of-sequence token, not text
            delta = self.decoder.push(t.token)
            self.tokens.append(t)
            new.append(t)
        out = self.stopper.feed(delta)
        if t.finish_reason or self.stopper.stopped:
            out += self.stopper.flush()
            self.finish_reason = "stop" if self.stopper.stopped else t.finish_reason
        self.text += out
        return out, new


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character; this maps those characters back to bytes.
    Printable Latin-1 bytes stand for themselves, the others are shifted to code points 256 and up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + shift)] = b
            shift += 1
    return mapping


class TokenInfo:
    """A token's text and raw bytes, as logprobs report them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, tid: int) -> str:
        return self.tokenizer.token_text(tid)

    def bytes(self, tid: int) -> list[int]:
        piece = self.tokenizer.id_to_token(tid) or ""
        table = _byte_decoder()
        if piece and all(c in table for c in piece):
            return [table[c] for c in piece]
        return list(self.text(tid).encode("utf-8"))

    def chat_entry(self, t: TokenOut) -> dict:
        return {"token": self.text(t.token), "logprob": t.logprob, "bytes": self.bytes(t.token),
                "top_logprobs": [{"token": self.text(i), "logprob": lp, "bytes": self.bytes(i)}
                                 for i, lp in (t.top or [])]}


class Metrics:
    def __init__(self):
        self.requests: Counter = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.started = time.time()

    def render(self, engine) -> str:
        s = engine.stats
        lines = ["# HELP mmchat_requests_total HTTP requests by endpoint and status.",
                 "# TYPE mmchat_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'mmchat_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        gauges = [
            ("prompt_tokens_total", "counter", "Prompt tokens of answered requests.", self.prompt_tokens),
            ("completion_tokens_total", "counter", "Tokens generated for answered requests.", self.completion_tokens),
            ("engine_prefilled_tokens_total", "counter", "Prompt tokens computed (not found in a slot's cache).",
             s.prefilled_tokens),
            ("engine_cached_prompt_tokens_total", "counter", "Prompt tokens reused from a slot's cache.",
             s.prompt_tokens - s.prefilled_tokens),
            ("engine_generated_tokens_total", "counter", "Tokens sampled by the engine.", s.generated_tokens),
            ("engine_decode_steps_total", "counter", "Batched decode forward passes.", s.decode_steps),
            ("engine_busy_seconds_total", "counter", "Seconds the engine spent in forward passes and sampling.",
             round(s.busy_seconds, 3)),
            ("engine_rejected_total", "counter", "Requests refused because the queue was full.", s.rejected),
            ("engine_cancelled_total", "counter", "Requests cancelled (client gone or stop string).", s.cancelled),
            ("queue_length", "gauge", "Requests waiting for a slot.", engine.queue_length),
            ("running_requests", "gauge", "Requests holding a slot.", engine.running),
            ("slots", "gauge", "KV-cache slots.", len(engine.slots)),
            ("batch_size", "gauge", "Sequences in the latest decode step.", s.batch_size),
            ("max_batch_size", "gauge", "Largest decode step so far.", s.max_batch_size),
            ("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
             round(engine.tokens_per_second(), 3)),
            ("uptime_seconds", "gauge", "Seconds since the server started.", round(time.time() - self.started, 1)),
        ]
        for name, kind, help_, value in gauges:
            lines += [f"# HELP mmchat_{name} {help_}", f"# TYPE mmchat_{name} {kind}", f"mmchat_{name} {value}"]
        return "\n".join(lines) + "\n"


def stream_chunk(cid: str, kind: str, created: int, model_name: str, choices: list, include_usage: bool,
                 usage=None) -> str:
    """One SSE event of a streamed completion; with include_usage every chunk carries `usage` (null until the
    last one), as OpenAI sends it."""
    body = {"id": cid, "object": kind, "created": created, "model": model_name, "system_fingerprint": None,
            "choices": choices}
    if include_usage:
        body["usage"] = usage
    return oa.sse(body)


def create_app(llm: LLM, model_name: str, api_key: str | None = None, slots: int = 8,
               max_len: int | None = None, max_queue: int = 64, store_path: str | Path | None = None,
               policy: Policy | None = None, log=print) -> FastAPI:
    engine = llm.start_engine(slots=slots, max_len=max_len, max_queue=max_queue)
    tokens = TokenInfo(llm.tokenizer)
    metrics = Metrics()
    app = FastAPI(title="mmchat", docs_url=None, redoc_url=None)
    app.state.llm, app.state.engine, app.state.metrics = llm, engine, metrics
    policy = policy or Policy()
    gate = Gate(policy, log)  # limits, the request log, and 503 while shutting down (serve/limits.py)
    app.state.policy, app.state.gate = policy, gate

    # -- errors, auth and accounting ----------------------------------------------------------------------------
    @app.exception_handler(oa.APIError)
    async def api_error(request: Request, e: oa.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        err = oa.APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                          code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code)

    def protected(path: str) -> bool:
        return bool(api_key) and (path.startswith(("/v1/", "/api/")) or path == "/metrics")

    class Guard:
        """API key, request counting and a one-line 500 for bugs. Plain ASGI (not BaseHTTPMiddleware), so the
        routes see the client's disconnect as it happens."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            path, status = scope["path"], {}

            async def send_and_note(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if protected(path) and not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
                    err = oa.APIError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
                    await JSONResponse(err.body(), status_code=401)(scope, receive, send_and_note)
                    return
                await self.inner(scope, receive, send_and_note)
            except Exception as e:  # a bug: one line to the client, the server keeps serving
                if "code" in status:
                    raise  # the answer has begun; nothing better to send
                err = oa.APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
                await JSONResponse(err.body(), status_code=500)(scope, receive, send_and_note)
            finally:
                if path in ROUTES and "code" in status:  # known routes only: random paths add no labels
                    metrics.requests[(path, status["code"])] += 1

    app.add_middleware(GateLayer, gate=gate)  # inside Guard: the API key is checked first
    app.add_middleware(Guard)

    async def read_json(request: Request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > policy.max_body_bytes:
            async for _ in request.stream():  # read it off the wire so the client sees our answer
                pass
            raise oa.APIError(413, f"the request body is {int(length)} bytes; at most {policy.max_body_bytes}",
                              code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= policy.max_body_bytes:
                chunks.append(chunk)
        if size > policy.max_body_bytes:
            raise oa.APIError(413, f"the request body is {size} bytes; at most {policy.max_body_bytes}",
                              code="body_too_large")
        try:
            return json.loads(b"".join(chunks))
        except UnicodeDecodeError:
            raise oa.APIError(400, "the request body is not UTF-8 JSON") from None
        except json.JSONDecodeError as e:
            raise oa.APIError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column "
                              f"{e.colno}") from None

    def check_model(name: str):
        if name != model_name:
            raise oa.APIError(404, f"model '{name}' does not exist here; this server serves '{model_name}'",
                              "model", "model_not_found")

    def fit(prompt: list[int], params: SamplingParams, default_max: int) -> SamplingParams:
        """Fill in max_tokens, or refuse a prompt or max_tokens that the context window cannot hold."""
        room = engine.context_len - len(prompt)
        if room < 1:
            raise oa.APIError(400, f"the prompt is {len(prompt)} tokens but the context window is "
                              f"{engine.context_len}; shorten it", "messages", "context_length_exceeded")
        if params.max_tokens == 0:
            return replace(params, max_tokens=min(default_max, room))
        if params.max_tokens > room:
            raise oa.APIError(400, f"max_tokens {params.max_tokens} plus the prompt's {len(prompt)} tokens exceed "
                              f"the context window of {engine.context_len}; ask for at most {room}",
                              "max_tokens", "context_length_exceeded")
        return params

    def submit_all(prompts: list[list[int]], params: SamplingParams, n: int, images: list | None = None):
        """One engine request per (prompt, sample); seeds offset per sample so n choices differ reproducibly.
        images: the image blocks of the (one) prompt, spliced in by the engine."""
        handles = []
        try:
            for ids in prompts:
                for j in range(n):
                    handles.append(engine.submit(ids, with_seed_offset(params, j), seq=len(handles), images=images))
        except EngineBusy as e:
            for h in handles:
                h.cancel()
            raise oa.APIError(429, str(e), code="queue_full", type="rate_limit_error",
                              headers={"Retry-After": "1"}) from None
        except MMChatError as e:
            for h in handles:
                h.cancel()
            raise oa.APIError(400, str(e)) from None
        return handles

    async def events(handles):
        """(index, TokenOut) from all handles as they come; None marks the end of one handle."""
        if len(handles) == 1:  # one choice: read it directly, without a task and a queue hop per token
            items = handles[0].__aiter__()
            try:
                while True:
                    try:
                        t = await items.__anext__()
                    except StopAsyncIteration:
                        return
                    except Exception as e:  # noqa: BLE001 - the engine failed this request
                        raise oa.APIError(500, str(e), type="server_error") from None
                    yield 0, t
            finally:
                handles[0].cancel()  # a no-op when finished; frees the slot when the client went away
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, h):
            try:
                async for t in h:
                    await q.put((i, t))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                await q.put((i, e))
            await q.put((i, None))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            open_ = len(handles)
            while open_:
                i, t = await q.get()
                if t is None:
                    open_ -= 1
                elif isinstance(t, Exception):
                    raise oa.APIError(500, str(t), type="server_error")
                else:
                    yield i, t
        finally:
            for h in handles:
                h.cancel()  # a no-op for finished ones; frees the slots when the client went away
            for task in tasks:
                task.cancel()

    async def run_choices(handles, choices: list[ChoiceText]):
        """Feed every choice its tokens; yields (choice, text delta, new tokens) and ends when all are done."""
        async for i, t in events(handles):
            c = choices[i]
            if c.finish_reason is not None:
                continue  # tokens made before a stop string's cancel reached the engine
            text, new = c.feed(t)
            if c.finish_reason is not None:
                handles[i].cancel()
            yield c, text, new
        if gate.cut_off:  # a shutdown ended these answers early: close each one like an answer out of tokens
            for c in choices:
                if c.finish_reason is None:
                    c.finish_reason = "length"
                    yield c, "", []

    async def until_disconnect(request: Request, work):
        """Run `work` (a coroutine); if the client goes away first, cancel it (which frees its slots)."""
        task = asyncio.create_task(work)
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if not done and await request.is_disconnected():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                raise oa.APIError(499, "the client closed the connection")
        return task.result()

    def usage_of(prompts, choices):
        completion = sum(len(c.tokens) for c in choices)
        metrics.prompt_tokens += sum(len(p) for p in prompts)
        metrics.completion_tokens += completion
        return oa.usage(sum(len(p) for p in prompts), completion)

    def streaming(gen):
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- routes ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": engine.running, "waiting": engine.queue_length}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(metrics.started),
                                            "owned_by": "mmchat"}]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        check_model(name)
        return {"id": model_name, "object": "model", "created": int(metrics.started), "owned_by": "mmchat"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req, params, stop = oa.parse_request(await read_json(request), "chat", llm.config.vocab_size)
        policy.check(req)
        await speech_routes.transcribe_audio_parts(req.messages)  # input_audio parts -> the user's text
        check_model(req.model)
        messages = tool_calls.chat_messages(req)
        tools = tool_calls.plan(req)  # None without tools; 400 for a broken tool schema or tool_choice
        grounding = kb_answers.ground(req, messages)  # passages from the knowledge base, when asked for
        if grounding is not None:
            if tools is not None:
                raise oa.APIError(400, "'knowledge' and 'tools' cannot be combined yet; send one of them", "tools")
            if grounding.declined:  # nothing relevant: say so without asking the model
                answer = kb_answers.declined(model_name, req.n, req.stream,
                                             bool(req.stream_options and req.stream_options.include_usage))
                return streaming(answer) if req.stream else answer
            messages = grounding.messages
        images = None  # image blocks (serve/vision.py) when a message has image_url parts
        if tool_calls.uses_tools(messages, tools):
            if image_routes.has_images(req):
                raise oa.APIError(400, "images cannot be combined with tools yet; send one or the other", "tools")
            prompt = tool_calls.render(llm, messages, tools)
        elif image_routes.has_images(req):  # the encoder runs off the event loop
            prompt, images = await asyncio.to_thread(image_routes.chat_prompt, llm, req, messages)
        else:
            try:
                prompt = llm.render_chat(messages)
            except MMChatError as e:
                raise oa.APIError(400, str(e), "messages") from None
        params = fit(prompt, params, min(CHAT_DEFAULTS["max_tokens"], policy.max_tokens))
        if tools is not None and tools.constrained:  # calls whose arguments always fit their tool's schema
            if (req.response_format or {}).get("type", "text") != "text":
                raise oa.APIError(400, "response_format cannot be combined with tools the model may call; "
                                  "send tool_choice 'none' or leave one out", "response_format")
            params = replace(params, constraint=tool_calls.constraint(llm, tools))
        if req.response_format is not None:  # constrained decoding: every token must keep the output valid
            try:
                params = replace(params, constraint=llm.constraint(response_format=req.response_format))
            except MMChatError as e:
                raise oa.APIError(400, str(e), "response_format") from None
        handles = submit_all([prompt], params, req.n, images)
        choices = [ChoiceText(i, llm.tokenizer, stop) for i in range(req.n)]
        cid, created = oa.new_id("chatcmpl"), oa.now()
        want_logprobs = req.logprobs
        calling = tools is not None and tools.constrained

        def message(c: ChoiceText) -> tuple[dict, str | None]:
            """A finished choice -> (its message, its finish_reason): calls become message.tool_calls."""
            if grounding is not None:  # the answer cites its passages
                text = c.text + grounding.suffix(c.text)
                return ({"role": "assistant", "content": text, "citations": grounding.citations(text)},
                        c.finish_reason)
            if not calling:
                return {"role": "assistant", "content": c.text}, c.finish_reason
            content, calls = tool_calls.split_output(c.text)
            return ({"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})},
                    tool_calls.finish_reason(c.finish_reason, calls))

        if not req.stream:
            async def collect():
                async for _ in run_choices(handles, choices):
                    pass
            await until_disconnect(request, collect())
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": c.index, "message": m,
                             "logprobs": {"content": [tokens.chat_entry(t) for t in c.tokens]}
                             if want_logprobs else None,
                             "finish_reason": reason} for c in choices for m, reason in [message(c)]],
                "usage": usage_of([prompt], choices),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choice_list, usage=None):
            return stream_chunk(cid, "chat.completion.chunk", created, model_name, choice_list, include_usage, usage)

        async def stream():
            # with tools, each choice's text goes through a CallStream: content deltas, or tool_calls deltas
            splitters = [tool_calls.CallStream() for _ in choices] if calling else None
            for c in choices:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async for c, text, new in run_choices(handles, choices):
                logprobs = {"content": [tokens.chat_entry(t) for t in new]} if want_logprobs and new else None
                if splitters:
                    deltas = splitters[c.index].feed(text)
                    if c.finish_reason is not None:
                        deltas += splitters[c.index].finish()
                else:
                    deltas = [{"content": text}] if text else []
                if logprobs and not deltas:
                    deltas = [{"content": ""}]
                for j, delta in enumerate(deltas):
                    yield chunk([{"index": c.index, "delta": delta, "logprobs": logprobs if j == 0 else None,
                                  "finish_reason": None}])
                if c.finish_reason is not None and grounding is not None:  # the citation, and what it cites
                    extra = grounding.suffix(c.text)
                    yield chunk([{"index": c.index, "delta": {"content": extra,
                                                              "citations": grounding.citations(c.text + extra)},
                                  "logprobs": None, "finish_reason": None}])
                if c.finish_reason is not None:
                    reason = tool_calls.finish_reason(c.finish_reason, splitters[c.index].complete_calls) \
                        if splitters else c.finish_reason
                    yield chunk([{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason}])
            if include_usage:
                yield chunk([], usage_of([prompt], choices))
            else:
                usage_of([prompt], choices)
            yield oa.sse("[DONE]")

        return streaming(stream())

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, params, stop = oa.parse_request(await read_json(request), "completion", llm.config.vocab_size)
        policy.check(req)
        check_model(req.model)
        if isinstance(req.prompt, str):
            prompts = [llm.encode(req.prompt)]
        elif all(isinstance(p, int) for p in req.prompt):
            prompts = [list(req.prompt)]
        else:
            prompts = [llm.encode(p) for p in req.prompt]
        if any(not p for p in prompts):
            raise oa.APIError(400, "a prompt is empty; give some text", "prompt")
        params = [fit(p, params, min(16, policy.max_tokens)) for p in prompts]
        handles = []
        try:
            for p, pp in zip(prompts, params):
                handles += submit_all([p], pp, req.n)
        except oa.APIError:
            for h in handles:
                h.cancel()
            raise
        choices = [ChoiceText(i, llm.tokenizer, stop) for i in range(len(handles))]
        cid, created = oa.new_id("cmpl"), oa.now()
        k = req.logprobs

        def legacy_logprobs(ts: list[TokenOut], offset: int = 0):
            if k is None:
                return None
            texts = [tokens.text(t.token) for t in ts]
            offsets, at = [], offset
            for s in texts:
                offsets.append(at)
                at += len(s)
            return {"tokens": texts, "token_logprobs": [t.logprob for t in ts],
                    "top_logprobs": [{tokens.text(i): lp for i, lp in (t.top or [])} for t in ts] if k else None,
                    "text_offset": offsets}

        if not req.stream:
            async def collect():
                async for _ in run_choices(handles, choices):
                    pass
            await until_disconnect(request, collect())
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": c.index, "text": c.text, "logprobs": legacy_logprobs(c.tokens),
                                 "finish_reason": c.finish_reason} for c in choices],
                    "usage": usage_of(prompts, choices)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choice_list, usage=None):
            return stream_chunk(cid, "text_completion", created, model_name, choice_list, include_usage, usage)

        async def stream():
            emitted = [0] * len(choices)
            async for c, text, new in run_choices(handles, choices):
                if text or (k is not None and new) or c.finish_reason:
                    yield chunk([{"index": c.index, "text": text,
                                  "logprobs": legacy_logprobs(new, emitted[c.index]) if new else None,
                                  "finish_reason": c.finish_reason}])
                emitted[c.index] += len(text)
            u = usage_of(prompts, choices)
            if include_usage:
                yield chunk([], u)
            yield oa.sse("[DONE]")

        return streaming(stream())

    # -- the web page's own data: saved conversations and presets ------------------------------------------------
    stores = []
    app.state.stores = stores  # closed at shutdown

    def store():
        """The conversation store (SQLite under $MMCHAT_HOME), opened on first use."""
        if not stores:
            from ..chat.store import Store
            try:
                stores.append(Store(store_path, redact=policy.redact_store))
            except MMChatError as e:
                raise oa.APIError(500, str(e), type="server_error") from None
        return stores[0]

    def conversation_fields(body) -> tuple[dict, list]:
        from ..chat.store import StoredMessage
        if not isinstance(body, dict) or not isinstance(body.get("messages", []), list):
            raise oa.APIError(400, "a conversation is a JSON object with a 'messages' list")
        messages = []
        for i, m in enumerate(body.get("messages", [])):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise oa.APIError(400, f"messages.{i} needs a role (user or assistant) and text content",
                                  f"messages.{i}")
            if not isinstance(m.get("meta") or {}, dict):
                raise oa.APIError(400, f"messages.{i}.meta must be an object", f"messages.{i}.meta")
            messages.append(StoredMessage(m["role"], m["content"], m.get("meta") or {}))
        fields = {k: body[k] for k in ("title", "system", "preset", "settings", "model") if body.get(k) is not None}
        if not isinstance(fields.get("settings", {}), dict):
            raise oa.APIError(400, "'settings' must be an object", "settings")
        for k in ("title", "system", "preset", "model"):
            if not isinstance(fields.get(k, ""), str):
                raise oa.APIError(400, f"'{k}' must be a string", k)
        return fields, messages

    def find(cid: str) -> str:
        try:
            return store().resolve(cid)
        except MMChatError as e:
            raise oa.APIError(404, str(e), code="not_found") from None

    @app.get("/api/conversations")
    async def list_conversations(q: str = "", limit: int = 100):
        items = store().list(limit=max(1, min(limit, 1000)) if not q else 1000)
        if q:  # search titles and message text, case-insensitively
            needle = q.lower()
            items = [c for c in items if needle in c["title"].lower()
                     or any(needle in m.content.lower() for m in store().get(c["id"]).messages)][:limit]
        return items

    @app.post("/api/conversations")
    async def create_conversation(request: Request):
        fields, messages = conversation_fields(await read_json(request))
        conv = store().create(**{k: v for k, v in fields.items() if k != "title"}, title=fields.get("title", ""))
        store().replace(conv.id, messages)
        return {"id": conv.id}

    @app.get("/api/conversations/{cid}")
    async def get_conversation(cid: str):
        return store().get(find(cid)).to_dict()

    @app.put("/api/conversations/{cid}")
    async def put_conversation(cid: str, request: Request):
        fields, messages = conversation_fields(await read_json(request))
        full = find(cid)
        if fields:
            store().update(full, **fields)
        store().replace(full, messages)
        return {"id": full}

    @app.delete("/api/conversations/{cid}")
    async def delete_conversation(cid: str):
        store().delete(find(cid))
        return {"id": cid, "deleted": True}

    from .attention import add_routes as add_attention_routes
    add_attention_routes(app, llm, read_json)  # POST /api/explain: the page's attention view of an answer

    tool_calls.add_routes(app, read_json)  # the web page's built-in tools

    @app.get("/api/presets")
    async def presets():
        try:
            from ..chat import presets as chat_presets
            found = chat_presets.available()
        except (ImportError, MMChatError):
            return []
        return [{"name": name, "description": p.description, "system": p.system_prompt, "sampling": p.sampling,
                 "tools": p.tools, "knowledge": p.knowledge}
                for name, p in sorted(found.items())]

    @app.get("/")
    async def index():
        page = STATIC / "index.html"
        if not page.exists():
            return PlainTextResponse(f"mmchat is serving '{model_name}'; the OpenAI API is at /v1\n")
        return FileResponse(page)

    speech_routes.add_routes(app)  # POST /v1/audio/transcriptions and /v1/audio/speech (serve/audio.py)

    if STATIC.is_dir():
        from fastapi.staticfiles import StaticFiles
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, slots: int = 8,
          max_len: int | None = None, max_queue: int = 64, log=print, policy: Policy | None = None,
          **load_options):
    """Load `model` (load_options: LLM.load's dtype, quant...) and serve it until SIGTERM or Ctrl-C."""
    from ..api import load
    log(f"loading {model} ...")
    llm = load(model, **load_options)
    name = model if not Path(model).exists() else llm.name
    app = create_app(llm, name, api_key, slots, max_len, max_queue, policy=policy, log=log)
    log(f"serving '{name}' ({len(app.state.engine.slots)} slots of {app.state.engine.context_len} tokens) on "
        f"http://{host}:{port}  (OpenAI API: http://{host}:{port}/v1)")
    run_server(app, host, port, log)  # drains on SIGTERM: see serve/limits.py
