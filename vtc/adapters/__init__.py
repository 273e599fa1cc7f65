"""Model-family adapters, keyed by ``model.config.model_type`` (data, not ``isinstance`` checks).

Standalone vision transformers (timm, open_clip) have no ``model_type``; they are recognised by the
qualified names of their classes (:data:`vtc.adapters.vit.STANDALONE`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..contexts import Stage
from .base import Adapter, UnsupportedModelError
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_video import LlavaNextVideoAdapter, LlavaOnevisionAdapter
from .qwen2_vl import QwenVLAdapter
from .vit import STANDALONE

#: model_type -> adapter class
ADAPTERS: dict[str, type[Adapter]] = {
    t: cls
    for cls in (LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, LlavaNextVideoAdapter, QwenVLAdapter)
    for t in cls.model_types
}

__all__ = ["Adapter", "ADAPTERS", "UnsupportedModelError", "adapter_for", "families_supporting"]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``, or an :class:`UnsupportedModelError` naming the supported types."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type](model)
    for cls in STANDALONE:
        if cls.detect(model):
            return cls(model)
    raise UnsupportedModelError(
        f"vtc does not support {type(model).__name__} (model_type={model_type!r}); supported model types: "
        f"{sorted(ADAPTERS)}; standalone vision models: {[c for a in STANDALONE for c in a.model_classes]}"
    )


def families_supporting(stages: Iterable[Stage]) -> list[str]:
    need = set(stages)
    return sorted({cls.family for cls in (*ADAPTERS.values(), *STANDALONE) if need <= cls.stages})
