"""Pretraining from scratch: text files -> a tokenizer and token shards -> a GPT of a named shape.

The output folder holds everything a run needs to continue or be exported:
  tokenizer.json   the byte-level BPE trained on the data (or the given model's tokenizer)
  data/            tokens.bin (memory-mapped uint16/uint32 ids) and tokens.json
  checkpoint.pt    weights, optimizer, step, loss history, and how to rebuild the model (meta)
  tb/              TensorBoard event files
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from ..config import CONFIGS, ModelConfig, get_config
from ..errors import MMChatError
from ..model import Transformer
from .data import EOS_TEXT, TokenShards, load_tokenizer_file, read_text, tokenize_to_shards, train_bpe
from .loop import Trainer, TrainConfig, check_memory, resolve_device, setup_distributed


def resolve_config(name_or_file: str) -> ModelConfig:
    """A named config (tiny, small, gpt2, ...) or a JSON file of ModelConfig fields."""
    if name_or_file in CONFIGS:
        return get_config(name_or_file)
    path = Path(name_or_file)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise MMChatError(f"no such config file: {path}")
        try:
            fields = json.loads(path.read_text())
            return ModelConfig(**fields)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise MMChatError(f"{path} is not a valid model config ({e})") from None
    raise MMChatError(f"unknown config '{name_or_file}'; use one of {', '.join(CONFIGS)} or a JSON file")


def init_weights(model: Transformer, seed: int):
    """GPT-2's initialization: N(0, 0.02) for matrices and embeddings, residual output projections scaled down by
    sqrt(2 n_layer) so the residual stream does not grow with depth; zero biases, unit norms."""
    gen = torch.Generator().manual_seed(seed)
    std = 0.02
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            scale = 1 / math.sqrt(2 * model.cfg.n_layer) if name.endswith(("wo.weight", "w_down.weight")) else 1.0
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std * scale)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
    model = Transformer(cfg)
    init_weights(model, seed)
    return model


def tokenizer_meta(tokenizer) -> dict:
    return {"bos": tokenizer.bos_token_id, "eos": list(tokenizer.eos_token_ids), "add_bos": bool(tokenizer.add_bos)}


def prepare_data(files: list[str], out: Path, vocab_size: int, tokenizer_from: str | None, main: bool,
                 progress: bool, redact: bool = False):
    """Tokenizer and token shards in `out`, made once (a resumed run reuses them). Only the main process writes;
    the others wait at a barrier and then read."""
    import torch.distributed as dist
    tok_path, bin_path = out / "tokenizer.json", out / "data" / "tokens.bin"
    if main and not bin_path.exists():
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            read_text(f)  # fail early on a missing, empty or non-UTF-8 file
        if tokenizer_from:
            from ..formats.load import load_checkpoint
            from ..registry import resolve
            tokenizer = load_checkpoint(resolve(tokenizer_from, progress=progress)).tokenizer
            tokenizer.tok.save(str(tok_path))
        else:
            tokenizer = train_bpe(files, vocab_size, tok_path, redact)
        eos = tokenizer.token_to_id(EOS_TEXT)
        if eos is None:
            eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        tokenize_to_shards(files, tokenizer, out / "data", eos, progress=progress, redact=redact)
        (out / "tokenizer_meta.json").write_text(json.dumps(tokenizer_meta(tokenizer)))
    if dist.is_initialized():
        dist.barrier()
    tokenizer = load_tokenizer_file(tok_path)
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    tokenizer.bos_token_id, tokenizer.eos_token_ids, tokenizer.add_bos = meta["bos"], meta["eos"], meta["add_bos"]
    return tokenizer, bin_path


def make_sampler(tokenizer, prompt_ids: list[int], max_tokens: int = 48):
    """A function model -> a sampled continuation of a fixed prompt (the same seed each time)."""
    from ..generate import SamplingParams, generate_ids

    def sample(model) -> str:
        was_training = model.training
        model.eval()
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=50, seed=0)
            out = generate_ids(model, [prompt_ids], params, tokenizer.eos_token_ids)[0]
        finally:
            model.train(was_training)
        return tokenizer.decode(prompt_ids) + " |> " + tokenizer.decode(out)
    return sample


def pretrain(config: str | ModelConfig, files: list[str], out: str | Path, train_cfg: TrainConfig,
             tokenizer_from: str | None = None, resume: bool = False, redact: bool = False) -> dict:
    if not files:
        raise MMChatError("give at least one text file with --data")
    cfg = resolve_config(config) if isinstance(config, str) else config
    out = Path(out)
    if train_cfg.seq_len > cfg.max_seq_len:
        raise MMChatError(f"--seq-len {train_cfg.seq_len} exceeds the model's context ({cfg.max_seq_len})")
    d = setup_distributed("cuda" if train_cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    # a shape that cannot fit is refused before the data is tokenized and the model built
    check_memory(cfg, cfg.n_params, cfg.n_params, train_cfg, resolve_device(train_cfg.device, d))
    tokenizer, bin_path = prepare_data(files, out, cfg.vocab_size, tokenizer_from, d.main, train_cfg.progress,
                                       redact)
    if tokenizer.vocab_size > cfg.vocab_size:
        if not tokenizer_from:
            raise MMChatError(f"the tokenizer has {tokenizer.vocab_size} ids, the config {cfg.vocab_size}")
        cfg.vocab_size = tokenizer.vocab_size  # a borrowed tokenizer sets the vocabulary
    cfg.eos_token_ids = list(tokenizer.eos_token_ids)
    cfg.bos_token_id = tokenizer.bos_token_id
    data = TokenShards(bin_path, train_cfg.seq_len, seed=train_cfg.seed)
    model = build_model(cfg, train_cfg.seed)
    meta = {"kind": "pretrain", "config": cfg.to_dict(), "tokenizer": tokenizer_meta(tokenizer),
            "chat_template": None, "n_tokens": data.n_tokens}
    prompt = [int(t) for t in data.ids[data.train_end: data.train_end + 8]]
    trainer = Trainer(model, data, train_cfg, out, meta, sample_fn=make_sampler(tokenizer, prompt), dist_info=d)
    if d.main:
        print(f"model: {cfg.name or 'custom'} ({cfg.n_params / 1e6:.2f}M parameters), data: {data.n_tokens:,} tokens, "
              f"unigram entropy {data.unigram_entropy():.3f} nats/token; "
              f"{'bf16 autocast' if trainer.bf16 else 'fp32'} on {trainer.device}"
              + (f", {d.world} processes" if d.world > 1 else ""))
    result = trainer.fit(resume=resume)
    result["unigram_entropy"] = data.unigram_entropy()
    return result
