"""Token merging inside Qwen2.5-VL's vision tower: windowed attention over a reordered sequence.

Qwen2.5-VL's tower reorders each image's (or frame's) patches so that every window of ``window_size`` pixels
(8 x 8 patches of 14 px in the released models) is contiguous, runs most blocks with attention **within each
window** and a few (``fullatt_block_indexes``) over the whole image, then restores the order after its 2 x 2
patch merger. Merging keeps that structure:

* the merge unit is the **window**: each window has its own merge state (windows of one length share a batch,
  as segments do on Qwen2-VL, :mod:`vtc.adapters.qwen_tower`) and merges to the budget's share of its own
  patches, so a merged token always belongs to exactly one window and windowed blocks run as the model runs them;
* a full-attention block joins each image's windows again (their current tokens, in window order, with each
  window's ``log size`` bias), attends over the whole image, then merges per window (the keys of the joined
  attention, split by window);
* positions and the rest are Qwen2-VL's: a merged token's 2-D RoPE is the tower's own at the centroid of its
  patches (the recorded patch positions are put in the window order first), and after the last block every window
  gets its grid back for the patch merger, which then restores the image order itself.

A method whose merge reads attention probabilities (GTP-ViT) gets them **within the window** in full-attention
blocks too (its graph and its merges are window-local). The window layout comes from
``transformers.vision_utils.get_vision_window_index``, the function the tower calls, on the ``grid_thw`` of the
call (a forward pre-hook on the tower records it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .qwen_tower import (
    QWEN_BLOCKS,
    attend,
    bias_of,
    embeddings,
    merge_mlp,
    qwen_vision_block,
    run_segments,
    start_groups,
)


def window_hook(ctx: Any, vision_config: Any) -> Callable:
    """Forward pre-hook on the tower: record the call's windows (``ctx.qwen_windows``) from its ``grid_thw``."""
    from transformers.vision_utils import get_vision_window_index

    merge = int(vision_config.spatial_merge_size)

    def hook(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            ctx.qwen_windows = None
            return
        order, cu = get_vision_window_index(grid, merge, vision_config.window_size, vision_config.patch_size)
        lengths = (cu[1:] - cu[:-1]).tolist()
        frames = [int(h * w) for t, h, w in grid.tolist() for _ in range(int(t))]  # full-attention segments
        images, window, filled = [], 0, 0
        for size in frames:  # each frame's windows are contiguous in the window order
            ours, end = [], filled + size
            while filled < end:
                ours.append(window)
                filled += lengths[window]
                window += 1
            images.append(ours)
        ctx.qwen_windows = {"lengths": lengths, "images": images, "order": order.to(torch.long), "unit": merge * merge}

    return hook


def _window_order(positions: torch.Tensor, windows: dict) -> torch.Tensor:
    """Patch positions ``[N, 2]`` in the natural order -> the tower's window order (groups of ``unit`` patches)."""
    unit = windows["unit"]
    order = windows["order"].to(positions.device)
    return positions.reshape(-1, unit, positions.shape[-1])[order].reshape(-1, positions.shape[-1])


def qwen25_vision_block(ctx: Any, index: int, orig: type, block: nn.Module) -> Callable:
    """Qwen2.5-VL ``Qwen2_5_VLVisionBlock``: windows as the merge segments; full-attention blocks join them."""

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        if index == 0:
            ctx.qwen = None
            windows, positions = getattr(ctx, "qwen_windows", None), getattr(ctx, "qwen_positions", None)
            if windows is not None and positions is not None:
                positions = _window_order(positions, windows)
                ctx.qwen = start_groups(ctx, hidden_states, windows["lengths"], positions, position_embeddings)
                if ctx.qwen is not None:
                    ctx.qwen["images"] = windows["images"]
        groups = getattr(ctx, "qwen", None)
        if groups is None:
            return orig.forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        if index not in ctx.qwen_full_blocks:
            return run_segments(ctx, self, index, groups, hidden_states)
        return _full_block(ctx, self, index, groups, hidden_states)

    return forward


def _join(part, images: list[list[int]]) -> torch.Tensor:
    """``[S, T, ...]``: per image, its windows' rows of ``part`` (indexable by window) concatenated in order."""
    return torch.stack([torch.cat([part[w] for w in windows]) for windows in images])


def _full_block(ctx: Any, block: nn.Module, index: int, groups: dict, hidden: torch.Tensor) -> torch.Tensor:
    """A full-attention block: each image's windows joined for the attention, merged per window afterwards."""
    pieces = list(torch.split(hidden, groups["lengths"]))
    cos, sin, bias = {}, {}, {}
    for group in groups["groups"]:
        x = group.stack(pieces)
        c, s = embeddings(groups, group, x)
        b = bias_of(group, x)
        for row, i in enumerate(group.segments):
            cos[i], sin[i] = c[row], s[row]
            bias[i] = b[row, 0, 0] if b is not None else torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    by_shape: dict[tuple[int, ...], list[list[int]]] = {}
    for windows in groups["images"]:
        by_shape.setdefault(tuple(pieces[w].shape[0] for w in windows), []).append(windows)
    queries, keys = {}, {}
    for sizes, images in by_shape.items():
        key_bias = _join(bias, images)
        mask = key_bias[:, None, None, :] if bool(key_bias.any()) else None
        x, q, k = attend(block, _join(pieces, images), _join(cos, images), _join(sin, images), mask)
        for row, windows in enumerate(images):
            parts = zip(windows, x[row].split(sizes), q[row].split(sizes), k[row].split(sizes), strict=True)
            for w, xs, qs, ks in parts:
                pieces[w], queries[w], keys[w] = xs, qs, ks
    for group in groups["groups"]:
        x = group.stack(pieces)
        x = merge_mlp(ctx, block, index, group.state, x, group.stack(queries), group.stack(keys), bias_of(group, x))
        group.put(pieces, x)
    groups["lengths"] = [p.shape[0] for p in pieces]
    return torch.cat(pieces)


#: the Qwen vision blocks token merging runs in, and their runners
QWEN_RUNNERS = {name: qwen_vision_block for name in QWEN_BLOCKS} | {
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLVisionBlock": qwen25_vision_block,
}
