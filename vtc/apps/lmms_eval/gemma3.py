"""``vtc_gemma3``: lmms-eval's ``gemma3`` wrapper (simple only upstream) with vtc in front (images; vtc compresses
Gemma 3 in the vision tower and before the language model, see :mod:`vtc.adapters.gemma3`)."""

from __future__ import annotations

from lmms_eval.models.simple.gemma3 import Gemma3 as _Gemma3Simple

from .wrapper import VtcWrapper

__all__ = ["VtcGemma3"]


class VtcGemma3(VtcWrapper, _Gemma3Simple):
    """lmms-eval's simple ``gemma3`` wrapper, compressed by vtc."""
