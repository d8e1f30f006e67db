"""The Transformer, top to bottom: attention, RoPE, norms, MLP, blocks, KV cache.

Two families share one module tree:
  llama: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP, optionally tied embeddings;
  gpt2:  LayerNorm, learned position embeddings, multi-head attention, GELU MLP, tied embeddings.
Token ids or input embeddings go in (embeddings let images and audio be spliced into a prompt), logits come out.
Every call carries explicit positions `input_pos` (B, T), one row per sequence, so sequences of different
lengths decode together in one batch against a static KV cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


def attention_reference(q, k, v, mask=None):
    """softmax(Q K^T / sqrt(d_k)) V, written out. Returns the output and the attention weights.
    q: (B, nh, T, hs); k, v: (B, nh, S, hs); mask: (B, 1, T, S) bool, True where a query may look, None for causal."""
    T, S = q.size(-2), k.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S) causal, last T queries
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # (B, nh, T, S)
    return weights @ v, weights  # (B, nh, T, hs), (B, nh, T, S)


def attention_decode(q, k, v, mask):
    """Attention for one new token per row (decode) as plain matmuls, the query heads that share a K/V head
    batched together: for a single query the fused kernel's setup costs more than the work (4x at batch 8).
    q: (B, nh, 1, hs); k, v: (B, nkv, S, hs); mask: (B, 1, 1, S), bool (True where a query may look) or float32
    (0 there, -inf elsewhere: `decode_bias`, made once per step for every layer). Returns (B, nh, 1, hs)."""
    B, nh, _, hs = q.shape
    nkv, S = k.size(1), k.size(2)
    if mask.dtype == torch.bool:
        mask = decode_bias(mask)
    qg = q.reshape(B, nkv, nh // nkv, hs)  # (B, nkv, g, hs)
    # scale, mask and the step up to float32 for the softmax in one op: bias + scores / sqrt(hs)
    scores = torch.add(mask.view(B, 1, 1, S), qg @ k.transpose(-2, -1), alpha=1.0 / math.sqrt(hs))  # (B,nkv,g,S)
    weights = torch.softmax(scores, dim=-1).to(q.dtype)  # (B, nkv, g, S)
    return (weights @ v).reshape(B, nh, 1, hs)


def decode_bias(mask):
    """A bool attention mask as a float32 additive one: 0 where a query may look, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


