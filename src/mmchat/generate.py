"""Token ids in, token ids out: prefill, decode steps, sampling, stop at end-of-sequence. Knows no text."""
from __future__ import annotations

import random
import threading
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from . import kernels
from .errors import MMChatError
from .model import Transformer
from .threads import follow_load


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0         # 0: greedy
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1: off
    min_p: float = 0.0               # 0: off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1: off; >1 divides the logits of tokens already seen (HF's rule)
    presence_penalty: float = 0.0    # OpenAI's: minus this once for every token already generated
    frequency_penalty: float = 0.0   # OpenAI's: minus this times how often it was generated
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    top_logprobs: int = 0            # how many alternatives to report per token
    ignore_eos: bool = False
    # a mmchat.constrain.Constraint (JSON schema, regex, grammar): only tokens it allows are sampled; each
    # sequence gets its own matcher from it
    constraint: object | None = None

    def validate(self) -> "SamplingParams":
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1 (got {self.max_tokens})"),
            (self.temperature >= 0, f"temperature must be >= 0 (got {self.temperature}); 0 means greedy"),
            (self.top_k >= 0, f"top_k must be >= 0 (got {self.top_k}); 0 turns it off"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p})"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (got {self.min_p})"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (got {self.repetition_penalty})"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2] (got {self.presence_penalty})"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2] (got {self.frequency_penalty})"),
            (0 <= self.top_logprobs <= 20, f"top_logprobs must be in [0, 20] (got {self.top_logprobs})"),
        ]
        for ok, message in checks:
            if not ok:
                raise MMChatError(message)
        return self


@dataclass
class TokenOut:
    """One generated token of one sequence."""
    seq: int
    token: int
    logprob: float
    top: list[tuple[int, float]] | None = None  # the most likely alternatives, (id, logprob)
    finish_reason: str | None = None             # "stop" (end-of-sequence token) or "length"


