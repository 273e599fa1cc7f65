"""``pdrop``: PyramidDrop, "Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy
Reduction" (Xing et al., CVPR 2025, arXiv 2410.17247). Official code Cooperx521/PyramidDrop @ 6444f30; the
method page is ``docs/methods/pdrop.md``.

The LLM is split into stages; before each boundary layer ``b_s`` the image tokens still present are ranked
by the attention of the **last prompt token** computed with layer ``b_s``'s own input norm, q/k projections
and RoPE (the official code scores with the next layer's projections before running it), head-averaged,
and the top ``n_s`` kept. Counts are relative to the original ``n`` and fall geometrically; positions are
renumbered after every drop (official), so decode positions differ per layer group (``docs/design.md``).

Defaults (official scripts): boundaries at ``L/4, L/2, 3L/4`` (8, 16, 24 for 32 layers) and ratio 0.5 per
stage. ``budget`` is the fraction kept after the last stage; the per-stage ratio is ``budget ** (1/S)``
(``vtc.budget.stage_counts``), so ``budget=0.125`` is exactly the official n/2, n/4, n/8 schedule. Grouped
KV heads are repeated (the official code does not, which breaks GQA models).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..budget import stage_counts
from ..config import MethodConfig, check_int
from ..contexts import LayerTokens, Stage
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class PyramidDropConfig(MethodConfig):
    """PyramidDrop options.

    Args:
        layers: the stage boundaries, strictly increasing LLM layers before which the image tokens still
            present are ranked and cut; None: ``L/4, L/2, 3L/4`` (official). ``budget`` is what is left after the
            last one; each stage keeps the same fraction of the previous stage's tokens.
    """

    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            self.layers = tuple(self.layers)
            if not self.layers:
                raise ValueError("layers must name at least one boundary layer")
            for layer in self.layers:
                check_int("layers[i]", layer, minimum=1)
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"layers must be strictly increasing, got {self.layers}")


@register_method("pdrop", config=PyramidDropConfig, kind="pruner", stages=(Stage.LLM_LAYER,))
class PyramidDropPruner(Method):
    """Stage-wise geometric drop of image tokens by last-prompt-token attention (PyramidDrop)."""

    default_positions = "compact"

    def boundaries(self, num_layers: int) -> tuple[int, ...]:
        layers = self.config.layers or tuple(sorted({max(1, round(num_layers * s / 4)) for s in (1, 2, 3)}))
        if layers[-1] >= num_layers:
            raise ValueError(f"pdrop boundaries {layers} must be below the LLM's {num_layers} layers")
        return layers

    def llm_prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.boundaries(num_layers)

    def prune(self, tokens: LayerTokens) -> list[torch.Tensor]:
        bounds = self.boundaries(tokens.num_layers)
        stage = bounds.index(tokens.layer)
        scores = tokens.attention_to_visual("last")  # this layer's own projections
        kept = []
        for rows, s, n in zip(tokens.visual, scores, tokens.n_input, strict=True):
            k = min(stage_counts(self.config.budget, n, len(bounds))[stage], rows.numel())
            kept.append(rows[kernels.topk_sorted(s, k)])
        return kept

    def visual_schedule(self, num_layers: int, n: int) -> list[int]:
        bounds = self.boundaries(num_layers)
        counts = stage_counts(self.config.budget, n, len(bounds))
        out = []
        for layer in range(num_layers):
            passed = sum(1 for b in bounds if b <= layer)
            out.append(n if passed == 0 else counts[passed - 1])
        return out
