"""``fopru``: FoPru, "Focal Pruning for Efficient Large Vision-Language Models" (arXiv 2411.14164).
Confidence is low: no official code was found and the paper's method section could not be read, so this is a
reconstruction from the abstract and secondary summaries (``docs/methods/fopru.md`` gives the reasoning).

What is implemented, and why:
* Significance of each visual token from the ViT feature layer's attention map (block 22 for LLaVA-1.5),
  head-mean. ``significance="received"`` (default): the mean over all queries, CLS included, of the
  attention each token receives (``s_j = mean_h mean_i A_h[i, j]``): the "token significance from the
  whole attention map" that the summaries describe, and the only variant that also works on CLS-free
  towers. ``significance="cls"``: the CLS row only. Both are computed from the block's own q/k in query
  chunks (no eager attention, no n x n buffer).
* ``strategy="rank"`` (default): global top-k. ``strategy="row"``: keep the ``floor(k / cols)`` grid rows
  with the largest mean significance, plus the ``k mod cols`` most significant tokens of the next-best row
  (the remainder rule is an assumption; rows cannot go below one row's worth of tokens otherwise).
* Kept tokens are restored to raster order (the paper's "reordering" step); compact positions.
* With several partitions each gets its share of ``k`` (proportional to its size) and its own map.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..config import MethodConfig, check_choice
from ..contexts import ImageTokens, Reduction, Stage, TowerInfo, VisionSignal
from ..grids import per_partition_counts
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class FoPruConfig(MethodConfig):
    """FoPru options.

    Args:
        strategy: ``"rank"`` keeps the global top-k tokens; ``"row"`` keeps whole grid rows by mean significance
            (plus the best tokens of the next row for the remainder).
        significance: ``"received"`` the attention each token receives, averaged over all queries (works
            without CLS); ``"cls"`` the CLS row only.
        layer: vision block whose attention is read; ``"feature"`` is the block the projector reads.
    """

    strategy: str = "rank"
    significance: str = "received"
    layer: int | str = "feature"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("strategy", self.strategy, ("rank", "row"))
        check_choice("significance", self.significance, ("received", "cls"))


def row_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """FoPru's row strategy on a ``[rows, cols]`` score grid: flat indices of ``k`` cells, ascending."""
    rows, cols = scores.shape
    full = k // cols
    order = torch.sort(scores.float().mean(dim=1), descending=True, stable=True).indices
    picked = [torch.arange(r * cols, (r + 1) * cols) for r in order[:full].tolist()]
    rem = k - full * cols
    if rem:
        r = int(order[full])
        picked.append(r * cols + kernels.topk_sorted(scores[r], rem).cpu())
    return torch.sort(torch.cat(picked) if picked else torch.empty(0, dtype=torch.long)).values


@register_method("fopru", config=FoPruConfig, kind="pruner", stages=(Stage.VISION, Stage.PRE_LLM))
class FoPruPruner(Method):
    """Rank or row pruning by ViT attention significance, then raster reordering."""

    def _signal(self) -> VisionSignal:
        kind = "attention_received" if self.config.significance == "received" else "cls_attention"
        return VisionSignal(kind, self.config.layer, heads="mean")

    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        if self.config.significance == "cls" and not tower.has_cls:
            raise ValueError("fopru(significance='cls') needs a vision tower with a CLS token; use 'received'")
        return (self._signal(),)

    def reduce(self, image: ImageTokens) -> Reduction:
        layout = image.layout
        scores = image.token_signal(self._signal(), fill=float("-inf"))
        scores = scores.masked_fill(~layout.is_patch().to(scores.device), float("-inf"))
        kept = []
        for p, kp in enumerate(per_partition_counts(layout, image.k)):
            if kp == 0:
                continue
            rows, cols = layout.grids[p]
            cell_tokens = layout.partition_tokens(p).to(scores.device)  # [rows * cols]
            present = cell_tokens >= 0
            grid = torch.full((rows * cols,), float("-inf"), device=scores.device)
            grid[present] = scores[cell_tokens[present]]
            if self.config.strategy == "rank":
                cells = kernels.topk_sorted(grid, kp)
            else:
                cells = row_select(grid.view(rows, cols), kp).to(scores.device)
            kept.append(cell_tokens[cells])
        return Reduction.keep(torch.cat(kept), scores=scores)
