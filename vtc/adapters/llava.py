"""The LLaVA families: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision and LLaVA-NeXT-Video, as data on the VLM base.

Each family is the :class:`~vtc.adapters.vlm.VLMAdapter` template (a CLIP / SigLIP / DINOv2 tower, an MLP
projector, a 1-D RoPE LLM) plus the modalities it takes and the stages it offers:

* ``llava`` (LLaVA-1.5): images, one raster grid each (576 tokens for CLIP ViT-L/14-336 with the
  ``"default"`` strategy that drops CLS). The only family whose LLM takes a merged token set: with token
  merging inside the tower (``VISION_MERGE``, ToMe) merged rows reach the LLM in the order of their first
  member, with compact positions;
* ``llava_next``: anyres images (a full view plus crops, unpadded, newline tokens);
* ``llava_onevision``: anyres or multi-image samples, and videos pooled bilinearly after the projector with
  one separator per video;
* ``llava_next_video``: anyres images, and videos pooled by the resampler before the projector.

NeXT, OneVision and NeXT-Video pack every tile's (or frame's) full token grid, so a method merging inside
their tower has its merged tokens copied back onto the grid after the feature block (``tower_unmerge``): the
merging blocks run on fewer tokens, the model gets the grid it expects, and a pre-LLM method stacked after it
(``["tome", "divprune"]``) brings the LLM's tokens to the budget.
"""

from __future__ import annotations

from typing import Any

from ..contexts import Stage
from .frames import OnevisionFrames, ResampledFrames
from .modalities import AnyresImages, Modality, MultiImages
from .registry import register_adapter
from .vlm import VLMAdapter


@register_adapter
class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_types = ("llava",)
    stages = VLMAdapter.stages | {Stage.VISION_MERGE}

    def modalities_of(self, config: Any) -> list[Modality]:
        return [Modality("image", "pixel_values", int(config.image_token_id), ("image_sizes",))]


@register_adapter
class LlavaNextAdapter(VLMAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    stages = VLMAdapter.stages | {Stage.VISION_MERGE}
    tower_unmerge = True

    def modalities_of(self, config: Any) -> list[Modality]:
        return [AnyresImages("image", "pixel_values", int(config.image_token_id), ("image_sizes",))]


@register_adapter
class LlavaOnevisionAdapter(VLMAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    stages = VLMAdapter.stages | {Stage.VISION_MERGE}
    tower_unmerge = True
    inputs = ("image", "video")

    def modalities_of(self, config: Any) -> list[Modality]:
        extra = ("image_sizes", "batch_num_images", "vision_aspect_ratio")
        return [
            MultiImages("image", "pixel_values", int(config.image_token_id), extra),
            OnevisionFrames("video", "pixel_values_videos", int(config.video_token_id)),
        ]


@register_adapter
class LlavaNextVideoAdapter(VLMAdapter):
    family = "llava_next_video"
    model_types = ("llava_next_video",)
    stages = VLMAdapter.stages | {Stage.VISION_MERGE}
    tower_unmerge = True
    inputs = ("image", "video")

    def modalities_of(self, config: Any) -> list[Modality]:
        return [
            AnyresImages("image", "pixel_values", int(config.image_token_id), ("image_sizes",)),
            ResampledFrames("video", "pixel_values_videos", int(config.video_token_id)),
        ]
