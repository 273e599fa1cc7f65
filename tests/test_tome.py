"""ToMe (``docs/methods/tome.md``): the algorithm on hand-checked inputs, the block runners of every host, and
``vtc.compress`` on timm, open_clip and LLaVA (CLIP, SigLIP and DINOv2 towers)."""

import math

import pytest
import torch

import vtc
from vtc.adapters import UnsupportedModelError
from vtc.adapters.runners import MergeContext, Runners
from vtc.contexts import TowerMerge
from vtc.mergers.tome import (
    ToMeConfig,
    bipartite_soft_matching,
    budget_schedule,
    explicit_schedule,
    merge_cap,
    merge_tokens,
    merge_wavg,
    token_counts,
)
from vtc.testing import compressed_inputs, llava_inputs, tiny_llava

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
from timm.models.vision_transformer import ResPostBlock, VisionTransformer  # noqa: E402

# -- the algorithm ----------------------------------------------------------------------------------------


def test_worked_example():
    """A hand-worked step: 7 tokens, CLS at 0, r = 2."""
    metric = torch.tensor([(0, 1), (1, 0), (1, 0.05), (0, 1), (0.1, 1), (-1, 0), (-1, 0.2)])[None]
    x = (10.0 * torch.arange(7.0))[None, :, None]
    groups = bipartite_soft_matching(metric, 2, prefix=1)
    assert groups.tolist() == [[0, 2, 2, 3, 3, 4, 1]]  # rows: CLS, 6, {1,2}, {3,4}, 5
    merged, sizes = merge_wavg(x, torch.ones(1, 7), groups, 5)
    assert merged[0, :, 0].tolist() == [0.0, 60.0, 15.0, 35.0, 50.0]
    assert sizes.tolist() == [[1.0, 1.0, 2.0, 2.0, 1.0]]


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
def test_matching_invariants(prefix):
    g = torch.Generator().manual_seed(prefix)
    t = 23
    metric, x = torch.randn(3, t, 8, generator=g), torch.randn(3, t, 4, generator=g)
    size = torch.randint(1, 5, (3, t), generator=g).float()
    r = merge_cap(t, prefix)
    groups = bipartite_soft_matching(metric, r, prefix)
    for row in groups:
        assert sorted(set(row.tolist())) == list(range(t - r))  # every output row has a member
        assert row[:prefix].tolist() == list(range(prefix))  # the prefix stays in front, alone
        assert all(row.tolist().count(p) == 1 for p in range(prefix))
    merged, new_size = merge_wavg(x, size, groups, t - r)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))  # sizes are conserved
    assert new_size[:, :prefix].tolist() == size[:, :prefix].tolist()
    torch.testing.assert_close(merged[:, :prefix], x[:, :prefix])
    # a destination holds the size-weighted mean of its members
    b, dest = 1, int(groups[1, prefix + 1])
    members = groups[b] == dest
    expected = (x[b, members] * size[b, members, None]).sum(0) / size[b, members].sum()
    torch.testing.assert_close(merged[b, dest], expected)


def test_ties_go_to_the_lower_index():
    metric = torch.ones(1, 9, 4)  # every similarity is 1
    groups = bipartite_soft_matching(metric, 2, prefix=1)
    # sources are the first unprotected A tokens (2, 4); both go to B's first column (token 1)
    assert groups[0, 2] == groups[0, 1] == groups[0, 4]
    assert groups[0, 6] != groups[0, 1] and groups[0, 8] != groups[0, 1]


def test_reference_token_counts():
    """The reference recurrence on ViT-B/16 at 224 (197 tokens, 12 blocks): counts after each block."""
    assert token_counts(197, explicit_schedule(16, 197, 1, 12))[-3:] == [37, 21, 11]  # the cap bites last
    assert token_counts(197, explicit_schedule(13, 197, 1, 12))[-1] == 41
    assert explicit_schedule([5, 3], 197, 1, 4) == [5, 3, 0, 0]
    with pytest.raises(ValueError, match="blocks"):
        explicit_schedule([1] * 5, 197, 1, 4)