class Sampler:
    """Turns a batch of next-token logits into tokens, each row with its own settings and random stream.
    Rows can be handed to new sequences (`reset_row`), and every method can work on a subset of rows, so a
    long-lived sampler serves the changing batch of a continuous-batching engine."""

    def __init__(self, params: list[SamplingParams], vocab_size: int, device):
        self.params = list(params)
        self.vocab_size, self.device = vocab_size, device
        self.generators = [self._generator(p.seed) for p in params]
        self.counts = torch.zeros(len(params), vocab_size, device=device)  # (B, V) times generated
        self.seen = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)  # prompt + generated
        self.bias = None  # (B, V) once any row has a logit_bias
        self.matchers = [p.constraint.matcher() if p.constraint is not None else None for p in params]
        self.bitmask = None  # (B, ceil(V / 32)) int32 on the CPU, once any row is constrained
        for i, p in enumerate(params):
            self._set_bias(i, p)

    def _generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed if seed is not None else random.getrandbits(63))
        return g

    def _set_bias(self, row: int, p: SamplingParams):
        if p.logit_bias and self.bias is None:
            self.bias = torch.zeros(len(self.params), self.vocab_size, device=self.device)
        if self.bias is not None:
            self.bias[row] = 0.0
            for tid, b in p.logit_bias.items():
                self.bias[row, tid] = b

    def reset_row(self, row: int, params: SamplingParams, prompt: list[int] = ()):
        """Give `row` to a new sequence: its settings, a fresh random stream (from its seed), no history."""
        self.params[row] = params
        self.generators[row] = self._generator(params.seed)
        self.counts[row] = 0.0
        self.seen[row] = False
        self._set_bias(row, params)
        self.matchers[row] = params.constraint.matcher() if params.constraint is not None else None
        if prompt:
            self.observe_prompt(row, prompt)

    def _select(self, rows):
        """The params, generators and a tensor indexer of `rows` (None: all rows)."""
        if rows is None:
            return self.params, self.generators, slice(None)
        rows = list(rows)
        return ([self.params[r] for r in rows], [self.generators[r] for r in rows],
                torch.tensor(rows, dtype=torch.long, device=self.device))

    def observe_prompt(self, row: int, ids: list[int]):
        self.seen[row, torch.tensor(ids, dtype=torch.long, device=self.seen.device)] = True

    def observe(self, tokens: torch.Tensor, rows: list[int] | None = None):
        """tokens: (B,) just generated, one per row of `rows` (None: all rows)."""
        _, _, idx = self._select(rows)
        if rows is None:
            idx = torch.arange(len(self.params), device=tokens.device)
        self.counts[idx, tokens] += 1  # rows are distinct, so no index repeats
        self.seen[idx, tokens] = True
        rows = range(len(self.params)) if rows is None else rows
        constrained = [(i, self.matchers[r]) for i, r in enumerate(rows) if self.matchers[r] is not None]
        if constrained:
            ids = tokens.tolist()  # one more host sync, only when some row is constrained
            for i, m in constrained:
                m.consume(ids[i])

    def constrain(self, logits: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """logits: (B, V) -> the same with the tokens each row's matcher forbids at -inf (unconstrained rows
        untouched)."""
        rows = list(rows) if rows is not None else list(range(len(self.params)))
        constrained = [i for i, r in enumerate(rows) if self.matchers[r] is not None]
        if not constrained:
            return logits
        from .constrain import allocate_bitmask, unpack_bitmask
        if self.bitmask is None:
            self.bitmask = allocate_bitmask(len(self.params), self.vocab_size)
        for i in constrained:
            self.matchers[rows[i]].fill(self.bitmask, rows[i])
        words = self.bitmask[torch.tensor(rows)]  # (B, W), a copy
        free = sorted(set(range(len(rows))) - set(constrained))
        if free:  # their bitmask rows may hold a previous sequence's mask: allow everything
            words[free] = -1
        allowed = unpack_bitmask(words, logits.size(-1)).to(logits.device)  # (B, V)
        return logits.masked_fill(~allowed, float("-inf"))  # one pass, no scatter back into rows

    def penalize(self, logits: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """logits: (B, V) float32 -> penalized (B, V)."""
        ps, _, idx = self._select(rows)
        repeat = any(p.repetition_penalty != 1.0 for p in ps)
        generated = any(p.presence_penalty or p.frequency_penalty for p in ps)
        if not (repeat or generated or self.bias is not None):
            return logits
        if logits.device.type == "cpu" and kernels.available():  # one pass per row, not a dozen tensor ops
            rows_t = torch.arange(len(ps)) if rows is None else idx
            per_row = [torch.tensor([getattr(p, name) for p in ps], dtype=torch.float32)
                       for name in ("repetition_penalty", "presence_penalty", "frequency_penalty")]  # (B,) each
            return kernels.penalize_rows(logits, rows_t, self.seen if repeat else None,
                                         self.counts if generated else None, self.bias, *per_row)
        # only the tokens a row has seen are touched (a few hundred), not the whole (B, V) matrix
        if repeat:
            rep = torch.tensor([p.repetition_penalty for p in ps], device=logits.device)  # (B,)
            r, c = self.seen[idx].nonzero(as_tuple=True)  # (N,), (N,): the (row, token) pairs seen
            v = logits[r, c]  # (N,)
            logits = logits.index_put((r, c), torch.where(v > 0, v / rep[r], v * rep[r]))
        if generated:
            presence = torch.tensor([p.presence_penalty for p in ps], device=logits.device)  # (B,)
            frequency = torch.tensor([p.frequency_penalty for p in ps], device=logits.device)  # (B,)
            counts = _take(self.counts, idx)  # (B, V)
            r, c = counts.nonzero(as_tuple=True)  # (N,), (N,): the (row, token) pairs generated
            logits = logits.index_put((r, c), logits[r, c] - presence[r] - frequency[r] * counts[r, c])
        if self.bias is not None:
            logits = logits + _take(self.bias, idx)
        return logits

    def sample(self, logits: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """logits: (B, V), one row per entry of `rows` (None: all rows) -> token ids (B,)."""
        ps, generators, _ = self._select(rows)
        logits = self.constrain(self.penalize(logits.float(), rows), rows)
        picked = [i for i, p in enumerate(ps) if p.temperature > 0]
        if not picked:
            return logits.argmax(dim=-1)  # (B,)
        if len(picked) < len(ps):  # greedy rows take the argmax; only the others are sampled
            at = torch.tensor(picked, dtype=torch.long, device=logits.device)
            return logits.argmax(dim=-1).index_copy(0, at, _sample_rows(logits[at], [ps[i] for i in picked],
                                                                        [generators[i] for i in picked]))
        return _sample_rows(logits, ps, generators)

    def draw(self, logits: torch.Tensor, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """logits: (B, V), the model's, one row per entry of `rows` (None: all rows) -> token ids (B,) as `sample`
        picks them, and each one's log-probability under the model's own distribution, before penalties, bias
        and temperature (B,). Rows without a constraint (the usual case) are drawn by mmchat's CPU kernel, a few
        passes per row instead of a dozen tensor ops, with the same uniform numbers from the same generators."""
        ps, generators, _ = self._select(rows)
        matchers = self.matchers if rows is None else [self.matchers[r] for r in rows]
        if logits.device.type == "cpu" and kernels.available() and all(m is None for m in matchers):
            report = logits.float()
            inv_temp = torch.tensor([1 / p.temperature if p.temperature > 0 else 0.0 for p in ps])  # (B,)
            top_k = torch.tensor([p.top_k for p in ps], dtype=torch.int32)  # (B,)
            top_p, min_p = torch.tensor([p.top_p for p in ps]), torch.tensor([p.min_p for p in ps])  # (B,) each
            zero = torch.zeros(1, dtype=torch.float64)
            u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) if p.temperature > 0 else zero
                           for p, g in zip(ps, generators)])  # (B,) greedy rows draw nothing, as in `sample`
            return kernels.sample_rows(self.penalize(report, rows), report, inv_temp, top_k, top_p, min_p, u)
        tokens = self.sample(logits, rows)  # (B,)
        return tokens, logits.float().log_softmax(-1).gather(1, tokens[:, None])[:, 0]


def _take(t: torch.Tensor, idx) -> torch.Tensor:
    """Rows `idx` of t (a slice or a LongTensor): index_select, several times faster than t[idx] for a float matrix."""
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx)


