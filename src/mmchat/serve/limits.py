"""What the server accepts, what it writes down, and how it stops.

- Limits, each answered in OpenAI's error shape: a body over `max_body_bytes` gets 413, more than
  `max_messages` messages (or prompts) or a max_tokens over `max_tokens` get 400, more than `max_concurrent`
  API requests at once get 429 with Retry-After (the engine's bounded queue adds its own 429 behind this).
- The request log: one line per request (method, path, status, seconds), never the text of a message unless
  `log_messages` is set, and then redacted (privacy.Redactor).
- Graceful shutdown: on SIGTERM (or Ctrl-C) new requests get 503, requests in flight may finish for
  `grace_seconds`; after that the engine's requests are cancelled and every open stream ends cleanly (a final
  chunk with finish_reason "length", then [DONE]). Then the conversation store is closed and the process exits 0.

    policy = Policy(max_tokens=512)
    app = create_app(llm, "smollm2", policy=policy)
    run_server(app, "127.0.0.1", 8000)
"""
from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass

import uvicorn

from ..privacy import Redactor
from . import openai as oa

API_PREFIXES = ("/v1/", "/api/")
QUIET_PATHS = ("/health", "/metrics")  # polled often; not worth a log line each
LOGGED_TEXT_CHARS = 2000  # the most of one message's (redacted) text a log line carries


@dataclass
class Policy:
    max_body_bytes: int = 2 * 1024 * 1024  # a context window of text is far smaller; anything bigger is a mistake
    max_messages: int = 256                # messages in one chat request (prompts in one completions request)
    max_tokens: int = 4096                 # the most new tokens one choice may ask for (also bounded by the context)
    max_concurrent: int = 128              # API requests being served at once; more get 429
    grace_seconds: float = 10.0            # how long requests in flight may run on after SIGTERM
    log_messages: bool = False             # put (redacted) message text in the request log
    redact_store: bool = False             # redact conversations before they are saved

    def check(self, req) -> None:
        """Refuse a parsed request (serve/openai.py's) that asks for more than the limits allow."""
        items = getattr(req, "messages", None)
        what = "messages"
        if items is None:
            items, what = (req.prompt if isinstance(req.prompt, list) and req.prompt
                           and not isinstance(req.prompt[0], int) else [req.prompt]), "prompt"
        if len(items) > self.max_messages:
            raise oa.APIError(400, f"'{what}' has {len(items)} items; this server accepts at most "
                              f"{self.max_messages}", what, "array_above_max_length")
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None and asked > self.max_tokens:
            raise oa.APIError(400, f"max_tokens {asked} is above this server's limit of {self.max_tokens}; ask "
                              f"for at most {self.max_tokens}", "max_tokens", "invalid_value")


class Gate:
    """Plain ASGI layer in front of the routes: the concurrency limit, the 503 while shutting down, and the
    request log. It also counts the requests in flight so that a shutdown knows when they are done."""

    def __init__(self, policy: Policy, log=print):
        self.policy, self.log = policy, log
        self.active = 0            # every request being served, so that a shutdown can wait for them
        self.api_active = 0        # the ones under /v1 and /api, which the concurrency limit counts
        self.draining = False      # set by SIGTERM: new requests get 503
        self.cut_off = False       # set when the grace period ran out: open answers are ended
        self.redactor = Redactor()

    async def handle(self, inner, scope, receive, send):
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        path = scope["path"]
        api = path.startswith(API_PREFIXES)
        if self.draining:
            return await self._refuse(scope, receive, send, oa.APIError(
                503, "the server is shutting down; retry on another instance or after it restarts",
                code="shutting_down", type="server_error", headers={"Retry-After": "5", "Connection": "close"}))
        if api and self.api_active >= self.policy.max_concurrent:
            return await self._refuse(scope, receive, send, oa.APIError(
                429, f"the server is serving {self.api_active} requests, its limit; retry shortly",
                code="too_many_requests", type="rate_limit_error", headers={"Retry-After": "1"}))
        start, status = time.perf_counter(), {}
        seen = _Transcript() if self.policy.log_messages and api else None

        async def receive_and_note():
            message = await receive()
            if seen is not None and message["type"] == "http.request":
                seen.request(message.get("body", b""), self.policy.max_body_bytes)
            return message

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif seen is not None and message["type"] == "http.response.body":
                seen.response(message.get("body", b""))
            await send(message)

        self.active += 1
        self.api_active += api
        try:
            await inner(scope, receive_and_note, send_and_note)
        finally:
            self.active -= 1
            self.api_active -= api
            if path not in QUIET_PATHS:
                line = f"{scope['method']} {path} {status.get('code', '-')} {time.perf_counter() - start:.2f}s"
                if seen is not None:
                    line += seen.render(self.redactor)
                self.log(line)

    async def _refuse(self, scope, receive, send, err: oa.APIError):
        from fastapi.responses import JSONResponse
        await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
        if scope["path"] not in QUIET_PATHS:
            self.log(f"{scope['method']} {scope['path']} {err.status} refused ({err.code})")


