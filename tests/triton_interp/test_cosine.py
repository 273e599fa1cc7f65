"""Triton ``cosine_argmax`` (K1) against the PyTorch reference under the interpreter."""

from __future__ import annotations

import pytest
import torch

from vtc import kernels
from vtc.kernels import dispatch, triton_cosine
from vtc.kernels.triton_cosine import cosine_argmax

from .helpers import DTYPES, SIM_TOL, assert_argmax_contract

TINY = {"block_m": 16, "block_n": 16}  # several tiles on tiny inputs


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"splits{n}")
def tiny(request):
    """Tiny tiles, the columns walked by one program or split over 2 or 3 (the GPU path for few rows)."""
    return {**TINY, "splits": request.param}


def _pair(gen, layout, bsz, m, n, d, dtype):
    """(a [B, M, D], b [B, N, D]) in the requested memory layout."""
    if layout == "even_odd":  # ToMe: alternate tokens of one sequence, read in place
        x = torch.randn(bsz, m + n, d, generator=gen).to(dtype)
        return x[:, 0::2], x[:, 1::2]
    if layout == "feature_strided":  # token axis contiguous, features strided
        return (
            torch.randn(bsz, d, m, generator=gen).to(dtype).transpose(1, 2),
            torch.randn(bsz, d, n, generator=gen).to(dtype).transpose(1, 2),
        )
    return torch.randn(bsz, m, d, generator=gen).to(dtype), torch.randn(bsz, n, d, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "layout, d, block_k",
    [("even_odd", 7, None), ("contiguous", 40, 16), ("even_odd", 150, None), ("feature_strided", 24, None)],
)
def test_random_inputs_match_reference(gen, dtype, layout, d, block_k, tiny):
    m = n = 19
    a, b = _pair(gen, layout, 2, m, n, d, dtype)
    if layout == "even_odd":
        assert not a.is_contiguous()
    masks = {}
    if d == 40:
        masks = {
            "row_mask": torch.rand(2, m, generator=gen) > 0.2,
            "col_mask": torch.rand(2, n, generator=gen) > 0.3,
        }
    val, idx = cosine_argmax(a, b, **masks, block_k=block_k, **tiny)
    assert_argmax_contract(val, idx, a, b, tol=SIM_TOL[dtype], **masks)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties_go_to_the_lowest_column(gen, dtype, tiny):
    # entries in {-1, 0, 1} with one or four non-zeros: norms 1 or 2, so every cosine is exact and
    # duplicates (spread over several column tiles) tie exactly
    protos = torch.tensor(
        [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1], [1, -1, 1, -1], [-1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32
    )
    b = protos[torch.randint(0, len(protos), (2, 45), generator=gen)].to(dtype)
    a = protos[torch.randint(0, len(protos), (2, 21), generator=gen)].to(dtype)
    val, idx = cosine_argmax(a, b, **tiny)
    sim = torch.nn.functional.normalize(a.float(), dim=-1) @ torch.nn.functional.normalize(b.float(), dim=-1).mT
    best = sim.max(-1).values
    first = (sim == best[..., None]).float().argmax(-1)  # left-most column attaining the maximum
    assert torch.equal(val, best)
    assert torch.equal(idx, first)
    assert torch.equal(idx, kernels.reference.cosine_argmax(a, b)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_random_columns_in_different_tiles_go_to_the_first(gen, dtype, tiny):
    """Equal columns with random entries (inexact cosines), in different column tiles, and a row parallel to
    them: the first one wins, and equal rows (in different row tiles) get equal answers."""
    b = torch.randn(2, 45, 24, generator=gen)
    b[:, 3] = b[:, 20] = b[:, 37] = torch.randn(2, 24, generator=gen)
    a = torch.randn(2, 21, 24, generator=gen)
    a[:, 5] = 2.5 * b[:, 3]
    a[:, 18] = a[:, 2]
    val, idx = cosine_argmax(a.to(dtype), b.to(dtype), **tiny)
    assert idx[:, 5].tolist() == [3, 3]
    assert torch.equal(val[:, 18], val[:, 2]) and torch.equal(idx[:, 18], idx[:, 2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_is_the_maximum_and_the_first_nan_wins(gen, dtype, tiny):
    a = torch.randn(2, 20, 8, generator=gen).to(dtype)
    b = torch.randn(2, 40, 8, generator=gen).to(dtype)
    b[0, 27, 3] = float("nan")  # two NaN columns in different tiles: 27 wins
    b[0, 35, 0] = float("nan")
    a[1, 5, 2] = float("nan")  # a NaN row: NaN at column 0
    val, idx = cosine_argmax(a, b, **tiny)
    assert_argmax_contract(val, idx, a, b, tol=SIM_TOL[dtype])
    assert idx[0].eq(27).all() and val[0].isnan().all() and idx[1, 5] == 0
    # masking the first NaN column moves every row to the second; masking a NaN row gives (-inf, 0)
    col_mask = torch.ones(2, 40, dtype=torch.bool)
    col_mask[0, 27] = False
    row_mask = torch.ones(2, 20, dtype=torch.bool)
    row_mask[1, 5] = False
    val, idx = cosine_argmax(a, b, row_mask, col_mask, **tiny)
    assert_argmax_contract(val, idx, a, b, row_mask, col_mask, tol=SIM_TOL[dtype])
    assert idx[0].eq(35).all() and val[1, 5] == float("-inf") and idx[1, 5] == 0


def test_masks_zero_vectors_and_all_masked_rows(gen, tiny):
    a = torch.randn(3, 18, 5, generator=gen)
    b = torch.randn(3, 33, 5, generator=gen)
    a[0, 4] = 0.0  # similarity 0 with everything, never NaN
    b[1, ::3] = 0.0
    col_mask = torch.rand(3, 33, generator=gen) > 0.5
    col_mask[2] = False  # every column masked: (-inf, 0) for the whole batch
    row_mask = torch.rand(3, 18, generator=gen) > 0.25
    val, idx = cosine_argmax(a, b, row_mask, col_mask, **tiny)
    assert_argmax_contract(val, idx, a, b, row_mask, col_mask)
    assert (val[2] == float("-inf")).all() and (idx[2] == 0).all()
    val, idx = cosine_argmax(a, b, **tiny)
    assert not val.isnan().any()
    assert_argmax_contract(val, idx, a, b)


def test_shapes_leading_dims_and_empty_inputs(gen, tiny):
    a, b = torch.randn(17, 6, generator=gen), torch.randn(9, 6, generator=gen)  # [M, D] / [N, D]
    val, idx = cosine_argmax(a, b, **tiny)
    assert val.shape == (17,)
    assert_argmax_contract(val, idx, a, b)
    a4, b4 = torch.randn(2, 1, 5, 6, generator=gen), torch.randn(1, 3, 7, 6, generator=gen)  # broadcast
    val, idx = cosine_argmax(a4, b4, row_mask=torch.rand(5, generator=gen) > 0.5, **tiny)
    assert val.shape == (2, 3, 5)
    one_val, one_idx = cosine_argmax(a[:1], b[:1])  # M = N = 1
    assert_argmax_contract(one_val, one_idx, a[:1], b[:1])
    empties = [((2, 0, 6), (2, 9, 6)), ((0, 4, 6), (0, 9, 6)), ((2, 4, 6), (2, 0, 6)), ((2, 4, 0), (2, 5, 0))]
    for shape_a, shape_b in empties:
        ea, eb = torch.randn(shape_a, generator=gen), torch.randn(shape_b, generator=gen)
        val, idx = cosine_argmax(ea, eb)
        ref_val, ref_idx = kernels.reference.cosine_argmax(ea, eb)
        assert torch.equal(val, ref_val) and torch.equal(idx, ref_idx), (shape_a, shape_b)


def test_deterministic_and_dispatched(gen, tiny):
    x = torch.randn(2, 50, 12, generator=gen, dtype=torch.float16)
    first = cosine_argmax(x[:, ::2], x[:, 1::2], **tiny)
    again = cosine_argmax(x[:, ::2], x[:, 1::2], **tiny)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # bitwise
    assert dispatch.implementation("cosine_argmax", x.device) is triton_cosine.cosine_argmax
    val, idx = kernels.cosine_argmax(x[:, ::2], x[:, 1::2])  # public op, default tiles
    assert_argmax_contract(val, idx, x[:, ::2], x[:, 1::2], tol=SIM_TOL[torch.float16])


def test_inputs_that_need_grad_fall_back_to_the_reference(gen):
    a = torch.randn(2, 6, 4, generator=gen, requires_grad=True)
    val, _ = cosine_argmax(a, torch.randn(2, 5, 4, generator=gen))
    assert val.requires_grad  # graph from the reference; the kernel has no backward
