"""GTP-ViT (``docs/methods/gtp.md``): the graph, selection and propagation on hand-checked inputs and against an
independent reference written from the official ``models_v3.py``, the attention the runners hand over, and
``vtc.compress`` on timm, open_clip, transformers backbones and LLaVA towers."""

import math

import pytest
import torch

import vtc
from vtc.adapters.runners import MergeContext, Runners
from vtc.contexts import TowerCall, TowerMerge
from vtc.mergers.gtp import (
    SELECTIONS,
    GTPConfig,
    budget_schedule,
    explicit_schedule,
    propagate,
    semantic_graph,
    spatial_graph,
    split_tokens,
    token_graph,
    token_importance,
)
from vtc.testing import compressed_inputs, llava_inputs, tiny_llava

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

# -- a reference written from the official code (cls_token=True, GraphProp, token_scale) ---------------------


def _official_graph(x, grid_side, num_neighbours):
    """``forward_features`` of the official model: the mixed graph of ``x [B, N, C]`` (CLS at 0), normalised."""
    bsz, n, _ = x.shape
    p = n - 1
    idx = torch.arange(p)
    r1, c1 = idx.view(-1, 1).expand(-1, p) // grid_side, idx.view(-1, 1).expand(-1, p) % grid_side
    r2, c2 = idx.view(1, -1).expand(p, -1) // grid_side, idx.view(1, -1).expand(p, -1) % grid_side
    spatial = ((r1 - r2).abs() <= 1).float() * ((c1 - c2).abs() <= 1).float() - torch.eye(p)
    unit = x[:, 1:] / x[:, 1:].norm(dim=-1, keepdim=True)
    cos = unit @ unit.transpose(-1, -2)
    threshold = torch.kthvalue(cos, n - 1 - num_neighbours, dim=-1, keepdim=True)[0]
    semantic = torch.where(cos >= threshold, 1.0, 0.0) - torch.eye(p)[None]
    graph = torch.bitwise_or(semantic.int(), spatial[None].expand(bsz, -1, -1).int()).float()
    degree = torch.diag_embed(graph.sum(-1) ** -0.5)
    return degree @ graph @ degree


def _official_select(attn, rule, num_prop):
    """``select`` with a CLS token: ``(index_kept, index_prop)`` into the tokens (CLS = 0), in rank order."""
    diag = torch.diagonal(attn, dim1=-2, dim2=-1)[:, :, 1:]
    received = attn[:, :, :, 1:].sum(-2)
    cls = attn[:, :, 0, 1:]
    heads = (lambda s: s.max(1)[0]) if rule.endswith("Max") else (lambda s: s.mean(1))
    rank = {
        "MixedAttnMax": lambda: heads(diag) * heads(received),
        "MixedAttnMean": lambda: heads(diag) * heads(received),
        "SumAttnMax": lambda: heads(diag) + heads(received),
        "DiagAttnMax": lambda: heads(diag),
        "DiagAttnMean": lambda: heads(diag),
        "IMGAttnMax": lambda: heads(received),
        "IMGAttnMean": lambda: heads(received),
        "CLSAttnMax": lambda: heads(cls),
        "CLSAttnMean": lambda: heads(cls),
    }[rule]()
    order = torch.argsort(rank, dim=1, descending=True)
    return order[:, :-num_prop] + 1, order[:, -num_prop:] + 1


def _official_propagate(x, weight, kept, prop, alpha, scales):
    """``propagate(standard="GraphProp", cls_token=True)``: kept tokens in rank order after the CLS."""
    bsz, n, c = x.shape
    x_kept = x.gather(1, kept[..., None].expand(-1, -1, c))
    x_prop = x.gather(1, prop[..., None].expand(-1, -1, c))
    k, q = kept - 1, prop - 1
    weight = weight.gather(1, k[..., None].expand(-1, -1, n - 1))
    w_prop = weight.gather(2, q[:, None].expand(-1, weight.shape[1], -1))
    weight = weight.gather(2, k[:, None].expand(-1, weight.shape[1], -1))
    x_kept = x_kept + alpha * (w_prop @ x_prop)
    s = scales[:, 1:]
    s_kept = s.gather(1, k) + alpha * (w_prop @ s.gather(1, q)[..., None]).squeeze(-1)
    return torch.cat([x[:, :1], x_kept], 1), weight, torch.cat([scales[:, :1], s_kept], 1)


