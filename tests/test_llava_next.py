"""LLaVA-NeXT: anyres layout, newline policy counts, HiRED's partition budget through the model."""

import pytest
import torch

import vtc
from vtc.adapters import adapter_for
from vtc.testing import llava_next_inputs, tiny_llava_next


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next(seed=2)


def test_layout_reproduces_the_model_packing(model):
    """Features the model packs equal the base/crop tile features gathered through our layout."""
    inputs = llava_next_inputs(model, ((2, 2), (2, 2), (2, 2)), seed=0)  # wide, square and tall images
    adapter = adapter_for(model)
    captured = {}
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: captured.update(out=o))
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    handle.remove()
    tiles = captured["out"]  # [sum tiles, 16, D] projected tile features, before packing
    newline = model.model.image_newline
    image = adapter.modalities[0]
    for (layout, rows), packed in zip(image.layouts(adapter, inputs, "default"), feats.pooler_output, strict=True):
        assert layout.num_tokens == packed.shape[0]
        for t in range(layout.num_tokens):
            p, s = int(layout.partition[t]), int(layout.slot[t])
            expect = newline if s < 0 else tiles[rows[p], s - layout.prefix]
            assert torch.equal(packed[t], expect), t
        assert (
            layout.arrangement is not None
            and layout.num_partitions == 1 + layout.arrangement[0] * layout.arrangement[1]
        )


@pytest.mark.parametrize("policy", ["drop", "keep_rows", "candidates"])
def test_newline_policy_changes_counts_as_documented(model, policy):
    inputs = llava_next_inputs(model, ((3, 4),), seed=1)  # a square image: 16 + 64 + 8 newline tokens
    with vtc.compressed(model, "hired", budget=0.25, newlines=policy):
        with torch.no_grad():
            model(**inputs)
        (im,) = vtc.last_record(model).images
    newline = [s < 0 for s in im.slot]
    n, k = im.num_input, vtc.keep_count(0.25, im.num_input)
    assert im.newlines["input"] == sum(newline) == 8 and n == 88
    kept_newlines = sum(newline[i] for i in im.kept)
    if policy == "drop":
        assert im.counts["pre_llm"] == k and kept_newlines == 0
    elif policy == "keep_rows":
        rows_with_tokens, start = 0, 0
        for i, is_nl in enumerate(newline):
            if is_nl:
                rows_with_tokens += any(start <= j < i for j in im.kept if not newline[j])
                start = i + 1
        assert kept_newlines == rows_with_tokens > 0
        assert im.counts["pre_llm"] == k + rows_with_tokens
    else:  # candidates: separators compete with patches (hired scores them -inf, so none survive)
        assert im.counts["pre_llm"] == k and kept_newlines == 0
    assert im.newlines["pre_llm"] == kept_newlines


def test_divprune_treats_newlines_as_candidates_by_default(model):
    inputs = llava_next_inputs(model, ((3, 4),), seed=1)
    with vtc.compressed(model, "divprune", budget=0.25):
        with torch.no_grad():
            model(**inputs)
        (im,) = vtc.last_record(model).images
    # identical separator embeddings: max-min diversity keeps at most one of them
    assert im.newlines["pre_llm"] <= 1 and im.counts["pre_llm"] == vtc.keep_count(0.25, im.num_input)


def test_hired_splits_the_budget_across_partitions(model):
    from vtc.pruners.hired import hired_allocation

    inputs = llava_next_inputs(model, ((3, 4),), seed=1)
    with vtc.compressed(model, "hired", budget=0.25) as m:
        with torch.no_grad():
            m(**inputs)
        (im,) = vtc.last_record(m).images
    per_partition = [0] * len(im.grids)
    for i in im.kept:
        per_partition[im.partition[i]] += 1
    k = vtc.keep_count(0.25, im.num_input)
    assert sum(per_partition) == k
    # the same allocation computed from the early-layer CLS attention of the full image
    captured = {}
    layer0 = model.model.vision_tower.encoder.layers[0].self_attn
    hooks = [
        layer0.q_proj.register_forward_hook(lambda mod, a, o: captured.update(q=o)),
        layer0.k_proj.register_forward_hook(lambda mod, a, o: captured.update(k=o)),
    ]
    with torch.no_grad():
        model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    for h in hooks:
        h.remove()
    early = vtc.kernels.attention_row(captured["q"], captured["k"], 0, "sum", num_heads=4)[0, 1:]
    caps = [sum(1 for p, s in zip(im.partition, im.slot, strict=True) if p == q and s >= 0) for q in range(5)]
    assert per_partition == hired_allocation(k, 0.5, early, (4, 4), (2, 2), caps[0], caps[1:], "code")


@pytest.mark.parametrize("method", ["pool", "uniform"])
@pytest.mark.parametrize("budget", [0.5, 0.75, 24])
def test_grid_baselines_cover_unpadded_crops_at_any_budget(model, method, budget):
    """Unpadding removes whole rows or columns of a crop grid: pool and uniform cover the rows and columns
    that are left (they used to place regions on removed cells and fail above about a quarter of the tokens)."""
    inputs = llava_next_inputs(model, ((3, 4), (6, 2)), padding_side="left")
    with vtc.compressed(model, method, budget=budget):
        with torch.no_grad():
            model(**inputs)
        rec = vtc.last_record(model)
    for im in rec.images:
        assert im.counts["pre_llm"] == vtc.keep_count(budget, im.num_input)
        groups = torch.tensor(im.groups)
        sizes = torch.bincount(groups[groups >= 0])
        assert len(sizes) == len(im.kept) and int(sizes.min()) >= 1
