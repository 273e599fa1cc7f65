"""Tolerances and checks shared by the interpreter parity tests."""

from __future__ import annotations

import torch

#: contract tolerances (docs/kernels.md, "Correctness contract"): cosine values vs the fp32 reference on upcast inputs
SIM_TOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 1e-3}
#: merged features vs an fp64 reference, relative (the bf16 entry is the contract's; the others scale with eps)
MERGE_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference_similarity(a, b, col_mask=None):
    """The full fp32 cosine matrix of the reference (upcast, F.normalize), masked columns at -inf."""
    an = torch.nn.functional.normalize(a.float(), dim=-1, eps=1e-12)
    bn = torch.nn.functional.normalize(b.float(), dim=-1, eps=1e-12)
    sim = an @ bn.transpose(-1, -2)  # [..., M, N]
    if col_mask is not None:
        sim = sim.masked_fill(~col_mask.bool().unsqueeze(-2), float("-inf"))
    return sim


def assert_argmax_contract(val, idx, a, b, row_mask=None, col_mask=None, tol=1e-5):
    """The kernel contract (``docs/kernels.md``) on ties, NaN and tolerance: values within ``tol`` of the fp32
    reference, NaN and -inf exactly where it has them, the same index unless the reference's top-2 gap is below
    ``tol`` (then the chosen column must score within ``tol`` of the maximum)."""
    from vtc.kernels import reference

    ref_val, ref_idx = reference.cosine_argmax(a, b, row_mask, col_mask)
    assert val.dtype == torch.float32 and idx.dtype == torch.int64
    assert val.shape == ref_val.shape and idx.shape == ref_idx.shape
    assert torch.equal(val.isnan(), ref_val.isnan()), "NaN rows differ"
    neg_inf = ref_val == float("-inf")
    assert torch.equal(val == float("-inf"), neg_inf), "-inf rows differ"
    exact = ref_val.isnan() | neg_inf
    assert torch.equal(idx[exact], ref_idx[exact]), "NaN / masked rows must give the reference index"
    finite = ~exact
    if not finite.any():
        return
    err = (val[finite] - ref_val[finite]).abs().max().item()
    assert err <= tol, f"max value error {err:.3g} > {tol:g}"
    sim = reference_similarity(a, b, col_mask).expand(*ref_val.shape, -1)
    chosen = sim.gather(-1, idx.clamp(0, sim.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    if sim.shape[-1] > 1:
        top2 = sim.topk(2, dim=-1).values
        close = (top2[..., 0] - top2[..., 1]) < tol
    else:
        close = torch.zeros_like(finite)
    ok = (idx == ref_idx) | (close & ((chosen - ref_val).abs() <= tol))
    bad = finite & ~ok
    assert not bad.any(), f"rows chose another index: got {idx[bad].tolist()}, reference {ref_idx[bad].tolist()}"
