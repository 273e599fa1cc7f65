"""Frozen vision features of every easy-VQA image, computed once through the checkpoint and cached."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from PIL import Image

from vtc.offline.build import BUILD_VERSION, IMAGE_SIZE, cache_root
from vtc.offline.easyvqa import data_dir


def _image_ids(split: str) -> list[int]:
    folder = os.path.join(data_dir(), split, "images")
    return sorted(int(f[:-4]) for f in os.listdir(folder) if f.endswith(".png"))


@torch.no_grad()
def image_features(model, processor, paths: list[str], batch: int = 50) -> torch.Tensor:
    """What the checkpoint's projector receives for each image: ``[N, 64, 384]`` (fp32)."""
    cfg = model.config
    out = []
    for s in range(0, len(paths), batch):
        images = [Image.open(p).convert("RGB") for p in paths[s : s + batch]]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        out.append(hidden[:, 1:] if cfg.vision_feature_select_strategy == "default" else hidden)
    return torch.cat(out)


def cached_features(model, processor, log: Callable[[str], None] = print) -> dict:
    """``{"train": [4000, 64, 384], "train_ids": [...], "test": [1000, 64, 384], "test_ids": [...]}``."""
    path = cache_root() / f"easyvqa-features-v{BUILD_VERSION}-{IMAGE_SIZE}px.pt"
    if path.is_file():
        log(f"features: loading {path}")
        return torch.load(path)
    result: dict = {}
    for split in ("train", "test"):
        ids = _image_ids(split)
        start = time.perf_counter()
        paths = [os.path.join(data_dir(), split, "images", f"{i}.png") for i in ids]
        result[split] = image_features(model, processor, paths)
        result[f"{split}_ids"] = ids
        log(f"features: {split} {tuple(result[split].shape)} in {time.perf_counter() - start:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(result, tmp)
    os.replace(tmp, path)
    return result
