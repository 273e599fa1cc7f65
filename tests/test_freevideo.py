"""Free Video-LLM: the official slow pathway (prompt-selected frames, RoI crop around the most prompt-similar tokens,
written here from the official ``text_guided_frames`` / ``roi_crop`` / ``roi_box``) on hand-made clips and on the
tiny video models; exact ``k`` and the documented frame / RoI split on any input."""

import math

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.contexts import ImageTokens, Layout
from vtc.pruners.freevideo import FreeVideoConfig, FreeVideoPruner, fitted_shape, roi_shape
from vtc.testing import IMAGE_TOKEN, VIDEO_FAMILIES, VIDEO_TOKEN


def clip(frames, text):
    """An :class:`ImageTokens` of a video ``frames [T, R, C, D]`` whose prompt text embeds are ``text [m, D]``."""
    t, r, c, d = frames.shape
    p = r * c
    layout = Layout(((r, c),) * t, 0, torch.arange(t).repeat_interleave(p), torch.arange(p).repeat(t))
    return ImageTokens(tokens=frames.reshape(t * p, d), layout=layout, k=t * p, text_embeds=text, modality="video")


def run(frames, text, k, roi_ratio=0.8):
    image = clip(frames, text)
    image.k = k
    return FreeVideoPruner(FreeVideoConfig(budget=0.5, roi_ratio=roi_ratio)).reduce(image).index.tolist()


