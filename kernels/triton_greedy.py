"""K3 (``docs/kernels.md``): greedy max-min diversity selection, one persistent program per image.

Used by DivPrune (and ToDRE v1's k-centre). Same result as ``reference.greedy_maxmin``:
``d(i, j) = 1 - cos(x_i, x_j)`` in fp32; unless ``first`` is given the first pick is
``argmax_j min_{i != j} d(j, i)``; every next pick is the unchosen token farthest from the chosen set.

Design choice: the distance matrix ``dist [B, N, N]`` is computed once, before the kernels, with the very
expression the reference uses (``1 - xn @ xn^T`` with ``xn = reference.normalize(x)``, cuBLAS on a GPU).
Every later operation is an exact comparison or ``min``, so the picks equal the reference's bit for bit, on
any input (ties and NaN included), not merely up to rounding. Recomputing a row of ``dist`` on the fly
from ``xn`` would avoid the ``N x N`` buffer but costs ``N * D`` reads per step on the single SM that runs
an image (``k * N * D`` in all: gigabytes at N = 2880, D = 4096), against ``N`` reads of one Gram row.
The reference holds the same buffer, so peak memory is unchanged.

1. ``_nearest_kernel``, grid ``(B, ceil(N / BLOCK_R))`` (only without ``first``): ``nearest[b, j]`` is the
   row minimum of ``dist[b, j]`` off the diagonal, NaN-propagating like ``torch.min``.
2. ``_greedy_kernel``, grid ``(B,)``: keeps the min-distance vector and the chosen flags; each step stores
   the current pick, folds its ``dist`` row into the minimum (``torch.minimum`` semantics) and takes the
   masked argmax (left-most maximum; the first NaN if any, like ``torch.argmax``). When ``N <= BLOCK`` the
   state lives in registers; otherwise in a ``[B, N]`` global scratch (L2-resident), walked in chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .triton_common import interpreting, new_empty, pow2_at_least

_BIG = tl.constexpr(2**30)  # index sentinel, larger than any token index
_ALL = tl.constexpr(tl.PropagateNan.ALL)
_MAX_REG_BLOCK = 4096  # largest N whose state stays in registers


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
def _nearest_kernel(dist_ptr, out_ptr, N, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, j] = min_{i != j} dist[b, j, i] (NaN if any such entry is NaN; +inf when N == 1)."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    base = dist_ptr + pid_b * N * N + rows[:, None].to(tl.int64) * N
    acc = tl.full([BLOCK_R], float("inf"), dtype=tl.float32)
    for c0 in range(0, N, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols[None, :] < N)
        d = tl.load(base + cols[None, :], mask=ok, other=float("inf"))
        d = tl.where(cols[None, :] == rows[:, None], float("inf"), d)  # the reference's masked diagonal
        is_nan = d != d  # tl.min drops NaN; torch.min propagates it
        tile_min = tl.min(tl.where(is_nan, float("inf"), d), axis=1)
        tile_min = tl.where(tl.max(is_nan.to(tl.int32), axis=1) > 0, float("nan"), tile_min)
        acc = tl.minimum(acc, tile_min, propagate_nan=_ALL)
    tl.store(out_ptr + pid_b * N + rows, acc, mask=row_ok)


@triton.jit
def _greedy_kernel(
    dist_ptr, nearest_ptr, first_ptr, mind_ptr, chosen_ptr, out_ptr, N, k,
    HAS_FIRST: tl.constexpr, IN_REGS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Writes the k picks of image b in selection order."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    row_base = dist_ptr + b * N * N
    out = out_ptr + b * k

    if HAS_FIRST:
        cur = tl.load(first_ptr + b).to(tl.int32)
    else:
        best_val = float("-inf")
        cur = 0
        for c0 in range(0, N, BLOCK):
            v = tl.load(nearest_ptr + b * N + c0 + offs, mask=c0 + offs < N, other=float("-inf"))
            val, idx = _first_argmax(v, c0 + offs)
            best_val, cur = _merge_best(best_val, cur, val, idx)

    if IN_REGS:  # N <= BLOCK: state in registers
        ok = offs < N
        mind = tl.full([BLOCK], float("inf"), dtype=tl.float32)
        chosen = ~ok
        for step in range(k):
            tl.store(out + step, cur.to(tl.int64))
            chosen = chosen | (offs == cur)
            d = tl.load(row_base + cur.to(tl.int64) * N + offs, mask=ok, other=0.0)
            mind = tl.minimum(mind, d, propagate_nan=_ALL)
            _, cur = _first_argmax(tl.where(chosen, float("-inf"), mind), offs)
    else:  # state in a [B, N] global scratch, walked in chunks (same thread layout for loads and stores)
        mind_row = mind_ptr + b * N
        chosen_row = chosen_ptr + b * N
        for c0 in range(0, N, BLOCK):
            ok = c0 + offs < N
            tl.store(mind_row + c0 + offs, tl.full([BLOCK], float("inf"), dtype=tl.float32), mask=ok)
            tl.store(chosen_row + c0 + offs, tl.zeros([BLOCK], dtype=tl.int8), mask=ok)
        tl.debug_barrier()
        for step in range(k):
            tl.store(out + step, cur.to(tl.int64))
            d_row = row_base + cur.to(tl.int64) * N
            best_val = float("-inf")
            best_idx = 0
            for c0 in range(0, N, BLOCK):
                cols = c0 + offs
                ok = cols < N
                chosen = (tl.load(chosen_row + cols, mask=ok, other=1) != 0) | (cols == cur) | ~ok
                mind = tl.load(mind_row + cols, mask=ok, other=float("inf"))
                mind = tl.minimum(mind, tl.load(d_row + cols, mask=ok, other=0.0), propagate_nan=_ALL)
                tl.store(mind_row + cols, mind, mask=ok)
                tl.store(chosen_row + cols, chosen.to(tl.int8), mask=ok)
                val, idx = _first_argmax(tl.where(chosen, float("-inf"), mind), cols)
                best_val, best_idx = _merge_best(best_val, best_idx, val, idx)
            tl.debug_barrier()  # this step's scratch writes are visible to every thread of the next step
            cur = best_idx


def greedy_maxmin(
    x: torch.Tensor, k: int, first: torch.Tensor | int | None = None, *, block: int | None = None
) -> torch.Tensor:
    """Greedy max-min cosine-distance selection of ``k`` rows of ``x``, in selection order.

    Same contract as ``reference.greedy_maxmin`` (and the same picks, bit for bit). ``block`` overrides the
    chunk length (tests force the chunked, scratch-memory path with it).

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
    dist = (1.0 - xn @ xn.transpose(-1, -2)).contiguous()  # [B, N, N], the reference's exact expression

    interp = interpreting(x.device)
    blk = block or pow2_at_least(n, maximum=_MAX_REG_BLOCK)
    in_regs = n <= blk
    nearest = mind = chosen = out  # dummies for the pointers a configuration never reads
    if first_t is None:
        nearest = new_empty((bsz, n), torch.float32, x.device)  # [B, N]
        br, bc = (16, 32) if interp else (32, 256)
        _nearest_kernel[(bsz, triton.cdiv(n, br))](dist, nearest, n, BLOCK_R=br, BLOCK_C=bc)
    if not in_regs:
        mind = new_empty((bsz, n), torch.float32, x.device)  # [B, N] scratch
        chosen = new_empty((bsz, n), torch.int8, x.device)  # [B, N] scratch
    _greedy_kernel[(bsz,)](
        dist, nearest, first_t if first_t is not None else out, mind, chosen, out, n, k,
        HAS_FIRST=first_t is not None, IN_REGS=in_regs, BLOCK=blk, num_warps=8 if blk >= 2048 else 4,
    )  # fmt: skip
    return out[0] if squeeze else out
