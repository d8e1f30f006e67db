"""Tiny random checkpoints for tests: HF folders (LlamaForCausalLM, GPT2LMHeadModel) with a byte-level BPE
tokenizer trained here, and GGUF files written with gguf-py the way llama.cpp's converter writes them.

Nothing is downloaded: the tokenizer is trained on a few lines of text, the weights are random with a fixed seed.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "Hello, how are you? I am fine, thank you. The capital of France is Paris.",
    "Once upon a time there was a small model that learned to talk about the weather.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, 2 * i))\n",
    "The quick brown fox jumps over the lazy dog 1234567890 times.   Spaces   and\n\n\nnewlines.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Emoji: 😀 🚀 🎉 👍🏽 and accents: café, naïve, Zürich, Ελληνικά, русский.",
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n",
]
PROMPTS = ["Hello, how are you?", "The capital of France is", "def add(a, b):", "你好，世界", "Once"]


# -- tokenizer ------------------------------------------------------------------------------------------------
def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder) with three special tokens, ids 0..2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def tokenizer_merges(tok) -> list[str]:
    """The merges as 'a b' strings, in rank order."""
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def save_tokenizer(tok, folder: Path, vocab_merges: bool = False):
    """tokenizer.json (or GPT-2's older vocab.json + merges.txt) and a tokenizer_config.json naming bos/eos."""
    folder.mkdir(parents=True, exist_ok=True)
    if vocab_merges:
        tok.model.save(str(folder))  # vocab.json, merges.txt
    else:
        tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
              "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


# -- HF models ------------------------------------------------------------------------------------------------
def _scale_weights(model, seed: int, std: float):
    """Redraw every weight matrix with a larger spread than HF's init (0.02), so the logits are far from uniform
    and greedy choices are not near-ties; norms keep their ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # norm gains around 1
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    return model


def llama_model(vocab_size: int, tied: bool = False, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                ff: int = 128, layers: int = 2, ctx: int = 256, seed: int = 0, std: float = 0.3):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=ctx,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=0,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    _scale_weights(model, seed, std)
    if tied:
        model.tie_weights()
    return model


def gpt2_model(vocab_size: int, hidden: int = 64, heads: int = 4, ff: int | None = None, layers: int = 2,
               ctx: int = 256, seed: int = 0, std: float = 0.3):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_head=heads, n_layer=layers, n_positions=ctx,
                     n_inner=ff, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    return _scale_weights(model, seed, std)


def save_hf_folder(model, tok, folder: Path, weights: str = "safetensors", vocab_merges: bool = False,
                   bare_names: bool = False) -> Path:
    """config.json + weights (model.safetensors, or pytorch_model.bin) + tokenizer files.
    bare_names: a GPT-2 .bin without the `transformer.` prefix and lm_head, as OpenAI's original release."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if bare_names:
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    if weights == "safetensors":
        from safetensors.torch import save_file
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # one copy of a shared tensor
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, folder / "pytorch_model.bin")
    save_tokenizer(tok, folder, vocab_merges)
    return folder


# -- K-quant writers (gguf-py can read these types but not write them) ------------------------------------------
QK_K = 256


