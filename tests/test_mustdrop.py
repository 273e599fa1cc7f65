"""MustDrop: the conditional pooling and the key set in the tower, the dual-attention filter, exact k, the families."""

import math

import pytest
import torch

import vtc
from vtc.budget import keep_count, stage_counts
from vtc.contexts import LayerTokens, TowerCall
from vtc.pruners.mustdrop import (
    MustDropConfig,
    MustDropPruner,
    MustDropState,
    dual_attention_filter,
    dual_attention_score,
    key_set,
    select_rows,
    window_groups,
    window_members,
    window_similarity,
)
from vtc.testing import llava_inputs, tiny_llava, tiny_llava_next

BATCH = ((3, 4), (6, 2))


def _grid_tokens() -> torch.Tensor:
    """A 6 x 6 grid (four 3 x 3 windows) whose window similarities are known by hand (features in 4-D).

    window 0 (rows 0-2, cols 0-2): nine multiples of e1                    -> similarity 1
    window 1 (rows 0-2, cols 3-5): eight multiples of e2, one u (cos 0.5)  -> (56 + 16 * 0.5) / 72 = 8 / 9
    window 2 (rows 3-5, cols 0-2): eight e3, one e1                        -> 56 / 72 = 7 / 9 (below 0.8)
    window 3 (rows 3-5, cols 3-5): five e4, four e1                        -> (20 + 12) / 72 = 4 / 9
    """
    e = torch.eye(4)
    u = 0.5 * e[1] + math.sqrt(3) / 2 * e[2]
    grid = torch.zeros(6, 6, 4)
    for i, (r, c) in enumerate((r, c) for r in range(3) for c in range(3)):
        grid[r, c] = (1 + i) * e[0]
        grid[r, 3 + c] = u if i == 8 else (2 + i) * e[1]
        grid[3 + r, c] = e[0] if i == 0 else e[2]
        grid[3 + r, 3 + c] = e[3] if i < 5 else e[0]
    return grid.reshape(36, 4)


def test_windows_tile_the_grid_row_major_and_leave_a_ragged_border():
    assert window_members(6, 6, 3).tolist() == [
        [0, 1, 2, 6, 7, 8, 12, 13, 14],
        [3, 4, 5, 9, 10, 11, 15, 16, 17],
        [18, 19, 20, 24, 25, 26, 30, 31, 32],
        [21, 22, 23, 27, 28, 29, 33, 34, 35],
    ]
    assert window_members(4, 4, 3).tolist() == [[0, 1, 2, 4, 5, 6, 8, 9, 10]]  # 3, 7, 11, 12-15 stay out
    assert window_members(4, 4, 2).shape == (4, 4)


def test_window_similarity_is_the_mean_over_distinct_pairs():
    sim = window_similarity(_grid_tokens()[None], window_members(6, 6, 3))
    torch.testing.assert_close(sim[0], torch.tensor([1.0, 8 / 9, 7 / 9, 4 / 9]))


def test_conditional_pooling_by_hand():
    """local_merge.py: the windows at or above 0.8 become their mean, most similar first, then the other tokens in
    index order, the CLS in front."""
    cls = torch.full((1, 4), 7.0)
    x = torch.cat([cls, _grid_tokens()])[None]  # [1, 37, 4]
    call = TowerCall(batch=1, tokens=37, prefix=1, blocks=3, n=36, k=9, num_blocks=4)
    state = MustDropState(call, (6, 6), 3, MustDropConfig())
    out = state.after_block(0, x)
    assert state.windows == 2 and out.shape == (1, 1 + 2 + 18, 4)
    grid = _grid_tokens()
    members = window_members(6, 6, 3)
    torch.testing.assert_close(out[0, 0], cls[0])
    torch.testing.assert_close(out[0, 1], grid[members[0]].mean(0))  # similarity 1 first
    torch.testing.assert_close(out[0, 2], grid[members[1]].mean(0))  # then 8 / 9
    torch.testing.assert_close(out[0, 3:], grid[18:])  # windows 2 and 3 unmerged: rows 3-5 in index order
    assert state.anchor[0].tolist() == [0, 1, 4, *range(19, 37)]
    assert state.origin[0, 1 + members[0]].tolist() == [1] * 9 and state.origin[0, 1 + members[1]].tolist() == [2] * 9
    assert state.origin[0, 19:].tolist() == list(range(3, 21))
    assert state.size[0, :3].tolist() == [1.0, 9.0, 9.0]
    assert state.attention_bias(torch.float32) is None  # no proportional attention (official)


