"""K1: fused "normalise + matmul + row max/argmax" without materialising the M x N similarity matrix.

Design and contract: ``docs/kernels.md``. For every row ``i`` of ``a [B, M, D]`` the kernel returns
``max_j cos(a_i, b_j)`` over the rows of ``b [B, N, D]`` and the index of that maximum, like
``reference.cosine_argmax``:

1. norm pre-pass (``_inv_norm_kernel``): ``1 / max(||x||, 1e-12)`` per row, sum of squares in fp32;
2. main pass (``_cosine_argmax_kernel``), grid ``(B, ceil(M / BLOCK_M))``: each program keeps a running
   ``(best value, best index)`` per row and walks the column tiles of ``b`` in increasing order;
   ``tl.dot`` accumulates ``a_i . b_j`` in fp32 and the tile is scaled by both inverse norms.

Semantics: ties go to the lowest column (tile argmax is the left-most maximum, and a later tile replaces
the running best only when strictly greater); a NaN similarity beats every number and the first NaN
column wins (``torch.max``); masked columns are exactly ``-inf``; a row whose columns are all masked, or
a row masked by ``row_mask``, gives ``(-inf, 0)``. No atomics, so results are bitwise deterministic for a
fixed tiling. Any strides are read in place (ToMe's ``x[:, ::2]`` views are not copied). Workspace is
``B * (M + N)`` floats.

fp16/bf16 inputs go to the tensor cores as they are, with fp32 accumulation (products of 16-bit floats are
exact in fp32). fp32 inputs use ``input_precision="tf32x3"`` (three TF32 products, about 2^-21 relative error
per product, so the cosine error stays far below the contract's 1e-5; plain TF32 would not). Tiles are
fixed per dtype rather than autotuned (chosen so that no configuration spills registers on sm_90; not yet
timed on a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .triton_common import float_input, interpreting, needs_grad, new_empty, pow2_at_least

_EPS = tl.constexpr(1e-12)  # the reference's F.normalize eps
_BIG = tl.constexpr(2**30)  # index sentinel, larger than any column


@triton.jit
def _inv_norm_kernel(x_ptr, out_ptr, R, D, s_b, s_r, s_d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, r] = 1 / max(||x[b, r]||, eps), fp32 sum of squares."""
    pid_b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    cols = tl.arange(0, BLOCK_D)
    base = x_ptr + pid_b * s_b + rows[:, None].to(tl.int64) * s_r
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ok = row_ok[:, None] & (d0 + cols[None, :] < D)
        x = tl.load(base + (d0 + cols[None, :]) * s_d, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    norm = tl.maximum(tl.sqrt_rn(acc), _EPS, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + pid_b * R + rows, tl.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), norm), mask=row_ok)