def _f16(x):
    return np.asarray(x, dtype=np.float16)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins per block -> the 12-byte layout Q4_K and Q5_K share. (n, 8) -> (n, 12)"""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _affine_k(blocks: np.ndarray, levels: int):
    """Per 32-value sub-block x ~ d*sc*q - dmin*m with q in [0, levels]; 6-bit sc, m; f16 d, dmin.
    blocks: (n, 256) -> q (n, 8, 32) uint8, sc, m (n, 8) uint8, d, dmin (n,) float16."""
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    lo = np.minimum(sub.min(-1), 0.0)  # (n, 8) the offset is a subtracted minimum, so never positive
    scale = (sub.max(-1) - lo) / levels  # (n, 8)
    d = _f16(scale.max(-1) / 63)  # (n,)
    dmin = _f16(-lo.min(-1) / 63)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin32[:, None] > 0, np.rint(-lo / dmin32[:, None]), 0).clip(0, 63).astype(np.uint8)
        step = (d32[:, None] * sc)[..., None]  # (n, 8, 1)
        offset = (dmin32[:, None] * m)[..., None]
        q = np.where(step > 0, np.rint((sub + offset) / step), 0).clip(0, levels).astype(np.uint8)
    return q, sc, m, d, dmin


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, QK_K).astype(np.float32)
    q, sc, m, d, dmin = _affine_k(blocks, 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(len(blocks), 128)  # sub-blocks 2c (low) and 2c+1 (high nibble)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                          _pack_k_scales(sc, m), qs], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(-1, QK_K).astype(np.float32)
    q, sc, m, d, dmin = _affine_k(blocks, 31)
    low = q & 0xF
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(len(blocks), 128)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)  # bit j: sub-block j
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                          _pack_k_scales(sc, m), qh, qs], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """x ~ d*sc*q per 16-value sub-block, q in [-32, 31], int8 sc, f16 d."""
    blocks = x.reshape(-1, QK_K).astype(np.float32)
    n = len(blocks)
    sub = blocks.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31  # (n, 16)
    d = _f16(scale.max(-1) / 127)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32[:, None] > 0, np.rint(scale / d32[:, None]), 0).clip(-128, 127).astype(np.int8)
        step = (d32[:, None] * sc)[..., None]
        q = np.where(step > 0, np.rint(sub / step), 0).clip(-32, 31)
    q = (q + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # value h*128 + s*32 + k
    low, high = q & 0xF, q >> 4
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(n, 128)  # byte h*64 + s*32 + k holds s and s+2
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """(n, 256) values 0..3 -> (n, 64) bytes: value h*128 + s*32 + k sits in byte h*32 + k at bits 2s."""
    q = q.reshape(len(q), 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(len(q), 64)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """x ~ d*sc*q - dmin*m per 16-value sub-block, q in [0, 3], 4-bit sc and m, f16 d and dmin."""
    blocks = x.reshape(-1, QK_K).astype(np.float32)
    n = len(blocks)
    sub = blocks.reshape(n, 16, 16)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / 3
    d, dmin = _f16(scale.max(-1) / 15), _f16(-lo.min(-1) / 15)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 15).astype(np.uint8)
        m = np.where(dmin32 > 0, np.rint(-lo / dmin32), 0).clip(0, 15).astype(np.uint8)
        step, offset = (d32 * sc)[..., None], (dmin32 * m)[..., None]
        q = np.where(step > 0, np.rint((sub + offset) / step), 0).clip(0, 3)
    out = np.concatenate([sc | (m << 4), _pack_2bit(q.reshape(n, QK_K)), d.view(np.uint8).reshape(-1, 2),
                          dmin.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(*x.shape[:-1], -1)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """x ~ d*(u-32)*q per 16-value sub-block, q in [-4, 3] (2 low bits + a high-bit mask), 6-bit u, f16 d."""
    blocks = x.reshape(-1, QK_K).astype(np.float32)
    n = len(blocks)
    sub = blocks.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 4  # (n, 16)
    d = _f16(scale.max(-1) / 31)
    d32 = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 31)
        step = (d32 * sc)[..., None]
        q = np.where(step > 0, np.rint(sub / step), 0).clip(-4, 3).astype(np.int8).reshape(n, QK_K)
    high = (q >= 0).astype(np.uint8)  # the mask bit set means no -4 offset
    low = (q + 4 * (1 - high)).astype(np.uint8)
    hmask = (high.reshape(n, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
    u = (sc + 32).astype(np.uint8)  # (n, 16)
    packed = np.zeros((n, 12), np.uint8)
    for j in range(16):  # low nibble of u[j]: byte j % 8 (high half for j >= 8); its top 2 bits: byte 8 + j % 4
        packed[:, j % 8] |= (u[:, j] & 0xF) << (4 * (j // 8))
        packed[:, 8 + j % 4] |= (u[:, j] >> 4) << (2 * (j // 4))
    out = np.concatenate([hmask, _pack_2bit(low), packed, d.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(*x.shape[:-1], -1)


K_QUANTIZERS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k,
                "Q6_K": quantize_q6_k}
QUANT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
               "Q6_K"]


def quantize(x: np.ndarray, qtype: str):
    """x (rows, cols) float32 -> (array to write, raw_dtype or None) for GGUFWriter.add_tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize as gguf_quantize
    if qtype == "F32":
        return x.astype(np.float32), None
    if qtype == "F16":
        return x.astype(np.float16), None
    if qtype in K_QUANTIZERS:
        return K_QUANTIZERS[qtype](x), Q[qtype]
    return gguf_quantize(x.astype(np.float32), Q[qtype]), Q[qtype]


