"""TransPrune: the transition weight by hand, the stage counts of the official schedule, and the whole prefill
against a layer-by-layer re-implementation of the official loop (``transprune_forward``) on a tiny LLaVA."""

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.pruners.transprune import TransPruneConfig, TransPrunePruner, stage_counts
from vtc.testing import llava_inputs, tiny_llava


def test_official_schedule_at_budget_one_eighth():
    # LLaVA-1.5: 576 tokens, ratios 0.875, 0.625, 0.125 (official int() of 504.0, 360.0, 72.0)
    assert stage_counts(0.125, 576) == [504, 360, 72]
    assert stage_counts(0.25, 576) == [514, 391, 144]  # 576 - 432 / 7, 576 - 3 * 432 / 7 rounded
    assert stage_counts(1.0, 576) == [576, 576, 576]
    method = TransPrunePruner(TransPruneConfig(budget=0.125))
    assert method.points(32) == (7, 9, 12) and method.llm_observe_layers(32) == tuple(range(6, 12))
    assert method.points(28) == (6, 8, 10)  # Qwen2-7B depth: scaled
    assert method.points(4) == (1, 2, 3)  # scaled 1, 1, 2: pushed apart
    with pytest.raises(ValueError, match=r"prune points \(1, 2, 3\) must be below the LLM's 3 layers"):
        method.points(3)


def test_transition_weight_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [5.0, 5.0]]])
    y = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0], [9.0, 9.0]]])
    valid = torch.tensor([[True, True, True, False]])
    got = TransPrunePruner(TransPruneConfig(budget=0.5)).observe(3, "mlp", x, y, valid)
    change = torch.tensor([0.0, 1.0, 2.0])  # 1 - cos: same direction, orthogonal, opposite
    ratio = torch.tensor([2.0, 0.5, 1.0])
    expected = ratio * change.exp() / change.exp().sum()
    torch.testing.assert_close(got[0, :3], expected)
    assert got[0, 3] == 0  # padding takes no part


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _official_prefill(model, inputs, points, budget, iga=True):
    """The official loop, written out: layers one by one, TTV from every observed layer's two sub-blocks,
    at each point the IGA of the layer about to run, top-k, rows removed, positions renumbered."""
    lm = model.model.language_model
    captured = {}
    handle = lm.register_forward_pre_hook(
        lambda m, a, kw: captured.update(embeds=kw["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    h = captured["embeds"][0]
    ids = inputs["input_ids"][0]
    visual = ids == model.config.image_token_id
    n = int(visual.sum())
    counts = stage_counts(budget, n)
    observe = set(range(points[0] - 1, points[-1]))
    ttv = torch.zeros(h.shape[0])
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            pos = torch.arange(h.shape[0])[None]
            cos, sin = lm.rotary_emb(h[None], pos)
            if i in points:
                rows = torch.nonzero(visual).flatten()
                t = ttv[rows] / (ttv[rows].sum() + 1e-8)
                score = t
                if iga:
                    attn = layer.self_attn
                    x = layer.input_layernorm(h[None])
                    q = attn.q_proj(x).view(1, -1, attn.config.num_attention_heads, attn.head_dim).transpose(1, 2)
                    k = attn.k_proj(x).view(1, -1, attn.config.num_key_value_heads, attn.head_dim).transpose(1, 2)
                    q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
                    k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
                    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
                    logits = q @ k.transpose(-1, -2) / attn.head_dim**0.5
                    causal = torch.ones(h.shape[0], h.shape[0], dtype=torch.bool).tril()
                    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)[0].mean(0)  # [T, T]
                    text = torch.arange(int(rows[-1]) + 1, h.shape[0])
                    a = probs[text][:, rows].mean(0)
                    score = score + a / (a.sum() + 1e-8)
                k_keep = counts[points.index(i)]
                top = rows[score.topk(k_keep).indices.sort().values]
                keep = ~visual.clone()
                keep[top] = True
                h, visual, ttv = h[keep], visual[keep], ttv[keep]
                pos = torch.arange(h.shape[0])[None]
                cos, sin = lm.rotary_emb(h[None], pos)
            x1 = layer.input_layernorm(h[None])
            y1 = layer.self_attn(hidden_states=x1, attention_mask=None, position_embeddings=(cos, sin))[0]
            mid = h[None] + y1
            x2 = layer.post_attention_layernorm(mid)
            y2 = layer.mlp(x2)
            if i in observe:
                for a, b in ((x1[0], y1[0]), (x2[0], y2[0])):
                    change = 1 - F.cosine_similarity(a, b, dim=-1)
                    ttv = ttv + b.norm(dim=-1) / a.norm(dim=-1) * change.exp() / change.exp().sum()
            h = (mid + y2)[0]
        return model.lm_head(lm.norm(h))[-1], int(visual.sum())


@pytest.mark.parametrize("iga", [True, False])
def test_prefill_equals_the_official_loop_on_a_tiny_llava(iga):
    model = tiny_llava(seed=5, text_layers=5)
    inputs = llava_inputs(model, ((3, 6),), seed=1)
    points = (1, 2, 4)
    expected, n_left = _official_prefill(model, inputs, points, 0.25, iga)
    with vtc.compressed(model, "transprune", budget=0.25, layers=points, iga=iga):
        with torch.no_grad():
            got = model(**inputs).logits[0, -1]
        rec = vtc.last_record(model)
    assert rec.visual_per_layer[0] == [16, 14, 11, 11, 4]  # 16 - 12/7, 16 - 36/7, k and n_left == 4
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_model_too_shallow_for_the_default_points_is_refused_and_left_alone():
    model = tiny_llava(seed=0, text_layers=3)
    with pytest.raises(ValueError, match="must be below the LLM's 3 layers"):
        vtc.compress(model, "transprune", budget=0.25)
    assert not vtc.is_compressed(model)
