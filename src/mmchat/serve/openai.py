"""OpenAI's request and response shapes, and the one function that turns a request into mmchat's settings.

`parse_request` is the only place a request body is read: it refuses fields mmchat does not support by name
(never ignoring them silently), checks every value, and maps the rest onto SamplingParams.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..api import CHAT_DEFAULTS
from ..generate import SamplingParams

# Fields of OpenAI's API that mmchat does not implement yet; a request that sets one gets a 400 naming it.
# (A value equal to OpenAI's default, such as "echo": false or null, is accepted: it asks for nothing.)
UNSUPPORTED = {
    "functions": None, "function_call": None,  # the deprecated form of tools: send tools and tool_choice
    "modalities": None, "audio": None, "prediction": None, "store": False,
    "metadata": None, "service_tier": None, "reasoning_effort": None, "web_search_options": None,
    "echo": False, "best_of": 1, "suffix": None,
}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- requests ------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class InputAudio(_Strict):
    data: str    # the audio file, base64
    format: str  # OpenAI's wav or mp3 (flac, ogg, opus, webm and m4a are read too)


class AudioPart(_Strict):
    """Speech in a user message; serve/audio.py replaces it by a TextPart of its transcript."""
    type: Literal["input_audio"]
    input_audio: InputAudio


class ImageURL(_Strict):
    url: str     # a data:image/...;base64 URI (nothing is fetched)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image is read at 224x224


class ImagePart(_Strict):
    """An image in a user message, read by the model's image adapter (mmchat.multimodal.projector)."""
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | AudioPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, fed back with their results
    tool_call_id: str | None = None           # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)                    # not OpenAI's: llama.cpp's and vLLM's extension
    min_p: float | None = Field(None, ge=0, le=1)            # extension
    repetition_penalty: float | None = Field(None, gt=0)     # extension
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None  # text, json_object or json_schema: checked where the tokenizer is known
    tools: list[dict] | None = None      # checked (schemas, names) in serve/tools.py
    tool_choice: str | dict | None = None  # none, auto, required or {"type": "function", "function": {...}}
    parallel_tool_calls: bool | None = None
    knowledge: bool | str | None = None  # mmchat's extension: answer from the knowledge base (serve/knowledge.py)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API: how many alternatives per token


# -- the one function ------------------------------------------------------------------------------------------
def parse_request(body: Any, kind: Literal["chat", "completion"], vocab_size: int
                  ) -> tuple[ChatCompletionRequest | CompletionRequest, SamplingParams, list[str]]:
    """An OpenAI request body (parsed JSON) -> (validated request, SamplingParams, stop strings).
    Raises APIError(400) naming the offending field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, harmless in UNSUPPORTED.items():
        if name in body and body[name] not in (None, harmless):
            raise APIError(400, f"'{name}' is not supported by mmchat yet; remove it from the request", name,
                           "unsupported_parameter")
    if kind == "chat" and isinstance(body.get("messages"), list):
        for i, m in enumerate(body["messages"]):
            parts = m.get("content") if isinstance(m, dict) else None
            for part in parts if isinstance(parts, list) else ():
                if isinstance(part, dict) and part.get("type") not in (None, "text", "input_audio", "image_url"):
                    raise APIError(400, f"content parts of type '{part['type']}' are not supported by this server "
                                   "yet; send text", f"messages.{i}.content", "unsupported_content")
                spec = part.get("image_url") if isinstance(part, dict) else None
                url = spec.get("url") if isinstance(spec, dict) else None
                if isinstance(url, str) and not url.startswith("data:"):
                    raise APIError(400, "image URLs are not fetched (mmchat makes no network requests); send the "
                                   "image inline as a data URI: data:image/png;base64,...",
                                   f"messages.{i}.content", "image_url_not_supported")
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    known = set(schema.model_fields)
    for name in body:
        if name not in known:
            raise APIError(400, f"unknown field '{name}'; mmchat accepts: {', '.join(sorted(known))}", name,
                           "unknown_parameter")
    try:
        req = schema.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"] if not _is_union_tag(str(p)))
        raise APIError(400, f"invalid '{param}': {err['msg']}", param or None) from None

    if kind == "chat":
        if not req.messages:
            raise APIError(400, "'messages' is empty; send at least one message", "messages")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "'max_tokens' and 'max_completion_tokens' disagree; send one of them",
                           "max_completion_tokens")
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        defaults = CHAT_DEFAULTS
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else 0
    else:
        if isinstance(req.prompt, list) and not req.prompt or req.prompt == "":
            raise APIError(400, "'prompt' is empty; give some text", "prompt")
        defaults = {}
        max_tokens = req.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        top = req.logprobs or 0

    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"'stop' has {len(stop)} strings; at most 4", "stop")
    if any(not s for s in stop):
        raise APIError(400, "'stop' strings must not be empty", "stop")

    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            tid = int(key)
        except ValueError:
            raise APIError(400, f"'logit_bias' keys are token ids; '{key}' is not a number", "logit_bias") from None
        if not 0 <= tid < vocab_size:
            raise APIError(400, f"'logit_bias' token id {tid} is outside the vocabulary (0..{vocab_size - 1})",
                           "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"'logit_bias' values must be in [-100, 100] (got {value})", "logit_bias")
        bias[tid] = value

    chosen = {
        "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty, "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty, "seed": req.seed,
    }
    values = {**defaults, **{k: v for k, v in chosen.items() if v is not None}}
    # OpenAI's presence/frequency penalties replace our default repetition penalty rather than stack on it
    if (req.presence_penalty or req.frequency_penalty) and req.repetition_penalty is None:
        values["repetition_penalty"] = 1.0
    values["max_tokens"] = max_tokens or 0  # 0: the rest of the context, filled in by the caller
    params = SamplingParams(**values, logit_bias=bias, top_logprobs=top)
    return req, params, stop


def _is_union_tag(part: str) -> bool:
    """pydantic names the member of a union it tried inside an error's location ('str', 'list[str]'...)."""
    return part in ("str", "int", "float", "bool") or part.startswith(("list[", "dict[", "function-"))


# -- responses -------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
