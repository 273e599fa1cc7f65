"""``uniform``: an evenly spaced 2-D subsample of each partition grid (spatial-coverage baseline).

The grid is covered by exactly ``k`` near-square cells (horizontal bands of near-equal cells, see
:func:`vtc.grids.band_cells`) and the token at the centre of each cell is kept. With several partitions the
budget is shared in proportion to their sizes.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import MethodConfig
from ..contexts import ImageTokens, Reduction, Stage
from ..grids import grid_regions
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class UniformConfig(MethodConfig):
    """Uniform-grid options: only the shared ones (``budget``, ``positions``, ``newlines``; see
    :class:`MethodConfig`). The grid cells follow from the budget alone.
    """

    pass


@register_method("uniform", config=UniformConfig, kind="baseline", stages=(Stage.PRE_LLM,))
class UniformPruner(Method):
    """Evenly spaced grid subsample: one token at the centre of each of k grid cells."""

    def reduce(self, image: ImageTokens) -> Reduction:
        anchors = [anchor for anchor, _ in grid_regions(image.layout, image.k)]
        return Reduction.keep(torch.tensor(anchors, dtype=torch.long, device=image.tokens.device))
