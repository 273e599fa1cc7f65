"""LLaVA-NeXT adapter (``model_type == "llava_next"``): anyres partitions, unpadding, newline tokens.

An image of size ``(H, W)`` becomes ``1 + g_h * g_w`` tiles at the tower's resolution (``pixel_values`` is
``[B, max_tiles, 3, s, s]``): tile 0 is the whole image resized (the *base* partition), tiles ``1..`` are the
crops of the best-fitting canvas in row-major order. The model packs (``LlavaNextModel.pack_image_features``)
the base grid first (raster, no separator), then the crops assembled into one ``(g_h r) x (g_w c)`` grid,
*unpadded* (rows or columns covering only the canvas padding are cut), with the ``image_newline`` token
appended to every row, flattened row-major. The layout below reproduces that packing on an index grid,
using the model module's own ``get_anyres_image_grid_shape`` / ``unpad_image`` / ``image_size_to_num_patches``
so it cannot drift from the features. Separator tokens have no vision slot (``Layout.is_newline``); what
happens to them is the method's newline policy (``MethodConfig.newlines``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..contexts import Layout, Stage
from .llava import LlavaAdapter, Modality


def anyres_layout(
    image_size: tuple[int, int],
    pinpoints: list,
    tile: int,
    rows: int,
    cols: int,
    prefix: int,
    include_prefix: bool,
) -> Layout:
    """Layout of one LLaVA-NeXT image (see module docstring).

    Args:
        image_size: original ``(H, W)``; pinpoints: the config's ``image_grid_pinpoints``; tile: tower input
            size in px; rows, cols: token grid of one tile; prefix: CLS slots; include_prefix: ``"full"``
            feature strategy (each tile's CLS is a token too).
    """
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    first = 0 if include_prefix else prefix
    base_slots = torch.arange(first, prefix + rows * cols)
    partition, slot = [torch.zeros_like(base_slots)], [base_slots]
    n_tiles = image_size_to_num_patches(list(image_size), pinpoints, tile)
    g_h, g_w = get_anyres_image_grid_shape(list(image_size), pinpoints, tile)
    if n_tiles == 1:  # no crops: the base tile and one separator
        partition.append(torch.tensor([-1]))
        slot.append(torch.tensor([-1]))
        return Layout(((rows, cols),), prefix, torch.cat(partition), torch.cat(slot), None)
    # index grid of the crops: code = partition * stride + slot, laid out like the model's big grid
    stride = prefix + rows * cols
    r = torch.arange(g_h * rows)[:, None]
    c = torch.arange(g_w * cols)[None, :]
    part = 1 + (r // rows) * g_w + (c // cols)
    cell = prefix + (r % rows) * cols + (c % cols)
    grid = unpad_image((part * stride + cell)[None], list(image_size))[0]  # [R', C']
    codes = torch.cat([grid, torch.full((grid.shape[0], 1), -1)], dim=1).flatten()
    partition.append(torch.where(codes >= 0, codes // stride, -1))
    slot.append(torch.where(codes >= 0, codes % stride, -1))
    grids = ((rows, cols),) * (1 + g_h * g_w)
    return Layout(grids, prefix, torch.cat(partition), torch.cat(slot), (g_h, g_w))


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_types = ("llava_next",)
    crops = True
    #: no VISION_MERGE: the model packs every tile's full token grid (unpadding, newlines; OneVision / NeXT-Video
    #: pool each frame's grid), so a tower that outputs a merged token set cannot feed it
    stages = LlavaAdapter.stages - {Stage.VISION_MERGE}

    def check_call(self, kwargs: Mapping[str, Any]) -> None:
        super().check_call(kwargs)
        if kwargs.get("pixel_values") is not None and kwargs.get("image_sizes") is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns them) together with pixel_values")
        if kwargs.get("pixel_values") is not None and kwargs["pixel_values"].dim() == 4:
            raise ValueError("LLaVA-NeXT pixel_values must be [batch, tiles, 3, H, W] as its processor returns them")

    def layouts(self, modality: Modality, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, list[int]]]:
        cfg = self.model.config
        tile = int(cfg.vision_config.image_size)
        rows = cols = tile // self.patch_size
        out, offset = [], 0
        for size in kwargs["image_sizes"].tolist():
            layout = anyres_layout(
                tuple(size), cfg.image_grid_pinpoints, tile, rows, cols, self.prefix, strategy == "full"
            )
            out.append((layout, list(range(offset, offset + layout.num_partitions))))
            offset += layout.num_partitions
        return out