# -- GGUF writing, as llama.cpp's converter does it -----------------------------------------------------------
def permute_for_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's Q/K rows (each head: first half, second half of the rotary pairs) -> llama.cpp's interleaved order
    (pairs adjacent), which the converter writes so its RoPE rotates neighbours. (n_heads*hs, ...) -> same."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """An HF model's weights under GGUF names, float32, in the layout llama.cpp's converter writes."""
    cfg, sd = model.config, {k: v.detach().float() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if cfg.model_type == "llama":
        out["token_embd.weight"] = sd["model.embed_tokens.weight"]
        out["output_norm.weight"] = sd["model.norm.weight"]
        if not cfg.tie_word_embeddings:
            out["output.weight"] = sd["lm_head.weight"]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            out[f"blk.{i}.attn_norm.weight"] = sd[p + "input_layernorm.weight"]
            out[f"blk.{i}.attn_q.weight"] = permute_for_gguf(sd[p + "self_attn.q_proj.weight"],
                                                             cfg.num_attention_heads)
            out[f"blk.{i}.attn_k.weight"] = permute_for_gguf(sd[p + "self_attn.k_proj.weight"],
                                                             cfg.num_key_value_heads)
            out[f"blk.{i}.attn_v.weight"] = sd[p + "self_attn.v_proj.weight"]
            out[f"blk.{i}.attn_output.weight"] = sd[p + "self_attn.o_proj.weight"]
            out[f"blk.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
            out[f"blk.{i}.ffn_gate.weight"] = sd[p + "mlp.gate_proj.weight"]
            out[f"blk.{i}.ffn_up.weight"] = sd[p + "mlp.up_proj.weight"]
            out[f"blk.{i}.ffn_down.weight"] = sd[p + "mlp.down_proj.weight"]
    else:  # gpt2: Conv1D weights are (in, out); GGUF stores them as linear (out, in)
        t = "transformer."
        out["token_embd.weight"] = sd[t + "wte.weight"]
        out["position_embd.weight"] = sd[t + "wpe.weight"]
        out["output_norm.weight"], out["output_norm.bias"] = sd[t + "ln_f.weight"], sd[t + "ln_f.bias"]
        for i in range(cfg.n_layer):
            p = f"{t}h.{i}."
            for ours, theirs in [("attn_norm", "ln_1"), ("ffn_norm", "ln_2")]:
                out[f"blk.{i}.{ours}.weight"], out[f"blk.{i}.{ours}.bias"] = sd[p + theirs + ".weight"], \
                    sd[p + theirs + ".bias"]
            for ours, theirs in [("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
                                 ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")]:
                out[f"blk.{i}.{ours}.weight"] = sd[p + theirs + ".weight"].t()
                out[f"blk.{i}.{ours}.bias"] = sd[p + theirs + ".bias"]
    return {k: v.contiguous().numpy() for k, v in out.items()}


def write_tokenizer_metadata(w, tok, pre: str = "gpt-2"):  # llama.cpp's name for GPT-2's pre-tokenizer
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3: control
    w.add_token_merges(tokenizer_merges(tok))
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"] if "<|im_end|>" not in vocab else vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def write_gguf(path: Path, model, tok, qtype: str = "F32", arch: str | None = None,
               raw_tensors: dict | None = None) -> Path:
    """Write an HF model as GGUF: metadata, tokenizer, 2-D weights in `qtype` (1-D norms and biases stay F32,
    as in llama.cpp's converter). `arch` overrides general.architecture (to test refusals); `raw_tensors`
    {name: (uint8 bytes, GGMLQuantizationType)} replaces tensors with raw blocks of any type."""
    import gguf
    cfg = model.config
    llama = cfg.model_type == "llama"
    w = gguf.GGUFWriter(str(path), arch or cfg.model_type)  # prefixes the per-architecture keys below
    w.add_name(f"tiny-{cfg.model_type}")
    if llama:
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                             else float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_vocab_size(cfg.vocab_size)
    else:
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    w.add_uint32("general.file_type", {"F32": 0, "F16": 1}.get(qtype, 7))
    write_tokenizer_metadata(w, tok)
    for name, x in gguf_tensors(model).items():
        if raw_tensors and name in raw_tensors:
            data, raw = raw_tensors[name]
            w.add_tensor(name, data, raw_dtype=raw)
        elif x.ndim == 1:
            w.add_tensor(name, x.astype(np.float32))
        else:
            data, raw = quantize(x, qtype)
            w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- built once per test process, shared by the test modules ---------------------------------------------------
_ROOT: Path | None = None


def workdir() -> Path:
    """A temporary folder for this test process, removed at exit."""
    global _ROOT
    if _ROOT is None:
        import atexit
        import shutil
        import tempfile
        _ROOT = Path(tempfile.mkdtemp(prefix="mmchat-tiny-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


@functools.cache
def tokenizer():
    return train_tokenizer()


@functools.cache
def hf_model(kind: str):
    """kind: 'llama' (GQA, untied), 'llama-tied', 'gpt2' (small, for HF-folder parity), or 'llama-256',
    'gpt2-256' (rows of 256, as K-quant blocks need, for GGUF round trips)."""
    v = tokenizer().get_vocab_size()
    if kind == "llama":
        return llama_model(v, tied=False, seed=1)
    if kind == "llama-tied":
        return llama_model(v, tied=True, seed=2)
    if kind == "gpt2":
        return gpt2_model(v, seed=3)
    if kind == "llama-256":
        return llama_model(v, tied=False, hidden=256, ff=512, std=0.08, seed=4)
    if kind == "gpt2-256":  # n_positions 1024 and n_inner 4*d: transformers' GGUF reader ignores both keys
        return gpt2_model(v, hidden=256, ctx=1024, std=0.08, seed=5)
    raise KeyError(kind)


@functools.cache
def hf_folder(kind: str, weights: str = "safetensors", vocab_merges: bool = False, bare_names: bool = False) -> Path:
    name = f"{kind}-{weights}{'-vm' if vocab_merges else ''}{'-bare' if bare_names else ''}"
    return save_hf_folder(hf_model(kind), tokenizer(), workdir() / name, weights, vocab_merges, bare_names)


@functools.cache
def gguf_file(kind: str, qtype: str = "F32") -> Path:
    folder = workdir() / f"gguf-{kind}-{qtype}"  # one file per folder: transformers takes (folder, file name)
    folder.mkdir(exist_ok=True)
    return write_gguf(folder / f"{kind}-{qtype}.gguf", hf_model(kind), tokenizer(), qtype)
