"""``random_kv``: the control of the KV stage, random eviction of the prompt's visual entries after the prefill.

Not a method from a paper: the baseline that tells whether a KV compressor's scores and merging do better than
chance under the same budget and the same structure. It keeps exactly what LOOK-M keeps by position and kind, but
chooses the visual rows at random:

1. a recent window of ``recent = int(L * kv_budget * recent_share)`` rows is kept (LOOK-M's window);
2. ``k - recent`` more from the rows before it: with ``text_prior`` every text row first (as LOOK-M ranks them),
   then visual rows in a random order; without it, rows in a random order;
3. evicted entries are dropped (no merging).

The random order is drawn from a generator seeded by ``(seed, L)``, so every layer and head of a sample drops the
same rows (one random choice of tokens, not independent noise per layer), and a rerun is identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import check_float, check_int
from . import KVCompressor, KVConfig, register_kv


@dataclasses.dataclass
class RandomKVConfig(KVConfig):
    """Random KV eviction options.

    Args:
        kv_budget: fraction of each layer's prompt KV entries kept.
        recent_share: share of the kept entries that are the most recent rows (0.5: LOOK-M's default).
        text_prior: keep text rows before any visual row (as LOOK-M); False: any row may be dropped.
        seed: seed of the random order (with the prompt's length).
    """

    kv_budget: float = 0.2
    recent_share: float = 0.5
    text_prior: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("recent_share", self.recent_share, 0.0, 1.0)
        check_int("seed", self.seed, 0)
        if not isinstance(self.text_prior, bool):
            raise TypeError(f"text_prior must be a bool, got {self.text_prior!r}")


@register_kv("random_kv", config=RandomKVConfig)
class RandomKV(KVCompressor):
    """Random eviction of visual KV entries under LOOK-M's structure (recent window, text first), no merging."""

    scores = "mean"

    def select(self, visual: torch.Tensor) -> torch.Tensor:
        """``[L]`` bool: the rows every head of every layer keeps (exactly ``keep(L)``)."""
        length = int(visual.shape[0])
        k = self.keep(length)
        recent = min(int(length * self.config.kv_budget * self.config.recent_share), k)
        head = length - recent
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + length)
        rank = torch.rand(head, generator=gen).to(visual.device)
        if self.config.text_prior:
            rank = torch.where(visual[:head], rank, rank + 2.0)  # text rows rank above every visual row
        kept = torch.zeros(length, dtype=torch.bool, device=visual.device)
        kept[head:] = True
        if k - recent > 0:
            kept[rank.topk(k - recent).indices] = True
        return kept

    def prefill(self, keys, values, scores, visual) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if self.keep(keys.shape[1]) >= keys.shape[1]:
            return keys, values, None
        rows = self.select(visual).nonzero().flatten()
        return keys[:, rows], values[:, rows], None
