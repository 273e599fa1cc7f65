"""``gtp``: Graph-based Token Propagation, "GTP-ViT: Efficient Vision Transformers via Graph-based Token
Propagation" (Xu et al., WACV 2024, arXiv 2311.03035). Official code Ackesnal/GTP-ViT, ``models_v3.py`` at
commit 97a1178 (read for understanding, nothing copied); the method page is ``docs/methods/gtp.md``.

A ToMe alternative inside the vision tower. Once per image, before block 0, a graph over the patch tokens
(the prefix: CLS, distillation token, registers, stays out of it) is built from the tokens entering block 0:

* **spatial**: the 8 grid neighbours of each patch; **semantic**: each patch's ``num_neighbours`` most
  cosine-similar patches (``>=`` the k-th largest similarity, so ties can add more; a directed kNN graph);
  **mixed** (default): their union. The adjacency ``A`` is normalised symmetrically,
  ``W = D^-1/2 A D^-1/2`` with ``D`` the row sums.

Then in every merging block, between the attention and the MLP (as the official ``GraphPropagationBlock``):

1. **Selection.** Each patch is ranked from the block's attention probabilities (the log-scale bias included);
   the default ``MixedAttnMax`` is ``max_h A_h[i, i] * max_h sum_q A_h[q, i]`` (the largest self-attention over
   heads times the largest attention received over heads, every query row counted, the prefix's included).
   The ``P`` lowest-ranked patches are propagated, the rest kept.
2. **Propagation.** ``x_kept += alpha * W[kept, prop] @ x_prop`` and, with ``token_scale``, the scales
   likewise: ``s_kept += alpha * W[kept, prop] @ s_prop``. The graph shrinks to ``W[kept, kept]`` (not
   renormalised), so a propagated token whose neighbours are all gone reaches nobody.
3. **Proportional attention.** With ``token_scale``, ``log s`` is added to every attention logit of a key (an
   additive mask: SDPA stays on). The scales are the official ``token_scales``, not member counts, so a host
   that average-pools its output takes the plain mean, as the official head does.

Defaults and where they come from: ``selection="MixedAttnMax"``, ``graph="Mixed"``, propagation by the graph
(the official ``hyperparameter_search.py`` and README settings); ``alpha=0.1`` (``main.py`` and the model's
default); ``num_neighbours=8`` (``main.py``); ``token_scale=True`` (the README's reported settings). The
official attention ``sparsity`` (zeroing small attention weights in every block) is not implemented: its
default is 1 (off) and it changes the model even where nothing is propagated.

Schedule: the official ``num_prop`` is the same ``P`` in every block; here ``num_prop`` is an int for every
merging block or a per-block list (padded with zeros), each capped so one patch token stays, or, with
``num_prop=None`` (default), derived from the one vtc budget: the ``R = n - k`` removals are spread evenly
over the merging blocks (``P_l = R // L + [l < R % L]``), so the consumer gets exactly ``k = keep_count(budget,
n)`` tokens. ``budget=1.0`` is the untouched model; an explicit ``num_prop`` takes precedence otherwise.

Source map (the :class:`~vtc.contexts.TowerMerge` contract, as ToMe): kept tokens keep their order, so the
tokens are in raster order after every block; ``anchor`` is the block-0 index of the token a row *is*; a
propagated token joins the group of the kept token it sends the largest weight to, or, when it reaches none,
of its most cosine-similar kept token (its features are dropped, as in the official code; the group only says
which output row now stands for it).

Deviations, and why: kept tokens stay in their order instead of the official importance order (the blocks are
permutation-equivariant: only float summation order differs); ties in the ranking keep the lower index (the
official ``argsort`` leaves them unspecified); the semantic graph takes ``num_neighbours`` neighbours with or
without a CLS token (the official code takes one more without one, as it counts a CLS that is not there); a
zero token or an isolated graph node yields zeros where the official code divides by zero; the attention
probabilities are recomputed from the block's queries and keys while the host attention runs its own kernel.
A batch runs as one: every image has its own graph, ranking and groups, and all take the same schedule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..config import MethodConfig, check_choice, check_float, check_int
from ..contexts import Stage, TowerCall
from ..method import Method
from ..registry import register_method
from .tome import ScheduledMerge

__all__ = [
    "GTPConfig",
    "GTPMerger",
    "GTPState",
    "SELECTIONS",
    "GRAPHS",
    "spatial_graph",
    "semantic_graph",
    "token_graph",
    "token_importance",
    "split_tokens",
    "propagate",
    "budget_schedule",
    "explicit_schedule",
]

#: the official attention-based selection rules (``select`` in ``models_v3.py``)
SELECTIONS = (
    "MixedAttnMax",
    "MixedAttnMean",
    "SumAttnMax",
    "DiagAttnMax",
    "DiagAttnMean",
    "IMGAttnMax",
    "IMGAttnMean",
    "CLSAttnMax",
    "CLSAttnMean",
)
GRAPHS = ("Mixed", "Spatial", "Semantic")


@dataclasses.dataclass
class GTPConfig(MethodConfig):
    """GTP-ViT options.

    Args:
        num_prop: tokens propagated per block: an int for every merging block, a per-block sequence, or None
            (default) to derive the schedule from ``budget`` so the consumer gets exactly ``keep_count(budget, n)``.
        alpha: weight of the propagated features (and scales) added to the kept tokens (official 0.1).
        num_neighbours: neighbours of each patch in the semantic (cosine kNN) graph (official 8).
        graph: ``"Mixed"`` (spatial 8-neighbour graph union semantic graph), ``"Spatial"`` or ``"Semantic"``.
        selection: how patches are ranked from the block's attention (official rules, default ``"MixedAttnMax"``).
        token_scale: track token scales and add ``log scale`` to the attention logits (proportional attention).
    """

    num_prop: int | tuple[int, ...] | None = None
    alpha: float = 0.1
    num_neighbours: int = 8
    graph: str = "Mixed"
    selection: str = "MixedAttnMax"
    token_scale: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_prop, list | tuple):
            for value in self.num_prop:
                check_int("num_prop (each block)", value, minimum=0)
            self.num_prop = tuple(int(v) for v in self.num_prop)
        elif self.num_prop is not None:
            check_int("num_prop", self.num_prop, minimum=0)
        check_float("alpha", self.alpha, low=0.0)
        if math.isinf(self.alpha):
            raise ValueError("alpha must be finite")
        check_int("num_neighbours", self.num_neighbours, minimum=0)
        check_choice("graph", self.graph, GRAPHS)
        check_choice("selection", self.selection, SELECTIONS)
        if self.graph == "Semantic" and self.num_neighbours == 0:
            raise ValueError("graph='Semantic' with num_neighbours=0 has no edges: nothing could be propagated")
        if not isinstance(self.token_scale, bool):
            raise TypeError(f"token_scale must be a bool, got {self.token_scale!r}")


# -- the graph ----------------------------------------------------------------------------------------


def spatial_graph(rows: int, cols: int, device: torch.device | None = None) -> torch.Tensor:
    """``[P, P]`` bool, ``P = rows * cols`` raster patches: the 8 grid neighbours of each patch (not itself)."""
    index = torch.arange(rows * cols, device=device)
    r, c = index // cols, index % cols
    near = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
    return near & ~torch.eye(rows * cols, dtype=torch.bool, device=device)


def semantic_graph(tokens: torch.Tensor, num_neighbours: int) -> torch.Tensor:
    """``[B, P, P]`` bool: row ``i`` marks the patches whose cosine similarity to ``i`` is at least the
    ``(num_neighbours + 1)``-th largest of its row (itself, similarity 1, excluded afterwards).

    Args:
        tokens: ``[B, P, C]`` patch tokens.
    """
    p = tokens.shape[1]
    unit = F.normalize(tokens.float(), dim=-1)
    sim = unit @ unit.transpose(1, 2)  # [B, P, P]
    rank = p - num_neighbours  # the k-th smallest is the (num_neighbours + 1)-th largest
    if rank <= 1:
        near = torch.ones_like(sim, dtype=torch.bool)
    else:
        near = sim >= sim.kthvalue(rank, dim=-1, keepdim=True).values
    return near & ~torch.eye(p, dtype=torch.bool, device=tokens.device)


def coords_graph(coords: torch.Tensor) -> torch.Tensor:
    """``[B, P, P]`` bool: the 8 grid neighbours of each patch from its ``(row, column)`` (``coords [B, P, 2]``), for
    towers whose token order is not a raster (the same graph as :func:`spatial_graph` in any order)."""
    d = (coords[:, :, None, :] - coords[:, None, :, :]).abs()
    near = (d <= 1).all(dim=-1)
    return near & ~torch.eye(coords.shape[1], dtype=torch.bool, device=coords.device)


def token_graph(
    tokens: torch.Tensor,
    grid: tuple[int, int],
    num_neighbours: int,
    kind: str = "Mixed",
    coords: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, P, P]`` fp32 ``D^-1/2 A D^-1/2`` of the ``kind`` adjacency of ``tokens [B, P, C]`` on ``grid`` (raster
    order), or at the patch ``coords [B, P, 2]`` when given."""
    bsz, p, _ = tokens.shape
    adj = torch.zeros(bsz, p, p, dtype=torch.bool, device=tokens.device)
    if kind in ("Spatial", "Mixed"):
        adj |= spatial_graph(*grid, device=tokens.device) if coords is None else coords_graph(coords.to(tokens.device))
    if kind in ("Semantic", "Mixed"):
        adj |= semantic_graph(tokens, num_neighbours)
    a = adj.float()
    degree = a.sum(dim=-1)
    inv = torch.where(degree > 0, degree.clamp_min(1).rsqrt(), torch.zeros_like(degree))  # no edges: no weight
    return inv[..., :, None] * a * inv[..., None, :]