def _official_tower(vit, images, num_prop, alpha=0.1, num_neighbours=8):
    """The official ``GraphPropagationTransformer.forward_features`` on a timm ViT's weights (eager attention with
    ``log scale`` logits, MixedAttnMax, GraphProp), tracking each row's block-0 index to compare orders."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    bsz, n, c = x.shape
    graph = _official_graph(x, int(math.isqrt(n - 1)), num_neighbours)
    scales = torch.ones(bsz, n)
    ident = torch.arange(n).expand(bsz, -1)
    for blk in vit.blocks:
        t = x.shape[1]
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(bsz, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * blk.attn.scale) @ k.transpose(-2, -1) + scales.log().reshape(bsz, 1, 1, t)).softmax(-1)
        x = x + blk.attn.proj((attn @ v).transpose(1, 2).reshape(bsz, t, c))
        kept, prop = _official_select(attn, "MixedAttnMax", num_prop)
        x, graph, scales = _official_propagate(x, graph, kept, prop, alpha, scales)
        ident = torch.cat([ident[:, :1], ident.gather(1, kept)], 1)
        x = x + blk.mlp(blk.norm2(x))
    return vit.norm(x), ident, scales


# -- the graph ----------------------------------------------------------------------------------------------

#: 2 x 3 grid, raster order: the 8-neighbours of each patch, by hand
SPATIAL_2X3 = {0: {1, 3, 4}, 1: {0, 2, 3, 4, 5}, 2: {1, 4, 5}, 3: {0, 1, 4}, 4: {0, 1, 2, 3, 5}, 5: {1, 2, 4}}


def _adjacency(edges, n):
    a = torch.zeros(n, n, dtype=torch.bool)
    for i, js in edges.items():
        a[i, sorted(js)] = True
    return a


def test_spatial_graph_by_hand():
    assert torch.equal(spatial_graph(2, 3), _adjacency(SPATIAL_2X3, 6))
    assert spatial_graph(1, 3).int().tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]


def _paired_tokens():
    """6 tokens ``e_i + 0.5 e_partner``: each one's most similar token is its partner (0-5, 1-4, 2-3)."""
    partner = [5, 4, 3, 2, 1, 0]
    return (torch.eye(6) + 0.5 * torch.eye(6)[partner])[None]


def test_semantic_and_mixed_graph_by_hand():
    tokens = _paired_tokens()
    assert semantic_graph(tokens, 1)[0].nonzero().tolist() == [[0, 5], [1, 4], [2, 3], [3, 2], [4, 1], [5, 0]]
    # union with the 2 x 3 grid: 0-5 and 2-3 are new edges (1-4 is already a grid edge)
    mixed = {
        0: {1, 3, 4, 5},
        1: {0, 2, 3, 4, 5},
        2: {1, 3, 4, 5},
        3: {0, 1, 2, 4},
        4: {0, 1, 2, 3, 5},
        5: {0, 1, 2, 4},
    }
    degree = torch.tensor([4.0, 5, 4, 4, 5, 4])
    expected = _adjacency(mixed, 6).float() / (degree[:, None] * degree[None, :]).sqrt()
    torch.testing.assert_close(token_graph(tokens, (2, 3), 1, "Mixed")[0], expected)
    spatial = _adjacency(SPATIAL_2X3, 6).float()
    degree = spatial.sum(1)
    expected = spatial / (degree[:, None] * degree[None, :]).sqrt()
    torch.testing.assert_close(token_graph(tokens, (2, 3), 1, "Spatial")[0], expected)
    # ties at the threshold are all neighbours (>= the k-th value), as in the official code
    assert semantic_graph(torch.ones(1, 4, 3), 1)[0].sum(1).tolist() == [3, 3, 3, 3]


def test_graph_equals_the_official_one():
    x = torch.randn(2, 1 + 25, 16, generator=torch.Generator().manual_seed(0))
    ours = token_graph(x[:, 1:], (5, 5), 8, "Mixed")
    torch.testing.assert_close(ours, _official_graph(x, 5, 8))


# -- selection and propagation -------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", SELECTIONS)
def test_selection_equals_the_official_rule(rule):
    g = torch.Generator().manual_seed(1)
    attn = torch.randn(3, 4, 13, 13, generator=g).softmax(-1)  # CLS + 12 patches
    score = token_importance(attn, 1, rule)
    kept, prop = split_tokens(score, 5)
    ref_kept, ref_prop = _official_select(attn, rule, 5)
    assert kept.tolist() == (ref_kept - 1).sort(1).values.tolist()
    assert sorted(map(sorted, prop.tolist())) == sorted(map(sorted, (ref_prop - 1).tolist()))


