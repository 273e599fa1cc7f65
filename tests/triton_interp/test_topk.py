"""Triton ``topk_sorted`` (K2) against the PyTorch reference under the interpreter: exact equality."""

from __future__ import annotations

import pytest
import torch

from vtc import kernels
from vtc.kernels import dispatch, reference, triton_topk
from vtc.kernels.triton_topk import topk_sorted

from .helpers import DTYPES

TINY = {"block_i": 16, "block_j": 16}


def _tie_heavy(gen, shape, dtype):
    """Small integers (many exact ties) with NaN, +-inf and signed zeros sprinkled in."""
    s = torch.randint(-3, 4, shape, generator=gen).to(torch.float32)
    u = torch.rand(shape, generator=gen)
    s[u < 0.08] = float("nan")
    s[(u >= 0.08) & (u < 0.12)] = float("inf")
    s[(u >= 0.12) & (u < 0.16)] = float("-inf")
    s[(u >= 0.16) & (u < 0.22)] = -0.0
    return s.to(dtype)


def _ks(gen, n):
    return sorted({0, 1, n - 1, n, int(torch.randint(1, n, (1,), generator=gen))})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_nan_inf_match_reference_exactly(gen, dtype):
    scores = _tie_heavy(gen, (3, 2, 41), dtype)  # leading dims, N not a multiple of the tiles
    for k in _ks(gen, 41):
        got = topk_sorted(scores, k, **TINY)
        assert torch.equal(got, reference.topk_sorted(scores, k)), k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_strided_rows_match_reference(gen, dtype):
    scores = torch.randn(4, 90, generator=gen).to(dtype)[:, ::2]  # non-contiguous rows of 45
    assert not scores.is_contiguous()
    for k in _ks(gen, 45):
        got = topk_sorted(scores, k, **TINY)
        assert torch.equal(got, reference.topk_sorted(scores, k)), k
    got = topk_sorted(scores.mT.contiguous().mT, 10, **TINY)  # column-major storage
    assert torch.equal(got, reference.topk_sorted(scores, 10))


def test_edge_cases(gen):
    one_d = torch.randn(33, generator=gen)
    assert torch.equal(topk_sorted(one_d, 5, **TINY), reference.topk_sorted(one_d, 5))
    all_nan = torch.full((2, 20), float("nan"))
    assert torch.equal(topk_sorted(all_nan, 7, **TINY), torch.arange(7).expand(2, 7))
    constant = torch.zeros(2, 20)
    assert torch.equal(topk_sorted(constant, 7, **TINY), torch.arange(7).expand(2, 7))
    assert topk_sorted(torch.zeros(3, 0), 0).shape == (3, 0)
    assert topk_sorted(torch.zeros(0, 5), 2).shape == (0, 2)
    assert torch.equal(topk_sorted(torch.randn(1, 1, generator=gen), 1), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError):
        topk_sorted(torch.zeros(4), 5)
    with pytest.raises(ValueError):
        topk_sorted(torch.zeros(4), -1)


def test_dispatched_default_tiles(gen):
    assert dispatch.implementation("topk_sorted", torch.device("cpu")) is triton_topk.topk_sorted
    scores = _tie_heavy(gen, (2, 70), torch.bfloat16)
    assert torch.equal(kernels.topk_sorted(scores, 23), reference.topk_sorted(scores, 23))
