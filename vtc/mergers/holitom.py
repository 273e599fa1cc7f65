"""``holitom``: HoliTom, "Holistic Token Merging for Fast Video Large Language Models" (Shao et al.,
NeurIPS 2025, arXiv 2505.21334). Official code cokeshao/HoliTom @ e9b2972f; the method page is
``docs/methods/holitom.md``.

Outer stage (before the LLM), on each frame's pooled, projected ``P``-token grid:

1. **Global temporal segmentation.** ``static[t, p] = cos(F[t, p], F[t+1, p]) > tau``; the frames are split
   into contiguous windows by dynamic programming to maximise the tokens temporal merging removes
   (``gain(s, e) = #positions static through [s, e] * (e - s)``; ties keep the shorter window).
2. **Temporal merging.** In each window a static position becomes one token, the mean over the window's
   frames (the code's choice; the paper's figure says "first occurrence"), placed at the window's first
   frame; the other ("dynamic") tokens stay per frame.
3. **Spatial merging.** Static tokens of a window are clustered by DPC-kNN (``K = 7`` neighbours, capped
   by the cluster count) into centres, each ``beta * centre + (1 - beta) * mean(members)`` (``beta = 0.6``;
   the code's default, although its log says NO_BETA); each frame's dynamic tokens keep the most
   attended ones (mean attention received in the vision tower's feature layer, pooled like the tokens),
   with an optional DPC contextual share ``contextual`` (official default 0).
   Output per window: its static tokens (centre position order), then each frame's dynamic tokens in
   spatial order; OneVision's video newline follows the newline policy (kept at the end by default).

Inner stage (``inner=True``, inside the LLM at layer ``K``): the visual tokens most attended by the last
prompt token in layer ``K - 1`` (a fraction ``1 - inner_ratio`` of them) go on; each other one is merged
into its most cosine-similar kept token (hidden states entering layer ``K``) by the code's sequential
pairwise average (``h <- (h + h_j) / 2`` in index order, closed form ``2^-m h + sum 2^-(m-q+1) h_q``).

Positions, per stage as in the official code: the outer stage's output is renumbered (``"compact"``: the LLM
receives a new, shorter sequence); the inner merge keeps the kept rows' position ids (``"original"``: gaps
where rows were merged away, and decoding continues after the sequence the LLM received).

Budget: ``budget`` is the outer stage's keep fraction (the official ``RETAIN_RATIO``; ``budget_counts`` is
``"pre_llm"``): the inner stage halves the tokens of layers ``>= K`` on top, so ``budget=0.2`` leaves about 0.1
there, shown in the record's counts and equivalent budget. Defaults (official scripts):
``tau = 0.8`` (0.65 with ``budget=0.1``), ``beta = 0.6``, ``K_dpc = 7``, ``inner_ratio = 0.5``, inner layer 18 of 28
(scaled to the LLM's depth). Deviation, for vtc's exact budget: the official per-frame ceil / per-window
round counts overshoot ``rho * N`` slightly; here the ``k`` tokens are shared among the windows' static sets
and frames' dynamic sets in proportion to their sizes (largest remainder), and when temporal merging alone
would leave fewer than ``k`` tokens, the last windows' static positions stay dynamic instead.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import kernels
from ..budget import split_count
from ..config import MethodConfig, check_float, check_int
from ..contexts import ImageTokens, LayerTokens, LayerUpdate, Reduction, Stage, TowerInfo, VisionSignal
from ..method import Method
from ..registry import register_method
from ._video import beta_merge, dpc_knn, frame_grid, frame_scores

IMPORTANCE = VisionSignal("attention_received", "feature", heads="mean")


@dataclasses.dataclass
class HoliTomConfig(MethodConfig):
    """HoliTom options (defaults: the official scripts).

    Args:
        tau: cosine above which a position counts as static between consecutive frames (0.8).
        beta: weight of a cluster centre against its members' mean in spatial merging (0.6).
        contextual: share of each frame's dynamic tokens merged by DPC-kNN instead of dropped (0).
        k_dpc: neighbours of the DPC-kNN density (7, capped by the cluster count).
        max_window: longest temporal window the segmentation may form, in frames.
        inner: run the merge inside the LLM.
        inner_layer: its layer; None: 18 of 28 scaled to the LLM's depth.
        inner_ratio: fraction of the visual tokens merged away there (0.5).
    """

    tau: float = 0.8
    beta: float = 0.6
    contextual: float = 0.0
    k_dpc: int = 7
    max_window: int = 1024
    inner: bool = True
    inner_layer: int | None = None
    inner_ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("tau", self.tau)
        check_float("beta", self.beta, 0.0, 1.0)
        check_float("contextual", self.contextual, 0.0, 1.0)
        check_int("k_dpc", self.k_dpc, minimum=1)
        check_int("max_window", self.max_window, minimum=1)
        if not isinstance(self.inner, bool):
            raise TypeError(f"inner must be a bool, got {self.inner!r}")
        if self.inner_layer is not None:
            check_int("inner_layer", self.inner_layer, minimum=1)
        check_float("inner_ratio", self.inner_ratio, 0.0, 1.0)


def window_gain(static_pair: torch.Tensor) -> torch.Tensor:
    """``gain[s, e]`` for all windows (``e > s``): positions static through ``[s, e]`` times ``e - s``.

    Args:
        static_pair: ``[T-1, P]`` bool, ``static_pair[t, p]``: frames ``t`` and ``t+1`` agree at ``p``.
    """
    t = static_pair.shape[0] + 1
    gain = torch.zeros(t, t, dtype=torch.long)
    pairs = static_pair.cpu()
    for s in range(t - 1):
        through = torch.cumprod(pairs[s:].long(), dim=0)  # [T-1-s, P]: static from s through s+j+1
        counts = through.sum(dim=1)
        gain[s, s + 1 :] = counts * torch.arange(1, t - s)
    return gain


def segment(static_pair: torch.Tensor, max_window: int = 1024) -> tuple[list[tuple[int, int]], int]:
    """HoliTom's DP: windows ``(start, end)`` (inclusive) covering all frames, and the tokens they remove."""
    t = static_pair.shape[0] + 1
    gain = window_gain(static_pair)
    best = [0] * (t + 1)  # best[i + 1]: best total over frames 0..i
    start = [0] * t
    for i in range(t):
        value, begin = best[i], i  # frame i alone
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            v = best[j + 1] + int(gain[j + 1, i])
            if v > value:  # strict: ties keep the shorter window
                value, begin = v, j + 1
        best[i + 1], start[i] = value, begin
    windows, i = [], t - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], best[t]


