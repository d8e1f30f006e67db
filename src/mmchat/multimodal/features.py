"""The frozen encoder's feature grids of the generated scenes, computed once and cached (training reads them
many times; the encoder is the slow part on a small CPU)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..registry import home
from . import scenes, vision


def cache_path(split: str, n: int) -> Path:
    return home() / "vision" / f"scenes-{split}-{n}-{vision.FEATURES}.pt"


def scene_features(split: str, n: int, progress: bool = True, batch_size: int = 32) -> torch.Tensor:
    """(n, 1283, 7, 7) float16 grids (vision.features: the encoder's channels and each cell's colour) of scenes
    0..n-1 of a split, from the cache or computed (and cached)."""
    path = cache_path(split, n)
    if path.exists():
        return torch.load(path, weights_only=True)
    from tqdm import tqdm
    enc = vision.load_encoder().to(memory_format=torch.channels_last)  # faster depthwise convolutions on CPU
    out = torch.empty(n, vision.FEATURES, vision.GRID, vision.GRID, dtype=torch.float16)
    with torch.inference_mode(), tqdm(total=n, desc=f"encoding {split} scenes", unit="image",
                                      disable=not progress, file=sys.stderr) as bar:
        for i in range(0, n, batch_size):
            idx = range(i, min(n, i + batch_size))
            x = vision.preprocess([scenes.draw(scenes.make_scene(split, k)) for k in idx])  # (b, 3, 224, 224)
            grid, _ = vision.features(enc, x.contiguous(memory_format=torch.channels_last))  # (b, 1283, 7, 7)
            out[i: i + len(idx)] = grid.to(torch.float16)
            bar.update(len(idx))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out