def test_budget_schedule_llava_example():
    """LLaVA-1.5 tower at 0.2: 461 of 576 patches removed over the 23 blocks up to the feature layer."""
    schedule = budget_schedule(577, 1, 23, 461)
    assert schedule == [21] + [20] * 22
    assert token_counts(577, schedule)[-1] == 116


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_budget_schedule_hits_k_exactly(prefix, blocks):
    g = torch.Generator().manual_seed(blocks)
    tokens = 16 + prefix
    for keep in range(1, 17):
        schedule = budget_schedule(tokens, prefix, blocks, 16 - keep)
        assert sum(schedule) == 16 - keep
        x, metric = torch.randn(2, tokens, 4, generator=g), torch.randn(2, tokens, 4, generator=g)
        size = torch.ones(2, tokens)
        for r in schedule:  # every block's share, in as many matching rounds as it needs
            x, size, _ = merge_tokens(x, metric[:, : x.shape[1]], size, r, prefix)
        assert x.shape[1] == prefix + keep and float(size.sum()) == 2 * tokens
    with pytest.raises(ValueError, match="at least one"):
        budget_schedule(tokens, prefix, blocks, 16)


def test_multi_round_merge_tracks_groups():
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(1, 11, 3, generator=g), torch.randn(1, 11, 5, generator=g)
    out, size, groups = merge_tokens(x, metric, torch.ones(1, 11), 8, prefix=1)  # > one step's cap of 5
    assert out.shape[1] == 3 and size.tolist()[0][0] == 1.0 and float(size.sum()) == 11
    for row in range(3):
        members = groups[0] == row
        assert float(size[0, row]) == int(members.sum())
        torch.testing.assert_close(out[0, row], x[0, members].mean(0))


def test_config():
    assert ToMeConfig(r=[3, 2]).r == (3, 2)
    with pytest.raises(ValueError, match="r"):
        ToMeConfig(r=-1)
    with pytest.raises(TypeError, match="r"):
        ToMeConfig(r=True)
    with pytest.raises(TypeError, match="prop_attn"):
        ToMeConfig(prop_attn=1)


def test_listed_families():
    row = next(m.to_dict() for m in vtc.list_methods() if m.name == "tome")
    assert row["stages"] == ["vision", "vision_merge"] and row["families"] == [
        "gemma3",
        "internvl",
        "llava",
        "llava_next",
        "llava_next_video",
        "llava_onevision",
        "open_clip",
        "qwen2_5_vl",
        "qwen2_vl",
        "qwen3_vl",
        "qwen3_vl_moe",
        "timm",
        "transformers",
    ]
    assert row["modalities"] == ["image", "video"]  # video: frames of the towers that unmerge (test_tome_grid.py)


# -- block runners ------------------------------------------------------------------------------------------


class _FixedSizes(TowerMerge):
    """Sizes given up front, no merging; records the metric of every block."""

    def __init__(self, size):
        self.size = size
        self.metrics = {}

    def attention_bias(self, dtype):
        return self.size.log().to(dtype)[:, None, None, :]

    def wants_metric(self, block):
        return True

    def merge(self, block, x, metric):
        self.metrics[block] = metric
        return x


def _hf_block():
    model = tiny_llava(seed=1)
    return model.model.vision_tower.encoder.layers[0]


def _dinov2_block():
    model = tiny_llava(seed=1, tower="dinov2")
    return model.model.vision_tower.encoder.layer[0]


def _timm_block():
    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, init_values=0.5, qk_norm=True
    )
    return vit.blocks[0].eval()


def _open_clip_block():
    torch.manual_seed(0)
    tower = open_clip.transformer.VisionTransformer(32, 8, 32, 1, 4, 2.0, ls_init_value=0.5, output_dim=8)
    return tower.transformer.resblocks[0].eval()


