"""K5 (``docs/kernels.md``): attention received, ``s_j = mean_i softmax_j(q_i . k_j * scale)``, without the
``H x T x T`` probabilities.

Same contract as ``attention.attention_received`` (the PyTorch reference, which walks the queries in chunks of
256 and so holds ``H x 256 x T`` probabilities): ``q, k [B, T, H, d]``, fp32 result ``[B, T]`` reduced over
heads by ``"mean"`` or ``"sum"``. Two passes over the logits, each tile recomputed from ``q`` and ``k`` (as a
flash-attention backward does):

1. ``_lse_kernel``, grid ``(B * H, ceil(T / BLOCK_Q))``: each query row's log-sum-exp over all keys, with a
   running maximum (``[B, H, T]`` fp32, base 2); the program's query tile is loaded once and stays in
   registers while the key tiles stream past;
2. ``_colsum_kernel``, grid ``(B * H, ceil(T / BLOCK_K))``: each key's column sum of ``exp(logit - lse_i)``
   over all queries (``[B, H, T]`` fp32), its key tile held, accumulated in registers, no atomics, a fixed
   order.

Memory is ``O(B H T)``; time ``2 x`` the logits' FLOPs plus two exponentials per logit (``exp2`` of logits
pre-scaled by ``log2 e``, the flash-attention habit). fp16/bf16 inputs go to the tensor cores as they are
with fp32 accumulation: a product of two 16-bit floats is exact in fp32, so this is the reference's
arithmetic (inputs upcast to fp32) up to the order of the sums. fp32 inputs use ``tf32x3`` (three TF32
products, about 2^-21 relative error each) on a GPU and IEEE fp32 under the interpreter. Values agree with
the reference to about ``1e-6`` relative, not bit for bit. On an H200 (bf16, 16 heads of 64, one image) the
first version, which ran IEEE fp32 dots and reloaded the query tile for every key tile, took 10 times the
reference's time; measured figures are in the README.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import split_heads
from .triton_common import interpreting, new_empty, pow2_at_least


@triton.jit
def _tile(ptr, idx, T, d, s_t, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """Rows ``idx`` of one (batch, head) of ``q`` or ``k``, ``[len(idx), BLOCK_D]``; rows past ``T`` read zeros."""
    dd = tl.arange(0, BLOCK_D)
    x = tl.load(ptr + idx[:, None] * s_t + dd[None, :], mask=(idx[:, None] < T) & (dd[None, :] < d), other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr, lse_ptr, T, H, d, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, scale2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Base-2 log-sum-exp of each query row (``scale2 = scale * log2 e``); keys past ``T`` weigh nothing."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q = _tile(q_ptr + b * sq_b + h * sq_h, rows, T, d, sq_t, BLOCK_D, DOT_FP32)
    kp = k_ptr + b * sk_b + h * sk_h
    m = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for c0 in range(0, T, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        k = _tile(kp, cols, T, d, sk_t, BLOCK_D, DOT_FP32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
        s = tl.where(cols[None, :] < T, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + bh * T + rows, m + tl.log2(acc), mask=rows < T)


@triton.jit
def _colsum_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr, T, H, d, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, scale2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Column sums of the probabilities ``2^(s - lse)`` over all query rows (rows past ``T`` weigh 0)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k = _tile(k_ptr + b * sk_b + h * sk_h, cols, T, d, sk_t, BLOCK_D, DOT_FP32)
    qp = q_ptr + b * sq_b + h * sq_h
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, T, BLOCK_Q):
        rows = r0 + tl.arange(0, BLOCK_Q)
        q = _tile(qp, rows, T, d, sq_t, BLOCK_D, DOT_FP32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
        lse = tl.load(lse_ptr + bh * T + rows, mask=rows < T, other=float("inf"))
        acc += tl.sum(tl.exp2(s - lse[:, None]), axis=0)  # padded rows: 2^-inf = 0
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
    interp = interpreting(q.device)
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        q, k = q.float(), k.float()
    wide = q.dtype == torch.float32
    dot_fp32 = wide or interp  # the interpreter has no 16-bit tl.dot
    precision = "tf32x3" if wide and not interp else "ieee"
    bd = pow2_at_least(d)
    big = 16 if interp else 64 if bd > 64 else 128  # the held tile's side: 128 x 64 fits the registers, 128 x 128 not
    small = 16 if interp else 64
    strides = (*q.stride()[:3], *k.stride()[:3])  # (batch, token, head) of q, then of k
    common = dict(BLOCK_D=bd, DOT_FP32=dot_fp32, PRECISION=precision, num_warps=4 if interp or big == 64 else 8)
    scale2 = scale * math.log2(math.e)
    _lse_kernel[(bsz * h, triton.cdiv(t, big))](
        q, k, lse, t, h, d, *strides, scale2, BLOCK_Q=big, BLOCK_K=small, **common
    )
    _colsum_kernel[(bsz * h, triton.cdiv(t, big))](
        q, k, lse, cols, t, h, d, *strides, scale2, BLOCK_Q=small, BLOCK_K=big, **common
    )
    total = cols / t
    return total.mean(dim=1) if heads == "mean" else total.sum(dim=1)
