"""``divprune``: DivPrune, "Diversity-based Visual Token Pruning for Large Multimodal Models"
(Alvar et al., CVPR 2025, arXiv 2503.02175). The method page is ``docs/methods/divprune.md``.

Keeps the max-min diverse subset of the projected visual tokens: cosine distance ``1 - cos`` in fp32,
first pick the token whose nearest neighbour is farthest, then repeatedly the token farthest from the
chosen set (``vtc.kernels.greedy_maxmin``). Kept tokens go back in ascending order with compact
positions (official code: selection before LLM layer 0, contiguous positions).

Defaults and deviations, against the official code (vbdi/divprune @ 799e2d9):
* ``budget`` replaces ``SUBSET_RATIO`` (official default 0.098, i.e. 56 of 576); vtc's default 0.2.
* Chosen tokens are masked so none repeats (the official loop can re-pick a token of a near-duplicate
  image, duplicating embeddings).
* The official image start index (35) is hard-coded; here the adapter finds each image's span.
* Selection is per image (the official code is global over the one image of a LLaVA-1.5 prompt).
"""

from __future__ import annotations

import dataclasses

from .. import kernels
from ..config import MethodConfig
from ..contexts import ImageTokens, Reduction, Stage
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class DivPruneConfig(MethodConfig):
    """DivPrune options: only the shared ones (``budget``, ``positions``, ``newlines``; see :class:`MethodConfig`).
    DivPrune has no knob of its own: the subset size is the budget.
    """

    pass


@register_method("divprune", config=DivPruneConfig, kind="pruner", stages=(Stage.PRE_LLM,))
class DivPrunePruner(Method):
    """Greedy max-min cosine diversity over the projected visual tokens."""

    default_newlines = "candidates"  # the official code selects over the whole packed image sequence

    def reduce(self, image: ImageTokens) -> Reduction:
        chosen = kernels.greedy_maxmin(image.tokens, image.k)
        return Reduction.keep(chosen)
