"""Video LLaVA families: LLaVA-OneVision (``llava_onevision``) and LLaVA-NeXT-Video (``llava_next_video``).

Both run the vision tower on every frame (``pixel_values_videos``: ``[B, T, 3, H, W]``) and then pool each
frame's ``R x C`` token grid (MERGERS.md §0.2):

* OneVision projects first, then resizes each frame's grid bilinearly to ``ceil(R/2) x ceil(C/2)``
  (``apply_pooling``), concatenates the frames and appends **one** newline token for the whole video;
* NeXT-Video average-pools (``vision_resampler``, stride ``spatial_pool_stride``) *before* the projector,
  and adds no newline.

A video is one item: its frames are its partitions (frame-major token order), the budget applies to all
its tokens, and vision signals (attention received, keys, hidden states) are pooled per frame with the
same operator as the features (bilinear / average), so scores line up with the tokens the LLM sees.
Pre-projector features for OneVision are the bilinearly pooled projector inputs (the model pools after
projecting; pooling before is the nearest vision-space equivalent, used by ``pool(space="vision")`` and
VisionZip's merges).

Images go through the LLaVA-NeXT anyres path. OneVision's ``anyres_max_9`` interpolation of very large
crop grids blends tokens and has no token-level layout: such images are refused with a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..contexts import Layout
from .llava import Modality
from .llava_next import LlavaNextAdapter, anyres_layout


def frames_layout(frames: int, rows: int, cols: int, newline: bool) -> Layout:
    """``frames`` partitions of ``rows x cols`` tokens, frame-major, optionally one separator at the end."""
    cells = rows * cols
    partition = torch.arange(frames).repeat_interleave(cells)
    slot = torch.arange(cells).repeat(frames)
    if newline:
        partition = torch.cat([partition, torch.tensor([-1])])
        slot = torch.cat([slot, torch.tensor([-1])])
    return Layout(((rows, cols),) * frames, 0, partition, slot, None)


class _VideoAdapter(LlavaNextAdapter):
    """Shared video plumbing; subclasses say how a frame grid is pooled."""

    video_newline = False

    def __init__(self, model):
        super().__init__(model)
        self.video_token_id = int(model.config.video_token_id)

    def modalities(self) -> list[Modality]:
        return [
            *super().modalities(),
            Modality("video", "pixel_values_videos", self.video_token_id),
        ]

    def check_call(self, kwargs: Mapping[str, Any]) -> None:
        super().check_call(kwargs)
        videos = kwargs.get("pixel_values_videos")
        if videos is not None and videos.dim() != 5:
            raise ValueError(
                "pixel_values_videos must be [batch, frames, 3, H, W] as the video processor returns them"
            )

    def tower_grid(self) -> tuple[int, int]:
        side = int(self.model.config.vision_config.image_size) // self.patch_size
        return side, side

    def pool_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``[N, C, R, W]`` frame maps exactly as the model pools a frame's tokens."""
        raise NotImplementedError

    def pooled_grid(self) -> tuple[int, int]:
        rows, cols = self.tower_grid()
        probe = self.pool_grid(torch.zeros(1, 1, rows, cols))
        return int(probe.shape[-2]), int(probe.shape[-1])

    def layouts(self, modality: Modality, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, list[int]]]:
        if modality.name != "video":
            return super().layouts(modality, kwargs, strategy)
        batch, frames = kwargs[modality.pixels].shape[:2]
        rows, cols = self.pooled_grid()
        layout = frames_layout(frames, rows, cols, self.video_newline)
        return [(layout, list(range(b * frames, (b + 1) * frames))) for b in range(batch)]

    def _pool_slots(self, value: torch.Tensor) -> torch.Tensor:
        """``[N, prefix + R*C, ...]`` per-frame slot values -> ``[N, r*c, ...]`` pooled like the features."""
        rows, cols = self.tower_grid()
        grid = value[:, self.prefix :].float()
        tail = grid.shape[2:]
        maps = grid.reshape(grid.shape[0], rows, cols, -1).permute(0, 3, 1, 2)  # [N, ch, R, C]
        pooled = self.pool_grid(maps)
        return pooled.permute(0, 2, 3, 1).reshape(grid.shape[0], -1, *tail)

    def item_signals(self, modality, captured, rows, layout):
        if modality.name != "video":
            return super().item_signals(modality, captured, rows, layout)
        return {name: self._pool_slots(value[rows]) for name, value in captured.items()}

    def item_features(self, modality: Modality, output: Any) -> list[torch.Tensor]:
        if modality.name != "video":
            return super().item_features(modality, output)
        return list(output.pooler_output)  # [B, n, D] -> one [n, D] per video


