"""Gemma 3 adapter (``model_type`` ``gemma3``): SigLIP, 4 x 4 average pooling, bidirectional image blocks.

How the model takes an image (transformers ``modeling_gemma3``): SigLIP (no CLS token) turns an 896 px image
into 64 x 64 patch features (``last_hidden_state``, after the tower's final LayerNorm); the projector
average-pools them ``k x k`` (``k = 64 / sqrt(mm_tokens_per_image)``, 4 for 256 tokens), normalises each
pooled vector (RMSNorm) and multiplies by ``mm_input_projection_weight``. The prompt holds
``<start_of_image>`` + 256 image placeholders + ``<end_of_image>`` per image, and the processor returns
``token_type_ids`` (1 on the placeholders): the model makes the placeholders of one run attend to each other
in both directions (``get_block_sequence_ids_for_mask``), causal everywhere else.

What vtc does:

* **layout and signals**: one ``r x r`` partition per image (``r = sqrt(mm_tokens_per_image)``); every
  per-patch signal (attention received, keys, hidden states) is averaged over each ``k x k`` window exactly
  as the projector pools the features, so a score belongs to the LLM token that covers its patches. Without a
  CLS token, attention signals are "attention received" (:class:`~vtc.contexts.TowerInfo` ``has_cls=False``);
* **pre-projector features** are the pooled SigLIP features, so :meth:`Gemma3Adapter.project` (RMSNorm then
  the projection matrix) gives exactly the model's tokens;
* **token_type_ids** is a row stream (:class:`~vtc.adapters.streams.RowStream`): it takes the rows of the
  ids, so the model's bidirectional block is exactly the kept tokens of each image;
* **pan-and-scan** crops are images of their own in the prompt (each behind its own text), so each crop is an
  item with its own budget share (the budget is a fraction of every item), not a partition of one item;
* **in-LLM methods** (:class:`Gemma3Decoder`): Gemma 3 interleaves sliding-window layers (5 of every 6) with
  global ones, each kind with its own RoPE base, and its image blocks are bidirectional in both kinds. After
  a prune point every layer gets the mask of its kind over the kept rows: causal OR same image block (the kept
  tokens of each image), AND the sliding window (over the shortened sequence, as the layer's own cache holds
  it) for sliding layers, and the rotary embeddings of its kind; attention rows recomputed for scoring use the
  same rule. The language model gets its masks prepared as a dict, so the 2-D padding mask is read where the
  model's forward receives it. The model has no FlashAttention path; SDPA and eager both work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..contexts import Layout, Stage
from .llm import Decoder
from .modalities import Modality, equal_rows, pool_to_token_grid
from .registry import register_adapter
from .streams import RowStream
from .vlm import VLMAdapter


class PooledImages(Modality):
    """Gemma 3's images: ``[N, 3, H, W]``, one ``r x r`` grid each, the tower's ``R x R`` patches mean-pooled."""

    def check(self, kwargs: Mapping[str, Any]) -> None:
        if kwargs[self.pixels].dim() != 4:
            raise ValueError("Gemma 3 pixel_values must be [images, 3, H, W] as its processor returns them")

    def features(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> Any:
        return adapter.base.get_image_features(kwargs[self.pixels], return_dict=True)

    def item_features(self, output: Any) -> list[torch.Tensor]:
        return list(output.pooler_output)

    def pack_features(self, output: Any, items: list[torch.Tensor]) -> Any:
        return output.__class__(**{**output, "pooler_output": equal_rows(items)})

    def layouts(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, Any]]:
        side = adapter.tokens_per_side
        return [(Layout.grid(side, side), [i]) for i in range(kwargs[self.pixels].shape[0])]

    def item_signals(
        self, adapter: Any, captured: dict[str, torch.Tensor], rows: Any, layout: Layout
    ) -> dict[str, torch.Tensor]:
        return {name: adapter.pool(value[rows]) for name, value in captured.items()}

    def item_vision_tokens(self, adapter, proj_in, rows, layout, full) -> torch.Tensor:
        return adapter.pool(proj_in[rows]).flatten(0, 1).to(proj_in.dtype)  # [r * r, C]


class Gemma3Decoder(Decoder):
    """Gemma 3's text model: sliding-window and global layers, each with its own mask and RoPE; image blocks
    attend bidirectionally (``blocks``: the image of each row, -1 for text)."""

    per_type_rotary = True

    def __init__(self, language_model: Any, outer: Any):
        super().__init__(language_model)
        if getattr(self.config, "use_bidirectional_attention", False):
            raise ValueError(
                "in-LLM pruning of a Gemma 3 text model with use_bidirectional_attention is not supported"
            )
        self.mask_source = outer
        self.window = int(self.config.sliding_window)

    def layer_type(self, layer: int) -> str:
        return self.config.layer_types[layer]

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int | None = None):
        return self.lm.rotary_emb(hidden, position_ids, self.layer_type(layer))

    def allow(self, layer: int, allowed: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor | None):
        if blocks is not None:  # OR the query's own image block (every row of which is a real, visual row)
            allowed = allowed | ((blocks[rows][:, None] == blocks[None, :]) & (blocks[rows][:, None] >= 0))
        if self.layer_type(layer) == "sliding_attention":  # AND the window, over row indices
            keys = torch.arange(allowed.shape[1], device=allowed.device)
            allowed = allowed & (keys[None, :] > rows[:, None] - self.window)
        return allowed

    def mask(self, hidden, mask2d, cache, position_ids, layer, blocks=None):
        from transformers import masking_utils as mu

        sliding = self.layer_type(layer) == "sliding_attention"
        args = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask2d, cache=cache)
        if blocks is None:  # decode steps: the new rows are text
            make = mu.create_sliding_window_causal_mask if sliding else mu.create_causal_mask
            return make(**args, position_ids=position_ids, layer_idx=layer)
        if not sliding:
            return mu.create_causal_mask(**args, position_ids=position_ids, block_sequence_ids=blocks, layer_idx=layer)
        _, _, _, _, kv_length, _, kv_offset = mu._preprocess_mask_arguments(
            **args, position_ids=position_ids, layer_idx=layer
        )
        blocks = mu.maybe_pad_block_sequence_ids(blocks, mask2d, kv_length, kv_offset)
        return mu.create_causal_mask(
            **args,
            position_ids=position_ids,
            or_mask_function=mu.blockwise_overlay(blocks),
            and_mask_function=mu.sliding_window_overlay(self.window),
            layer_idx=layer,
        )


@register_adapter
class Gemma3Adapter(VLMAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    stages = VLMAdapter.stages | {Stage.VISION_MERGE}
    tower_unmerge = True  # the projector pools each image's full patch grid
    feature_args = ()
    row_streams = (RowStream("token_type_ids", 0), RowStream("labels", -100))

    def modalities_of(self, config: Any) -> list[Modality]:
        return [PooledImages("image", "pixel_values", int(config.image_token_id))]

    def decoder(self) -> Gemma3Decoder:
        return Gemma3Decoder(self.base.language_model, self.base)

    def find_tower(self) -> None:
        super().find_tower()  # no vision_feature_layer: last_hidden_state, the last block then the final LayerNorm
        self.patches_per_side = int(self.projector.patches_per_image)
        self.tokens_per_side = int(self.projector.tokens_per_side)
        self.kernel = int(self.projector.kernel_size)

    def feature_strategy(self, kwargs: Mapping[str, Any]) -> str:
        return "full"  # no CLS: every patch is pooled into the image's tokens

    def pool(self, value: torch.Tensor) -> torch.Tensor:
        """``[N, R*R, ...]`` per-patch values -> ``[N, r*r, ...]`` averaged over each ``k x k`` window (float)."""
        return pool_to_token_grid(value, self.patches_per_side, self.kernel)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled SigLIP features ``[..., C]`` -> LLM tokens ``[..., D]`` (the projector after its pooling)."""
        proj = self.projector
        return torch.matmul(proj.mm_soft_emb_norm(x), proj.mm_input_projection_weight).type_as(x)
