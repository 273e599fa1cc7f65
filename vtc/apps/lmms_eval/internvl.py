"""``vtc_internvl``: lmms-eval's ``internvl_hf`` wrapper (chat only upstream; the HF-format InternVL 3 / 3.5
checkpoints, ``InternVLForConditionalGeneration``) with vtc in front.

Upstream tiles each image (``min_patches`` / ``max_patches``, its own arguments) and vtc treats the tiles and the
thumbnail of one image as partitions of that image (:mod:`vtc.adapters.internvl`)."""

from __future__ import annotations

from lmms_eval.models.chat.internvl_hf import InternVLHf as _InternVLHfChat

from .wrapper import VtcWrapper

__all__ = ["VtcInternVLChat"]


class VtcInternVLChat(VtcWrapper, _InternVLHfChat):
    """lmms-eval's chat ``internvl_hf`` wrapper, compressed by vtc."""
