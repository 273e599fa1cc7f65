"""The per-image reduction loop of a call: keep counts, the method's ``reduce``, the newline policy, the exact-k check.

For every image (or video) the adapter encoded, :class:`Reducer`

1. takes the keep count ``k`` from the method's :meth:`~vtc.method.Method.prompt_count` (:mod:`vtc.budget`;
   a stack's count before its in-LLM stage; an image already merged inside the vision tower keeps what the
   tower left);
2. passes an image with ``k == n`` through untouched (None), which is what makes ``budget=1.0`` exact;
3. runs the method's ``PRE_LLM`` callback under the newline policy (:attr:`vtc.config.MethodConfig.newlines`);
4. checks that exactly ``k`` tokens with valid anchors came back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .budget import keep_count
from .config import MethodConfig
from .contexts import ImageTokens, Reduction, Stage, TowerInfo
from .method import Method


class Reducer:
    def __init__(self, method: Method, config: MethodConfig):
        self.method = method
        self.config = config

    def run(
        self, images: Sequence[ImageTokens], in_tower: Sequence[Reduction | None] | None, tower: TowerInfo
    ) -> list[Reduction | None]:
        """Per image, its reduction (None: the image reaches the LLM whole). Sets each image's ``k``.

        Args:
            images: the call's images, in the order the model consumes them.
            in_tower: per image, what a ``VISION_MERGE`` method already did inside the vision tower (or None).
            tower: what the vision tower is, as the adapter reports it.
        """
        reductions: list[Reduction | None] = []
        pre_llm = Stage.PRE_LLM in self.method.stages
        for image, merged in zip(images, in_tower or [None] * len(images), strict=True):
            image.tower = tower
            if image.modality not in self.method.modalities:
                raise ValueError(
                    f"method {self.method.name!r} compresses {' and '.join(self.method.modalities)} inputs, "
                    f"not {image.modality}s"
                )
            if merged is not None:  # already reduced inside the vision tower (VISION_MERGE)
                image.k = int(merged.index.numel())
                check_reduction(self.method.name, image.n, image.k, merged)
                more = self.method.after_tower(image, merged)  # a stack's members after the tower
                if more is not None:
                    image.k = int(more.index.numel())
                    check_reduction(self.method.name, image.n, self.method.prompt_count(image.n), more)
                reductions.append(merged if more is None else more)
                continue
            image.k = self.method.prompt_count(image.n) if pre_llm else image.n
            reductions.append(None if image.k >= image.n else self.reduce(image))
        return reductions

    def reduce(self, image: ImageTokens) -> Reduction:
        """Run the method on one image under the newline policy (``MethodConfig.newlines``)."""
        newline = image.layout.is_newline().to(image.tokens.device)
        policy = self.config.newlines or self.method.default_newlines
        if policy == "candidates" or not bool(newline.any()):
            red = self.method.reduce(image)
            check_reduction(self.method.name, image.n, image.k, red)
            return red
        patches = torch.nonzero(~newline).flatten()
        part = image.subset(patches)
        red = self.method.reduce(part)
        check_reduction(self.method.name, part.n, part.k, red)
        red = red.lift(patches, image.n)
        return keep_rows(red, newline, image.tokens) if policy == "keep_rows" else red

    def full_budget(self, images: Sequence[ImageTokens]) -> bool:
        """Every image keeps all its tokens: every stage is off, in-LLM ones included (``budget=1.0``)."""
        return all(keep_count(self.config.budget, image.n) >= image.n for image in images)


def keep_rows(red: Reduction, newline: torch.Tensor, tokens: torch.Tensor) -> Reduction:
    """Add the separator after every row that still has a kept token (``newlines="keep_rows"``).

    Selections in token order get the separators at their place in the sequence; other outputs (merges,
    selections in a method's own order) get them appended at the end, which is where OneVision's single
    video separator sits.
    """
    groups = red.resolve_groups(newline.numel())
    kept = groups >= 0
    extra, start = [], 0
    for i in torch.nonzero(newline).flatten().tolist():
        if bool(kept[start:i].any()):
            extra.append(i)
        start = i + 1
    extra = torch.tensor(extra, dtype=torch.long, device=red.index.device)
    if red.tokens is None:
        index = torch.cat([red.index, extra])
        ascending = bool((red.index[1:] > red.index[:-1]).all())
        return Reduction(index=torch.sort(index).values if ascending else index, scores=red.scores, stages=red.stages)
    groups = groups.clone()
    groups[extra] = red.index.numel() + torch.arange(extra.numel(), device=groups.device)
    return Reduction(
        index=torch.cat([red.index, extra]),
        tokens=torch.cat([red.tokens, tokens[extra].to(red.tokens.dtype)]),
        groups=groups,
        scores=red.scores,
        stages=red.stages,
    )


def check_reduction(name: str, n: int, k: int, red: Reduction) -> None:
    """Enforce the budget invariant: exactly ``k`` output tokens with valid anchors."""
    count = int(red.index.numel())
    if count != k:
        raise RuntimeError(
            f"method {name!r} returned {count} tokens for an image with budget k={k} (bug in the method)"
        )
    if red.index.numel() and (int(red.index.max()) >= n or int(red.index.min()) < -1):
        raise RuntimeError(f"method {name!r} returned token indices outside [-1, {n})")
    if red.tokens is None:
        if bool((red.index < 0).any()) or torch.unique(red.index).numel() != count:
            raise RuntimeError(f"method {name!r} returned repeated or missing token indices")
    elif red.tokens.shape[0] != k:
        raise RuntimeError(f"method {name!r} returned {red.tokens.shape[0]} merged tokens for k={k}")
