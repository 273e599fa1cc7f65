"""Standalone vision transformers (no LLM): timm's ``VisionTransformer`` and open_clip's image tower.

These models have no ``config.model_type``; they are recognised by data: the qualified name of the model's
class or one of its bases (:attr:`ViTAdapter.model_classes`), so neither timm nor open_clip is imported
here. The only stage is token merging inside the tower (``VISION_MERGE``): the blocks run through block
runners (:mod:`vtc.adapters.runners`) on every forward, the tower outputs ``prefix + k`` tokens, and the
session records, per image, which patches each output token stands for.

The consumer of a standalone ViT is its own head; ``n`` counts its patch tokens (prefix tokens, which are
never merged, excluded), so ``k = keep_count(budget, n)`` patch tokens leave the last block.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..hooks import Stage, TowerCall, TowerInfo
from .base import Adapter, UnsupportedModelError
from .runners import MergeContext, Runners


def _qualnames(model: nn.Module) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}


class ViTAdapter(Adapter):
    """Shared plumbing; subclasses say where the tower, its blocks, prefix and patch grid are."""

    standalone = True
    stages = frozenset({Stage.VISION, Stage.VISION_MERGE})
    visual_inputs = ()
    #: qualified names of the model classes (or bases) this adapter takes
    model_classes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def detect(cls, model: nn.Module) -> bool:
        return bool(_qualnames(model) & set(cls.model_classes))

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.tower = self.find_tower(model)
        self.blocks: nn.ModuleList = self.find_blocks(self.tower)
        self.prefix = self.prefix_tokens(self.tower)
        self.context: MergeContext | None = None

    # -- host knowledge (subclasses) ------------------------------------------------------------------
    def find_tower(self, model: nn.Module) -> nn.Module:
        return model

    def find_blocks(self, tower: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def prefix_tokens(self, tower: nn.Module) -> int:
        raise NotImplementedError

    def grid(self, n: int) -> tuple[int, int]:
        """The ``(rows, cols)`` patch grid of an image with ``n`` patch tokens."""
        rows, cols = (int(v) for v in self.patch_grid())
        return (rows, cols) if rows * cols == n else (1, n)

    def patch_grid(self) -> tuple[int, int]:
        raise NotImplementedError

    # -- the adapter contract ---------------------------------------------------------------------------
    def tower_info(self) -> TowerInfo:
        return TowerInfo(has_cls=self.prefix > 0, num_blocks=len(self.blocks))

    def install_merge(self, merge, keep, on_done=None) -> None:
        ctx = MergeContext(len(self.blocks))
        blocks, prefix = len(self.blocks), self.prefix

        def start(x: torch.Tensor):
            bsz, tokens = int(x.shape[0]), int(x.shape[1])
            n = tokens - prefix
            return merge(TowerCall(bsz, tokens, prefix, blocks, n, keep(n), x.device))

        ctx.start, ctx.on_done = start, on_done
        self.handles.append(Runners(self.blocks, ctx))
        self.context = ctx

    def uninstall(self) -> None:
        super().uninstall()
        self.context = None

    def text_config(self) -> Any:
        raise NotImplementedError(f"the {self.family} family has no language model")


class TimmViTAdapter(ViTAdapter):
    """timm ``VisionTransformer`` (ViT, DeiT incl. the distilled variant, registers, LayerScale, qk-norm)."""

    family = "timm"
    model_classes = ("timm.models.vision_transformer.VisionTransformer",)

    def find_blocks(self, tower: nn.Module) -> nn.ModuleList:
        return tower.blocks

    def prefix_tokens(self, tower: nn.Module) -> int:
        return int(getattr(tower, "num_prefix_tokens", 1))

    def patch_grid(self) -> tuple[int, int]:
        return tuple(self.tower.patch_embed.grid_size)


class OpenCLIPAdapter(ViTAdapter):
    """open_clip's ``VisionTransformer`` image tower, alone or inside a ``CLIP`` model (text tower untouched)."""

    family = "open_clip"
    model_classes = (
        "open_clip.model.CLIP",
        "open_clip.model.CustomTextCLIP",
        "open_clip.transformer.VisionTransformer",
    )
    tower_class = "open_clip.transformer.VisionTransformer"

    def find_tower(self, model: nn.Module) -> nn.Module:
        tower = model if self.tower_class in _qualnames(model) else getattr(model, "visual", None)
        if tower is None or self.tower_class not in _qualnames(tower):
            kind = type(tower).__qualname__ if tower is not None else "none"
            raise UnsupportedModelError(
                f"open_clip model with a {kind} image tower: vtc merges tokens in open_clip's VisionTransformer only"
            )
        return tower

    def find_blocks(self, tower: nn.Module) -> nn.ModuleList:
        return tower.transformer.resblocks

    def prefix_tokens(self, tower: nn.Module) -> int:
        return 1  # the class embedding

    def patch_grid(self) -> tuple[int, int]:
        return tuple(self.tower.grid_size)


#: standalone adapters, tried in order when a model has no known ``config.model_type``
STANDALONE: tuple[type[ViTAdapter], ...] = (TimmViTAdapter, OpenCLIPAdapter)
