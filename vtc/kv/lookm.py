"""LOOK-M: text-prior KV-cache eviction with merging, once after the prefill.

Paper: Wan et al., "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context Inference",
EMNLP 2024 Findings, arXiv 2406.18139. Official code: github.com/SUSTechBruce/LOOK-M @ ecf0f51,
``LLaVA-mix_merge_v1/llava/model/kv_token_merge/modify_llama.py`` (``TextPivotMerge_LayerWise``, the
``text_prior_pivot_merge`` mode its README and ``scripts/text-prior-pivot-merge_eval.sh`` run;
``TextAVGMergeKVCache_LayerWise``, ``TextWeightedMerge_LayerWise`` and the ``*_LayerWise`` variants without the
text prior).

What it computes, per layer and per KV head, once after the prefill of a prompt of ``L`` rows (the official code
calls its cache object only when ``q_len != 1``: decode steps append without evicting):

1. scores: H2O's accumulated attention, the attention every row received summed over all prompt queries;
2. a recent window of ``recent = int(L * kv_budget * recent_share)`` rows is kept, and ``hh = k - recent`` more
   from the rows before it, highest key first, where with ``text_prior`` every text row ranks above every visual
   row (the official code adds -65516 to the image rows' scores); without it the first 4 rows are pinned
   (``select_hh_scores[:, 0:4] = inf``);
3. every evicted entry is merged into the kept entry of the same head whose key is most cosine-similar:
   ``"pivot"`` (official default): ``kept <- mean(kept, (evicted + kept) / 2 ...)``; ``"avg"``:
   ``kept <- mean(kept, evicted ...)``; ``"weighted"``: ``kept <- mean(kept, sim * evicted ...)``; the last two
   merge only the evicted entries whose head-mean best similarity is at least the mean of all (the official
   ``filter_indices``); ``"none"`` evicts without merging. Values follow the keys' targets.

Defaults: ``kv_budget=0.2`` and ``recent_share=0.5`` are the official ``hh_ratio = recent_ratio = 0.1``;
``merge="pivot"``, ``text_prior=True``.

Deviations (docs/methods/lookm.md): the count is capped at the budget's ``k`` (the official mask keeps every text
row outside the window, so with more text than ``hh`` the official cache holds more than ``hh + recent``: here
the top ``hh`` text rows by score are kept); grouped KV heads (one cached head serves several query heads) sum
the scores of their query heads (the official LLaVA-1.5 code has one query head per KV head); scores and merges
are computed in fp32 from the layer's own queries and keys (the official code uses the eager fp16 attention
weights); the ``"avg"`` merge pairs each filtered evicted entry with its own target (the official
``TextAVGMergeKVCache_LayerWise`` passes the unfiltered entries as ``src`` next to the filtered indices, which
pairs them by position); cosine similarity uses an epsilon; image rows are the rows the adapter marks visual (the
official code assumes 576 rows per image placeholder); a batch is compressed per sample, over its real rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ..config import check_choice, check_float
from . import KVCompressor, KVConfig, register_kv

MERGES = ("pivot", "avg", "weighted", "none")


@dataclasses.dataclass
class LookMConfig(KVConfig):
    """LOOK-M options.

    Args:
        kv_budget: fraction of each layer's prompt KV entries kept (official ``hh_ratio + recent_ratio``).
        recent_share: share of the kept entries that are the most recent rows (official ``recent_ratio /
            (hh_ratio + recent_ratio)`` = 0.5).
        merge: ``"pivot"`` (official default), ``"avg"``, ``"weighted"`` or ``"none"`` (H2O-style eviction).
        text_prior: rank every text row above every visual row (LOOK-M); False: plain accumulated attention with
            the first 4 rows pinned (the official non-text variants).
    """

    kv_budget: float = 0.2
    recent_share: float = 0.5
    merge: str = "pivot"
    text_prior: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("recent_share", self.recent_share, 0.0, 1.0)
        check_choice("merge", self.merge, MERGES)
        if not isinstance(self.text_prior, bool):
            raise TypeError(f"text_prior must be a bool, got {self.text_prior!r}")


def _rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [H, L, d]`` gathered at ``idx [H, n]`` per head."""
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


@register_kv("lookm", config=LookMConfig)
class LookM(KVCompressor):
    """LOOK-M (EMNLP'24 Findings): text-prior eviction of the prompt's KV cache, evicted entries merged."""

    scores = "heads"

    def select(self, scores: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """``[H, L]`` bool: the entries each head keeps (exactly ``keep(L)`` per head)."""
        heads, length = scores.shape
        k = self.keep(length)
        recent = min(int(length * self.config.kv_budget * self.config.recent_share), k)
        head = length - recent
        kept = torch.zeros(heads, length, dtype=torch.bool, device=scores.device)
        kept[:, head:] = True
        rank = scores[:, :head].clone()
        if self.config.text_prior:
            rank = torch.where(visual[None, :head], rank - (rank.abs().max() + 1), rank)
        else:
            rank[:, :4] = float("inf")
        if k - recent > 0:
            kept.scatter_(1, rank.topk(k - recent, dim=-1).indices, True)
        return kept

    def prefill(self, keys, values, scores, visual) -> tuple[torch.Tensor, torch.Tensor, Any]:
        heads, length, _ = keys.shape
        if self.keep(length) >= length:
            return keys, values, None
        kept = self.select(scores, visual)
        keep_idx = kept.nonzero()[:, 1].view(heads, -1)  # row order per head
        drop_idx = (~kept).nonzero()[:, 1].view(heads, -1)
        k_keep, v_keep = _rows(keys, keep_idx).float(), _rows(values, keep_idx).float()
        merge = self.config.merge
        if merge != "none" and drop_idx.shape[1]:
            k_drop, v_drop = _rows(keys, drop_idx).float(), _rows(values, drop_idx).float()
            sim = F.normalize(k_drop, dim=-1) @ F.normalize(k_keep, dim=-1).transpose(-1, -2)  # [H, n_drop, k]
            best, target = sim.max(dim=-1)
            if merge == "pivot":
                k_src = (k_drop + _rows(k_keep, target)) / 2
                v_src = (v_drop + _rows(v_keep, target)) / 2
            else:
                chosen = best.mean(0) >= best.mean()  # the i-th evicted entry of every head, as the official code
                target, best = target[:, chosen], best[:, chosen]
                k_src, v_src = k_drop[:, chosen], v_drop[:, chosen]
                if merge == "weighted":
                    k_src, v_src = best[..., None] * k_src, best[..., None] * v_src
            index = target[..., None].expand(-1, -1, keys.shape[-1])
            k_keep = k_keep.scatter_reduce(1, index, k_src, reduce="mean", include_self=True)
            v_keep = v_keep.scatter_reduce(1, index, v_src, reduce="mean", include_self=True)
        return k_keep.to(keys.dtype), v_keep.to(values.dtype), None
