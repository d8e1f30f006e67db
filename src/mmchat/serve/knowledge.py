"""Answers from the knowledge base over the OpenAI API: a request with `"knowledge": "default"` (mmchat's
extension; also "sample" or true) retrieves passages for its last user message before the model answers.

With no relevant passage the answer is that the documents do not say (the model is not asked); otherwise the
model answers from the numbered passages, the answer cites them ([1]; added for the best passage when the
model leaves it out), and the message carries `citations`: the cited passages' number, source and text.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from ..chat.knowledge import DONT_KNOW, KnowledgeBase, Passage, grounded_messages
from ..errors import MMChatError
from .openai import APIError, new_id, now, sse, usage

_open: dict[str, KnowledgeBase] = {}
_lock = threading.Lock()


def knowledge_base(which) -> KnowledgeBase:
    """The request's knowledge base, opened once per server: true/"default" (mmchat kb add's, or the sample shop
    while that is empty) or "sample"."""
    from ..chat.assistant import open_knowledge
    key = "default" if which is True else which
    if key not in ("default", "sample"):
        raise APIError(400, "'knowledge' is \"default\" (mmchat kb add's), \"sample\" or true", "knowledge")
    with _lock:
        if key not in _open:
            try:
                _open[key], _ = open_knowledge(key)
            except MMChatError as e:
                raise APIError(400, str(e), "knowledge") from None
        return _open[key]


@dataclass
class Grounding:
    passages: list[Passage]
    messages: list[dict]   # the conversation with the passages and the rule to cite them

    @property
    def declined(self) -> bool:
        return not self.passages

    def cited(self, text: str) -> list[int]:
        return sorted({int(n) for n in re.findall(r"\[(\d+)\]", text) if 1 <= int(n) <= len(self.passages)})

    def suffix(self, text: str) -> str:
        """What to add at the end of an answer that cites nothing: the best passage's number."""
        return "" if self.declined or self.cited(text) else " [1]"

    def citations(self, text: str) -> list[dict]:
        return [{"index": n, "source": self.passages[n - 1].cite(), "text": self.passages[n - 1].text}
                for n in self.cited(text)]


def ground(req, messages: list[dict]) -> Grounding | None:
    """None unless the request asks for the knowledge base; else the passages for its last user message and the
    messages to answer from (its system messages kept in front of the citing rule)."""
    which = getattr(req, "knowledge", None)
    if which in (None, False):
        return None
    kb = knowledge_base(which)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users or users[-1] != len(messages) - 1:
        raise APIError(400, "with 'knowledge' the last message must be the user's question", "messages")
    question = messages[-1]["content"]
    passages = kb.retrieve(question, 3)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    history = [m for m in messages[:-1] if m["role"] != "system"]
    return Grounding(passages, grounded_messages(question, passages, system, history) if passages else [])


def declined(model_name: str, n: int, stream: bool, include_usage: bool):
    """The answer when nothing relevant is found: a whole response, or its SSE events."""
    cid, created = new_id("chatcmpl"), now()
    if not stream:
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": i, "message": {"role": "assistant", "content": DONT_KNOW, "citations": []},
                             "logprobs": None, "finish_reason": "stop"} for i in range(n)],
                "usage": usage(0, 0)}

    def chunk(choices, u=None):
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "system_fingerprint": None, "choices": choices}
        if include_usage:
            body["usage"] = u
        return sse(body)

    async def events():
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
            yield chunk([{"index": i, "delta": {"content": DONT_KNOW, "citations": []}, "logprobs": None,
                          "finish_reason": None}])
            yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
        if include_usage:
            yield chunk([], usage(0, 0))
        yield sse("[DONE]")
    return events()
