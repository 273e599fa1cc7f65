"""``hired``: HiRED, "High-Resolution Early Dropping" (Arif et al., AAAI 2025, arXiv 2408.10945).
Spec: PRUNERS.md §3.1; official code hasanar1f/HiRED @ 502d6dd.

Selection: inside each partition, keep the tokens with the highest CLS attention of the *final* vision
layer (the feature layer, block 22 of CLIP ViT-L/14-336), heads summed, computed from the block's own
q/k under SDPA. With several partitions (LLaVA-NeXT) the budget is first split between the full image
and the crops using CLS attention of the *early* layer (block 0); that allocation arrives with the
LLaVA-NeXT adapter, and single-partition images (LLaVA-1.5) use the top-k form.

Defaults (official scripts): ``alpha = 0.5`` (full-image share), early layer 0, final layer = feature
layer, heads summed; ``token_budget_rate`` is vtc's ``budget`` (official default 0.2). Kept tokens keep
raster order with compact positions and no newline tokens, as in the official packing.
"""

from __future__ import annotations

import dataclasses

from .. import kernels
from ..config import MethodConfig, check_float, check_int
from ..hooks import ImageTokens, Reduction, Stage, TowerInfo, VisionSignal
from ..registry import Method, register_method


@dataclasses.dataclass
class HiREDConfig(MethodConfig):
    alpha: float = 0.5
    early_layer: int = 0
    final_layer: int | str = "feature"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("alpha", self.alpha, 0.0, 1.0)
        check_int("early_layer", self.early_layer)
        if self.final_layer != "feature":
            check_int("final_layer", self.final_layer)


@register_method("hired", config=HiREDConfig, kind="pruner", stages=(Stage.VISION, Stage.PRE_LLM))
class HiREDPruner(Method):
    """Per-partition top-k by final-layer ViT CLS attention; partitions share the budget by early-layer attention."""

    def _final(self, has_cls: bool) -> VisionSignal:
        # CLS-free towers (SigLIP, Qwen ViT): attention received stands in for the CLS row (spec §3.1).
        kind = "cls_attention" if has_cls else "attention_received"
        return VisionSignal(kind, self.config.final_layer, heads="sum")

    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        return (self._final(tower.has_cls),)

    def reduce(self, image: ImageTokens) -> Reduction:
        if image.layout.num_partitions != 1:
            raise ValueError("hired: multi-partition budget allocation needs the llava_next adapter")
        final = self._final(image.layout.prefix > 0)
        scores = image.token_signal(final, fill=float("-inf"))
        scores = scores.masked_fill(~image.layout.is_patch().to(scores.device), float("-inf"))
        return Reduction.keep(kernels.topk_sorted(scores, image.k), scores=scores)