@triton.jit
def _cosine_argmax_kernel(
    a_ptr, b_ptr, inv_a_ptr, inv_b_ptr, row_mask_ptr, col_mask_ptr, val_ptr, idx_ptr,
    M, N, D, B, N_PER,
    s_ab, s_am, s_ad, s_bb, s_bn, s_bd,
    HAS_ROW_MASK: tl.constexpr, HAS_COL_MASK: tl.constexpr, HOLD_A: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, FINAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Running row max/argmax of cos(a_i, b_j) over the column tiles of split ``program_id(2)`` (columns
    ``[split * N_PER, (split + 1) * N_PER)``) in increasing order. ``FINAL`` (one split): NaN restored and rows
    masked here; otherwise the split's ranking key (+inf for NaN) goes to ``val[split]`` for ``_combine``."""
    pid_b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + pid_b * s_ab + rows[:, None].to(tl.int64) * s_am  # [BM, 1]
    b_base = b_ptr + pid_b * s_bb
    inv_a = tl.load(inv_a_ptr + pid_b * M + rows, mask=row_ok, other=0.0)

    if HOLD_A:  # D <= BLOCK_K: the A tile stays in registers for the whole column loop
        a_tile = tl.load(a_rows + ks[None, :] * s_ad, mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
        if DOT_FP32:
            a_tile = a_tile.to(tl.float32)

    best_val = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    n_end = tl.minimum(N, (split + 1) * N_PER)
    for n0 in range(split * N_PER, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_end
        b_cols = b_base + cols[None, :].to(tl.int64) * s_bn  # [1, BN]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HOLD_A:
            b_tile = tl.load(b_cols + ks[:, None] * s_bd, mask=col_ok[None, :] & (ks[:, None] < D), other=0.0)
            if DOT_FP32:
                b_tile = b_tile.to(tl.float32)
            acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
        else:  # large D: stream A and B chunks along D (A chunks come back from L2)
            for k0 in range(0, D, BLOCK_K):
                k_ok = k0 + ks < D
                a_chunk = tl.load(a_rows + (k0 + ks[None, :]) * s_ad, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b_chunk = tl.load(b_cols + (k0 + ks[:, None]) * s_bd, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
                if DOT_FP32:
                    a_chunk = a_chunk.to(tl.float32)
                    b_chunk = b_chunk.to(tl.float32)
                acc = tl.dot(a_chunk, b_chunk, acc, input_precision=PRECISION)
        inv_b = tl.load(inv_b_ptr + pid_b * N + cols, mask=col_ok, other=0.0)
        sim = acc * inv_a[:, None] * inv_b[None, :]  # [BM, BN]

        valid = col_ok
        if HAS_COL_MASK:
            valid = valid & (tl.load(col_mask_ptr + pid_b * N + cols, mask=col_ok, other=0) != 0)
        sim = tl.where(valid[None, :], sim, float("-inf"))

        # NaN ranks above every number (torch.max). A cosine of finite inputs is finite and masked entries are
        # -inf, so +inf is free to stand for NaN: the left-most +inf is the first NaN, and once held it is never
        # beaten under the strict > merge (an earlier tile wins every tie, so the global index is left-most).
        key = tl.where(sim != sim, float("inf"), sim)
        tile_max = tl.max(key, axis=1)
        tile_idx = tl.min(tl.where(key == tile_max[:, None], cols[None, :], _BIG), axis=1)
        take = tile_max > best_val
        best_idx = tl.where(take, tile_idx, best_idx)
        best_val = tl.where(take, tile_max, best_val)

    if FINAL:
        best_val = tl.where(best_val == float("inf"), float("nan"), best_val)
        if HAS_ROW_MASK:
            keep = tl.load(row_mask_ptr + pid_b * M + rows, mask=row_ok, other=0) != 0
            best_val = tl.where(keep, best_val, float("-inf"))
            best_idx = tl.where(keep, best_idx, 0)
    out = (split * B + pid_b) * M + rows
    tl.store(val_ptr + out, best_val, mask=row_ok)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=row_ok)


def _inv_norms(x: torch.Tensor, block_r: int, block_d: int) -> torch.Tensor:
    bsz, rows, dim = x.shape  # [B, R, D]
    out = new_empty((bsz, rows), torch.float32, x.device)  # [B, R]
    if out.numel():
        grid = (bsz, triton.cdiv(rows, block_r))
        _inv_norm_kernel[grid](x, out, rows, dim, *x.stride(), BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def _flat_mask(mask: torch.Tensor | None, lead: torch.Size, length: int) -> torch.Tensor | None:
    if mask is None:
        return None
    return mask.bool().expand(*lead, length).reshape(lead.numel(), length).to(torch.int8).contiguous()  # [B, L]


def cosine_argmax(
    a: torch.Tensor,
    b: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    col_mask: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine match in ``b`` for every row of ``a``, tiled, without an ``M x N`` buffer.

    Same contract as ``reference.cosine_argmax``; ``block_*`` override the tile sizes (tests use tiny tiles
    to cover several tiles on small inputs), ``splits`` the number of column ranges walked by separate programs
    (default: enough programs to fill the GPU, see ``_splits``). Inputs that require grad go to the reference
    (no backward here).

    Args:
        a: ``[..., M, D]``; b: ``[..., N, D]`` (leading dims broadcast); fp16/bf16/fp32, any strides.
        row_mask: ``[..., M]`` bool, False rows return (-inf, 0).
        col_mask: ``[..., N]`` bool, False columns are never chosen.

    Returns:
        ``(value [..., M] fp32, index [..., M] int64)``.
    """
    if needs_grad(a, b):
        return reference.cosine_argmax(a, b, row_mask, col_mask)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"feature dims differ: a {tuple(a.shape)} vs b {tuple(b.shape)}")
    if not (a.shape[-2] and b.shape[-2]):
        return _cosine_argmax(a, b, row_mask, col_mask, block_m, block_n, block_k, splits)
    rows, col_mask = reference.equal_inputs(a, b, row_mask, col_mask)  # equal inputs, equal scores
    val, idx = _cosine_argmax(a, b, row_mask, col_mask, block_m, block_n, block_k, splits)
    rows = rows.expand(val.shape)
    return val.gather(-1, rows), idx.gather(-1, rows)


def _cosine_argmax(a, b, row_mask, col_mask, block_m, block_n, block_k, splits) -> tuple[torch.Tensor, torch.Tensor]:
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m, n, d = a.shape[-2], b.shape[-2], a.shape[-1]
    a, b = float_input(a), float_input(b)
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    bsz = lead.numel()
    a3 = a.expand(*lead, m, d).reshape(bsz, m, d)  # [B, M, D], a view whenever the strides allow
    b3 = b.expand(*lead, n, d).reshape(bsz, n, d)  # [B, N, D]
    val = new_empty((bsz, m), torch.float32, a.device)  # [B, M]
    idx = new_empty((bsz, m), torch.int64, a.device)  # [B, M]
    if val.numel() == 0:
        return val.reshape(*lead, m), idx.reshape(*lead, m)
    if n == 0:  # nothing to match: the all-masked answer
        val.fill_(float("-inf"))
        idx.zero_()
        return val.reshape(*lead, m), idx.reshape(*lead, m)

    interp = interpreting(a.device)
    wide = a3.dtype == torch.float32
    hold_max = 64 if wide and not interp else 128  # largest D whose A tile stays in registers
    bm = block_m or (32 if interp else 64)
    bn = block_n or (32 if interp else 64)
    bk = block_k or (pow2_at_least(d) if d <= hold_max else (32 if wide and not interp else 64))
    inv_a = _inv_norms(a3, bm, min(bk, 64))
    inv_b = _inv_norms(b3, bn, min(bk, 64))
    rmask = _flat_mask(row_mask, lead, m)
    cmask = _flat_mask(col_mask, lead, n)
    dot_fp32 = wide or (interp and a3.dtype == torch.bfloat16)  # the interpreter has no bf16 tl.dot
    tiles = triton.cdiv(n, bn)
    n_split = max(1, min(splits or _splits(a.device, bsz * triton.cdiv(m, bm)), tiles))
    n_per = triton.cdiv(tiles, n_split) * bn  # columns per split, whole tiles
    n_split = triton.cdiv(n, n_per)
    final = n_split == 1
    pval = val if final else new_empty((n_split, bsz, m), torch.float32, a.device)  # [S, B, M] ranking keys
    pidx = idx if final else new_empty((n_split, bsz, m), torch.int64, a.device)  # [S, B, M]
    grid = (bsz, triton.cdiv(m, bm), n_split)
    _cosine_argmax_kernel[grid](
        a3, b3, inv_a, inv_b,
        rmask if rmask is not None else val, cmask if cmask is not None else val,  # dummies when absent
        pval, pidx, m, n, d, bsz, n_per, *a3.stride(), *b3.stride(),
        HAS_ROW_MASK=rmask is not None, HAS_COL_MASK=cmask is not None, HOLD_A=d <= bk, DOT_FP32=dot_fp32,
        PRECISION="tf32x3" if wide and not interp else "ieee", FINAL=final, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=4 if interp else 8,
    )  # fmt: skip
    if not final:
        val, idx = _combine(pval, pidx, rmask)
    return val.reshape(*lead, m), idx.reshape(*lead, m)


def _splits(device: torch.device, programs: int) -> int:
    """Column splits that give at least four programs per streaming multiprocessor (one split on a CPU)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return triton.cdiv(4 * sms, programs)


def _combine(key: torch.Tensor, idx: torch.Tensor, rmask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split ``(key, index)`` ``[S, B, M]`` -> the kernel's one-split answer ``[B, M]``.

    The splits hold increasing column ranges, so the first split that reaches the maximum key holds the
    left-most best column (``argmax`` returns the first maximum); a key of +inf is a NaN similarity.
    """
    best = key.amax(0)  # [B, M]
    first = (key == best).to(torch.int8).argmax(0, keepdim=True)  # [1, B, M]
    out = idx.gather(0, first)[0]
    best = best.masked_fill(best == float("inf"), float("nan"))
    if rmask is not None:
        keep = rmask.bool()
        best = best.masked_fill(~keep, float("-inf"))
        out = out.masked_fill(~keep, 0)
    return best, out
