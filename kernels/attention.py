"""Attention rows without eager attention (``docs/design.md``, "Attention rows without eager attention").

SDPA and FlashAttention never return probabilities. These helpers recompute only what a method needs
from one layer's queries and keys (captured by an adapter while the model keeps running SDPA).
"""

from __future__ import annotations

import math

import torch


def split_heads(q: torch.Tensor, num_heads: int | None) -> torch.Tensor:
    """``[B, T, H, d]`` as it is, or ``[B, T, H*d]`` viewed as ``[B, T, num_heads, d]``."""
    if q.dim() == 4:
        return q
    if num_heads is None:
        raise ValueError("num_heads is required for [B, T, H*d] inputs")
    bsz, t, width = q.shape
    return q.view(bsz, t, num_heads, width // num_heads)


def attention_row(
    q: torch.Tensor,
    k: torch.Tensor,
    query_index: int = 0,
    heads: str = "mean",
    num_heads: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax row of one query over all keys, reduced over heads.

    Args:
        q, k: ``[B, T, H, d]`` or ``[B, T, H*d]`` (then pass ``num_heads``), before the attention scale.
        query_index: which query row (0 = CLS).
        heads: ``"mean"`` or ``"sum"`` over heads.
        scale: logit scale, default ``1/sqrt(d)``.

    Returns:
        ``[B, T]`` fp32 probabilities (each head's row sums to 1 before the reduction; the query's own
        column is included, so drop it *after* the softmax: dropping it before would renormalise the row).
    """
    q, k = split_heads(q, num_heads), split_heads(k, num_heads)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    logits = torch.einsum("bhd,bthd->bht", q[:, query_index].float() * scale, k.float())  # [B, H, T]
    probs = logits.softmax(dim=-1)
    return probs.mean(dim=1) if heads == "mean" else probs.sum(dim=1)


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: str = "mean",
    num_heads: int | None = None,
    scale: float | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Mean over all queries of the attention each key receives: ``s_j = mean_i A[i, j]`` (CLS-free towers).

    Computed in query chunks so memory stays ``O(H * chunk * T)`` instead of ``O(H * T^2)``.

    Returns:
        ``[B, T]`` fp32, reduced over heads by ``heads``; with ``"mean"`` the scores sum to 1.
    """
    q, k = split_heads(q, num_heads), split_heads(k, num_heads)
    bsz, t, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kf = k.float()
    total = torch.zeros(bsz, h, k.shape[1], dtype=torch.float32, device=q.device)
    for start in range(0, t, chunk):
        logits = torch.einsum("bihd,bjhd->bhij", q[:, start : start + chunk].float() * scale, kf)
        total += logits.softmax(dim=-1).sum(dim=2)
    total /= t
    return total.mean(dim=1) if heads == "mean" else total.sum(dim=1)


def head_mean_keys(k: torch.Tensor, num_heads: int | None = None) -> torch.Tensor:
    """``[B, T, d]`` keys averaged over heads (VisionZip's similarity metric)."""
    return split_heads(k, num_heads).float().mean(dim=2)
