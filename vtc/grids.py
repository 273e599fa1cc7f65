"""Grid geometry shared by the spatial baselines: cover a rows x cols grid with exactly k cells."""

from __future__ import annotations

import math

import torch

from .budget import split_count
from .contexts import Layout


def band_cells(rows: int, cols: int, k: int) -> list[tuple[int, int, int, int]]:
    """Split a ``rows x cols`` grid into exactly ``k`` rectangles ``(r0, r1, c0, c1)``, row-major.

    The grid is cut into ``h`` horizontal bands (``h`` chosen so cells are close to square); band ``i`` gets
    ``floor((i+1)k/h) - floor(ik/h)`` cells of near-equal width. Every grid cell lies in exactly one
    rectangle. ``k = rows * cols`` gives one rectangle per cell.
    """
    if not 1 <= k <= rows * cols:
        raise ValueError(f"k must be in [1, {rows * cols}], got {k}")
    h = round(math.sqrt(k * rows / cols))
    h = min(rows, k, max(1, h, math.ceil(k / cols)))
    cells = []
    for i in range(h):
        r0, r1 = (i * rows) // h, ((i + 1) * rows) // h
        c = ((i + 1) * k) // h - (i * k) // h
        for j in range(c):
            cells.append((r0, r1, (j * cols) // c, ((j + 1) * cols) // c))
    return cells


def per_partition_counts(layout: Layout, k: int) -> list[int]:
    """Share ``k`` among the partitions in proportion to the tokens of each that reach the LLM."""
    sizes = [int((layout.partition_tokens(p) >= 0).sum()) for p in range(layout.num_partitions)]
    return split_count(k, sizes)


def grid_regions(layout: Layout, k: int) -> list[tuple[int, torch.Tensor]]:
    """``k`` regions over the partition grids: per region ``(anchor token, member tokens)``.

    The anchor is the token at the region's centre (rounding up-left). Regions cover the rectangle of grid
    cells fed to the LLM (LLaVA-NeXT's unpadding removes whole rows or columns of a crop grid); a grid whose
    fed cells are not a rectangle (tokens removed by an earlier stage) must leave no region empty.
    """
    regions = []
    for p, kp in enumerate(per_partition_counts(layout, k)):
        if kp == 0:
            continue
        rows, cols = layout.grids[p]
        tokens = layout.partition_tokens(p).view(rows, cols)
        fed_rows = torch.nonzero((tokens >= 0).any(1)).flatten()
        fed_cols = torch.nonzero((tokens >= 0).any(0)).flatten()
        tokens = tokens[int(fed_rows[0]) : int(fed_rows[-1]) + 1, int(fed_cols[0]) : int(fed_cols[-1]) + 1]
        rows, cols = tokens.shape
        for r0, r1, c0, c1 in band_cells(rows, cols, kp):
            members = tokens[r0:r1, c0:c1].flatten()
            members = members[members >= 0]
            if members.numel() == 0:
                raise ValueError(
                    f"grid {p} has too few tokens left in places to cover it with {kp} regions (its tokens are not "
                    f"a full rectangle); pool or sample a full grid, e.g. first in a stack"
                )
            anchor = tokens[(r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2]
            regions.append((int(anchor) if anchor >= 0 else int(members[0]), members))
    return regions