def pairwise_average(dst: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """HoliTom's sequential merge ``h <- (h + m_q) / 2`` for ``q = 1..m``, closed form, fp32."""
    m = members.shape[0]
    if m == 0:
        return dst
    weights = 2.0 ** -(m - torch.arange(m, device=dst.device, dtype=torch.float32))  # 2^-(m-q+1), q = 1..m
    return (2.0**-m) * dst.float() + (weights[:, None] * members.float()).sum(dim=0)


@register_method("holitom", config=HoliTomConfig, kind="merger", stages=(Stage.VISION, Stage.PRE_LLM, Stage.LLM_LAYER))
class HoliTomMerger(Method):
    """Global temporal segmentation, temporal + spatial merging before the LLM, one merge inside it."""

    modalities = ("video",)
    default_newlines = "keep_rows"  # OneVision's video newline stays at the end, as in the official code
    default_positions = "compact"  # the outer stage's output is a new, renumbered sequence (official)
    default_llm_positions = "original"  # the inner merge keeps the kept rows' position ids (official)

    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        return (IMPORTANCE,)

    # -- outer stage ---------------------------------------------------------------------------------
    def reduce(self, image: ImageTokens) -> Reduction:
        c = self.config
        feats, index = frame_grid(image)  # [T, P, C], [T, P]
        n_frames, p = index.shape
        alpha = frame_scores(image, IMPORTANCE, index)
        if n_frames > 1:
            sim = torch.nn.functional.cosine_similarity(feats[:-1].float(), feats[1:].float(), dim=-1, eps=1e-12)
            static_pair = sim > c.tau
        else:
            static_pair = torch.zeros(0, p, dtype=torch.bool)
        windows, _ = segment(static_pair, c.max_window)
        statics = []
        for s, e in windows:
            if e > s:
                statics.append(torch.nonzero(static_pair[s:e].all(dim=0)).flatten())
            else:
                statics.append(torch.zeros(0, dtype=torch.long, device=index.device))
        # never merge below the budget: give the last windows' static positions back to their frames
        removed = [len(st) * (e - s) for st, (s, e) in zip(statics, windows, strict=True)]
        excess = sum(removed) - (n_frames * p - image.k)
        for w in reversed(range(len(windows))):
            if excess <= 0:
                break
            s, e = windows[w]
            drop = min(len(statics[w]), math.ceil(excess / max(e - s, 1)))
            statics[w] = statics[w][: len(statics[w]) - drop]
            excess -= drop * (e - s)
        # groups whose tokens share the budget: each window's static set, each frame's dynamic set
        dynamic, sizes = [], []
        for (s, e), st in zip(windows, statics, strict=True):
            is_static = torch.zeros(p, dtype=torch.bool, device=index.device)
            is_static[st] = True
            dyn = torch.nonzero(~is_static).flatten()
            dynamic.append(dyn)
            sizes += [len(st)] + [len(dyn)] * (e - s + 1)
        counts = iter(split_count(image.k, sizes))
        out_tokens, anchors = [], []
        groups = torch.full((image.n,), -1, dtype=torch.long, device=index.device)
        row = 0
        for (s, e), st, dyn in zip(windows, statics, dynamic, strict=True):
            n_static = next(counts)
            if n_static and len(st):
                merged = feats[s : e + 1, st].float().mean(dim=0).to(feats.dtype)  # [n_s, C] window means
                centres, assign, _ = dpc_knn(merged, n_static, min(c.k_dpc, n_static))
                out_tokens.append(beta_merge(merged, centres, assign, c.beta))
                anchors.append(index[s, st[centres]])
                groups[index[s : e + 1, st]] = (row + assign)[None].expand(e - s + 1, -1)
                row += n_static
            for t in range(s, e + 1):
                n_keep = next(counts)
                if not n_keep:
                    continue
                tokens, rows_used = self._dynamic(feats[t, dyn], alpha[t, dyn], n_keep)
                out_tokens.append(tokens)
                anchors.append(index[t, dyn[rows_used]])
                groups[index[t, dyn[rows_used]]] = torch.arange(row, row + n_keep, device=index.device)
                row += n_keep
        return Reduction(
            index=torch.cat(anchors),
            tokens=torch.cat(out_tokens),
            groups=groups,
            scores=image.token_signal(IMPORTANCE).float(),
        )

    def _dynamic(self, x: torch.Tensor, alpha: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame's dynamic tokens: top attention (dominant) plus optional DPC contextual tokens."""
        n_dom = round(n_keep * (1 - self.config.contextual))
        n_ctx = n_keep - n_dom
        dom = kernels.topk_sorted(alpha, n_dom)
        if not n_ctx:
            return x[dom], dom
        rest = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        rest[dom] = False
        rest = torch.nonzero(rest).flatten()
        centres, assign, _ = dpc_knn(x[rest], n_ctx, min(self.config.k_dpc, n_ctx))
        ctx = beta_merge(x[rest], centres, assign, self.config.beta)
        return torch.cat([x[dom], ctx]), torch.cat([dom, rest[centres]])

    # -- inner stage ---------------------------------------------------------------------------------
    def inner_layer(self, num_layers: int) -> int:
        layer = self.config.inner_layer or max(1, round(num_layers * 18 / 28))
        if layer >= num_layers:
            raise ValueError(f"holitom inner_layer={layer} must be below the LLM's {num_layers} layers")
        return layer

    def llm_prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.inner_layer(num_layers),) if self.config.inner else ()

    def llm_score_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.inner_layer(num_layers) - 1,) if self.config.inner else ()

    def prune(self, tokens: LayerTokens) -> LayerUpdate:
        scores = tokens.attention_to_visual("last", layer=tokens.layer - 1)
        kept = []
        for rows, s in zip(tokens.visual, scores, strict=True):
            k = round(rows.numel() * (1 - self.config.inner_ratio))
            kept.append(rows[kernels.topk_sorted(s, k)])
        return self.merge_into(tokens, kept)

    def merge_into(self, tokens: LayerTokens, kept: list[torch.Tensor]) -> LayerUpdate:
        """Merge every dropped visual row into its most similar kept row (sequential pairwise average)."""
        hidden = tokens.hidden.clone()
        for b, (rows, keep) in enumerate(zip(tokens.visual, kept, strict=True)):
            gone = rows[~torch.isin(rows, keep)]
            if not gone.numel() or not keep.numel():
                continue
            _, dst = kernels.cosine_argmax(hidden[b, gone], hidden[b, keep])
            for j, target in enumerate(keep.tolist()):
                members = gone[dst == j]  # ascending index order, as the official loop
                if members.numel():
                    hidden[b, target] = pairwise_average(hidden[b, target], hidden[b, members]).to(hidden.dtype)
        return LayerUpdate(kept=kept, hidden=hidden)

    def visual_schedule(self, num_layers: int, n: int) -> list[int]:
        from ..budget import keep_count

        k = keep_count(self.config.budget, n)
        if not self.config.inner:
            return [k] * num_layers
        layer = self.inner_layer(num_layers)
        return [k] * layer + [round(k * (1 - self.config.inner_ratio))] * (num_layers - layer)
