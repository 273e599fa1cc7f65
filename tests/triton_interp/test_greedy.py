"""Triton ``greedy_maxmin`` against the PyTorch reference under the interpreter: the same picks, exactly."""

from __future__ import annotations

import pytest
import torch

from vtc import kernels
from vtc.kernels import dispatch, reference, triton_greedy
from vtc.kernels.triton_greedy import greedy_maxmin

from .helpers import DTYPES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [None, 16], ids=["registers", "chunked"])
def test_random_inputs_same_picks(gen, dtype, block):
    x = torch.randn(2, 37, 9, generator=gen).to(dtype)
    got = greedy_maxmin(x, 10, block=block)
    assert torch.equal(got, reference.greedy_maxmin(x, 10))
    first = torch.randint(0, 37, (2,), generator=gen)
    assert torch.equal(greedy_maxmin(x, 6, first, block=block), reference.greedy_maxmin(x, 6, first))


@pytest.mark.parametrize("block", [None, 16], ids=["registers", "chunked"])
def test_ties_duplicates_zeros_and_nan(gen, block):
    protos = torch.randn(4, 6, generator=gen)
    x = protos[torch.randint(0, 4, (2, 30), generator=gen)]  # many exact duplicates: distance ties everywhere
    x[0, 3] = 0.0  # zero vector: cosine 0, distance 1 to everything
    got = greedy_maxmin(x, 30, block=block)  # k = N: the whole permutation, no repeats
    assert torch.equal(got, reference.greedy_maxmin(x, 30))
    assert (got.sort(-1).values == torch.arange(30)).all()
    same = torch.ones(1, 20, 4)
    assert torch.equal(greedy_maxmin(same, 20, block=block), reference.greedy_maxmin(same, 20))
    nan = torch.randn(2, 25, 5, generator=gen)
    nan[0, 11, 2] = float("nan")  # NaN distances: torch.minimum / argmax semantics
    assert torch.equal(greedy_maxmin(nan, 8, block=block), reference.greedy_maxmin(nan, 8))


def test_shapes_first_and_edge_cases(gen):
    x = torch.randn(40, 7, generator=gen)[::2]  # [N, D], strided rows
    assert torch.equal(greedy_maxmin(x, 5), reference.greedy_maxmin(x, 5))
    assert torch.equal(greedy_maxmin(x, 5, first=4), reference.greedy_maxmin(x, 5, first=4))
    batched = torch.randn(3, 12, 8, generator=gen)
    picks = greedy_maxmin(batched, 4)
    for b in range(3):
        assert torch.equal(picks[b], greedy_maxmin(batched[b], 4))
    assert greedy_maxmin(batched, 0).shape == (3, 0)
    assert torch.equal(greedy_maxmin(torch.randn(2, 1, 3, generator=gen), 1), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError):
        greedy_maxmin(batched, 13)
    with pytest.raises(ValueError):
        greedy_maxmin(batched, 2, first=12)


def test_dispatched(gen):
    assert dispatch.implementation("greedy_maxmin", torch.device("cpu")) is triton_greedy.greedy_maxmin
    x = torch.randn(2, 50, 16, generator=gen, dtype=torch.bfloat16)
    assert torch.equal(kernels.greedy_maxmin(x, 12), reference.greedy_maxmin(x, 12))


def test_no_n_by_n_buffer(gen):
    """100,000 tokens (a 40 GB distance matrix in fp32): the kernel keeps two [B, N] vectors."""
    x = torch.randn(1, 100_000, 4, generator=gen)
    first = torch.tensor([7])
    assert torch.equal(greedy_maxmin(x, 3, first), reference.greedy_maxmin(x, 3, first))


def test_cuda_graph_policy(monkeypatch):
    """Graphs only on CUDA, from the second call with the same shapes and k, never for few picks or when off."""
    from vtc.kernels import triton_greedy as tg

    monkeypatch.setattr(tg, "_SEEN", set())
    monkeypatch.setattr(tg, "_NO_GRAPH", set())
    cuda = ((1, 500, 64), torch.device("cuda", 0), 100, 512)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not tg._use_graph(cuda)  # first call: eager (it may be the only one with these shapes)
    assert tg._use_graph(cuda)  # second: capture, then replay
    assert not tg._use_graph(((1, 500, 64), torch.device("cpu"), 100, 512))
    few = ((1, 500, 64), torch.device("cuda", 0), tg._MIN_GRAPH_STEPS - 1, 512)
    assert not tg._use_graph(few) and not tg._use_graph(few)
    monkeypatch.setenv("VTC_CUDA_GRAPHS", "0")
    assert not tg._use_graph(cuda)
    monkeypatch.delenv("VTC_CUDA_GRAPHS")
    tg._NO_GRAPH.add(cuda)  # a capture that failed is not tried again
    assert not tg._use_graph(cuda)
