"""lmms-eval model plugin: ``--model vtc_llava_hf | vtc_qwen2_vl | vtc_qwen2_5_vl | vtc_qwen3_vl | vtc_internvl |
vtc_gemma3`` in lmms-eval.

Installed with ``pip install 'vtc-compress[lmms-eval]'``; lmms-eval (>= 0.6) finds :func:`manifests` through the
``lmms_eval.models`` entry-point group and imports a wrapper module only when its model is asked for. Each
wrapper is lmms-eval's own class with :class:`~vtc.apps.lmms_eval.wrapper.VtcWrapper` in front::

    lmms-eval --model vtc_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=hired,budget=0.2 --tasks ...

``method=none`` runs the same wrapper uncompressed (the baseline, with identical prompts). See
``docs/lmms_eval.md`` for the install pins, the arguments and an offline local-data task.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODELS", "manifests"]

_BASE = "vtc.apps.lmms_eval"

#: model id -> (simple class path, chat class path); the same kinds as the upstream wrapper each one extends
MODELS: dict[str, tuple[str | None, str | None]] = {
    # LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (HF classes), chosen by upstream from config.model_type
    "vtc_llava_hf": (f"{_BASE}.llava_hf.VtcLlavaHf", f"{_BASE}.llava_hf.VtcLlavaHfChat"),
    "vtc_qwen2_vl": (f"{_BASE}.qwen2_vl.VtcQwen2VL", None),  # upstream qwen2_vl is simple only
    "vtc_qwen2_5_vl": (f"{_BASE}.qwen2_5_vl.VtcQwen2_5VL", f"{_BASE}.qwen2_5_vl.VtcQwen2_5VLChat"),
    "vtc_qwen3_vl": (f"{_BASE}.qwen3_vl.VtcQwen3VL", f"{_BASE}.qwen3_vl.VtcQwen3VLChat"),
    "vtc_internvl": (None, f"{_BASE}.internvl.VtcInternVLChat"),  # upstream internvl_hf is chat only
    "vtc_gemma3": (f"{_BASE}.gemma3.VtcGemma3", None),  # upstream gemma3 is simple only
}


def manifests() -> list[Any]:
    """The ``ModelManifest`` of every vtc wrapper (the ``lmms_eval.models`` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id=name, simple_class_path=simple, chat_class_path=chat)
        for name, (simple, chat) in MODELS.items()
    ]
