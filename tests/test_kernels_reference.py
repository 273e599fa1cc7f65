"""The PyTorch reference ops against their definitions (brute force on small inputs)."""

import itertools

import pytest
import torch

from vtc import kernels
from vtc.kernels import reference


def test_topk_sorted_ties_go_to_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    assert kernels.topk_sorted(scores, 2).tolist() == [1, 2]
    assert kernels.topk_sorted(scores, 4).tolist() == [1, 2, 4, 5]


def test_topk_sorted_nan_ranks_first_and_batches():
    scores = torch.tensor([[0.1, float("nan"), 0.9, 0.5], [4.0, 3.0, 2.0, 1.0]])
    assert kernels.topk_sorted(scores, 2).tolist() == [[1, 2], [0, 1]]


def test_topk_sorted_rejects_bad_k():
    with pytest.raises(ValueError):
        kernels.topk_sorted(torch.zeros(3), 4)


def _brute_maxmin(x, k):
    xn = torch.nn.functional.normalize(x.float(), dim=-1, eps=1e-12)
    d = 1 - xn @ xn.T
    n = x.shape[0]
    nearest = torch.tensor([min(d[i, j].item() for j in range(n) if j != i) for i in range(n)])
    chosen = [int(torch.argmax(nearest))]
    while len(chosen) < k:
        best, arg = -float("inf"), None
        for j in range(n):
            if j in chosen:
                continue
            m = min(d[i, j].item() for i in chosen)
            if m > best:
                best, arg = m, j
        chosen.append(arg)
    return chosen


@pytest.mark.parametrize("seed", range(5))
def test_greedy_maxmin_matches_definition(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 5, generator=g)
    assert kernels.greedy_maxmin(x, 6).tolist() == _brute_maxmin(x, 6)


def test_greedy_maxmin_never_repeats_on_duplicates():
    x = torch.ones(6, 4)  # all identical: every distance is 0
    picks = kernels.greedy_maxmin(x, 6).tolist()
    assert sorted(picks) == list(range(6))


def test_greedy_maxmin_batched_equals_single():
    x = torch.randn(3, 10, 8)
    batched = kernels.greedy_maxmin(x, 4)
    for b in range(3):
        assert batched[b].tolist() == kernels.greedy_maxmin(x[b], 4).tolist()


def test_cosine_argmax_matches_explicit_and_masks():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 7, 5, generator=g), torch.randn(2, 9, 5, generator=g)
    val, idx = kernels.cosine_argmax(a, b)
    sim = torch.nn.functional.cosine_similarity(a[:, :, None], b[:, None], dim=-1)
    torch.testing.assert_close(val, sim.max(-1).values, atol=1e-6, rtol=0)
    assert torch.equal(idx, sim.argmax(-1))
    col_mask = torch.ones(2, 9, dtype=torch.bool)
    col_mask[:, idx[0, 0]] = False
    _, idx2 = kernels.cosine_argmax(a, b, col_mask=col_mask)
    assert idx2[0, 0] != idx[0, 0]
    row_mask = torch.ones(2, 7, dtype=torch.bool)
    row_mask[1, 3] = False
    val3, idx3 = kernels.cosine_argmax(a, b, row_mask=row_mask)
    assert val3[1, 3] == float("-inf") and idx3[1, 3] == 0


def test_cosine_argmax_zero_vector_and_ties():
    a = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # columns 0 and 1 tie exactly
    val, idx = kernels.cosine_argmax(a, b)
    assert val[0] == 0 and idx[0] == 0  # zero vector: similarity 0 with everything, first index
    assert val[1] == 1 and idx[1] == 0


