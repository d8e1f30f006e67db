"""A conversation with a model: history, system prompt, presets, the context window, saving.

    chat = mmchat.Chat("smollm2", preset="translator", target="German")
    print(chat.send("Good morning!"))
    for piece in chat.stream("And good night."):
        print(piece, end="")
    chat.save()            # into the conversation store; later turns are written as they happen

Each turn's prompt is the whole conversation rendered with the model's chat template. The engine keeps the
previous turn's tokens in its cache slot and prefills only what is new (`chat.last.prefilled_tokens`).
When the conversation outgrows the context window, the oldest turns are left out of the prompt (the system
prompt and a preset's examples stay) and a notice says so; they stay in the history and in the store.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..api import CHAT_DEFAULTS, LLM, StopStrings, sampling_params
from ..errors import MMChatError
from ..tokenizer import StreamDecoder
from . import presets as presets_mod
from .presets import Preset
from .store import Conversation, Store, StoredMessage, export, new_id

log = logging.getLogger("mmchat.chat")

# Sampling defaults per model family (matched against the model's name), over api.CHAT_DEFAULTS. Measured in
# benchmarks/chat_loops.py: SmolLM2-135M's greedy answers loop; these settings keep most answers out of loops.
MODEL_DEFAULTS: list[tuple[str, dict]] = [
    (r"smollm", dict(temperature=0.3, top_p=0.9, repetition_penalty=1.1)),
]
DEFAULT_CONTEXT = 4096  # tokens of context a chat uses unless asked for more (the model may allow more)


def model_defaults(llm: LLM) -> dict:
    """CHAT_DEFAULTS with the overrides for this model's family."""
    names = f"{llm.name} {llm.config.name}".lower()
    out = dict(CHAT_DEFAULTS)
    for pattern, values in MODEL_DEFAULTS:
        if re.search(pattern, names):
            out.update(values)
    return out


@dataclass
class TurnStats:
    """What one answer cost."""
    prompt_tokens: int = 0       # the rendered conversation
    cached_tokens: int = 0       # of those, found in the engine's cache (not prefilled again)
    new_tokens: int = 0
    ttft_s: float = 0.0          # submit -> first token (waiting + prefill + first sample)
    decode_s: float = 0.0        # first token -> last token
    finish_reason: str = ""      # stop, length or stopped (interrupted)
    dropped_turns: int = 0       # oldest turns left out of this prompt to fit the context window

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else 0.0

    def to_meta(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}


@dataclass
class Message:
    role: str
    content: str
    meta: dict = field(default_factory=dict)


