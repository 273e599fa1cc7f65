"""``vispruner``: VisPruner, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs" (Zhang et al., ICCV 2025, arXiv 2412.01818). Official code Theia-4869/VisPruner (``encode_images`` in
``llava/model/llava_arch.py``, the vision tower's ``feature_select``), read at its public snapshot.

Before the LLM, from the vision tower alone:

1. **important tokens**: the ``int(k * important_ratio)`` tokens with the largest CLS attention of the
   feature layer (the layer whose hidden states the projector reads), heads averaged;
2. **diverse tokens** from the rest, ordered by that attention (descending): repeatedly split them into the
   tokens at even and at odd places of the current order, score each even-place token by its largest cosine
   similarity to an odd-place one (pre-projector features of the feature layer), and drop the
   ``min(8, remaining - needed)`` highest-scoring (most duplicated) even-place tokens; the new order is the
   surviving even-place tokens by descending score, then all odd-place tokens. Stop when ``k -
   int(k * important_ratio)`` are left;
3. keep both sets, in raster order.

Defaults (official code): ``important_ratio = 0.5``, 8 duplicates dropped per round, the feature layer.
Towers without a CLS token (SigLIP, Qwen's ViT, InternViT after the pixel shuffle is not a CLS question): the
mean attention each token receives stands in for the CLS row, pooled to the LLM-token grid by the adapter, as
the authors recommend for Qwen (VisPruner issue #1). Deviations: an image with several partitions (LLaVA-NeXT
crops, video frames) is one pool of tokens under one ``k`` (the official code prunes each tile to the same
count); sorting is stable (ties keep the current order; the official ``argsort`` leaves them unspecified);
separator tokens are never candidates.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import MethodConfig, check_float, check_int
from ..contexts import ImageTokens, Reduction, Stage, TowerInfo, VisionSignal
from ..method import Method
from ..registry import register_method

#: cosine similarities held at once while finding each token's nearest duplicate
_CHUNK = 2**22


@dataclasses.dataclass
class VisPrunerConfig(MethodConfig):
    """VisPruner options.

    Args:
        important_ratio: share of ``k`` taken by the most attended tokens (official 0.5); the rest are the diverse
            tokens.
        drop_per_round: duplicates removed per de-duplication round (official 8).
    """

    important_ratio: float = 0.5
    drop_per_round: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("important_ratio", self.important_ratio, 0.0, 1.0)
        check_int("drop_per_round", self.drop_per_round, minimum=1)


def vispruner_select(
    attention: torch.Tensor, features: torch.Tensor, k: int, important_ratio: float = 0.5, per_round: int = 8
) -> torch.Tensor:
    """VisPruner's kept tokens (ascending indices) among ``n`` candidates.

    Args:
        attention: ``[n]`` the importance of each token (CLS attention, heads averaged).
        features: ``[n, C]`` the features whose cosine similarity finds duplicates.
        k: tokens to keep.
    """
    n = attention.shape[0]
    if k >= n:
        return torch.arange(n, device=attention.device)
    important = int(k * important_ratio)
    diverse = k - important
    order = torch.sort(attention.float(), descending=True, stable=True).indices
    keep, rest = order[:important], order[important:]
    normed = F.normalize(features.float(), dim=-1)
    while True:
        r = min(per_round, rest.numel() - diverse)
        if r <= 0:
            break
        even, odd = rest[0::2], rest[1::2]
        rows = max(1, _CHUNK // max(1, odd.numel()))  # similarities held at once: no n x n buffer
        scores = torch.cat(
            [(normed[even[i : i + rows]] @ normed[odd].T).max(dim=-1).values for i in range(0, even.numel(), rows)]
        )
        survivors = torch.sort(scores, descending=True, stable=True).indices[r:]
        rest = torch.cat([even[survivors], odd])
    return torch.cat([keep, rest]).sort().values


@register_method("vispruner", config=VisPrunerConfig, kind="pruner", stages=(Stage.VISION, Stage.PRE_LLM))
class VisPruner(Method):
    """Half the budget to the most CLS-attended tokens, half to tokens left after pairwise de-duplication."""

    def _signal(self, has_cls: bool) -> VisionSignal:
        return VisionSignal("cls_attention" if has_cls else "attention_received", "feature", heads="mean")

    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        return (self._signal(tower.has_cls),)

    def reduce(self, image: ImageTokens) -> Reduction:
        scores = image.token_signal(self._signal(image.tower.has_cls), fill=float("-inf"))
        candidates = torch.nonzero(image.layout.is_patch().to(scores.device)).flatten()
        features = image.vision_tokens if image.vision_tokens is not None else image.tokens
        k = min(image.k, candidates.numel())
        picked = vispruner_select(
            scores[candidates],
            features[candidates.to(features.device)],
            k,
            self.config.important_ratio,
            self.config.drop_per_round,
        )
        return Reduction.keep(candidates[picked.to(candidates.device)], scores=scores)
