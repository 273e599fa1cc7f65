"""``vtc_qwen3_vl``: lmms-eval's ``qwen3_vl`` wrappers (simple and chat) with vtc in front (images and videos;
DeepStack features are gathered with the kept tokens, see :mod:`vtc.adapters.qwen3_vl`)."""

from __future__ import annotations

from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as _Qwen3VLChat
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL as _Qwen3VLSimple

from .wrapper import VtcWrapper

__all__ = ["VtcQwen3VL", "VtcQwen3VLChat"]


class VtcQwen3VL(VtcWrapper, _Qwen3VLSimple):
    """lmms-eval's simple ``qwen3_vl`` wrapper, compressed by vtc (``--force_simple``)."""


class VtcQwen3VLChat(VtcWrapper, _Qwen3VLChat):
    """lmms-eval's chat ``qwen3_vl`` wrapper, compressed by vtc (the default for ``vtc_qwen3_vl``)."""
