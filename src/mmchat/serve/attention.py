"""POST /api/explain: the attention of the served model over a text (the web page's "Attention" button on an
answer), from one forward pass through the written-out attention (explain/report.py).

    {"text": "...", "layer": 29, "head": 0, "format": "png" | "json", "view": "head" | "grid"}

format "png" (the default) answers an image: one head with token labels (view "head", the last layer by default)
or every layer x head (view "grid"); format "json" answers the tokens and that head's weights (T x T rows, each a
causal distribution summing to 1).
"""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response

from ..errors import MMChatError
from ..generate import model_lock
from . import openai as oa

MAX_CHARS = 4000  # explain itself refuses more than 512 tokens


def add_routes(app, llm, read_json):
    """Register the route on `app` (create_app's); `read_json` is its size-limited body reader."""

    @app.post("/api/explain")
    async def explain_attention(request: Request):
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("text"), str) or not body["text"].strip():
            raise oa.APIError(400, "send {\"text\": \"...\"}: the text whose attention to show", "text")
        text = body["text"][:MAX_CHARS]
        fmt, view = body.get("format", "png"), body.get("view", "head")
        if fmt not in ("png", "json") or view not in ("head", "grid"):
            raise oa.APIError(400, "'format' is png or json, 'view' is head or grid", "format")
        layer, head = body.get("layer"), body.get("head")
        for name, value in (("layer", layer), ("head", head)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise oa.APIError(400, f"'{name}' must be an integer", name)
        try:
            return await asyncio.to_thread(_answer, llm, text, fmt, view, layer, head)
        except MMChatError as e:
            raise oa.APIError(400, str(e), "text") from None


def _explain(llm, text: str):
    """explain() while the engine waits: with the model's lock held, and with the KV caches detached so that this
    pass neither reads nor overwrites what the engine's slots hold (the engine puts its caches back itself)."""
    from ..explain.report import explain
    model = llm.model
    with model_lock(model):
        saved = [layer.attn.cache for layer in model.layers], getattr(model, "cache_len", None)
        for layer in model.layers:
            layer.attn.cache = None
        model.cache_len = 0  # no cache: plain causal attention over the text
        try:
            return explain(llm, text)
        finally:
            for layer, cache in zip(model.layers, saved[0]):
                layer.attn.cache = cache
            model.cache_len = saved[1]


def _answer(llm, text, fmt, view, layer, head):
    from ..explain.report import label, save_report
    ex = _explain(llm, text)
    L, H = ex.attention.shape[:2]
    layer = L - 1 if layer is None else layer
    head = 0 if head is None else head
    if not (0 <= layer < L and 0 <= head < H):
        raise MMChatError(f"layer must be in 0..{L - 1} and head in 0..{H - 1}")
    if fmt == "json":
        import json
        return Response(json.dumps({"tokens": [label(t) for t in ex.tokens], "layer": layer, "head": head,
                                    "layers": L, "heads": H, "weights": ex.attention[layer, head].tolist()}),
                        media_type="application/json")
    with tempfile.TemporaryDirectory(prefix="mmchat-explain-") as tmp:
        save_report(ex, tmp, llm.tokenizer, layer, head)
        png = (Path(tmp) / ("attention_head.png" if view == "head" else "attention_grid.png")).read_bytes()
    return Response(png, media_type="image/png", headers={"X-Layer": str(layer), "X-Head": str(head)})
