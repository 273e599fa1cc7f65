"""``tome``: Token Merging, "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023).
Official code facebookresearch/ToMe (read for understanding, nothing copied); the method page is
``docs/methods/tome.md``.

In every vision block, between the attention and the MLP, ``r`` pairs of similar tokens are merged:

1. **Bipartite soft matching.** Tokens alternate into sets A (even index) and B (odd index); every A token
   finds its most cosine-similar B token, the similarity being that of the block's attention keys averaged
   over heads (``vtc.kernels.cosine_argmax``, no ``|A| x |B|`` matrix); the ``r`` A tokens with the most
   similar partners (stable sort, ties to the lower index) are averaged into their partners. Protected tokens
   (the prefix: CLS, DeiT's distillation token, registers) never move: an A row is masked, a B column too.
2. **Size tracking.** Each token stands for ``s`` input tokens (fp32, so groups beyond 256 stay exact in
   bf16 towers); a merge is the size-weighted mean (``vtc.kernels.weighted_merge``).
3. **Proportional attention.** ``log s`` is added to every attention logit of a key, passed to the host
   attention as an additive float mask (SDPA stays on; no eager switch). Off with ``prop_attn=False``.
4. **Source map.** ``origin[b, j]``: the current row that block-0 token ``j`` is in; an O(T) replacement of
   the reference's ``T x T`` source matrix. After the last merging block the tokens are put back in the
   order of their smallest member, so a consumer (LLaVA's LLM) sees raster order.

Output order of one step: prefix, unmerged A tokens (index order), B tokens — the reference's ``[A_unm; B]``
layout, with prefix tokens kept in front (for a CLS at index 0 this is exactly the reference).

Schedule: ``r`` as an int (every merging block), a per-block list (padded with zeros), each capped at
``min(#unprotected A, (T - prefix) // 2)`` as in the reference recurrence; or, with ``r=None`` (default),
from the one vtc budget: the consumer gets exactly ``k = keep_count(budget, n)`` tokens. The ``R = n - k``
removals are spread evenly over the merging blocks (``r_l = R // L + [l < R % L]``); a block whose share
exceeds the per-step cap passes the excess to the next block, and the last merging block runs extra
matching rounds if it must, so ``k`` is always hit exactly (see :func:`budget_schedule`). ``budget=1.0``
(``k == n``) is the untouched model; an explicit ``r`` takes precedence over any other budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .. import kernels
from ..config import MethodConfig, check_int
from ..contexts import Stage, TowerCall, TowerMerge
from ..method import Method
from ..registry import register_method

__all__ = [
    "ToMeConfig",
    "ToMeMerger",
    "ScheduledMerge",
    "ToMeState",
    "bipartite_soft_matching",
    "merge_wavg",
    "merge_cap",
    "token_counts",
    "budget_schedule",
    "explicit_schedule",
]


@dataclasses.dataclass
class ToMeConfig(MethodConfig):
    """ToMe options.

    Args:
        r: tokens merged per block: an int for every merging block, a per-block sequence, or None (default)
            to derive the schedule from ``budget`` so the consumer gets exactly ``keep_count(budget, n)``.
        prop_attn: proportional attention (``log size`` added to the attention logits).
    """

    r: int | tuple[int, ...] | None = None
    prop_attn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, list | tuple):
            for value in self.r:
                check_int("r (each block)", value, minimum=0)
            self.r = tuple(int(v) for v in self.r)
        elif self.r is not None:
            check_int("r", self.r, minimum=0)
        if not isinstance(self.prop_attn, bool):
            raise TypeError(f"prop_attn must be a bool, got {self.prop_attn!r}")


# -- pure tensor functions ----------------------------------------------------------------------------


def merge_cap(tokens: int, prefix: int) -> int:
    """Most tokens one matching step can remove from ``tokens`` with ``prefix`` protected leading ones."""
    free_a = (tokens + 1) // 2 - (prefix + 1) // 2  # unprotected even indices
    free_b = tokens // 2 - prefix // 2  # unprotected odd indices
    if free_b <= 0:
        return 0
    return max(0, min(free_a, (tokens - prefix) // 2))


def bipartite_soft_matching(metric: torch.Tensor, r: int, prefix: int = 0) -> torch.Tensor:
    """One ToMe matching step: the output row of every token.

    Args:
        metric: ``[B, T, d]`` similarity features (head-mean keys).
        r: tokens to remove, ``0 <= r <= merge_cap(T, prefix)``.
        prefix: the first ``prefix`` tokens are protected (never a source, never a destination).

    Returns:
        ``groups [B, T]`` int64: output row of each token, rows ``0 .. T - r - 1``; the output order is
        prefix, unmerged A tokens by index, then B tokens by index.
    """
    bsz, t, _ = metric.shape
    if not 0 <= r <= merge_cap(t, prefix):
        raise ValueError(f"r={r} is outside [0, {merge_cap(t, prefix)}] for {t} tokens with {prefix} protected")
    device = metric.device
    index = torch.arange(t, device=device)
    a_idx, b_idx = index[0::2], index[1::2]
    with torch.no_grad():
        best, dst = kernels.cosine_argmax(  # [B, |A|] fp32, [B, |A|] index into B
            metric[:, 0::2],
            metric[:, 1::2],
            row_mask=(a_idx >= prefix).expand(bsz, -1),
            col_mask=(b_idx >= prefix).expand(bsz, -1),
        )
        order = torch.sort(best, dim=1, descending=True, stable=True).indices  # [B, |A|]
    src = order[:, :r]  # A positions merged away
    # output order key: prefix by index, then unmerged A by index, then B by index; sources sort last
    key = torch.where(index < prefix, index, torch.where(index % 2 == 0, t + index, 2 * t + index))
    key = key.expand(bsz, -1).clone()
    key.scatter_(1, a_idx[src], 3 * t)
    row = torch.empty_like(key)
    row.scatter_(1, key.argsort(dim=1), index.expand(bsz, -1).contiguous())
    # each source takes its destination's row
    row.scatter_(1, a_idx[src], row.gather(1, b_idx[dst.gather(1, src)]))
    return row


def merge_wavg(
    x: torch.Tensor, size: torch.Tensor, groups: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of each group (``vtc.kernels.weighted_merge``, batched).

    Args:
        x: ``[B, T, C]``; size: ``[B, T]`` fp32; groups: ``[B, T]`` output row per token; rows: ``T'``.

    Returns:
        ``(x' [B, T', C] in x.dtype, size' [B, T'] fp32)``.
    """
    bsz, t, c = x.shape
    offset = (torch.arange(bsz, device=x.device) * rows)[:, None]
    merged, sizes = kernels.weighted_merge(
        x.reshape(bsz * t, c), size.reshape(-1), (groups + offset).reshape(-1), bsz * rows
    )
    return merged.view(bsz, rows, c), sizes.view(bsz, rows)


