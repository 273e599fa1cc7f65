"""``transprune``: TransPrune, "Token Transition Pruning for Efficient Large Vision-Language Model" (Li et al.,
CVPR 2026, arXiv 2507.20630). Official code liaolea/TransPrune @ f4cb73b (``llava/model/
modeling_llama_transprune.py``: ``compute_transf_weight``, ``transprune_forward``, ``transprune_rank_drop``);
the method page is ``docs/methods/transprune.md``.

Two signals rank the image tokens inside the LLM, neither needing an attention map of the whole layer:

* **token transition variation (TTV)**: for the attention and the MLP sub-block of every observed layer, with
  ``x`` the sub-block's normed input and ``y`` its output (before the residual), each token gets
  ``(|y| / |x|) * softmax_tokens(1 - cos(x, y))`` (the softmax over all of the sample's tokens at that
  layer); the two sub-blocks' weights are added and summed over the observed layers so far;
* **instruction-guided attention (IGA)**: at a prune point, the attention the prompt text after the image
  pays to each image token, from the layer about to run (its own norm, q/k, RoPE), averaged over heads and
  text queries.

Each is divided by its sum over the sample's image tokens (plus 1e-8), the two are added, and the top ``n_s``
image tokens stay; dropped rows leave the sequence, positions are renumbered (official).

Defaults (official LLaVA-1.5 scripts, 32 layers): TTV accumulated over layers 7-12 (1-indexed, i.e. 0-indexed
6-11), prune points after layers 7, 9 and 12 (vtc's "before 0-indexed layers 7, 9, 12"), image tokens kept
0.875, 0.625, 0.125 of the input. On other depths the three points scale with the depth (``round(L * p / 32)``,
then pushed apart by one layer where a shallow model would merge them: 1, 2, 3 on 4 layers) and TTV is
observed from the layer before the first point to the layer before the last. ``budget`` is the fraction left
after the last point; the earlier points drop the same shares of what goes (1/7 and 3/7 of it, as 0.875 and
0.625 do at the official 0.125), so ``budget=0.125`` is the official schedule exactly.

Deviations: counts are rounded (``floor(x + 0.5)``) where the official code truncates, so the last stage is
exactly ``k`` like every vtc method; padded batches work (the official code runs batch size 1), with the
TTV softmax taken over each sample's real tokens; ties go to the lower index.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..budget import keep_count
from ..config import MethodConfig, check_int
from ..contexts import LayerTokens, Stage
from ..method import Method
from ..registry import register_method

#: official prune points of LLaVA-1.5 (32 layers): before 0-indexed layers 7, 9 and 12
OFFICIAL_LAYERS = (7, 9, 12)
#: share of the dropped tokens gone after each official point (0.875, 0.625, 0.125 at budget 0.125)
DROP_SHARES = (1 / 7, 3 / 7, 1.0)


@dataclasses.dataclass
class TransPruneConfig(MethodConfig):
    """TransPrune options.

    Args:
        layers: the three prune points (strictly increasing LLM layers before which the image tokens are
            ranked and cut); None: the official 7, 9, 12 of 32, scaled to the model's depth.
        iga: add instruction-guided attention to TTV (official); False ranks by TTV alone (the paper's
            attention-free variant).
    """

    layers: tuple[int, int, int] | None = None
    iga: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if len(self.layers) != 3:
                raise ValueError(f"layers must name three prune points, got {self.layers}")
            for layer in self.layers:
                check_int("layers[i]", layer, minimum=1)
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {self.layers}")
        if not isinstance(self.iga, bool):
            raise TypeError(f"iga must be True or False, got {self.iga!r}")


def stage_counts(budget: float | int, n: int) -> list[int]:
    """Image tokens kept after each of the three points for an image of ``n`` tokens (the last is ``k``)."""
    k = keep_count(budget, n)
    counts = [max(k, int((n - (n - k) * share) + 0.5)) for share in DROP_SHARES[:-1]] + [k]
    return [min(n, c) for c in counts]


@register_method("transprune", config=TransPruneConfig, kind="pruner", stages=(Stage.LLM_LAYER,))
class TransPrunePruner(Method):
    """Progressive in-LLM pruning by token transition variation plus instruction-guided attention."""

    default_positions = "compact"

    def points(self, num_layers: int) -> tuple[int, ...]:
        layers = self.config.layers
        if layers is None:  # the official points scaled, pushed apart where a shallow model merges them
            scaled = [max(1, round(num_layers * p / 32)) for p in OFFICIAL_LAYERS]
            layers = (scaled[0], max(scaled[1], scaled[0] + 1), max(scaled[2], scaled[0] + 2, scaled[1] + 1))
        if layers[-1] >= num_layers:
            raise ValueError(
                f"transprune prune points {layers} must be below the LLM's {num_layers} layers; pass layers=(a, b, c)"
            )
        return layers

    def llm_prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.points(num_layers)

    def llm_observe_layers(self, num_layers: int) -> tuple[int, ...]:
        first, *_, last = self.points(num_layers)
        return tuple(range(first - 1, last))

    def observe(self, layer: int, part: str, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x, y = x.float(), y.float()
        ratio = y.norm(dim=-1) / x.norm(dim=-1)
        change = (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).masked_fill(~valid, float("-inf"))
        return (ratio * change.softmax(dim=-1)).masked_fill(~valid, 0.0)  # [B, L]

    def prune(self, tokens: LayerTokens) -> list[torch.Tensor]:
        stage = self.points(tokens.num_layers).index(tokens.layer)
        ttv = tokens.observed()
        iga = tokens.attention_to_visual("text") if self.config.iga else [None] * len(tokens.visual)
        kept = []
        for b, (rows, n) in enumerate(zip(tokens.visual, tokens.n_input, strict=True)):
            t = ttv[b, rows]
            score = t / (t.sum() + 1e-8)
            if iga[b] is not None:
                score = score + iga[b] / (iga[b].sum() + 1e-8)
            k = min(stage_counts(self.config.budget, n)[stage], rows.numel())
            kept.append(rows[kernels.topk_sorted(score, k)])
        return kept

    def visual_schedule(self, num_layers: int, n: int) -> list[int]:
        points = self.points(num_layers)
        counts = stage_counts(self.config.budget, n)
        return [n if layer < points[0] else counts[sum(p <= layer for p in points) - 1] for layer in range(num_layers)]
