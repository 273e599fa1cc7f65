"""Standalone vision transformers (no LLM): timm's ``VisionTransformer``, open_clip's image tower, and
transformers' ``Dinov2Model`` / ``CLIPVisionModel``.

These models have no ``config.model_type`` that vtc serves as a VLM family; they are recognised by data: the
qualified name of the model's class or one of its bases (:attr:`ViTAdapter.model_classes`), so neither timm
nor open_clip is imported here. The only stage is token merging inside the tower (``VISION_MERGE``): the
blocks run through block runners (:mod:`vtc.adapters.runners`) on every call that runs them (``forward``,
``forward_features``, open_clip's ``encode_image``), so the session routes nothing; the tower outputs
``prefix + k`` tokens, and the session's recorder keeps, per image, which patches each output token stands for.

The consumer of a standalone ViT is its own head; ``n`` counts its patch tokens (prefix tokens, which are
never merged, excluded), so ``k = keep_count(budget, n)`` patch tokens leave the last block. A model that
average-pools its tokens (timm ``global_pool="avg"`` / ``"avgmax"``, open_clip ``pool_type="avg"``) pools
them weighted by size (as ToMe's proportional attention does, see ``docs/methods/tome.md``), so a merged
token counts as the patches it stands for; CLS-token and attention pooling need nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..contexts import Stage, TowerCall, TowerInfo
from .base import Adapter, UnsupportedModelError
from .registry import register_adapter
from .runners import ClassSwap, MergeContext, Runners


def _qualnames(model: nn.Module) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}


class ViTAdapter(Adapter):
    """Shared plumbing; subclasses say where the tower, its blocks, prefix and patch grid are."""

    routes_calls = False
    stages = frozenset({Stage.VISION, Stage.VISION_MERGE})
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

    def configure(self, method, keep, recorder) -> None:
        if Stage.VISION_MERGE not in method.stages:
            raise ValueError(f"method {method.name!r} does not merge tokens inside a vision tower")
        super().configure(method, keep, recorder)

    def install(self) -> None:
        ctx = MergeContext(len(self.blocks))
        blocks, prefix, method, keep = len(self.blocks), self.prefix, self.method, self.keep

        def start(x: torch.Tensor):
            bsz, tokens = int(x.shape[0]), int(x.shape[1])
            n = tokens - prefix
            call = TowerCall(bsz, tokens, prefix, blocks, n, keep(n), x.device, grid=self.grid(n), inputs=x)
            return method.tower_merge(call)

        def done(state) -> None:
            seconds, ctx.seconds = ctx.seconds, 0.0
            self.recorder.tower_done(state, seconds, self.prefix, self.grid)

        ctx.start, ctx.on_done = start, done
        self.handles.append(Runners(self.blocks, ctx))
        self.context = ctx
        pooling = self.weighted_pooling(ctx)
        if pooling:
            self.handles.append(ClassSwap(self.tower, pooling))

    def weighted_pooling(self, ctx: MergeContext) -> dict[str, Any]:
        """Methods of the tower to override so that average pooling weighs tokens by size (none by default)."""
        return {}

    def sizes_for(self, ctx: MergeContext, x: torch.Tensor) -> torch.Tensor | None:
        """``[B, T]`` sizes of the tokens ``x [B, T, C]`` leaving the last merging call, if ``x`` is its output."""
        state = ctx.state
        if not getattr(state, "pool_by_size", True):
            return None  # the method's sizes are not member counts (GTP's token scales): the host's own mean
        size = getattr(state, "size", None)
        if size is None or size.shape != x.shape[:2] or bool((size == 1).all()):
            return None  # not this call's output, or nothing merged: the host's own pooling is exact
        return size

    def uninstall(self) -> None:
        super().uninstall()
        self.context = None


@register_adapter
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

    def weighted_pooling(self, ctx: MergeContext) -> dict[str, Any]:
        tower = self.tower
        if getattr(tower, "attn_pool", None) is not None or tower.global_pool not in ("avg", "avgmax"):
            return {}
        orig, adapter = type(tower), self

        def pool(this, x, pool_type=None):
            kind = this.global_pool if pool_type is None else pool_type
            size = adapter.sizes_for(ctx, x)
            if kind not in ("avg", "avgmax") or size is None:
                return orig.pool(this, x, pool_type)
            start = 0 if this.pool_include_prefix else this.num_prefix_tokens
            mean = _weighted_mean(x[:, start:], size[:, start:])
            return mean if kind == "avg" else 0.5 * (x[:, start:].amax(dim=1) + mean)

        return {"pool": pool}


@register_adapter
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

    def weighted_pooling(self, ctx: MergeContext) -> dict[str, Any]:
        if self.tower.pool_type != "avg":
            return {}
        orig, adapter = type(self.tower), self

        def _global_pool(this, x):
            size = adapter.sizes_for(ctx, x)
            if this.pool_type != "avg" or size is None:
                return orig._global_pool(this, x)
            return _weighted_mean(x[:, 1:], size[:, 1:]), x[:, 1:]

        return {"_global_pool": _global_pool}


@register_adapter
class TransformersViTAdapter(ViTAdapter):
    """A transformers vision backbone used on its own: ``Dinov2Model`` and ``CLIPVisionModel`` (with or
    without its projection). Their blocks are the ones the VLM families' towers run (Dinov2Layer,
    CLIPEncoderLayer), so ToMe runs here exactly as inside a LLaVA tower. The patch grid is read from each
    call's ``pixel_values`` (Dinov2 takes any input size); the pooled output is the CLS token, which needs no
    size weighting."""

    family = "transformers"
    _pixels: tuple[int, int] | None = None  # (height, width) of the last call's pixel_values
    model_classes = (
        "transformers.models.dinov2.modeling_dinov2.Dinov2Model",
        "transformers.models.clip.modeling_clip.CLIPVisionModel",
        "transformers.models.clip.modeling_clip.CLIPVisionModelWithProjection",
    )

    def find_blocks(self, tower: nn.Module) -> nn.ModuleList:
        encoder = tower.vision_model.encoder if hasattr(tower, "vision_model") else tower.encoder
        return getattr(encoder, "layer", None) or encoder.layers

    def prefix_tokens(self, tower: nn.Module) -> int:
        return 1  # CLS (Dinov2Model has no register tokens)

    def patch_grid(self) -> tuple[int, int]:
        patch = int(self.tower.config.patch_size)
        size = self._pixels or (int(self.tower.config.image_size),) * 2
        return size[0] // patch, size[1] // patch

    def install(self) -> None:
        self._pixels: tuple[int, int] | None = None

        def remember(module, args, kwargs):
            pixels = kwargs.get("pixel_values", args[0] if args else None)
            if isinstance(pixels, torch.Tensor) and pixels.dim() == 4:
                self._pixels = (int(pixels.shape[-2]), int(pixels.shape[-1]))

        self.handles.append(self.tower.register_forward_pre_hook(remember, with_kwargs=True))
        super().install()


def _weighted_mean(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``sum_i s_i x_i / sum_i s_i`` over the tokens of ``x [B, T, C]`` (fp32 weights), in ``x.dtype``."""
    w = size.float()[..., None]
    return ((x.float() * w).sum(dim=1) / w.sum(dim=1)).to(x.dtype)
