"""Shared pieces of the video mergers: frame grids, DPC-kNN clustering, cluster merges."""

from __future__ import annotations

import math

import torch

from .. import kernels
from ..contexts import ImageTokens

#: pairwise distances held at once by :func:`dpc_knn`
_CHUNK = 2**22


def frame_grid(image: ImageTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F [T, P, C], index [T, P])``: each frame's grid tokens and their indices among the image's tokens.

    Raises if frames have different grids or cells missing (video grids are full rectangles).
    """
    layout = image.layout
    grids = set(layout.grids)
    if len(grids) != 1:
        raise ValueError(f"video mergers need frames of one grid size, got {sorted(grids)}")
    index = torch.stack([layout.partition_tokens(t) for t in range(layout.num_partitions)])  # [T, P]
    if bool((index < 0).any()):
        raise ValueError("video mergers need every grid cell of every frame")
    index = index.to(image.tokens.device)
    return image.tokens[index], index


def frame_scores(image: ImageTokens, signal, index: torch.Tensor) -> torch.Tensor:
    """``[T, P]`` per-token importance from a vision signal, fp32."""
    return image.token_signal(signal, fill=float("-inf")).float()[index]


def dpc_knn(y: torch.Tensor, n_centres: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density-peak clustering with kNN density (``docs/methods/holitom.md``), deterministic.

    Args:
        y: ``[N, D]``; n_centres: centres wanted (``1 <= n_centres <= N``); k: neighbours (self included).

    Returns:
        ``(centres [n_centres] ascending, assign [N] row of each token's centre, gamma [N] scores)``.
    """
    n, d = y.shape
    yf = y.float()
    rows = max(1, _CHUNK // n)  # distance rows held at once: no N x N buffer past 2**22 entries

    whole = torch.cdist(yf, yf) / math.sqrt(d) if rows >= n else None  # one block: computed once

    def dist(start: int) -> torch.Tensor:  # [rows, N] scaled Euclidean distances of a block of rows
        return whole if whole is not None else torch.cdist(yf[start : start + rows], yf) / math.sqrt(d)

    k = max(1, min(k, n))
    knn = torch.cat([dist(s).topk(k, dim=-1, largest=False).values for s in range(0, n, rows)])
    rho = torch.exp(-(knn**2).mean(dim=-1))
    rho = rho + 1e-9 * (n - torch.arange(n, device=y.device)) / n  # deterministic tie-break: earlier tokens first
    delta, far = [], torch.zeros((), device=y.device)
    for s in range(0, n, rows):
        block = dist(s)
        higher = rho[None, :] > rho[s : s + rows, None]  # [i, j]: j denser than i
        delta.append(block.masked_fill(~higher, float("inf")).min(dim=-1).values)
        far = torch.maximum(far, block.max())
    delta = torch.cat(delta)
    delta = torch.where(torch.isinf(delta), far, delta)
    gamma = delta * rho
    centres = kernels.topk_sorted(gamma, n_centres)
    columns = whole[:, centres] if whole is not None else torch.cdist(yf, yf[centres]) / math.sqrt(d)
    assign = columns.argmin(dim=-1)
    assign[centres] = torch.arange(n_centres, device=y.device)
    return centres, assign, gamma


def beta_merge(x: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * x_centre + (1 - beta) * mean(members)`` per cluster (``x_centre`` alone if it has no members)."""
    n_c = centres.numel()
    members = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    members[centres] = False
    out = x[centres].float()
    if bool(members.any()):
        mean, count = kernels.weighted_merge(
            x[members], torch.ones(int(members.sum()), device=x.device), assign[members], num_groups=n_c
        )
        has = count > 0
        out[has] = beta * out[has] + (1 - beta) * mean[has].float()
    return out.to(x.dtype)
