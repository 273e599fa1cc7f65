"""The adapter registry: ``@register_adapter`` at each adapter's definition, nothing else to keep in step.

Vision-language families are keyed by ``model.config.model_type`` (data, not ``isinstance`` checks).
Standalone vision transformers (timm, open_clip) have no ``model_type``; they are recognised by the
qualified names of their classes (``model_classes``), in registration order.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..contexts import Stage
from .base import Adapter, UnsupportedModelError

#: model_type -> adapter class
ADAPTERS: dict[str, type[Adapter]] = {}
#: standalone adapters, tried in order when a model has no known ``config.model_type``
STANDALONE: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: serve every ``cls.model_types`` with ``cls`` (or, without them, detect by class name)."""
    if cls.model_types:
        for model_type in cls.model_types:
            if ADAPTERS.get(model_type, cls) is not cls:
                raise ValueError(f"model_type {model_type!r} is already served by {ADAPTERS[model_type].__name__}")
            ADAPTERS[model_type] = cls
    elif cls not in STANDALONE:
        STANDALONE.append(cls)
    return cls


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


def families_supporting(stages: Iterable[Stage], modalities: Iterable[str] = ("image", "video")) -> list[str]:
    """The model types (and standalone families) a method acting at ``stages`` on ``modalities`` can compress:
    their adapter provides every stage and takes at least one of the modalities."""
    need, takes = set(stages), set(modalities)
    # a tower merge followed by in-LLM pruning needs the merged token set in the LLM (no unmerge: check_tower_merge)
    grid = {Stage.VISION_MERGE, Stage.LLM_LAYER} <= need
    out = {
        t
        for t, cls in ADAPTERS.items()
        if need <= cls.stages and takes & set(cls.inputs) and not (grid and cls.tower_unmerge)
    }
    out |= {cls.family for cls in STANDALONE if need <= cls.stages and takes & set(cls.inputs)}
    return sorted(out)
