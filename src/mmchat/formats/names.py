"""One table: GGUF and HuggingFace tensor names -> ours.

Each row is (gguf name, hf llama name, hf gpt2 name, our name, part). `{i}` is the layer index. Rows that share
our name are parts of one fused tensor, concatenated along the output dimension in `part` order
(Q, K, V -> wqkv; gate, up -> w_up).
"""
from __future__ import annotations

import re

# (gguf, hf llama-family, hf gpt2, ours, part)
TENSOR_NAMES: list[tuple[str | None, str | None, str | None, str, int]] = [
    ("token_embd.weight", "model.embed_tokens.weight", "wte.weight", "tok_embeddings.weight", 0),
    ("position_embd.weight", None, "wpe.weight", "pos_embeddings.weight", 0),
    ("output_norm.weight", "model.norm.weight", "ln_f.weight", "norm.weight", 0),
    ("output_norm.bias", None, "ln_f.bias", "norm.bias", 0),
    ("output.weight", "lm_head.weight", "lm_head.weight", "lm_head.weight", 0),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", "h.{i}.ln_1.weight",
     "layers.{i}.attn_norm.weight", 0),
    ("blk.{i}.attn_norm.bias", None, "h.{i}.ln_1.bias", "layers.{i}.attn_norm.bias", 0),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight", None, "layers.{i}.attn.wqkv.weight", 0),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight", None, "layers.{i}.attn.wqkv.weight", 1),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight", None, "layers.{i}.attn.wqkv.weight", 2),
    ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias", None, "layers.{i}.attn.wqkv.bias", 0),
    ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias", None, "layers.{i}.attn.wqkv.bias", 1),
    ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias", None, "layers.{i}.attn.wqkv.bias", 2),
    ("blk.{i}.attn_qkv.weight", None, "h.{i}.attn.c_attn.weight", "layers.{i}.attn.wqkv.weight", 0),
    ("blk.{i}.attn_qkv.bias", None, "h.{i}.attn.c_attn.bias", "layers.{i}.attn.wqkv.bias", 0),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight", "h.{i}.attn.c_proj.weight",
     "layers.{i}.attn.wo.weight", 0),
    ("blk.{i}.attn_output.bias", "model.layers.{i}.self_attn.o_proj.bias", "h.{i}.attn.c_proj.bias",
     "layers.{i}.attn.wo.bias", 0),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "h.{i}.ln_2.weight",
     "layers.{i}.mlp_norm.weight", 0),
    ("blk.{i}.ffn_norm.bias", None, "h.{i}.ln_2.bias", "layers.{i}.mlp_norm.bias", 0),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", None, "layers.{i}.mlp.w_up.weight", 0),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight", "h.{i}.mlp.c_fc.weight",
     "layers.{i}.mlp.w_up.weight", 1),
    ("blk.{i}.ffn_up.bias", None, "h.{i}.mlp.c_fc.bias", "layers.{i}.mlp.w_up.bias", 0),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight", "h.{i}.mlp.c_proj.weight",
     "layers.{i}.mlp.w_down.weight", 0),
    ("blk.{i}.ffn_down.bias", None, "h.{i}.mlp.c_proj.bias", "layers.{i}.mlp.w_down.bias", 0),
]

# GPT-2's HF checkpoints store these as Conv1D weights, (in, out): they are transposed on load.
HF_GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

COLUMNS = {"gguf": 0, "hf": 1, "hf-gpt2": 2}


def _pattern(name: str) -> re.Pattern:
    return re.compile("^" + re.escape(name).replace(r"\{i\}", r"(\d+)") + "$")


_COMPILED = {col: [(_pattern(row[idx]), row[3], row[4]) for row in TENSOR_NAMES if row[idx]]
             for col, idx in COLUMNS.items()}


def to_ours(name: str, column: str) -> tuple[str, int] | None:
    """Map a checkpoint tensor name to (our name, part index), or None if the name has no place in our model."""
    if column == "hf-gpt2":
        name = name.removeprefix("transformer.")
    for pattern, ours, part in _COMPILED[column]:
        m = pattern.match(name)
        if m:
            return (ours.replace("{i}", m.group(1)) if m.groups() else ours), part
    return None


def from_ours(name: str, column: str) -> list[str]:
    """Our name -> the checkpoint names of its parts, in part order (for export)."""
    m = re.match(r"^layers\.(\d+)\.", name)
    generic = re.sub(r"^layers\.\d+\.", "layers.{i}.", name)
    rows = sorted((row for row in TENSOR_NAMES if row[3] == generic and row[COLUMNS[column]]), key=lambda r: r[4])
    return [row[COLUMNS[column]].replace("{i}", m.group(1)) if m else row[COLUMNS[column]] for row in rows]
