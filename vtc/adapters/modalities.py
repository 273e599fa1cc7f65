"""Modalities: the kinds of visual input a family takes, as small strategy objects a VLM adapter lists.

A :class:`Modality` knows one input: which call argument holds its pixels, its placeholder id, how the
model's own feature function is called, and how each item's tokens are laid out (:class:`~vtc.contexts.Layout`),
so the adapter can hand methods per-item signals and pre-projector features aligned with the tokens.
The base class is LLaVA-1.5's image: one raster grid per image. The others change only what differs:

* :class:`AnyresImages` (LLaVA-NeXT): a full view plus crops, unpadded, with a newline token per row;
* :class:`MultiImages` (LLaVA-OneVision): anyres for a sample with one image, the base tile and one
  separator per image for a sample with several;
* the video modalities of :mod:`vtc.adapters.frames` (pooled frame grids) and of Qwen2-VL.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..contexts import Layout


@dataclasses.dataclass(frozen=True)
class Modality:
    """One kind of visual input: LLaVA-1.5 images (one ``rows x cols`` grid per image, CLS dropped unless the
    feature strategy is ``"full"``).

    Attributes:
        name: ``"image"`` or ``"video"``: selects ``get_<name>_features`` and ``ImageTokens.modality``.
        pixels: the call argument holding its pixels.
        token_id: its placeholder id in ``input_ids``.
        extra: other call arguments the feature function takes (dropped from the stock call with the pixels).
        position_args: call arguments the model's own position computation reads (kept while vtc leaves the
            positions to the model, dropped once it passes explicit ones).
    """

    #: items are a full view plus crops (``TowerInfo.crops``)
    crops: ClassVar[bool] = False
    #: an item's placeholders may be several runs of its prompt with text between them (one per partition,
    #: e.g. Qwen3-VL's video frames behind their timestamps); its output tokens are then kept in run order
    segmented: ClassVar[bool] = False

    name: str
    pixels: str
    token_id: int
    extra: tuple[str, ...] = ()
    position_args: tuple[str, ...] = ()

    def check(self, kwargs: Mapping[str, Any]) -> None:
        """Raise a clear error for inputs of this modality vtc cannot lay out (before anything runs)."""

    def features(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> Any:
        """Run the model's own feature function (vision tower + projector + packing) on this modality."""
        extra = {key: kwargs[key] for key in self.extra if kwargs.get(key) is not None}
        fn = getattr(adapter.base, f"get_{self.name}_features")
        return fn(
            kwargs[self.pixels],
            vision_feature_layer=adapter.feature_layer,
            vision_feature_select_strategy=strategy,
            return_dict=True,
            **extra,
        )

    def item_features(self, output: Any) -> list[torch.Tensor]:
        """The per-item ``[n, D]`` tokens in a feature output."""
        return list(output.pooler_output)

    def pack_features(self, output: Any, items: list[torch.Tensor]) -> Any:
        """A feature output the model's forward accepts as ``mm_encoder_outputs[name]``."""
        return output.__class__(**{**output, "pooler_output": items})

    def layouts(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, Any]]:
        """Per item: its layout, and the rows of the vision-tower batch that are its partitions."""
        pixel_values = kwargs[self.pixels]
        patch = adapter.patch_size
        rows, cols = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        layout = Layout.grid(rows, cols, prefix=adapter.prefix, include_prefix=strategy == "full")
        return [(layout, [i]) for i in range(pixel_values.shape[0])]

    def item_signals(
        self, adapter: Any, captured: dict[str, torch.Tensor], rows: Any, layout: Layout
    ) -> dict[str, torch.Tensor]:
        """The item's signals ``[P, slots, ...]`` from the tower-batch rows of its partitions."""
        return {name: value[rows] for name, value in captured.items()}

    def item_vision_tokens(
        self, adapter: Any, proj_in: torch.Tensor, rows: Any, layout: Layout, full: bool
    ) -> torch.Tensor:
        """Pre-projector features ``[n, C]`` aligned with the item's tokens (zeros for separators).

        ``proj_in``: ``[N, T, C]`` projector input of the tower batch (T excludes CLS unless ``full``).
        """
        value = proj_in[rows]
        out = value.new_zeros(layout.num_tokens, value.shape[-1])
        has = layout.slot >= 0
        cols = layout.slot[has] - (0 if full else layout.prefix)
        out[has.to(out.device)] = value[layout.partition[has], cols]
        return out


