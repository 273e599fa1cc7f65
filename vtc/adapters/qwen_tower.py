"""Token merging inside Qwen2-VL's vision tower (``Stage.VISION_MERGE``; :mod:`vtc.adapters.runners` for the rest).

Qwen2-VL's tower runs every image (and every temporal patch group of a video) as one packed sequence ``[N, C]``
whose attention stays within segments (``cu_seqlens``), with a 2-D rotary embedding of each patch's (row, column).
While merging, the block runner here regroups the segments by length into batches ``[S, T, C]`` (one merge
state per length: the images of one size, the frames of one video), runs each block's own layers on them, with
the attention computed from the block's fused ``qkv`` (SDPA, ``log size`` bias), and packs the result again for
the next block. Positions: a merged token's rotary embedding is the tower's own RoPE at the **centroid** of the
patches it stands for (their mean row and column), so an unmerged patch keeps exactly its embedding. The
similarity metric is the block's attention keys with RoPE applied, as the attention uses them. After the last
block the merged tokens are copied back onto every segment's grid (the 2 x 2 patch merger needs it).

Qwen3-VL's blocks have the same layout; its DeepStack mergers read blocks in the middle of the tower, so a
forward pre-hook on each (:func:`grid_hook`) hands them every segment's grid, the merged tokens copied to their
patches as for the final merger, while the tower goes on merged. Qwen2.5-VL's windows:
:mod:`vtc.adapters.qwen_windows`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.attention import split_heads
from .llm import rotate_half


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [S, T, H, d]`` rotated as Qwen's vision attention does (fp32, back to ``x``'s dtype)."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class _Group:
    """The segments of one length in a tower call: their merge state and the block-0 positions of their patches."""

    def __init__(self, segments: list[int], state: Any, positions: torch.Tensor):
        self.segments, self.state, self.positions = segments, state, positions  # positions [S, T0, 2]

    def stack(self, pieces) -> torch.Tensor:
        """``[S, T, ...]``: the group's segments out of ``pieces`` (a list or dict indexed by segment)."""
        return torch.stack([pieces[i] for i in self.segments])

    def put(self, pieces: list, x: torch.Tensor) -> None:
        """Write ``x [S, T, ...]`` back into ``pieces``, one row per segment of the group."""
        for row, i in enumerate(self.segments):
            pieces[i] = x[row]

    def rotary(self, rotary: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin) [S, T, d]`` at the centroid of the patches each current token stands for."""
        origin = self.state.origin  # [S, T0] -> current row
        s, t = x.shape[:2]
        total = torch.zeros(s, t, 2, dtype=torch.float32, device=x.device)
        total.scatter_add_(1, origin[..., None].expand(-1, -1, 2), self.positions)
        count = torch.zeros(s, t, dtype=torch.float32, device=x.device).scatter_add_(
            1, origin, torch.ones_like(origin, dtype=torch.float32)
        )
        centre = total / count[..., None]
        cos, sin = rotary(x, centre.reshape(-1, 2))
        return cos.reshape(s, t, -1), sin.reshape(s, t, -1)


#: the Qwen vision blocks the runner handles (norm1, fused qkv + proj, norm2, mlp; attention within segments)
QWEN_BLOCKS = (
    "transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VLVisionBlock",
    "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionBlock",
    "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeVisionBlock",
)


def check_qwen(block: nn.Module) -> str | None:
    impl = getattr(block.attn.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"its attention is {impl!r}; token merging runs Qwen's vision attention with SDPA: load it with sdpa"
    return None


def position_hook(ctx: Any, rotary: nn.Module) -> Any:
    """Record the (row, column) of every patch as the tower computes its rotary embedding (a forward pre-hook)."""

    def hook(module, args):
        ctx.qwen_positions, ctx.qwen_rotary = args[1], module

    return rotary.register_forward_pre_hook(hook)


def grid_hook(ctx: Any) -> Callable:
    """Forward pre-hook for a module that reads the packed hidden states of an intermediate block (Qwen3-VL's
    DeepStack mergers): every merged segment is given back its grid (each merged token copied to its patches)."""

    def hook(module, args):
        groups = getattr(ctx, "qwen", None)
        if groups is None:
            return None
        pieces = list(torch.split(args[0], groups["lengths"]))
        for group in groups["groups"]:
            x = group.stack(pieces)
            if x.shape[1] != group.positions.shape[1]:
                group.put(pieces, group.state.on_grid(x))
        return (torch.cat(pieces), *args[1:])

    return hook


def attend(block: nn.Module, x: torch.Tensor, cos, sin, bias) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x + attn(norm1(x))`` of a Qwen vision block on ``x [S, T, C]`` (SDPA, additive ``bias``): the result and
    the rotated queries and keys ``[S, T, C]`` (what a merge step reads)."""
    attn = block.attn
    heads = int(attn.num_heads)
    s, t, c = x.shape
    q, k, v = attn.qkv(block.norm1(x)).reshape(s, t, 3, heads, -1).unbind(2)  # [S, T, H, d]
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, scale=attn.scaling
    )
    return x + attn.proj(out.transpose(1, 2).reshape(s, t, c)), q.reshape(s, t, c), k.reshape(s, t, c)


