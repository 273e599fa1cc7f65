"""DART: the selection follows the official algorithm (a set-based reference written from its code), on a hand-made
example and end to end on a tiny LLaVA whose keys and normed states are recomputed by hand."""

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.pruners.dart import dart_select
from vtc.testing import llava_inputs, tiny_llava


def reference(image_keys, text_keys, states, k, pivot_image, pivot_text):
    """The official loop, with sets (pivots visited in ascending order, per-pivot shares as vtc splits k)."""
    n = image_keys.shape[0]
    img = set(torch.topk(image_keys.abs().sum(-1), min(pivot_image, k)).indices.tolist())
    txt = set((torch.topk(text_keys.abs().sum(-1), pivot_text).indices + n).tolist()) if pivot_text else set()
    pivots = sorted(img) + sorted(txt)
    rest = k - len(img)
    share = {p: rest // len(pivots) + (i < rest % len(pivots)) for i, p in enumerate(pivots)}
    keep, valid = set(img), set(range(n)) - img
    for p in pivots:
        candidates = sorted(valid)
        cos = -F.cosine_similarity(states[p][None], states[candidates], dim=-1)
        picked = [candidates[i] for i in cos.topk(min(share[p], len(candidates))).indices.tolist()]
        keep.update(picked)
        valid.difference_update(picked)
    return sorted(keep)


def test_hand_made_example():
    # 6 image tokens on a circle of states; token 0 has the largest key norm (the one image pivot); one text pivot
    angles = torch.tensor([0.0, 0.1, 0.2, 3.1, 3.2, 1.6, 0.05])  # 6 image tokens, then 1 text token (angle 0.05)
    states = torch.stack([angles.cos(), angles.sin()], dim=-1)
    image_keys = torch.tensor([[5.0], [1.0], [1.0], [1.0], [1.0], [1.0]])
    text_keys = torch.tensor([[1.0]])
    # k = 3: pivot 0 kept; 2 more shared by pivots (0, text): one each. Least similar to token 0 (angle 0): the
    # token at 3.1 (index 3); then least similar to the text token (angle 0.05) among the rest: 3.2 (index 4)
    kept = dart_select(image_keys, text_keys, states, 3, pivot_image=1, pivot_text=1)
    assert kept.tolist() == [0, 3, 4]
    assert kept.tolist() == reference(image_keys, text_keys, states, 3, 1, 1)


@pytest.mark.parametrize("seed", range(6))
def test_selection_equals_the_official_loop_on_random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    n, m = 30, 5
    image_keys, text_keys = torch.randn(n, 16, generator=gen), torch.randn(m, 16, generator=gen)
    states = torch.randn(n + m, 8, generator=gen)
    for k in (4, 9, 17):
        got = dart_select(image_keys, text_keys, states, k, pivot_image=4, pivot_text=4)
        assert got.tolist() == reference(image_keys, text_keys, states, k, 4, 4) and got.numel() == k


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def test_end_to_end_keys_and_states_recomputed_by_hand():
    model = tiny_llava(seed=3)
    inputs = llava_inputs(model, ((3, 5),), seed=2)
    with vtc.compressed(model, "dart", budget=0.5, pivot_image=2, pivot_text=2):
        with torch.no_grad():
            model(**inputs)
        im = vtc.last_record(model).images[0]
    lm = model.model.language_model
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states  # [0]: embeddings
        ids = inputs["input_ids"][0]
        visual = torch.nonzero(ids == model.config.image_token_id).flatten()
        text = torch.arange(int(visual[-1]) + 1, ids.shape[0])
        block = lm.layers[1]  # K - 1 = 1
        h = block.input_layernorm(hidden[1])
        attn = block.self_attn
        keys = attn.k_proj(h).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
        cos, sin = lm.rotary_emb(h, torch.arange(h.shape[1])[None])
        keys = keys * cos[:, None] + _rotate_half(keys) * sin[:, None]
        keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1).transpose(1, 2).flatten(2)[0]
        states = lm.norm(hidden[2])[0]
    k = vtc.keep_count(0.5, visual.numel())
    expected = reference(keys[visual], keys[text], states[torch.cat([visual, text])], k, 2, 2)
    assert sorted(im.layers["2"]) == expected