CANDIDATES = 256  # top_k / top_p look at each row's most likely tokens first (csrc/qmatmul.c SAMPLE_CANDIDATES)


def _sample_rows(logits: torch.Tensor, ps: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """logits: (B, V) float32, every row sampled (temperature > 0) -> token ids (B,).

    top_k, top_p and min_p are applied to each row's CANDIDATES most likely tokens (a topk, not a sort of the
    vocabulary), which is exact whenever those tokens already hold top_p of the probability; rows where they do
    not are done over the whole vocabulary. A token is then drawn by inverting the cumulative distribution with
    one uniform number from the row's own generator, so a row's tokens depend only on its own seed, never on
    which other rows share the batch."""
    B, V = logits.shape
    dev = logits.device
    temps = torch.tensor([p.temperature for p in ps], device=dev)[:, None]  # (B, 1)
    logits = logits / temps
    u = torch.cat([torch.rand(1, generator=g, device=dev, dtype=torch.float64) for g in generators])  # (B,)
    top_p = torch.tensor([p.top_p for p in ps], device=dev)[:, None]  # (B, 1)
    min_p = torch.tensor([p.min_p for p in ps], device=dev)[:, None]  # (B, 1)
    out = torch.empty(B, dtype=torch.long, device=dev)
    full = torch.ones(B, dtype=torch.bool, device=dev)  # rows still to sample over the whole vocabulary
    truncated = torch.tensor([p.top_k > 0 or p.top_p < 1 for p in ps], device=dev)
    if truncated.any():
        K = min(V, max(CANDIDATES, *(p.top_k for p in ps)))
        vals, ids = logits.topk(K, dim=-1)  # (B, K), most likely first
        has_k = torch.tensor([p.top_k > 0 for p in ps], device=dev)[:, None]  # (B, 1)
        in_k = torch.arange(K, device=dev)[None] < torch.tensor([p.top_k or K for p in ps], device=dev)[:, None]
        vals = vals.masked_fill(~in_k, float("-inf"))  # (B, K)
        # probabilities over the row's top_k when it has one (renormalized), else over the whole vocabulary
        probs = torch.where(has_k, vals.softmax(-1), logits.softmax(-1).gather(1, ids))  # (B, K)
        cum = probs.cumsum(-1)  # (B, K)
        keep = (cum - probs) < top_p  # the smallest set reaching top_p
        keep &= probs >= min_p * probs[:, :1]
        exact = truncated & (has_k[:, 0] | (cum[:, -1] >= top_p[:, 0]))  # (B,)
        out = torch.where(exact, ids.gather(1, _invert_cdf(probs * keep, u)[:, None])[:, 0], out)
        full = ~exact
    if full.any():
        rows = full.nonzero()[:, 0]  # (R,)
        sub = logits[rows]  # (R, V)
        probs = sub.softmax(-1)  # (R, V)
        if any(ps[i].top_p < 1 for i in rows.tolist()):  # a flat distribution: the nucleus needs a full sort
            sorted_probs, order = probs.sort(dim=-1, descending=True)  # (R, V)
            drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p[rows]
            probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), 0.0)
        if any(ps[i].min_p > 0 for i in rows.tolist()):
            probs = probs.masked_fill(probs < min_p[rows] * probs.max(-1, keepdim=True).values, 0.0)
        out[rows] = _invert_cdf(probs, u[rows])
    return out


