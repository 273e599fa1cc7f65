"""Readable PyTorch references: the ground truth every fast kernel is tested against.

Contract (``docs/kernels.md``, "Correctness contract"): fp16/bf16/fp32 inputs; norms, dots and sums
accumulate in fp32; similarities are fp32; indices are int64; ties go to the lower index; a NaN score ranks
above every number (torch semantics); an all-zero vector has cosine similarity 0 with everything; equal inputs
get equal scores wherever they sit (a matrix product may round one row or column differently from an equal
one elsewhere in its tiles: :func:`first_equal`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import attention_received  # noqa: F401  (the reference of the attention_received op)

EPS = 1e-12


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / max(||x||, 1e-12)`` along the last dim, in fp32."""
    return F.normalize(x.float(), dim=-1, eps=EPS)


def first_equal(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[..., R]``: for every row of ``x [..., R, D]``, the index of the first row equal to it (itself if none).

    Exact comparison (``==``: ``-0.0`` equals ``0.0``); rows where ``valid [..., R]`` is False, and rows holding a
    NaN, are equal to no other row. Batched: one ``torch.unique`` over the rows prefixed with a tag (their batch
    entry, or their own index for a row that stands alone). A NaN row must get its own tag: left among the
    others it breaks the sort's order and equal rows around it fail to group. On an H200 this costs about
    0.7 ms for 6,272 x 64 rows; an exact-hash-and-sort variant measured about twice as slow there and was dropped.
    """
    *lead, r, d = x.shape
    bsz = math.prod(lead)
    flat = x.reshape(bsz * r, d).float() + 0.0  # + 0.0 turns -0.0 into 0.0, which unique would keep apart
    index = torch.arange(bsz * r, device=x.device)
    alone = flat.isnan().any(-1)
    if valid is not None:
        alone |= ~valid.expand(*lead, r).reshape(-1).bool()
    tag = torch.where(alone, bsz + index, index // max(r, 1))  # rows of different batch entries never group
    if flat.shape[0] == 0:
        return index.reshape(*lead, r)
    _, inverse = torch.unique(torch.cat([tag[:, None].double(), flat.double()], 1), dim=0, return_inverse=True)
    first = torch.full_like(index, bsz * r).scatter_reduce(0, inverse, index, "amin")
    return (first[inverse] % max(r, 1)).reshape(*lead, r)


def equal_inputs(
    a: torch.Tensor, b: torch.Tensor, row_mask: torch.Tensor | None, col_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """How ``cosine_argmax`` keeps equal inputs equal: ``(rows [..., M], col_mask [..., N])``.

    Each row of ``a`` takes the answer of the first row equal to it (``rows``); a column of ``b`` equal to an
    earlier one is masked, so equal columns are scored once and a tie among them goes to the first.
    """
    cols = first_equal(b, col_mask)
    unique = cols == torch.arange(b.shape[-2], device=b.device)
    mask = unique if col_mask is None else unique & col_mask.bool()
    return first_equal(a, row_mask), mask


def cosine_argmax(
    a: torch.Tensor,
    b: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    col_mask: torch.Tensor | None = None,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in ``b`` for every row of ``a``, ``chunk`` rows of similarities at a time (``O(chunk N)``
    memory, never ``M x N``).

    Args:
        a: ``[..., M, D]``; b: ``[..., N, D]`` (same leading dims).
        row_mask: ``[..., M]`` bool, False rows return (-inf, 0).
        col_mask: ``[..., N]`` bool, False columns are never chosen.

    Returns:
        ``(value [..., M] fp32, index [..., M] int64)``; a row with every column masked gives (-inf, 0).
        Equal rows get equal answers, and among equal columns the first is chosen (:func:`equal_inputs`).
    """
    rows, col_mask = equal_inputs(a, b, row_mask, col_mask)
    an, bt = normalize(a), normalize(b).transpose(-1, -2)  # [..., M, D], [..., D, N]
    shape = torch.broadcast_shapes(a.shape[:-1], (*b.shape[:-2], a.shape[-2]))  # [..., M]
    value = torch.full(shape, float("-inf"), device=an.device)
    index = torch.zeros(shape, dtype=torch.long, device=an.device)
    if b.shape[-2]:
        for start in range(0, a.shape[-2], chunk):
            sim = an[..., start : start + chunk, :] @ bt  # [..., c, N]
            if col_mask is not None:
                sim = sim.masked_fill(~col_mask.bool().unsqueeze(-2), float("-inf"))
            value[..., start : start + chunk], index[..., start : start + chunk] = sim.max(dim=-1)
    if row_mask is not None:
        keep = row_mask.bool()
        value = value.masked_fill(~keep, float("-inf"))
        index = index.masked_fill(~keep, 0)
    rows = rows.expand(value.shape)
    return value.gather(-1, rows), index.gather(-1, rows)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last dim, returned in ascending index order.

    Ranking is by (score descending, index ascending); NaN ranks above every number.
    """
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :k], dim=-1).values


def greedy_maxmin(x: torch.Tensor, k: int, first: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """Greedy max-min diversity selection on cosine distance (DivPrune; ToDRE v1's k-center).

    ``d(i, j) = 1 - cos(x_i, x_j)`` in fp32. Unless ``first`` is given, the first pick is the token whose
    nearest other token is farthest (``argmax_j min_{i != j} d(i, j)``). Each next pick maximises the distance
    to the chosen set; chosen tokens are masked so none repeats. Ties go to the lower index.

    No ``N x N`` matrix: each pick's distance row is computed when it is picked (``O(k N D)`` time, ``O(N)``
    memory per image), and the first pick's nearest-neighbour distances in blocks of ``chunk`` rows
    (``O(chunk N)`` memory).

    Args:
        x: ``[B, N, D]`` or ``[N, D]``.
        k: number of tokens to pick, ``0 <= k <= N``.
        first: optional ``[B]`` (or scalar) index of the first pick.

    Returns:
        ``[B, k]`` (or ``[k]``) int64 indices in selection order.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    bsz, n, _ = x.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    out = torch.zeros(bsz, k, dtype=torch.long, device=x.device)
    if k == 0:
        return out[0] if squeeze else out
    xn = normalize(x)
    rows = torch.arange(bsz, device=x.device)
    if first is None:
        cur = nearest_distance(xn, chunk).argmax(dim=-1) if n > 1 else torch.zeros_like(rows)
    else:
        cur = torch.as_tensor(first, dtype=torch.long, device=x.device).expand(bsz).clone()
    chosen = torch.zeros(bsz, n, dtype=torch.bool, device=x.device)
    mind = torch.full((bsz, n), float("inf"), device=x.device)
    for step in range(k):
        out[:, step] = cur
        chosen[rows, cur] = True
        dist = 1.0 - torch.bmm(xn, xn[rows, cur].unsqueeze(-1)).squeeze(-1)  # [B, N]: the new pick's row
        mind = torch.minimum(mind, dist)
        if step + 1 < k:
            cur = mind.masked_fill(chosen, float("-inf")).argmax(dim=-1)
    return out[0] if squeeze else out


def nearest_distance(xn: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``[B, N]``: each row's cosine distance to its nearest other row (``xn`` unit rows ``[B, N, D]``), in
    blocks of ``chunk`` rows; NaN propagates like ``torch.min``; ``+inf`` when ``N == 1``."""
    bsz, n, _ = xn.shape
    out = torch.empty(bsz, n, dtype=torch.float32, device=xn.device)
    for s in range(0, n, chunk):
        block = 1.0 - xn[:, s : s + chunk] @ xn.transpose(-1, -2)  # [B, c, N]
        idx = torch.arange(s, s + block.shape[1], device=xn.device)
        block[:, idx - s, idx] = float("inf")  # not its own nearest
        out[:, s : s + block.shape[1]] = block.min(dim=-1).values
    return out


def weighted_merge(
    x: torch.Tensor, sizes: torch.Tensor, groups: torch.Tensor, num_groups: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of the tokens of each group.

    Args:
        x: ``[T, C]`` tokens; sizes: ``[T]`` how many original tokens each stands for; groups: ``[T]``
            output row of each token, -1 drops it.
        num_groups: number of output rows (default ``groups.max() + 1``).

    Returns:
        ``(merged [G, C] in x.dtype, sizes [G] fp32)``; ``merged[g] = sum_i s_i x_i / sum_i s_i`` over the
        group's members, accumulated in fp32. An empty group gives zeros and size 0.
    """
    groups = groups.long()
    g = int(groups.max().item()) + 1 if num_groups is None else num_groups
    if groups.numel() == 0:
        g = 0 if num_groups is None else num_groups
    keep = groups >= 0
    w = sizes.float()[keep]
    num = torch.zeros(g, x.shape[-1], dtype=torch.float32, device=x.device)
    num.index_add_(0, groups[keep], x.float()[keep] * w[:, None])
    den = torch.zeros(g, dtype=torch.float32, device=x.device).index_add_(0, groups[keep], w)
    merged = num / den.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    return merged.to(x.dtype), den