def test_weighted_merge_preserves_weighted_mean_and_mass():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g)
    sizes = torch.rand(10, generator=g) * 3 + 0.5
    groups = torch.tensor([0, 1, 0, 2, -1, 1, 2, 2, 0, -1])
    merged, new_sizes = kernels.weighted_merge(x, sizes, groups)
    for gidx in range(3):
        members = groups == gidx
        expect = (x[members] * sizes[members, None]).sum(0) / sizes[members].sum()
        torch.testing.assert_close(merged[gidx], expect, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(new_sizes[gidx], sizes[members].sum())


def test_attention_row_and_received_match_explicit():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 9, 3, 4, generator=g), torch.randn(2, 9, 3, 4, generator=g)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / 2.0
    probs = logits.softmax(-1)
    torch.testing.assert_close(kernels.attention_row(q, k, 0), probs[:, :, 0].mean(1))
    torch.testing.assert_close(kernels.attention_row(q, k, 0, heads="sum"), probs[:, :, 0].sum(1))
    torch.testing.assert_close(reference.attention_received(q, k, chunk=4), probs.mean(2).mean(1))
    torch.testing.assert_close(kernels.attention_received(q, k), probs.mean(2).mean(1))  # the dispatched op
    flat = kernels.attention_row(q.flatten(2), k.flatten(2), 0, num_heads=3)
    torch.testing.assert_close(flat, probs[:, :, 0].mean(1))


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("VTC_KERNEL_BACKEND", "torch")
    assert kernels.get_backend() is kernels.Backend.TORCH
    monkeypatch.setenv("VTC_KERNEL_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="VTC_KERNEL_BACKEND"):
        kernels.get_backend()


def test_reference_is_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv("VTC_KERNEL_BACKEND", raising=False)
    from vtc.kernels.dispatch import implementation

    assert implementation("topk_sorted", torch.device("cpu")) is reference.topk_sorted


def test_greedy_maxmin_first_pick_rule_small_exhaustive():
    # 4 points on a line in 2-D angle space: the isolated one is picked first
    angles = torch.tensor([0.0, 0.1, 0.2, 2.0])
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    picks = kernels.greedy_maxmin(x, 2).tolist()
    assert picks[0] == 3
    assert picks[1] == 0  # farthest from point 3 among 0, 1, 2 is angle 0.0
    assert all(len(set(p)) == len(p) for p in itertools.permutations(picks))


def test_cosine_argmax_equal_inputs_score_equally_wherever_they_sit():
    """Three equal columns and a row parallel to them: the first of them wins, for any shape around them (a
    matrix product rounds a column by where it sits in its tiles); equal rows get equal answers."""
    for seed in range(3000):
        g = torch.Generator().manual_seed(seed)
        m, n, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 40), (10, 64), (8, 300)))
        b = torch.randn(n, d, generator=g)
        b[3] = b[7] = b[9] = torch.randn(d, generator=g)
        a = torch.randn(m, d, generator=g)
        r = int(torch.randint(0, m, (1,), generator=g))
        a[r] = b[3] * float(torch.rand(1, generator=g) * 3 + 0.1)
        a = torch.cat([a, a[:1]])  # an equal row, elsewhere
        value, index = reference.cosine_argmax(a, b)
        assert int(index[r]) == 3, seed
        assert value[-1] == value[0] and index[-1] == index[0], seed


def test_first_equal_groups_equal_rows_per_batch_entry_and_skips_invalid_ones():
    x = torch.tensor([[[1.0, 2], [3, 4], [1, 2], [1, 2]], [[3, 4], [1, 2], [3, 4], [0, 0]]])
    assert reference.first_equal(x).tolist() == [[0, 1, 0, 0], [0, 1, 0, 3]]
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert reference.first_equal(x, valid).tolist() == [[0, 1, 2, 2], [0, 1, 0, 3]]
    value, index = reference.cosine_argmax(x[0], x[0], col_mask=valid[0])
    assert index.tolist() == [2, 1, 2, 2]  # column 0 is masked: its equals answer for it


def _first_equal_by_definition(x, valid):
    """The first earlier row equal to each row under ``==`` (NaN rows and invalid rows equal to none)."""
    b, r, _ = x.shape
    out = torch.arange(r).repeat(b, 1)
    usable = ~x.isnan().any(-1) & (torch.ones(b, r, dtype=torch.bool) if valid is None else valid)
    for i in range(b):
        for a in range(r):
            for c in range(a):
                if usable[i, a] and usable[i, c] and bool((x[i, c] == x[i, a]).all()):
                    out[i, a] = c
                    break
    return out


def test_first_equal_is_exact_equality_with_nan_signed_zero_and_inf():
    g = torch.Generator().manual_seed(3)
    for trial in range(60):
        b, r, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 4), (1, 25), (1, 6)))
        protos = torch.randint(-2, 3, (5, d), generator=g).float()
        x = protos[torch.randint(0, 5, (b, r), generator=g)]
        x = torch.where((x == 0) & (torch.rand(x.shape, generator=g) > 0.5), torch.tensor(-0.0), x)  # -0.0 == 0.0
        if trial % 3 == 0:
            x = torch.where(x == 2, torch.tensor(float("inf")), x)
        if trial % 4 == 0:
            x[0, 0, 0] = float("nan")
        valid = torch.rand(b, r, generator=g) > 0.3 if trial % 2 else None
        want = _first_equal_by_definition(x, valid)
        assert torch.equal(reference.first_equal(x, valid), want), trial
        assert torch.equal(reference.first_equal(x.bfloat16(), valid), want), trial


def test_greedy_maxmin_holds_no_n_by_n_buffer():
    """200,000 tokens: a distance matrix would be 160 GB (fp32), far beyond this machine (24 GB); the rows
    computed per pick need 0.8 MB each."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 200_000, 4, generator=g)
    picks = kernels.greedy_maxmin(x, 3, first=torch.tensor([0]))
    assert picks.shape == (1, 3) and len(set(picks[0].tolist())) == 3
    xn = reference.normalize(x[0])
    second = int((1 - xn @ xn[0]).argmax())  # the farthest token from the first pick
    assert picks[0, :2].tolist() == [0, second]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_nearest_distance_in_blocks_equals_the_dense_rule(chunk):
    g = torch.Generator().manual_seed(chunk)
    xn = reference.normalize(torch.randn(2, 17, 5, generator=g))
    dense = (1 - xn @ xn.transpose(-1, -2)).masked_fill(torch.eye(17, dtype=torch.bool), float("inf")).min(-1).values
    torch.testing.assert_close(reference.nearest_distance(xn, chunk), dense, rtol=0, atol=1e-6)
    assert reference.nearest_distance(xn[:, :1], chunk).isinf().all()