def test_mixed_attn_max_by_hand():
    """Two heads, CLS + 2 patches: rank = max_h diag * max_h column sum (every query row, CLS included)."""
    a = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]])
    b = torch.tensor([[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])
    score = token_importance(torch.stack([a, b])[None], 1)
    # patch 1: diag max(0.6, 0.3) * colsum max(1.5, 0.6); patch 2: max(0.2, 0.8) * max(0.8, 1.4)
    torch.testing.assert_close(score, torch.tensor([[0.6 * 1.5, 0.8 * 1.4]]))
    assert token_importance(torch.stack([a, b])[None], 1, "CLSAttnMean")[0].tolist() == pytest.approx([0.35, 0.25])


def test_split_keeps_order_and_breaks_ties_towards_the_lower_index():
    kept, prop = split_tokens(torch.tensor([[3.0, 1.0, 2.0, 1.0, 5.0]]), 2)
    assert kept.tolist() == [[0, 2, 4]] and sorted(prop[0].tolist()) == [1, 3]
    kept, prop = split_tokens(torch.ones(1, 4), 1)
    assert kept.tolist() == [[0, 1, 2]] and prop.tolist() == [[3]]


def test_propagation_by_hand():
    """CLS + the 2 x 3 paired tokens; patch 0 goes: each neighbour j gets 0.1 * W[j, 0] * x_0."""
    graph = token_graph(_paired_tokens(), (2, 3), 1, "Mixed")  # W[j, 0]: 1/sqrt(20) for 1, 4; 1/4 for 3, 5
    x = torch.tensor([-1.0, 4.0, 10.0, 20.0, 30.0, 40.0, 50.0])[None, :, None]  # CLS, patches 0..5
    scale = torch.tensor([[1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    kept, prop = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[0]])
    out, new_scale, new_graph, dest = propagate(x, scale, graph, kept, prop, 1, 0.1)
    w = 1 / math.sqrt(20)
    expected = [-1.0, 10 + 0.4 * w, 20.0, 30 + 0.1, 40 + 0.4 * w, 50 + 0.1]
    torch.testing.assert_close(out[0, :, 0], torch.tensor(expected))
    torch.testing.assert_close(new_scale[0], torch.tensor([1.0, 2 + 0.1 * w, 1.0, 1.025, 1 + 0.1 * w, 1.025]))
    torch.testing.assert_close(new_graph, graph[:, 1:, 1:])  # the kept sub-graph, not renormalised
    assert dest.tolist() == [[2]]  # the largest weight (1/4) goes to patch 3 (kept position 2) before patch 5


def test_an_isolated_token_joins_its_most_similar_kept_token():
    graph = token_graph(torch.randn(1, 3, 4), (1, 3), 0, "Spatial")  # a line 0 - 1 - 2
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]])
    kept, prop = torch.tensor([[0]]), torch.tensor([[1, 2]])  # 2 has no kept neighbour
    out, _, _, dest = propagate(x, torch.ones(1, 3), graph, kept, prop, 0, 0.5)
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0, 0.5 * graph[0, 0, 1]]))  # only 1 reaches 0
    assert dest.tolist() == [[0, 0]]


def test_propagation_equals_the_official_one():
    g = torch.Generator().manual_seed(2)
    x, attn = torch.randn(2, 17, 8, generator=g), torch.randn(2, 3, 17, 17, generator=g).softmax(-1)
    scale = 1 + torch.rand(2, 17, generator=g)
    graph = token_graph(x[:, 1:], (4, 4), 3, "Mixed")
    ref_kept, ref_prop = _official_select(attn, "MixedAttnMax", 6)
    ref_x, ref_graph, ref_scale = _official_propagate(x, graph, ref_kept, ref_prop, 0.3, scale)
    kept, prop = split_tokens(token_importance(attn, 1), 6)
    out, new_scale, new_graph, _ = propagate(x, scale, graph, kept, prop, 1, 0.3)
    order = torch.cat([torch.zeros(2, 1, dtype=torch.long), ref_kept.argsort(1) + 1], 1)  # official rows, sorted
    torch.testing.assert_close(out, ref_x.gather(1, order[..., None].expand(-1, -1, 8)))
    torch.testing.assert_close(new_scale, ref_scale.gather(1, order))
    sub = order[:, 1:] - 1
    torch.testing.assert_close(
        new_graph, ref_graph.gather(1, sub[..., None].expand(-1, -1, 10)).gather(2, sub[:, None].expand(-1, 10, -1))
    )


