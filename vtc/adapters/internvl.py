"""InternVL 3 / 3.5 adapter (``model_type`` ``internvl``, the ``-hf`` checkpoints): tiles, pixel shuffle.

How the model takes an image (transformers ``modeling_internvl``): the processor cuts it into up to
``max_patches`` tiles of 448 px plus a thumbnail (``crop_to_patches``); InternViT turns each tile into a CLS
token and 32 x 32 patch features; the CLS is dropped (``vision_feature_select_strategy="default"``) and a
**pixel shuffle** (``downsample_ratio`` 0.5) concatenates every 2 x 2 group of patches on the channel axis,
so each LLM token is four patches: for token ``(i, j)`` the channels are patches ``(2i, 2j)``,
``(2i, 2j+1)``, ``(2i+1, 2j)``, ``(2i+1, 2j+1)``. The projector (LayerNorm, two linears) maps the 4C
channels to the LLM. The prompt holds ``<img>`` + 256 x tiles ``<IMG_CONTEXT>`` + ``</img>`` per image; 1-D
RoPE, so positions work as for LLaVA.

What vtc does:

* **items and partitions**: the call does not say how many tiles each image has (the processor consumes
  ``num_patches``), so each contiguous run of placeholders is one image and its length / 256 its tiles, in
  order; an image is one item whose tiles (the thumbnail last) are its partitions, so methods that allocate a
  budget per partition (HiRED) do so over the tiles (``TowerInfo.crops``);
* **signals** (CLS attention, attention received, keys) are computed per patch and averaged over each
  token's 2 x 2 patches (:func:`~vtc.adapters.modalities.pool_to_token_grid`), so a score ranks an LLM token,
  never a single patch of it; CLS attention is available (InternViT has a CLS token). Hidden states are
  pixel-shuffled like the features (4C per token), so merged ones can be projected;
* **pre-projector features** are the projector's input rows (the shuffled 4C vectors), so merging methods
  average in that space and :meth:`InternVLAdapter.project` (the projector) gives exactly the model's tokens;
* queries and keys are read after InternViT's optional q/k RMSNorm (``use_qk_norm``, InternViT-6B);
* **video** frames are written by the processor as ``Frame{i}: <img>...</img>``: each frame is one image to
  vtc (its own budget share); the temporal mergers, which need a video as one item, are not offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..contexts import Layout, Stage
from .frames import frames_layout
from .modalities import Modality, equal_rows, pool_to_token_grid
from .registry import register_adapter
from .sequence import find_runs
from .vision import QKReader, Tower, module_at, projection_qk
from .vlm import VLMAdapter

TOWER = Tower("encoder.layer", "attention", 1)


class TiledImages(Modality):
    """InternVL's images: ``pixel_values [tiles, 3, H, W]`` over all images; each image a run of placeholders."""

    crops = True

    def check(self, kwargs: Mapping[str, Any]) -> None:
        if kwargs[self.pixels].dim() != 4:
            raise ValueError("InternVL pixel_values must be [tiles, 3, H, W] as its processor returns them")

    def tiles(self, adapter: Any, kwargs: Mapping[str, Any]) -> list[int]:
        """Tiles per image, in order: each placeholder run is one image of ``run / tokens_per_tile`` tiles."""
        per_tile = adapter.tokens_per_tile
        runs = [n for row in find_runs(kwargs["input_ids"] == self.token_id) for _, n in row]
        total = int(kwargs[self.pixels].shape[0])
        if any(n % per_tile for n in runs) or sum(runs) != total * per_tile:
            raise ValueError(
                f"the prompt's image placeholder runs {runs} do not match {total} tiles of {per_tile} tokens; "
                f"build inputs with the model's processor (one <img>...</img> run of 256 tokens per tile per image)"
            )
        return [n // per_tile for n in runs]

    def features(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> Any:
        out = super().features(adapter, kwargs, strategy)
        flat = out.pooler_output.reshape(-1, out.pooler_output.shape[-1])
        counts = [n * adapter.tokens_per_tile for n in self.tiles(adapter, kwargs)]
        out.pooler_output = list(torch.split(flat, counts))
        return out

    def pack_features(self, output: Any, items: list[torch.Tensor]) -> Any:
        return output.__class__(**{**output, "pooler_output": equal_rows(items)})

    def layouts(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, Any]]:
        out, first = [], 0
        side = adapter.tokens_per_side
        for n in self.tiles(adapter, kwargs):
            out.append((frames_layout(n, side, side), list(range(first, first + n))))
            first += n
        return out

    def item_signals(
        self, adapter: Any, captured: dict[str, torch.Tensor], rows: Any, layout: Layout
    ) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in captured.items():
            patches = value[rows][:, adapter.prefix :]
            # hidden states go to the projector's input space (the 2 x 2 patches concatenated, as the pixel
            # shuffle does), so merged ones can still be projected; scores and keys are each token's mean
            out[name] = adapter.shuffle(patches) if name.startswith("hidden") else adapter.pool(patches)
        return out

    def item_vision_tokens(self, adapter, proj_in, rows, layout, full) -> torch.Tensor:
        return proj_in[rows].flatten(0, 1)  # [tiles * 256, 4C]: the projector's input rows


@register_adapter
class InternVLAdapter(VLMAdapter):
    family = "internvl"
    model_types = ("internvl",)
    stages = VLMAdapter.stages | {Stage.VISION_MERGE}
    tower_unmerge = True  # the pixel shuffle needs each tile's full patch grid

    def modalities_of(self, config: Any) -> list[Modality]:
        return [TiledImages("image", "pixel_values", int(config.image_token_id))]

    def find_tower(self) -> None:
        cfg = self.model.config
        self.blocks = module_at(self.base.vision_tower, TOWER.blocks)
        self.prefix, self.attention = TOWER.prefix, TOWER.attention
        vcfg = cfg.vision_config
        patch = vcfg.patch_size if isinstance(vcfg.patch_size, int) else vcfg.patch_size[0]
        size = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
        self.patch_size = int(patch)
        self.num_heads = int(vcfg.num_attention_heads)
        self.projector = self.base.multi_modal_projector
        if cfg.vision_feature_layer != -1:
            raise NotImplementedError("vtc supports InternVL with vision_feature_layer=-1 (the released models)")
        self.feature_layer = -1
        self.feature_block = len(self.blocks) - 1
        self.patches_per_side = size // self.patch_size
        self.kernel = round(1 / cfg.downsample_ratio)
        self.tokens_per_side = self.patches_per_side // self.kernel
        self.tokens_per_tile = self.tokens_per_side**2

    def passthrough(self, kwargs: Mapping[str, Any], encoded: Any) -> dict[str, Any]:
        """As the base, with the feature output's per-image token list packed back as the model reads it."""
        out = super().passthrough(kwargs, encoded)
        images = out["mm_encoder_outputs"].get("image")
        if images is not None:
            out["mm_encoder_outputs"]["image"] = self.modalities[0].pack_features(images, images.pooler_output)
        return out

    def pool(self, value: torch.Tensor) -> torch.Tensor:
        """``[tiles, P*P, ...]`` per-patch values -> ``[tiles, (P/2)^2, ...]``: the mean of each token's patches."""
        return pool_to_token_grid(value, self.patches_per_side, self.kernel)

    def shuffle(self, value: torch.Tensor) -> torch.Tensor:
        """``[tiles, P*P, C]`` -> ``[tiles, (P/2)^2, 4C]``: the model's pixel shuffle (token ``(i, j)`` holds patches
        ``(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)`` in that order on the channel axis)."""
        n, c, side, k = value.shape[0], value.shape[-1], self.patches_per_side, self.kernel
        grid = value.reshape(n, side // k, k, side // k, k, c).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(n, (side // k) ** 2, k * k * c)

    def qk_reader(self) -> QKReader:
        return projection_qk(self.attention, self.num_heads, q="q_norm", k="k_norm")  # identity without qk norm