def official_slow_path(frames, text, n_frames, ratio):
    """The official slow pathway at ``n_frames`` frames (``text_guided_frames`` then ``roi_crop``), with vtc's
    features: a frame is the mean of its tokens, the prompt the mean of its normalised embeddings."""
    t, r, c, d = frames.shape
    prompt = F.normalize(text.float(), dim=-1).mean(dim=0)
    cos = F.cosine_similarity(frames.mean(dim=(1, 2)), prompt[None], dim=-1)
    chosen = torch.sort(cos).indices[-n_frames:].sort().values.tolist()
    tok = F.cosine_similarity(frames[chosen].reshape(n_frames, r * c, d), prompt, dim=-1)
    top = torch.topk(tok, int(r * c * ratio), dim=1).indices
    xs, ys = (top % c).float().mean(-1).to(torch.int32), (top // c).float().mean(-1).to(torch.int32)
    hn, wn = round(r * math.sqrt(ratio)), round(c * math.sqrt(ratio))
    kept = []
    for i, f in enumerate(chosen):
        left, right = int(xs[i]) - wn // 2, int(xs[i]) + wn - wn // 2
        up, down = int(ys[i]) - hn // 2, int(ys[i]) + hn - hn // 2
        if left < 0:
            left, right = 0, wn
        if right > c:
            left, right = c - wn, c
        if up < 0:
            up, down = 0, hn
        if down > r:
            up, down = r - hn, r
        kept += [f * r * c + y * c + x for y in range(up, down) for x in range(left, right)]
    return kept


def test_the_official_roi_sizes():
    assert roi_shape(12, 24, 0.8) == (11, 21)  # the official crop of its pooled frames: 231 tokens
    assert roi_shape(14, 14, 0.8) == (13, 13) and roi_shape(2, 4, 0.5) == (1, 3) and roi_shape(1, 5, 0.01) == (1, 1)
    assert fitted_shape(6, 6, 4) == (2, 2) and fitted_shape(6, 6, 7) == (3, 3) and fitted_shape(2, 9, 11) == (2, 6)
    assert fitted_shape(1, 7, 5) == (1, 5) and fitted_shape(6, 2, 11) == (6, 2)


def test_hand_made_clip_keeps_the_prompt_frame_and_its_object():
    # 5 frames of 6 x 6 tokens; the prompt points along e0; every background token is orthogonal to it; frame 3
    # holds a strong e0 object at rows 2-4, cols 3-5, frame 1 a weak one at rows 0-1, cols 0-1
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(5, 6, 6, 8, generator=g)
    frames[..., 0] = 0
    frames[3, 2:5, 3:6, 0] = 3.0
    frames[1, 0:2, 0:2, 0] = 1.0
    text = torch.zeros(2, 8)
    text[0, 0], text[1, 0] = 1.0, 5.0  # the scale of an embedding does not matter
    # roi_ratio 0.25: a 3 x 3 RoI centred on the mean of the 9 best tokens (the object): exactly the object
    obj = [3 * 36 + y * 6 + x for y in range(2, 5) for x in range(3, 6)]
    assert run(frames, text, 9, roi_ratio=0.25) == obj
    # four more tokens: the next frame by prompt similarity (frame 1), a 2 x 2 box on its best 4 (its object)
    assert run(frames, text, 13, roi_ratio=0.25) == [36, 37, 42, 43] + obj
    # another prompt, another frame: along e1, where frame 0 holds an object at rows 3-5, cols 0-2
    frames[..., 1] = 0
    frames[0, 3:6, 0:3, 1] = 2.0
    text = torch.zeros(1, 8)
    text[0, 1] = 1.0
    assert run(frames, text, 9, roi_ratio=0.25) == [y * 6 + x for y in range(3, 6) for x in range(0, 3)]


def _aligned(values):
    """Frames whose tokens have cosine ``v / sqrt(v^2 + 1)`` to the prompt ``e0``: ``values [T, R, C]`` along e0,
    a unit e1 for all."""
    frames = torch.zeros(*values.shape, 4)
    frames[..., 0], frames[..., 1] = values, 1.0
    return frames


def test_an_roi_at_the_edge_is_shifted_inside_the_frame():
    # 9 x 10 frame, roi_ratio 0.1: a 3 x 3 RoI centred on the 9 best tokens, the bottom row's first nine: centre
    # (8, 4), so the box would reach row 9; shifted up it is rows 6-8, cols 3-5
    values = torch.zeros(2, 9, 10)
    values[0, 8, :9] = 1.0
    text = torch.tensor([[1.0, 0, 0, 0]])
    assert run(_aligned(values), text, 9, roi_ratio=0.1) == [y * 10 + x for y in range(6, 9) for x in range(3, 6)]
    values = torch.zeros(2, 9, 10)
    values[1, :, 9] = 1.0  # the last column of frame 1: centre (4, 9), the box would reach col 10: cols 7-9
    want = [90 + y * 10 + x for y in range(3, 6) for x in range(7, 10)]
    assert run(_aligned(values), text, 9, roi_ratio=0.1) == want


def test_a_fitted_rois_extra_tokens_are_its_least_prompt_similar():
    # one 5 x 5 frame keeping 7 tokens: a fitted 3 x 3 box centred on the 7 best tokens (the peak at (2, 2), its
    # four neighbours and the two right-hand diagonals), less the box's two least similar tokens
    y, x = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    values = (10 - (y - 2) ** 2 - (x - 2) ** 2 + 0.01 * x - 0.001 * y)[None]
    kept = run(_aligned(values), torch.tensor([[1.0, 0, 0, 0]]), 7, roi_ratio=0.8)
    assert kept == sorted(r * 5 + c for r, c in [(2, 2), (1, 2), (3, 2), (2, 1), (2, 3), (1, 3), (3, 3)])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape, ratio", [((6, 7, 7), 0.8), ((5, 6, 9), 0.5), ((4, 12, 24), 0.8), ((3, 5, 5), 1.0)])
def test_the_official_slow_pathway_when_k_is_whole_rois(seed, shape, ratio):
    t, r, c = shape
    g = torch.Generator().manual_seed(seed)
    frames, text = torch.randn(t, r, c, 16, generator=g), torch.randn(5, 16, generator=g)
    h, w = roi_shape(r, c, ratio)
    for n in range(1, t + 1):
        assert run(frames, text, n * h * w, ratio) == official_slow_path(frames, text, n, ratio)


@pytest.mark.parametrize("shape, ratio", [((1, 4, 6), 0.8), ((3, 5, 5), 0.8), ((5, 4, 6), 0.3), ((4, 1, 7), 0.5)])
def test_exact_k_and_the_documented_split(shape, ratio):
    t, r, c = shape
    g = torch.Generator().manual_seed(sum(shape))
    frames, text = torch.randn(t, r, c, 8, generator=g), torch.randn(3, 8, generator=g)
    p = r * c
    h, w = roi_shape(r, c, ratio)
    box = h * w
    prompt = F.normalize(text, dim=-1).mean(0)
    ranking = torch.sort(F.cosine_similarity(frames.mean(dim=(1, 2)), prompt[None], dim=-1), descending=True)
    ranking = ranking.indices.tolist()
    for k in range(1, t * p + 1):
        kept = run(frames, text, k, ratio)
        assert len(kept) == k and kept == sorted(set(kept))  # exactly k, time then raster order
        per_frame = [[i % p for i in kept if i // p == f] for f in range(t)]
        counts = [len(x) for x in per_frame]
        if k <= t * box:  # the RoI in the best ceil(k / B) frames, the last of them the rest
            n = -(-k // box)
            assert [counts[f] for f in ranking] == [box] * (n - 1) + [k - (n - 1) * box] + [0] * (t - n)
        else:  # every frame, k spread evenly, the extra tokens to the best frames
            assert [counts[f] for f in ranking] == [k // t + (i < k % t) for i in range(t)]
        for cells in per_frame:
            if not cells:
                continue
            rows, cols = [i // c for i in cells], [i % c for i in cells]
            bh, bw = max(rows) - min(rows) + 1, max(cols) - min(cols) + 1
            if len(cells) == box:  # the official RoI: a whole h x w rectangle
                assert (bh, bw) == (h, w)
            elif len(cells) < p:  # a fitted box, less its least similar tokens
                fh, fw = fitted_shape(r, c, len(cells))
                assert bh <= fh and bw <= fw and fh * fw - len(cells) < max(fh, fw)


def test_without_prompt_text_frames_are_uniform_and_rois_centred():
    g = torch.Generator().manual_seed(3)
    frames = torch.randn(8, 5, 5, 8, generator=g)
    centre = [y * 5 + x for y in range(1, 4) for x in range(1, 4)]  # roi_ratio 0.36: 3 x 3, centred
    kept = run(frames, torch.zeros(0, 8), 18, roi_ratio=0.36)
    assert kept == centre + [4 * 25 + c for c in centre]  # frames 0 and 4: linspace(0, 8, 3)


@pytest.mark.parametrize("name", ["llava_onevision", "llava_next_video", "qwen2_vl_video"])
def test_tiny_models_keep_the_official_selection_for_their_prompt(name):
    family = VIDEO_FAMILIES[name]
    model = family.build(seed=1)
    for seed in range(3):
        inputs = family.inputs(model, ((3, 5),), seed=seed)
        with torch.no_grad():
            visual = {key: inputs[key] for key in family.image_keys}
            tokens = model.model.get_video_features(**visual).pooler_output[0]
            ids = inputs["input_ids"][0]
            after = ids[int(torch.nonzero(ids == VIDEO_TOKEN).max()) + 1 :]
            text = model.get_input_embeddings()(after)
        ratio = 0.5
        with vtc.compressed(model, "freevideo", budget=0.5, roi_ratio=ratio):  # the family's frame grid
            with torch.no_grad():
                model(**inputs)
            grids = vtc.last_record(model).images[0].grids
        (r, c), t = grids[0], len(grids)
        h, w = roi_shape(r, c, ratio)
        with vtc.compressed(model, "freevideo", budget=2 * h * w, roi_ratio=ratio):
            with torch.no_grad():
                model(**inputs)
            im = vtc.last_record(model).images[0]
        frame_tokens = [i for i, p in enumerate(im.partition) if p >= 0]
        kept = [i for i in im.kept if im.partition[i] >= 0]
        frames = tokens[frame_tokens].float().view(t, r, c, -1)
        assert kept == [frame_tokens[i] for i in official_slow_path(frames, text.float(), 2, ratio)]


def test_options_are_checked():
    assert FreeVideoConfig().roi_ratio == 0.8
    assert FreeVideoConfig.from_dict({"roi_ratio": 0.5}).roi_ratio == 0.5
    for bad in (0, 0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="roi_ratio"):
            FreeVideoConfig(roi_ratio=bad)
    for bad in ("0.8", True, None):
        with pytest.raises(TypeError, match="roi_ratio"):
            FreeVideoConfig(roi_ratio=bad)


def test_a_method_for_videos_that_reads_the_prompt():
    info = vtc.get_method("freevideo")
    assert info.method_class.modalities == ("video",) and info.method_class.reads_prompt
    family = VIDEO_FAMILIES["llava_onevision"]
    model = family.build(seed=0)
    picks = set()
    for seed in range(6):  # same video, different prompt text after it
        inputs = family.inputs(model, ((3, 6),), seed=0)
        g = torch.Generator().manual_seed(100 + seed)
        tail = inputs["input_ids"][0, -6:]
        inputs["input_ids"][0, -6:] = torch.randint(3, IMAGE_TOKEN, tail.shape, generator=g)
        with vtc.compressed(model, "freevideo", budget=0.2):
            with torch.no_grad():
                model(**inputs)
            picks.add(tuple(vtc.last_record(model).images[0].kept))
    assert len(picks) > 1
