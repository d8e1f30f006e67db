"""A path -> (config, tensors under our names, tokenizer, chat template)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import MMChatError
from ..tokenizer import Tokenizer
from . import gguf, hf


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    chat_template: str | None
    path: Path


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path).expanduser()
    if not path.exists():
        raise MMChatError(f"no such file or folder: {path}")
    if path.is_dir():
        cfg, tensors, template = hf.load_hf(path)
        tokenizer = Tokenizer.from_folder(path)
    else:
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise MMChatError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf file or a "
                              "HuggingFace model folder")
        cfg, tensors, tok_data, template = gguf.load_gguf(str(path))
        tokenizer = Tokenizer.from_gguf_data(tok_data)
    if not cfg.eos_token_ids:
        cfg.eos_token_ids = list(tokenizer.eos_token_ids)
    if cfg.bos_token_id is None:
        cfg.bos_token_id = tokenizer.bos_token_id
    check_tensors(cfg, tensors, path)
    return Checkpoint(cfg, tensors, tokenizer, template, path)


def check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], path: Path):
    """Every tensor the model needs is there with the right shape, so a bad file fails here with a clear line."""
    from ..model import empty_model
    expected = empty_model(cfg).state_dict()  # allocated, never touched: only the shapes are read
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise MMChatError(f"{path} lacks {len(missing)} tensors the model needs (first: {missing[0]}); "
                          "the file is incomplete or of another architecture")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise MMChatError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
