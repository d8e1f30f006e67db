"""The server's speech routes, in OpenAI's shapes, and audio content parts in chat messages.

- POST /v1/audio/transcriptions: a multipart upload (file, model whisper-tiny.en) -> {"text": ...}
  (response_format json, text, verbose_json, srt or vtt).
- POST /v1/audio/speech: {"model", "input", "voice", "response_format", "speed"} -> the audio file.
- `input_audio` parts of chat messages ({"data": base64, "format": "wav"|"mp3"}) are transcribed and handed to
  the model as the user's text (transcribe_audio_parts).

Transcription and synthesis run in worker threads, so the event loop keeps streaming other answers meanwhile.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import MMChatError
from ..multimodal import audio, speech
from . import openai as oa

UPLOAD_SLACK = 64 * 1024  # multipart boundaries and the other fields, beyond the audio file itself
TRANSCRIPTION_FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature",
                        "timestamp_granularities[]", "timestamp_granularities"}
TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
AUDIO_PART_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "webm", "m4a")  # OpenAI names wav and mp3


def _bad_audio(e: MMChatError, param: str) -> oa.APIError:
    if "the limit is" in str(e):
        return oa.APIError(413, str(e), param, "file_too_large")
    if isinstance(e, audio.NotInstalled):
        return oa.APIError(501, str(e), param, "not_installed", type="server_error")
    return oa.APIError(400, str(e), param, "invalid_audio")


async def transcribe_bytes(data: bytes, name: str, param: str, **options) -> audio.Transcript:
    try:
        return await asyncio.to_thread(audio.transcribe, data, name, **options)
    except MMChatError as e:
        raise _bad_audio(e, param) from None


async def transcribe_audio_parts(messages) -> None:
    """Replace each `input_audio` part of the chat messages (serve/openai.py's Message) by a text part holding
    its transcript, so the model reads what was said."""
    for i, m in enumerate(messages):
        if not isinstance(m.content, list):
            continue
        for j, part in enumerate(m.content):
            if part.type != "input_audio":
                continue
            param = f"messages.{i}.content.{j}.input_audio"
            if m.role != "user":
                raise oa.APIError(400, f"input_audio parts belong in user messages, not {m.role} ones", param)
            fmt = part.input_audio.format
            if fmt not in AUDIO_PART_FORMATS:
                raise oa.APIError(400, f"input_audio format '{fmt}' is not supported; use "
                                  f"{', '.join(AUDIO_PART_FORMATS)}", f"{param}.format")
            try:
                data = base64.b64decode(part.input_audio.data, validate=True)
            except (binascii.Error, ValueError):
                raise oa.APIError(400, "input_audio data is not valid base64 (send the file's bytes, base64-encoded, "
                                  "without a data: prefix)", f"{param}.data") from None
            heard = await transcribe_bytes(data, f"the {fmt} audio of message {i}", param)
            m.content[j] = oa.TextPart(type="text", text=heard.text)


def _subtitles(segments: list[dict], vtt: bool) -> str:
    def stamp(t: float) -> str:
        ms = int(round(t * 1000))
        sep = "." if vtt else ","
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"
    cues = [("" if vtt else f"{n}\n") + f"{stamp(s['start'])} --> {stamp(s['end'])}\n{s['text']}\n"
            for n, s in enumerate(segments, 1)]
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(cues)


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str
    voice: str = "default"
    response_format: str = "mp3"  # OpenAI's default
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = None
    stream_format: str | None = None


def add_routes(app: FastAPI) -> None:
    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > audio.MAX_AUDIO_BYTES + UPLOAD_SLACK:
            async for _ in request.stream():  # read it off the wire so the client sees our answer
                pass
            raise oa.APIError(413, f"the upload is {int(length) / 2**20:.1f} MB; audio files may be at most "
                              f"{audio.MAX_AUDIO_BYTES // 2**20} MB", "file", "file_too_large")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise oa.APIError(400, "send the audio as multipart/form-data with a 'file' field (and 'model')")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as e:  # noqa: BLE001 - starlette's parser errors vary by version; all mean a bad upload
            raise oa.APIError(400, f"the multipart upload could not be read: {e}") from None
        for name in form:
            if name not in TRANSCRIPTION_FIELDS:
                raise oa.APIError(400, f"unknown field '{name}'; mmchat accepts: "
                                  f"{', '.join(sorted(TRANSCRIPTION_FIELDS))}", name, "unknown_parameter")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise oa.APIError(400, "'file' is missing: attach the audio file", "file")
        model = form.get("model")
        if not model:
            raise oa.APIError(400, "'model' is missing; use whisper-tiny.en", "model")
        if model not in (audio.MODEL_NAME, "whisper-1"):
            raise oa.APIError(404, f"model '{model}' does not exist here; transcription uses {audio.MODEL_NAME}",
                              "model", "model_not_found")
        language = str(form.get("language") or "en").lower()
        if language not in ("en", "english"):
            raise oa.APIError(400, f"{audio.MODEL_NAME} understands English only (language '{language}')",
                              "language")
        fmt = str(form.get("response_format") or "json")
        if fmt not in TRANSCRIPTION_FORMATS:
            raise oa.APIError(400, f"response_format '{fmt}' is not one of {', '.join(TRANSCRIPTION_FORMATS)}",
                              "response_format")
        try:
            temperature = float(form.get("temperature") or 0)
        except ValueError:
            temperature = -1.0
        if not 0 <= temperature <= 1:
            raise oa.APIError(400, "'temperature' must be a number from 0 to 1", "temperature")
        data = await upload.read(audio.MAX_AUDIO_BYTES + 1)
        heard = await transcribe_bytes(data, upload.filename or "the upload", "file",
                                       prompt=form.get("prompt") or None, temperature=temperature)
        if fmt == "text":
            return PlainTextResponse(heard.text + "\n")
        if fmt in ("srt", "vtt"):
            return PlainTextResponse(_subtitles(heard.segments, fmt == "vtt"))
        if fmt == "verbose_json":
            return {"task": "transcribe", "language": heard.language, "duration": round(heard.duration, 2),
                    "text": heard.text,
                    "segments": [{"id": n, **s} for n, s in enumerate(heard.segments)]}
        return JSONResponse({"text": heard.text})

    @app.post("/v1/audio/speech")
    async def speak(request: Request):
        body = await request.body()
        if len(body) > 64 * 1024:
            raise oa.APIError(413, f"the request body is {len(body)} bytes; at most 65536", code="body_too_large")
        try:
            req = SpeechRequest.model_validate(json.loads(body))
        except json.JSONDecodeError as e:
            raise oa.APIError(400, f"the request body is not valid JSON: {e.msg}") from None
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(p) for p in err["loc"])
            message = f"unknown field '{param}'" if err["type"] == "extra_forbidden" else \
                f"invalid '{param}': {err['msg']}"
            raise oa.APIError(400, message, param or None) from None
        if req.instructions:
            raise oa.APIError(400, "'instructions' is not supported by mmchat's voices; remove it", "instructions",
                              "unsupported_parameter")
        if req.stream_format not in (None, "audio"):
            raise oa.APIError(400, "only stream_format 'audio' is supported", "stream_format",
                              "unsupported_parameter")
        if req.response_format not in speech.FORMATS:
            raise oa.APIError(400, f"response_format '{req.response_format}' is not one of "
                              f"{', '.join(speech.FORMATS)}", "response_format")
        try:
            voice = speech.resolve_voice(req.voice, req.model)

            def make() -> bytes:
                samples, rate = speech.synthesize(req.input, voice, req.speed)
                return speech.encode(samples, rate, req.response_format)
            data = await asyncio.to_thread(make)
        except MMChatError as e:
            param = "voice" if "voice" in str(e) else "model" if "model" in str(e) else "input"
            raise _bad_audio(e, param) from None
        return Response(data, media_type=speech.MEDIA_TYPES[req.response_format],
                        headers={"X-Voice": voice})
