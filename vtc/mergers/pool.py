"""``pool``: average-pool each partition grid down to the budget (the "downsampling" baseline).

VTC-Bench (arXiv 2510.07143) finds plain downsampling beats many pruning methods, so it is always reported.
The grid is covered by exactly ``k`` near-square cells (:func:`vtc.grids.band_cells`); each cell becomes the mean
of its tokens. By default the mean is taken over the *pre-projector* vision features and then projected
(``space="vision"``: like feeding a lower-resolution feature map, as LLaVA-OneVision's pooling does
before its LLM); ``space="llm"`` averages the projected tokens instead. A pooled token takes the position
of the token at its cell's centre.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..config import MethodConfig, check_choice
from ..contexts import ImageTokens, Reduction, Stage
from ..grids import grid_regions
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class PoolConfig(MethodConfig):
    """Pooling options.

    Args:
        space: ``"vision"`` averages the pre-projector features and projects the means (like a
            lower-resolution feature map); ``"llm"`` averages the projected tokens.
    """

    space: str = "vision"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("space", self.space, ("vision", "llm"))


@register_method("pool", config=PoolConfig, kind="baseline", stages=(Stage.PRE_LLM,))
class PoolMerger(Method):
    """Average-pool the token grid to exactly k tokens."""

    def reduce(self, image: ImageTokens) -> Reduction:
        regions = grid_regions(image.layout, image.k)
        device = image.tokens.device
        groups = torch.full((image.n,), -1, dtype=torch.long, device=device)
        for row, (_, members) in enumerate(regions):
            groups[members.to(device)] = row
        use_vision = self.config.space == "vision"
        if use_vision and (image.vision_tokens is None or image.project is None):
            raise ValueError(
                "pool(space='vision') needs pre-projector features, which this model family does not "
                "expose; use space='llm'"
            )
        source = image.vision_tokens if use_vision else image.tokens
        ones = torch.ones(image.n, device=device)
        pooled, _ = kernels.weighted_merge(source, ones, groups, num_groups=len(regions))
        tokens = image.project(pooled) if use_vision else pooled
        anchors = torch.tensor([a for a, _ in regions], dtype=torch.long, device=device)
        return Reduction(index=anchors, tokens=tokens, groups=groups)
