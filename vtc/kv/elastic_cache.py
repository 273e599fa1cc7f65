"""Elastic Cache: importance-driven cache merging after the prefill, fixed-point elimination while decoding.

Paper: Liu et al., "Efficient Inference of Vision Instruction-Following Models with Elastic Cache", ECCV 2024,
arXiv 2407.18121. Official code: github.com/liuzuyan/ElasticCache @ 3138e03, ``kv_cache.py`` (``ElasticCache``),
called after every forward of ``cache_generate.py`` with ``num_of_token`` (the rows processed so far) and the
eager attention maps; options from ``eval_generate.py`` (``--ratio 0.2``, ``--start-size 1``; ``distance=-25``
and ``protect_size=1`` are fixed in the class).

What it computes, per layer (one set of positions for all heads of a layer), per sample:

1. importance: the head-mean attention every prompt row received, summed over all prompt queries;
2. after the prefill the cache keeps ``k`` of its ``L`` rows: the first ``start_size`` rows, the last row
   (``protect_size = 1``) and the most important of the rows in between; every evicted row is merged into the
   **nearest kept row by position** among those in between (``scatter_reduce(..., "mean")``, keys and values);
3. while decoding, whenever the cache holds more than the budget of the rows seen so far (prompt plus generated:
   the official ``forget_num = int(seq_len - num_of_token * (1 - ratio))``), one entry is dropped at a fixed
   index, ``distance`` rows before the end of the cache the prefill left (``seq_len - forget_num + distance``), so
   the cache keeps ``kv_budget`` of everything it has seen.

Defaults: ``kv_budget=0.8`` (official ``ratio=0.2`` evicted), ``start_size=1``, ``distance=-25``, ``merge=True``.

Deviations (docs/methods/elastic_cache.md): the official selection is ``torch.where(torch.argsort(score) >
forget_num)`` (it reads positions in the sorted order as row indices, and its evicted rows are not offset by
``start_size``); here the rows kept are the most important ones, as the paper describes, and the evicted ones are
all the others; counts follow :mod:`vtc.budget` (``k = floor(kv_budget * L + 0.5)``; the official arithmetic keeps
one row fewer); the fixed index is clamped into the cache (after ``start_size``) when the cache the prefill left
is shorter than ``-distance``; importance is recomputed in fp32 from the layer's own queries and keys (the official
code asks for the eager attention maps); a batch is compressed per sample over its real rows (the official code
runs one sample at a time).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import check_int
from . import KVCompressor, KVConfig, register_kv


@dataclasses.dataclass
class ElasticCacheConfig(KVConfig):
    """Elastic Cache options.

    Args:
        kv_budget: fraction of the rows seen (prompt, then prompt plus generated) the cache keeps (official
            ``1 - ratio`` = 0.8).
        start_size: leading rows always kept (official ``--start-size`` default 1).
        distance: where decode steps evict, relative to the end of the cache the prefill left (official -25); a
            positive value is an absolute index.
        merge: merge every evicted row into its nearest kept row (official); False drops it.
    """

    kv_budget: float = 0.8
    start_size: int = 1
    distance: int = -25
    merge: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("start_size", self.start_size, 0)
        check_int("distance", self.distance)
        if not isinstance(self.merge, bool):
            raise TypeError(f"merge must be a bool, got {self.merge!r}")


@register_kv("elastic_cache", config=ElasticCacheConfig)
class ElasticCache(KVCompressor):
    """Elastic Cache (ECCV'24): importance-driven cache merging, then fixed-point elimination while decoding."""

    scores = "mean"

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(kept rows, evicted rows, start)`` of a prompt of ``L`` rows; kept rows in order."""
        length = scores.shape[-1]
        k = self.keep(length)
        start = min(self.config.start_size, k - 1)
        between = torch.arange(start, length - 1, device=scores.device)
        chosen = scores[start : length - 1].topk(k - start - 1).indices.sort().values + start
        evicted = between[~torch.isin(between, chosen)]
        sinks = torch.arange(start, device=scores.device)
        last = torch.tensor([length - 1], device=scores.device)
        return torch.cat([sinks, chosen, last]), evicted, start

    def fixed_point(self, kept: int, start: int) -> int:
        at = self.config.distance if self.config.distance > 0 else kept + self.config.distance
        return max(min(at, kept - 1), min(start, kept - 1))

    def prefill(self, keys, values, scores, visual) -> tuple[torch.Tensor, torch.Tensor, Any]:
        length = keys.shape[1]
        if self.keep(length) >= length:
            return keys, values, self.fixed_point(length, min(self.config.start_size, length - 1))
        kept, evicted, start = self.select(scores)
        anchors = kept[start:-1]  # merge targets: the important rows kept between the sinks and the last row
        if self.config.merge and evicted.numel() and anchors.numel():
            nearest = anchors[(anchors[None, :] - evicted[:, None]).abs().argmin(dim=1)]
            index = nearest.view(1, -1, 1).expand(keys.shape[0], -1, keys.shape[-1])
            keys = keys.float().scatter_reduce(1, index, keys[:, evicted].float(), "mean").to(keys.dtype)
            values = values.float().scatter_reduce(1, index, values[:, evicted].float(), "mean").to(values.dtype)
        return keys[:, kept], values[:, kept], self.fixed_point(kept.numel(), start)

    def evict(self, state: Any, seen: int, length: int) -> int | None:
        return min(state, length - 1) if length > self.keep(seen) else None
