"""GGUF reading through the `gguf` package: metadata -> ModelConfig, tensors -> our names (dequantized)."""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import MMChatError
from .names import to_ours

# quant types whose blocks we can turn into floats (gguf-py's numpy dequantizers)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
# GGUF architecture -> (our family, Q/K bias, Q/K rows permuted by llama.cpp's converter for interleaved RoPE)
GGUF_ARCHS = {"llama": ("llama", False, True), "mistral": ("llama", False, True), "qwen2": ("llama", True, False),
              "gpt2": ("gpt2", True, False)}


def open_gguf(path: str):
    """The file's reader. The last one opened is kept (until `forget_readers`): parsing the header of a model
    with a 49k-token vocabulary takes seconds, and one load reads the config, the tokenizer, the tensors and
    their block types."""
    try:
        stat = os.stat(path)
        return _reader(str(path), stat.st_size, stat.st_mtime_ns)
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on damaged files
        raise MMChatError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                          "download it again or check the path") from None


@functools.lru_cache(maxsize=1)
def _reader(path: str, size: int, mtime_ns: int):  # size and mtime: a file replaced in place is read again
    import gguf
    return gguf.GGUFReader(path)


def forget_readers():
    """Drop the kept reader (its parsed header holds tens of MB)."""
    _reader.cache_clear()


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def read_config(reader, path: str) -> ModelConfig:
    arch = field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise MMChatError(f"{path}: unsupported architecture '{arch}'; mmchat runs GGUF models of type "
                          f"{', '.join(GGUF_ARCHS)}")
    family, qkv_bias, _ = GGUF_ARCHS[arch]
    names = {t.name for t in reader.tensors}
    n_head = int(field(reader, f"{arch}.attention.head_count"))
    tokens = field(reader, "tokenizer.ggml.tokens") or []
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    eot = field(reader, "tokenizer.ggml.eot_token_id")
    d_model = int(field(reader, f"{arch}.embedding_length"))
    return ModelConfig(
        arch=family,
        vocab_size=int(field(reader, f"{arch}.vocab_size", len(tokens))),
        n_layer=int(field(reader, f"{arch}.block_count")),
        n_head=n_head,
        n_kv_head=int(field(reader, f"{arch}.attention.head_count_kv", n_head)),
        d_model=d_model,
        d_ff=int(field(reader, f"{arch}.feed_forward_length")),
        max_seq_len=int(field(reader, f"{arch}.context_length", 2048)),
        norm_eps=float(field(reader, f"{arch}.attention.layer_norm_rms_epsilon",
                             field(reader, f"{arch}.attention.layer_norm_epsilon", 1e-5))),
        rope_theta=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        attn_bias=qkv_bias,
        mlp_bias=family == "gpt2",
        head_dim=int(field(reader, f"{arch}.attention.key_length", d_model // n_head)),
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=sorted({int(t) for t in (eos, eot) if t is not None}),
        name=str(field(reader, "general.name", "")),
    )


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter reorders each head's Q/K rows so RoPE rotates adjacent pairs; undo it to get
    HF's half-split layout. w: (n_heads*hs, ...) -> same shape."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def dequantize(tensor) -> np.ndarray:
    from gguf.quants import dequantize as gguf_dequantize
    qtype = tensor.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise MMChatError(f"tensor '{tensor.name}' uses quant type {qtype}, which mmchat does not read yet; "
                          f"supported: {', '.join(SUPPORTED_TYPES)}")
    return gguf_dequantize(tensor.data, tensor.tensor_type)


def check_types(reader, path: str):
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise MMChatError(f"{path}: tensor '{t.name}' uses quant type {t.tensor_type.name}, which mmchat does "
                              f"not read yet; supported: {', '.join(SUPPORTED_TYPES)}")


def read_tensors(reader, cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """All tensors, dequantized to float32, under our names, with Q/K/V and gate/up fused."""
    _, _, permuted = GGUF_ARCHS[arch]
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for t in reader.tensors:
        mapped = to_ours(t.name, "gguf")
        if mapped is None:
            continue  # e.g. rope_freqs: recomputed from the config
        ours, part = mapped
        w = torch.from_numpy(np.array(dequantize(t), dtype=np.float32))  # a writable copy
        if permuted and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rope_rows(w, cfg.n_head)
        elif permuted and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rope_rows(w, cfg.n_kv_head)
        parts.setdefault(ours, {})[part] = w
    return {name: torch.cat([p[i] for i in sorted(p)], dim=0) for name, p in parts.items()}


def read_tokenizer_data(reader) -> dict:
    """What the tokenizer builder needs: model type, pre-tokenizer name, tokens, merges, scores, special ids."""
    keys = ("model", "pre", "tokens", "merges", "scores", "token_type", "bos_token_id", "eos_token_id",
            "eot_token_id", "unknown_token_id", "padding_token_id", "add_bos_token", "add_eos_token",
            "add_space_prefix")
    return {k: field(reader, f"tokenizer.ggml.{k}") for k in keys}


def load_gguf(path: str):
    reader = open_gguf(path)
    try:
        cfg = read_config(reader, path)
        check_types(reader, path)
        tensors = read_tensors(reader, cfg, field(reader, "general.architecture"))
    except MMChatError:
        raise
    except Exception as e:
        raise MMChatError(f"{path}: damaged GGUF ({type(e).__name__}: {e}); download it again") from None
    return cfg, tensors, read_tokenizer_data(reader), field(reader, "tokenizer.chat_template")