def token_counts(tokens: int, schedule: Sequence[int]) -> list[int]:
    """Tokens after each block of ``schedule`` (removals per block), starting from ``tokens``."""
    counts = [tokens]
    for r in schedule:
        counts.append(counts[-1] - r)
    return counts


def explicit_schedule(r: int | Sequence[int], tokens: int, prefix: int, blocks: int) -> list[int]:
    """The reference recurrence: ``r_l`` (int, or per-block list padded with zeros) capped at each step."""
    wanted = [int(r)] * blocks if isinstance(r, int) else list(r)
    if len(wanted) > blocks and any(wanted[blocks:]):
        raise ValueError(f"r lists {len(wanted)} blocks but only {blocks} blocks can merge here")
    wanted = (wanted + [0] * blocks)[:blocks]
    out, t = [], tokens
    for want in wanted:
        got = min(want, merge_cap(t, prefix))
        out.append(got)
        t -= got
    return out


def budget_schedule(tokens: int, prefix: int, blocks: int, remove: int) -> list[int]:
    """Per-block removals summing to exactly ``remove`` (even spread, cap overflow carried forward).

    The last block takes whatever is left, in several matching rounds if one is not enough. ``tokens -
    remove`` must keep at least one unprotected token.
    """
    if blocks < 1:
        raise ValueError("a tower merge needs at least one block")
    if remove < 0 or tokens - remove < prefix + 1:
        raise ValueError(
            f"cannot merge {tokens} tokens ({prefix} protected) down to {tokens - remove}: at least one "
            f"unprotected token must remain"
        )
    base, extra = divmod(remove, blocks)
    out, t, carry = [], tokens, 0
    for block in range(blocks):
        want = base + (block < extra) + carry
        got = want if block == blocks - 1 else min(want, merge_cap(t, prefix))
        carry = want - got
        out.append(got)
        t -= got
    return out


