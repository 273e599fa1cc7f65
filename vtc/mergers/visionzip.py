"""``visionzip``: VisionZip, "Longer is Better but Not Necessary in Vision Language Models"
(Yang et al., CVPR 2025, arXiv 2412.04467). Official code dvlab-research/VisionZip @ 3151f6d; the method page
is ``docs/methods/visionzip.md``.

Per partition, with ``k = D + C`` tokens:
* ``D`` dominant tokens: the CLS token plus the ``D - 1`` patches with the highest CLS attention of the
  feature layer (block 22 for LLaVA-1.5; heads summed), in ascending order with CLS first. Towers with no
  CLS token use the attention each token receives instead and have no CLS slot.
* ``C`` contextual tokens: the remaining patches, in ascending order, are split into ``C`` targets taken
  uniformly from that list (``step = max(1, R // C)``) and the others; each other token joins the target
  whose head-mean key (feature layer) is most cosine-similar (``vtc.kernels.cosine_argmax``); a contextual
  token is its target's hidden state **plus** the mean of its members' (official formula; the norm is
  inflated on purpose).
* Dominant and contextual hidden states (feature-layer output, CLS included) go through the model's
  projector; contextual tokens are appended after the dominant ones.

Defaults (official README / paper): the 54 + 10 split of 64, i.e. ``contextual = 10/64`` of ``k``
(108 + 20 and 162 + 30 for 128 and 192, the LLaVA-1.5 settings); CLS fed through the projector
(``keep_cls=True``) as in the official code although LLaVA never trained on it. Compact positions.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import kernels
from ..config import MethodConfig, check_float
from ..contexts import ImageTokens, Reduction, Stage, TowerInfo, VisionSignal
from ..grids import per_partition_counts
from ..method import Method
from ..registry import register_method


@dataclasses.dataclass
class VisionZipConfig(MethodConfig):
    """VisionZip options.

    Args:
        contextual: share of each partition's ``k`` spent on merged contextual tokens (official 10/64, the
            54 + 10 split); the rest are dominant tokens.
        keep_cls: feed the CLS token through the projector as the first dominant token (official code).
    """

    contextual: float = 10 / 64
    keep_cls: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("contextual", self.contextual, 0.0, 0.5)
        if not isinstance(self.keep_cls, bool):
            raise TypeError(f"keep_cls must be a bool, got {self.keep_cls!r}")


SCORE_CLS = VisionSignal("cls_attention", "feature", heads="sum")
SCORE_RECEIVED = VisionSignal("attention_received", "feature", heads="sum")
KEYS = VisionSignal("keys", "feature")
HIDDEN = VisionSignal("hidden", "feature")


def contextual_merge(hidden: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor, c: int):
    """VisionZip's contextual tokens from the ``rest`` rows (ascending) of one partition.

    Args:
        hidden: ``[T, C]`` feature-layer hidden states; keys: ``[T, d]`` head-mean keys.
        rest: ``[R]`` rows not chosen as dominant; c: number of contextual tokens (``1 <= c <= R``).

    Returns:
        ``(tokens [c, C], targets [c], member_of [R])``: member_of gives, per rest row, its contextual row.
    """
    r = int(rest.numel())
    step = max(1, r // c)
    pos = torch.arange(0, r, step, device=rest.device)[:c]
    is_target = torch.zeros(r, dtype=torch.bool, device=rest.device)
    is_target[pos] = True
    targets, others = rest[pos], rest[~is_target]
    member_of = torch.empty(r, dtype=torch.long, device=rest.device)
    member_of[pos] = torch.arange(c, device=rest.device)
    tokens = hidden[targets].float()
    if others.numel():
        _, best = kernels.cosine_argmax(keys[others], keys[targets])
        member_of[~is_target] = best
        ones = torch.ones(others.numel(), device=hidden.device)
        mean, _ = kernels.weighted_merge(hidden[others], ones, best, num_groups=c)  # zeros where nothing joined
        tokens = tokens + mean.float()
    return tokens.to(hidden.dtype), targets, member_of


@register_method("visionzip", config=VisionZipConfig, kind="merger", stages=(Stage.VISION, Stage.PRE_LLM))
class VisionZipMerger(Method):
    """Dominant tokens by CLS attention plus contextual tokens merged by key similarity."""

    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        return (SCORE_CLS if tower.has_cls else SCORE_RECEIVED, KEYS, HIDDEN)

    def reduce(self, image: ImageTokens) -> Reduction:
        layout = image.layout
        if image.project is None:
            raise ValueError("visionzip needs the model's projector (ImageTokens.project)")
        has_cls = layout.prefix > 0 and self.config.keep_cls  # a CLS slot to emit (not in pooled video frames)
        score_sig = SCORE_CLS if image.tower.has_cls else SCORE_RECEIVED
        device = image.tokens.device
        out_index, out_vectors = [], []
        groups = torch.full((image.n,), -1, dtype=torch.long, device=device)
        all_scores = image.token_signal(score_sig, fill=float("-inf"))
        row = 0
        for p, kp in enumerate(per_partition_counts(layout, image.k)):
            if kp == 0:
                continue
            hidden = image.signal(HIDDEN)[p]  # [prefix + cells, C]
            keys = image.signal(KEYS)[p]
            scores = image.signal(score_sig)[p].clone()
            cell_tokens = layout.partition_tokens(p).to(device)
            slots = torch.nonzero(cell_tokens >= 0).flatten() + layout.prefix  # patch slots fed to the LLM
            c = math.floor(kp * self.config.contextual + 0.5)
            d = kp - c
            n_dom_patches = d - 1 if has_cls else d
            dom = slots[kernels.topk_sorted(scores[slots], n_dom_patches)]
            rest_mask = torch.ones(slots.numel(), dtype=torch.bool, device=device)
            rest_mask[torch.searchsorted(slots, dom)] = False
            rest = slots[rest_mask]
            # dominant rows, CLS first
            token_of_slot = torch.full((hidden.shape[0],), -1, dtype=torch.long, device=device)
            token_of_slot[slots] = cell_tokens[slots - layout.prefix]
            cls_token = torch.nonzero((layout.partition.to(device) == p) & (layout.slot.to(device) == 0)).flatten()
            if has_cls:
                anchor = int(cls_token[0]) if cls_token.numel() else -1
                out_index.append(torch.tensor([anchor], device=device))
                out_vectors.append(image.project(hidden[:1]))
                if anchor >= 0:
                    groups[anchor] = row
                row += 1
            dom_tokens = token_of_slot[dom]
            out_index.append(dom_tokens)
            out_vectors.append(image.tokens[dom_tokens])
            groups[dom_tokens] = torch.arange(row, row + dom_tokens.numel(), device=device)
            row += dom_tokens.numel()
            if c:
                ctx, targets, member_of = contextual_merge(hidden, keys, rest, c)
                out_index.append(token_of_slot[targets])
                out_vectors.append(image.project(ctx))
                groups[token_of_slot[rest]] = row + member_of
                row += c
        tokens = torch.cat([v.to(image.tokens.dtype) for v in out_vectors])
        return Reduction(index=torch.cat(out_index).long(), tokens=tokens, groups=groups, scores=all_scores)