def test_merged_windows_follow_the_batch_minimum_and_the_budget_cap():
    members = window_members(6, 6, 3)
    sim = torch.tensor([[0.9, 0.95, 0.1, 0.85], [0.2, 0.3, 0.99, 0.1]])
    groups, anchors, r = window_groups(sim, members, 37, 1, 0.8, max_windows=4)
    assert r == 1  # row 0 has three windows over 0.8, row 1 one: both merge one (official .min())
    assert anchors[:, 1].tolist() == [1 + 3, 1 + 18]  # each row its own best window (1, then 2)
    _, _, r = window_groups(sim[:1], members, 37, 1, 0.8, max_windows=2)
    assert r == 2  # the cap keeps at least k tokens for the LLM
    groups, anchors, r = window_groups(sim[:1], members, 37, 1, 0.8, max_windows=0)
    assert r == 0 and torch.equal(groups[0], torch.arange(37)) and torch.equal(anchors[0], torch.arange(37))


def test_key_set_is_the_top_cls_attention_after_the_merge():
    attn = torch.zeros(1, 2, 21, 21)
    attn[0, 0, 0, 1:] = torch.linspace(0.0, 1.0, 20)
    attn[0, 1, 0, 5] = 5.0  # head mean: row 5 (grid token 4) first, then the last rows
    rows = key_set(attn, prefix=1, ratio=0.08)
    assert rows.tolist() == [[4, 19]]  # ceil(0.08 * 20) = 2, ascending
    assert key_set(torch.rand(1, 2, 577, 577), 1, 0.08).shape == (1, 47)  # ceil(46.08): 47 of LLaVA's 576
    received = torch.zeros(1, 1, 4, 4)
    received[0, 0, :, 2] = 1.0
    assert key_set(received, prefix=0, ratio=0.25).tolist() == [[2]]  # no CLS: the attention received


def test_the_state_maps_the_key_set_onto_the_llm_tokens():
    x = torch.cat([torch.zeros(1, 4), _grid_tokens()])[None]
    call = TowerCall(batch=1, tokens=37, prefix=1, blocks=3, n=36, k=9, num_blocks=4)
    state = MustDropState(call, (6, 6), 3, MustDropConfig(key_ratio=0.1))
    x = state.after_block(0, x)
    assert not state.wants_metric(2) and state.wants_metric(3)
    attn = torch.zeros(1, 1, 21, 21)
    attn[0, 0, 0, [2, 5]] = 1.0  # the second merged window (anchor 3) and grid token 20
    state.merge(3, x, attn)
    assert state.key_anchors.tolist() == [[3, 20]]  # LLM token coordinates: CLS dropped ("default")


def test_dual_attention_filter_by_hand():
    attn = torch.tensor([[0.5, 0.0005, 0.0002, 0.1, 0.0001], [0.3, 0.0001, 0.0009, 0.05, 0.0001]])
    # sums 0.8, 0.0006, 0.0011, 0.15, 0.0002 of 0.9519 (x 0.001 = 0.0009519); maxima 0.5, 0.0005, 0.0009, 0.1, 0.0001
    keep = dual_attention_filter(attn, 0.001, 0.001)
    assert keep.tolist() == [True, False, True, True, False]  # token 2: its sum passes though its max does not
    score = dual_attention_score(attn, 0.001, 0.001)
    assert torch.equal(score >= 1, keep)
    torch.testing.assert_close(score[1], torch.tensor(0.0006 / 0.0009519), atol=1e-5, rtol=0)  # not 0.0005 / 0.001
    rand = torch.rand(6, 50) ** 4
    assert torch.equal(dual_attention_score(rand, 0.02, 0.1) >= 1, dual_attention_filter(rand, 0.02, 0.1))


def test_select_rows_keeps_the_key_set_then_the_best_scores():
    score = torch.tensor([5.0, 0.1, 3.0, 0.2, 4.0, 0.3])
    key = torch.tensor([False, True, False, False, False, True])
    assert select_rows(score, key, 4).tolist() == [0, 1, 4, 5]  # keys 1, 5, then scores 5.0, 4.0
    assert select_rows(score, key, 1).tolist() == [5]  # below the key set: its best
    assert select_rows(score, torch.zeros(6, dtype=torch.bool), 6).tolist() == list(range(6))


def _layer_tokens(probs, visual, text, layer, n_input, keys=None):
    seen = {}

    def attend(at, rows, heads=None):
        seen["layer"], seen["rows"] = at, [r.tolist() for r in rows]
        return [probs]

    ctx = LayerTokens(
        layer=layer,
        num_layers=32,
        hidden=torch.zeros(1, probs.shape[1], 8),
        visual=[visual],
        n_input=[n_input],
        last=torch.tensor([probs.shape[1] - 1]),
        text_after=[text],
        _attend=attend,
        n_original=[n_input],
        visual_image=[torch.zeros(visual.numel(), dtype=torch.long)],
        visual_token=[torch.arange(visual.numel())],
    )
    return ctx, seen


