"""The user-facing verbs: compress, restore, compressed, last_record, list_methods."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

from torch import nn

from .adapters import adapter_for, kv_stage
from .config import MethodConfig, check_options
from .contexts import Stage
from .kv import compressor_for, kv_config, kv_only, list_kv
from .method import Method
from .record import Record
from .registry import MethodInfo, get_method
from .registry import list_methods as _list_methods
from .session import Session
from .stack import Stack, StackConfig, stack_config

#: The method used when ``method`` is omitted. DivPrune: it needs nothing but the projected visual tokens,
#: so it works on every family, image and video, with the model on SDPA/FlashAttention and no text; it is
#: among the strongest training-free pruners in independent benchmarks (UniPruneBench), well ahead of
#: the random and pooling baselines that beat many attention-score methods there (docs/methods/divprune.md).
DEFAULT_METHOD = "divprune"

_SESSIONS: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()
#: the record of the last call under a compression that was since removed (``last_record`` after ``restore``)
_RESTORED: weakref.WeakKeyDictionary[nn.Module, Record] = weakref.WeakKeyDictionary()


def _build_config(method: Any, budget: Any, options: dict[str, Any]) -> MethodConfig:
    if isinstance(method, MethodConfig):
        if options:
            raise TypeError(f"pass options inside the config object, not as keywords: {sorted(options)}")
        if not isinstance(method, StackConfig):
            get_method(method.method)  # registered?
        return method
    if isinstance(method, list | tuple):
        return stack_config(method, budget, options)
    if isinstance(method, str) and "+" in method:  # "pool+divprune": the same stack, as one string
        return stack_config(method.split("+"), budget, options)
    if method is not None and not isinstance(method, str):
        raise TypeError(
            f"method must be a method name, a list of them (a stack) or a config object, got {type(method).__name__}"
        )
    info = get_method(DEFAULT_METHOD if method is None else method)
    check_options(info.config_class, options)
    return info.config_class(budget=budget, **options)


def compress(
    model: nn.Module, method: Any = None, budget: Any = 0.2, *, kv: Any = None, kv_budget: Any = None, **options: Any
) -> nn.Module:
    """Compress the visual tokens of ``model`` in place and return the same object.

    Args:
        model: a stock Hugging Face VLM (see ``vtc.adapters.ADAPTERS`` for the supported model types), or a
            standalone timm / open_clip vision transformer (token merging in its blocks: ``method="tome"``).
        method: a registered method name (``vtc.list_methods()``), a method config object, a list of names or
            configs, or names joined by ``+`` (a stack of methods at successive hook points, :mod:`vtc.stack`), or
            None for :data:`DEFAULT_METHOD`.
        budget: float in (0, 1] (fraction of visual tokens kept) or int >= 1 (tokens kept per image).
        **options: method options (fields of the method's config dataclass; for a stack, its own: ``keep``,
            ``positions``, ``newlines``).
        kv: a KV-cache method (:mod:`vtc.kv`: ``"lookm"``, ``"elastic_cache"``, or a ``KVConfig``) that compresses
            the KV cache after the prefill and while decoding, on top of ``method``'s visual tokens. ``method``
            may itself name a KV-cache method: the KV stage alone, ``budget`` (or ``kv_budget``) its fraction
            and ``options`` its options.
        kv_budget: fraction in (0, 1] of each layer's prompt KV entries kept (with ``kv``; default: the KV
            method's own).

    Compressing a model that is already compressed warns and replaces the previous compression.
    Nothing about the model changes when an argument is invalid.
    """
    if isinstance(method, str) and method in list_kv() and kv is None:  # the KV-cache stage alone
        kv_cfg = kv_config(method, budget if kv_budget is None else kv_budget, options)
        instance = kv_only(kv_cfg)
        config = instance.config
    else:
        if kv is None and kv_budget is not None:
            raise TypeError("kv_budget is the budget of a KV-cache method: pass kv= too (e.g. kv='lookm')")
        kv_cfg = None if kv is None else kv_config(kv, kv_budget)
        config = _build_config(method, budget, options)
        instance = _instance(config)
        if kv_cfg is not None and Stage.LLM_LAYER in instance.stages:
            raise ValueError(
                f"kv={kv_cfg.method!r} stacks with methods that act before the LLM; {instance.name!r} prunes inside "
                f"the LLM, whose shortened layers the KV stage cannot follow yet"
            )
    adapter = adapter_for(model)
    missing = set(instance.stages) - set(adapter.stages)
    if missing:
        hint = " (tower_stage=False runs it without its tower stage)" if hasattr(config, "tower_stage") else ""
        raise ValueError(
            f"method {instance.name!r} acts at {sorted(s.value for s in missing)}, which the {adapter.family} "
            f"adapter does not provide{hint}"
        )
    stage = None if kv_cfg is None else kv_stage(adapter, compressor_for(kv_cfg))
    session = Session(model, adapter, instance, config, stage)
    _RESTORED.pop(model, None)
    if model in _SESSIONS:
        previous = _SESSIONS[model]
        warnings.warn(
            f"model is already compressed with {previous.method.name!r}; replacing it with {instance.name!r} "
            f"(call vtc.restore(model) first to silence this)",
            UserWarning,
            stacklevel=2,
        )
        restore(model)
    session.attach()
    _SESSIONS[model] = session
    return model


def _instance(config: MethodConfig) -> Method:
    return Stack(config) if isinstance(config, StackConfig) else get_method(config.method).method_class(config)


def method_for(method: Any = None, budget: Any = 0.2, **options: Any) -> Method:
    """The method object :func:`compress` would attach for these arguments, without a model (a stack for a list
    or ``"a+b"``): its ``name``, ``stages``, ``modalities`` and ``reads_prompt``, for tools that sort methods.
    Raises what :func:`compress` raises for a bad name or option."""
    return _instance(_build_config(method, budget, options))


def known_method(name: str) -> bool:
    """Whether :func:`compress` takes ``name``: a registered method, or a stack of them written ``a+b``."""
    try:
        method_for(name)
    except (ValueError, TypeError):
        return False
    return True


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`compress`: the original class, no hooks, no extra attributes; bit-exact outputs.

    :func:`last_record` still returns the record of the last call made under the removed compression.
    """
    session = _SESSIONS.pop(model, None)
    if session is None:
        raise ValueError("restore(): this model is not compressed by vtc (nothing to restore)")
    session.detach()
    if session.record is not None:
        _RESTORED[model] = session.record
    return model


