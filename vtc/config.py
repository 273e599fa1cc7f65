"""Base configuration shared by every method.

Each method defines a dataclass deriving from :class:`MethodConfig` next to its implementation and
registers both with :func:`vtc.registry.register_method`. Fields are validated in ``__post_init__``
(``ValueError``/``TypeError``, never ``assert``) and round-trip through :meth:`MethodConfig.to_dict` /
:meth:`MethodConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from .budget import Budget, validate_budget

POSITION_POLICIES = ("compact", "original")
#: the stages whose position policy can be set apart: the prompt the LLM receives, the rows left inside the LLM
POSITION_STAGES = ("pre_llm", "llm_layer")
NEWLINE_POLICIES = ("drop", "keep_rows", "candidates")


@dataclasses.dataclass
class MethodConfig:
    """Options every method accepts.

    Args:
        budget: fraction in (0, 1] or absolute count >= 1 of visual tokens kept (see :mod:`vtc.budget`).
        positions: ``"compact"`` renumbers the kept sequence 0..L'-1; ``"original"`` keeps every token's
            position id from the sequence before the stage (gaps where tokens were removed). A dict sets it per
            stage, ``{"pre_llm": ..., "llm_layer": ...}`` (the prompt the LLM receives; the rows left inside the
            LLM); a string sets both. ``None`` (or a stage left out) uses the method's default (the behaviour of
            its official code, which may differ per stage: HoliTom renumbers its pre-LLM stage and keeps
            positions inside the LLM), unless the model family requires one (Qwen2-VL's M-RoPE always uses
            ``"original"``).
        newlines: what happens to row-separator tokens (LLaVA-NeXT / OneVision) before the LLM:
            ``"drop"`` the method chooses among patch tokens only and no separator reaches the LLM (HiRED,
            VisionZip, MMTok official NeXT paths); ``"keep_rows"`` additionally keeps the separator of every
            row that still has a kept token, on top of the ``k`` tokens; ``"candidates"`` separators are
            ordinary tokens the method may keep (DivPrune). ``None``: the method's default. ``k`` is always
            computed on all the image's tokens, separators included.
    """

    method: ClassVar[str] = ""

    budget: Budget = 0.2
    positions: str | dict[str, str] | None = None
    newlines: str | None = None

    def __post_init__(self) -> None:
        self.budget = validate_budget(self.budget)
        check_positions(self.positions)
        if self.newlines is not None and self.newlines not in NEWLINE_POLICIES:
            raise ValueError(f"newlines must be one of {NEWLINE_POLICIES} or None, got {self.newlines!r}")

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict of the fields (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        """Build a config from a dict, rejecting unknown keys with the list of valid ones."""
        check_options(cls, data.keys())
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


def check_positions(positions: object) -> None:
    """``positions`` is None, a policy, or a dict of policies keyed by ``POSITION_STAGES``."""
    if positions is None or positions in POSITION_POLICIES:
        return
    if isinstance(positions, dict):
        unknown = sorted(set(positions) - set(POSITION_STAGES))
        if unknown:
            raise ValueError(f"positions: unknown stage(s) {unknown}; stages: {list(POSITION_STAGES)}")
        bad = {k: v for k, v in positions.items() if v is not None and v not in POSITION_POLICIES}
        if not bad:
            return
    raise ValueError(
        f"positions must be one of {POSITION_POLICIES}, a dict of them keyed by {list(POSITION_STAGES)}, or None, "
        f"got {positions!r}"
    )


def check_options(config_cls: type[MethodConfig], names: Iterable[str]) -> None:
    """Raise a ``TypeError`` naming any option the config class does not define."""
    valid = config_cls.field_names()
    unknown = sorted(set(names) - set(valid))
    if unknown:
        label = f"method {config_cls.method!r}" if config_cls.method else config_cls.__name__
        raise TypeError(f"unknown option(s) {unknown} for {label}; valid options: {sorted(valid)}")


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_int(name: str, value: object, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_float(name: str, value: object, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if value != value:  # NaN
        raise ValueError(f"{name} must not be NaN")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