# -- schedule and config ---------------------------------------------------------------------------------------


def test_schedules():
    assert budget_schedule(197, 1, 12, 96) == [8] * 12  # DeiT-S with the official P = 8
    assert budget_schedule(577, 1, 23, 461) == [21] * 1 + [20] * 22
    assert sum(budget_schedule(17, 1, 3, 15)) == 15
    with pytest.raises(ValueError, match="at least one"):
        budget_schedule(17, 1, 3, 16)
    assert explicit_schedule(8, 197, 1, 12) == [8] * 12
    assert explicit_schedule(6, 17, 1, 4) == [6, 6, 3, 0]  # one patch token always stays
    assert explicit_schedule([3, 2], 17, 1, 4) == [3, 2, 0, 0]
    with pytest.raises(ValueError, match="blocks"):
        explicit_schedule([1] * 5, 17, 1, 4)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"alpha": -0.1}, ValueError, "alpha"),
        ({"alpha": float("inf")}, ValueError, "alpha"),
        ({"alpha": "0.1"}, TypeError, "alpha"),
        ({"num_neighbours": -1}, ValueError, "num_neighbours"),
        ({"num_neighbours": 2.0}, TypeError, "num_neighbours"),
        ({"num_prop": -2}, ValueError, "num_prop"),
        ({"num_prop": (2, -1)}, ValueError, "num_prop"),
        ({"graph": "mixed"}, ValueError, "graph"),
        ({"selection": "Random"}, ValueError, "selection"),
        ({"graph": "Semantic", "num_neighbours": 0}, ValueError, "num_neighbours"),
        ({"token_scale": 1}, TypeError, "token_scale"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        GTPConfig(**options)


def test_config_defaults_are_the_official_ones():
    cfg = GTPConfig(num_prop=[2, 1])
    assert (cfg.alpha, cfg.num_neighbours, cfg.graph, cfg.selection, cfg.token_scale) == (
        0.1,
        8,
        "Mixed",
        "MixedAttnMax",
        True,
    )
    assert cfg.num_prop == (2, 1)


def test_call_errors():
    from vtc.mergers.gtp import GTPMerger

    x = torch.randn(1, 10, 4)
    with pytest.raises(ValueError, match="CLS"):
        GTPMerger(GTPConfig(selection="CLSAttnMax")).tower_merge(TowerCall(1, 10, 0, 2, 10, 5, inputs=x))
    with pytest.raises(ValueError, match="square"):
        GTPMerger(GTPConfig()).tower_merge(TowerCall(1, 10, 0, 2, 10, 5, inputs=x))
    assert GTPMerger(GTPConfig(graph="Semantic")).tower_merge(TowerCall(1, 10, 0, 2, 10, 5, inputs=x)) is not None
    assert GTPMerger(GTPConfig()).tower_merge(TowerCall(1, 10, 1, 2, 9, 9, inputs=x)) is None  # full budget


# -- the attention the runners hand over ---------------------------------------------------------------------


class _Probe(TowerMerge):
    """Sizes given up front, no merging; records the attention of every block."""

    wants_attention = True

    def __init__(self, size):
        self.size, self.seen = size, {}

    def attention_bias(self, dtype):
        return self.size.log().to(dtype)[:, None, None, :]

    def wants_metric(self, block):
        return True

    def merge(self, block, x, metric):
        self.seen[block] = metric
        return x


def _qk(host, block, x):
    """``[B, T, 4, d]`` queries and keys of ``block`` on ``x``, by hand."""
    b, t, c = x.shape
    if host == "timm":
        qkv = block.attn.qkv(block.norm1(x)).view(b, t, 3, 4, c // 4).transpose(1, 3)  # [B, H, 3, T, d]
        q, k = block.attn.q_norm(qkv[:, :, 0]), block.attn.k_norm(qkv[:, :, 1])
        return q.transpose(1, 2), k.transpose(1, 2)
    if host == "open_clip":
        qkv = torch.nn.functional.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
        return qkv[..., :c].view(b, t, 4, -1), qkv[..., c : 2 * c].view(b, t, 4, -1)
    attn, h = (block.attention, block.norm1(x)) if host == "dinov2" else (block.self_attn, block.layer_norm1(x))
    return attn.q_proj(h).view(b, t, 4, -1), attn.k_proj(h).view(b, t, 4, -1)


@pytest.mark.parametrize("host", ["timm", "open_clip", "hf", "dinov2"])
def test_runners_hand_over_the_attention_probabilities(host):
    from tests.test_tome import _dinov2_block, _hf_block, _open_clip_block, _timm_block

    block = {"timm": _timm_block, "open_clip": _open_clip_block, "hf": _hf_block, "dinov2": _dinov2_block}[host]()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    size = torch.tensor([[1.0, 3, 1, 2, 4, 1], [1.0, 1, 1, 1, 1, 1]])
    kwargs = {"attention_mask": None} if host in ("hf", "dinov2") else {}
    with torch.no_grad():
        ctx = MergeContext(1)
        state = _Probe(size)
        ctx.start = lambda _: state
        runners = Runners([block], ctx)
        try:
            block(x, **kwargs)
        finally:
            runners.remove()
        q, k = _qk(host, block, x)
        logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8) + size.log()[:, None, None, :]
    torch.testing.assert_close(state.seen[0], logits.softmax(-1), atol=1e-6, rtol=1e-5)


# -- timm, open_clip, transformers ---------------------------------------------------------------------------


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=10) | kw
    return VisionTransformer(**args).eval()


