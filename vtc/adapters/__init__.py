"""Model-family adapters: one file per family, registered at their definition (:mod:`vtc.adapters.registry`).

Importing this package imports every family module, so every adapter is registered; the rest of vtc reaches
adapters only through :func:`adapter_for` and :func:`families_supporting`.
"""

from __future__ import annotations

from . import gemma3, internvl, llava, qwen2_vl, qwen3_vl, vit  # noqa: F401  (registers the families)
from .base import Adapter, UnsupportedModelError
from .llm_kv import kv_stage
from .registry import ADAPTERS, STANDALONE, adapter_for, families_supporting, register_adapter

__all__ = [
    "Adapter",
    "ADAPTERS",
    "STANDALONE",
    "UnsupportedModelError",
    "adapter_for",
    "families_supporting",
    "kv_stage",
    "register_adapter",
]