CDF_BLOCK = 256  # _invert_cdf sums a long row in blocks of this many weights first


def _invert_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """weights: (B, N) >= 0, not necessarily normalized; u: (B,) float64 in [0, 1) -> per row the first index
    whose cumulative weight exceeds u times the total (zero-weight entries are never chosen). The sums run in
    float64, so u * total stays below the total and the tail of a long row is not lost to rounding. A long row
    is summed in blocks first, and only the block where the target falls is summed weight by weight: at 8 rows of
    49152 this is 5x faster than a cumulative sum of the whole row. (On the CPU, unconstrained rows are drawn by
    the same rule in C, Sampler.draw.)"""
    B, N = weights.shape
    if N <= 4 * CDF_BLOCK:
        cum = weights.double().cumsum(-1)  # (B, N)
        target = (u * cum[:, -1])[:, None]  # (B, 1)
        return torch.searchsorted(cum, target, right=True)[:, 0].clamp(max=N - 1)  # (B,)
    w = F.pad(weights, (0, -N % CDF_BLOCK)).view(B, -1, CDF_BLOCK)  # (B, nb, BLOCK), zeros past N
    ends = w.sum(-1, dtype=torch.float64).cumsum(-1)  # (B, nb): cumulative weight at each block's end
    target = u * ends[:, -1]  # (B,)
    block = torch.searchsorted(ends, target[:, None], right=True)[:, 0].clamp(max=w.size(1) - 1)  # (B,)
    before = torch.where(block > 0, ends.gather(1, (block - 1).clamp(min=0)[:, None])[:, 0], 0.0)  # (B,)
    inside = w[torch.arange(B, device=w.device), block].double().cumsum(-1)  # (B, BLOCK)
    # the block's own sum can differ from its share of `ends` in the last bits: stay below its total, so the
    # first entry past the remaining target is one of its nonzero weights
    rest = torch.minimum((target - before).clamp(min=0), torch.nextafter(inside[:, -1], torch.zeros(())))  # (B,)
    at = torch.searchsorted(inside, rest[:, None], right=True)[:, 0]  # (B,)
    return block * CDF_BLOCK + at


def check_prompt(prompt: list[int], max_seq_len: int):
    if not prompt:
        raise MMChatError("the prompt is empty; give some text")
    if len(prompt) >= max_seq_len:
        raise MMChatError(f"the prompt is {len(prompt)} tokens but the model's context window is {max_seq_len}; "
                          "shorten it")


