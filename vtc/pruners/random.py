"""``random``: keep a seeded random subset of the visual tokens (the field's sanity baseline).

UniPruneBench (arXiv 2511.02650) finds random pruning a strong baseline, so every benchmark runs it. The subset
depends only on ``seed`` and the image's token count, never on the batch, so a batch gives the same
selection as each image alone; vary ``seed`` to average over draws.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig, check_int
from ..contexts import ImageTokens, Reduction, Stage
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class RandomConfig(MethodConfig):
    """Random-subset options.

    Args:
        seed: the draw; the subset depends only on it and the image's token count.
    """

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("seed", self.seed, minimum=0)


@register_method("random", config=RandomConfig, kind="baseline", stages=(Stage.PRE_LLM,))
class RandomPruner(Method):
    """Seeded uniformly random subset of the visual tokens."""

    def reduce(self, image: ImageTokens) -> Reduction:
        gen = torch.Generator().manual_seed(self.config.seed)
        keep = torch.randperm(image.n, generator=gen)[: image.k]
        return Reduction.keep(keep.to(image.tokens.device))
