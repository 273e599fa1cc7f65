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
* **in-LLM methods** are not offered: Gemma 3 interleaves sliding-window layers (5 of every 6), and vtc's
  LLM-layer hook point does not rebuild sliding-window masks yet; they are refused when compressing, with
  the list of stages the family provides. The model has no FlashAttention path; SDPA and eager both work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..contexts import Layout, Stage
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


@register_adapter
class Gemma3Adapter(VLMAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    stages = frozenset({Stage.VISION, Stage.PRE_LLM})
    feature_args = ()
    row_streams = (RowStream("token_type_ids", 0), RowStream("labels", -100))

    def modalities_of(self, config: Any) -> list[Modality]:
        return [PooledImages("image", "pixel_values", int(config.image_token_id))]

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
