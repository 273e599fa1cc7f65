"""Video modalities of the LLaVA video families: every frame through the tower, then each frame grid pooled.

Both families run the vision tower on every frame (``pixel_values_videos``: ``[B, T, 3, H, W]``) and pool
each frame's ``R x C`` token grid:

* LLaVA-OneVision (:class:`OnevisionFrames`) projects first, then resizes each frame's grid bilinearly to
  ``ceil(R/2) x ceil(C/2)``, concatenates the frames and appends **one** newline token for the whole video;
* LLaVA-NeXT-Video (:class:`ResampledFrames`) average-pools (its ``vision_resampler``, stride
  ``spatial_pool_stride``) *before* the projector, and adds no newline.

A video is one item: its frames are its partitions (frame-major token order), the budget applies to all
its tokens, and vision signals (attention received, keys, hidden states) are pooled per frame with the
same operator as the features, so scores line up with the tokens the LLM sees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..contexts import Layout
from .modalities import Modality


def frames_layout(frames: int, rows: int, cols: int, newline: bool = False) -> Layout:
    """``frames`` partitions of ``rows x cols`` tokens, frame-major, optionally one separator at the end."""
    cells = rows * cols
    partition = torch.arange(frames).repeat_interleave(cells)
    slot = torch.arange(cells).repeat(frames)
    if newline:
        partition = torch.cat([partition, torch.tensor([-1])])
        slot = torch.cat([slot, torch.tensor([-1])])
    return Layout(((rows, cols),) * frames, 0, partition, slot, None)


class PooledFrames(Modality):
    """A video whose frame grids the model pools (subclasses: how, and where the separator goes)."""

    newline = False

    def check(self, kwargs: Mapping[str, Any]) -> None:
        if kwargs[self.pixels].dim() != 5:
            raise ValueError(
                "pixel_values_videos must be [batch, frames, 3, H, W] as the video processor returns them"
            )

    def pool(self, adapter: Any, x: torch.Tensor) -> torch.Tensor:
        """Pool ``[N, C, R, W]`` frame maps exactly as the model pools a frame's tokens."""
        raise NotImplementedError

    def layouts(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, Any]]:
        batch, frames = kwargs[self.pixels].shape[:2]
        side = _tower_side(adapter)
        probe = self.pool(adapter, torch.zeros(1, 1, side, side))
        layout = frames_layout(frames, int(probe.shape[-2]), int(probe.shape[-1]), self.newline)
        return [(layout, list(range(b * frames, (b + 1) * frames))) for b in range(batch)]

    def item_signals(
        self, adapter: Any, captured: dict[str, torch.Tensor], rows: Any, layout: Layout
    ) -> dict[str, torch.Tensor]:
        return {name: self.pool_slots(adapter, value[rows]) for name, value in captured.items()}

    def pool_slots(self, adapter: Any, value: torch.Tensor) -> torch.Tensor:
        """``[N, prefix + R*C, ...]`` per-frame slot values -> ``[N, r*c, ...]`` pooled like the features."""
        side = _tower_side(adapter)
        grid = value[:, adapter.prefix :].float()
        tail = grid.shape[2:]
        maps = grid.reshape(grid.shape[0], side, side, -1).permute(0, 3, 1, 2)  # [N, ch, R, C]
        pooled = self.pool(adapter, maps)
        return pooled.permute(0, 2, 3, 1).reshape(grid.shape[0], -1, *tail)


class OnevisionFrames(PooledFrames):
    """LLaVA-OneVision video: bilinear halving after the projector, one separator for the whole video.

    Pre-projector features are the bilinearly pooled projector inputs (the model pools after projecting;
    pooling before is the nearest vision-space equivalent, used by ``pool(space="vision")`` and VisionZip's
    merges)."""

    newline = True

    def pool(self, adapter: Any, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2:]
        return F.interpolate(x, size=[math.ceil(rows / 2), math.ceil(cols / 2)], mode="bilinear")

    def item_vision_tokens(self, adapter, proj_in, rows, layout, full):
        value = proj_in[rows]
        if not full and adapter.prefix:  # the projector input has no CLS slot: give it one so slots line up
            value = torch.cat([value.new_zeros(value.shape[0], adapter.prefix, value.shape[-1]), value], dim=1)
        pooled = self.pool_slots(adapter, value)
        out = pooled.reshape(-1, pooled.shape[-1]).to(proj_in.dtype)  # [T * r * c, C]
        return torch.cat([out, out.new_zeros(1, out.shape[-1])])  # the separator has no vision features

    def pack_features(self, output: Any, items: list[torch.Tensor]) -> Any:
        # The model reads video features as one [videos, n, D] tensor and flattens it. Videos that kept the
        # same count stay one row each, the model's own layout, which generate() can repeat per prompt (beams,
        # num_return_sequences); videos that kept different counts go in a single row, which is equivalent for
        # the model but cannot be repeated per prompt (see VLMAdapter.check_expandable).
        if len({int(x.shape[0]) for x in items}) == 1:
            return output.__class__(**{**output, "pooler_output": torch.stack(items)})
        return output.__class__(**{**output, "pooler_output": torch.cat(items)[None]})


class ResampledFrames(PooledFrames):
    """LLaVA-NeXT-Video video: its resampler pools the projector input (``spatial_pool_mode`` average or max,
    stride ``spatial_pool_stride``; the learned ``"conv"`` resampler is approximated by the average)."""

    def pool(self, adapter: Any, x: torch.Tensor) -> torch.Tensor:
        cfg = adapter.model.config
        stride = int(cfg.spatial_pool_stride)
        if cfg.spatial_pool_mode == "max":
            return F.max_pool2d(x, stride, stride)
        return F.avg_pool2d(x, stride, stride)

    def item_vision_tokens(self, adapter, proj_in, rows, layout, full):
        return proj_in[rows].reshape(-1, proj_in.shape[-1])  # the resampler already pooled the projector input


def _tower_side(adapter: Any) -> int:
    """Tokens per side of one frame's grid in the tower."""
    return int(adapter.model.config.vision_config.image_size) // adapter.patch_size
