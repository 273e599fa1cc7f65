"""``scope``: SCOPE, "Saliency-Coverage Oriented Token Pruning for Efficient Multimodal LLMs" (Deng et al.,
NeurIPS 2025, arXiv 2510.24214). Official code kinredon/SCOPE @ 6bf7306 (``SCOPE`` and
``CLIPVisionTower_SCOPE.forward`` in ``scope/clip_encoder.py``; ``run_scope_llava.sh``).

Before the LLM, a greedy facility-location pass weighted by saliency. With ``s(i, j)`` the cosine similarity of
the tokens' pre-projector features (the feature layer's hidden states) and ``cover[j]`` the best similarity of
token ``j`` to the tokens chosen so far (0 at the start):

    gain(u) = sum_j max(0, s(j, u) - cover[j]) * saliency(u) ** alpha

``k`` times: choose the unchosen ``u`` with the largest gain, then ``cover = max(cover, s(u, .))``. Saliency is
the feature layer's CLS attention to each token, **summed over heads** (official); towers without a CLS token
use the attention each token receives (pooled to the LLM-token grid by the adapter). Kept tokens in raster
order, compact positions.

Defaults (official script): ``alpha = 1`` (``ALPHA=1.0``), multiplicative combination (``COMBINED=multi``; the
additive variant is ``combine="add"``), the feature layer (LLaVA: the penultimate layer). Deviations: an image
with several partitions is one pool under one ``k`` (the official LLaVA-NeXT path splits ``k`` evenly over
tiles); separator tokens are never candidates. Like the official code this builds the ``n x n`` similarity
once (``O(n^2)`` memory; at LLaVA-1.5's 576 tokens, 1.3 MB).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import MethodConfig, check_choice, check_float
from ..contexts import ImageTokens, Reduction, Stage, TowerInfo, VisionSignal
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class SCOPEConfig(MethodConfig):
    """SCOPE options.

    Args:
        alpha: exponent of the saliency (official ``ALPHA``, 1.0).
        combine: ``"multi"`` gain times saliency (official default), ``"add"`` gain plus saliency.
    """

    alpha: float = 1.0
    combine: str = "multi"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("alpha", self.alpha, 0.0)
        check_choice("combine", self.combine, ("multi", "add"))


def scope_select(
    features: torch.Tensor, saliency: torch.Tensor, k: int, alpha: float = 1.0, combine: str = "multi"
) -> torch.Tensor:
    """SCOPE's picks (indices, in pick order) among the ``n`` rows of ``features [n, C]``."""
    n = features.shape[0]
    x = F.normalize(features.float(), dim=-1)
    sim = x @ x.T  # [j, u]
    weight = saliency.float().clamp_min(0) ** alpha
    cover = torch.zeros(n, device=x.device)
    chosen = torch.zeros(n, dtype=torch.bool, device=x.device)
    picks = torch.empty(k, dtype=torch.long, device=x.device)
    for i in range(k):
        gains = (sim.masked_fill(chosen[None, :], 0) - cover[:, None]).clamp_min(0).sum(dim=0)
        gains = gains * weight if combine == "multi" else gains + weight
        gains = gains.masked_fill(chosen, float("-inf"))
        u = int(torch.argmax(gains))
        picks[i] = u
        chosen[u] = True
        cover = torch.maximum(cover, sim[u])
    return picks


@register_method("scope", config=SCOPEConfig, kind="pruner", stages=(Stage.VISION, Stage.PRE_LLM))
class SCOPEPruner(Method):
    """Greedy coverage of the image's tokens, each candidate's gain weighted by its CLS attention."""

    def _signal(self, has_cls: bool) -> VisionSignal:
        return VisionSignal("cls_attention" if has_cls else "attention_received", "feature", heads="sum")

    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        return (self._signal(tower.has_cls),)

    def reduce(self, image: ImageTokens) -> Reduction:
        scores = image.token_signal(self._signal(image.tower.has_cls), fill=float("-inf"))
        candidates = torch.nonzero(image.layout.is_patch().to(scores.device)).flatten()
        features = image.vision_tokens if image.vision_tokens is not None else image.tokens
        k = min(image.k, candidates.numel())
        picks = scope_select(
            features[candidates.to(features.device)],
            scores[candidates].to(features.device),
            k,
            self.config.alpha,
            self.config.combine,
        )
        return Reduction.keep(candidates[picks.to(candidates.device)], scores=scores)