# -- selection and propagation --------------------------------------------------------------------------


def token_importance(attn: torch.Tensor, prefix: int, selection: str = "MixedAttnMax") -> torch.Tensor:
    """``[B, T - prefix]`` fp32 rank of every non-prefix token (higher: kept first) from ``attn [B, H, T, T]``."""
    reduce = "amax" if selection.endswith("Max") else "mean"

    def heads(s: torch.Tensor) -> torch.Tensor:  # [B, H, N] -> [B, N]
        return s.amax(dim=1) if reduce == "amax" else s.mean(dim=1)

    attn = attn.float()
    if selection.startswith("CLS"):
        return heads(attn[:, :, 0, prefix:])
    diag = heads(attn.diagonal(dim1=-2, dim2=-1)[..., prefix:])
    received = heads(attn[..., prefix:].sum(dim=-2))
    if selection.startswith("Mixed"):
        return diag * received
    if selection.startswith("Sum"):
        return diag + received
    return diag if selection.startswith("Diag") else received


def split_tokens(score: torch.Tensor, num_prop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept [B, N - num_prop] ascending, prop [B, num_prop])``: the ``num_prop`` lowest-scored tokens of
    ``score [B, N]`` are propagated (stable ranking: among ties the higher index goes)."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    return order[:, : score.shape[1] - num_prop].sort(dim=1).values, order[:, score.shape[1] - num_prop :]


