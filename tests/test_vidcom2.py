"""VidCom2: scores, frame weights and per-frame selection follow the official code (written here from it), on a
hand-made clip and on the tiny OneVision video model; the per-frame counts are the official ones up to rounding."""

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.pruners.vidcom2 import frame_counts, frame_weights, gaussian_scores
from vtc.testing import VIDEO_FAMILIES


def reference(flat, tpf, base, counts=None):
    """The official ``vidcom2_compression`` (linear mapper): global kept indices and per-frame counts (or the
    official selection at the given per-frame ``counts``)."""
    var = flat.var(dim=0, unbiased=False)
    sel = flat[:, torch.topk(var, k=int(flat.shape[-1] * 0.5), largest=False).indices]
    frames = F.normalize(sel.view(-1, tpf, sel.shape[-1]), dim=-1)
    alphas = [2**k for k in range(-3, 2)]

    def gauss(c):
        d2 = ((frames - c) ** 2).sum(dim=-1)
        return sum(torch.exp(-d2 / (2 * a)) for a in alphas)

    v, f = gauss(frames.mean(dim=(0, 1), keepdim=True)), gauss(frames.mean(dim=1, keepdim=True))
    s = -v.mean(dim=-1)
    probs = F.softmax((s - s.max()) / 0.01, dim=0)
    scales = (base * (1 + probs - probs.mean())).clamp(max=1.0)
    ks = (scales * tpf).round().long().clamp(min=1).tolist() if counts is None else counts
    out = []
    for i, k in enumerate(ks):
        out.append(torch.topk((v + f)[i], k=k, largest=False).indices.sort().values + i * tpf)
    return torch.cat(out).tolist(), ks


def test_frame_counts_are_exact_and_capped():
    w = torch.tensor([1.5, 0.75, 0.75])
    assert frame_counts(w, 8, 4) == [4, 2, 2]
    assert frame_counts(w, 12, 4) == [4, 4, 4]
    assert frame_counts(w, 2, 4) == [1, 1, 0] and sum(frame_counts(w, 3, 4)) == 3


def test_hand_made_scores_use_the_low_variance_channels_and_pick_the_outlier():
    # channels 0-1 vary a lot (ignored: the official code keeps the lowest-variance half); on channels 2-3 every
    # token points along (1, 1) except token 5 of frame 1, along (1, -1): it gets the lowest combined score
    big = torch.tensor([[3.0, -2.0], [-1.0, 4.0], [2.0, 2.0], [-3.0, 1.0], [0.5, -4.0], [4.0, 3.0]])
    small = torch.tensor([[0.3, 0.3]] * 5 + [[0.3, -0.3]])
    frames = torch.cat([big, small], dim=-1).view(2, 3, 4)
    v, f = gaussian_scores(frames)
    assert int(torch.argmin((v + f).flatten())) == 5
    assert torch.allclose(v.flatten()[:5], v.flatten()[0].expand(5))  # the others are identical on channels 2-3


@pytest.mark.parametrize("seed", range(3))
def test_selection_equals_the_official_code_when_counts_agree(seed):
    family = VIDEO_FAMILIES["llava_onevision"]
    model = family.build(seed=seed)
    inputs = family.inputs(model, ((3, 4),), seed=seed)
    with torch.no_grad():
        tokens = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
    with vtc.compressed(model, "vidcom2", budget=0.5):
        with torch.no_grad():
            model(**inputs)
        im = vtc.last_record(model).images[0]
    frame_tokens = [i for i, p in enumerate(im.partition) if p >= 0]
    t, (h, w) = len(im.grids), im.grids[0]
    kept = sorted(i for i in im.kept if im.partition[i] >= 0)
    expected, ks = reference(tokens[frame_tokens].float(), h * w, base=len(kept) / len(frame_tokens))
    ours = [sum(1 for i in kept if im.partition[i] == f) for f in range(t)]
    assert all(abs(a - b) <= 1 for a, b in zip(ours, ks, strict=True))  # the official counts, up to rounding
    assert sum(ours) == len(kept) == vtc.keep_count(0.5, im.num_input)  # exact k (the newline is kept on top)
    expected, _ = reference(tokens[frame_tokens].float(), h * w, base=0.5, counts=ours)
    assert kept == [frame_tokens[i] for i in expected]  # at those counts, the official selection
    # the weights themselves are the official ones
    v, _ = gaussian_scores(tokens[frame_tokens].float().view(t, h * w, -1))
    assert frame_weights(v).sum().item() == pytest.approx(t)
