"""``dart``: DART, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More"
(Wen et al., EMNLP 2025, arXiv 2502.11494). Official code ZichenWen1/DART (LLaVA ``get_retained_image_token``);
the LightCompress port (``llmc/compression/token_reduction/dart.py``) was read for the hook placement.

Inside the LLM, before layer ``K``, with no attention map:

1. **pivots**: the keys of layer ``K - 1`` (its input norm, k projection and RoPE, every KV head repeated
   for its query heads, heads concatenated), ranked by their **L1 norm**: the ``pivot_image`` image tokens
   and the ``pivot_text`` prompt tokens after the image with the largest norms;
2. **duplicates out**: the hidden states entering layer ``K`` through the LM's final norm; for each pivot in
   turn, the image tokens (not yet chosen, image pivots excluded) **least cosine-similar** to it are added;
3. the kept image tokens are the image pivots plus everything added (the text pivots only steer).

Layers ``K..L-1`` run on the shorter sequence and cache only the kept rows; kept tokens keep their original
positions (official). The model keeps SDPA / FlashAttention: nothing needs the attention map.

Defaults (official scripts): ``K = 2``, 4 image and 4 text pivots. Deviations, each to give exactly ``k``:

* the official code adds ``max_num_trunction // (pivots)`` tokens per pivot, so it keeps the pivots *plus*
  about ``max_num_trunction`` tokens (132 for 128). Here the budget's ``k`` is the total: the image pivots,
  then ``k - pivot_image`` tokens split over the pivots as evenly as possible (the first pivots in order
  take one more when it does not divide);
* pivots are visited in prompt order (image pivots, then text pivots); the official code visits them in the
  iteration order of a Python ``set`` of row indices (for small indices, mostly ascending);
* with no prompt text after the image, there are no text pivots (the official code assumes there is some).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..budget import keep_count
from ..config import MethodConfig, check_int
from ..contexts import LayerTokens, Stage
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class DARTConfig(MethodConfig):
    """DART options.

    Args:
        layer: ``K``, the LLM layer before which the image tokens are pruned (official: 2); pivots come from
            layer ``K - 1``'s keys.
        pivot_image: image pivots (official: 4), always kept.
        pivot_text: pivots among the prompt tokens after the image (official: 4), never kept.
    """

    layer: int = 2
    pivot_image: int = 4
    pivot_text: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("layer", self.layer, minimum=1)
        check_int("pivot_image", self.pivot_image, minimum=1)
        check_int("pivot_text", self.pivot_text, minimum=0)


def dart_select(
    image_keys: torch.Tensor, text_keys: torch.Tensor, states: torch.Tensor, k: int, pivot_image: int, pivot_text: int
) -> torch.Tensor:
    """DART's kept image tokens (indices into the image tokens, ascending).

    Args:
        image_keys: ``[n, H * d]`` keys of the image tokens (heads concatenated); text_keys: ``[m, H * d]`` of the
            prompt tokens after the image.
        states: ``[n + m, D]`` the normed hidden states of the image tokens, then of those text tokens.
        k: how many image tokens to keep (``k <= n``).
    """
    n = image_keys.shape[0]
    if k >= n:
        return torch.arange(n, device=image_keys.device)
    p_img = min(pivot_image, k)
    img_piv = torch.topk(image_keys.float().abs().sum(-1), p_img).indices.sort().values
    p_txt = min(pivot_text, text_keys.shape[0])
    txt_piv = torch.topk(text_keys.float().abs().sum(-1), p_txt).indices.sort().values + n if p_txt else img_piv[:0]
    pivots = torch.cat([img_piv, txt_piv])
    rest = k - p_img
    share = [rest // len(pivots) + (1 if i < rest % len(pivots) else 0) for i in range(len(pivots))]
    free = torch.ones(n, dtype=torch.bool, device=image_keys.device)
    free[img_piv] = False
    normed = F.normalize(states.float(), dim=-1)
    chosen = [img_piv]
    for pivot, t in zip(pivots.tolist(), share, strict=True):
        if t == 0:
            continue
        candidates = torch.nonzero(free).flatten()
        sim = normed[candidates] @ normed[pivot]
        pick = candidates[torch.topk(-sim, min(t, candidates.numel())).indices]
        free[pick] = False
        chosen.append(pick)
    return torch.cat(chosen).sort().values


@register_method("dart", config=DARTConfig, kind="pruner", stages=(Stage.LLM_LAYER,))
class DARTPruner(Method):
    """Keep the image tokens least similar to a few high-key-norm pivots, inside the LLM before layer K."""

    default_positions = "original"

    def llm_prune_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.config.layer >= num_layers:
            raise ValueError(f"dart layer={self.config.layer} must be below the LLM's {num_layers} layers")
        return (self.config.layer,)

    def llm_score_layers(self, num_layers: int) -> tuple[int, ...]:
        return (self.config.layer - 1,)

    def prune(self, tokens: LayerTokens) -> list[torch.Tensor]:
        keys = tokens.keys(self.config.layer - 1)  # [B, H, L, d]
        keys = keys.transpose(1, 2).flatten(2)  # [B, L, H * d]
        states = tokens.final_normed()
        kept = []
        for b, (rows, text, n) in enumerate(zip(tokens.visual, tokens.text_after, tokens.n_input, strict=True)):
            k = min(keep_count(self.config.budget, n), rows.numel())
            both = torch.cat([rows, text])
            pick = dart_select(
                keys[b, rows], keys[b, text], states[b, both], k, self.config.pivot_image, self.config.pivot_text
            )
            kept.append(rows[pick])
        return kept

    def visual_schedule(self, num_layers: int, n: int) -> list[int]:
        k = keep_count(self.config.budget, n)
        return [n] * self.config.layer + [k] * (num_layers - self.config.layer)