def _keys(host, block, x):
    """Head-mean attention keys (after qk-norm) of ``block`` on ``x``, computed by hand."""
    if host == "timm":
        b, t, c = x.shape
        qkv = block.attn.qkv(block.norm1(x)).view(b, t, 3, 4, c // 4)
        return block.attn.k_norm(qkv[:, :, 1].transpose(1, 2)).mean(1)
    if host == "open_clip":
        c = x.shape[-1]
        k = torch.nn.functional.linear(
            block.ln_1(x), block.attn.in_proj_weight[c : 2 * c], block.attn.in_proj_bias[c : 2 * c]
        )
        return k.view(*x.shape[:2], 4, -1).mean(2)
    if host == "dinov2":
        k = block.attention.k_proj(block.norm1(x))
        return k.view(*x.shape[:2], 4, -1).mean(2)
    k = block.self_attn.k_proj(block.layer_norm1(x))
    return k.view(*x.shape[:2], 4, -1).mean(2)


@pytest.mark.parametrize("host", ["timm", "open_clip", "hf", "dinov2"])
def test_proportional_attention_equals_duplicated_tokens(host):
    """A token of size s under proportional attention acts as s copies of itself in every other token's
    attention: the runner on the compact tokens equals the stock block on the expanded ones."""
    block = {"timm": _timm_block, "open_clip": _open_clip_block, "hf": _hf_block, "dinov2": _dinov2_block}[host]()
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([1, 3, 1, 2, 4, 1])
    x = torch.randn(1, len(sizes), 32, generator=g)
    expanded = x.repeat_interleave(sizes, dim=1)
    first = torch.cumsum(sizes, 0) - sizes
    kwargs = {"attention_mask": None} if host in ("hf", "dinov2") else {}
    with torch.no_grad():
        stock = block(expanded, **kwargs)
        ctx = MergeContext(1)
        state = _FixedSizes(sizes.float()[None])
        ctx.start = lambda _: state
        runners = Runners([block], ctx)
        try:
            ours = block(x, **kwargs)
        finally:
            runners.remove()
    torch.testing.assert_close(ours, stock[:, first], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.metrics[0], _keys(host, block, x), atol=1e-5, rtol=1e-5)
    assert type(block).__name__ in ("Block", "ResidualAttentionBlock", "CLIPEncoderLayer", "Dinov2Layer")


# -- timm ---------------------------------------------------------------------------------------------------


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


VIT_VARIANTS = {
    "plain": {},
    "layerscale": {"init_values": 1e-5},
    "qk_norm": {"qk_norm": True},
    "layerscale_qk_norm": {"init_values": 0.1, "qk_norm": True},
    "registers": {"reg_tokens": 4},
    "no_cls_avg": {"class_token": False, "global_pool": "avg"},
}


@pytest.mark.parametrize("variant", sorted(VIT_VARIANTS))
def test_timm_r0_is_exact_and_restore_leaves_nothing(variant):
    vit, x = _vit(**VIT_VARIANTS[variant]), _images()
    before = _state(vit)
    with torch.no_grad():
        ref = vit(x)
        with vtc.compressed(vit, "tome", r=0):
            assert type(vit.blocks[0]).__name__ == "MergingBlock"  # the runner really ran
            assert torch.equal(vit(x), ref)
        vtc.compress(vit, "tome", r=2)
        merged = vit(x)
        vtc.restore(vit)
        assert _state(vit) == before
        assert torch.equal(vit(x), ref)
    assert not torch.equal(merged, ref)


def test_timm_unfused_attention_and_deit_distilled():
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    deit = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=5)
    deit.eval()
    for block in deit.blocks:
        block.attn.fused_attn = False
    x = _images()
    with torch.no_grad():
        ref = deit(x)
        with vtc.compressed(deit, "tome", r=0):
            assert torch.equal(deit(x), ref)
        with vtc.compressed(deit, "tome", budget=0.25):
            feats = deit.forward_features(x)
            rec = vtc.last_record(deit)
    assert feats.shape[1] == 2 + 4  # CLS and distillation token, then k = 4 of 16 patches
    assert rec.images[0].prefix == 2 and rec.images[0].counts == {"input": 16, "vision": 4}


@pytest.mark.parametrize(
    "r, counts", [(2, [17, 15, 13, 11, 9]), ([5, 0, 4], [17, 12, 12, 8, 8]), (6, [17, 11, 6, 4, 3])]
)
def test_timm_explicit_r_follows_the_recurrence(r, counts):
    vit = _vit()
    with torch.no_grad(), vtc.compressed(vit, "tome", r=r):
        out = vit.forward_features(_images())
        rec = vtc.last_record(vit)
    assert rec.flops["vision_tokens"] == counts and out.shape[1] == counts[-1]


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.9, 3, 15])
def test_timm_budget_gives_k_patches_and_source_maps(budget):
    vit = _vit(depth=3)
    k = vtc.keep_count(budget, 16)
    with torch.no_grad(), vtc.compressed(vit, "tome", budget=budget):
        out = vit.forward_features(_images())
        rec = vtc.last_record(vit)
    assert out.shape[1] == 1 + k
    for im in rec.images:
        assert im.counts == {"input": 16, "vision": k} and im.grids == [[4, 4]]
        assert sorted(set(im.groups)) == list(range(k))  # every input patch in exactly one output row
        assert im.kept == [im.groups.index(row) for row in range(k)]  # anchor = first member
        assert im.kept == sorted(im.kept)  # output rows in raster order of their first patch


