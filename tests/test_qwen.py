"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL: kept tokens keep their M-RoPE positions; decoding continues at max + 1.
Qwen3-VL's DeepStack: in-LLM pruning before its last injection is refused; its video frames are separate blocks."""

import pytest
import torch

import vtc
from vtc.testing import qwen_inputs, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl

BUILDERS = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(request):
    return BUILDERS[request.param](seed=3)


def _rotary_positions(model):
    """Collect the position ids every call feeds the decoder's rotary embedding ([3, B, L])."""
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(
        lambda mod, args, out: seen.append(args[1].expand(3, -1, -1).clone())
    )
    return seen, hook


@pytest.mark.parametrize("images_per_sample", [1, 2])
@pytest.mark.parametrize("method", ["hired", "divprune", "visionzip", "fastv"])
def test_kept_tokens_keep_their_positions_and_decode_continues_at_max_plus_one(model, method, images_per_sample):
    inputs = qwen_inputs(model, ((3, 4), (5, 2)), images_per_sample=images_per_sample, padding_side="left", seed=1)
    seen, hook = _rotary_positions(model)
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        full, full_first_decode = seen[0], seen[1]
        seen.clear()
        with vtc.compressed(model, method, budget=0.25):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            rec = vtc.last_record(model)
    finally:
        hook.remove()
    prefill, first_decode, second_decode = seen[0], seen[1], seen[2]
    mask = inputs["attention_mask"]
    for b in range(mask.shape[0]):
        if method == "fastv":  # in-LLM: the decoder starts from the whole prompt; kept rows keep its rotary rows
            assert torch.equal(prefill, full)
        else:
            sources = rec.samples[b].source_positions
            rows = [r for r, s in enumerate(sources) if s >= 0]
            # every row with a single source token sits at that token's uncompressed (t, h, w) position
            assert torch.equal(prefill[:, b, rows], full[:, b, [sources[r] for r in rows]])
        full_max = int(full[:, b][:, mask[b].bool()].max())
        assert first_decode[:, b, -1].tolist() == [full_max + 1] * 3
        assert second_decode[:, b, -1].tolist() == [full_max + 2] * 3
        assert torch.equal(first_decode[:, b, -1], full_first_decode[:, b, -1])  # same as the uncompressed run
    assert all(im.counts["pre_llm"] < im.num_input or method == "fastv" for im in rec.images)


def test_mrope_forward_positions_match_the_full_prompt(model):
    inputs = qwen_inputs(model, ((3, 4),), images_per_sample=2, seed=2)
    seen, hook = _rotary_positions(model)
    try:
        with torch.no_grad():
            model(**inputs)
            with vtc.compressed(model, "random", budget=0.5):
                model(**inputs)
                rec = vtc.last_record(model)
    finally:
        hook.remove()
    full, short = seen[0][:, 0], seen[1][:, 0]
    sources = rec.samples[0].source_positions
    assert torch.equal(short, full[:, sources])  # pure selection: every row has its source
    assert torch.equal(torch.tensor(rec.samples[0].position_ids), short)