class LlavaOnevisionAdapter(_VideoAdapter):
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    video_newline = True

    def modalities(self) -> list[Modality]:
        image, video = super().modalities()
        image = Modality(
            "image", "pixel_values", image.token_id, ("image_sizes", "batch_num_images", "vision_aspect_ratio")
        )
        return [image, video]

    def pool_grid(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2:]
        return F.interpolate(x, size=[math.ceil(rows / 2), math.ceil(cols / 2)], mode="bilinear")

    def item_vision_tokens(self, modality, proj_in, rows, layout, full):
        if modality.name != "video":
            return super().item_vision_tokens(modality, proj_in, rows, layout, full)
        value = proj_in[rows]
        if not full and self.prefix:  # the projector input has no CLS slot: give it one so slots line up
            value = torch.cat([value.new_zeros(value.shape[0], self.prefix, value.shape[-1]), value], dim=1)
        pooled = self._pool_slots(value)
        out = pooled.reshape(-1, pooled.shape[-1]).to(proj_in.dtype)  # [T * r * c, C]
        return torch.cat([out, out.new_zeros(1, out.shape[-1])])  # the separator has no vision features

    def pack_features(self, modality: Modality, output: Any, items: list[torch.Tensor]) -> Any:
        if modality.name != "video":
            return super().pack_features(modality, output, items)
        # the model reads video features as one [batch, n, D] tensor and flattens it: concatenating every
        # video into a single row is equivalent and allows videos that kept different counts
        return output.__class__(**{**output, "pooler_output": torch.cat(items)[None]})

    def layouts(self, modality: Modality, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, list[int]]]:
        if modality.name == "video":
            return super().layouts(modality, kwargs, strategy)
        cfg = self.model.config
        tile = int(cfg.vision_config.image_size)
        rows = cols = tile // self.patch_size
        aspect = kwargs.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
        max_tiles = int(str(aspect).replace("anyres_max_", ""))
        per_sample = kwargs.get("batch_num_images")
        sizes = kwargs["image_sizes"].tolist()
        patching = [True] * len(sizes) if per_sample is None else [n == 1 for n in per_sample for _ in range(n)]
        out, offset = [], 0
        for size, patch in zip(sizes, patching, strict=True):
            if patch:
                layout = anyres_layout(
                    tuple(size), cfg.image_grid_pinpoints, tile, rows, cols, self.prefix, strategy == "full"
                )
            else:  # multi-image samples: the base tile and one separator
                base = Layout.grid(rows, cols, self.prefix, strategy == "full")
                layout = Layout(
                    base.grids,
                    base.prefix,
                    torch.cat([base.partition, torch.tensor([-1])]),
                    torch.cat([base.slot, torch.tensor([-1])]),
                    None,
                )
            if layout.arrangement is not None:  # pack_image_features' anyres_max interpolation test
                crop_cells = int((layout.partition > 0).sum())
                if math.sqrt(crop_cells / (max_tiles * rows * rows)) > 1.1:
                    raise ValueError(
                        f"an image of size {tuple(size)} makes LLaVA-OneVision interpolate its crop grid ({aspect}), "
                        f"which blends tokens; vtc supports OneVision images up to that size (resize the image)"
                    )
            out.append((layout, list(range(offset, offset + layout.num_partitions))))
            offset += layout.num_partitions
        return out


class LlavaNextVideoAdapter(_VideoAdapter):
    family = "llava_next_video"
    model_types = ("llava_next_video",)
    video_newline = False

    def pool_grid(self, x: torch.Tensor) -> torch.Tensor:
        stride = int(self.model.config.spatial_pool_stride)
        if self.model.config.spatial_pool_mode == "max":
            return F.max_pool2d(x, stride, stride)
        # "average" (and, approximately, the learned "conv" resampler)
        return F.avg_pool2d(x, stride, stride)

    def item_vision_tokens(self, modality, proj_in, rows, layout, full):
        if modality.name != "video":
            return super().item_vision_tokens(modality, proj_in, rows, layout, full)
        return proj_in[rows].reshape(-1, proj_in.shape[-1])  # the resampler already pooled the projector input