def test_timm_full_budget_is_untouched():
    vit, x = _vit(), _images()
    with torch.no_grad():
        ref = vit(x)
        with vtc.compressed(vit, "tome", budget=1.0, r=4):
            assert torch.equal(vit(x), ref)


def test_timm_batch_equals_each_image_alone():
    vit, x = _vit(), _images(4, seed=5)
    with torch.no_grad(), vtc.compressed(vit, "tome", budget=0.3):
        together = vit.forward_features(x)
        groups = [im.groups for im in vtc.last_record(vit).images]
        for b in range(4):
            alone = vit.forward_features(x[b : b + 1])
            assert vtc.last_record(vit).images[0].groups == groups[b]
            torch.testing.assert_close(alone[0], together[b], atol=1e-5, rtol=1e-5)


def test_timm_bf16_sizes_stay_exact():
    vit = _vit(depth=2, img_size=64).to(torch.bfloat16)  # 64 patches
    with torch.no_grad(), vtc.compressed(vit, "tome", budget=2):
        out = vit.forward_features(_images(2).to(torch.bfloat16).repeat(1, 1, 2, 2))
        rec = vtc.last_record(vit)
        state = vtc.session_of(vit).adapter.context.state
    assert out.dtype == torch.bfloat16 and out.shape[1] == 3
    assert state.size.dtype == torch.float32 and state.size.sum(1).tolist() == [65.0, 65.0]
    for im in rec.images:
        assert len(im.groups) == 64 and sorted(set(im.groups)) == [0, 1]


def test_timm_unsupported_block_and_stage_errors_leave_the_model_alone():
    vit, x = _vit(block_fn=ResPostBlock), _images()
    with torch.no_grad():
        ref = vit(x)
    with pytest.raises(UnsupportedModelError, match="ResPostBlock"):
        vtc.compress(vit, "tome", r=2)
    with pytest.raises(ValueError, match="pre_llm"):
        vtc.compress(_vit(), "divprune", budget=0.5)
    assert not vtc.is_compressed(vit) and type(vit.blocks[0]) is ResPostBlock
    with torch.no_grad():
        assert torch.equal(vit(x), ref)


def test_timm_vit_b16_counts():
    """The reference's numbers on the real architecture (random weights): r=13 leaves 41 tokens."""
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, depth=2).eval()  # 2 blocks: fast
    with torch.no_grad(), vtc.compressed(vit, "tome", r=[13, 13]):
        out = vit.forward_features(torch.randn(1, 3, 224, 224))
    assert out.shape[1] == 197 - 26


# -- open_clip ----------------------------------------------------------------------------------------------


def _clip(seed=0):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(
        layers=3, width=32, head_width=8, image_size=32, patch_size=8, mlp_ratio=2, ls_init_value=0.1
    )
    text = CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=4, layers=2)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def test_open_clip_clip_model():
    model, x = _clip(), _images(2)
    text = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    before = _state(model)
    with torch.no_grad():
        ref_img, ref_txt = model.encode_image(x), model.encode_text(text)
        with vtc.compressed(model, "tome", r=0):
            assert torch.equal(model.encode_image(x), ref_img)
        vtc.compress(model, "tome", budget=0.25)
        merged = model.encode_image(x)
        assert torch.equal(model.encode_text(text), ref_txt)  # the text tower is not touched
        rec = vtc.last_record(model)
        vtc.restore(model)
        assert _state(model) == before and torch.equal(model.encode_image(x), ref_img)
    assert rec.family == "open_clip" and [im.counts for im in rec.images] == [{"input": 16, "vision": 4}] * 2
    assert not torch.equal(merged, ref_img)


def test_open_clip_tower_alone_with_avg_pooling():
    torch.manual_seed(0)
    tower = open_clip.transformer.VisionTransformer(32, 8, 32, 3, 4, 2.0, output_dim=8, pool_type="avg").eval()
    x = _images(2)
    with torch.no_grad():
        ref = tower(x)
        with vtc.compressed(tower, "tome", r=0):
            assert torch.equal(tower(x), ref)
        with vtc.compressed(tower, "tome", r=3):
            tower(x)
            rec = vtc.last_record(tower)
        assert torch.equal(tower(x), ref)
    assert rec.flops["vision_tokens"] == [17, 14, 11, 8]


