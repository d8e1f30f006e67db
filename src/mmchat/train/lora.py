"""LoRA: a frozen weight W plus a trainable low-rank update (alpha / r) * B A, merged into W afterwards.

Our attention fuses Q, K and V into one `wqkv` matrix and the MLP fuses gate and up into `w_up`. Each fused part
gets its own adapter (A_p, B_p), as separate q/k/v projections would, so `--lora-targets q,v` adapts only the Q and
V rows of `wqkv`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import MMChatError

# target name -> (module attribute path inside a block, part index within the fused output, or None for all)
TARGETS = {
    "q": ("attn.wqkv", 0), "k": ("attn.wqkv", 1), "v": ("attn.wqkv", 2), "o": ("attn.wo", None),
    "gate": ("mlp.w_up", 0), "up": ("mlp.w_up", 1), "down": ("mlp.w_down", None),
}
ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down", "attn": "q,k,v,o", "mlp": "gate,up,down", "all": "q,k,v,o,gate,up,down"}
DEFAULT_TARGETS = "q,k,v,o"


def parse_targets(spec: str) -> list[str]:
    names = []
    for raw in spec.split(","):
        name = ALIASES.get(raw.strip(), raw.strip())
        for n in name.split(","):
            if n not in TARGETS:
                raise MMChatError(f"unknown LoRA target '{raw}'; choose from {', '.join(TARGETS)} (or attn, mlp, all)")
            if n not in names:
                names.append(n)
    return names


class LoRALinear(nn.Module):
    """y = base(x) + scale * concat_p(x A_p^T B_p^T) over the output slices that have an adapter."""

    def __init__(self, base: nn.Linear, slices: list[tuple[int, int]], adapted: list[bool], rank: int,
                 alpha: float):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.slices, self.adapted, self.rank, self.scale = slices, adapted, rank, alpha / rank
        n_in = base.in_features
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for (start, end), on in zip(slices, adapted):
            if not on:
                continue
            a = torch.empty(rank, n_in, device=dev, dtype=dt)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear; B = 0 makes the start equal the base
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(end - start, rank, device=dev, dtype=dt)))

    def delta_weight(self) -> torch.Tensor:
        """scale * B A per adapted slice, zeros elsewhere: (out, in)."""
        w = torch.zeros_like(self.base.weight)
        k = 0
        for (start, end), on in zip(self.slices, self.adapted):
            if on:
                w[start:end] = self.scale * (self.lora_B[k] @ self.lora_A[k])
                k += 1
        return w

    def forward(self, x):
        # every adapter in two matmuls: all A_p stacked, then the B_p as one block-diagonal matrix (no rows
        # where a slice has no adapter), added onto the base output by addmm: no per-slice products, zeros or cat
        a = torch.cat(list(self.lora_A)) if len(self.lora_A) > 1 else self.lora_A[0]  # (n r, in)
        blocks, k = [], 0
        for (start, end), on in zip(self.slices, self.adapted):
            blocks.append(self.lora_B[k] if on else a.new_zeros(end - start, 0))  # (end-start, r or 0)
            k += on
        b = torch.block_diag(*blocks) if len(blocks) > 1 else blocks[0]  # (out, n r)
        y = self.base(x)  # (B, T, out)
        h = x @ a.t()  # (B, T, n r)
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), b.t(), alpha=self.scale).view(y.shape)  # (B, T, out)


def _slices(model, attr: str, linear: nn.Linear) -> list[tuple[int, int]]:
    cfg = model.cfg
    if attr == "attn.wqkv":
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)]
    if attr == "mlp.w_up" and cfg.arch == "llama":
        return [(0, cfg.d_ff), (cfg.d_ff, 2 * cfg.d_ff)]
    return [(0, linear.out_features)]


def apply_lora(model, rank: int = 8, alpha: float = 16.0, targets: str | list[str] = DEFAULT_TARGETS,
               seed: int = 0) -> int:
    """Freeze every weight of `model` and wrap the target projections of every block in LoRALinear.
    Returns the number of trainable parameters."""
    if rank < 1:
        raise MMChatError(f"LoRA rank must be at least 1 (got {rank})")
    names = parse_targets(targets) if isinstance(targets, str) else targets
    for p in model.parameters():
        p.requires_grad_(False)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same adapters every time for the same seed (resume rebuilds them)
    try:
        for block in model.layers:
            by_module: dict[str, set] = {}
            for n in names:
                attr, part = TARGETS[n]
                if attr == "mlp.w_up" and model.cfg.arch != "llama":
                    part = None if n == "up" else -1  # gpt2 has no gate
                by_module.setdefault(attr, set()).add(part)
            for attr, parts in by_module.items():
                parent_name, child = attr.split(".")
                parent = getattr(block, parent_name)
                linear = getattr(parent, child)
                slices = _slices(model, attr, linear)
                if len(slices) == 1:
                    adapted = [None in parts or 0 in parts]
                else:
                    adapted = [None in parts or i in parts for i in range(len(slices))]
                if any(adapted):
                    setattr(parent, child, LoRALinear(linear, slices, adapted, rank, alpha))
    finally:
        torch.random.set_rng_state(gen_state)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_state(model) -> dict[str, torch.Tensor]:
    """Only the adapter weights (what a LoRA checkpoint needs besides the base model)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora_state(model, state: dict[str, torch.Tensor]):
    missing = [k for k in state if k not in model.state_dict()]
    if missing:
        raise MMChatError(f"the LoRA checkpoint does not fit this model (e.g. {missing[0]}); same rank and targets?")
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def merge_lora(model) -> int:
    """Fold every adapter into its base weight, W <- W + (alpha / r) B A, and put the plain Linear back.
    Returns how many modules were merged."""
    merged = 0
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for child, module in list(parent.named_children()):
                if isinstance(module, LoRALinear):
                    module.base.weight += module.delta_weight()
                    setattr(parent, child, module.base)
                    merged += 1
    for p in model.parameters():
        p.requires_grad_(True)
    return merged