def test_window_permutation_is_undone_for_attention_signals():
    """Qwen2.5-VL runs its blocks in window order; signals must come back in the image's raster order."""
    from transformers.vision_utils import get_vision_window_index

    from vtc.adapters.llm import rotate_half

    model = tiny_qwen2_5_vl(seed=5)
    inputs = qwen_inputs(model, ((2, 2),), seed=0)  # an 8 x 8 patch grid: 4 windows of 2 x 2 LLM tokens
    block = model.model.visual.blocks[1]  # the last block: full attention, the "feature" layer
    seen = {}
    hook = block.attn.register_forward_pre_hook(
        lambda mod, args, kw: seen.update(x=args[0] if args else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True,
    )
    with vtc.compressed(model, "hired", budget=0.25):
        with torch.no_grad():
            model(**inputs)
        (im,) = vtc.last_record(model).images
    hook.remove()
    attn = block.attn
    q, k, _ = attn.qkv(seen["x"]).reshape(seen["x"].shape[0], 3, attn.num_heads, -1).unbind(1)
    cos, sin = (t.float().unsqueeze(-2) for t in seen["pe"])
    q, k = q.float() * cos + rotate_half(q.float()) * sin, k.float() * cos + rotate_half(k.float()) * sin
    received = torch.einsum("ihd,jhd->hij", q, k).mul(attn.scaling).softmax(-1).mean(1).sum(0)  # head-sum [T]
    vcfg = model.config.vision_config
    window_index, _ = get_vision_window_index(inputs["image_grid_thw"], 2, vcfg.window_size, vcfg.patch_size)
    natural = received.view(-1, 4)[torch.argsort(window_index)].mean(1)
    torch.testing.assert_close(torch.tensor(im.scores), natural, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("method", "options"), [("fastv", {}), ("pdrop", {}), ("fastv", {"layer": 1})])
def test_qwen3_in_llm_pruning_before_the_last_deepstack_injection_is_refused(method, options):
    model = tiny_qwen3_vl(seed=0, deepstack=(0, 1, 2))  # injections after layers 0, 1 and 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"DeepStack .* after layers 0-2; prune at layer 3 or later"):
        vtc.compress(model, method, budget=0.25, **options)
    assert vtc.session_of(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with vtc.compressed(model, "fastv", budget=0.25, layer=3):  # after the last injection: runs
        out = model(**qwen_inputs(model, ((3, 4),)))
        assert vtc.last_record(model).images[0].counts["llm_layer_3"] < vtc.last_record(model).images[0].num_input
    assert out.logits.isfinite().all()


@pytest.mark.parametrize("method", ["random", "holitom", "divprune"])
def test_qwen3_video_tokens_go_back_into_their_own_frame_block(method):
    """Every frame of a Qwen3-VL video is its own block behind a timestamp: its kept tokens return to that block;
    a frame that keeps none stays as an empty block (timestamp, start, end), and kept tokens keep their 3-D
    positions."""
    from vtc.testing import QWEN_VISION_END, QWEN_VISION_START, VIDEO_TOKEN, compressed_inputs, qwen3_video_inputs

    model = tiny_qwen3_vl(seed=1)
    empty_seen = False
    for seed in range(6):
        inputs = qwen3_video_inputs(model, ((3, 4),), seed=seed)
        t = int(inputs["video_grid_thw"][0, 0])
        options = {"seed": seed} if method == "random" else {}
        with vtc.compressed(model, method, budget=0.1 if method == "random" else 0.25, **options):
            short = compressed_inputs(model, inputs)
            with torch.no_grad():
                logits = model(**inputs).logits
            im = vtc.last_record(model).images[0]
        assert logits.isfinite().all()
        ids = short["input_ids"][0]
        starts = (ids == QWEN_VISION_START).nonzero().flatten().tolist()
        ends = (ids == QWEN_VISION_END).nonzero().flatten().tolist()
        assert len(starts) == len(ends) == t  # every frame keeps its block
        per_block = [int((ids[a:b] == VIDEO_TOKEN).sum()) for a, b in zip(starts, ends, strict=True)]
        # the tokens of block f are those whose anchor lies in frame f (a merged token: its anchor's frame)
        anchors = [im.partition[i] if i >= 0 else -1 for i in im.kept]
        assert per_block == [anchors.count(f) for f in range(t)]
        assert sum(per_block) == im.counts["pre_llm"]
        empty_seen |= 0 in per_block
        # the text between blocks (the timestamps) is unchanged
        full = inputs["input_ids"][0]
        assert torch.equal(ids[ids != VIDEO_TOKEN], full[full != VIDEO_TOKEN])
    if method == "random":
        assert empty_seen  # at 10 % of 16-32 tokens some frame keeps nothing
