"""A training output folder -> a HuggingFace folder (transformers, mmchat) or a GGUF file (llama.cpp, mmchat).

LoRA runs are rebuilt from their base model plus adapters and merged, so every export is a plain model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import MMChatError
from ..formats.names import from_ours
from .loop import CHECKPOINT, load_checkpoint_file


def load_run(run_dir: str | Path):
    """An api.LLM with the latest weights of a training run (LoRA adapters merged)."""
    from ..api import LLM, build_model
    from ..chat.template import ChatTemplate
    from .data import load_tokenizer_file
    run_dir = Path(run_dir)
    ckpt = load_checkpoint_file(run_dir / CHECKPOINT)
    meta = ckpt["meta"]
    if meta.get("lora"):
        from .lora import apply_lora, load_lora_state, merge_lora
        from .sft import load_base
        base = load_base(meta["base"])
        lora = meta["lora"]
        apply_lora(base.model, lora["rank"], lora["alpha"], lora["targets"])
        load_lora_state(base.model, ckpt["model"])
        merge_lora(base.model)
        base.model.eval()
        return base
    cfg = ModelConfig(**meta["config"])
    model = build_model(cfg, ckpt["model"])
    tok = load_tokenizer_file(run_dir / "tokenizer.json")
    t = meta["tokenizer"]
    tok.bos_token_id, tok.eos_token_ids, tok.add_bos = t["bos"], t["eos"], t["add_bos"]
    bos = tok.id_to_token(tok.bos_token_id) if tok.bos_token_id is not None else ""
    eos = tok.id_to_token(tok.eos_token_ids[0]) if tok.eos_token_ids else ""
    return LLM(model, tok, ChatTemplate(meta.get("chat_template"), bos, eos), name=run_dir.name)


# -- shared helpers -----------------------------------------------------------------------------------------------
def _split_parts(name: str, w: torch.Tensor, cfg: ModelConfig, column: str) -> list[tuple[str, torch.Tensor]]:
    """Our (possibly fused) tensor -> the checkpoint's tensors: wqkv -> Q, K, V; w_up -> gate, up."""
    names = from_ours(name, column)
    if column == "gguf":  # the GGUF column serves both families: GPT-2 keeps Q/K/V and up fused, llama splits them
        fused = cfg.arch == "gpt2"
        names = [n for n in names if (".attn_qkv." in n) == fused or ".attn_" not in n or "_output" in n
                 or "_norm" in n]
        if fused:
            names = [n for n in names if ".ffn_gate." not in n]
    if not names:
        return []
    if len(names) == 1:
        return [(names[0], w)]
    if len(names) == 3:  # Q, K, V
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        return list(zip(names, w.split([q, kv, kv], dim=0)))
    return list(zip(names, w.split([cfg.d_ff, cfg.d_ff], dim=0)))  # gate, up


def _atomic_dir(out: Path):
    """Write into a sibling temp folder, then rename it into place."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


# -- HuggingFace --------------------------------------------------------------------------------------------------
def hf_config(cfg: ModelConfig) -> dict:
    common = {"vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id,
              "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else (cfg.eos_token_ids or None),
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}
    if cfg.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.d_model,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
                "n_ctx": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common}
    # Q/K/V biases without an output-projection bias is Qwen2's layout; plain llama has neither
    model_type = "qwen2" if cfg.attn_bias else "llama"
    return {"architectures": ["Qwen2ForCausalLM" if cfg.attn_bias else "LlamaForCausalLM"], "model_type": model_type,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "hidden_act": "silu", "attention_bias": cfg.attn_bias, "mlp_bias": False, **common}


def write_hf(llm, out: str | Path) -> Path:
    """config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with the chat template)."""
    from safetensors.torch import save_file
    cfg, out = llm.config, Path(out)
    tmp = _atomic_dir(out)
    column = "hf-gpt2" if cfg.arch == "gpt2" else "hf"
    tensors = {}
    for name, w in llm.model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        for hf_name, part in _split_parts(name, w.detach().float().cpu(), cfg, column):
            if column == "hf-gpt2":
                if hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
                    part = part.t()  # Linear (out, in) -> Conv1D (in, out)
                if not hf_name.startswith("lm_head"):
                    hf_name = "transformer." + hf_name
            tensors[hf_name] = part.contiguous()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    tok = llm.tokenizer
    tok.tok.save(str(tmp / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
          "add_bos_token": bool(tok.add_bos), "clean_up_tokenization_spaces": False}
    if tok.bos_token_id is not None:
        tc["bos_token"] = tok.id_to_token(tok.bos_token_id)
    if tok.eos_token_ids:
        tc["eos_token"] = tok.id_to_token(tok.eos_token_ids[0])
    if not llm.template.is_fallback:
        tc["chat_template"] = llm.template.source
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# -- GGUF ---------------------------------------------------------------------------------------------------------
def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split RoPE layout -> llama.cpp's interleaved one (the inverse of formats.gguf.unpermute_rope_rows).
    w: (n_heads*hs, ...) -> same shape."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _pre_type(tok) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (how text is split before BPE)."""
    pre = json.loads(tok.tok.to_str()).get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    if "Digits" in kinds:
        return "smollm"
    if "Split" in kinds:
        pattern = json.dumps(pre)
        return "qwen2" if "\\\\p{N}|" in pattern else "llama-bpe"
    return "gpt2"


def _vocab(tok, vocab_size: int):
    """Tokens in id order (padded to the model's vocabulary), token types, and merges."""
    data = json.loads(tok.tok.to_str())
    if data["model"]["type"] != "BPE":
        raise MMChatError(f"GGUF export needs a BPE tokenizer (this one is {data['model']['type']})")
    by_id = {i: t for t, i in tok.tok.get_vocab(with_added_tokens=True).items()}
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(3 if i in special else 1)  # 3: control, 1: normal
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # unused
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def write_gguf(llm, out: str | Path, outtype: str = "f32") -> Path:
    import gguf
    cfg, out = llm.config, Path(out)
    if outtype not in ("f32", "f16"):
        raise MMChatError(f"--outtype must be f32 or f16 (got {outtype})")
    arch = "gpt2" if cfg.arch == "gpt2" else ("qwen2" if cfg.attn_bias else "llama")
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(cfg.name or out.stem)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    if arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    tok = llm.tokenizer
    tokens, types, merges = _vocab(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_type(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_ids:
        w.add_eos_token_id(tok.eos_token_ids[0])
    w.add_add_bos_token(bool(tok.add_bos))
    if not llm.template.is_fallback:
        w.add_chat_template(llm.template.source)
    permuted = arch == "llama"  # llama.cpp's llama graph applies RoPE to adjacent pairs
    for name, t in llm.model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        for gguf_name, part in _split_parts(name, t.detach().float().cpu(), cfg, "gguf"):
            if permuted and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
                part = permute_rope_rows(part, cfg.n_head)
            elif permuted and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
                part = permute_rope_rows(part, cfg.n_kv_head)
            array = part.contiguous().numpy()
            if outtype == "f16" and array.ndim == 2:
                array = array.astype(np.float16)
            w.add_tensor(gguf_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def export(run_dir: str | Path, to: str, out: str | Path, outtype: str = "f32") -> Path:
    if to not in ("hf", "gguf"):
        raise MMChatError(f"--to must be hf or gguf (got {to})")
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).exists():
        raise MMChatError(f"{run_dir} holds no {CHECKPOINT}; give the --out folder of `mmchat train`")
    llm = load_run(run_dir)
    return write_hf(llm, out) if to == "hf" else write_gguf(llm, out, outtype)
