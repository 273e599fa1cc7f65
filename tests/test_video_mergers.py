"""HoliTom, DyCoke and FastVID: the algorithms by hand and through the tiny video models."""

import itertools

import pytest
import torch

import vtc
from vtc.mergers._video import beta_merge, dpc_knn
from vtc.mergers.dycoke import ttm_plan
from vtc.mergers.fastvid import anchor_frames, dyseg
from vtc.mergers.holitom import pairwise_average, segment, window_gain
from vtc.testing import VIDEO_FAMILIES, llava_video_inputs, tiny_llava_onevision


def test_holitom_dp_worked_example():
    pairs = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    windows, reduced = segment(pairs)
    assert windows == [(0, 2), (3, 5)] and reduced == 10  # worked by hand: windows 0-2 and 3-5


def _brute_force(pairs):
    """Best total gain over every partition of the frames into contiguous windows."""
    t = pairs.shape[0] + 1
    gain = window_gain(pairs)
    best = 0
    for cuts in itertools.product([0, 1], repeat=t - 1):
        start, total = 0, 0
        for i in range(t):
            if i == t - 1 or cuts[i]:
                total += int(gain[start, i]) if i > start else 0
                start = i + 1
        best = max(best, total)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_holitom_dp_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    t = int(torch.randint(2, 9, (1,), generator=g))
    p = int(torch.randint(1, 6, (1,), generator=g))
    pairs = torch.rand(t - 1, p, generator=g) < 0.7
    windows, reduced = segment(pairs)
    assert reduced == _brute_force(pairs)
    assert windows[0][0] == 0 and windows[-1][1] == t - 1
    assert all(b[0] == a[1] + 1 for a, b in zip(windows, windows[1:], strict=False))  # a partition of the frames
    assert reduced == sum(int(window_gain(pairs)[s, e]) for s, e in windows if e > s)


def test_pairwise_average_closed_form_equals_the_sequential_loop():
    g = torch.Generator().manual_seed(0)
    dst, members = torch.randn(5, generator=g), torch.randn(4, 5, generator=g)
    expect = dst.clone()
    for m in members:
        expect = (expect + m) / 2
    torch.testing.assert_close(pairwise_average(dst, members), expect)