def test_prune_ranks_by_the_filter_and_cuts_to_the_stage_count():
    """Layer 3 (after official layer 2): 8 visual rows 1..8, text rows 9, 10; budget 4 of 8 -> stage 1 keeps 6."""
    vis = torch.arange(1, 9)
    probs = torch.zeros(11, 11)
    probs[9, 1:9] = torch.tensor([0.3, 0.0001, 0.0002, 0.2, 0.0004, 0.0003, 0.1, 0.00005])
    probs[10, 1:9] = torch.tensor([0.3, 0.0001, 0.0006, 0.05, 0.0001, 0.0007, 0.04, 0.00005])
    method = MustDropPruner(MustDropConfig(budget=4, tower_stage=False))
    assert method.llm_prune_layers(32) == (3, 7, 11, 15) and method.llm_score_layers(32) == (2, 6, 10, 14)
    ctx, seen = _layer_tokens(probs, vis, torch.tensor([9, 10]), 3, 8)
    kept = method.prune(ctx)[0]
    assert seen == {"layer": 2, "rows": [[9, 10]]}  # layer 2's attention, from every text row after the image
    assert stage_counts(4, 8, 4) == [6, 5, 4, 4]
    # sums 0.6, 0.0002, 0.0008, 0.25, 0.0005, 0.001, 0.14, 0.0001 of 0.9916; maxima below 0.001 except rows 1, 4, 7:
    # the filter keeps rows 1, 4, 6 (sum 0.001 >= 0.00099), 7; the schedule fills 6 with the best dropped scores,
    # rows 3 (0.0008 / 0.00099 = 0.81) and 5 (0.50), not 2 (0.20) or 8 (0.10)
    assert dual_attention_filter(probs[9:, 1:9], 0.001, 0.001).nonzero().flatten().add(1).tolist() == [1, 4, 6, 7]
    assert kept.tolist() == [1, 3, 4, 5, 6, 7]
    # at the last filter layer (15) the count is k = 4 whatever the thresholds keep
    ctx, _ = _layer_tokens(probs, vis, torch.tensor([9, 10]), 15, 8)
    assert method.prune(ctx)[0].tolist() == [1, 4, 6, 7]


def test_prune_always_keeps_the_key_set():
    vis = torch.arange(1, 9)
    probs = torch.zeros(11, 11)
    probs[9:, 1:9] = torch.linspace(1.0, 0.01, 8)
    method = MustDropPruner(MustDropConfig(budget=2))

    class Tower:  # what a tower call left: image 0's key set is its tokens 6 and 7 (the least attended)
        key_anchors = torch.tensor([[6, 7]])
        origin = torch.zeros(1, 9)

    method.tower = Tower()
    ctx, _ = _layer_tokens(probs, vis, torch.tensor([9, 10]), 15, 8)
    assert method.prune(ctx)[0].tolist() == [7, 8]
    ctx, _ = _layer_tokens(probs, vis, torch.tensor([9, 10]), 3, 8)
    assert method.prune(ctx)[0].tolist() == [1, 2, 3, 7, 8]  # 2 keys + the 3 best of stage count 5


def test_a_prompt_without_text_after_the_image_uses_its_last_token():
    probs = torch.zeros(6, 6)
    probs[5, 1:5] = torch.tensor([0.1, 0.4, 0.3, 0.2])
    method = MustDropPruner(MustDropConfig(budget=1, tower_stage=False))
    ctx, seen = _layer_tokens(probs, torch.arange(1, 5), torch.tensor([], dtype=torch.long), 15, 4)
    assert method.prune(ctx)[0].tolist() == [2] and seen["rows"] == [[5]]


def test_layers_scale_with_depth():
    method = MustDropPruner(MustDropConfig())
    assert method.filter_layers(32) == (2, 6, 10, 14)
    assert method.filter_layers(28) == (2, 5, 9, 12)
    assert method.filter_layers(4) == (0, 1, 2)
    with pytest.raises(ValueError, match="must leave a layer after the last one"):
        MustDropPruner(MustDropConfig(layers=(1, 3))).filter_layers(4)
    n = 576
    schedule = MustDropPruner(MustDropConfig(budget=64)).visual_schedule(32, n)
    assert schedule[:3] == [n] * 3 and schedule[3:7] == [stage_counts(64, n, 4)[0]] * 4 and schedule[15:] == [64] * 17


