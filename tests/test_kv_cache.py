"""The KV_CACHE stage (vtc.kv): LOOK-M and Elastic Cache by hand and against the official code's arithmetic, the
cache bound per layer after the prefill and at every decode step, budget 1.0, restore, generate against a by-hand
replay on the stock model, stacking with a visual method, and bad options."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import vtc
from vtc.kv import ElasticCacheConfig, LookMConfig, compressor_for
from vtc.testing import compressed_inputs, llava_inputs, tiny_llava

BATCH = ((3, 4), (6, 2))  # two samples of different lengths: one is left-padded


# -- the compressors by hand ---------------------------------------------------------------------------
def _example():
    """One head, 6 rows: text 0, 4, 5; visual 1, 2, 3."""
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.1, 3.0], [1.0, 0.2], [0.0, 1.0], [-1.0, 0.0]])[None]
    values = torch.tensor([[float(i), 10.0 * i] for i in range(6)])[None]
    scores = torch.tensor([[0.5, 3.0, 1.0, 2.0, 0.2, 9.0]])
    visual = torch.tensor([False, True, True, True, False, False])
    return keys, values, scores, visual


def test_lookm_pivot_by_hand():
    keys, values, scores, visual = _example()
    # k = floor(0.5 * 6 + 0.5) = 3; recent = int(6 * 0.5 * 0.5) = 1 (row 5); hh = 2 from rows 0..4, text first: 0, 4
    k, v, _ = compressor_for(LookMConfig(kv_budget=0.5)).prefill(keys, values, scores, visual)
    # evicted 1 -> 0, 2 -> 4, 3 -> 0 (cosine of keys); pivot: kept <- mean(kept, (evicted + kept) / 2, ...)
    k0 = (keys[0, 0] + (keys[0, 1] + keys[0, 0]) / 2 + (keys[0, 3] + keys[0, 0]) / 2) / 3
    v0 = (values[0, 0] + (values[0, 1] + values[0, 0]) / 2 + (values[0, 3] + values[0, 0]) / 2) / 3
    k4 = (keys[0, 4] + (keys[0, 2] + keys[0, 4]) / 2) / 2
    v4 = (values[0, 4] + (values[0, 2] + values[0, 4]) / 2) / 2
    torch.testing.assert_close(k[0], torch.stack([k0, k4, keys[0, 5]]))
    torch.testing.assert_close(v[0], torch.stack([v0, v4, values[0, 5]]))


def test_lookm_avg_weighted_and_no_text_prior_by_hand():
    keys, values, scores, visual = _example()
    sim = {j: float(F.cosine_similarity(keys[0, j], keys[0, t], dim=0)) for j, t in ((1, 0), (2, 4), (3, 0))}
    mean = sum(sim.values()) / 3
    chosen = [j for j in (1, 2, 3) if sim[j] >= mean]  # the official filter: best similarity >= the mean
    assert chosen == [1, 2]  # 3 is left out (it is evicted, not merged)
    k, v, _ = compressor_for(LookMConfig(kv_budget=0.5, merge="avg")).prefill(keys, values, scores, visual)
    torch.testing.assert_close(k[0, 0], (keys[0, 0] + keys[0, 1]) / 2)
    torch.testing.assert_close(v[0, 1], (values[0, 4] + values[0, 2]) / 2)
    k, v, _ = compressor_for(LookMConfig(kv_budget=0.5, merge="weighted")).prefill(keys, values, scores, visual)
    torch.testing.assert_close(k[0, 0], (keys[0, 0] + sim[1] * keys[0, 1]) / 2)
    torch.testing.assert_close(v[0, 1], (values[0, 4] + sim[2] * values[0, 2]) / 2)
    # without the text prior the first 4 rows are pinned: 10 rows at 0.9 keep 9, the recent int(4.5) = 4, and
    # hh = 5: rows 0..3 whatever their scores, then the better of rows 4 (0.3) and 5 (0.6)
    keys, values = torch.randn(1, 10, 4), torch.randn(1, 10, 4)
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.3, 0.6, 5.0, 5.0, 5.0, 5.0]])
    lookm = compressor_for(LookMConfig(kv_budget=0.9, merge="none", text_prior=False))
    k, _, _ = lookm.prefill(keys, values, scores, torch.ones(10, dtype=torch.bool))
    torch.testing.assert_close(k[0], keys[0, [0, 1, 2, 3, 5, 6, 7, 8, 9]])


def _official_text_pivot(keys, values, hh_score, image, hh, recent):
    """``TextPivotMerge_LayerWise.__call__`` of the official LOOK-M code, for one sample (bsz 1), line by line."""
    heads, _, d = keys.shape
    score = hh_score.clone()
    anti = torch.zeros_like(score)
    anti[:, image] = -65516
    anti[:, -recent:] = -65516
    score = score + anti
    _, keep_topk = torch.topk(score[:, :-recent], hh, dim=-1)
    score.scatter_(1, keep_topk.sort().values, 0)
    score[:, -recent:] = 0
    mask = score >= 0
    k_keep, v_keep = keys[mask].view(heads, -1, d), values[mask].view(heads, -1, d)
    k_pruned, v_pruned = keys[~mask].view(heads, -1, d), values[~mask].view(heads, -1, d)
    sim = (k_pruned / k_pruned.norm(dim=-1, keepdim=True)) @ (k_keep / k_keep.norm(dim=-1, keepdim=True)).transpose(
        -1, -2
    )
    idx = sim.max(dim=-1).indices.unsqueeze(-1).repeat(1, 1, d)
    k_merged = (k_pruned + torch.gather(k_keep, 1, idx)) / 2
    v_merged = (v_pruned + torch.gather(v_keep, 1, idx)) / 2
    k_keep = torch.scatter_reduce(k_keep, 1, idx, k_merged, reduce="mean", include_self=True)
    v_keep = torch.scatter_reduce(v_keep, 1, idx, v_merged, reduce="mean", include_self=True)
    return k_keep, v_keep


@pytest.mark.parametrize("seed", range(5))
def test_lookm_equals_the_official_text_pivot_merge(seed):
    gen = torch.Generator().manual_seed(seed)
    heads, length, d = 3, 20, 8
    keys, values = torch.randn(heads, length, d, generator=gen), torch.randn(heads, length, d, generator=gen)
    scores = torch.rand(heads, length, generator=gen) * 5
    visual = torch.zeros(length, dtype=torch.bool)
    visual[2:14] = True  # 4 text rows before the recent window: no more than hh (the official count then agrees)
    # official hh_ratio = recent_ratio = 0.2 on 20 rows: hh = recent = 4; here kv_budget 0.4, recent_share 0.5
    k, v, _ = compressor_for(LookMConfig(kv_budget=0.4)).prefill(keys, values, scores, visual)
    k_ref, v_ref = _official_text_pivot(keys, values, scores, visual, 4, 4)
    torch.testing.assert_close(k, k_ref)
    torch.testing.assert_close(v, v_ref)


def test_lookm_caps_text_at_the_budget():
    """More text than ``hh``: the official mask keeps all of it; here the top-``hh`` text rows (the budget holds)."""
    keys, values = torch.randn(1, 10, 4), torch.randn(1, 10, 4)
    scores = torch.arange(10.0)[None]
    visual = torch.zeros(10, dtype=torch.bool)
    k, _, _ = compressor_for(LookMConfig(kv_budget=0.4, merge="none")).prefill(keys, values, scores, visual)
    torch.testing.assert_close(k[0], keys[0, [6, 7, 8, 9]])  # recent 8, 9; hh 2 by score: 6, 7


def test_elastic_cache_by_hand():
    keys = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    values = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(1))
    scores = torch.tensor([9.0, 1.0, 5.0, 2.0, 7.0, 0.5, 3.0, 4.0])
    method = compressor_for(ElasticCacheConfig(kv_budget=0.5, start_size=1, distance=-2))
    k, v, fixed = method.prefill(keys, values, scores, torch.zeros(8, dtype=torch.bool))
    # k = 4: sink 0, last 7, the top 2 of rows 1..6 by importance: 4 (7.0), 2 (5.0); evicted 1, 3, 5, 6 merge into
    # the nearest kept row among 2, 4 (3 is as near to both: the first, 2)
    for x, out in ((keys, k), (values, v)):
        expected = torch.stack([x[:, 0], x[:, [2, 1, 3]].mean(1), x[:, [4, 5, 6]].mean(1), x[:, 7]], dim=1)
        torch.testing.assert_close(out, expected)
    assert fixed == 2  # 4 kept rows, distance -2
    # decode: evict at the fixed index whenever the cache holds more than the budget of the rows seen
    assert method.evict(fixed, seen=9, length=5) is None  # keep(9) = 5
    assert method.evict(fixed, seen=10, length=6) == 2  # keep(10) = 5
    nomerge = compressor_for(ElasticCacheConfig(kv_budget=0.5, merge=False))
    k, _, fixed = nomerge.prefill(keys, values, scores, torch.zeros(8, dtype=torch.bool))
    torch.testing.assert_close(k, keys[:, [0, 2, 4, 7]])
    assert fixed == 1  # -25 reaches before the cache: clamped after the sinks


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"kv_budget": 0.0}, ValueError),
        ({"kv_budget": 1.5}, ValueError),
        ({"kv_budget": "0.2"}, TypeError),
        ({"merge": "max"}, ValueError),
        ({"recent_share": 2.0}, ValueError),
        ({"text_prior": 1}, TypeError),
    ],
)
def test_lookm_bad_options(kwargs, error):
    with pytest.raises(error):
        LookMConfig(**kwargs)


def test_elastic_bad_options():
    with pytest.raises(ValueError):
        ElasticCacheConfig(start_size=-1)
    with pytest.raises(TypeError):
        ElasticCacheConfig(distance=2.5)
