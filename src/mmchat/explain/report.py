"""One forward pass with the written-out attention, and the pictures and tables made from it."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MMChatError


@dataclass
class Explanation:
    ids: list[int]
    tokens: list[str]                 # how each input token reads
    attention: np.ndarray             # (L, H, T, T) softmax(QK^T/sqrt(d_k)) of every layer and head
    token_probs: list[dict]           # per position t >= 1: p(x_t | x_<t) and the top alternatives
    next_tokens: list[tuple[str, float]]  # what the model would say next, with probabilities
    lens_ids: np.ndarray              # (L, T) each layer's top prediction for the next token (logit lens)
    lens_probs: np.ndarray            # (L, T) its probability


def label(text: str) -> str:
    """A token as a short readable label: whitespace made visible."""
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·") or "∅"


@torch.inference_mode()
def explain(llm, text: str, top_k: int = 5) -> Explanation:
    ids = llm.tokenizer.encode(text)
    if not ids:
        raise MMChatError("nothing to explain: the text is empty")
    if len(ids) > 512:
        raise MMChatError(f"the text is {len(ids)} tokens; explain takes at most 512 (the maps get unreadable)")
    model = llm.model
    hidden: list[torch.Tensor] = []
    model.set_reference_attention(True)
    try:
        logits = model(torch.tensor([ids]), hidden_states=hidden)[0].float()  # (T, V)
        attention = torch.stack([layer.attn.last_weights[0] for layer in model.layers])  # (L, H, T, T)
    finally:
        model.set_reference_attention(False)
    logprobs = logits.log_softmax(-1)  # (T, V)
    tok = llm.tokenizer
    token_probs = []
    for t in range(1, len(ids)):
        top = logprobs[t - 1].topk(top_k)
        token_probs.append({
            "token": tok.token_text(ids[t]), "prob": float(logprobs[t - 1, ids[t]].exp()),
            "top": [(tok.token_text(i), math.exp(lp)) for lp, i in zip(top.values.tolist(), top.indices.tolist())],
        })
    top = logprobs[-1].topk(top_k)
    next_tokens = [(tok.token_text(i), math.exp(lp)) for lp, i in zip(top.values.tolist(), top.indices.tolist())]
    # logit lens: read every layer's residual stream through the final norm and the output head
    lens = torch.stack([model.lm_head(model.norm(h[0])).float().softmax(-1) for h in hidden])  # (L, T, V)
    lens_probs, lens_ids = lens.max(-1)  # (L, T) each
    return Explanation(ids, [tok.token_text(i) for i in ids], attention.float().numpy(), token_probs,
                       next_tokens, lens_ids.numpy(), lens_probs.numpy())


def save_report(ex: Explanation, out_dir: str | Path, tokenizer, layer: int | None = None,
                head: int | None = None) -> list[Path]:
    """Writes attention_grid.png (layers x heads), attention_head.png (one head, labelled),
    logit_lens.png, tokens.json. Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L, H, T, _ = ex.attention.shape
    layer = L - 1 if layer is None else layer
    head = 0 if head is None else head
    if not (0 <= layer < L and 0 <= head < H):
        raise MMChatError(f"--layer must be in 0..{L - 1} and --head in 0..{H - 1}")
    labels = [label(t) for t in ex.tokens]
    paths = []

    fig, axes = plt.subplots(L, H, figsize=(H * 1.1, L * 1.1), squeeze=False)
    for li in range(L):
        for hi in range(H):
            ax = axes[li][hi]
            ax.imshow(ex.attention[li, hi], cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if hi == 0:
                ax.set_ylabel(f"L{li}", fontsize=7)
            if li == 0:
                ax.set_title(f"H{hi}", fontsize=7)
    fig.suptitle("attention weights, layers x heads (rows: queries, columns: keys)", fontsize=9)
    paths.append(out / "attention_grid.png")
    fig.savefig(paths[-1], dpi=60)
    plt.close(fig)

    size = max(5.0, T * 0.35)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(ex.attention[layer, head], cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(T), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(T), labels, fontsize=8)
    ax.set_xlabel("key (attended to)"), ax.set_ylabel("query (attending)")
    ax.set_title(f"layer {layer}, head {head}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    paths.append(out / "attention_head.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6.0, T * 0.6), max(4.0, L * 0.3)))
    ax.imshow(ex.lens_probs, cmap="magma", vmin=0, vmax=1, aspect="auto")
    for li in range(L):
        for t in range(T):
            ax.text(t, li, label(tokenizer.token_text(int(ex.lens_ids[li, t])))[:8], ha="center", va="center",
                    fontsize=5, color="white" if ex.lens_probs[li, t] < 0.6 else "black")
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(L), [f"L{i}" for i in range(L)], fontsize=6)
    ax.set_title("logit lens: each layer's guess for the next token (colour: its probability)")
    fig.tight_layout()
    paths.append(out / "logit_lens.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    paths.append(out / "tokens.json")
    paths[-1].write_text(json.dumps({"tokens": ex.tokens, "ids": ex.ids, "token_probs": ex.token_probs,
                                     "next_tokens": ex.next_tokens}, ensure_ascii=False, indent=1))
    return paths


def format_table(ex: Explanation) -> str:
    """Each token's probability given what came before, with the model's top alternatives."""
    rows = [f"{'token':<16} {'p':>6}  top alternatives"]
    for tp in ex.token_probs:
        alts = ", ".join(f"{label(t)} {p:.2f}" for t, p in tp["top"][:3])
        rows.append(f"{label(tp['token'])[:16]:<16} {tp['prob']:6.3f}  {alts}")
    rows.append("next: " + ", ".join(f"{label(t)} {p:.2f}" for t, p in ex.next_tokens))
    return "\n".join(rows)
