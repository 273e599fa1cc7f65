"""ToMe in Qwen2-VL's vision tower (``vtc/adapters/qwen_tower.py``): packed segments of several sizes run as
batches, the runner's attention equals the stock blocks', merged tokens take the RoPE of their patches' centroid,
and every segment gets its grid back for the 2 x 2 patch merger; Qwen3-VL's DeepStack mergers get the grid of their
block while the tower goes on merged (Qwen2.5-VL's windows: tests/test_tome_qwen25.py)."""

import warnings

import pytest
import torch

import vtc
from vtc.adapters.qwen_tower import _Group
from vtc.mergers.gtp import coords_graph, spatial_graph
from vtc.testing import FAMILIES


def _inputs(model, seed=0):
    return FAMILIES["qwen2_vl"].inputs(model, ((3, 4), (5, 2)), seed=seed)  # two images of different sizes


def _block_input(model, block, inputs):
    seen = {}
    handle = model.model.visual.blocks[block].register_forward_pre_hook(
        lambda m, a, kw: seen.update(x=(a[0] if a else kw["hidden_states"]).detach().clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["x"]


def test_the_runner_reproduces_the_stock_blocks_until_the_first_merge():
    model = FAMILIES["qwen2_vl"].build(seed=0)
    inputs = _inputs(model)
    stock = _block_input(model, 1, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ToMe alone: a tower speed-up
        vtc.compress(model, "tome", budget=0.5, r=[0, 4])  # block 0 runs in the runner, merging nothing
    mine = _block_input(model, 1, inputs)
    torch.testing.assert_close(mine, stock, atol=1e-5, rtol=0)
    states = vtc.session_of(model).adapter._merge.ctx.group_states
    assert sorted(s.counts for s in states) == sorted([[32, 32, 28], [64, 64, 60]])  # r = 4 in block 1, per size


def test_a_merged_token_takes_the_rope_of_its_patches_centroid():
    model = FAMILIES["qwen2_vl"].build(seed=0)
    rotary = model.model.visual.rotary_pos_emb
    positions = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [2.0, 3.0]]])  # [1, 5, 2]

    class State:
        origin = torch.tensor([[0, 0, 1, 0, 2]])  # patches 0, 1, 3 form row 0; patch 2 row 1; patch 4 row 2

    cos, sin = _Group([0], State(), positions).rotary(rotary, torch.zeros(1, 3, 32))
    centres = torch.tensor([[1 / 3, 2 / 3], [1.0, 0.0], [2.0, 3.0]])  # mean (row, column) of each row's patches
    ref_cos, ref_sin = rotary(torch.zeros(1), centres)
    torch.testing.assert_close(cos[0], ref_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin[0], ref_sin, atol=0, rtol=0)
    # an unmerged patch keeps exactly the embedding the tower gives it
    own_cos, _ = rotary(torch.zeros(1), torch.tensor([[2, 3]]))
    assert torch.equal(cos[0, 2], own_cos[0])


@pytest.mark.parametrize(("budget", "seed"), [(0.5, 0), (0.25, 0), (0.25, 1)])
def test_each_segment_gets_its_grid_back_with_the_merged_rows_copied(budget, seed):
    model = FAMILIES["qwen2_vl"].build(seed=0)
    inputs = _inputs(model, seed=seed)  # seed 0: 64 and 32 patches (two sizes); seed 1: 4 x 8 and 8 x 4 (one size)
    seen = {}
    handle = model.model.visual.merger.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vtc.compress(model, "tome", budget=budget)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    grids = inputs["image_grid_thw"].prod(-1).tolist()  # patches per image
    pieces = torch.split(seen["x"], grids)
    for group in vtc.session_of(model).adapter._merge.ctx.qwen["groups"]:  # one merge state per segment size
        state = group.state
        for row, segment in enumerate(group.segments):
            n = grids[segment]
            assert state.unmerged and state.counts[0] == n and state.counts[-1] == vtc.keep_count(budget, n)
            groups = state.origin[row]
            assert groups.unique().numel() == vtc.keep_count(budget, n)
            for g in groups.unique():
                rows = pieces[segment][groups == g]
                assert torch.equal(rows, rows[:1].expand_as(rows))  # one merged token, copied to each of its patches
    assert torch.unique(seen["x"], dim=0).shape[0] == sum(vtc.keep_count(budget, n) for n in grids)


def test_the_coordinate_graph_is_the_raster_graph_in_any_order():
    rows, cols = 3, 4
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    order = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(0))
    mine = coords_graph(grid[order][None].float())[0]
    ref = spatial_graph(rows, cols)[order][:, order]
    assert torch.equal(mine, ref)


def test_qwen3_deepstack_mergers_get_their_blocks_grid_while_the_tower_goes_on_merged():
    model = FAMILIES["qwen3_vl"].build(seed=0)
    visual = model.model.visual
    level = visual.deepstack_visual_indexes[0]
    inputs = FAMILIES["qwen3_vl"].inputs(model, ((3, 4), (5, 2)), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vtc.compress(model, "tome", budget=0.25)
    ctx = vtc.session_of(model).adapter._merge.ctx
    seen = {}

    def after_block(module, args, output):  # the merged packed rows and each group's map at that moment
        seen["x"] = output.detach().clone()
        seen["origin"] = [g.state.origin.clone() for g in ctx.qwen["groups"]]
        seen["lengths"] = list(ctx.qwen["lengths"])

    def merger_input(module, args):
        seen["grid"] = args[0].detach().clone()

    handles = [
        visual.blocks[level].register_forward_hook(after_block),
        visual.deepstack_merger_list[0].register_forward_pre_hook(merger_input),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    grids = inputs["image_grid_thw"].prod(-1).tolist()
    assert seen["x"].shape[0] < sum(grids)  # the block's output is merged ...
    pieces = torch.split(seen["x"], seen["lengths"])
    expected = [None] * len(grids)
    for group, origin in zip(ctx.qwen["groups"], seen["origin"], strict=True):
        for row, segment in enumerate(group.segments):
            expected[segment] = pieces[segment][origin[row]]  # by hand: each patch takes its group's row
    torch.testing.assert_close(seen["grid"], torch.cat(expected), atol=0, rtol=0)  # ... the merger gets the grid
    assert seen["grid"].shape[0] == sum(grids)
    states = ctx.group_states
    assert all(not s.unmerged or s.counts[-1] < s.counts[0] for s in states)
    assert all(s.counts[-1] == vtc.keep_count(0.25, s.counts[0]) for s in states)  # and goes on merging after it


def test_qwen3_tome_generates_and_restores_exactly():
    model = FAMILIES["qwen3_vl"].build(seed=0)
    inputs = FAMILIES["qwen3_vl"].inputs(model, ((3, 4), (5, 2)), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**inputs).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vtc.compress(model, "tome", budget=0.5)
    with torch.no_grad():
        merged = model(**inputs).logits
    assert merged.shape == ref.shape and not torch.allclose(merged, ref)  # the grid is back; the content merged
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    vtc.restore(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, atol=0, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