@contextlib.contextmanager
def compressed(
    model: nn.Module, method: str | MethodConfig | None = None, budget: Any = 0.2, **options: Any
) -> Iterator[nn.Module]:
    """``with vtc.compressed(model, ...):`` compresses inside the block and puts the model back after.

    If the model was already compressed, the previous compression is re-applied on exit. After the block,
    :func:`last_record` returns the record of the block's last call (until the model is compressed again;
    with a previous compression re-applied, that one's). A ``vtc.restore(model)`` inside the block is allowed.
    """
    previous = _SESSIONS.get(model)
    if previous is not None:
        _SESSIONS.pop(model)
        previous.detach()
    try:
        compress(model, method, budget, **options)
    except BaseException:
        if previous is not None:
            previous.attach()
            _SESSIONS[model] = previous
        raise
    try:
        yield model
    finally:
        if model in _SESSIONS:  # unless the block restored it already
            restore(model)
        if previous is not None:
            previous.attach()
            _SESSIONS[model] = previous


def is_compressed(model: nn.Module) -> bool:
    return model in _SESSIONS


def session_of(model: nn.Module) -> Session | None:
    """The :class:`~vtc.session.Session` that :func:`compress` attached to ``model`` (None if not compressed).

    For inspection and tools (benchmarks, tests): its ``method``, ``adapter``, ``recorder`` and ``prepare``.
    """
    return _SESSIONS.get(model)


def last_record(model: nn.Module) -> Record:
    """The :class:`~vtc.record.Record` of the last compressed call on ``model``.

    After :func:`restore` (or the end of a :func:`compressed` block) it is the last call's under the compression
    that was removed, until the model is compressed again.
    """
    session = _SESSIONS.get(model)
    if (session is None or session.record is None) and model in _RESTORED:
        return _RESTORED[model]
    if session is None:
        raise ValueError("last_record(): this model is not compressed by vtc")
    if session.record is None:
        raise ValueError("last_record(): no call with visual input has run since vtc.compress")
    return session.record


def list_methods() -> list[MethodInfo]:
    """Registered methods (name, kind, stages, config class; ``.to_dict()`` adds families and modalities)."""
    return _list_methods()
