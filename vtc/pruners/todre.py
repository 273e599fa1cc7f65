"""``todre``: ToDRE, "Token Diversity and task RElevance" pruning (arXiv 2505.18757, v2).
No official code was found; this follows the paper's text and appendix pseudocode (``docs/methods/todre.md``).

Stage 1 (before the LLM): keep a maximally *diverse* subset of the projected visual tokens by greedy
**max-sum** diversification: start at the pivot (the token with the highest ViT CLS attention of the
feature layer), then repeatedly add the token with the smallest cumulative cosine similarity to the chosen
set (ties to the lower index), fp32. ``objective="maxmin"`` is the v1 k-center variant (same as DivPrune
with the pivot as the first pick). Kept tokens go back in ascending order.

Stage 2 (inside the LLM): at the check layer ``l* = floor(7L/8)`` measure how much the prompt text after
the image still attends to the visual tokens, ``a_tv = mean over text rows of sum over visual keys of the
head-mean attention``; when ``a_tv < tau`` every visual token is removed from layers ``l* + 1 .. L - 1`` (never
added to their KV cache). With causal attention and the [system][image][text] layout the visual->text
direction is identically zero, so only ``a_tv`` is tested. The decision is per sample.

Defaults (paper): pivot = top CLS attention (towers without CLS use the attention each token receives),
``tau = 0.10``, check layer ``7L/8``; ``budget`` is the stage-1 keep fraction (the paper's 25 % / 10 %).
Positions are kept original for both stages (the FastV-style choice; the paper does not say).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..budget import keep_count
from ..config import MethodConfig, check_choice, check_float, check_int
from ..contexts import ImageTokens, LayerTokens, Reduction, Stage, TowerInfo, VisionSignal
from ..kernels import normalize
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class ToDREConfig(MethodConfig):
    """ToDRE options.

    Args:
        objective: stage-1 diversity objective: ``"maxsum"`` (the paper's v2, smallest summed similarity to
            the chosen set) or ``"maxmin"`` (v1, k-center: largest distance to the nearest chosen token).
        pivot: first pick: ``"cls"`` the token with the highest ViT CLS attention (paper), ``"random"`` a
            seeded random token (the paper's ablation).
        tau: stage 2 removes every visual token when the text's attention to them falls below it (paper: 0.10).
        layer: the LLM layer where stage 2 checks; None: ``floor(7 L / 8)`` (paper).
        stage2: run stage 2 at all.
        seed: seed of the random pivot.
    """

    objective: str = "maxsum"
    pivot: str = "cls"
    tau: float = 0.10
    layer: int | None = None
    stage2: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("objective", self.objective, ("maxsum", "maxmin"))
        check_choice("pivot", self.pivot, ("cls", "random"))
        check_float("tau", self.tau, 0.0, 1.0)
        if self.layer is not None:
            check_int("layer", self.layer, minimum=0)
        if not isinstance(self.stage2, bool):
            raise TypeError(f"stage2 must be a bool, got {self.stage2!r}")
        check_int("seed", self.seed, minimum=0)


def greedy_maxsum(x: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Greedy max-sum diversification on cosine similarity: ``k`` rows of ``x [N, D]``, selection order."""
    xn = normalize(x)  # [N, D] fp32
    total = xn @ xn[first]
    total[first] = float("inf")
    picks = [first]
    for _ in range(k - 1):
        c = int(total.argmin())
        picks.append(c)
        total += xn @ xn[c]
        total[c] = float("inf")
    return torch.tensor(picks, dtype=torch.long, device=x.device)


@register_method("todre", config=ToDREConfig, kind="pruner", stages=(Stage.VISION, Stage.PRE_LLM, Stage.LLM_LAYER))
class ToDREPruner(Method):
    """Greedy diversity before the LLM, then drop all visual tokens once text stops attending to them."""

    default_positions = "original"

    def _score(self, has_cls: bool) -> VisionSignal:
        return VisionSignal("cls_attention" if has_cls else "attention_received", "feature")

    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        return (self._score(tower.has_cls),) if self.config.pivot == "cls" else ()

    def reduce(self, image: ImageTokens) -> Reduction:
        patch = image.layout.is_patch().to(image.tokens.device)
        if self.config.pivot == "cls":
            scores = image.token_signal(self._score(image.tower.has_cls), fill=float("-inf"))
            scores = scores.masked_fill(~patch, float("-inf"))
            first = int(kernels.topk_sorted(scores, 1)[0])
        else:
            gen = torch.Generator().manual_seed(self.config.seed)
            first = int(torch.randint(image.n, (1,), generator=gen))
            scores = None
        if self.config.objective == "maxsum":
            chosen = greedy_maxsum(image.tokens, image.k, first)
        else:
            chosen = kernels.greedy_maxmin(image.tokens, image.k, first=torch.tensor(first))
        return Reduction.keep(chosen, scores=scores)

    def check_layer(self, num_layers: int) -> int:
        layer = (7 * num_layers) // 8 if self.config.layer is None else self.config.layer
        if layer >= num_layers:
            raise ValueError(f"todre layer={layer} must be below the LLM's {num_layers} layers")
        return layer

    def llm_prune_layers(self, num_layers: int) -> tuple[int, ...]:
        layer = self.check_layer(num_layers)
        return (layer + 1,) if self.config.stage2 and layer + 1 < num_layers else ()

    def llm_score_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.check_layer(num_layers),) if self.llm_prune_layers(num_layers) else ()

    def prune(self, tokens: LayerTokens) -> list[torch.Tensor]:
        rows = [t if t.numel() else tokens.last[b : b + 1] for b, t in enumerate(tokens.text_after)]
        probs = tokens.attention(rows, layer=tokens.layer - 1)
        kept = []
        for p, visual in zip(probs, tokens.visual, strict=True):
            alpha_tv = float(p[:, visual].sum(dim=1).mean()) if visual.numel() else 0.0
            kept.append(visual[:0] if alpha_tv < self.config.tau else visual)
        return kept

    def visual_schedule(self, num_layers: int, n: int) -> list[int]:
        """Stage 2 is data-dependent; the schedule assumes it fires (the paper's FLOPs setting)."""
        k = keep_count(self.config.budget, n)
        prune = self.llm_prune_layers(num_layers)
        return [k if not prune or layer < prune[0] else 0 for layer in range(num_layers)]
