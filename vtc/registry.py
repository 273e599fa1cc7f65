"""Method registry: ``@register_method`` on the class, next to its config; nothing else to keep in step."""

from __future__ import annotations

import dataclasses

from .config import MethodConfig
from .contexts import Stage
from .method import KINDS, Method

__all__ = ["Method", "MethodInfo", "register_method", "get_method", "list_methods"]


@dataclasses.dataclass(frozen=True)
class MethodInfo:
    name: str
    kind: str
    stages: tuple[Stage, ...]
    config_class: type[MethodConfig]
    method_class: type[Method]
    summary: str

    @property
    def budget_counts(self) -> str:
        """What a budget's ``k`` counts: ``"pre_llm"``, the tokens of each image in the prompt the LLM receives
        (a method with a stage before the LLM; a later stage inside the LLM acts on top: HoliTom's inner merge,
        ToDRE's conditional drop, DyCoke's decode-time selection), or ``"last_stage"``, the tokens left after
        the method's last stage inside the LLM (FastV, PyramidDrop; MustDrop, whose tower merge is threshold-driven:
        ``Method.cuts_in_llm``)."""
        if self.method_class.cuts_in_llm:
            return "last_stage"
        return "pre_llm" if {Stage.PRE_LLM, Stage.VISION_MERGE} & set(self.stages) else "last_stage"

    def to_dict(self) -> dict:
        """``name``, ``kind``, ``stages``, ``budget_counts``, ``families`` (the model types it compresses: their
        adapter has its stages and takes one of its modalities), ``modalities`` and ``summary``."""
        from .adapters.registry import families_supporting

        return {
            "name": self.name,
            "kind": self.kind,
            "stages": [s.value for s in self.stages],
            "budget_counts": self.budget_counts,
            "families": families_supporting(self.stages, self.method_class.modalities),
            "modalities": list(self.method_class.modalities),
            "summary": self.summary,
        }


_REGISTRY: dict[str, MethodInfo] = {}


def register_method(name: str, config: type[MethodConfig], kind: str, stages: tuple[Stage, ...]):
    """Class decorator registering a method under ``name`` with its config dataclass."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if not name or name != name.lower():
        raise ValueError(f"method names are lowercase, got {name!r}")

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name].method_class is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].method_class.__qualname__}")
        cls.name, cls.config_class, cls.kind, cls.stages = name, config, kind, tuple(stages)
        config.method = name
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = MethodInfo(name, kind, tuple(stages), config, cls, summary)
        return cls

    return wrap


def get_method(name: str) -> MethodInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available methods: {sorted(_REGISTRY)}") from None


def list_methods() -> list[MethodInfo]:
    """All registered methods, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