# -- transformers backbones on their own: Dinov2Model, CLIPVisionModel --------------------------------------


def _hf_backbone(kind):
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, patch_size=4)
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(image_size=16, attn_implementation="sdpa", **small)).eval()
    return CLIPVisionModel(CLIPVisionConfig(image_size=16, attn_implementation="sdpa", **small)).eval()


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_transformers_backbone_budget_r0_and_restore(kind):
    model, x = _hf_backbone(kind), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x)
        vtc.compress(model, "tome", r=0)
        same = model(pixel_values=x)
        vtc.restore(model)
        vtc.compress(model, "tome", budget=0.25)
        out = model(pixel_values=x)
        rec = vtc.last_record(model)
        vtc.restore(model)
        back = model(pixel_values=x)
    torch.testing.assert_close(same.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert torch.equal(back.last_hidden_state, ref.last_hidden_state)
    assert out.last_hidden_state.shape[1] == 1 + 4  # CLS + k = keep_count(0.25, 16) patch tokens
    assert out.pooler_output.shape == ref.pooler_output.shape
    assert not torch.allclose(out.pooler_output, ref.pooler_output, atol=1e-4)  # the CLS saw merged tokens
    assert rec.family == "transformers"
    assert [im.counts for im in rec.images] == [{"input": 16, "vision": 4}] * 2 and rec.images[0].grids == [[4, 4]]


def test_dinov2_backbone_grid_follows_the_input_size():
    model = _hf_backbone("dinov2")
    with torch.no_grad(), vtc.compressed(model, "tome", r=2):
        out = model(pixel_values=torch.randn(1, 3, 16, 24))  # 4 x 6 patches, position table interpolated
        rec = vtc.last_record(model)
    assert rec.images[0].grids == [[4, 6]] and rec.images[0].counts["input"] == 24
    assert out.last_hidden_state.shape[1] == 1 + 24 - 3 * 2


# -- LLaVA: CLIP, SigLIP and DINOv2 towers -------------------------------------------------------------------


@pytest.mark.parametrize("tower", ["clip", "siglip", "dinov2"])
def test_llava_tower_merge(tower):
    model = tiny_llava(seed=0, tower=tower)
    inputs = llava_inputs(model, ((3, 4), (6, 2)), padding_side="left")
    with torch.no_grad():
        ref = model(**inputs).logits
        ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        before = _state(model)
        with vtc.compressed(model, "tome", r=0):
            assert torch.equal(model(**inputs).logits, ref)
            assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), ref_gen)
        vtc.compress(model, "tome", budget=0.25)
        out = model(**inputs).logits
        rec = vtc.last_record(model)
        fed = compressed_inputs(model, inputs)
        vtc.restore(model)
        assert _state(model) == before and torch.equal(model(**inputs).logits, ref)
    assert out.shape[1] == ref.shape[1] - 12
    features = fed["mm_encoder_outputs"]["image"].pooler_output
    for im, feat in zip(rec.images, features, strict=True):
        assert im.counts == {"input": 16, "pre_llm": 4} and feat.shape[0] == 4
        assert sorted(set(im.groups)) == list(range(4)) and im.kept == [im.groups.index(r) for r in range(4)]
    # merged visual rows have no single source position; their positions are compact
    for sample in rec.samples:
        assert sample.position_ids == list(range(len(sample.position_ids)))


def test_llava_errors():
    model = tiny_llava()
    model.config.vision_feature_layer = [-2, -3]
    with pytest.raises(ValueError, match="vision_feature_layer"):
        vtc.compress(model, "tome", budget=0.5)
    assert not vtc.is_compressed(model) and type(model).__name__ == "LlavaForConditionalGeneration"


def test_prop_attn_off_changes_the_result():
    vit, x = _vit(), _images()
    with torch.no_grad():
        with vtc.compressed(vit, "tome", r=3):
            on = vit(x)
        with vtc.compressed(vit, "tome", r=3, prop_attn=False):
            off = vit(x)
    assert not torch.allclose(on, off) and math.isfinite(float(on.sum()))
