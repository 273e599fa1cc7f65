"""K5 (``docs/kernels.md``): attention received, ``s_j = mean_i softmax_j(q_i . k_j * scale)``, without the
``H x T x T`` probabilities.

Same contract as ``attention.attention_received`` (the PyTorch reference, which walks the queries in chunks of
256 and so holds ``H x 256 x T`` probabilities): ``q, k [B, T, H, d]``, fp32 result ``[B, T]`` reduced over
heads by ``"mean"`` or ``"sum"``. Two passes over the logits, each tile recomputed from ``q`` and ``k`` (as a
flash-attention backward does):

1. ``_lse_kernel``, grid ``(B * H, ceil(T / BLOCK_Q))``: each query row's log-sum-exp over all keys, with a
   running maximum (``[B, H, T]`` fp32);
2. ``_colsum_kernel``, grid ``(B * H, ceil(T / BLOCK_K))``: each key's column sum of ``exp(logit - lse_i)``
   over all queries (``[B, H, T]`` fp32), accumulated in registers, no atomics, a fixed order.

Memory is ``O(B H T)``; time ``2 x`` the logits' FLOPs. Inputs are upcast to fp32 on load and the dot products
run in IEEE fp32 (no TF32), the reference's arithmetic; sums are taken in another order, so values agree to
about ``1e-6`` relative, not bit for bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import split_heads
from .triton_common import interpreting, new_empty, pow2_at_least


@triton.jit
def _logits(q_ptr, k_ptr, rows, cols, T, d, sq_t, sk_t, scale, BLOCK_D: tl.constexpr):
    """``[len(rows), len(cols)]`` fp32 logits of one (batch, head); out-of-range keys are -inf (out-of-range
    queries read zeros: finite logits that are never stored, and weigh 0 in the column sums)."""
    dd = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + rows[:, None] * sq_t + dd[None, :], mask=(rows[:, None] < T) & (dd[None, :] < d), other=0.0)
    k = tl.load(k_ptr + cols[:, None] * sk_t + dd[None, :], mask=(cols[:, None] < T) & (dd[None, :] < d), other=0.0)
    s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
    return tl.where(cols[None, :] < T, s, float("-inf"))


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, lse_ptr, T, H, d, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qp, kp = q_ptr + b * sq_b + h * sq_h, k_ptr + b * sk_b + h * sk_h
    m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for c0 in range(0, T, BLOCK_K):
        s = _logits(qp, kp, rows, c0 + tl.arange(0, BLOCK_K), T, d, sq_t, sk_t, scale, BLOCK_D)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + bh * T + rows, m + tl.log(acc), mask=rows < T)


@triton.jit
def _colsum_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr, T, H, d, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    qp, kp = q_ptr + b * sq_b + h * sq_h, k_ptr + b * sk_b + h * sk_h
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, T, BLOCK_Q):
        rows = r0 + tl.arange(0, BLOCK_Q)
        s = _logits(qp, kp, rows, cols, T, d, sq_t, sk_t, scale, BLOCK_D)
        lse = tl.load(lse_ptr + bh * T + rows, mask=rows < T, other=float("inf"))
        acc += tl.sum(tl.exp(s - lse[:, None]), axis=0)  # padded rows: exp(-inf) = 0
    tl.store(out_ptr + bh * T + cols, acc, mask=cols < T)


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: str = "mean",
    num_heads: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Mean over all queries of the attention each key receives, ``[B, T]`` fp32 (see the module docstring).

    Args:
        q, k: ``[B, T, H, d]``, or ``[B, T, H*d]`` with ``num_heads``; any strides, fp16/bf16/fp32.
        heads: ``"mean"`` or ``"sum"`` over heads.
        scale: logit scale, default ``1/sqrt(d)``.
    """
    if heads not in ("mean", "sum"):
        raise ValueError(f"heads must be 'mean' or 'sum', got {heads!r}")
    q, k = split_heads(q, num_heads), split_heads(k, num_heads)
    if q.shape != k.shape or q.dim() != 4:
        raise ValueError(f"q and k must both be [B, T, H, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    bsz, t, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    lse = new_empty((bsz, h, t), torch.float32, q.device)  # [B, H, T]
    cols = new_empty((bsz, h, t), torch.float32, q.device)  # [B, H, T]
    if t == 0:
        return cols.sum(1)
    small = interpreting(q.device)
    bq, bk = (16, 16) if small else (64, 64)
    bd = pow2_at_least(d)
    strides = (*q.stride()[:3], *k.stride()[:3])  # (batch, token, head) of q, then of k
    common = dict(BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=bd)
    _lse_kernel[(bsz * h, triton.cdiv(t, bq))](q, k, lse, t, h, d, *strides, scale, **common)
    _colsum_kernel[(bsz * h, triton.cdiv(t, bk))](q, k, lse, cols, t, h, d, *strides, scale, **common)
    total = cols / t
    return total.mean(dim=1) if heads == "mean" else total.sum(dim=1)
