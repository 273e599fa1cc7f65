"""``evs``: Efficient Video Sampling, the video token pruning that vLLM ships (``vllm/multimodal/evs.py``,
``compute_retention_mask``; also in SGLang), from NVIDIA's "Efficient Video Sampling" (arXiv 2510.14624).

Before the LLM, on the projected frame tokens (what the LLM receives): each token of frame ``t >= 1`` scores
``1 - cos(x[t, p], x[t - 1, p])``, its dissimilarity to the token at the same grid position of the previous
frame; every token of frame 0 scores 255 (kept first). The ``k`` highest-scoring tokens are kept (stable
descending sort, so ties keep raster order), in their original order.

How the counting relates to a server's setting: vLLM's pruning rate ``q`` keeps
``max(tokens_per_frame, int(n * (1 - q)))`` tokens; vtc keeps exactly ``k`` from ``budget`` (:mod:`vtc.budget`),
so ``budget = 1 - q`` reproduces a server's count up to its flooring and its one-frame floor. Below one frame's
worth, vtc keeps the first ``k`` tokens of frame 0 (raster order) instead of the whole frame. Separator tokens
(OneVision's video newline) are not candidates and follow the newline policy.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..config import MethodConfig
from ..contexts import ImageTokens, Reduction, Stage
from ..mergers._video import frame_grid
from ..method import Method
from ..registry import register_method

FIRST_FRAME = 255.0  # vLLM's score for every token of the first frame


@dataclasses.dataclass
class EVSConfig(MethodConfig):
    """EVS options: ``budget`` only (the server's pruning rate ``q`` is ``1 - budget``)."""


def evs_scores(frames: torch.Tensor) -> torch.Tensor:
    """``[T, P]`` EVS scores of frame tokens ``[T, P, D]``: 255 for frame 0, else 1 - cosine to the previous frame."""
    scores = torch.full(frames.shape[:2], FIRST_FRAME, device=frames.device)
    if frames.shape[0] > 1:
        sim = F.cosine_similarity(frames[1:].float(), frames[:-1].float(), dim=-1)
        scores[1:] = 1 - sim
    return scores


@register_method("evs", config=EVSConfig, kind="pruner", stages=(Stage.PRE_LLM,))
class EVSPruner(Method):
    """Keep the video tokens that changed most since the same position of the previous frame."""

    modalities = ("video",)
    default_newlines = "keep_rows"  # OneVision's video newline stays at the end

    def reduce(self, image: ImageTokens) -> Reduction:
        frames, index = frame_grid(image)  # [T, P, D], [T, P]
        scores = evs_scores(frames).flatten()
        order = torch.sort(scores, descending=True, stable=True).indices[: image.k]
        per_token = torch.full((image.n,), float("nan"), device=scores.device)
        per_token[index.flatten()] = scores
        return Reduction.keep(index.flatten()[order], scores=per_token)
