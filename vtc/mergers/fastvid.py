"""``fastvid``: FastVID, "Dynamic Density Pruning for Fast Video Large Language Models" (Shen et al.,
NeurIPS 2025). Official code LunarShen/FastVID @ a40a109c; the method page is ``docs/methods/fastvid.md``.

1. **DySeg**: frames are cut into temporally coherent segments: a cut after frame ``t`` when the cosine of
   consecutive frames' global features ``c_t`` is among the ``segments - 1`` smallest or below ``tau``.
2. **ATS**: every frame keeps its ``n_s`` most salient tokens unchanged.
3. **DTM**: in each segment, *anchor frames* (the last frame and every ``p``-th frame counting back from it)
   pick their highest DPC-kNN density-peak scores among non-salient tokens (``k = 4``) as anchors; all
   non-salient tokens of the segment's frames join the most cosine-similar anchor of each anchor frame
   (single-frame segment: that frame's own anchors), and an anchor becomes ``w * a + (1 - w) * mean(joined,
   anchor included)``, ``w = max(1 / (n + 1), beta)`` (``= beta`` whenever anything joined, for beta >= .5).
4. Everything is put back in original token order with **original positions** (preserve mode).

Budget and defaults: ``budget`` is the fraction of the video's tokens kept (official ``rho = 0.10``): each
frame's share ``n`` is split into ``n_s = n - int(n * d)`` salient tokens and ``n - n_s`` contextual slots that
move to the anchor frames of its segment (``d = 0.4``, ``p = 4``, ``segments = 8``, ``tau = 0.9``,
``beta = 0.6``). The frame shares come from ``vtc.budget.split_count`` so the total is exactly ``k``. When a
long segment's contextual slots outnumber its anchor frames' non-salient tokens (16 frames of 16 tokens at
budget 0.5: 12 slots for one anchor frame's 11), the rest go to the segment's other frames, nearest to an
anchor frame first (:func:`anchor_plan`); the official code would keep fewer than ``k`` tokens there.

Signals (documented deviation): the official LLaVA-OneVision code uses SigLIP's attention-pooling head
(probe attention for salience, its output for the global feature), which Hugging Face's OneVision tower
does not have; this uses what the official Qwen2.5-VL port uses: the attention each token receives in the
tower's feature layer (pooled like the tokens) and the mean of the frame's tokens. A token that joins
anchors of several anchor frames is recorded in the group of the last of them.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..budget import split_count
from ..config import MethodConfig, check_float, check_int
from ..contexts import ImageTokens, Reduction, Stage, TowerInfo, VisionSignal
from ..method import Method
from ..registry import register_method
from ._video import dpc_knn, frame_grid, frame_scores

SALIENCE = VisionSignal("attention_received", "feature", heads="mean")


@dataclasses.dataclass
class FastVIDConfig(MethodConfig):
    """FastVID options (defaults: the official code).

    Args:
        segments: at most this many temporal segments (8).
        tau: a cut is also made where consecutive frames' cosine falls below it (0.9).
        contextual: ``d``, the share of each frame's tokens that become contextual slots (0.4).
        anchor_step: ``p``, every ``p``-th frame counting back from a segment's last is an anchor frame (4).
        beta: weight of an anchor against the mean of the tokens that joined it (0.6).
        k_dpc: neighbours of the density-peak score (4).
    """

    segments: int = 8
    tau: float = 0.9
    contextual: float = 0.4
    anchor_step: int = 4
    beta: float = 0.6
    k_dpc: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("segments", self.segments, minimum=1)
        check_float("tau", self.tau)
        check_float("contextual", self.contextual, 0.0, 1.0)
        check_int("anchor_step", self.anchor_step, minimum=1)
        check_float("beta", self.beta, 0.0, 1.0)
        check_int("k_dpc", self.k_dpc, minimum=1)


def dyseg(global_feats: torch.Tensor, segments: int, tau: float) -> list[tuple[int, int]]:
    """Segments ``(start, end)`` inclusive from per-frame global features ``[T, C]`` (DySeg)."""
    t = global_feats.shape[0]
    if t == 1:
        return [(0, 0)]
    c = torch.nn.functional.cosine_similarity(global_feats[:-1].float(), global_feats[1:].float(), dim=-1, eps=1e-12)
    cut = c < tau
    n_low = min(segments - 1, t - 1)
    if n_low > 0:
        cut[torch.sort(c, stable=True).indices[:n_low]] = True
    out, start = [], 0
    for i in range(t - 1):
        if bool(cut[i]):
            out.append((start, i))
            start = i + 1
    out.append((start, t - 1))
    return out


def anchor_frames(start: int, end: int, step: int) -> list[int]:
    """The segment's last frame and every ``step``-th frame counting back from it, ascending."""
    return sorted(range(end, start - 1, -step))


