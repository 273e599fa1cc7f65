"""``vidcom2``: VidCom2, "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large Language
Models" (Liu et al., EMNLP 2025, arXiv 2505.14454); vLLM ships it beside EVS. Official code xuyang-liu16/VidCom2
(``token_compressor/vidcom2/vidcom2.py``, ``vidcom2_compression``).

Before the LLM, on the projected frame tokens:

1. keep the half of the channels with the **lowest variance** over all the video's tokens
   (``select_low_var_channels``) and L2-normalise each token on them;
2. score every token by a multi-scale Gaussian similarity, ``sum_a exp(-||x - c||^2 / (2a))`` over
   ``a = 1/8, 1/4, 1/2, 1, 2``, to the **video centre** (the mean of all tokens) and, separately, to its
   **frame centre**;
3. **frame budgets**: a frame's distinctiveness is minus its mean video score; ``p = softmax((s - max s) /
   0.01)`` over frames, and frame ``t`` keeps a share proportional to ``1 + p_t - mean(p)`` (capped at the
   whole frame);
4. in each frame keep its tokens with the **lowest** video + frame score (the most distinct), in raster order.

Deviation, for the exact ``k``: the official code keeps ``round(base * (1 + p_t - mean p) * tokens_per_frame)``
per frame (at least one), whose sum is only about ``base * n``; here ``k`` is split over the frames in
proportion to the same weights by largest remainder (at least one token per frame while ``k`` allows, never
more than a frame holds). Defaults: the official ``base_scale`` is vtc's ``budget`` (official 0.25), channel
ratio 0.5, temperature 0.01. Separator tokens (OneVision's video newline) are not candidates.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..budget import split_count
from ..config import MethodConfig
from ..contexts import ImageTokens, Reduction, Stage
from ..mergers._video import frame_grid
from ..method import Method
from ..registry import register_method

ALPHAS = (0.125, 0.25, 0.5, 1.0, 2.0)
TEMPERATURE = 0.01
CHANNEL_RATIO = 0.5


@dataclasses.dataclass
class VidCom2Config(MethodConfig):
    """VidCom2 options: ``budget`` only (the official ``base_scale``)."""


def gaussian_scores(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(video, frame)`` scores ``[T, P]`` of frame tokens ``[T, P, D]``: low-variance channels, normalised,
    multi-scale Gaussian similarity to the video centre and to each frame's centre."""
    t, p, d = frames.shape
    flat = frames.reshape(t * p, d).float()
    channels = torch.topk(flat.var(dim=0, unbiased=False), int(d * CHANNEL_RATIO), largest=False).indices
    x = F.normalize(flat[:, channels].reshape(t, p, -1), dim=-1)

    def gauss(centre: torch.Tensor) -> torch.Tensor:
        d2 = ((x - centre) ** 2).sum(dim=-1)
        return sum(torch.exp(-d2 / (2 * a)) for a in ALPHAS)

    return gauss(x.mean(dim=(0, 1), keepdim=True)), gauss(x.mean(dim=1, keepdim=True))


def frame_weights(video_score: torch.Tensor) -> torch.Tensor:
    """``[T]`` the official per-frame retention weights ``1 + p - mean(p)``, ``p`` the tempered softmax of the
    frames' distinctiveness (minus their mean video score)."""
    s = -video_score.mean(dim=-1)
    p = torch.softmax((s - s.max()) / TEMPERATURE, dim=0)
    return 1 + p - p.mean()


def frame_counts(weights: torch.Tensor, k: int, per_frame: int) -> list[int]:
    """``k`` split over frames in proportion to ``weights``: at least one each while ``k`` allows, at most a frame."""
    t = weights.numel()
    floor = 1 if k >= t else 0
    counts = [floor] * t
    left = k - floor * t
    w = weights.tolist()
    while left > 0:
        room = [i for i in range(t) if counts[i] < per_frame]
        extra = split_count(left, [w[i] for i in room])
        for i, e in zip(room, extra, strict=True):
            counts[i] += min(e, per_frame - counts[i])
        left = k - sum(counts)
    return counts


@register_method("vidcom2", config=VidCom2Config, kind="pruner", stages=(Stage.PRE_LLM,))
class VidCom2Pruner(Method):
    """Per-frame budgets from frame distinctiveness; the most distinct tokens of each frame."""

    modalities = ("video",)
    default_newlines = "keep_rows"  # OneVision's video newline stays at the end

    def reduce(self, image: ImageTokens) -> Reduction:
        frames, index = frame_grid(image)  # [T, P, D], [T, P]
        video, frame = gaussian_scores(frames)
        counts = frame_counts(frame_weights(video), image.k, index.shape[1])
        combined = video + frame
        picks = []
        for t, c in enumerate(counts):
            order = torch.sort(combined[t], stable=True).indices[:c]  # lowest: most distinct
            picks.append(index[t, order.sort().values])
        per_token = torch.full((image.n,), float("nan"), device=combined.device)
        per_token[index.flatten()] = combined.flatten()
        return Reduction.keep(torch.cat(picks), scores=per_token)