_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: Transformer) -> threading.RLock:
    """The lock every user of `model`'s KV cache holds while running it, so a continuous-batching engine and
    direct generate() calls on the same model from other threads take turns, one forward pass at a time
    (each installs its own caches first)."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             eos_token_ids: list[int] = (), prompt_embeds: list[torch.Tensor | None] | None = None):
    """Decode all prompts together, one batched forward pass per step. Yields, after each step, the list of
    TokenOut for the sequences still running. A sequence ends at an end-of-sequence token (yielded with
    finish_reason "stop") or after its max_tokens (finish_reason "length"). The caller may stop iterating or
    send a set of sequence indices to cancel (`gen.send({i})`)."""
    params = [p.validate() for p in (params if isinstance(params, list) else [params] * len(prompts))]
    max_ctx = model.cfg.max_seq_len
    for p in prompts:
        check_prompt(p, max_ctx)
    budgets = [min(p.max_tokens, max_ctx - len(ids)) for p, ids in zip(params, prompts)]
    B, device = len(prompts), model.tok_embeddings.weight.device
    lengths = [len(p) for p in prompts]
    max_len = max(l + b for l, b in zip(lengths, budgets))
    sampler = Sampler(params, model.cfg.vocab_size, device)
    stops = [set(() if p.ignore_eos else eos_token_ids) | set(p.stop_token_ids) for p in params]

    # prefill: prompts right-padded into one (B, T) batch; padding slots are overwritten as decoding goes on
    T = max(lengths)
    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = torch.tensor(ids, device=device)
        sampler.observe_prompt(i, ids)
    embeds = None
    if prompt_embeds is not None and any(e is not None for e in prompt_embeds):
        embeds = model.embed(tokens)  # (B, T, d)
        for i, e in enumerate(prompt_embeds):
            if e is not None:
                embeds[i, : e.size(0)] = e.to(embeds.dtype)
    positions = torch.arange(T, device=device).expand(B, T)  # (B, T)
    last = torch.tensor(lengths, device=device) - 1  # (B,)
    lock = model_lock(model)
    with lock:  # the prefill, into our own freshly made caches
        model.setup_cache(B, max_len)
        caches = [layer.attn.cache for layer in model.layers]
        logits = model(tokens if embeds is None else None, positions, embeds=embeds,
                       output_index=last)[:, -1]  # (B, V)

    def forward(*args, **kwargs):  # one decode step; the lock is taken per step, never across a yield
        follow_load()  # fewer threads while other processes keep a core busy
        with lock:
            if model.layers[0].attn.cache is not caches[0]:  # another user ran the model in between
                for layer, cache in zip(model.layers, caches):
                    layer.attn.cache = cache
                model.cache_len = max_len
            return model(*args, **kwargs)

    try:
        yield from _decode(forward, sampler, logits, params, stops, budgets, lengths, max_len)
    finally:
        with lock:
            if model.layers[0].attn.cache is caches[0]:
                model.clear_cache()


def _decode(forward, sampler, logits, params, stops, budgets, lengths, max_len):
    B, device = len(params), logits.device
    active = list(range(B))
    pos = torch.tensor(lengths, device=device)  # (B,) the slot of the next token
    generated = [0] * B
    while active:
        next_tokens, chosen = sampler.draw(logits)  # (B,), (B,)
        sampler.observe(next_tokens)
        top = None
        k = max(params[i].top_logprobs for i in active)
        if k:
            top_vals, top_ids = logits.float().log_softmax(dim=-1).topk(k, dim=-1)  # (B, k) each
            top = list(zip(top_ids.tolist(), top_vals.tolist()))
        ids, lps = next_tokens.tolist(), chosen.tolist()  # the one host sync per step
        outs = []
        for i in active:
            generated[i] += 1
            reason = "stop" if ids[i] in stops[i] else ("length" if generated[i] >= budgets[i] else None)
            alts = None
            if top is not None and params[i].top_logprobs:
                alts = list(zip(top[i][0][: params[i].top_logprobs], top[i][1][: params[i].top_logprobs]))
            outs.append(TokenOut(i, ids[i], lps[i], alts, reason))
        cancelled = yield outs
        active = [o.seq for o in outs if o.finish_reason is None and o.seq not in (cancelled or ())]
        if not active:
            break
        # every row steps (finished rows write into their own slots, which nobody reads); one forward pass
        logits = forward(next_tokens[:, None], pos[:, None].clamp(max=max_len - 1))[:, -1]  # (B, V)
        pos = pos + 1


def generate_ids(model: Transformer, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 eos_token_ids: list[int] = ()) -> list[list[int]]:
    """All new tokens of each prompt, end-of-sequence token excluded."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate(model, prompts, params, eos_token_ids):
        for t in step:
            if t.finish_reason != "stop":
                out[t.seq].append(t.token)
    return out


def with_seed_offset(params: SamplingParams, offset: int) -> SamplingParams:
    """The same settings for the n-th sample of one prompt: a different but reproducible random stream."""
    return replace(params, seed=None if params.seed is None else params.seed + offset)