class GateLayer:
    def __init__(self, app, gate: Gate):
        self.app, self.gate = app, gate

    async def __call__(self, scope, receive, send):
        await self.gate.handle(self.app, scope, receive, send)


class _Transcript:
    """The text of one request and its answer, gathered only when the log may show it (log_messages)."""

    def __init__(self):
        self.body, self.answer = bytearray(), bytearray()

    def request(self, chunk: bytes, limit: int):
        if len(self.body) < limit:
            self.body += chunk

    def response(self, chunk: bytes):
        if len(self.answer) < 1 << 20:
            self.answer += chunk

    def render(self, redactor: Redactor) -> str:
        texts = []
        try:
            body = json.loads(self.body)
        except ValueError:
            body = None
        if isinstance(body, dict):
            for m in body.get("messages") or []:
                if isinstance(m, dict):
                    content = m.get("content")
                    if isinstance(content, list):
                        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                    texts.append(f"{m.get('role', '?')}: {content}")
            if isinstance(body.get("prompt"), str):
                texts.append(f"prompt: {body['prompt']}")
        answer = _answer_text(bytes(self.answer))
        if answer:
            texts.append(f"answer: {answer}")
        return "".join(f"\n    {redactor.redact(str(t))[:LOGGED_TEXT_CHARS]!r}" for t in texts)


def _answer_text(raw: bytes) -> str:
    """The generated text in a response: a completion's JSON body or the deltas of its SSE stream."""
    def pieces(obj):
        for c in obj.get("choices") or [] if isinstance(obj, dict) else []:
            if not isinstance(c, dict):
                continue
            for part in (c.get("message"), c.get("delta")):
                if isinstance(part, dict) and isinstance(part.get("content"), str):
                    yield part["content"]
            if isinstance(c.get("text"), str):
                yield c["text"]

    text = raw.decode("utf-8", "replace")
    if text.startswith("data:"):
        out = []
        for line in text.splitlines():
            if line.startswith("data: {"):
                try:
                    out += pieces(json.loads(line[6:]))
                except ValueError:
                    pass
        return "".join(out)
    try:
        return "".join(pieces(json.loads(text)))
    except ValueError:
        return ""


# -- running and stopping ------------------------------------------------------------------------------------------
def run_server(app, host: str, port: int, log=print):
    """Serve `app` (from create_app) with uvicorn until SIGTERM or Ctrl-C, then drain as the module says."""
    policy: Policy = app.state.policy
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    server = DrainingServer(config, app, policy.grace_seconds, log)
    try:
        server.run()
    finally:
        close_app(app)
    if server.drained:
        log("stopped: requests in flight finished, conversations saved")


def close_app(app):
    """Stop the engine and close the conversation store (its last writes are already committed)."""
    for store in getattr(app.state, "stores", []):
        store.close()
    app.state.engine.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, but the first SIGTERM/SIGINT drains instead of stopping at once: the listening socket
    stays open so that new requests get a clear 503, requests in flight finish (or are cut cleanly when the
    grace period ends), and only then does uvicorn shut down. A second signal stops at once."""

    def __init__(self, config, app, grace: float, log=print):
        super().__init__(config)
        self.app, self.grace, self.log = app, grace, log
        self.drained = False
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame):
        gate = self.app.state.gate
        if sig not in (signal.SIGTERM, signal.SIGINT) or gate is None or gate.draining or self.loop is None:
            return super().handle_exit(sig, frame)  # uvicorn's own: stop now
        gate.draining = True
        self.log(f"got {signal.Signals(sig).name}: finishing {gate.active} request(s) in flight "
                 f"(grace {self.grace:g} s), refusing new ones")
        # a signal handler runs between two bytecodes of the loop's thread: hand the work to the loop
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain(gate)))

    async def _drain(self, gate: Gate):
        deadline = time.monotonic() + self.grace
        while gate.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if gate.active:
            self.log(f"grace period over: ending {gate.active} request(s)")
            gate.cut_off = True
            self.app.state.engine.cancel_all()
            end = time.monotonic() + 5
            while gate.active and time.monotonic() < end:
                await asyncio.sleep(0.05)
        self.drained = not gate.active
        self.should_exit = True
