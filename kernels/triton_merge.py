"""K3: deterministic size-weighted merge, "merge-and-compact" in CSR order (``docs/kernels.md``).

Same result as ``reference.weighted_merge``: ``merged[g] = sum_i s_i x_i / sum_i s_i`` over the tokens ``i``
with ``groups[i] == g`` (``-1`` drops a token), accumulated in fp32 and cast to ``x``'s dtype once; an empty
group gives zeros and size 0.

Host side: a stable sort of ``groups`` lists every group's members in ascending token order, and a
``searchsorted`` of ``0..G`` in the sorted ids gives the CSR offsets (no host sync, dropped tokens sort
first and are never visited). Kernel, grid ``(G, ceil(C / BLOCK_C))``: one program per output row and
channel block walks its members in that order, accumulating ``s_i * x_i`` and ``s_i`` in fp32 registers.
No atomics, a fixed summation order: bitwise deterministic, and the same order as the CPU reference's
``index_add_``. One read of ``x``, one write of the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .triton_common import interpreting, needs_grad, new_empty, pow2_at_least

_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)


@triton.jit
def _merge_kernel(
    x_ptr, w_ptr, order_ptr, offsets_ptr, out_ptr, den_ptr, C, s_t, s_c, BLOCK_C: tl.constexpr
):  # fmt: skip
    """out[g, cols] = sum_i w_i x_i / max(sum_i w_i, tiny) over group g's members, in CSR order."""
    g = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    start = tl.load(offsets_ptr + g)
    end = tl.load(offsets_ptr + g + 1)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    den = tl.zeros([], dtype=tl.float32)
    for p in range(start, end):
        t = tl.load(order_ptr + p)
        w = tl.load(w_ptr + t)
        x = tl.load(x_ptr + t * s_t + cols * s_c, mask=ok, other=0.0).to(tl.float32)
        acc += x * w
        den += w
    merged = acc / tl.maximum(den, _TINY)
    tl.store(out_ptr + g * C + cols, merged.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=ok)
    if pid_c == 0:
        tl.store(den_ptr + g, den)


def weighted_merge(
    x: torch.Tensor,
    sizes: torch.Tensor,
    groups: torch.Tensor,
    num_groups: int | None = None,
    *,
    block_c: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of the tokens of each group (fp32 accumulation, fixed order, no atomics).

    Same contract as ``reference.weighted_merge``. ``block_c`` overrides the channel block (tests). Inputs that
    require grad go to the reference (no backward here; training-time ToMe needs one).

    Args:
        x: ``[T, C]`` tokens, fp16/bf16/fp32, any strides; sizes: ``[T]``; groups: ``[T]`` output row of each
            token, -1 drops it.
        num_groups: number of output rows (default ``groups.max() + 1``).

    Returns:
        ``(merged [G, C] in x.dtype, sizes [G] fp32)``.
    """
    if needs_grad(x, sizes):
        return reference.weighted_merge(x, sizes, groups, num_groups)
    if x.dim() != 2:
        raise ValueError(f"x must be [T, C], got {tuple(x.shape)}")
    t, c = x.shape
    groups = groups.long().reshape(-1)
    if groups.numel() != t or sizes.numel() != t:
        raise ValueError(f"x has {t} tokens but groups has {groups.numel()} and sizes {sizes.numel()}")
    g = (int(groups.max().item()) + 1 if t else 0) if num_groups is None else num_groups
    if t and num_groups is not None and int(groups.max().item()) >= g:
        raise ValueError(f"groups index a row >= num_groups={g}")
    out_dtype = x.dtype
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x = x.float()
    # the interpreter truncates fp32 -> bf16 (GPUs round to nearest even): let torch do that one cast there
    buf_dtype = torch.float32 if interpreting(x.device) and x.dtype == torch.bfloat16 else x.dtype
    merged = new_empty((g, c), buf_dtype, x.device)  # [G, C]
    den = new_empty((g,), torch.float32, x.device)  # [G]
    if g == 0:
        return merged.to(out_dtype), den

    sorted_ids, order = torch.sort(groups, stable=True)  # members of each group in ascending token order
    offsets = torch.searchsorted(sorted_ids, torch.arange(g + 1, device=x.device))  # [G + 1] CSR row starts
    w = sizes.reshape(-1).float().contiguous()  # [T]
    bc = block_c or (32 if interpreting(x.device) else pow2_at_least(c, minimum=32, maximum=512))
    grid = (g, max(1, triton.cdiv(c, bc)))
    _merge_kernel[grid](x, w, order, offsets, merged, den, c, *x.stride(), BLOCK_C=bc, num_warps=4)
    return merged.to(out_dtype), den