@pytest.mark.parametrize(
    "options, exc",
    [
        ({"merge_thr": 1.5}, ValueError),
        ({"window": 1}, ValueError),
        ({"key_ratio": -0.1}, ValueError),
        ({"key_layer": 0}, ValueError),
        ({"key_layer": 1.5}, TypeError),
        ({"global_thr": 0.0}, ValueError),
        ({"individual_thr": -1}, ValueError),
        ({"layers": (6, 2)}, ValueError),
        ({"layers": ()}, ValueError),
        ({"tower_stage": "no"}, TypeError),
    ],
)
def test_bad_options(options, exc):
    with pytest.raises(exc):
        MustDropConfig(**options)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=0, image_size=48)  # a 6 x 6 grid: four 3 x 3 windows


@pytest.mark.parametrize("budget", [0.25, 5])
def test_exact_final_k_with_the_tower_merging(model, budget):
    inputs = llava_inputs(model, BATCH, padding_side="left")
    with vtc.compressed(model, "mustdrop", budget=budget, merge_thr=-1.0, key_ratio=0.3):
        with torch.no_grad():
            model(**inputs)
        rec = vtc.last_record(model)
        state = vtc.session_of(model).method.tower
    k = keep_count(budget, 36)
    windows = (36 - k) // 8  # every window is similar enough; the cap keeps k
    assert state.windows == windows
    for im in rec.images:
        m = 36 - 8 * windows
        assert im.counts["pre_llm"] == m
        assert [im.counts[f"llm_layer_{x}"] for x in (1, 2, 3)] == stage_counts(k, m, 3)
        assert vtc.get_method("mustdrop").budget_counts == "last_stage"
        keys = set(state.key_anchors[im.image].tolist())
        assert len(keys) == math.ceil(0.3 * m)
        assert keys <= set(im.layers["3"])  # the key set survives every filter layer
        merged = [g for g in set(im.groups) if im.groups.count(g) == 9]
        assert len(merged) == windows


def test_full_budget_is_the_untouched_model_and_restore_is_exact(model):
    inputs = llava_inputs(model, BATCH, padding_side="left")
    with torch.no_grad():
        ref = model(**inputs).logits
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vtc.compressed(model, "mustdrop", budget=1.0, merge_thr=-1.0):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen)
    vtc.compress(model, "mustdrop", budget=0.25, merge_thr=-1.0)
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] < ref.shape[1]
    vtc.restore(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    assert not vtc.is_compressed(model)


def test_families_with_full_grids_refuse_the_tower_stage_and_take_the_llm_stages():
    m = tiny_llava_next(seed=0)
    with pytest.raises(ValueError, match=r"tower_stage=False"):
        vtc.compress(m, "mustdrop", budget=0.25)
    assert not vtc.is_compressed(m)
    assert vtc.get_method("mustdrop").to_dict()["families"] == ["llava"]
    from vtc.testing import FAMILIES

    family = FAMILIES["qwen2_vl"]
    q = family.build(seed=0)
    with pytest.raises(ValueError, match=r"packs full grids.*tower_stage=False"):
        vtc.compress(q, "mustdrop", budget=0.25)
    inputs = family.inputs(q, BATCH, padding_side="left")
    with vtc.compressed(q, "mustdrop", budget=0.25, tower_stage=False):
        with torch.no_grad():
            q(**inputs)
        rec = vtc.last_record(q)
    for im in rec.images:
        assert im.counts["pre_llm"] == im.num_input
        assert list(im.counts.values())[-1] == keep_count(0.25, im.num_input)


def test_batch_equals_each_sample_alone_with_the_tower_merging(model):
    """Every window passes merge_thr=-1, so each image merges the same windows alone or in a batch."""
    batch = llava_inputs(model, BATCH, padding_side="right", seed=3)
    with vtc.compressed(model, "mustdrop", budget=0.25, merge_thr=-1.0):
        with torch.no_grad():
            together = model(**batch).logits
        for b in range(len(BATCH)):
            keep = batch["attention_mask"][b].bool()
            single = {k: batch[k][b : b + 1, keep] for k in ("input_ids", "attention_mask")}
            single["pixel_values"] = batch["pixel_values"][b : b + 1]
            with torch.no_grad():
                alone = model(**single).logits[0]
            torch.testing.assert_close(together[b, : alone.shape[0]], alone, atol=1e-5, rtol=0)


def test_sdpa_and_eager_merge_and_keep_the_same_tokens():
    kept = {}
    for impl in ("sdpa", "eager"):
        m = tiny_llava(seed=0, image_size=48, attn_implementation=impl)
        inputs = llava_inputs(m, BATCH, padding_side="left")
        with vtc.compressed(m, "mustdrop", budget=0.25, merge_thr=-1.0, key_ratio=0.3):
            with torch.no_grad():
                m(**inputs)
            kept[impl] = [(im.groups, im.layers) for im in vtc.last_record(m).images]
    assert kept["sdpa"] == kept["eager"]
