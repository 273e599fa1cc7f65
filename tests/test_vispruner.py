"""VisPruner: the selection follows the official loop (written here from its code) on a hand-made example, on random
inputs, and end to end on a tiny LLaVA whose CLS attention and features are recomputed by hand."""

import pytest
import torch

import vtc
from vtc.pruners.vispruner import vispruner_select
from vtc.testing import llava_inputs, tiny_llava


def reference(attention, features, k, ratio=0.5, per_round=8):
    """The official ``encode_images`` loop for one image (stable sorts)."""
    normed = features / features.norm(dim=-1, keepdim=True)
    important = int(k * ratio)
    diverse = k - important
    order = attention.argsort(descending=True, stable=True)
    kept, residual = order[:important], order[important:]
    while True:
        tokens = normed[residual]
        r = min(per_round, tokens.shape[0] - diverse)
        if r <= 0:
            break
        a, b = tokens[::2], tokens[1::2]
        scores = (a @ b.T).max(dim=-1).values
        distinct = scores.argsort(descending=True, stable=True)[r:]
        residual = torch.cat([residual[::2][distinct], residual[1::2]])
    return torch.cat([kept, residual]).sort().values.tolist()


def test_hand_made_example():
    # 6 tokens; attention ranks 0 first; k = 4: token 0 important, then 3 diverse among 1..5 (drop 2 in one round)
    attention = torch.tensor([0.9, 0.5, 0.4, 0.3, 0.2, 0.1])
    # order of the rest: 1, 2, 3, 4, 5 -> even places 1, 3, 5; odd places 2, 4. Token 1 duplicates 2, 3 duplicates
    # 4, token 5 is unlike both: scores 1 ~ 1.0, 3 ~ 1.0, 5 ~ 0 -> with r = min(8, 5 - 3) = 2, drop 1 and 3
    features = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0.01], [0, 0, 1], [0, 0.01, 1], [1, -1, -1]])
    kept = vispruner_select(attention, features, 4, important_ratio=0.25)
    assert kept.tolist() == [0, 2, 4, 5]
    assert kept.tolist() == reference(attention, features, 4, ratio=0.25)


@pytest.mark.parametrize("seed", range(5))
def test_selection_equals_the_official_loop_on_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    attention, features = torch.rand(60, generator=gen), torch.randn(60, 12, generator=gen)
    for k in (5, 16, 31):
        got = vispruner_select(attention, features, k)
        assert got.tolist() == reference(attention, features, k) and got.numel() == k


def test_end_to_end_cls_attention_and_features_recomputed_by_hand():
    model = tiny_llava(seed=5)
    inputs = llava_inputs(model, ((2, 3),), seed=1)
    with vtc.compressed(model, "vispruner", budget=0.5):
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
    attention = out.attentions[block][0, :, 0, 1:].mean(0)  # CLS row over the patches, heads averaged
    features = out.hidden_states[block + 1][0, 1:]
    expected = reference(attention, features, vtc.keep_count(0.5, attention.numel()))
    assert sorted(i for i in im.kept) == expected


def test_duplicate_search_in_row_chunks_keeps_the_official_selection():
    import vtc.pruners.vispruner as vispruner

    gen = torch.Generator().manual_seed(7)
    attention, features = torch.rand(300, generator=gen), torch.randn(300, 16, generator=gen)
    chunk, vispruner._CHUNK = vispruner._CHUNK, 150 * 5  # five rows of similarities at a time
    try:
        assert vispruner_select(attention, features, 40).tolist() == reference(attention, features, 40)
    finally:
        vispruner._CHUNK = chunk
