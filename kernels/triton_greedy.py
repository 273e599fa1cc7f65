"""K3 (``docs/kernels.md``): greedy max-min diversity selection, no ``N x N`` buffer.

Used by DivPrune (and ToDRE v1's k-centre). Same result as ``reference.greedy_maxmin``, bit for bit:
``d(i, j) = 1 - cos(x_i, x_j)`` in fp32; unless ``first`` is given the first pick is
``argmax_j min_{i != j} d(j, i)``; every next pick is the unchosen token farthest from the chosen set.

Design: memory grows linearly in ``N`` (an hour of video is hundreds of thousands of tokens, and a distance
matrix of 50,176 tokens is 10 GB). The first pick's nearest-neighbour distances come from
``reference.nearest_distance`` (blocks of rows, ``O(chunk N)`` memory) and each pick's distance row from the
reference's very expression (``1 - xn @ xn[cur]``, one batched matrix-vector product, cuBLAS on a GPU), so
every value equals the reference's and the picks are the same on any input (ties and NaN included), not
merely up to rounding. What the kernel fuses is the rest of a step, which the reference spends four launches
on: fold the row into the running minimum (``torch.minimum`` semantics), mark the pick, and take the masked
argmax (left-most maximum; the first NaN if any, like ``torch.argmax``), writing the next pick on the device
(no host sync between steps). One program per image walks ``N`` in chunks; the state is a ``[B, N]``
minimum and a ``[B, N]`` chosen mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .triton_common import new_empty, pow2_at_least

_BIG = tl.constexpr(2**30)  # index sentinel, larger than any token index
_ALL = tl.constexpr(tl.PropagateNan.ALL)
_MAX_BLOCK = 4096  # longest chunk of a row one program holds at a time


@triton.jit
def _first_argmax(v, idx):
    """(value, index) of the first NaN of ``v`` if any, else of its left-most maximum."""
    is_nan = v != v
    has_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    nan_idx = tl.min(tl.where(is_nan, idx, _BIG), axis=0)
    num = tl.where(is_nan, float("-inf"), v)
    vmax = tl.max(num, axis=0)
    arg = tl.min(tl.where(num == vmax, idx, _BIG), axis=0)
    return tl.where(has_nan, float("nan"), vmax), tl.where(has_nan, nan_idx, arg)


@triton.jit
def _merge_best(best_val, best_idx, val, idx):
    """Fold a later chunk's winner into the running one: a held NaN is final, a new NaN wins, else strict >."""
    held_nan = best_val != best_val
    new_nan = val != val
    take = ~held_nan & (new_nan | (val > best_val))
    return tl.where(take, val, best_val), tl.where(take, idx, best_idx)


@triton.jit
def _step_kernel(dist_ptr, mind_ptr, chosen_ptr, cur_ptr, out_ptr, N, k, step, BLOCK: tl.constexpr):
    """Image b: record pick ``cur``, fold its distance row into the minimum, write the next pick to ``cur``."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    cur = tl.load(cur_ptr + b)
    tl.store(out_ptr + b * k + step, cur)
    best_val = float("-inf")
    best_idx = 0
    for c0 in range(0, N, BLOCK):
        cols = c0 + offs
        ok = cols < N
        chosen = (tl.load(chosen_ptr + b * N + cols, mask=ok, other=1) != 0) | (cols == cur) | ~ok
        mind = tl.load(mind_ptr + b * N + cols, mask=ok, other=float("inf"))
        mind = tl.minimum(mind, tl.load(dist_ptr + b * N + cols, mask=ok, other=0.0), propagate_nan=_ALL)
        tl.store(mind_ptr + b * N + cols, mind, mask=ok)
        tl.store(chosen_ptr + b * N + cols, chosen.to(tl.int8), mask=ok)
        val, idx = _first_argmax(tl.where(chosen, float("-inf"), mind), cols)
        best_val, best_idx = _merge_best(best_val, best_idx, val, idx)
    tl.store(cur_ptr + b, best_idx.to(tl.int64))


def greedy_maxmin(
    x: torch.Tensor, k: int, first: torch.Tensor | int | None = None, *, block: int | None = None
) -> torch.Tensor:
    """Greedy max-min cosine-distance selection of ``k`` rows of ``x``, in selection order.

    Same contract as ``reference.greedy_maxmin`` (and the same picks, bit for bit). ``block`` overrides the
    chunk length (tests force several chunks per row with it).

    Args:
        x: ``[B, N, D]`` or ``[N, D]``, fp16/bf16/fp32.
        k: number of tokens to pick, ``0 <= k <= N``.
        first: optional ``[B]`` (or scalar) index of the first pick, in ``[0, N)``.

    Returns:
        ``[B, k]`` (or ``[k]``) int64 indices in selection order.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    bsz, n, _ = x.shape
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    out = new_empty((bsz, k), torch.int64, x.device)  # [B, k]
    if out.numel() == 0:
        return out[0] if squeeze else out
    first_t = None
    if first is not None:
        first_t = torch.as_tensor(first, dtype=torch.long, device=x.device).expand(bsz).contiguous()  # [B]
        if bool(((first_t < 0) | (first_t >= n)).any()):
            raise ValueError(f"first must index a token in [0, {n}), got {first_t.tolist()}")

    xn = reference.normalize(x)  # [B, N, D] fp32
    if first_t is None:
        cur = reference.nearest_distance(xn).argmax(dim=-1) if n > 1 else torch.zeros(bsz, dtype=torch.long)
        cur = cur.to(x.device)
    else:
        cur = first_t.clone()
    cur = cur.contiguous()  # [B] the next pick, updated in place by every step
    mind = torch.full((bsz, n), float("inf"), dtype=torch.float32, device=x.device)  # [B, N]
    chosen = torch.zeros(bsz, n, dtype=torch.int8, device=x.device)  # [B, N]
    blk = block or pow2_at_least(n, maximum=_MAX_BLOCK)
    rows = torch.arange(bsz, device=x.device)
    for step in range(k):
        dist = (1.0 - torch.bmm(xn, xn[rows, cur].unsqueeze(-1)).squeeze(-1)).contiguous()  # the reference's row
        _step_kernel[(bsz,)](dist, mind, chosen, cur, out, n, k, step, BLOCK=blk, num_warps=8 if blk >= 2048 else 4)
    return out[0] if squeeze else out
