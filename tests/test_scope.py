"""SCOPE: the selection follows the official batched loop (written here from its code), on a hand-made example, on
random inputs, and end to end on a tiny LLaVA whose CLS attention and features are recomputed by hand."""

import pytest
import torch

import vtc
from vtc.pruners.scope import scope_select
from vtc.testing import llava_inputs, tiny_llava


def reference(features, cls_attn, k, alpha=1.0):
    """The official ``SCOPE`` for one image (B = 1), multiplicative combination."""
    x = features / features.norm(dim=-1, keepdim=True)
    sim = x @ x.T
    n = x.shape[0]
    selected = torch.zeros(n, dtype=torch.bool)
    cur_max = torch.zeros(n)
    weight = cls_attn**alpha
    picks = []
    for _ in range(k):
        gains = torch.maximum(torch.zeros(1), sim.masked_fill(~(~selected)[None, :], 0) - cur_max[:, None]).sum(0)
        gains = (gains * weight).masked_fill(selected, float("-inf"))
        best = int(gains.argmax())
        selected[best] = True
        picks.append(best)
        cur_max = torch.maximum(cur_max, sim[best])
    return picks


def test_hand_made_example():
    # two clusters: {0, 1, 2} around e1 and {3, 4} around e2; saliency prefers token 1 in the first, 4 in the second
    features = torch.tensor([[1.0, 0.1], [1.0, 0.0], [1.0, -0.1], [0.1, 1.0], [0.0, 1.0]])
    saliency = torch.tensor([0.1, 0.5, 0.1, 0.1, 0.3])
    # first pick: token 1 (covers its cluster best, highest saliency); second: the other cluster's salient token 4
    assert scope_select(features, saliency, 2).tolist() == [1, 4]
    assert scope_select(features, saliency, 2).tolist() == reference(features, saliency, 2)


@pytest.mark.parametrize("seed", range(5))
def test_selection_equals_the_official_loop_on_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    features, saliency = torch.randn(50, 16, generator=gen), torch.rand(50, generator=gen)
    for k in (3, 12, 25):
        assert scope_select(features, saliency, k).tolist() == reference(features, saliency, k)


def test_end_to_end_cls_attention_and_features_recomputed_by_hand():
    model = tiny_llava(seed=6)
    inputs = llava_inputs(model, ((2, 3),), seed=4)
    with vtc.compressed(model, "scope", budget=0.5):
        with torch.no_grad():
            model(**inputs)
        im = vtc.last_record(model).images[0]
        block = vtc.session_of(model).adapter.feature_block
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    finally:
        tower.set_attn_implementation("sdpa")
    cls_attn = out.attentions[block][0, :, 0, 1:].sum(0)  # heads summed (official)
    features = out.hidden_states[block + 1][0, 1:]
    expected = reference(features, cls_attn, vtc.keep_count(0.5, cls_attn.numel()))
    assert sorted(im.kept) == sorted(expected)


@pytest.mark.parametrize("seed", range(3))
def test_lazy_greedy_equals_the_official_loop_on_larger_clustered_inputs(seed):
    """Many near-duplicates (so later gains fall a lot and stale bounds matter) and the first-pass chunks split
    the candidates: the picks stay the official ones, all k of them."""
    import vtc.pruners.scope as scope

    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, 8, generator=gen)
    features = centres[torch.randint(0, 12, (400,), generator=gen)] + 0.05 * torch.randn(400, 8, generator=gen)
    saliency = torch.rand(400, generator=gen)
    chunk, scope._CHUNK = scope._CHUNK, 400 * 7  # 7 candidates per first-pass chunk
    try:
        assert scope_select(features, saliency, 60).tolist() == reference(features, saliency, 60)
    finally:
        scope._CHUNK = chunk