def _images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _state(model):
    return [
        (n, type(m), sorted(vars(m)), len(m._forward_hooks), len(m._forward_pre_hooks))
        for n, m in model.named_modules()
    ]


def test_timm_equals_the_official_tower():
    """vtc's GTP on a timm ViT equals the official forward written out above (4 blocks, P = 2 per block)."""
    vit, x = _vit(), _images()
    with torch.no_grad():
        ref, ident, ref_scales = _official_tower(vit, x, 2, num_neighbours=3)
        with vtc.compressed(vit, "gtp", num_prop=2, num_neighbours=3):
            out = vit.forward_features(x)
            state = vtc.session_of(vit).adapter.context.state
            rec = vtc.last_record(vit)
    order = ident.argsort(1)  # official rows in raster order
    torch.testing.assert_close(out, ref.gather(1, order[..., None].expand(-1, -1, 32)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.size, ref_scales.gather(1, order))
    assert state.anchor.tolist() == ident.sort(1).values.tolist()
    assert rec.flops["vision_tokens"] == [17, 15, 13, 11, 9]
    for im, anchors in zip(rec.images, ident.sort(1).values[:, 1:] - 1, strict=True):
        assert im.kept == anchors.tolist() and sorted(set(im.groups)) == list(range(8))
        assert all(im.groups[a] == row for row, a in enumerate(im.kept))  # a kept patch is in its own group


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.9, 3, 15])
def test_timm_budget_gives_exactly_k(budget):
    vit = _vit(depth=3)
    k = vtc.keep_count(budget, 16)
    with torch.no_grad(), vtc.compressed(vit, "gtp", budget=budget):
        out = vit.forward_features(_images())
        rec = vtc.last_record(vit)
    assert out.shape[1] == 1 + k and rec.flops["vision_tokens"][-1] == 1 + k
    for im in rec.images:
        assert im.counts == {"input": 16, "vision": k} and im.kept == sorted(im.kept)
        assert sorted(set(im.groups)) == list(range(k))


@pytest.mark.parametrize("variant", [{}, {"init_values": 0.1, "qk_norm": True}, {"reg_tokens": 2}])
def test_timm_full_budget_num_prop_0_and_restore_are_exact(variant):
    vit, x = _vit(**variant), _images()
    before = _state(vit)
    with torch.no_grad():
        ref = vit(x)
        with vtc.compressed(vit, "gtp", budget=1.0, num_prop=3):
            assert torch.equal(vit(x), ref)
        with vtc.compressed(vit, "gtp", num_prop=0):
            assert type(vit.blocks[0]).__name__ == "MergingBlock"  # the runner really ran
            assert torch.equal(vit(x), ref)
        vtc.compress(vit, "gtp", budget=0.25)
        merged = vit(x)
        vtc.restore(vit)
        assert _state(vit) == before
        assert torch.equal(vit(x), ref)
    assert not torch.allclose(merged, ref)


