"""vtc's arguments in an lmms-eval ``--model_args`` string: ``method``, ``budget``, method options, ``strict``.

lmms-eval hands a wrapper its ``--model_args`` as keyword arguments, after its own conversion of each value
(``true``/``false`` -> bool, digits -> int, anything ``float()`` accepts -> float, else the string). Values
built in Python (``simple_evaluate(model_args={...})``) or by other tools arrive as plain strings. This
module takes vtc's keys off that dict and turns their values into the types of the method's config
dataclass fields; the config itself is built and validated by :func:`vtc.api._build_config`, exactly as
``vtc.compress`` does, so every error a user can get here is the error ``vtc.compress`` gives.

Keys:

* ``method``: a registered method name, or ``none`` to run the wrapper uncompressed (the baseline with the
  same prompts); omitted: vtc's default method (:data:`vtc.DEFAULT_METHOD`), as in ``vtc.compress``.
* ``budget``: as in ``vtc.compress``: ``0.2`` is a fraction of the visual tokens, ``64`` a count per image.
* ``strict`` (default true): an exception inside the model's ``generate`` fails the run instead of being
  logged and turned into an empty answer by the upstream wrapper.
* any other key that the upstream wrapper's constructor does not name is a method option
  (``alpha=0.3``); ``vtc_<option>=...`` forces a key to be a method option.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any

from ...api import DEFAULT_METHOD, _build_config, compress
from ...config import MethodConfig
from ...registry import get_method, list_methods
from ...stack import StackConfig

__all__ = ["NONE", "OPTION_PREFIX", "VtcArgs", "split_args", "coerce"]

#: the ``method`` value that runs the wrapper uncompressed
NONE = "none"
#: prefix that marks a key as a method option even when the upstream wrapper has a parameter of that name
OPTION_PREFIX = "vtc_"

_MISSING = object()
_INT = re.compile(r"[+-]?\d+")


@dataclasses.dataclass(frozen=True)
class VtcArgs:
    """What the wrapper applies once the upstream model is loaded.

    Attributes:
        config: the validated method config; ``None`` for ``method=none`` (no compression).
        strict: re-raise exceptions from the model's ``generate`` instead of letting upstream swallow them.
    """

    config: MethodConfig | None
    strict: bool = True


def split_args(kwargs: Mapping[str, Any], upstream_params: Collection[str]) -> tuple[VtcArgs, dict[str, Any]]:
    """Separate vtc's arguments from the upstream wrapper's and validate them before any model is loaded.

    Args:
        kwargs: the wrapper's keyword arguments (``--model_args`` after lmms-eval's parsing).
        upstream_params: parameter names of the upstream wrapper's constructor; those keys stay upstream.

    Returns:
        ``(vtc_args, upstream_kwargs)``.

    Raises:
        ValueError / TypeError: the messages of ``vtc.compress`` for a bad method, budget or option, or a
            budget/option given with ``method=none``.
    """
    rest = dict(kwargs)
    method = rest.pop("method", None)
    budget = rest.pop("budget", _MISSING)
    strict = coerce(rest.pop("strict", True), bool)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be true or false, got {strict!r}")
    options: dict[str, Any] = {}
    upstream: dict[str, Any] = {}
    for key, value in rest.items():
        if key.startswith(OPTION_PREFIX):
            options[key[len(OPTION_PREFIX) :]] = value
        elif key in upstream_params:
            upstream[key] = value
        else:
            options[key] = value

    if method is not None and not isinstance(method, str):
        raise TypeError(f"method must be a method name or {NONE!r}, got {method!r}")
    if method is not None and method.lower() == NONE:
        given = (["budget"] if budget is not _MISSING else []) + sorted(options)
        if given:
            raise ValueError(
                f"method={NONE} runs the model uncompressed and takes no vtc options, got {given}; drop them or "
                f"name a method (available: {[info.name for info in list_methods()]})"
            )
        return VtcArgs(None, strict), upstream

    name = DEFAULT_METHOD if method is None else method
    config_class = StackConfig if "+" in name else get_method(name).config_class  # "a+b": a stack's own options
    hints = _field_types(config_class)
    if budget is _MISSING:
        budget = inspect.signature(compress).parameters["budget"].default
    budget = coerce(budget, hints["budget"])
    # Unknown names are passed through untouched: _build_config rejects them with the list of valid ones.
    options = {name: coerce(value, hints[name]) if name in hints else value for name, value in options.items()}
    return VtcArgs(_build_config(name, budget, options), strict), upstream


def coerce(value: Any, hint: Any) -> Any:
    """Turn ``value`` into the type ``hint`` names (``int``, ``float | int``, ``tuple[int, ...] | None``...).

    Strings are parsed (``"64"`` -> 64, ``"0.2"`` -> 0.2, ``"none"`` -> None, ``"8;16;24"`` -> (8, 16, 24)); values
    lmms-eval already converted are fixed where its guess lost the type (``"-1"`` arrives as ``-1.0``). A
    value that fits none of the types is returned unchanged, so the config's own validation names it.
    """
    members = _members(hint)
    if isinstance(value, str):
        members = sorted(members, key=_priority)
        for member in members:
            parsed = _parse(value, member)
            if parsed is not _MISSING:
                return parsed
        return value
    if any(type(value) is member for member in members):
        return value
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and int in members and float not in members and value.is_integer():
        return int(value)
    if isinstance(value, int) and float in members and int not in members:
        return float(value)
    for member in members:
        if typing.get_origin(member) is tuple:
            items = value if isinstance(value, list | tuple) else [value]
            return tuple(coerce(item, _element(member)) for item in items)
    return value


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _priority(member: Any) -> int:
    """Order in which a string is tried against a union's types: "none", "2", "true" before any str."""
    order = {type(None): 0, bool: 1, int: 2, float: 3}
    if member in order:
        return order[member]
    return 5 if member is str or member is Any else 4


def _element(tuple_hint: Any) -> Any:
    args = typing.get_args(tuple_hint)
    return args[0] if args else Any


def _parse(text: str, member: Any) -> Any:
    """``text`` as one type of a union, or ``_MISSING`` when it does not read as that type."""
    word = text.strip()
    if member is type(None):
        return None if word.lower() in ("none", "null") else _MISSING
    if member is bool:
        return {"true": True, "false": False}.get(word.lower(), _MISSING)
    if member is int:
        return int(word) if _INT.fullmatch(word) else _MISSING
    if member is float:
        try:
            return float(word)
        except ValueError:
            return _MISSING
    if member is str or member is Any:
        return text
    if typing.get_origin(member) is tuple:
        element = _element(member)
        items = tuple(coerce(item, element) for item in re.split(r"[;\s,]+", word.strip("[]()")) if item)
        if element in (int, float, bool) and not all(type(item) is element for item in items):
            return _MISSING
        return items
    return _MISSING


def _field_types(config_class: type[MethodConfig]) -> dict[str, Any]:
    """The annotated type of each dataclass field of a method config (annotations are strings here)."""
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}
