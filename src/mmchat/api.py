"""The Python API: `llm = mmchat.load("smollm2")`, then `llm.generate`, `llm.stream`, `llm.chat`."""
from __future__ import annotations

import atexit
import queue
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import torch

from . import registry
from .chat.template import ChatTemplate
from .errors import MMChatError
from .engine import Engine
from .formats.gguf import forget_readers
from .formats.load import load_checkpoint
from .generate import SamplingParams, generate, with_seed_offset
from .model import Transformer, empty_model
from .tokenizer import StreamDecoder, Tokenizer

# Settings that keep a small chat model on topic and out of loops (greedy answers of SmolLM2 repeat themselves).
CHAT_DEFAULTS = dict(temperature=0.3, top_p=0.9, repetition_penalty=1.1, max_tokens=512)
GENERATE_DEFAULTS = dict(temperature=0.8, top_p=0.95, max_tokens=128)
SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}


@dataclass
class Completion:
    """One finished answer."""
    text: str
    token_ids: list[int]
    finish_reason: str                       # "stop" or "length"
    prompt_tokens: int
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


def build_model(config, tensors: dict[str, torch.Tensor], dtype=torch.float32, device="cpu") -> Transformer:
    """Our Transformer with the checkpoint's tensors, built without initializing and filled without copies."""
    model = empty_model(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()},
                          strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    return model.eval()


def _cache_meta(model: Transformer, tok: Tokenizer, template: str | None, dtype, quant) -> dict:
    from . import quantize
    kinds = quantize.kinds_of(model) if quant else {}
    return {"config": model.cfg.to_dict(), "dtype": str(dtype).removeprefix("torch."), "quant": quant,
            "kinds": kinds, "chat_template": template, "tokenizer": tok.tok.to_str(),
            "bos_token_id": tok.bos_token_id, "eos_token_ids": tok.eos_token_ids, "add_bos": tok.add_bos}


def _from_cache(meta: dict, tensors: dict[str, torch.Tensor], device):
    """The model, tokenizer and chat template from a converted-weights cache entry (tensors memory-mapped),
    or None when the entry does not fill the model."""
    from tokenizers import Tokenizer as HFTokenizer

    from . import quantize
    from .config import ModelConfig
    cfg = ModelConfig(**meta["config"])
    dtype = quantize.DTYPES[meta["dtype"]]
    model = empty_model(cfg)
    if meta["quant"]:
        quantize.restructure(model, meta["kinds"], dtype, "meta")
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False, assign=True)
    if not meta["quant"] and cfg.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    if any(t.is_meta for t in model.state_dict().values()):
        return None  # an entry from another layout: convert again
    tok = Tokenizer(HFTokenizer.from_str(meta["tokenizer"]), meta["bos_token_id"], meta["eos_token_ids"],
                    meta["add_bos"])
    return model.eval(), tok, meta["chat_template"]


def sampling_params(defaults: dict, **kwargs) -> SamplingParams:
    unknown = set(kwargs) - SAMPLING_FIELDS
    if unknown:
        raise MMChatError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(SAMPLING_FIELDS))}")
    values = {**defaults, **{k: v for k, v in kwargs.items() if v is not None}}
    return SamplingParams(**values).validate()


