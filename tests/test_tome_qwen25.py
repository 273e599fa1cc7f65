"""ToMe in Qwen2.5-VL's windowed tower (``vtc/adapters/qwen_windows.py``): windows are the merge segments, full
attention blocks join each image's windows (with every window's log-size bias), merges never cross a window, and
every window gets its grid back for the patch merger."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2_5_VLForConditionalGeneration

import vtc
from vtc.adapters.llm import rotate_half
from vtc.testing import FAMILIES

IMAGES = ((3, 4), (5, 2))  # grids 8 x 8 (four windows of 4 x 4 patches) and 4 x 8 (two windows)


def _model(depth=2, full=(1,), seed=0):
    config = copy.deepcopy(FAMILIES["qwen2_5_vl"].build(seed=0).config)
    config.vision_config.depth, config.vision_config.fullatt_block_indexes = depth, list(full)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def _compress(model, method="tome", **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ToMe alone: a tower speed-up
        vtc.compress(model, method, **options)


def _record(model, inputs, block):
    seen = {}

    def pre(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def post(module, args, kwargs, output):
        seen["y"] = output.detach().clone()

    handles = [
        model.model.visual.blocks[block].register_forward_pre_hook(pre, with_kwargs=True),
        model.model.visual.blocks[block].register_forward_hook(post, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_the_runner_reproduces_windowed_and_full_blocks_until_the_first_merge():
    model = _model(depth=3, full=(1,))
    inputs = FAMILIES["qwen2_5_vl"].inputs(model, IMAGES, seed=0)
    stock = _record(model, inputs, 2)["x"]
    _compress(model, budget=0.5, r=[0, 0, 4])  # a windowed and a full block in the runner, merging nothing
    mine = _record(model, inputs, 2)["x"]
    torch.testing.assert_close(mine, stock, atol=1e-5, rtol=0)
    states = vtc.session_of(model).adapter._merge.ctx.group_states
    assert [s.counts for s in states] == [[16, 16, 16, 12]]  # one state for the six 16-patch windows


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_merges_stay_within_windows_and_every_window_gets_its_grid_back(budget):
    model = _model()
    inputs = FAMILIES["qwen2_5_vl"].inputs(model, IMAGES, seed=0)
    seen = {}
    handle = model.model.visual.merger.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))
    _compress(model, budget=budget)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    ctx = vtc.session_of(model).adapter._merge.ctx
    assert ctx.qwen["images"] == [[0, 1, 2, 3], [4, 5]]
    windows = torch.split(seen["x"], 16)  # the merger gets the window order, every window's 16 patches back
    assert len(windows) == 6 and seen["x"].shape[0] == 96
    (state,) = ctx.group_states
    assert state.unmerged and state.counts[-1] == vtc.keep_count(budget, 16)
    rows = [{tuple(r.tolist()) for r in w} for w in windows]
    assert all(len(r) == vtc.keep_count(budget, 16) for r in rows)  # each window merged to its own budget
    assert all(not (rows[i] & rows[j]) for i in range(6) for j in range(i + 1, 6))  # no merge across windows


def _rope(x, cos, sin):
    cos, sin = cos[:, None].float(), sin[:, None].float()
    return x.float() * cos + rotate_half(x.float()) * sin


def test_a_full_block_attends_over_each_images_windows_with_their_log_sizes():
    model = _model(depth=3, full=(2,))
    inputs = FAMILIES["qwen2_5_vl"].inputs(model, IMAGES, seed=0)
    _compress(model, budget=0.5, r=[6, 0, 0])  # block 0 (windowed) merges; block 2 (full) attends with the bias
    ctx = vtc.session_of(model).adapter._merge.ctx
    block = model.model.visual.blocks[2]
    at_block = {}  # the merge map and sizes as block 2 starts (the last block then sorts the tokens)

    def snapshot(module, args, kwargs):
        (group,) = ctx.qwen["groups"]
        at_block.update(origin=group.state.origin.clone(), size=group.state.size.clone(), group=group)
        x = (args[0] if args else kwargs["hidden_states"]).view(6, 10, -1)  # six windows of 16 - 6, window order
        at_block["rope"] = group.rotary(ctx.qwen["rotary"], x)  # centroid RoPE (tested in test_tome_qwen.py)

    handle = block.register_forward_pre_hook(snapshot, with_kwargs=True)
    try:
        seen = _record(model, inputs, 2)
    finally:
        handle.remove()
    attn = block.attn
    heads = attn.num_heads
    x = seen["x"].view(6, 10, -1)
    cos, sin = at_block["rope"]
    size, origin = at_block["size"], at_block["origin"]
    expected = []
    for windows in ([0, 1, 2, 3], [4, 5]):  # by hand: each image's windows, one softmax over all of them
        xi = x[windows].flatten(0, 1)
        q, k, v = attn.qkv(block.norm1(xi)).view(xi.shape[0], 3, heads, -1).unbind(1)
        q, k = (
            _rope(q, cos[windows].flatten(0, 1), sin[windows].flatten(0, 1)),
            _rope(k, cos[windows].flatten(0, 1), sin[windows].flatten(0, 1)),
        )
        logits = torch.einsum("qhd,khd->hqk", q, k) * attn.scaling + size[windows].flatten().log()[None, None]
        out = torch.einsum("hqk,khd->qhd", F.softmax(logits, -1), v.float()).reshape(xi.shape[0], -1)
        yi = xi + attn.proj(out)
        yi = yi + block.mlp(block.norm2(yi))
        expected += list(yi.view(len(windows), 10, -1))
    expected = torch.stack(expected).gather(1, origin[..., None].expand(-1, -1, x.shape[-1]))  # grid back
    torch.testing.assert_close(seen["y"], expected.flatten(0, 1), atol=1e-5, rtol=1e-5)


def test_generate_runs_and_restore_is_exact():
    model = _model()
    inputs = FAMILIES["qwen2_5_vl"].inputs(model, IMAGES, seed=0)
    with torch.no_grad():
        ref = model(**inputs).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compress(model, budget=0.25)
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    vtc.restore(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, atol=0, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_video_frames_keep_their_own_windows_in_a_stack():
    from vtc.testing import qwen_video_inputs

    model = _model()
    inputs = qwen_video_inputs(model, IMAGES, seed=0)  # 2 and 3 temporal groups of 4 x 8 patches
    seen = {}
    handle = model.model.visual.merger.register_forward_pre_hook(lambda m, a: seen.update(x=a[0].detach().clone()))
    _compress(model, ["tome", "divprune"], budget=0.25)
    try:
        out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    ctx = vtc.session_of(model).adapter._merge.ctx
    assert ctx.qwen["images"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]  # two windows per frame, frame by frame
    rows = [{tuple(r.tolist()) for r in w} for w in torch.split(seen["x"], 16)]
    (state,) = ctx.group_states
    assert all(len(r) == state.counts[-1] < 16 for r in rows)
    assert all(not (rows[i] & rows[j]) for i in range(10) for j in range(i + 1, 10))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
