"""``fastv``: FastV, "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., ECCV 2024, arXiv 2403.06764).
Official code pkunlp-icler/FastV @ d165972 (KV-cache variant); the method page is ``docs/methods/fastv.md``.

Inside the LLM, before layer ``K``: rank the image tokens by the attention they receive from the **last
prompt token** in layer ``K - 1``, head-averaged (both official code paths use only that row), and keep
the top ``k``; layers ``K..L-1`` run on the shorter sequence and cache only the kept rows. Selection
happens once, at prefill (the KV-cache variant; the original no-cache code re-selected every step).

The attention row is recomputed from layer ``K - 1``'s own input norm, q/k projections, RoPE and grouped
KV heads, so the model keeps SDPA (the official code needs eager attention at that layer).

Defaults: ``K = 2`` (the paper's headline setting; the README demo uses K = 3); ``budget`` is the fraction
of image tokens kept after layer ``K`` (official ``R`` = 1 - budget; the paper's 50 % is ``budget=0.5``).
Kept tokens keep their original positions (official). ``query="text"`` is the "attention received from
all text after the image" variant the paper's wording suggests. The record gives the layer-averaged
(equivalent) budget ``(K n + (L - K) k) / (L n)``.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import kernels
from ..budget import keep_count
from ..config import MethodConfig, check_choice, check_int
from ..contexts import LayerTokens, Stage
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class FastVConfig(MethodConfig):
    """FastV options.

    Args:
        layer: ``K``, the LLM layer before which the image tokens are pruned (paper's headline setting: 2); the
            ranking uses layer ``K - 1``'s attention.
        query: whose attention ranks the image tokens: ``"last"`` the last prompt token (official code),
            ``"text"`` the mean over the prompt text after the image.
    """

    layer: int = 2
    query: str = "last"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("layer", self.layer, minimum=1)
        check_choice("query", self.query, ("last", "text"))


@register_method("fastv", config=FastVConfig, kind="pruner", stages=(Stage.LLM_LAYER,))
class FastVPruner(Method):
    """Drop the image tokens least attended by the last prompt token, after LLM layer K - 1."""

    default_positions = "original"

    def llm_prune_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.config.layer >= num_layers:
            raise ValueError(f"fastv layer={self.config.layer} must be below the LLM's {num_layers} layers")
        return (self.config.layer,)

    def llm_score_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.config.layer - 1,)

    def prune(self, tokens: LayerTokens) -> list[torch.Tensor]:
        scores = tokens.attention_to_visual(self.config.query, layer=self.config.layer - 1)
        kept = []
        for rows, s, n in zip(tokens.visual, scores, tokens.n_input, strict=True):
            k = min(keep_count(self.config.budget, n), rows.numel())
            kept.append(rows[kernels.topk_sorted(s, k)])
        return kept

    def visual_schedule(self, num_layers: int, n: int) -> list[int]:
        k = keep_count(self.config.budget, n)
        return [n] * self.config.layer + [k] * (num_layers - self.config.layer)
