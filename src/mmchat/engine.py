"""Continuous batching: one engine loop serves many requests against one static KV cache of N slots.

Token ids in, token ids out; the engine knows no text. Every step of its background thread
  1. frees the slots of finished or cancelled requests and gives free slots to waiting requests,
     each to the free slot whose cached tokens share the longest prefix with its prompt (turn N of a chat
     then prefills only the new turn, not the whole conversation again);
  2. prefills one chunk of one new prompt (chunked, so a long prompt does not stall the others);
  3. runs one batched decode forward over every decoding sequence and samples each one's next token.

    engine = Engine(model, eos_token_ids=[2], slots=8)
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0))
    for t in handle:           # TokenOut, one per new token; `async for` works too
        ...
    handle.cancel()            # frees the slot at the next step
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .errors import MMChatError
from .generate import Sampler, SamplingParams, TokenOut, model_lock
from .model import Transformer
from .threads import follow_load


class EngineBusy(MMChatError):
    """The waiting queue is full; try again shortly."""


_END = object()  # the marker after a request's last item


class Handle:
    """One request: iterate it (or `async for`) for its TokenOut items; `cancel()` stops it and frees its slot.
    The last TokenOut carries finish_reason "stop" (an end-of-sequence or stop token) or "length"."""

    def __init__(self, engine: "Engine", rid: int, prompt: list[int], params: SamplingParams, seq: int,
                 channel: queue.Queue | None):
        self.engine, self.id, self.prompt, self.params, self.seq = engine, rid, prompt, params, seq
        self.channel = channel              # when set, items go there as (seq, item) instead of our own queue
        self.cached_tokens = 0              # prompt tokens found in the slot's cache, not prefilled again
        self.images: list[tuple[int, torch.Tensor]] = []  # (start, (n, d) embeddings) replacing prompt slots
        self.generated: list[int] = []
        self.stop_ids: set[int] = set()     # tokens that end it (end-of-sequence and stop tokens)
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self._q: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    # -- engine side ------------------------------------------------------------------------------------------
    def _put(self, item):
        if self.channel is not None:
            self.channel.put((self.seq, None if item is _END else item))
            return
        self._q.put(item)
        if self._loop is not None:
            self.engine._wake_later(self._loop, self._event)

    # -- caller side ------------------------------------------------------------------------------------------
    def cancel(self):
        """Stop generating; the slot is freed at the engine's next step. Iteration ends after what was queued."""
        if self.finish_reason is None and not self.cancelled:
            self.cancelled = True
            self.engine._wake()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def __aiter__(self):
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        return self._anext_items()

    async def _anext_items(self):
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                self._event.clear()
                if self._q.empty():  # checked again after clear(), so a put in between is not missed
                    await self._event.wait()
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def tokens(self) -> list[int]:
        """Wait for the end; all new tokens, an end-of-sequence token excluded."""
        for _ in self:
            pass
        return self.generated[:-1] if self.finish_reason == "stop" and self.generated and \
            self.generated[-1] in self.engine._stops(self.params) else list(self.generated)


@dataclass
class Slot:
    """One row of the KV cache and what it holds."""
    index: int
    tokens: list[int] = field(default_factory=list)  # the ids whose keys/values are in positions 0..len-1
    handle: Handle | None = None
    prefilled: int = 0          # prompt tokens already in the cache (while prefilling)
    budget: int = 0             # how many tokens this request may generate
    next_token: int | None = None  # sampled, not yet fed to the model
    last_used: float = 0.0


@dataclass
class EngineStats:
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    rejected: int = 0
    prompt_tokens: int = 0          # prompt tokens of all admitted requests
    prefilled_tokens: int = 0       # of those, the ones computed (the rest came from a slot's cache)
    copied_tokens: int = 0          # cached ones copied from another slot's cache (a shared system prompt)
    generated_tokens: int = 0
    decode_steps: int = 0
    batch_size: int = 0             # sequences in the latest decode step
    max_batch_size: int = 0         # the largest decode step so far
    busy_seconds: float = 0.0       # time spent in forward passes


