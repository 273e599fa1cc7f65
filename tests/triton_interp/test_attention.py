"""Triton ``attention_received`` against the PyTorch reference under the interpreter (no H x T x T buffer)."""

from __future__ import annotations

import pytest
import torch

from vtc import kernels
from vtc.kernels import attention, dispatch, triton_attention
from vtc.kernels.triton_attention import attention_received

from .helpers import DTYPES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", ["mean", "sum"])
@pytest.mark.parametrize("t", [1, 17, 40])
def test_random_inputs_match_the_reference(gen, dtype, heads, t):
    q = (2 * torch.randn(2, t, 3, 8, generator=gen)).to(dtype)
    k = (2 * torch.randn(2, t, 3, 8, generator=gen)).to(dtype)
    got = attention_received(q, k, heads)
    want = attention.attention_received(q, k, heads, chunk=7)
    assert got.dtype == torch.float32 and got.shape == (2, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    if heads == "mean":  # every query's row sums to 1, so the scores do too
        torch.testing.assert_close(got.sum(-1), torch.ones(2), rtol=1e-5, atol=1e-5)


def test_ties_strides_odd_head_dim_flat_heads_and_scale(gen):
    base = torch.randn(1, 5, 2, 6, generator=gen)
    q = base.repeat(1, 4, 1, 1)  # equal rows: equal columns of probabilities, equal scores per repeat
    k = base.repeat(1, 4, 1, 1)
    got = attention_received(q, k)
    torch.testing.assert_close(got, attention.attention_received(q, k), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[:, :5], got[:, 5:10], rtol=1e-6, atol=1e-8)
    wide = torch.randn(2, 30, 2, 12, generator=gen)
    q, k = wide[:, ::2], wide[:, 1::2]  # strided token axis, head dim 12 (not a power of two)
    torch.testing.assert_close(attention_received(q, k), attention.attention_received(q, k), rtol=1e-5, atol=1e-7)
    flat_q, flat_k = q.flatten(2), k.flatten(2)
    torch.testing.assert_close(
        attention_received(flat_q, flat_k, num_heads=2, scale=0.3),
        attention.attention_received(flat_q, flat_k, num_heads=2, scale=0.3),
        rtol=1e-5,
        atol=1e-7,
    )
    with pytest.raises(ValueError, match="num_heads is required"):
        attention_received(flat_q, flat_k)
    with pytest.raises(ValueError, match="heads must be"):
        attention_received(q, k, heads="max")


def test_dispatched(gen):
    assert dispatch.implementation("attention_received", torch.device("cpu")) is triton_attention.attention_received
    q, k = torch.randn(2, 9, 2, 4, generator=gen), torch.randn(2, 9, 2, 4, generator=gen)
    torch.testing.assert_close(kernels.attention_received(q, k), attention.attention_received(q, k))
