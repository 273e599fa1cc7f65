"""The ``KV_CACHE`` stage: multimodal KV-cache compression at decode time, with its own budget.

After the prefill of a call with visual input, every decoder layer's KV cache is cut to ``kv_budget`` of the
prompt's entries (per sample: ``k = max(1, floor(kv_budget * L + 0.5))`` of its ``L`` prompt rows, the rule of
:mod:`vtc.budget`); evicted entries are merged into kept ones. A compressor may also evict during decoding
(Elastic Cache's fixed-point elimination). The stage stacks with any method that acts before the LLM: the
visual method shortens the prompt, the KV stage then compresses the cache that prompt left.

.. code-block:: python

    vtc.compress(model, "lookm", budget=0.2)  # the KV stage alone (budget: the KV fraction)
    vtc.compress(model, "divprune", budget=0.25, kv="lookm", kv_budget=0.5)  # tokens, then the cache
    vtc.compress(model, "divprune", kv=vtc.kv.LookMConfig(kv_budget=0.5, merge="avg"))

A compressor (:class:`KVCompressor`) only sees tensors of one sample and one layer: the layer's cached keys
and values of the prompt rows, the attention each row received during the prefill (recomputed from the layer's
own queries and keys, so the model keeps SDPA / FlashAttention) and which rows are visual. The hooks that run it
and keep masks and positions consistent are :mod:`vtc.adapters.llm_kv`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..budget import keep_count
from ..config import check_float

__all__ = [
    "KVConfig",
    "KVCompressor",
    "register_kv",
    "get_kv",
    "list_kv",
    "kv_config",
    "LookMConfig",
    "ElasticCacheConfig",
    "RandomKVConfig",
]


@dataclasses.dataclass
class KVConfig:
    """Options every KV-cache compressor accepts.

    Args:
        kv_budget: fraction in (0, 1] of each sample's prompt KV entries every layer keeps after the prefill
            (``1.0``: the untouched cache).
    """

    method: ClassVar[str] = ""

    kv_budget: float = 0.2

    def __post_init__(self) -> None:
        check_float("kv_budget", self.kv_budget)
        if not 0 < self.kv_budget <= 1:
            raise ValueError(f"kv_budget must be a fraction in (0, 1], got {self.kv_budget!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kv": self.method, **dataclasses.asdict(self)}


class KVCompressor:
    """Compresses one layer's cache of one sample after the prefill (and, optionally, during decoding).

    ``scores`` says which attention statistics :meth:`prefill` receives: ``"heads"`` (per KV head, the attention
    each prompt row received, summed over the prefill's queries and the query heads of its group) or ``"mean"``
    (the same summed over queries, averaged over all query heads).
    """

    name: ClassVar[str] = ""
    scores: ClassVar[str] = "heads"

    def __init__(self, config: KVConfig):
        self.config = config

    def keep(self, n: int) -> int:
        """KV entries a sample with ``n`` rows keeps (the prompt after prefill; Elastic Cache: every row seen)."""
        return keep_count(float(self.config.kv_budget), n)

    def prefill(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, visual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``keys, values [Hkv, L, d]`` of one sample's prompt rows (in order), ``scores`` (``[Hkv, L]`` or
        ``[L]``, fp32), ``visual [L]`` bool. Returns the kept ``keys, values [Hkv, K, d]`` in row order, ``K <=
        keep(L)``, and a state for :meth:`evict` (None: nothing more at decode time)."""
        raise NotImplementedError

    def evict(self, state: Any, seen: int, length: int) -> int | None:
        """At a decode step, after the layer appended the new row: the entry (index among the sample's ``length``
        cached entries) to drop, or None. ``seen``: rows the sample has had so far (prompt plus generated)."""
        return None


_KV: dict[str, tuple[type[KVConfig], type[KVCompressor]]] = {}


def register_kv(name: str, config: type[KVConfig]):
    """Class decorator registering a KV-cache compressor under ``name`` with its config dataclass."""

    def wrap(cls: type[KVCompressor]) -> type[KVCompressor]:
        cls.name = name
        config.method = name
        _KV[name] = (config, cls)
        return cls

    return wrap


def get_kv(name: str) -> tuple[type[KVConfig], type[KVCompressor]]:
    try:
        return _KV[name]
    except KeyError:
        raise ValueError(f"unknown KV-cache method {name!r}; available: {sorted(_KV)}") from None


def list_kv() -> list[str]:
    """Names of the registered KV-cache compressors."""
    return sorted(_KV)


def kv_config(kv: Any, kv_budget: Any = None, options: Mapping[str, Any] | None = None) -> KVConfig:
    """The config of ``kv`` (a registered name or a :class:`KVConfig`), with ``kv_budget`` and ``options``."""
    options = dict(options or {})
    if isinstance(kv, KVConfig):
        if kv_budget is not None or options:
            raise TypeError("pass kv_budget and KV options inside the KV config object, not as keywords")
        return kv
    if not isinstance(kv, str):
        raise TypeError(f"kv must be a KV-cache method name {list_kv()} or a KVConfig, got {type(kv).__name__}")
    config_cls, _ = get_kv(kv)
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for KV method {kv!r}; valid options: {sorted(valid)}")
    if kv_budget is not None:
        options["kv_budget"] = kv_budget
    return config_cls(**options)


def compressor_for(config: KVConfig) -> KVCompressor:
    return get_kv(config.method)[1](config)


from .elastic_cache import ElasticCacheConfig  # noqa: E402  (registers)
from .lookm import LookMConfig  # noqa: E402  (registers)
from .random_kv import RandomKVConfig  # noqa: E402  (registers)


def kv_only(config: KVConfig) -> Any:
    """The visual-stage method of a KV-only compression: every image passes untouched (``budget=1.0``); the record
    carries the KV method's name."""
    from ..config import MethodConfig
    from ..contexts import Stage
    from ..method import Method

    class KVOnly(Method):
        stages = (Stage.PRE_LLM,)

    method = KVOnly(MethodConfig(budget=1.0))
    method.name = config.method
    return method
