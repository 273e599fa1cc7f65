"""Triton ``weighted_merge`` (K3) against an fp64 reference under the interpreter."""

from __future__ import annotations

import pytest
import torch

from vtc import kernels
from vtc.kernels import dispatch, reference, triton_merge
from vtc.kernels.triton_merge import weighted_merge

from .helpers import DTYPES, MERGE_RTOL


def _fp64_reference(x, sizes, groups, g):
    num = torch.zeros(g, x.shape[-1], dtype=torch.float64)
    den = torch.zeros(g, dtype=torch.float64)
    keep = groups >= 0
    num.index_add_(0, groups[keep], x.double()[keep] * sizes.double()[keep, None])
    den.index_add_(0, groups[keep], sizes.double()[keep])
    return num / den.clamp_min(1e-300)[:, None], den


def _assert_merge(got, x, sizes, groups, g):
    merged, new_sizes = got
    ref, ref_sizes = _fp64_reference(x, sizes, groups, g)
    assert merged.dtype == x.dtype and new_sizes.dtype == torch.float32
    assert merged.shape == (g, x.shape[-1]) and new_sizes.shape == (g,)
    finite = x.double().abs().nan_to_num(0.0)
    scale = finite.max().item() if x.numel() else 1.0
    rtol = MERGE_RTOL[x.dtype]
    torch.testing.assert_close(merged.double(), ref, rtol=rtol, atol=1e-6 * scale, equal_nan=True)
    torch.testing.assert_close(new_sizes.double(), ref_sizes, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided_rows", "strided_cols"])
def test_random_groups_match_fp64(gen, dtype, layout):
    t, c = 30, 45
    x = torch.randn(2 * t, 2 * c, generator=gen).to(dtype)
    x = {"contiguous": x[:t, :c].contiguous(), "strided_rows": x[::2, :c], "strided_cols": x[:t, ::2]}[layout]
    sizes = torch.rand(t, generator=gen) * 4 + 0.25
    groups = torch.randint(-1, 9, (t,), generator=gen)  # -1 drops; 9..11 stay empty
    got = weighted_merge(x, sizes, groups, 12, block_c=16)
    _assert_merge(got, x, sizes, groups, 12)
    assert (got[0][9:] == 0).all() and (got[1][9:] == 0).all()
    again = weighted_merge(x, sizes, groups, 12, block_c=16)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])  # bitwise deterministic


def test_fp32_accumulation_nan_and_edges(gen):
    big = torch.full((6, 20), 60000.0, dtype=torch.float16)  # s * x overflows fp16; the mean does not
    sizes = torch.full((6,), 100.0, dtype=torch.float16)
    groups = torch.tensor([0, 0, 0, 1, 1, -1])
    merged, new_sizes = weighted_merge(big, sizes, groups, block_c=16)
    assert (merged == 60000.0).all() and new_sizes.tolist() == [300.0, 200.0]
    x = torch.randn(10, 7, generator=gen)
    x[2, 3] = float("nan")
    groups = torch.tensor([0, 1, 0, 2, 2, 1, 3, 3, 3, 0])
    got = weighted_merge(x, torch.ones(10), groups)  # num_groups from the data
    _assert_merge(got, x, torch.ones(10), groups, 4)
    assert got[0][0].isnan().any() and not got[0][1:].isnan().any()
    all_dropped = weighted_merge(x, torch.ones(10), torch.full((10,), -1), 3)
    assert (all_dropped[0] == 0).all() and (all_dropped[1] == 0).all()
    assert weighted_merge(x, torch.ones(10), torch.full((10,), -1))[0].shape == (0, 7)
    empty = weighted_merge(torch.zeros(0, 7), torch.zeros(0), torch.zeros(0, dtype=torch.long), 2)
    assert empty[0].shape == (2, 7) and (empty[0] == 0).all()
    with pytest.raises(ValueError):
        weighted_merge(x, torch.ones(10), groups, 3)  # group 3 does not fit in 3 rows


def test_dispatched(gen):
    assert dispatch.implementation("weighted_merge", torch.device("cpu")) is triton_merge.weighted_merge
    x = torch.randn(40, 33, generator=gen, dtype=torch.bfloat16)
    sizes, groups = torch.rand(40, generator=gen) + 0.5, torch.randint(-1, 15, (40,), generator=gen)
    got = kernels.weighted_merge(x, sizes, groups, 15)
    _assert_merge(got, x, sizes, groups, 15)
    ref = reference.weighted_merge(x, sizes, groups, 15)
    torch.testing.assert_close(got[0], ref[0], rtol=MERGE_RTOL[torch.bfloat16], atol=1e-6)


def test_inputs_that_need_grad_fall_back_to_the_reference(gen):
    x = torch.randn(8, 5, generator=gen, requires_grad=True)
    merged, _ = weighted_merge(x, torch.ones(8), torch.tensor([0, 0, 1, 1, 2, 2, 3, -1]))
    merged.sum().backward()  # the reference's autograd graph
    assert x.grad is not None and (x.grad[:6] == 0.5).all() and (x.grad[7] == 0).all()
