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
tiles); separator tokens are never candidates. The official code builds the ``n x n`` similarity once; here
the greedy is lazy (the same picks, ``O(n)`` memory, a first pass over similarity rows in chunks).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import MethodConfig, check_choice, check_float
from ..contexts import ImageTokens, Reduction, Stage, TowerInfo, VisionSignal
from ..method import Method
from ..registry import register_method

#: similarities held at once in the first pass over all candidates
_CHUNK = 2**22


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
    """SCOPE's picks (indices, in pick order) among the ``n`` rows of ``features [n, C]``.

    The same picks as the official loop over the full ``n x n`` similarity, with ``O(n)`` memory: coverage gains
    only fall as tokens are chosen (the objective is submodular and the saliency factor fixed), so stale gains
    are upper bounds and only the leading candidate's gain is recomputed (lazy greedy) until it stays ahead.
    Ties go to the lowest index, as ``argmax`` over the exact gains would.
    """
    n = features.shape[0]
    x = F.normalize(features.float(), dim=-1)
    weight = saliency.float().clamp_min(0).to(x.device) ** alpha
    cover = torch.zeros(n, device=x.device)

    def gain(us: torch.Tensor) -> torch.Tensor:  # [m] candidates -> [m] saliency-weighted coverage gains
        g = (x[us] @ x.T - cover[None]).clamp_min(0).sum(dim=1)
        return g * weight[us] if combine == "multi" else g + weight[us]

    rows = max(1, _CHUNK // max(n, 1))
    bound = torch.cat([gain(torch.arange(s, min(n, s + rows), device=x.device)) for s in range(0, n, rows)])
    picks = torch.empty(k, dtype=torch.long, device=x.device)
    for i in range(k):
        u = int(torch.argmax(bound))
        while True:  # recompute the leader until it leads with its exact gain (bounds never under-estimate)
            bound[u] = gain(torch.tensor([u], device=x.device))[0]
            leader = int(torch.argmax(bound))
            if leader == u:
                break
            u = leader
        picks[i] = u
        bound[u] = float("-inf")
        cover = torch.maximum(cover, x @ x[u])
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