class Chat:
    """One conversation. `send` answers and returns the text, `stream` yields it piece by piece; `history` is
    the conversation as OpenAI-style messages; `save` keeps it in the store (or exports it to a file)."""

    def __init__(self, llm: LLM | str | None = None, system: str | None = None, preset: str | Preset | None = None,
                 store: Store | str | Path | bool | None = None, context: int | None = None,
                 stop: list[str] | None = None, on_notice: Callable[[str], None] | None = None,
                 preset_vars: dict | None = None, tools=None, knowledge=None,
                 on_tool: Callable[[str, str, str], None] | None = None, **sampling):
        self.llm = llm if isinstance(llm, LLM) else LLM.load(llm or "smollm2", progress=False)
        self.on_notice = on_notice
        # tools the model may call (a ToolRegistry, or built-in names) and a knowledge base to answer from (a
        # KnowledgeBase, "sample", "default" or a kb.db path); a preset may name them too (chat/assistant.py)
        self.tools, self.knowledge, self.on_tool = None, None, on_tool
        self.notices: list[str] = []
        self.stop = list(stop or [])
        self.sampling: dict = {}
        self.messages: list[Message] = []
        self.last: TurnStats | None = None
        self.conversation_id: str | None = None
        self._in_store = False          # the store has a row for it (written with the first message or save())
        self.store: Store | None = None
        self._window_start = 0          # messages before this index no longer fit the context window
        self._fold_system = False       # the template refuses system messages: put the prompt in the first turn
        self.preset: Preset | None = None
        self._system: str | None = None
        if preset is not None:
            self.set_preset(preset, **(preset_vars or {}))
        if system is not None:
            self._system = system
        if tools is not None or knowledge is not None:
            from . import assistant
            self.tools, self.knowledge = assistant.attach(tools, knowledge, self.tools, self.knowledge,
                                                          self._notice)
        self.set_sampling(**sampling)
        self.context = self._context_window(context)
        if self.llm.template.is_fallback:
            self._notice("this model has no chat template; using ChatML")
        if store:
            self._attach_store(store)

    # -- settings ---------------------------------------------------------------------------------------------
    def _context_window(self, requested: int | None) -> int:
        limit = self.llm.config.max_seq_len
        if requested is not None and not 16 <= requested <= limit:
            raise MMChatError(f"the context window must be between 16 and {limit} tokens for this model "
                              f"(got {requested})")
        want = requested or min(DEFAULT_CONTEXT, limit)
        engine = self.llm.start_engine(slots=2, max_len=want + 1)  # once per model; later calls return it
        if engine.context_len < want and requested:
            self._notice(f"this model's engine was started with {engine.context_len} tokens per conversation; "
                         "the context window is that")
        return min(want, engine.context_len)

    @property
    def system(self) -> str | None:
        """The system prompt: set explicitly, else the preset's, else none (the template's default, if any)."""
        return self._system

    @system.setter
    def system(self, text: str | None):
        self._system = text or None
        self._window_start = 0
        self._save_settings()

    def set_preset(self, preset: str | Preset | None, **variables):
        """Switch to a preset (a name, a .toml path or a Preset): its system prompt, examples and sampling."""
        if preset is None:
            self.preset = None
        else:
            p = preset if isinstance(preset, Preset) else presets_mod.get(preset)
            self.preset = p.with_vars(**variables) if variables else p
        self._system = self.preset.system_prompt if self.preset and self.preset.system else None
        if self.preset and (self.preset.tools or self.preset.knowledge):
            from . import assistant
            self.tools, self.knowledge = assistant.attach(self.preset.tools or None, self.preset.knowledge,
                                                          None, None, self._notice)
        self._window_start = 0
        self._save_settings()

    def set_sampling(self, **overrides):
        """Override sampling settings for the next answers (None removes an override)."""
        merged = {**self.sampling, **overrides}
        merged = {k: v for k, v in merged.items() if v is not None}
        sampling_params(self.base_sampling(), **merged)  # refuses unknown names and bad values now
        self.sampling = merged
        self._save_settings()

    def base_sampling(self) -> dict:
        return {**model_defaults(self.llm), **(self.preset.sampling if self.preset else {})}

    def params(self, **overrides):
        return sampling_params(self.base_sampling(), **{**self.sampling, **overrides})

    # -- the conversation -------------------------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        """The conversation as OpenAI-style messages, the system prompt first."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m.role, "content": m.content} for m in self.messages]

    @property
    def context_messages(self) -> list[dict]:
        """What the model sees next turn: the system prompt, a preset's examples, and the turns that still fit."""
        return self._prefix() + [{"role": m.role, "content": m.content} for m in self.messages[self._window_start:]]

    def _prefix(self) -> list[dict]:
        """What every prompt starts with: the system prompt and the preset's example exchanges."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + (self.preset.example_messages if self.preset else [])

    def _render(self, messages: list[dict]) -> list[int]:
        if self._fold_system and messages and messages[0]["role"] == "system":
            system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
            if rest:
                rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
            messages = rest
        try:
            self._image_blocks = None  # what the engine splices into the image slots of the prompt
            if any(isinstance(m.get("content"), list) for m in messages):
                ids, self._image_blocks = self.llm.chat_prompt(messages)
                return ids
            return self.llm.render_chat(messages)
        except MMChatError:
            if self._fold_system or not messages or messages[0]["role"] != "system":
                raise
            self._fold_system = True  # e.g. Gemma's template: "System role not supported"
            return self._render(messages)

    def _prompt(self, messages: list[Message], reserve: int) -> tuple[list[int], int]:
        """Token ids for prefix + messages[window_start:], leaving the oldest turns out while they do not fit in
        the context window minus `reserve` tokens for the answer. Returns (ids, turns left out now)."""
        budget = self.context - reserve
        start = min(self._window_start, len(messages) - 1)
        as_dicts = [self._as_dict(m) for m in messages]
        ids = self._render(self._prefix() + as_dicts[start:])
        if len(ids) <= budget:
            self._window_start = start
            return ids, 0
        # Leave out whole turns from the oldest, down to 3/4 of the budget: the prompt's beginning then stays
        # the same for the next few turns, so their cached tokens are reused instead of dropped again.
        target, dropped = budget * 3 // 4, 0
        last_user = max(i for i, m in enumerate(messages) if m.role == "user")
        while len(ids) > target:
            nxt = next((i for i in range(start + 1, last_user + 1) if messages[i].role == "user"), None)
            if nxt is None:
                break
            dropped += sum(m.role == "user" for m in messages[start:nxt])
            start = nxt
            ids = self._render(self._prefix() + as_dicts[start:])
        if len(ids) > budget:
            fixed = len(self._render(self._prefix() + as_dicts[last_user:]))
            raise MMChatError(f"this message needs {fixed} tokens with the system prompt, but the context window "
                              f"holds {self.context} and {reserve} are kept for the answer; shorten it "
                              f"(or start with a larger --context)")
        self._window_start = start
        if dropped:
            self._notice(f"the conversation no longer fits the context window ({self.context} tokens): the "
                         f"{dropped} oldest turn(s) are left out of what the model sees from now on "
                         "(they stay in the history)")
        return ids, dropped

    @staticmethod
    def _as_dict(m: Message) -> dict:
        """A message for the template; its images (meta "images": file paths) as image content parts first."""
        if not m.meta.get("images"):
            return {"role": m.role, "content": m.content}
        return {"role": m.role, "content": [{"type": "image", "image": p} for p in m.meta["images"]]
                + [{"type": "text", "text": m.content}]}

    def stream(self, text: str, images: list | None = None, **sampling) -> Iterator[str]:
        """Send a user message and yield the answer as it comes. Closing the iterator early (or Ctrl-C) stops
        the answer and keeps what was said so far. `images`: paths of image files that go with the message."""
        if images:
            images = [str(Path(p).expanduser().resolve()) for p in images]
        if not isinstance(text, str) or not (text.strip() or images):
            raise MMChatError("the message is empty; type something")
        params = self.params(**sampling)
        # a previous message that never got an answer (a crash during it) is replaced by this one
        unanswered = bool(self.messages) and self.messages[-1].role == "user"
        candidate = self.messages[: len(self.messages) - unanswered] + \
            [Message("user", text, {"images": images} if images else {})]
        ids, dropped = self._prompt(candidate, reserve=min(params.max_tokens, self.context // 4))
        if unanswered:
            self._notice("the previous message had no answer; it is replaced by this one")
            self._truncate(len(self.messages) - 1)
        self.messages.append(candidate[-1])
        self._store_append(candidate[-1])
        return self._respond(ids, params, dropped)

    def send(self, text: str, **sampling) -> str:
        """Send a user message; the whole answer."""
        return "".join(self.stream(text, **sampling))

    def regenerate(self, **sampling) -> Iterator[str]:
        """Answer the last user message again (the previous answer is dropped). Yields the new answer."""
        if not self.messages:
            raise MMChatError("nothing to regenerate yet; send a message first")
        if self.messages[-1].role == "assistant":
            self._truncate(len(self.messages) - 1)
        if not self.messages or self.messages[-1].role != "user":
            raise MMChatError("nothing to regenerate: the last message is not yours")
        params = self.params(**sampling)
        ids, dropped = self._prompt(self.messages, reserve=min(params.max_tokens, self.context // 4))
        return self._respond(ids, params, dropped)

    def undo(self) -> list[Message]:
        """Take back the last exchange (your message and its answer). Returns what was removed."""
        if not self.messages:
            raise MMChatError("nothing to undo")
        last_user = max((i for i, m in enumerate(self.messages) if m.role == "user"), default=0)
        removed = self.messages[last_user:]
        self._truncate(last_user)
        return removed

    def reset(self):
        """Start a new conversation with the same model, preset and system prompt."""
        self.messages, self.last, self._window_start = [], None, 0
        if self.store is not None:
            self.conversation_id, self._in_store = new_id(), False

    def _truncate(self, keep: int):
        self.messages = self.messages[:keep]
        self._window_start = min(self._window_start, max(keep - 1, 0))
        if self._in_store:
            self.store.truncate(self.conversation_id, keep)

    # -- generation -------------------------------------------------------------------------------------------
    def _respond(self, ids: list[int], params, dropped: int) -> Iterator[str]:
        """The answer to the last user message: from the knowledge base, with tools, or plain."""
        if self.knowledge is not None or self.tools is not None:
            from . import assistant
            return assistant.turn(self, params, dropped)
        return self._answer(ids, params, dropped)

    def _answer(self, ids: list[int], params, dropped: int, finish_text=None) -> Iterator[str]:
        """Stream the answer to prompt `ids` and keep it. `finish_text(text)` may rewrite the kept text and add to its
        meta -> (text, meta), or return None to keep nothing (a tool call, not an answer)."""
        engine = self.llm.engine
        handle = engine.submit(ids, params, images=getattr(self, "_image_blocks", None))
        stats = TurnStats(prompt_tokens=len(ids), dropped_turns=dropped)
        decoder, stopper = StreamDecoder(self.llm.tokenizer), StopStrings(self.stop)
        pieces: list[str] = []
        finish = None
        try:
            for t in handle:
                stats.new_tokens += t.finish_reason != "stop"  # an end-of-turn token is not part of the answer
                delta = "" if t.finish_reason == "stop" else decoder.push(t.token)
                out = stopper.feed(delta)
                if stopper.stopped or t.finish_reason:
                    out += stopper.flush()
                    finish = "stop" if stopper.stopped else t.finish_reason
                if out:
                    pieces.append(out)
                    yield out
                if finish:
                    break
        finally:  # also on Ctrl-C or when the caller stops early: keep what was said
            handle.cancel()
            end = time.perf_counter()
            stats.cached_tokens = handle.cached_tokens
            if handle.first_token_at is not None:
                stats.ttft_s = handle.first_token_at - handle.submitted_at
                stats.decode_s = end - handle.first_token_at
            stats.finish_reason = finish or "stopped"
            self.last = stats
            answer = "".join(pieces).strip()
            kept = finish_text(answer) if finish_text is not None and answer else (answer, {})
            if kept is not None:
                self._finish(kept[0], stats, kept[1])

    def _finish(self, answer: str, stats: TurnStats, meta: dict | None = None):
        if not answer and stats.finish_reason == "stopped":
            # stopped before any text: take the question back too, so the history stays user/assistant pairs
            self._truncate(len(self.messages) - 1)
            return
        message = Message("assistant", answer, {**stats.to_meta(), "model": self.llm.name, **(meta or {})})
        self.messages.append(message)
        self._store_append(message)

    # -- notices ----------------------------------------------------------------------------------------------
    def _notice(self, text: str):
        self.notices.append(text)
        log.info(text)
        if self.on_notice:
            self.on_notice(text)

    # -- saving -----------------------------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"sampling": self.sampling, "context": getattr(self, "context", None),
                "preset_vars": self.preset.variables if self.preset else {}}

    def _attach_store(self, store: Store | str | Path | bool):
        """Save into `store` from now on; the conversation's row is written with its first message."""
        self.store = store if isinstance(store, Store) else Store(None if store is True else store)
        self.conversation_id = self.conversation_id or new_id()
        if self.messages:
            self._write_all()

    def _write_all(self):
        """Create the conversation's row with everything said so far (one transaction each)."""
        if not self._in_store:
            self.store.create(model=self.llm.name, system=self.system, preset=self.preset.name if self.preset else None,
                              settings=self._settings(), conversation_id=self.conversation_id)
            self._in_store = True
        self.store.replace(self.conversation_id, [StoredMessage(m.role, m.content, m.meta) for m in self.messages])

    def _store_append(self, m: Message):
        """Write one message (it is already the last of self.messages)."""
        if self.store is None:
            return
        if not self._in_store:
            self._write_all()
        else:
            self.store.append(self.conversation_id, m.role, m.content, m.meta)

    def _save_settings(self):
        if getattr(self, "_in_store", False):
            self.store.update(self.conversation_id, system=self.system, settings=self._settings(),
                              preset=self.preset.name if self.preset else None)

    def save(self, path: str | Path | None = None, title: str | None = None, store: Store | None = None) -> str | Path:
        """Without a path: keep this conversation in the store (later turns are written as they happen) and
        return its id. With a path ending in .md or .json: export it there and return the path."""
        if path is not None:
            return self.export(path)
        if self.store is None:
            self._attach_store(store or True)
        if not self._in_store:
            self._write_all()
        if title:
            self.store.update(self.conversation_id, title=title)
        return self.conversation_id

    def conversation(self) -> Conversation:
        """This conversation as the store would hold it."""
        if self._in_store:
            return self.store.get(self.conversation_id)
        now = time.time()
        return Conversation(self.conversation_id or "unsaved", "", self.llm.name, self.preset.name if self.preset else None, self.system,
                            self._settings(), now, now,
                            [StoredMessage(m.role, m.content, m.meta) for m in self.messages])

    def export(self, path: str | Path) -> Path:
        """Write the conversation as Markdown (.md) or JSON (.json)."""
        return export(self.conversation(), path)

    @classmethod
    def resume(cls, conversation_id: str, llm: LLM | str | None = None, store: Store | str | Path | None = None,
               **kwargs) -> "Chat":
        """Continue a saved conversation (an id or a unique prefix of one)."""
        store = store if isinstance(store, Store) else Store(store)
        conv = store.get(conversation_id)
        settings = conv.settings or {}
        chat = cls(llm if llm is not None else (conv.model or None), store=None,
                   context=kwargs.pop("context", None) or settings.get("context"), **kwargs)
        if conv.preset:
            try:
                chat.set_preset(conv.preset, **settings.get("preset_vars", {}))
            except MMChatError as e:
                chat._notice(f"preset '{conv.preset}' of this conversation is not available ({e}); going on without")
        chat._system = conv.system
        chat.sampling = dict(settings.get("sampling", {}))
        chat.messages = [Message(m.role, m.content, m.meta) for m in conv.messages]
        chat.store, chat.conversation_id, chat._in_store = store, conv.id, True
        if chat.messages and chat.messages[-1].role == "user":
            chat._notice("the last message has no answer (the previous session ended during it); "
                         "/regenerate answers it")
        return chat