class AnyresImages(Modality):
    """LLaVA-NeXT images: ``pixel_values [B, tiles, 3, s, s]``, laid out by :func:`anyres_layout`."""

    crops = True

    def check(self, kwargs: Mapping[str, Any]) -> None:
        if kwargs.get("image_sizes") is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (the processor returns them) together with pixel_values")
        if kwargs[self.pixels].dim() == 4:
            raise ValueError("LLaVA-NeXT pixel_values must be [batch, tiles, 3, H, W] as its processor returns them")

    def layouts(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, Any]]:
        return _tiled([self.layout(adapter, tuple(size), strategy) for size in kwargs["image_sizes"].tolist()])

    def layout(self, adapter: Any, size: tuple[int, int], strategy: str) -> Layout:
        cfg = adapter.model.config
        tile = int(cfg.vision_config.image_size)
        rows = tile // adapter.patch_size
        return anyres_layout(size, cfg.image_grid_pinpoints, tile, rows, rows, adapter.prefix, strategy == "full")


class MultiImages(AnyresImages):
    """LLaVA-OneVision images: anyres for a sample with one image; the base tile and one separator per image for
    a sample with several (``batch_num_images``). Crop grids above ``anyres_max_<N>`` tiles are interpolated by
    the model, which blends tokens and has no token-level layout: such images are refused."""

    def layouts(self, adapter: Any, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, Any]]:
        cfg = adapter.model.config
        rows = int(cfg.vision_config.image_size) // adapter.patch_size
        aspect = kwargs.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
        max_tiles = int(str(aspect).replace("anyres_max_", ""))
        per_sample = kwargs.get("batch_num_images")
        sizes = kwargs["image_sizes"].tolist()
        patching = [True] * len(sizes) if per_sample is None else [n == 1 for n in per_sample for _ in range(n)]
        out = []
        for size, patch in zip(sizes, patching, strict=True):
            if patch:
                layout = self.layout(adapter, tuple(size), strategy)
            else:  # multi-image samples: the base tile and one separator
                base = Layout.grid(rows, rows, adapter.prefix, strategy == "full")
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
            out.append(layout)
        return _tiled(out)


def _tiled(layouts: list[Layout]) -> list[tuple[Layout, list[int]]]:
    """Each layout with the tower-batch rows of its partitions, items one after the other."""
    out, offset = [], 0
    for layout in layouts:
        out.append((layout, list(range(offset, offset + layout.num_partitions))))
        offset += layout.num_partitions
    return out


def anyres_layout(
    image_size: tuple[int, int],
    pinpoints: list,
    tile: int,
    rows: int,
    cols: int,
    prefix: int,
    include_prefix: bool,
) -> Layout:
    """Layout of one LLaVA-NeXT image.

    An image of size ``(H, W)`` becomes ``1 + g_h * g_w`` tiles at the tower's resolution: tile 0 is the
    whole image resized (the *base* partition), tiles ``1..`` are the crops of the best-fitting canvas in
    row-major order. The model packs the base grid first (raster, no separator), then the crops assembled
    into one ``(g_h r) x (g_w c)`` grid, *unpadded* (rows or columns covering only the canvas padding are
    cut), with the ``image_newline`` token appended to every row, flattened row-major. This reproduces that
    packing on an index grid with the model module's own ``get_anyres_image_grid_shape`` / ``unpad_image`` /
    ``image_size_to_num_patches``, so it cannot drift from the features. Separators have no vision slot
    (``Layout.is_newline``); what happens to them is the method's newline policy.

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


def pool_to_token_grid(value: torch.Tensor, side: int, kernel: int) -> torch.Tensor:
    """Per-patch values -> per-LLM-token values, for towers whose LLM token covers ``kernel x kernel`` patches.

    ``value``: ``[N, side * side, ...]`` raster patch values of ``N`` images or tiles (no CLS slot). Returns
    ``[N, (side // kernel) ** 2, ...]`` (fp32): each token's value is the mean over its patches, in raster
    order of the token grid. Used where the model pools or pixel-shuffles patches into one token (Gemma 3's
    4 x 4 average pool, InternVL's 2 x 2 pixel shuffle), so scores rank the tokens the LLM actually receives.
    """
    n, tail = value.shape[0], value.shape[2:]
    maps = value.float().reshape(n, side, side, -1).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.avg_pool2d(maps, kernel_size=kernel, stride=kernel)
    return pooled.permute(0, 2, 3, 1).reshape(n, -1, *tail)


def equal_rows(items: list[torch.Tensor]) -> torch.Tensor:
    """Items' tokens ``[n_i, D]`` as one ``[rows, g, D]`` tensor, ``g`` the greatest common divisor of the ``n_i``.

    For models that scatter ``pooler_output.flatten()`` into the placeholders in order (Gemma 3, InternVL):
    every row belongs to one item, so ``generate`` can still split the rows per prompt when it repeats prompts
    (beams, ``num_return_sequences``), even when the items kept different counts.
    """
    g = math.gcd(*(int(x.shape[0]) for x in items)) or 1
    flat = torch.cat(items)
    return flat.reshape(-1, g, flat.shape[-1])