class Engine:
    """Owns a model and a static KV cache of `slots` rows of `max_len` positions, and the loop that serves
    every submitted request from them. Position max_len - 1 is scratch (an idle row with a full cache writes
    there inside a decode batch), so a sequence uses at most max_len - 1 positions."""

    def __init__(self, model: Transformer, eos_token_ids: list[int] = (), slots: int = 4, max_len: int | None = None,
                 max_queue: int = 64, prefill_chunk: int = 256):
        if slots < 1:
            raise MMChatError(f"the engine needs at least one slot (got {slots})")
        self.model = model
        self.eos_token_ids = set(eos_token_ids)
        self.max_len = min(max_len or 2048, model.cfg.max_seq_len)
        if self.max_len < 2:
            raise MMChatError(f"the engine's context must be at least 2 positions (got {self.max_len})")
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.device = model.tok_embeddings.weight.device
        self.slots = [Slot(i) for i in range(slots)]
        model.setup_cache(slots, self.max_len)
        self._caches = [layer.attn.cache for layer in model.layers]  # ours, reinstalled if someone swaps them
        self.sampler = Sampler([SamplingParams()] * slots, model.cfg.vocab_size, self.device)
        self.stats = EngineStats()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens_per_second
        self._waiting: deque[Handle] = deque()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        # asyncio consumers to wake, by event loop: one call_soon_threadsafe per loop per step, not per token
        self._wakeups: dict[asyncio.AbstractEventLoop, list[asyncio.Event]] = {}
        self._wakeups_lock = threading.Lock()
        self._model_lock = model_lock(model)  # shared with direct generate() calls on the same model
        self._thread = threading.Thread(target=self._run, name="mmchat-engine", daemon=True)
        self._thread.start()

    # -- public -----------------------------------------------------------------------------------------------
    @property
    def context_len(self) -> int:
        """The longest sequence (prompt + answer) one slot holds."""
        return self.max_len - 1

    def submit(self, prompt: list[int], params: SamplingParams, seq: int = 0,
               channel: queue.Queue | None = None, images: list[tuple[int, torch.Tensor]] | None = None) -> Handle:
        """Queue a request. Raises MMChatError for a prompt that cannot fit, EngineBusy when the queue is full.
        `seq` tags its TokenOut items; with `channel`, items go there as (seq, item), None after the last.
        `images`: (start, (n, d) embeddings) blocks that replace the embeddings of prompt[start:start + n]."""
        params.validate()
        if not prompt:
            raise MMChatError("the prompt is empty; give some text")
        if len(prompt) >= self.context_len:
            raise MMChatError(f"the prompt is {len(prompt)} tokens but the context window is {self.context_len}; "
                              "shorten it")
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise MMChatError(f"the prompt has token ids outside the vocabulary (0..{vocab - 1})")
        with self._cond:
            if self._closed:
                raise MMChatError("the engine is shut down")
            free = sum(s.handle is None for s in self.slots)  # waiting requests the loop has yet to admit
            if len(self._waiting) >= self.max_queue + free:
                self.stats.rejected += 1
                raise EngineBusy(f"the server is busy ({len(self._waiting)} requests waiting); retry shortly")
            handle = Handle(self, next(self._ids), list(prompt), params, seq, channel)
            handle.images = sorted(images or [], key=lambda im: im[0])
            handle.stop_ids = self._stops(params)
            self._waiting.append(handle)
            self.stats.requests += 1
            self._cond.notify()
        return handle

    def generate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        """One request, waited for: its new tokens, an end-of-sequence token excluded."""
        return self.submit(prompt, params).tokens()

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds, all requests together."""
        cutoff = time.perf_counter() - window
        return sum(n for t, n in list(self._recent) if t >= cutoff) / window

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s.handle is not None for s in self.slots)

    def cancel_all(self):
        """Cancel every running and waiting request (a server's shutdown grace period ran out)."""
        with self._cond:
            handles = list(self._waiting) + [s.handle for s in self.slots if s.handle is not None]
        for h in handles:
            h.cancel()

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for h in list(self._waiting) + [s.handle for s in self.slots if s.handle]:
            h._put(_END)
        self._flush_wakeups()

    # -- the loop -----------------------------------------------------------------------------------------------
    def _wake(self):
        with self._cond:
            self._cond.notify()

    def _wake_later(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event):
        """Note an asyncio consumer that has items; `_flush_wakeups` wakes each event loop once for all of them."""
        with self._wakeups_lock:
            self._wakeups.setdefault(loop, []).append(event)

    def _flush_wakeups(self):
        with self._wakeups_lock:
            pending, self._wakeups = self._wakeups, {}
        for loop, events in pending.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    def _stops(self, p: SamplingParams) -> set[int]:
        return (set() if p.ignore_eos else self.eos_token_ids) | set(p.stop_token_ids)

    def _run(self):
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._has_work():
                        self._cond.wait()
                    if self._closed:
                        return
                    self._reap()
                    self._admit()
                self._flush_wakeups()
                try:
                    with self._model_lock:
                        self._step()
                except Exception as e:  # a bug or out of memory: fail the running requests, keep serving
                    for s in self.slots:
                        if s.handle is not None:
                            s.handle._put(MMChatError(f"generation failed: {e}"))
                            self._release(s, "error")
                self._flush_wakeups()

    def _has_work(self) -> bool:
        return bool(self._waiting) or any(s.handle is not None for s in self.slots)

    def _reap(self):
        """Free the slots of cancelled requests, and drop cancelled requests that never got one."""
        for s in self.slots:
            if s.handle is not None and s.handle.cancelled:
                self.stats.cancelled += 1
                self._release(s, None)
        for h in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(h)
            self.stats.cancelled += 1
            h._put(_END)

    def _release(self, slot: Slot, reason: str | None):
        h = slot.handle
        if reason is not None and h.finish_reason is None:
            h.finish_reason = reason
        slot.handle, slot.next_token, slot.last_used = None, None, time.perf_counter()
        if h.images:  # nobody may reuse the cache past the first image on the strength of its placeholder ids
            slot.tokens = slot.tokens[: h.images[0][0]]
        h._put(_END)

    def _admit(self):
        """Give each free slot to the next waiting request: the slot sharing the longest prefix with it."""
        while self._waiting:
            free = [s for s in self.slots if s.handle is None]
            if not free:
                return
            h = self._waiting.popleft()
            slot = max(free, key=lambda s: (_common_prefix(s.tokens, h.prompt), -s.last_used * (s.tokens != []),
                                            -s.index))
            keep = min(_common_prefix(slot.tokens, h.prompt), len(h.prompt) - 1)  # prefill at least one token
            if h.images:  # image slots hold placeholder ids: equal ids do not mean equal inputs there
                keep = min(keep, h.images[0][0])
            slot.tokens = slot.tokens[:keep]
            slot.handle, slot.prefilled, slot.next_token = h, keep, None
            slot.budget = min(h.params.max_tokens, self.context_len - len(h.prompt))
            h.cached_tokens = keep
            self.sampler.reset_row(slot.index, h.params, h.prompt)
            self.stats.prompt_tokens += len(h.prompt)
            self.stats.prefilled_tokens += len(h.prompt) - keep

    def _prefix_donor(self, slot: Slot, h: Handle) -> tuple[Slot | None, int]:
        """The other slot whose cache starts with the most of h's prompt, and how many tokens: requests that
        share a system prompt compute it once, not once per slot."""
        limit = len(h.prompt) - 1 if not h.images else min(len(h.prompt) - 1, h.images[0][0])
        best, best_len = None, 0
        for s in self.slots:
            n = min(_common_prefix(s.tokens, h.prompt), limit)
            if s.handle is not None and s.handle.images:  # placeholder ids from there on
                n = min(n, s.handle.images[0][0])
            if s is not slot and n > best_len:
                best, best_len = s, n
        return best, best_len

    def _install_cache(self):
        if self.model.layers[0].attn.cache is not self._caches[0]:  # whoever swaps caches swaps all layers'
            for layer, cache in zip(self.model.layers, self._caches):
                layer.attn.cache = cache
        self.model.cache_len = self.max_len

    def _step(self):
        follow_load()  # fewer threads while other processes keep a core busy
        self._install_cache()
        start = time.perf_counter()
        prefilling = [s for s in self.slots if s.handle is not None and s.next_token is None]
        if prefilling:
            self._prefill_chunk(min(prefilling, key=lambda s: s.handle.id))
        decoding = [s for s in self.slots if s.handle is not None and s.next_token is not None
                    and not s.handle.cancelled]
        if decoding:
            self._decode(decoding)
        self.stats.busy_seconds += time.perf_counter() - start

    def _prefill_chunk(self, slot: Slot):
        h = slot.handle
        # nothing computed yet: another slot may hold more of the prompt (looked for now, not at admission, so
        # requests that came together find the first one's prefill done); its keys and values are copied over
        if slot.prefilled == h.cached_tokens:
            donor, shared = self._prefix_donor(slot, h)
            if shared > slot.prefilled:
                for cache in self._caches:
                    cache.k[slot.index, :, :shared] = cache.k[donor.index, :, :shared]
                    cache.v[slot.index, :, :shared] = cache.v[donor.index, :, :shared]
                self.stats.copied_tokens += shared - slot.prefilled
                self.stats.prefilled_tokens -= shared - slot.prefilled
                slot.tokens, slot.prefilled, h.cached_tokens = h.prompt[:shared], shared, shared
        chunk = h.prompt[slot.prefilled: slot.prefilled + self.prefill_chunk]
        start = slot.prefilled
        tokens = torch.tensor([chunk], dtype=torch.long, device=self.device)  # (1, T)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]  # (1, T)
        rows = torch.tensor([slot.index], device=self.device)  # (1,)
        last = start + len(chunk) == len(h.prompt)
        embeds = self._image_embeds(h, tokens, start)
        self._mark_image_rows([slot])
        logits = self.model(None if embeds is not None else tokens, positions, embeds=embeds,
                            output_index=torch.tensor([len(chunk) - 1], device=self.device)
                            if last else torch.tensor([0], device=self.device), cache_rows=rows)[:, -1]  # (1, V)
        slot.tokens.extend(chunk)
        slot.prefilled += len(chunk)
        if last:
            self._emit([slot], logits)

    def _decode(self, decoding: list[Slot]):
        """One forward pass for the decoding slots only; idle slots cost nothing. `cache_rows` always names
        their rows, even when they are 0..B-1: the gathered keys and values (only the used part of each row)
        are contiguous, and batched attention over them is faster than over strided views of a long cache."""
        index = [s.index for s in decoding]
        tokens = torch.tensor([[s.next_token] for s in decoding], dtype=torch.long, device=self.device)  # (B, 1)
        positions = torch.tensor([[len(s.tokens)] for s in decoding], device=self.device)  # (B, 1)
        rows = torch.tensor(index, device=self.device)  # (B,)
        self._mark_image_rows(decoding)
        logits = self.model(tokens, positions, cache_rows=rows)[:, -1]  # (B, V)
        for s in decoding:
            s.tokens.append(s.next_token)
        self.stats.decode_steps += 1
        self.stats.batch_size = len(decoding)
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(decoding))
        self._emit(decoding, logits)

    def _mark_image_rows(self, slots: list[Slot]):
        """Tell the model which batch rows carry an image (an image adapter's low-rank update applies to those
        only): a (B,) bool tensor, or None when none does."""
        rows = [bool(s.handle.images) for s in slots]
        self.model.adapter_rows = torch.tensor(rows, device=self.device) if any(rows) else None

    def _image_embeds(self, h: Handle, tokens: torch.Tensor, start: int) -> torch.Tensor | None:
        """The chunk's input embeddings (1, T, d) with the parts of image blocks that fall inside it, or None."""
        end = start + tokens.size(1)
        inside = [(s, e) for s, e in h.images if s < end and s + e.size(0) > start]
        if not inside:
            return None
        x = self.model.embed(tokens)  # (1, T, d)
        for s, e in inside:
            lo, hi = max(s, start), min(s + e.size(0), end)
            x[0, lo - start: hi - start] = e[lo - s: hi - s].to(x.dtype)
        return x

    def _emit(self, slots: list[Slot], logits: torch.Tensor):
        """Sample the next token of each slot from its logits (B, V), hand it out, and end finished requests."""
        rows = [s.index for s in slots]
        next_tokens, chosen = self.sampler.draw(logits, rows)  # (B,), (B,)
        self.sampler.observe(next_tokens, rows)
        k = max(s.handle.params.top_logprobs for s in slots)
        top = None
        if k:
            top_vals, top_ids = logits.float().log_softmax(dim=-1).topk(k, dim=-1)  # (B, k) each
            top = list(zip(top_ids.tolist(), top_vals.tolist()))
        ids, lps = next_tokens.tolist(), chosen.tolist()  # the one host sync per step
        now = time.perf_counter()
        self._recent.append((now, len(slots)))
        while self._recent and self._recent[0][0] < now - 60:
            self._recent.popleft()
        for i, s in enumerate(slots):
            h = s.handle
            h.generated.append(ids[i])
            h.first_token_at = h.first_token_at or now
            self.stats.generated_tokens += 1
            n = len(h.generated)
            reason = "stop" if ids[i] in h.stop_ids else ("length" if n >= s.budget else None)
            alts = None
            if top is not None and h.params.top_logprobs:
                kk = h.params.top_logprobs
                alts = list(zip(top[i][0][:kk], top[i][1][:kk]))
            h._put(TokenOut(h.seq, ids[i], lps[i], alts, reason))
            if reason is not None:
                self.stats.finished += 1
                self._release(s, reason)
            else:
                s.next_token = ids[i]


def _set_all(events: list[asyncio.Event]):
    for e in events:
        e.set()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
