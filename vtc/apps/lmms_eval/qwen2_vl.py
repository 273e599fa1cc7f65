"""``vtc_qwen2_vl``: lmms-eval's ``qwen2_vl`` wrapper (simple only, as upstream) with vtc in front."""

from __future__ import annotations

from lmms_eval.models.simple.qwen2_vl import Qwen2_VL as _Qwen2VLSimple

from .wrapper import VtcWrapper

__all__ = ["VtcQwen2VL"]


class VtcQwen2VL(VtcWrapper, _Qwen2VLSimple):
    """lmms-eval's simple ``qwen2_vl`` wrapper, compressed by vtc."""
