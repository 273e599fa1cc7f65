"""``vtc_llava_hf``: lmms-eval's ``llava_hf`` wrappers (simple and chat) with vtc in front.

Covers the HF classes upstream picks from ``config.model_type``: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision.
"""

from __future__ import annotations

import os
from typing import Any

from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf as _LlavaHfSimple

from .wrapper import VtcWrapper

__all__ = ["VtcLlavaHf", "VtcLlavaHfChat"]


def _device_map_default(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Upstream's default ``device_map=""`` is refused by transformers 5 in a single process: use ``device``.

    Under ``accelerate launch`` (several processes) the empty default is kept: upstream reads it as
    "data parallel, one GPU per process".
    """
    if "device_map" in kwargs or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return kwargs
    return {**kwargs, "device_map": str(kwargs.get("device", "cuda"))}


class VtcLlavaHf(VtcWrapper, _LlavaHfSimple):
    """lmms-eval's simple ``llava_hf`` wrapper, compressed by vtc (``--force_simple``)."""

    def upstream_defaults(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return _device_map_default(kwargs)


class VtcLlavaHfChat(VtcWrapper, _LlavaHfChat):
    """lmms-eval's chat ``llava_hf`` wrapper, compressed by vtc (the default for ``vtc_llava_hf``)."""

    def upstream_defaults(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return _device_map_default(kwargs)
