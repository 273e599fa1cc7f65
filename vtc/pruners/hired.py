"""``hired``: HiRED, "High-Resolution Early Dropping" (Arif et al., AAAI 2025, arXiv 2408.10945).
Official code hasanar1f/HiRED @ 502d6dd; the method page is ``docs/methods/hired.md``.

Selection: inside each partition, keep the tokens with the highest CLS attention of the *final* vision
layer (the feature layer, block 22 of CLIP ViT-L/14-336), heads summed, computed from the block's own
q/k under SDPA. With several partitions (LLaVA-NeXT) the budget is first split between the full image
and the crops using CLS attention of the *early* layer (block 0) (``hired_allocation``); single-partition
images (LLaVA-1.5) use the top-k form.

Defaults (official scripts): ``alpha = 0.5`` (full-image share), early layer 0, final layer = feature
layer, heads summed; ``token_budget_rate`` is vtc's ``budget`` (official default 0.2). Kept tokens keep
raster order with compact positions and no newline tokens, as in the official packing.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import kernels
from ..budget import split_count
from ..config import MethodConfig, check_choice, check_float, check_int
from ..contexts import ImageTokens, Reduction, Stage, TowerInfo, VisionSignal
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class HiREDConfig(MethodConfig):
    """HiRED options.

    Args:
        alpha: share of the budget the full image (partition 0) gets before the crops share the rest
            (official default 0.5). Images with one partition ignore it.
        early_layer: vision block whose CLS attention splits the budget between the crops (official: 0).
        final_layer: vision block whose CLS attention ranks the tokens inside a partition; ``"feature"`` is
            the block the projector reads (official).
        region_mapping: which full-image cells count for which crop when splitting the budget: ``"code"``
            the official code's raster chunks, ``"spatial"`` the paper's spatial regions.
    """

    alpha: float = 0.5
    early_layer: int = 0
    final_layer: int | str = "feature"
    region_mapping: str = "code"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("alpha", self.alpha, 0.0, 1.0)
        check_choice("region_mapping", self.region_mapping, ("code", "spatial"))
        check_int("early_layer", self.early_layer)
        if self.final_layer != "feature":
            check_int("final_layer", self.final_layer)


def hired_allocation(
    k: int,
    alpha: float,
    early_base: torch.Tensor,
    base_grid: tuple[int, int],
    arrangement: tuple[int, int],
    base_cap: int,
    crop_caps: list[int],
    mapping: str = "code",
) -> list[int]:
    """HiRED's split of ``k`` tokens between the full image (partition 0) and its crops (1..P-1).

    As in the official code, the full image gets ``B_0 = min(floor(alpha k), n)``; the rest is shared
    among the crops in proportion to how many of the full image's ``floor(n (1 - alpha))`` most attended
    tokens (early layer) fall in each crop's region, ``B_i = floor(c_i / sum(c) * B_sub)``. Regions follow the
    official chunking of the raster (``mapping="code"``: chunk ``c`` is raster indices ``[c n/(P-1), (c+1) n/(P-1))``)
    or the paper's spatial intent (``"spatial"``: cell ``(y, x)`` belongs to crop ``(y g_h // rows, x g_w // cols)``).
    One deviation, for vtc's exact budget: what flooring and unpadding leave over (the official code just
    loses it) goes to the crops with room by largest fractional remainder, then to the full image, so the
    allocations sum to ``min(k, base_cap + sum(crop_caps))``.

    Args:
        early_base: ``[rows * cols]`` early-layer CLS attention of the full image's cells.
        base_cap, crop_caps: tokens of each partition that reach the LLM (after unpadding).

    Returns:
        ``[B_0, B_1, ..., B_{P-1}]``.
    """
    rows, cols = base_grid
    g_h, g_w = arrangement
    crops = g_h * g_w
    n = rows * cols
    b0 = min(math.floor(alpha * k), base_cap)
    b_sub = min(k - b0, sum(crop_caps))
    b0 = min(base_cap, k - b_sub)  # anything the crops cannot take goes back to the full image
    salient = kernels.topk_sorted(early_base.float(), math.floor(n * (1 - alpha)))
    if mapping == "code":
        region = salient * crops // n
    else:
        y, x = salient // cols, salient % cols
        region = (y * g_h // rows) * g_w + x * g_w // cols
    counts = torch.bincount(region.cpu(), minlength=crops).tolist()
    weights = counts if sum(counts) else crop_caps
    quotas = [b_sub * w / sum(weights) if sum(weights) else 0.0 for w in weights]
    alloc = [min(math.floor(q), cap) for q, cap in zip(quotas, crop_caps, strict=True)]
    order = sorted(range(crops), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    left = b_sub - sum(alloc)
    while left > 0:
        room = [i for i in order if alloc[i] < crop_caps[i]]
        for i in room[:left]:
            alloc[i] += 1
        left = b_sub - sum(alloc)
    return [b0, *alloc]


@register_method("hired", config=HiREDConfig, kind="pruner", stages=(Stage.VISION, Stage.PRE_LLM))
class HiREDPruner(Method):
    """Per-partition top-k by final-layer ViT CLS attention; partitions share the budget by early-layer attention."""

    def _signal(self, has_cls: bool, layer: int | str) -> VisionSignal:
        # CLS-free towers (SigLIP, Qwen ViT): attention received stands in for the CLS row (docs/methods/hired.md).
        kind = "cls_attention" if has_cls else "attention_received"
        return VisionSignal(kind, layer, heads="sum")

    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        if not tower.crops:  # the early layer only splits the budget between a full view and its crops
            return (self._signal(tower.has_cls, self.config.final_layer),)
        return (
            self._signal(tower.has_cls, self.config.final_layer),
            self._signal(tower.has_cls, self.config.early_layer),
        )

    def reduce(self, image: ImageTokens) -> Reduction:
        layout = image.layout
        has_cls = image.tower.has_cls
        scores = image.token_signal(self._signal(has_cls, self.config.final_layer), fill=float("-inf"))
        scores = scores.masked_fill(~layout.is_patch().to(scores.device), float("-inf"))
        tokens = [layout.partition_tokens(p).to(scores.device) for p in range(layout.num_partitions)]
        tokens = [t[t >= 0] for t in tokens]
        if layout.num_partitions == 1:
            budgets = [image.k]
        elif layout.arrangement is not None:
            early = image.signal(self._signal(has_cls, self.config.early_layer))[0, layout.prefix :]
            budgets = hired_allocation(
                image.k,
                self.config.alpha,
                early,
                layout.grids[0],
                layout.arrangement,
                base_cap=len(tokens[0]),
                crop_caps=[len(t) for t in tokens[1:]],
                mapping=self.config.region_mapping,
            )
        else:  # partitions with no full-image/crop structure (video frames): in proportion to size
            budgets = split_count(image.k, [len(t) for t in tokens])
        kept = [t[kernels.topk_sorted(scores[t], b)] for t, b in zip(tokens, budgets, strict=True) if b]
        return Reduction.keep(torch.cat(kept), scores=scores)
