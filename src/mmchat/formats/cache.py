"""Converted weights on disk: a model exactly as it runs (dequantized, fused, cast, maybe quantized) in one
safetensors file, plus a JSON sidecar with the config, tokenizer and chat template. Later loads memory-map it
instead of parsing and converting the source again, so they take a fraction of a second.

An entry is named after the source (path, size, modification time), the variant (dtype and quantization), the
cache format version, the torch version and the CPU's vector width (packed int4 layouts are torch's own and
differ between AVX2 and AVX-512 builds of its kernels). Both files are written
atomically (temporary file, fsync, rename); the sidecar goes last, so an entry without it is incomplete and
ignored.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

CACHE_VERSION = 6


def entry_stem(root: Path, source: Path, variant: str) -> Path:
    source = Path(source).resolve()
    stat = source.stat()
    if source.is_dir():  # a HuggingFace folder: its newest file stands for it
        stat = max((p.stat() for p in source.iterdir() if p.is_file()), key=lambda s: s.st_mtime_ns, default=stat)
    ident = f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{variant}|{CACHE_VERSION}|{torch.__version__}|" \
        f"{torch.backends.cpu.get_cpu_capability()}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return Path(root) / f"{source.stem}-{variant}-{digest}"


def load(root: Path, source: Path, variant: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(metadata, tensors memory-mapped from the file), or None when there is no complete entry."""
    from safetensors.torch import load_file
    stem = entry_stem(root, source, variant)
    meta_path, weights = _with(stem, ".json"), _with(stem, ".safetensors")
    if not (meta_path.exists() and weights.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        return meta, load_file(str(weights))
    except (OSError, ValueError):  # damaged: convert again and overwrite
        return None


def save(root: Path, source: Path, variant: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    from safetensors.torch import save_file
    stem = entry_stem(root, source, variant)
    stem.parent.mkdir(parents=True, exist_ok=True)
    _atomic(_with(stem, ".safetensors"), lambda f: save_file(tensors, f))
    _atomic(_with(stem, ".json"), lambda f: Path(f).write_text(json.dumps(meta)))
    return _with(stem, ".safetensors")


def _with(stem: Path, suffix: str) -> Path:
    return stem.parent / (stem.name + suffix)  # not with_suffix: model names have dots (x.Q4_1)


def _atomic(path: Path, write):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