def propagate(
    x: torch.Tensor,
    scale: torch.Tensor,
    graph: torch.Tensor,
    kept: torch.Tensor,
    prop: torch.Tensor,
    prefix: int,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Propagate the ``prop`` patches of ``x`` into the ``kept`` ones along ``graph``.

    Args:
        x: ``[B, T, C]`` tokens (prefix first); scale: ``[B, T]`` fp32 token scales; graph: ``[B, P, P]`` fp32
            over the ``P = T - prefix`` patches; kept: ``[B, P']``, prop: ``[B, P - P']`` patch indices.

    Returns:
        ``x' [B, prefix + P', C]``, ``scale' [B, prefix + P']``, ``graph' [B, P', P']`` and ``dest [B, P - P']``:
        the kept position each propagated patch joins (largest weight, else most cosine-similar kept patch).
    """
    patches, c, p = x[:, prefix:], x.shape[-1], graph.shape[-1]
    x_kept = patches.gather(1, kept[..., None].expand(-1, -1, c))  # [B, P', C]
    x_prop = patches.gather(1, prop[..., None].expand(-1, -1, c))  # [B, P - P', C]
    rows = graph.gather(1, kept[..., None].expand(-1, -1, p))  # [B, P', P]
    w_prop = rows.gather(2, prop[:, None, :].expand(-1, kept.shape[1], -1))  # [B, P', P - P']
    graph = rows.gather(2, kept[:, None, :].expand(-1, kept.shape[1], -1))  # [B, P', P']
    sim = F.normalize(x_prop.float(), dim=-1) @ F.normalize(x_kept.float(), dim=-1).transpose(1, 2)
    dest = torch.where(w_prop.amax(dim=1) > 0, w_prop.argmax(dim=1), sim.argmax(dim=-1))
    x_kept = x_kept + (alpha * (w_prop @ x_prop.float())).to(x.dtype)
    s_patch = scale[:, prefix:]
    s_kept = s_patch.gather(1, kept) + alpha * (w_prop @ s_patch.gather(1, prop)[..., None]).squeeze(-1)
    return (
        torch.cat([x[:, :prefix], x_kept], dim=1),
        torch.cat([scale[:, :prefix], s_kept], dim=1),
        graph,
        dest,
    )


# -- schedules ------------------------------------------------------------------------------------------


def budget_schedule(tokens: int, prefix: int, blocks: int, remove: int) -> list[int]:
    """Per-block propagations summing to exactly ``remove``, spread evenly (earlier blocks take the remainder)."""
    if blocks < 1:
        raise ValueError("a tower merge needs at least one block")
    if remove < 0 or tokens - remove < prefix + 1:
        raise ValueError(
            f"cannot propagate {tokens} tokens ({prefix} protected) down to {tokens - remove}: at least one "
            f"unprotected token must remain"
        )
    base, extra = divmod(remove, blocks)
    return [base + (block < extra) for block in range(blocks)]


def explicit_schedule(num_prop: int | Sequence[int], tokens: int, prefix: int, blocks: int) -> list[int]:
    """``num_prop`` per block (an int for all, or a list padded with zeros), capped so one patch token stays."""
    wanted = [int(num_prop)] * blocks if isinstance(num_prop, int) else list(num_prop)
    if len(wanted) > blocks and any(wanted[blocks:]):
        raise ValueError(f"num_prop lists {len(wanted)} blocks but only {blocks} blocks can propagate here")
    out, patches = [], tokens - prefix
    for want in (wanted + [0] * blocks)[:blocks]:
        got = max(0, min(want, patches - 1))
        out.append(got)
        patches -= got
    return out


# -- the per-call state the block runners drive -----------------------------------------------------------


class GTPState(ScheduledMerge):
    """Graph, token scales, source map and schedule of one tower call (see :class:`vtc.contexts.TowerMerge`).

    ``size`` holds the official token scales (not member counts); ``anchor`` is the block-0 index of each
    current token (kept tokens never move), which need not be the smallest index of its group.
    """

    wants_attention = True
    pool_by_size = False

    def __init__(self, schedule: Sequence[int], graph: torch.Tensor, prefix: int, config: GTPConfig):
        bsz, p, _ = graph.shape
        super().__init__(schedule, bsz, prefix + p, prefix, config.token_scale, graph.device)  # size: token scales
        self.graph, self.alpha, self.selection = graph, float(config.alpha), config.selection

    def merge(self, block: int, x: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
        if not self.wants_metric(block):
            return x
        if metric is None:
            raise RuntimeError(f"block {block} propagates but its runner passed no attention")
        pre = self.prefix
        kept, prop = split_tokens(token_importance(metric, pre, self.selection), self.schedule[block])
        x, self.size, self.graph, dest = propagate(x, self.size, self.graph, kept, prop, pre, self.alpha)
        row = torch.empty_like(self.anchor[:, pre:])  # [B, P]: output row of every current patch
        row.scatter_(1, kept, pre + torch.arange(kept.shape[1], device=x.device).expand_as(kept).contiguous())
        row.scatter_(1, prop, pre + dest)
        row = torch.cat([torch.arange(pre, device=x.device).expand(x.shape[0], -1), row], dim=1)
        self.origin = row.gather(1, self.origin)
        self.anchor = torch.cat([self.anchor[:, :pre], self.anchor[:, pre:].gather(1, kept)], dim=1)
        self.merged = True
        return x


def _grid(call: TowerCall) -> tuple[int, int]:
    """The patch grid of the call: the adapter's, or the square one of a LLaVA-style tower."""
    patches = call.tokens - call.prefix
    if call.grid is not None and call.grid[0] * call.grid[1] == patches:
        return call.grid
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(
            f"gtp's spatial graph needs the patch grid: {patches} patch tokens are not a square grid and the "
            f"adapter gave none; use graph='Semantic'"
        )
    return side, side