def merge_mlp(ctx: Any, block: nn.Module, index: int, state: Any, x, q, k, bias) -> torch.Tensor:
    """The rest of the block after :func:`attend`: the merge step (if ``state`` merges here), then
    ``x + mlp(norm2(x))``, then the state's end-of-block bookkeeping."""
    if state is not None:
        ctx.attend(state, index)
        if ctx.capture:
            ctx.queries, ctx.keys = q, k
        heads = int(block.attn.num_heads)
        x = ctx.merge(state, index, x, lambda t: split_heads(t, heads), block.attn.scaling, bias)
    x = x + block.mlp(block.norm2(x))
    return ctx.finish(state, index, x) if state is not None else x


def embeddings(groups: dict, group: _Group, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin) [S, T, d]`` of a group's current tokens: the model's own until something merged."""
    if x.shape[1] == group.positions.shape[1]:
        return group.stack(groups["cos"]), group.stack(groups["sin"])
    return group.rotary(groups["rotary"], x)


def bias_of(group: _Group, x: torch.Tensor) -> torch.Tensor | None:
    return group.state.attention_bias(x.dtype) if group.state is not None else None


def run_segments(ctx: Any, block: nn.Module, index: int, groups: dict, hidden: torch.Tensor) -> torch.Tensor:
    """One block on the packed segments of ``groups``, each attending within itself (batched per group)."""
    pieces = list(torch.split(hidden, groups["lengths"]))
    for group in groups["groups"]:
        x = group.stack(pieces)
        bias = bias_of(group, x)
        x, q, k = attend(block, x, *embeddings(groups, group, x), bias)
        group.put(pieces, merge_mlp(ctx, block, index, group.state, x, q, k, bias))
    groups["lengths"] = [p.shape[0] for p in pieces]
    return torch.cat(pieces)


def qwen_vision_block(ctx: Any, index: int, orig: type, block: nn.Module) -> Callable:
    """Qwen2-VL ``Qwen2VLVisionBlock``: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, on packed segments."""

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        if index == 0:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            ctx.qwen = start_groups(
                ctx, hidden_states, lengths, getattr(ctx, "qwen_positions", None), position_embeddings
            )
        groups = getattr(ctx, "qwen", None)
        if groups is None:
            return orig.forward(self, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
        return run_segments(ctx, self, index, groups, hidden_states)

    return forward


def start_groups(ctx: Any, hidden: torch.Tensor, lengths: list[int], positions, position_embeddings) -> dict | None:
    """Block 0 of a tower call: one merge state per segment length (None: no merging in this call).

    ``lengths``: the segments' lengths in the packed sequence; ``positions [N, 2]``: every patch's (row, column)
    in the same order."""
    if ctx.start is None or position_embeddings is None or positions is None:
        return None
    positions = positions.float()
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    pieces = torch.split(hidden, lengths)
    pos = torch.split(positions, lengths)
    groups = []
    for segments in by_length.values():
        coords = torch.stack([pos[i] for i in segments])
        state = ctx.start(torch.stack([pieces[i] for i in segments]), coords)
        groups.append(_Group(segments, state, coords))
    states = [g.state for g in groups if g.state is not None]
    if not states:
        return None
    ctx.state = states[0]
    ctx.group_states = states
    cos, sin = position_embeddings
    return {
        "groups": groups,
        "lengths": list(lengths),
        "cos": torch.split(cos, lengths),
        "sin": torch.split(sin, lengths),
        "rotary": ctx.qwen_rotary,
    }