def merge_tokens(
    x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove ``r`` tokens from ``x [B, T, C]`` by matching steps (several if ``r`` exceeds one step's cap).

    Returns ``(x' [B, T - r, C], size' [B, T - r] fp32, groups [B, T])``.
    """
    bsz, t, _ = x.shape
    total = torch.arange(t, device=x.device).expand(bsz, -1)
    while r > 0:
        cur = x.shape[1]
        step = min(r, merge_cap(cur, prefix))
        if step <= 0:
            raise RuntimeError(f"cannot remove {r} more tokens from {cur} with {prefix} protected")
        groups = bipartite_soft_matching(metric, step, prefix)
        if r > step:  # another round: the metric follows the tokens
            metric, _ = merge_wavg(metric.float(), size, groups, cur - step)
        x, size = merge_wavg(x, size, groups, cur - step)
        total = groups.gather(1, total)
        r -= step
    return x, size, total


# -- the per-call state the block runners drive --------------------------------------------------------


class ScheduledMerge(TowerMerge):
    """What every schedule-driven tower merge (ToMe, GTP-ViT) keeps per call: the schedule, token sizes, source
    map and counts, and the ``log size`` attention bias once a block changed the tokens (``self.merged``).

    Args:
        schedule: tokens removed in each merging block.
        batch, tokens, prefix: the tower call (``tokens`` per row, ``prefix`` protected).
        weighted: add ``log size`` to the attention logits (ToMe's proportional attention, GTP's token scales).
    """

    def __init__(
        self, schedule: Sequence[int], batch: int, tokens: int, prefix: int, weighted: bool, device: torch.device
    ):
        self.schedule = list(schedule)
        self.prefix = prefix
        self.weighted = weighted
        self.size = torch.ones(batch, tokens, dtype=torch.float32, device=device)  # [B, T]
        self.origin = torch.arange(tokens, device=device).expand(batch, -1)  # [B, T0]
        self.anchor = self.origin  # [B, T]
        self.merged = False
        self.counts = [tokens]  # tokens after each block

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        if not (self.merged and self.weighted) or self.unmerged:
            return None  # all sizes are 1: log 1 = 0, so the host attention runs exactly as without vtc
        return self.size.log().to(dtype)[:, None, None, :]

    def wants_metric(self, block: int) -> bool:
        return block < len(self.schedule) and self.schedule[block] > 0

    def after_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        self.counts.append(int(x.shape[1]))
        return x


class ToMeState(ScheduledMerge):
    """Sizes, source map and schedule of one ToMe tower call (see :class:`vtc.contexts.TowerMerge`);
    ``weighted`` is proportional attention."""

    def merge(self, block: int, x: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
        if not self.wants_metric(block):
            return x
        if metric is None:
            raise RuntimeError(f"block {block} merges but its runner passed no metric")
        x, self.size, groups = merge_tokens(x, metric, self.size, self.schedule[block], self.prefix)
        self.origin = groups.gather(1, self.origin)
        self.merged = True
        return x

    def after_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        if block == len(self.schedule) - 1 and self.merged:
            x = self._restore_order(x)
        return super().after_block(block, x)

    def _restore_order(self, x: torch.Tensor) -> torch.Tensor:
        """Sort the current tokens by their smallest member (raster order for the consumer)."""
        bsz, t0 = self.origin.shape
        rows = x.shape[1]
        members = torch.arange(t0, device=x.device).expand(bsz, -1)
        anchor = torch.full((bsz, rows), t0, dtype=torch.long, device=x.device)
        anchor.scatter_reduce_(1, self.origin, members, reduce="amin")
        order = anchor.argsort(dim=1)  # anchors are distinct
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(rows, device=x.device).expand(bsz, -1))
        self.origin = rank.gather(1, self.origin)
        self.anchor = anchor.gather(1, order)
        self.size = self.size.gather(1, order)
        return x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))


@register_method("tome", config=ToMeConfig, kind="merger", stages=(Stage.VISION, Stage.VISION_MERGE))
class ToMeMerger(Method):
    """ToMe: bipartite soft matching in every vision block, size-weighted merges, proportional attention."""

    modalities = ("image", "video")  # video: frames merged in towers that hand the model full grids (unmerge)

    def tower_merge(self, call: TowerCall) -> ToMeState | None:
        if call.k >= call.n:
            return None  # a full budget is the untouched model
        cfg: ToMeConfig = self.config  # type: ignore[assignment]
        if cfg.r is None:
            schedule = budget_schedule(call.tokens, call.prefix, call.blocks, call.n - call.k)
        else:
            schedule = explicit_schedule(cfg.r, call.tokens, call.prefix, call.blocks)
        return ToMeState(schedule, call.batch, call.tokens, call.prefix, cfg.prop_attn, call.device)
