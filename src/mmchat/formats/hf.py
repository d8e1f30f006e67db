"""HuggingFace model folders: config.json + *.safetensors (or pytorch_model.bin) + tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import MMChatError
from .names import HF_GPT2_TRANSPOSED, to_ours

HF_ARCHS = {"llama": ("llama", False), "mistral": ("llama", False), "qwen2": ("llama", True),
            "smollm": ("llama", False), "gpt2": ("gpt2", True)}


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.exists():
        raise MMChatError(f"{folder} has no config.json; a HuggingFace model folder needs config.json and weights")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MMChatError(f"{path} is not valid JSON ({e}); fix or replace it") from None
    model_type = c.get("model_type")
    if model_type not in HF_ARCHS:
        raise MMChatError(f"{folder}: unsupported architecture '{model_type}'; mmchat runs HF models of type "
                          f"{', '.join(HF_ARCHS)}")
    if c.get("rope_scaling"):
        raise MMChatError(f"{folder}: rope_scaling {c['rope_scaling']} is not supported yet")
    family, qkv_bias = HF_ARCHS[model_type]
    eos = c.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if family == "gpt2":
        d = c["n_embd"]
        return ModelConfig(arch="gpt2", vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                           n_kv_head=c["n_head"], d_model=d, d_ff=c.get("n_inner") or 4 * d,
                           max_seq_len=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=c.get("tie_word_embeddings", True), attn_bias=True, mlp_bias=True,
                           bos_token_id=c.get("bos_token_id"), eos_token_ids=eos_ids, name=folder.name)
    n_head = c["num_attention_heads"]
    rope_theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(arch="llama", vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"], n_head=n_head,
                       n_kv_head=c.get("num_key_value_heads") or n_head, d_model=c["hidden_size"],
                       d_ff=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
                       norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
                       tie_embeddings=c.get("tie_word_embeddings", False),
                       attn_bias=c.get("attention_bias", qkv_bias), mlp_bias=False,
                       head_dim=c.get("head_dim") or c["hidden_size"] // n_head,
                       bos_token_id=c.get("bos_token_id"), eos_token_ids=eos_ids, name=folder.name)


def read_raw_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file
        tensors = {}
        for f in files:
            try:
                tensors.update(load_file(str(f)))
            except Exception as e:
                raise MMChatError(f"{f} is not a readable safetensors file ({e}); replace it") from None
        return tensors
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise MMChatError(f"{folder} has no *.safetensors or pytorch_model.bin weights")
    tensors = {}
    for f in bins:
        try:
            tensors.update(torch.load(str(f), map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise MMChatError(f"{f} is not a readable PyTorch checkpoint ({e}); replace it") from None
    return tensors


def read_tensors(folder: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    column = "hf-gpt2" if cfg.arch == "gpt2" else "hf"
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, w in read_raw_tensors(folder).items():
        mapped = to_ours(name, column)
        if mapped is None:
            continue  # buffers such as attn.bias / rotary inv_freq: recomputed
        ours, part = mapped
        if column == "hf-gpt2" and name.endswith(HF_GPT2_TRANSPOSED):
            w = w.t()  # Conv1D (in, out) -> Linear (out, in)
        parts.setdefault(ours, {})[part] = w.float()
    return {name: torch.cat([p[i] for i in sorted(p)], dim=0).contiguous() for name, p in parts.items()}


def read_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    tc = folder / "tokenizer_config.json"
    if tc.exists():
        template = json.loads(tc.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def load_hf(folder: Path):
    cfg = read_config(folder)
    return cfg, read_tensors(folder, cfg), read_chat_template(folder)
