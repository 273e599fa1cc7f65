"""Public ops: one signature each, dispatched to the reference or a fast kernel (see ``dispatch``)."""

from __future__ import annotations

import torch

from .dispatch import implementation


def cosine_argmax(
    a: torch.Tensor,
    b: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    col_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise best cosine match of ``a [..., M, D]`` in ``b [..., N, D]``: ``(value fp32, index int64)``."""
    return implementation("cosine_argmax", a.device)(a, b, row_mask, col_mask)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` indices along the last dim, ties to the lower index, returned in ascending order."""
    return implementation("topk_sorted", scores.device)(scores, k)


def greedy_maxmin(x: torch.Tensor, k: int, first: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min cosine-distance selection of ``k`` rows of ``x [B, N, D]``, in selection order."""
    return implementation("greedy_maxmin", x.device)(x, k, first)


def weighted_merge(
    x: torch.Tensor, sizes: torch.Tensor, groups: torch.Tensor, num_groups: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean per group (fp32 accumulation): ``(merged [G, C], sizes [G])``.

    Inputs that need a gradient take the PyTorch reference (the fused kernel has no backward)."""
    if torch.is_grad_enabled() and x.requires_grad:
        from . import reference

        return reference.weighted_merge(x, sizes, groups, num_groups)
    return implementation("weighted_merge", x.device)(x, sizes, groups, num_groups)


def attention_received(
    q: torch.Tensor, k: torch.Tensor, heads: str = "mean", num_heads: int | None = None, scale: float | None = None
) -> torch.Tensor:
    """Mean over all queries of the attention each key receives, ``[B, T]`` fp32 (``q, k [B, T, H, d]``), with no
    ``H x T x T`` buffer on either backend (the reference walks query chunks; the kernel recomputes tiles)."""
    return implementation("attention_received", q.device)(q, k, heads, num_heads, scale)
