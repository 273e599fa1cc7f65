"""EVS: the selection is vLLM's ``compute_retention_mask`` (written here from its code) at vLLM's own count, on a
hand-made clip and on the tiny video models (OneVision, Qwen2-VL)."""

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.pruners.evs import evs_scores
from vtc.testing import VIDEO_FAMILIES


def vllm_mask(video_embeds, t, h, w, q, keep=None):
    """vLLM's retention mask (``spatial_merge_size=1``: tokens already merged), at its count or at ``keep``."""
    x = video_embeds.reshape(t, h, w, -1)
    dissim = 1 - F.cosine_similarity(x[1:], x[:-1], dim=-1)
    dissim = torch.cat([255 * torch.ones_like(x[:1, :, :, 0]), dissim], dim=0)
    order = torch.argsort(dissim.flatten(), descending=True, stable=True)
    keep = max(h * w, int(t * h * w * (1 - q))) if keep is None else keep
    mask = torch.zeros(t * h * w, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


def test_scores_hand_made():
    frames = torch.tensor([[[1.0, 0], [0, 1.0]], [[1.0, 0], [1.0, 0]], [[0, 1.0], [1.0, 0]]])  # [T=3, P=2, D=2]
    assert evs_scores(frames).tolist() == [[255.0, 255.0], [0.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_vl_video"])
def test_selection_equals_vllm_at_its_count(name):
    family = VIDEO_FAMILIES[name]
    model = family.build(seed=1)
    inputs = family.inputs(model, ((3, 4),), seed=2)
    with torch.no_grad():
        visual = {key: inputs[key] for key in family.image_keys}
        tokens = model.model.get_video_features(**visual).pooler_output[0]
    with vtc.compressed(model, "evs", budget=0.4):
        with torch.no_grad():
            model(**inputs)
        im = vtc.last_record(model).images[0]
    t = len(im.grids)
    h, w = im.grids[0]
    frame_tokens = [i for i, p in enumerate(im.partition) if p >= 0]
    kept = [i for i in im.kept if im.partition[i] >= 0]
    # vtc keeps exactly k (its budget arithmetic); vLLM's ordering at that count picks the same tokens
    expected = vllm_mask(tokens[frame_tokens].float(), t, h, w, q=0.6, keep=len(kept))
    assert sorted(frame_tokens[i] for i in torch.nonzero(expected).flatten().tolist()) == sorted(kept)
    assert abs(len(kept) - int(vllm_mask(tokens[frame_tokens].float(), t, h, w, q=0.6).sum())) <= 1