def test_timm_batch_equals_each_image_alone():
    vit, x = _vit(), _images(2, seed=5)
    with torch.no_grad(), vtc.compressed(vit, "gtp", budget=0.3):
        together = vit.forward_features(x)
        groups = [im.groups for im in vtc.last_record(vit).images]
        for b in range(2):
            alone = vit.forward_features(x[b : b + 1])
            assert vtc.last_record(vit).images[0].groups == groups[b]
            torch.testing.assert_close(alone[0], together[b], atol=1e-5, rtol=1e-5)


def test_options_change_the_result():
    vit, x = _vit(), _images()
    outs = {}
    with torch.no_grad():
        for name, opts in {
            "default": {},
            "alpha": {"alpha": 0.5},
            "no_scale": {"token_scale": False},
            "spatial": {"graph": "Spatial"},
            "selection": {"selection": "CLSAttnMean"},
        }.items():
            with vtc.compressed(vit, "gtp", budget=0.5, **opts):
                outs[name] = vit(x)
    assert all(not torch.allclose(outs["default"], outs[n]) for n in outs if n != "default")
    assert all(math.isfinite(float(o.sum())) for o in outs.values())


def test_avg_pooling_is_the_plain_mean():
    """The official head pools GTP's tokens unweighted (scales are not member counts)."""
    vit, x = _vit(class_token=False, global_pool="avg"), _images()
    with torch.no_grad(), vtc.compressed(vit, "gtp", budget=0.25):
        feats = vit.forward_features(x)
        logits = vit(x)
    assert feats.shape[1] == 4
    torch.testing.assert_close(logits, vit.head(vit.fc_norm(feats.mean(1))))


def test_open_clip_and_restore():
    from tests.test_tome import _clip

    model, x = _clip(), _images(2)
    before = _state(model)
    with torch.no_grad():
        ref = model.encode_image(x)
        vtc.compress(model, "gtp", budget=0.25)
        merged = model.encode_image(x)
        rec = vtc.last_record(model)
        vtc.restore(model)
        assert _state(model) == before and torch.equal(model.encode_image(x), ref)
    assert [im.counts for im in rec.images] == [{"input": 16, "vision": 4}] * 2 and not torch.equal(merged, ref)


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_transformers_backbones(kind):
    from tests.test_tome import _hf_backbone

    model, x = _hf_backbone(kind), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x)
        with vtc.compressed(model, "gtp", budget=0.25):
            out = model(pixel_values=x)
            rec = vtc.last_record(model)
        assert torch.equal(model(pixel_values=x).last_hidden_state, ref.last_hidden_state)
    assert out.last_hidden_state.shape[1] == 1 + 4
    assert [im.counts for im in rec.images] == [{"input": 16, "vision": 4}] * 2


def test_dinov2_non_square_grid():
    from tests.test_tome import _hf_backbone

    model = _hf_backbone("dinov2")
    with torch.no_grad(), vtc.compressed(model, "gtp", budget=0.5):
        out = model(pixel_values=torch.randn(1, 3, 16, 24))  # 4 x 6 patches
        rec = vtc.last_record(model)
        state = vtc.session_of(model).adapter.context.state
    assert rec.images[0].grids == [[4, 6]] and out.last_hidden_state.shape[1] == 1 + 12
    assert state.graph.shape == (1, 12, 12)


# -- LLaVA towers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tower", ["clip", "siglip", "dinov2"])
def test_llava_tower(tower):
    model = tiny_llava(seed=0, tower=tower)
    inputs = llava_inputs(model, ((3, 4), (6, 2)), padding_side="left")
    with torch.no_grad():
        ref = model(**inputs).logits
        before = _state(model)
        with vtc.compressed(model, "gtp", budget=1.0):
            assert torch.equal(model(**inputs).logits, ref)
        vtc.compress(model, "gtp", budget=0.25)
        out = model(**inputs).logits
        rec = vtc.last_record(model)
        fed = compressed_inputs(model, inputs)
        vtc.restore(model)
        assert _state(model) == before and torch.equal(model(**inputs).logits, ref)
    assert out.shape[1] == ref.shape[1] - 12
    features = fed["mm_encoder_outputs"]["image"].pooler_output
    for im, feat in zip(rec.images, features, strict=True):
        assert im.counts == {"input": 16, "pre_llm": 4} and feat.shape[0] == 4
        assert sorted(set(im.groups)) == list(range(4)) and im.kept == sorted(im.kept)
        assert all(im.groups[a] == row for row, a in enumerate(im.kept))