def rope_tables(head_dim: int, max_len: int, theta: float):
    """cos and sin of position * theta^(-2i/d) for every position, (max_len, head_dim), HF's half-split layout.
    The sin table's first half is negated (see apply_rope)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (max_len, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (max_len, hs)
    half = head_dim // 2
    sin = angles.sin()
    sin[:, :half].neg_()
    return angles.cos(), sin


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hs/2}) by the position's angle: x * cos + (-x2, x1) * (sin1, sin2), written as
    x * cos + (x2, x1) * (-sin1, sin2), the half-swap one roll and the sign in the table (bit-identical).
    x: (B, nh, T, hs); cos, sin: (B, 1, T, hs) with sin's first half negated (rope_tables)."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin  # (B, nh, T, hs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == self.weight.dtype:  # one fused kernel (float accumulation) instead of five small ops
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


class KVCache(nn.Module):
    """Static per-layer cache: keys and values for every (sequence, position) slot, written in place."""

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v, cache_rows=None, length: int | None = None):
        """input_pos: (B, T); k, v: (B, n_kv, T, hs). Batch row b lives in cache row b, or in cache_rows[b]
        when given (B,). Returns the keys and values those rows can see in their first `length` slots (all
        slots when None), (B, n_kv, S, hs) each."""
        B, dtype = k.size(0), k.dtype
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # a float16 cache (the fused blocks') holds rounded copies
        if B == 1 and cache_rows is None:  # one sequence: a plain copy along the slots (the cheapest write)
            self.k[:1].index_copy_(2, input_pos[0], k)
            self.v[:1].index_copy_(2, input_pos[0], v)
        else:
            rows = (torch.arange(B, device=k.device) if cache_rows is None else cache_rows)[:, None]  # (B, 1)
            self.k[rows, :, input_pos] = k.transpose(1, 2)  # slots (B, T) <- (B, T, n_kv, hs)
            self.v[rows, :, input_pos] = v.transpose(1, 2)
        S = self.k.size(2) if length is None else length
        if cache_rows is None:
            return self.k[:B, :, :S].to(dtype), self.v[:B, :, :S].to(dtype)  # views, no copy (same dtype)
        # index_select on the used slots copies only those (several times faster than advanced indexing)
        return (self.k[:, :, :S].index_select(0, cache_rows).to(dtype),
                self.v[:, :, :S].index_select(0, cache_rows).to(dtype))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        qkv_dim = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, qkv_dim, bias=cfg.attn_bias)  # Q, K and V in one matmul
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.mlp_bias)
        self.cache: KVCache | None = None
        self.use_reference = False  # True: the written-out softmax path, which also keeps the weights
        self.last_weights = None

    def forward(self, x, rope, input_pos, mask, cache_rows=None):
        B, T, _ = x.shape
        q_dim = self.n_head * self.head_dim
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh+2nkv, T, hs)
        qk, v = qkv[:, : nh + nkv], qkv[:, nh + nkv:]  # (B, nh+nkv, T, hs), (B, nkv, T, hs)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # queries and keys rotated in one pass
        q, k = qk[:, :nh], qk[:, nh:]  # (B, nh, T, hs), (B, nkv, T, hs)
        if self.cache is not None:
            # the mask's width says how many leading slots can be seen: attend to those, not all of them
            k, v = self.cache.update(input_pos, k, v, cache_rows, mask.size(-1) if mask is not None else T)
        if self.use_reference:
            groups = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)
            y, self.last_weights = attention_reference(q, k, v, mask)
        elif T == 1 and mask is not None:
            y = attention_decode(q, k, v, mask)  # (B, nh, 1, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_head != self.n_kv_head)  # (B, nh, T, hs)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_dim))  # (B, T, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.arch == "llama"
        self.d_ff = cfg.d_ff
        # llama: gate and up projections fused into one matmul; gpt2: a single up projection
        self.w_up = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.mlp_bias)
        self.w_down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.w_up(x)  # (B, T, 2*ff) or (B, T, ff)
        if self.gated:
            gate, up = h.split(self.d_ff, dim=-1)
            h = F.silu(gate) * up  # SwiGLU, (B, T, ff)
        else:
            h = F.gelu(h, approximate="tanh")
        return self.w_down(h)  # (B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, input_pos, mask, cache_rows=None):
        x = x + self.attn(self.attn_norm(x), rope, input_pos, mask, cache_rows)
        return x + self.mlp(self.mlp_norm(x))


def _run_block(layer, x, rope, input_pos, mask, cache_rows):
    return layer(x, rope, input_pos, mask, cache_rows)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.cache_len = 0
        self._rope = None
        self._compiled_block = None  # see compile_decode
        # callable(x, input_pos, cache_rows) -> x running all blocks at once when a cache is set up (mmchat
        # .kernels.FusedBlocks, installed by the loader for quantized models on mmchat's own CPU kernels)
        self.fused_blocks = None
        self.reference_attention = False  # see set_reference_attention

    # -- KV cache -------------------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int, dtype=None):
        """Allocate a static cache for `batch_size` sequences of up to `max_len` positions each: in the compute
        dtype, or in float16 for the fused blocks (as llama.cpp keeps it: half the memory, and half the bytes
        each decode step's attention reads)."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache of {max_len} positions exceeds the context window ({self.cfg.max_seq_len})")
        # the compute dtype is the norms' (they are never quantized)
        dtype = dtype or (torch.float16 if self.fused_blocks is not None else self.norm.weight.dtype)
        device = self.norm.weight.device
        for layer in self.layers:
            layer.attn.cache = KVCache(batch_size, self.cfg.n_kv_head, max_len, self.cfg.head_dim, dtype, device)
        self.cache_len = max_len

    def clear_cache(self):
        for layer in self.layers:
            layer.attn.cache = None
        self.cache_len = 0

    def rope(self, device, dtype=torch.float32):
        """The cos and (signed) sin tables (max_len, hs) on `device` in `dtype`, made once."""
        if self.cfg.arch != "llama":
            return None
        if self._rope is None or self._rope[0].device != device or self._rope[0].dtype != dtype:
            tables = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
            self._rope = tuple(t.to(device=device, dtype=dtype) for t in tables)
        return self._rope

    def attend_len(self, input_pos) -> int:
        """How many leading cache slots this step must look at: past the highest position in `input_pos`,
        rounded up to a multiple of 64 (few distinct shapes), so a short sequence in a long cache does not pay
        for every slot. On the CPU reading the positions is free; elsewhere it would wait for the device, so
        there every slot is attended to."""
        if input_pos.device.type != "cpu":
            return self.cache_len
        return min(self.cache_len, (int(input_pos.max()) // 64 + 1) * 64)

    def compile_decode(self, on: bool = True):
        """Run the blocks of each decode step (one new token per row, KV cache set up) through one
        torch.compile'd function that all layers share: the layers differ only in their weights, which are its
        inputs, so one compile serves every layer and inductor fuses a block's ~20 small ops. Prefill, the
        reference attention and hidden-state capture stay eager. The compile happens on the first decode step of
        each batch shape (1 row, several rows); inductor caches its output (TORCHINDUCTOR_CACHE_DIR).
        Not fullgraph: a shape that would compile once too often then runs eager instead of failing (known gap:
        the attention matmul's view of the cache still specializes on the cache size, so new cache sizes can
        compile again)."""
        self._compiled_block = torch.compile(_run_block) if on else None

    def set_reference_attention(self, on: bool = True):
        """Switch every layer to the written-out attention, which keeps each layer's weights in
        `layer.attn.last_weights` (B, nh, T, S) after a forward pass."""
        self.reference_attention = on
        for layer in self.layers:
            layer.attn.use_reference = on
            layer.attn.last_weights = None

    # -- forward --------------------------------------------------------------------------------------------
    def embed(self, tokens):
        return self.tok_embeddings(tokens)  # (B, T, d)

    def forward(self, tokens=None, input_pos=None, embeds=None, output_index=None, cache_rows=None,
                hidden_states: list | None = None, keep=None, head: bool = True):
        """tokens: (B, T) ids, or embeds: (B, T, d). input_pos: (B, T) positions; None means 0..T-1.
        With a cache set up, keys/values are written at input_pos and every query sees the cached slots at or
        before its own position; `cache_rows` (B,) picks which cache rows the batch rows use (default 0..B-1).
        Returns logits (B, T, V), or (B, 1, V) at one position per row when
        `output_index` (B,) is given, or (N, V) at the N positions where `keep` (B, T) bool is true (training: the
        head runs only where there is loss); with head=False the final norm's output there instead, (..., d). If
        `hidden_states` is a list, the residual stream after each block is appended to it (for the logit lens)."""
        x = self.embed(tokens) if embeds is None else embeds  # (B, T, d)
        B, T, _ = x.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=x.device).expand(B, T)  # (B, T)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(input_pos)  # (B, T, d)
        # rows that carry an image take the module path: the image adapter's low-rank update (RowLoRA) wraps
        # modules that the fused blocks do not call
        if self.fused_blocks is not None and self.cache_len and self.fused_blocks.takes(B * T) \
                and hidden_states is None and getattr(self, "adapter_rows", None) is None \
                and not self.reference_attention:
            x = self.fused_blocks(x, input_pos, cache_rows)  # (B, T, d): every block in one call
        else:
            x = self._blocks(x, input_pos, cache_rows, hidden_states)  # (B, T, d)
        if output_index is not None:
            x = x[torch.arange(B, device=x.device), output_index][:, None]  # (B, 1, d)
        elif keep is not None:
            x = x[keep]  # (N, d)
        return self.lm_head(self.norm(x)) if head else self.norm(x)  # (B, T, V) or (B, T, d)

    def _blocks(self, x, input_pos, cache_rows, hidden_states):
        """The blocks one module at a time (any model, any device; the reference for the fused path)."""
        B, T, _ = x.shape
        rope = None
        if self.cfg.arch == "llama":
            cos, sin = self.rope(x.device, x.dtype)
            rope = (cos[input_pos].unsqueeze(1), sin[input_pos].unsqueeze(1))  # (B, 1, T, hs) each
        mask = None  # None: plain causal attention over these T tokens (a cache's first T slots)
        # a prompt from position 0 needs no mask either: SDPA's causal path skips the masked half
        if self.cache_len and not (T > 1 and torch.equal(input_pos, torch.arange(T, device=x.device).expand(B, T))):
            slots = torch.arange(self.attend_len(input_pos), device=x.device)  # (S,)
            mask = (slots[None, None, :] <= input_pos[:, :, None]).unsqueeze(1)  # (B, 1, T, S)
            if T == 1 and not self.reference_attention:
                mask = decode_bias(mask)  # (B, 1, 1, S) float, made once for every layer
        run = None
        if self._compiled_block is not None and mask is not None and mask.dtype != torch.bool \
                and hidden_states is None:  # a decode step (the float mask is made only for those)
            run = self._compiled_block
            torch._dynamo.maybe_mark_dynamic(mask, 3)  # the attended length grows: one graph for all lengths
            if B > 1:
                torch._dynamo.maybe_mark_dynamic(x, 0)  # and one graph for any number of rows above one
        for layer in self.layers:
            x = layer(x, rope, input_pos, mask, cache_rows) if run is None else \
                run(layer, x, rope, input_pos, mask, cache_rows)
            if hidden_states is not None:
                hidden_states.append(x)
        return x


def empty_model(cfg: ModelConfig) -> Transformer:
    """A Transformer whose weights are allocated but not initialized (no random init, no memory touched), for a
    loader that replaces every tensor. Not the meta device: its first use imports torch's compiler stack,
    seconds on a small CPU."""
    skipped = (nn.Linear, nn.Embedding, nn.LayerNorm)
    saved = [c.reset_parameters for c in skipped]
    for c in skipped:
        c.reset_parameters = lambda self: None
    try:
        return Transformer(cfg)
    finally:
        for c, f in zip(skipped, saved):
            c.reset_parameters = f
