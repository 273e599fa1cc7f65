"""Qwen2-VL and Qwen2.5-VL adapter (``model_type`` ``qwen2_vl`` / ``qwen2_5_vl``): dynamic resolution, M-RoPE.

The VLM base with two overrides: the vision signals and the positions.

Vision side. The ViT runs on all patches of all images of a call as one sequence (attention restricted to
each image by ``cu_seqlens``; Qwen2.5-VL also to windows, except in its ``fullatt_block_indexes``), with
2-D rotary embeddings, and its ``merger`` turns every 2 x 2 group of patches (consecutive in the sequence)
into one LLM token. There is no CLS token, so attention signals are "attention received", computed per
attention segment from the block's fused ``qkv`` output with the block's own rotary embedding, i.e. over
exactly the keys the block attends to (windows respected). Qwen2.5-VL runs its blocks in a window-permuted
order of the groups; signals are mapped back with the inverse permutation (``get_vision_window_index``).
A token's score is the mean of its group's four; keys are averaged the same way; pre-projector features
(``ImageTokens.vision_tokens``) are a group's four patch features concatenated, which is exactly the
merger's input (``project`` applies the merger).

LLM side. Positions are 3-D (temporal, height, width) and *always* the original ones, computed by the
model's own ``get_rope_index`` on the full prompt and gathered at the kept tokens; row 0 of the
``[4, B, L]`` position tensor (text positions, used for masks) is contiguous, so gaps are never read as
packed-sequence boundaries. Decoding continues at the uncompressed prompt's maximum position + 1 on all
axes, as ``generate`` extends every row by one per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..contexts import Layout, Stage
from .frames import frames_layout
from .llm import rotate_half
from .modalities import Modality
from .qwen_tower import position_hook
from .qwen_windows import window_hook
from .registry import register_adapter
from .streams import RowStream
from .vision import Capture, Emit, QKReader
from .vlm import VLMAdapter


class QwenVisual(Modality):
    """Qwen's images and videos: ``t`` temporal groups of ``h/2 x w/2`` tokens per item (``<grid>_thw``)."""

    def check(self, kwargs: Mapping[str, Any]) -> None:
        grid = self.position_args[0]
        if kwargs.get(grid) is None:
            raise ValueError(f"{self.pixels} needs {grid} (the processor returns both)")

    def features(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> Any:
        fn = getattr(adapter.base, f"get_{self.name}_features")
        return fn(kwargs[self.pixels], kwargs[self.position_args[0]], return_dict=True)

    def pack_features(self, output: Any, items: list[torch.Tensor]) -> Any:
        return output.__class__(**{**output, "pooler_output": tuple(items)})

    def layouts(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, slice]]:
        """Per item: its frames' layout, and its slice of the merge groups (tower sequence order)."""
        out, offset = [], 0
        for t, h, w in kwargs[self.position_args[0]].tolist():
            layout = frames_layout(t, h // adapter.merge, w // adapter.merge)
            out.append((layout, slice(offset, offset + layout.num_tokens)))
            offset += layout.num_tokens
        return out

    def item_signals(
        self, adapter: Any, captured: dict[str, torch.Tensor], rows: Any, layout: Layout
    ) -> dict[str, torch.Tensor]:
        signals = {}
        for name, value in captured.items():
            # hidden states stay in the merger's input space (the group's 4 patches concatenated), so merged
            # ones can still be projected; scores and keys are the group's mean
            group = value[rows].flatten(1) if name.startswith("hidden") else value[rows].float().mean(dim=1)
            signals[name] = group.view(layout.num_partitions, -1, *group.shape[1:])
        return signals

    def item_vision_tokens(self, adapter, proj_in, rows, layout, full) -> torch.Tensor:
        return proj_in[rows].flatten(1)  # [n, 4C]: the merger's input rows


@register_adapter
class QwenVLAdapter(VLMAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    #: token merging in the tower (:mod:`vtc.adapters.qwen_tower`), copied back onto the grid for the patch merger
    stages = VLMAdapter.stages | {Stage.VISION_MERGE}
    tower_unmerge = True
    inputs = ("image", "video")
    forced_positions = "original"
    parts = ("visual", "language_model", "get_image_features", "get_rope_index")
    feature_args = ()
    row_streams = (RowStream("mm_token_type_ids", 0, required=True), RowStream("labels", -100))

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.family = model.config.model_type

    def modalities_of(self, config: Any) -> list[Modality]:
        image = ("image", "pixel_values", int(config.image_token_id), (), ("image_grid_thw",))
        video = (
            "video",
            "pixel_values_videos",
            int(config.video_token_id),
            (),
            ("video_grid_thw", "second_per_grid_ts"),
        )
        return [QwenVisual(*image), QwenVisual(*video)]

    def install(self) -> None:
        super().install()
        if self._merge is not None:  # merged tokens take the RoPE of their patches' centroid
            self.handles.append(position_hook(self._merge.ctx, self.base.visual.rotary_pos_emb))

    def find_tower(self) -> None:
        vcfg = self.model.config.vision_config
        self.blocks: nn.ModuleList = self.base.visual.blocks
        self.prefix = 0
        self.projector: nn.Module = self.base.visual.merger
        self.feature_layer = None
        self.feature_block = len(self.blocks) - 1  # the merger consumes the last block's output
        self.merge = int(vcfg.spatial_merge_size)
        self.windowed = hasattr(vcfg, "fullatt_block_indexes")

    def feature_strategy(self, kwargs: Mapping[str, Any]) -> str:
        return "full"  # every patch group becomes an LLM token

    # -- vision signals -----------------------------------------------------------------------------
    def qk_reader(self) -> QKReader:
        return _fused_qkv

    def gather(self, parts: dict[str, list[torch.Tensor]], kwargs: Mapping[str, Any], modality: Modality) -> dict:
        """``[T, ...]`` per-patch values in block order -> ``[G, 4, ...]`` per merge group in natural order."""
        unit = self.merge * self.merge
        out = {}
        for name, values in parts.items():
            value = torch.cat(values)
            groups = value.reshape(value.shape[0] // unit, unit, *value.shape[1:])
            if self.windowed:
                from transformers.vision_utils import get_vision_window_index

                vcfg = self.model.config.vision_config
                grid = kwargs[modality.position_args[0]]
                window_index, _ = get_vision_window_index(grid, self.merge, vcfg.window_size, vcfg.patch_size)
                groups = groups[torch.argsort(window_index.to(groups.device))]
            out[name] = groups
        return out

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The merger applied to concatenated 2 x 2 groups ``[..., 4C]`` -> LLM tokens ``[..., D]``."""
        merger = self.projector
        c = x.shape[-1] // (self.merge * self.merge)
        lead = x.shape[:-1]
        normed = merger.ln_q(x.reshape(-1, c)).reshape(-1, x.shape[-1])
        return merger.mlp(normed).reshape(*lead, -1)

    # -- M-RoPE positions ---------------------------------------------------------------------------
    def base_positions(self, kwargs: Mapping[str, Any], mask: torch.Tensor, for_generate: bool) -> torch.Tensor:
        """``[3, B, L]`` M-RoPE positions of the full prompt, as the model computes them."""
        given = kwargs.get("position_ids")
        if given is not None:
            if given.dim() != 3:
                raise ValueError("Qwen2-VL position_ids must be [3 or 4, batch, length] (M-RoPE)")
            return given[-3:]
        extra = {}
        if kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        positions, _ = self.base.get_rope_index(
            kwargs["input_ids"],
            mm_token_type_ids=kwargs["mm_token_type_ids"],
            image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"),
            attention_mask=mask,
            **extra,
        )
        return positions

    def llm_positions(self, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[4, B, L']``: contiguous text positions (for masks) on top of the kept tokens' own 3-D positions."""
        text_row = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return torch.cat([text_row[None], positions], dim=0)

    def record_positions(self, positions: torch.Tensor) -> list[list]:
        return positions.permute(1, 0, 2).tolist()


@register_adapter
class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: as Qwen2-VL; its tower attends within windows of a reordered sequence in most blocks, so token
    merging runs per window (:mod:`vtc.adapters.qwen_windows`)."""

    model_types = ("qwen2_5_vl",)

    def install(self) -> None:
        super().install()
        if self._merge is not None:
            vcfg = self.model.config.vision_config
            self._merge.ctx.qwen_full_blocks = set(vcfg.fullatt_block_indexes)
            hook = window_hook(self._merge.ctx, vcfg)
            self.handles.append(self.base.visual.register_forward_pre_hook(hook, with_kwargs=True))


def _fused_qkv(block: nn.Module, capture: Capture, emit: Emit) -> list[Any]:
    """Read q and k of a Qwen vision block from its fused ``qkv`` output, rotary embedding applied, with the
    block's attention segments (``cu_seqlens``)."""
    attn = block.attn
    stash: dict[str, Any] = {}

    def before(module, args, kwargs):
        if capture.active:
            stash["cu"] = kwargs["cu_seqlens"]
            stash["pe"] = kwargs["position_embeddings"]

    def keep_qkv(module, args, output):
        if capture.active:
            stash["qkv"] = output

    def finish(module, args, output):
        if not capture.active:
            return
        qkv = stash.pop("qkv")
        q, k, _ = qkv.reshape(qkv.shape[0], 3, attn.num_heads, -1).unbind(1)  # [T, H, d]
        cos, sin = (t.float().unsqueeze(-2) for t in stash.pop("pe"))
        q = q.float() * cos + rotate_half(q.float()) * sin
        k = k.float() * cos + rotate_half(k.float()) * sin
        cu = stash.pop("cu").tolist()
        emit(q, k, list(zip(cu[:-1], cu[1:], strict=True)))

    return [
        attn.register_forward_pre_hook(before, with_kwargs=True),
        attn.qkv.register_forward_hook(keep_qkv),
        attn.register_forward_hook(finish),
    ]