class StopStrings:
    """Cuts a sequence's text at the first stop string; while streaming, holds back a tail that could still
    grow into one, so a stop string never reaches the output."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str) -> str:
        self.text += delta
        for s in self.stops:
            at = self.text.find(s)
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        hold = 0
        if not self.stopped:
            for s in self.stops:  # longest suffix of text that is a prefix of a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
        out = self.text[self.emitted: len(self.text) - hold]
        self.emitted += len(out)
        return out

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, chat_template: ChatTemplate, name: str = ""):
        self.model, self.tokenizer, self.template, self.name = model, tokenizer, chat_template, name
        self.config = model.cfg
        self.load_seconds = 0.0
        self._engine: Engine | None = None

    @classmethod
    def load(cls, model: str = registry.DEFAULT_MODEL, dtype: torch.dtype | str | None = None,
             device: str | None = None, progress: bool = True, quant: str | None = "auto",
             cache: bool = True, compile: str | bool = "auto") -> "LLM":
        """A model name (`smollm2`, pulled if missing), a GGUF file or a HuggingFace folder.
        dtype (None/'auto', 'float32', 'bfloat16'...), quant ('auto', None/'none', 'int8', 'int4', 'gguf') and
        device (None: a CUDA GPU when there is one, else the CPU) default to the fastest choice for the machine
        (see mmchat.quantize.choose); models under 50M parameters run in float32 as they are. The converted
        weights are cached under mmchat's cache dir, so later loads memory-map them (cache=False: neither
        read nor write the cache). compile ('auto', 'on', 'off'): the decode step under torch.compile
        (mmchat.quantize.choose_compile; 'auto' leaves it off: the first compile takes a minute)."""
        from . import kernels, quantize, threads
        from .formats import cache as weights_cache
        start = time.perf_counter()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype, quant = quantize.parse_dtype(dtype), quantize.parse_quant(quant)
        if torch.device(device).type == "cpu":
            threads.set_threads(threads.choose_threads())
        path = registry.resolve(model, progress=progress)
        dev_type = torch.device(device).type
        variant = f"{dev_type}-{str(dtype or 'auto').removeprefix('torch.')}-{quant}"
        if dev_type == "cpu" and quant is not None and not kernels.available():
            variant += "-torch-kernels"  # quantized for torch's kernels: another layout than mmchat's own
        root = registry.home() / "converted"
        hit = weights_cache.load(root, path, variant) if cache else None
        built = _from_cache(*hit, device) if hit is not None else None
        if built is not None:
            net, tok, template = built
        else:
            if progress and cache and Path(path).is_file() and Path(path).stat().st_size > 50e6:
                print(f"converting {Path(path).name} for this machine (once; cached under {root}) ...",
                      file=sys.stderr, flush=True)
            ckpt = load_checkpoint(path)
            tok, template = ckpt.tokenizer, ckpt.chat_template
            is_q4 = lambda: Path(path).is_file() and quantize.gguf_has_q4(path)  # noqa: E731
            dtype, quant = quantize.choose(dev_type, dtype, quant, ckpt.config.n_params, is_q4)
            net = build_model(ckpt.config, ckpt.tensors, dtype, device)
            del ckpt
            if quant:
                quantize.quantize(net, quant, str(path) if quant == "gguf" else None)
            if cache and net.cfg.n_params >= quantize.FAST_PATH_MIN_PARAMS:  # small ones convert in no time
                weights_cache.save(root, path, variant, quantize.state_dict_to_save(net),
                                   _cache_meta(net, tok, template, dtype, quant))
            forget_readers()
        bos = tok.id_to_token(tok.bos_token_id) if tok.bos_token_id is not None else ""
        eos = tok.id_to_token(tok.eos_token_ids[0]) if tok.eos_token_ids else ""
        llm = cls(net, tok, ChatTemplate(template, bos or "", eos or ""),
                  name=model if not Path(model).exists() else Path(model).stem)
        if quantize.choose_compile(compile, dev_type):
            quantize.compile_decode(net, registry.home() / "inductor", progress)
        elif kernels.fused_blocks_ok(net):
            net.fused_blocks = kernels.FusedBlocks(net)
        llm.load_seconds = time.perf_counter() - start
        return llm

    # -- text <-> ids -----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_bos=False)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        # chat models end a turn with <|im_end|> or <|eot_id|> even when the file names another eos token
        for end in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            tid = self.tokenizer.special_ids.get(end)
            if tid is not None:
                ids.add(tid)
        return sorted(ids)

    # -- generation -------------------------------------------------------------------------------------------
    def start_engine(self, slots: int = 4, max_len: int | None = None, max_queue: int = 64) -> Engine:
        """Start the continuous-batching engine that serves this model's requests (once; later calls return it).
        Its slots remember their tokens, so turn N of a chat prefills only what is new."""
        if self._engine is None:
            self._engine = Engine(self.model, self.eos_token_ids, slots=slots, max_len=max_len, max_queue=max_queue)
            # stop its thread before the interpreter tears torch down under a running step, which aborts the
            # process ("terminate called without an active exception") after the answer was printed
            atexit.register(self._engine.close)
        return self._engine

    @property
    def engine(self) -> Engine:
        return self._engine or self.start_engine()

    def stream_ids(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                   stop: list[str] | None = None, images: list | None = None) -> Iterator[tuple[int, str, object]]:
        """Decode all prompts x n samples together. Yields (sequence index, text delta, TokenOut).
        images: per prompt, None or the (start, (49, d) embeddings) blocks that replace its image slots."""
        rows = [ids for ids in prompts for _ in range(n)]
        row_images = [im for im in (images or [None] * len(prompts)) for _ in range(n)]
        row_params = [with_seed_offset(params, i % n) for i in range(len(rows))]
        decoders = [StreamDecoder(self.tokenizer) for _ in rows]
        stoppers = [StopStrings(stop or []) for _ in rows]
        engine = self.engine
        if all(len(ids) + params.max_tokens <= engine.context_len for ids in rows):
            steps = self._engine_steps(engine, rows, row_params, row_images)
        elif any(row_images):
            raise MMChatError(f"a conversation with images must fit in {engine.context_len} tokens (prompt and answer); "
                              "shorten it or lower max_tokens")
        else:  # longer than the engine's slots hold: a batch of its own, up to the model's full context
            steps = generate(self.model, rows, row_params, self.eos_token_ids)
        finished: set[int] = set()
        try:
            step = next(steps)
            while True:
                for t in step:
                    if t.seq in finished:
                        continue  # a token produced before a stop string's cancel took effect
                    delta = "" if t.finish_reason == "stop" else decoders[t.seq].push(t.token)
                    text = stoppers[t.seq].feed(delta)
                    if t.finish_reason or stoppers[t.seq].stopped:
                        text += stoppers[t.seq].flush()
                        if stoppers[t.seq].stopped:
                            t.finish_reason = "stop"
                        finished.add(t.seq)
                    yield t.seq, text, t
                step = steps.send(finished)
        except StopIteration:
            return
        finally:
            steps.close()

    @staticmethod
    def _engine_steps(engine: Engine, rows: list[list[int]], row_params: list[SamplingParams], row_images=None):
        """The engine's output for these rows, in the shape generate() yields: lists of TokenOut. Send the set
        of sequences to stop; closing the generator cancels whatever still runs."""
        channel: queue.Queue = queue.Queue()
        handles = []
        try:
            for i, (ids, p) in enumerate(zip(rows, row_params)):
                handles.append(engine.submit(ids, p, seq=i, channel=channel,
                                             images=row_images[i] if row_images else None))
            running = len(handles)
            while running:
                step = []
                seq, item = channel.get()
                while True:  # everything already there, so one yield carries a whole engine step
                    if item is None:
                        running -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        step.append(item)
                    try:
                        seq, item = channel.get_nowait()
                    except queue.Empty:
                        break
                if step:
                    for i in (yield step) or ():
                        handles[i].cancel()
        finally:
            for h in handles:
                h.cancel()

    def complete(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 stop: list[str] | None = None) -> list[Completion]:
        rows = [ids for ids in prompts for _ in range(n)]
        out = [Completion("", [], "length", len(ids)) for ids in rows]
        eos = set(self.eos_token_ids)
        for seq, text, t in self.stream_ids(prompts, params, n, stop):
            c = out[seq]
            c.text += text
            if not (t.finish_reason == "stop" and t.token in eos):
                c.token_ids.append(t.token)
                c.logprobs.append(t.logprob)
                if t.top is not None:
                    c.top_logprobs.append(t.top)
            if t.finish_reason:
                c.finish_reason = t.finish_reason
        return out

    def constraint(self, response_format: dict | None = None, json_schema=None, regex: str | None = None,
                   grammar: str | None = None):
        """A mmchat.constrain.Constraint for this model's tokenizer (None when nothing is asked): OpenAI's
        response_format, a JSON schema (dict or JSON text), a regular expression or a Lark grammar."""
        from . import constrain
        args = (self.tokenizer, self.config.vocab_size, self.eos_token_ids)
        given = [x is not None for x in (response_format, json_schema, regex, grammar)]
        if sum(given) > 1:
            raise MMChatError("give only one of response_format, json_schema, regex and grammar")
        if json_schema is not None:
            return constrain.Constraint.json_schema(json_schema, *args)
        if regex is not None:
            return constrain.Constraint.regex(regex, *args)
        if grammar is not None:
            return constrain.Constraint.lark(grammar, *args)
        return constrain.from_response_format(response_format, *args)

    def _constrained(self, sampling: dict, response_format, json_schema) -> dict:
        c = self.constraint(response_format, json_schema) if (response_format or json_schema) is not None else None
        return {**sampling, "constraint": c} if c is not None else sampling

    def generate(self, prompt: str | list[str], n: int = 1, stop: list[str] | str | None = None,
                 response_format: dict | None = None, json_schema=None, **sampling) -> str | list[str]:
        """Continue `prompt`; the text of the new tokens only. A list of prompts, or n > 1, gives a list.
        response_format (OpenAI's) or json_schema constrain the output to JSON that validates."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        params = sampling_params(GENERATE_DEFAULTS, **self._constrained(sampling, response_format, json_schema))
        stop = [stop] if isinstance(stop, str) else stop
        texts = [c.text for c in self.complete([self.encode(p) for p in prompts], params, n, stop)]
        return texts[0] if isinstance(prompt, str) and n == 1 else texts

    def stream(self, prompt: str, stop: list[str] | str | None = None, response_format: dict | None = None,
               json_schema=None, **sampling) -> Iterator[str]:
        """Continue `prompt`, yielding text pieces as tokens come."""
        params = sampling_params(GENERATE_DEFAULTS, **self._constrained(sampling, response_format, json_schema))
        stop = [stop] if isinstance(stop, str) else stop
        for _, text, _ in self.stream_ids([self.encode(prompt)], params, 1, stop):
            if text:
                yield text

    def chat(self, messages: list[dict] | str, stream: bool = False, stop: list[str] | str | None = None,
             response_format: dict | None = None, json_schema=None, images: list | None = None,
             **sampling) -> str | Iterator[str]:
        """Answer a conversation (OpenAI-style message dicts, or one user message as a string).
        response_format (OpenAI's: json_object, or json_schema with a schema) or json_schema (a schema dict or
        JSON text) constrain the answer to JSON that validates against it.
        Images: content parts ({"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}} or
        {"type": "image", "image": path/bytes/PIL image}), or `images=[...]` added to the last user message."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        params = sampling_params(CHAT_DEFAULTS, **self._constrained(sampling, response_format, json_schema))
        stop = [stop] if isinstance(stop, str) else stop
        ids, blocks = self.chat_prompt(messages, images)
        pieces = (text for _, text, _ in self.stream_ids([ids], params, 1, stop, images=[blocks]) if text)
        return pieces if stream else "".join(pieces)


    def chat_prompt(self, messages: list[dict], images: list | None = None) -> tuple[list[int], list | None]:
        """A conversation -> its prompt token ids, and the image blocks to splice into them (None: no images).
        Images go through the model's image adapter (mmchat.multimodal.projector), loaded on first use."""
        if images:
            from .multimodal.projector import with_images
            messages = with_images(messages, images)
        if not any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages):
            return self.render_chat(messages), None
        from .multimodal.projector import chat_prompt  # only conversations with content parts need it
        return chat_prompt(self, messages)


def load(model: str = registry.DEFAULT_MODEL, **kwargs) -> LLM:
    return LLM.load(model, **kwargs)
