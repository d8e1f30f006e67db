"""Images in chat requests: OpenAI image_url content parts (data URIs) through the model's image adapter."""
from __future__ import annotations

from . import openai as oa


def has_images(req) -> bool:
    return any(isinstance(m.content, list) and any(p.type == "image_url" for p in m.content) for m in req.messages)


def chat_prompt(llm, req, messages: list[dict]) -> tuple[list[int], list]:
    """The request's messages (text dicts, as serve/tools.py makes them) with their image parts put back ->
    (prompt token ids, image blocks for the engine). Bad images and a model without a projector: APIError 400."""
    from ..errors import MMChatError
    merged = []
    for i, (m, d) in enumerate(zip(req.messages, messages)):
        if isinstance(m.content, list) and any(p.type == "image_url" for p in m.content):
            if m.role != "user":
                raise oa.APIError(400, f"images go in user messages (messages.{i} is {m.role})", f"messages.{i}")
            d = {**d, "content": [{"type": "text", "text": p.text} if p.type == "text" else
                                  {"type": "image_url", "image_url": {"url": p.image_url.url}}
                                  for p in m.content if p.type in ("text", "image_url")]}
        merged.append(d)
    try:
        return llm.chat_prompt(merged)
    except MMChatError as e:
        raise oa.APIError(400, str(e), "messages", "invalid_image") from None