def test_dpc_knn_finds_one_centre_per_blob_and_beta_merge():
    g = torch.Generator().manual_seed(1)
    blobs = torch.cat([torch.randn(6, 3, generator=g) * 0.05 + c for c in (0.0, 5.0, -5.0)])
    centres, assign, _ = dpc_knn(blobs, 3, 3)
    assert sorted(int(c) // 6 for c in centres) == [0, 1, 2]
    assert all(assign[i] == assign[(i // 6) * 6] for i in range(18))  # each blob is one cluster
    merged = beta_merge(blobs, centres, assign, 0.6)
    for r, c in enumerate(centres.tolist()):
        members = [i for i in range(18) if assign[i] == r and i != c]
        torch.testing.assert_close(merged[r], 0.6 * blobs[c] + 0.4 * blobs[members].mean(0))


def test_holitom_static_tokens_are_window_means_and_budget_is_exact():
    model = tiny_llava_onevision(seed=0)
    inputs = llava_video_inputs(model, ((3, 4),), frames=6, seed=2)
    n = 6 * 9 + 1
    with vtc.compressed(model, "holitom", budget=0.7, tau=-1.0, inner=False):  # tau=-1: everything static
        short = vtc.testing.compressed_inputs(model, inputs)
        rec = vtc.last_record(model)
    (im,) = rec.images
    k = vtc.keep_count(0.7, n)
    assert im.counts["pre_llm"] == k + 1  # + the video's separator, kept at the end
    # with every position static, one window covers all frames: removing up to 5 copies per position is
    # capped so k tokens remain, and every output row stands for whole groups of the input
    assert sum(1 for g in im.groups if g >= 0) == n
    feats = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
    out = short["mm_encoder_outputs"]["video"].pooler_output[0]
    assert torch.equal(out[-1], feats[-1])  # the separator itself
    groups = torch.tensor(im.groups)
    for row in range(len(im.kept) - 1):
        members = torch.nonzero(groups == row).flatten()
        if len(members) > 1 and len({int(m) % 9 for m in members}) == 1:  # one position over frames, unclustered
            torch.testing.assert_close(out[row], feats[members].mean(0), atol=1e-5, rtol=1e-5)


def test_holitom_inner_stage_halves_the_visual_tokens_of_deep_layers():
    model = tiny_llava_onevision(seed=0)
    inputs = llava_video_inputs(model, ((3, 4),), frames=4, seed=2)
    with vtc.compressed(model, "holitom", budget=0.5, inner_layer=2):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        rec = vtc.last_record(model)
    (im,) = rec.images
    assert im.counts["llm_layer_2"] == round(im.counts["pre_llm"] * 0.5)
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    assert lengths[0] == lengths[1] and lengths[2] == lengths[3] == lengths[0] - (
        im.counts["pre_llm"] - im.counts["llm_layer_2"]
    )


def test_dycoke_plan_and_selection_by_hand():
    assert ttm_plan(8) == ([0, 4], [(1, 0), (2, 0), (3, 2), (5, 4), (6, 4), (7, 6)])
    assert ttm_plan(5) == ([0, 4], [(1, 0), (2, 0), (3, 2)])
    model = tiny_llava_onevision(seed=0)
    inputs = llava_video_inputs(model, ((3, 4),), frames=4, seed=3)
    with vtc.compressed(model, "dycoke", budget=0.5):
        short = vtc.testing.compressed_inputs(model, inputs)
        (im,) = vtc.last_record(model).images
    feats = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
    frame = lambda t: feats[t * 9 : (t + 1) * 9]  # noqa: E731
    k = vtc.keep_count(0.5, 37)  # 19 = 9 (frame 0 whole) + 10 over frames 1, 2, 3 (4, 3, 3)
    assert im.kept[:9] == list(range(9))
    sim = torch.nn.functional.cosine_similarity(frame(1), frame(0), dim=-1)
    assert im.kept[9:13] == (9 + torch.sort(sim, stable=True).indices[:4]).tolist()  # least similar first
    assert im.counts["pre_llm"] == k + 1 and im.kept[-1] == 36  # the separator
    assert short["input_ids"].shape[1] == inputs["input_ids"].shape[1] - (37 - k - 1)


def test_dycoke_refuses_a_budget_below_its_floor():
    model = tiny_llava_onevision(seed=0)
    inputs = llava_video_inputs(model, ((3, 4),), frames=4, seed=3)
    with vtc.compressed(model, "dycoke", budget=0.1):
        with pytest.raises(ValueError, match="budget >= 0.2"):
            model(**inputs)


def test_dycoke_decode_time_selection_masks_the_other_visual_rows():
    model = tiny_llava_onevision(seed=0)
    inputs = llava_video_inputs(model, ((3, 4),), frames=4, seed=3)
    seen = []
    with vtc.compressed(model, "dycoke", budget=0.5, kv_prune=0.5, kv_layer=2):
        hook = model.model.language_model.layers[2].register_forward_pre_hook(  # runs after vtc's own
            lambda mod, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True
        )
        try:
            with_kv = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        finally:
            hook.remove()
        call = vtc.session_of(model).adapter.llm.call
        keep = call.method_state["keep"]
    with vtc.compressed(model, "dycoke", budget=0.5):
        without = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    n_visual = 20  # 19 kept + the separator
    assert [len(k) for k in keep] == [int(n_visual * 0.5)]
    decode_masks = [m for m in seen[1:5] if m is not None]
    assert decode_masks, "decode steps at layer >= kv_layer must get an explicit mask"
    visible = decode_masks[0][0, 0, -1]  # the new token's row
    visual_cols = torch.nonzero(call.plan.visual[0]).flatten()
    allowed = visible[visual_cols] if visible.dtype == torch.bool else visible[visual_cols] == 0
    assert int(allowed.sum()) == len(keep[0])
    assert with_kv.shape == without.shape  # both generate; tokens may differ (fewer visual keys after layer 2)


def test_fastvid_segments_anchors_and_exact_budget():
    g = torch.tensor([[1.0, 0], [1, 0.01], [0, 1], [0, 1], [1, 1]])
    assert dyseg(g, segments=2, tau=0.9) == [(0, 1), (2, 3), (4, 4)]
    assert dyseg(g, segments=1, tau=-1.0) == [(0, 4)]
    assert anchor_frames(0, 7, 4) == [3, 7] and anchor_frames(2, 2, 4) == [2]
    model = tiny_llava_onevision(seed=0)
    inputs = llava_video_inputs(model, ((3, 4),), frames=8, seed=5)
    with vtc.compressed(model, "fastvid", budget=0.3):
        with torch.no_grad():
            model(**inputs)
        rec = vtc.last_record(model)
    (im,) = rec.images
    k = vtc.keep_count(0.3, 8 * 9 + 1)
    assert im.counts["pre_llm"] == k + 1
    assert im.kept[:-1] == sorted(im.kept[:-1])  # original order, separator last
    assert rec.positions == "original"
    assert sum(1 for g in im.groups if g >= 0) >= k  # anchors absorbed other tokens


@pytest.mark.parametrize("name", sorted(VIDEO_FAMILIES))
@pytest.mark.parametrize("method", ["holitom", "dycoke", "fastvid"])
def test_video_mergers_record_per_frame_counts(name, method):
    family = VIDEO_FAMILIES[name]
    model = family.build(seed=0)
    inputs = family.inputs(model, ((3, 4),), seed=1)
    with vtc.compressed(model, method, budget=0.5):
        with torch.no_grad():
            model(**inputs)
        (im,) = vtc.last_record(model).images
    per_frame = [0] * len(im.grids)
    for token, group in enumerate(im.groups):
        if group >= 0 and im.partition[token] >= 0:
            per_frame[im.partition[token]] += 1
    assert im.modality == "video" and len(im.grids) >= 2
    assert sum(per_frame) <= sum(r * c for r, c in im.grids)


def test_fastvid_anchor_plan_keeps_the_segment_budget_when_anchor_frames_are_full():
    from vtc.mergers.fastvid import anchor_plan

    # 4-frame segment, one anchor frame (3) holding 11 rest tokens, 12 slots needed: one goes to frame 2
    assert anchor_plan([3], (0, 3), 12, {0: 11, 1: 11, 2: 11, 3: 11}) == [(2, 1), (3, 11)]
    assert anchor_plan([3, 7], (0, 7), 10, dict.fromkeys(range(8), 11)) == [(3, 5), (7, 5)]
    # both anchor frames full: the 2 left go to the nearest other frame (ties: the later one)
    assert anchor_plan([3, 7], (0, 7), 24, dict.fromkeys(range(8), 11)) == [(3, 11), (6, 2), (7, 11)]


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.6, 0.8])
def test_fastvid_budget_is_exact_on_long_segments(budget):
    """One 16-frame segment (4 anchor frames) whose contextual slots outnumber the anchor frames' rest tokens
    (as on the offline video model at budget 0.5): still exactly k tokens."""
    model = tiny_llava_onevision(seed=0)
    inputs = llava_video_inputs(model, ((3, 4),), frames=16, seed=5)
    with vtc.compressed(model, "fastvid", budget=budget, segments=1, tau=-1.0):
        with torch.no_grad():
            model(**inputs)
        (im,) = vtc.last_record(model).images
    assert im.counts["pre_llm"] == vtc.keep_count(budget, 16 * 9 + 1) + 1


def test_dpc_knn_in_row_blocks_equals_one_block():
    """Past 2**22 distances DPC-kNN works on blocks of rows (no N x N buffer): same centres and assignment."""
    import vtc.mergers._video as video

    gen = torch.Generator().manual_seed(3)
    y = torch.cat([torch.randn(40, 6, generator=gen) + 4 * torch.randn(1, 6, generator=gen) for _ in range(5)])
    whole = dpc_knn(y, 7, 5)
    chunk, video._CHUNK = video._CHUNK, 200 * 9  # nine rows at a time
    try:
        blocks = dpc_knn(y, 7, 5)
    finally:
        video._CHUNK = chunk
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])
    torch.testing.assert_close(whole[2], blocks[2], rtol=1e-5, atol=1e-6)