@register_method("gtp", config=GTPConfig, kind="merger", stages=(Stage.VISION, Stage.VISION_MERGE))
class GTPMerger(Method):
    """GTP-ViT: the least important tokens of every vision block propagate into their graph neighbours."""

    modalities = ("image",)

    def tower_merge(self, call: TowerCall) -> GTPState | None:
        if call.k >= call.n:
            return None  # a full budget is the untouched model
        cfg: GTPConfig = self.config  # type: ignore[assignment]
        if cfg.selection.startswith("CLS") and call.prefix == 0:
            raise ValueError(f"selection={cfg.selection!r} ranks by CLS attention, but this tower has no CLS token")
        if call.inputs is None:
            raise RuntimeError("gtp builds its graph from the tokens entering block 0, which the adapter did not pass")
        if cfg.num_prop is None:
            schedule = budget_schedule(call.tokens, call.prefix, call.blocks, call.n - call.k)
        else:
            schedule = explicit_schedule(cfg.num_prop, call.tokens, call.prefix, call.blocks)
        semantic = cfg.graph == "Semantic" or call.coords is not None
        grid = (1, call.tokens - call.prefix) if semantic else _grid(call)
        with torch.no_grad():
            inputs = call.inputs[:, call.prefix :].detach()
            graph = token_graph(inputs, grid, cfg.num_neighbours, cfg.graph, call.coords)
        return GTPState(schedule, graph, call.prefix, cfg)
