"""Qwen3-VL adapter (``model_type`` ``qwen3_vl`` / ``qwen3_vl_moe``): Qwen2-VL's layout plus DeepStack.

What changes from :mod:`vtc.adapters.qwen2_vl` (whose vision signals, 2 x 2 merge groups and M-RoPE handling
apply unchanged: the ViT reads ``q`` and ``k`` from a fused ``qkv`` with 2-D rotary embeddings, attends
within each image through ``cu_seqlens`` and has no windows and no CLS token):

* **DeepStack.** The ViT's blocks ``deepstack_visual_indexes`` feed their own mergers, and the results are
  *added* to the LLM's hidden states at the visual rows after decoder layers ``0 .. n-1`` (``n`` the number
  of DeepStack levels, 3 in the released models). The feature output carries them as ``deepstack_features``
  (one ``[N, D]`` tensor per level over all visual tokens of the call); it is a token stream
  (:class:`~vtc.adapters.streams.TokenStream`): a kept token keeps its rows, a merged token gets the mean of
  its members' rows, exactly as its main feature. The model rebuilds ``visual_pos_masks`` from the shorter
  ``input_ids`` itself, so mask and features line up.
* **In-LLM pruning** must start after the last DeepStack injection: a layer ``k < n`` would shorten the hidden
  states that the model's own injection after layer ``k`` still indexes with the full visual mask. Such a
  method is refused when it is configured, naming the first valid layer (``n``). Score-only layers
  (attention read, nothing dropped) may be anywhere.
* **Token merging in the tower** (ToMe, GTP-ViT) runs as on Qwen2-VL (:mod:`vtc.adapters.qwen_tower`); the
  DeepStack mergers, which read blocks in the middle of the tower, get each image's grid back (merged tokens
  copied to their patches) while the later blocks go on merged.
* **The merger** normalises each patch (LayerNorm over the ViT width) before the 2 x 2 concatenation, then
  ``linear_fc1 -> GELU -> linear_fc2``; :meth:`Qwen3VLAdapter.project` applies it to concatenated groups.
* **Positions** are the model's own 3-D ids of the full prompt, gathered at the kept tokens
  (``positions="original"``, enforced), decoding at the maximum + 1; Qwen3-VL interleaves the frequency
  channels of the three axes, which changes the rotary embedding, not the ids.
* **Videos**: the processor writes every frame (temporal group) as its own block: ``<t seconds>`` text,
  ``<|vision_start|>``, the frame's tokens, ``<|vision_end|>``. A video is still one item (its frames are its
  partitions, so the temporal mergers see the whole clip under one budget); its kept tokens go back into their
  own frame's block, in order. A frame whose tokens are all removed keeps its timestamp and its start / end
  tokens, as an empty block: the text stays what the processor wrote, and every kept token keeps the 3-D
  position it had in the full prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from .modalities import Modality
from .qwen2_vl import QwenVisual, QwenVLAdapter
from .qwen_tower import grid_hook
from .registry import register_adapter
from .streams import RowStream, TokenStream


class Qwen3Frames(QwenVisual):
    """Qwen3-VL's videos: every frame (temporal group) is its own block of the prompt behind a text timestamp,
    so a video's placeholders are one segment per frame (:attr:`Modality.segmented`)."""

    segmented = True


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    row_streams = (RowStream("mm_token_type_ids", 0, required=True), RowStream("labels", -100))
    token_streams = (TokenStream("deepstack_features", per_item=True),)

    def modalities_of(self, config: Any) -> list[Modality]:
        image = ("image", "pixel_values", int(config.image_token_id), (), ("image_grid_thw",))
        video = ("video", "pixel_values_videos", int(config.video_token_id), (), ("video_grid_thw",))
        return [QwenVisual(*image), Qwen3Frames(*video)]

    def install(self) -> None:
        super().install()
        if self._merge is not None:  # DeepStack reads intermediate blocks: give its mergers the grid
            for merger in self.base.visual.deepstack_merger_list:
                self.handles.append(merger.register_forward_pre_hook(grid_hook(self._merge.ctx)))

    def find_tower(self) -> None:
        super().find_tower()
        self.windowed = False
        self.deepstack = len(self.model.config.vision_config.deepstack_visual_indexes)

    def configure(self, method, keep, recorder) -> None:
        super().configure(method, keep, recorder)
        if self.llm is not None and self.llm.prune_layers and min(self.llm.prune_layers) < self.deepstack:
            first = min(self.llm.prune_layers)
            raise ValueError(
                f"{method.name} drops tokens inside the LLM at layer {first}, but Qwen3-VL still adds its DeepStack "
                f"features to the visual rows after layers 0-{self.deepstack - 1}; prune at layer {self.deepstack} "
                f"or later (see vtc.get_method({method.name!r}).config_class for the layer option)"
            )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The merger applied to concatenated 2 x 2 groups ``[..., 4C]`` -> LLM tokens ``[..., D]``."""
        merger = self.projector
        unit = self.merge * self.merge
        c = x.shape[-1] // unit
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if merger.use_postshuffle_norm:
            flat = merger.norm(flat)
        else:
            flat = merger.norm(flat.reshape(-1, c)).reshape(-1, unit * c)
        return merger.linear_fc2(merger.act_fn(merger.linear_fc1(flat))).reshape(*lead, -1)
