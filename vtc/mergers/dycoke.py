"""``dycoke``: DyCoke, "Dynamic Compression of Tokens for Fast Video Large Language Models" (Tao et al.,
CVPR 2025). Official code KD-TAO/DyCoke @ dd746349; the method page is ``docs/methods/dycoke.md``.

Stage 1, token temporal merging (TTM), before the LLM, on each frame's pooled, projected grid:

1. in pairs of frames ``(0, 1), (2, 3), ...`` the second frame keeps only its positions *least* similar
   (cosine, same position) to the first;
2. in groups of four frames ``(i .. i+3)``, frame ``i + 2`` keeps only its positions least similar to
   frame ``i`` (compared with the original frame ``i + 2``).

So in every group of four, frame 0 stays whole and frames 1-3 are thinned; the code prunes (nothing is
averaged, whatever the paper's wording). Kept tokens of a thinned frame come out in ascending-similarity
order, frames in time order, compact positions (all as in the code).

Stage 2 (``kv_prune``, off by default): at every decode step, the current token's head-mean attention over
the cached visual tokens at LLM layer ``kv_layer - 1`` decides which ``1 - kv_prune`` of them layers
``>= kv_layer`` attend to (text and generated tokens always stay); the cache itself is never truncated.
The selection is recomputed when the attention pattern changes (cosine with the previous step's below
``kv_gate``, and always at the first step) and reused otherwise: the paper's intent. The official code
instead lets layers ``>= kv_layer`` see the *full* cache on steps with a similar pattern; ``kv_reuse=False``
reproduces that.

Budget: ``budget`` is stage 1's keep fraction of the video's tokens. The official knob is the pruning rate
``K`` of the thinned frames (0.7 in the README: 47.5 % of the tokens kept); here the thinned frames share
whatever the budget leaves after the whole frames, so the count is exact. The whole frames are a floor:
a budget below ~25 % of the video (one whole frame in four) is refused with the minimum. Deviations:
the code skips the last 4-frame group (loop bound) and drops the last frame of an odd frame count; here
every group is processed and no frame is lost. Defaults: ``kv_layer = 3``, ``kv_prune = 0.7`` when enabled
(README; 0.8 in the eval harness), ``kv_gate = 0.9``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..budget import split_count
from ..config import MethodConfig, check_float, check_int
from ..contexts import DecodeTokens, ImageTokens, Reduction, Stage
from ..method import Method
from ..registry import register_method
from ._video import frame_grid


@dataclasses.dataclass
class DyCokeConfig(MethodConfig):
    """DyCoke options.

    Args:
        kv_prune: decode-time selection: the fraction of cached visual tokens layers ``>= kv_layer`` stop
            attending to at each step (official 0.7); None (default) turns stage 2 off.
        kv_layer: first LLM layer that attends to the selection; the selection reads layer ``kv_layer - 1`` (3).
        kv_gate: cosine between consecutive steps' attention below which the selection is recomputed (0.9).
        kv_reuse: reuse the last selection on steps with a similar pattern (paper); False lets those steps see
            the whole cache (official code).
    """

    kv_prune: float | None = None
    kv_layer: int = 3
    kv_gate: float = 0.9
    kv_reuse: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_prune is not None:
            check_float("kv_prune", self.kv_prune, 0.0, 1.0)
        check_int("kv_layer", self.kv_layer, minimum=1)
        check_float("kv_gate", self.kv_gate, -1.0, 1.0)
        if not isinstance(self.kv_reuse, bool):
            raise TypeError(f"kv_reuse must be a bool, got {self.kv_reuse!r}")


def ttm_plan(n_frames: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Which frames stay whole, and ``(frame, reference)`` for each thinned frame (stage 1's schedule)."""
    thinned: dict[int, int] = {}
    for i in range(0, n_frames - 1, 2):
        thinned[i + 1] = i
    for i in range(0, n_frames, 4):
        if i + 2 < n_frames:
            thinned[i + 2] = i
    whole = [t for t in range(n_frames) if t not in thinned]
    return whole, sorted(thinned.items())


@register_method("dycoke", config=DyCokeConfig, kind="merger", stages=(Stage.PRE_LLM, Stage.LLM_LAYER))
class DyCokeMerger(Method):
    """Temporal pruning of near-duplicate tokens in groups of frames; optional decode-time KV selection."""

    modalities = ("video",)
    default_newlines = "keep_rows"  # OneVision's video newline stays at the end

    def reduce(self, image: ImageTokens) -> Reduction:
        feats, index = frame_grid(image)  # [T, P, C], [T, P]
        n_frames, p = index.shape
        whole, thinned = ttm_plan(n_frames)
        floor = len(whole) * p
        if image.k < floor:
            raise ValueError(
                f"dycoke keeps {len(whole)} of {n_frames} frames whole: the budget must keep at least {floor} of "
                f"{image.n} tokens (budget >= {floor / image.n:.3f}); got k={image.k}"
            )
        counts = dict(zip([t for t, _ in thinned], split_count(image.k - floor, [p] * len(thinned)), strict=True))
        picks = []
        for t in range(n_frames):
            if t in counts:
                ref = dict(thinned)[t]
                sim = torch.nn.functional.cosine_similarity(feats[t].float(), feats[ref].float(), dim=-1, eps=1e-12)
                order = torch.sort(sim, stable=True).indices  # least similar first
                picks.append(index[t, order[: counts[t]]])
            else:
                picks.append(index[t])
        return Reduction.keep_ordered(torch.cat(picks))

    # -- stage 2 -------------------------------------------------------------------------------------
    def llm_decode_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.config.kv_prune is None:
            return ()
        if self.config.kv_layer >= num_layers:
            raise ValueError(f"dycoke kv_layer={self.config.kv_layer} must be below the LLM's {num_layers} layers")
        return (self.config.kv_layer,)

    def decode_select(self, tokens: DecodeTokens) -> list[torch.Tensor] | None:
        state = tokens.state
        previous = state.get("attention")
        state["attention"] = tokens.attention
        changed = previous is None or any(
            torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0) < self.config.kv_gate
            for a, b in zip(tokens.attention, previous, strict=True)
        )
        if not changed:
            return state.get("keep") if self.config.kv_reuse else None
        keep = []
        for rows, att in zip(tokens.visual, tokens.attention, strict=True):
            k = int(rows.numel() * (1 - self.config.kv_prune))
            keep.append(rows[torch.sort(torch.sort(att, descending=True, stable=True).indices[:k]).values])
        state["keep"] = keep
        return keep

    def visual_schedule(self, num_layers: int, n: int) -> list[int]:
        from ..budget import keep_count

        return [keep_count(self.config.budget, n)] * num_layers