def anchor_plan(frames: list[int], segment: tuple[int, int], need: int, room: dict[int, int]) -> list[tuple[int, int]]:
    """``(frame, anchors)`` pairs giving a segment's ``need`` contextual slots: shared evenly over its anchor
    frames (largest remainder, earlier frames first), never more than a frame's non-salient tokens (``room``).

    What the anchor frames cannot hold goes to the anchor frames with room left, then to the segment's other
    frames, nearest to an anchor frame first (vtc's exact budget; the official code would keep fewer tokens).
    """
    counts = dict.fromkeys(frames, 0)
    for frame, n in zip(frames, split_count(need, [1] * len(frames)), strict=True):
        counts[frame] = min(n, room[frame])
    left = need - sum(counts.values())
    while left > 0 and any(counts[f] < room[f] for f in frames):
        for f in frames:
            if left and counts[f] < room[f]:
                counts[f] += 1
                left -= 1
    others = [t for t in range(segment[0], segment[1] + 1) if t not in counts]
    for t in sorted(others, key=lambda t: (min(abs(t - f) for f in frames), -t)):
        if left <= 0:
            break
        counts[t] = min(left, room[t])
        left -= counts[t]
    return sorted(counts.items())


@register_method("fastvid", config=FastVIDConfig, kind="merger", stages=(Stage.VISION, Stage.PRE_LLM))
class FastVIDMerger(Method):
    """Dynamic segmentation, salient tokens per frame, density-peak anchors absorbing the rest."""

    modalities = ("video",)
    default_positions = "original"
    default_newlines = "keep_rows"

    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        return (SALIENCE,)

    def reduce(self, image: ImageTokens) -> Reduction:
        c = self.config
        feats, index = frame_grid(image)  # [T, P, C], [T, P]
        n_frames, p = index.shape
        alpha = frame_scores(image, SALIENCE, index)
        shares = split_count(image.k, [p] * n_frames)
        salient = [n - int(n * c.contextual) for n in shares]
        target = torch.full((image.n,), -1, dtype=torch.long, device=index.device)  # token -> the token it joined
        keep_index, keep_tokens = [], []
        non_salient = []
        for t in range(n_frames):
            top = kernels.topk_sorted(alpha[t], salient[t])
            keep_index.append(index[t, top])
            keep_tokens.append(feats[t, top])
            rest = torch.ones(p, dtype=torch.bool, device=index.device)
            rest[top] = False
            non_salient.append(torch.nonzero(rest).flatten())
        for s, e in dyseg(feats.float().mean(dim=1), c.segments, c.tau):
            need = sum(shares[t] - salient[t] for t in range(s, e + 1))
            room = {t: int(non_salient[t].numel()) for t in range(s, e + 1)}
            plan = anchor_plan(anchor_frames(s, e, c.anchor_step), (s, e), need, room)
            pool_x = torch.cat([feats[t, non_salient[t]] for t in range(s, e + 1)])  # the segment's rest
            pool_i = torch.cat([index[t, non_salient[t]] for t in range(s, e + 1)])
            for frame, n_anchor in plan:
                cand = non_salient[frame]
                if not n_anchor:
                    continue
                _, _, gamma = dpc_knn(feats[frame, cand], 1, c.k_dpc)
                anchors = cand[kernels.topk_sorted(gamma, n_anchor)]
                a = feats[frame, anchors]
                _, best = kernels.cosine_argmax(pool_x, a)  # every rest token of the segment picks an anchor
                ones = torch.ones(len(pool_x), device=pool_x.device)
                mean, count = kernels.weighted_merge(pool_x, ones, best, num_groups=n_anchor)
                # the anchor is itself among the joined tokens, so its own copy is part of the mean
                w = torch.clamp(1.0 / (count + 1), min=c.beta)
                merged = w[:, None] * a.float() + (1 - w[:, None]) * mean.float()
                merged = torch.where((count > 0)[:, None], merged, a.float())
                keep_index.append(index[frame, anchors])
                keep_tokens.append(merged.to(feats.dtype))
                target[pool_i] = index[frame, anchors][best]
        index_all = torch.cat(keep_index)
        tokens_all = torch.cat(keep_tokens)
        order = torch.sort(index_all).indices  # back to original token order
        index_all, tokens_all = index_all[order], tokens_all[order]
        row = torch.full((image.n,), -1, dtype=torch.long, device=index.device)
        row[index_all] = torch.arange(index_all.numel(), device=index.device)
        target[index_all] = index_all  # kept tokens stand for themselves
        groups = torch.where(target >= 0, row[target.clamp_min(0)], target)
        return Reduction(
            index=index_all, tokens=tokens_all, groups=groups, scores=image.token_signal(SALIENCE).float()
        )
