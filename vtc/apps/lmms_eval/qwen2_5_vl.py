"""``vtc_qwen2_5_vl``: lmms-eval's ``qwen2_5_vl`` wrappers (simple and chat) with vtc in front."""

from __future__ import annotations

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5VLChat
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5VLSimple

from .wrapper import VtcWrapper

__all__ = ["VtcQwen2_5VL", "VtcQwen2_5VLChat"]


class VtcQwen2_5VL(VtcWrapper, _Qwen2_5VLSimple):
    """lmms-eval's simple ``qwen2_5_vl`` wrapper, compressed by vtc (``--force_simple``)."""


class VtcQwen2_5VLChat(VtcWrapper, _Qwen2_5VLChat):
    """lmms-eval's chat ``qwen2_5_vl`` wrapper, compressed by vtc (the default for ``vtc_qwen2_5_vl``)."""
