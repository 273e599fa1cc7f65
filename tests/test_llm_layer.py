"""In-LLM pruning (LLM_LAYER): decode agrees with cache-free forwards, per-layer caches, sdpa == eager."""

import logging
import warnings

import pytest
import torch

import vtc
from vtc.adapters import ADAPTERS
from vtc.contexts import Stage
from vtc.testing import FAMILIES, llava_inputs, tiny_llava

from .conftest import TOL

LLM_METHODS = {
    "fastv": {},
    "dart": {"pivot_image": 2, "pivot_text": 2},
    "pdrop": {},
    "transprune": {},  # points 1, 2, 3 on the tiny 4-layer models
    "todre": {"layer": 2, "tau": 1.0},  # tau=1 makes stage 2 fire on the tiny model
    "todre-kept": {"layer": 2, "tau": 0.0},  # stage 2 never fires: visual tokens stay to the end
    "holitom": {},  # outer merge, then the inner merge at layer round(4 * 18 / 28) = 3
    "divprune+fastv": {},  # a stack: DivPrune before the LLM, FastV's last cut inside it
    "aim": {"start": 0.25},  # merge, then PageRank ranking after layers 1, 2 (prunes before 2 and 3)
    "mustdrop": {},  # LLaVA-1.5 only: filters after layers 0, 1, 2 (2, 6, 10, 14 of 32 scaled)
    "mustdrop-merge": {"merge_thr": -1.0},  # every window similar enough: the tower merges to the budget's cap
    "mustdrop-llm": {"tower_stage": False},  # the LLM stages alone, on every family
}
#: in-LLM methods covered elsewhere: DyCoke's decode-time selection (test_video_mergers.py)
DECODE_TIME = {"dycoke"}


#: the ones that take images (the tests below that use the tiny LLaVA-1.5)
def _modalities(method: str) -> tuple[str, ...]:
    parts = [vtc.get_method(m).method_class.modalities for m in method.split("+")]
    return tuple(x for x in parts[0] if all(x in p for p in parts))


IMAGE_METHODS = sorted(n for n in LLM_METHODS if "image" in _modalities(n.split("-")[0]))
BATCH = ((3, 4), (6, 2))


def _opts(name):
    return name.split("-")[0], LLM_METHODS[name]


def test_every_llm_layer_method_is_covered():
    registered = {m.name for m in vtc.list_methods() if Stage.LLM_LAYER in m.stages}
    assert registered == {n.split("-")[0] for n in LLM_METHODS if "+" not in n} | DECODE_TIME


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=4)


def _positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(LLM_METHODS))
def test_generate_with_cache_equals_cache_free_forwards(family, name):
    """DESIGN invariant 4: greedy tokens and logits of cached decoding equal step-by-step cache-free forwards
    that apply the same kept set (the prefill's selection replayed)."""
    method, opts = _opts(name)
    tiny = FAMILIES[family]
    if tiny.modality not in _modalities(method):
        pytest.skip(f"{method} takes {_modalities(method)} inputs")
    if Stage.LLM_LAYER not in ADAPTERS[tiny.model_type].stages:
        pytest.skip(f"{family} has no LLM-layer hook point")
    impl = vtc.method_for(method, **opts)
    adapter = ADAPTERS[tiny.model_type]
    if set(impl.stages) - adapter.stages or (
        {Stage.VISION_MERGE, Stage.LLM_LAYER} <= set(impl.stages) and adapter.tower_unmerge
    ):
        pytest.skip(f"{name} merges in the tower, which {family} does not take (tower_stage=False does)")
    model = tiny.build(seed=4)
    inputs = tiny.inputs(model, BATCH, padding_side="left", seed=7)
    mrope = "mm_token_type_ids" in inputs  # M-RoPE: the model derives 3-D positions from the token types
    steps = 8
    # a random model may pick a placeholder id, which the replayed prompt would count as a visual token
    placeholders = [getattr(model.config, f"{x}_token_id", None) for x in ("image", "video")]
    placeholders = [t for t in placeholders if t is not None]
    with vtc.compressed(model, method, budget=0.25, **opts):
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            suppress_tokens=placeholders,
            output_logits=True,
            return_dict_in_generate=True,
        )
        session = vtc.session_of(model)
        kept = dict(session.adapter.llm.call.kept_rows)
        if hasattr(session.method, "merge_into"):  # replay the selection, redo the merge on these hidden states
            impl = session.method
            session.method.prune = lambda ctx: impl.merge_into(ctx, kept[ctx.layer])
        else:
            session.method.prune = lambda ctx: kept[ctx.layer]  # replay the prefill's selection
        prompt = inputs["input_ids"]
        step = dict(inputs)
        for t in range(steps):
            extra = {} if mrope else {"position_ids": _positions(step["attention_mask"])}
            with torch.no_grad():
                logits = model(**step, **extra, use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, out.logits[t], atol=TOL["logits_fp32"], rtol=0)
            eos = model.generation_config.eos_token_id
            banned = torch.tensor([*torch.tensor([eos]).flatten().tolist(), *placeholders])  # min_new_tokens
            nxt = logits.index_fill(-1, banned, float("-inf")).argmax(-1)
            assert torch.equal(nxt, out.sequences[:, prompt.shape[1] + t]), f"step {t}"
            step["input_ids"] = torch.cat([step["input_ids"], nxt[:, None]], 1)
            step["attention_mask"] = torch.cat([step["attention_mask"], torch.ones_like(nxt[:, None])], 1)
            for key in ("mm_token_type_ids", "token_type_ids"):  # row-aligned types (M-RoPE; Gemma 3's image blocks)
                if key in step:
                    step[key] = torch.cat([step[key], torch.zeros_like(nxt[:, None])], 1)


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_kv_cache_lengths_per_layer(model, name):
    method, opts = _opts(name)
    inputs = llava_inputs(model, ((3, 4), (3, 4)), padding_side="left", seed=1)  # equal lengths: no re-padding
    length = inputs["input_ids"].shape[1]
    with vtc.compressed(model, method, budget=0.25, **opts):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        rec = vtc.last_record(model)
        prune_layers = vtc.session_of(model).adapter.llm.prune_layers
    lengths = [layer.keys.shape[-2] for layer in out.cache.layers]
    n = 16
    k0 = rec.images[0].counts["pre_llm"]
    expect, current = [], length - (n - k0)
    for layer in range(len(lengths)):
        if layer in prune_layers:
            current = length - (n - k0) - (k0 - rec.images[0].counts[f"llm_layer_{layer}"])
        expect.append(current)
    assert lengths == expect
    assert lengths[0] == length - (n - k0)  # layers before the first prune hold the whole (pre-LLM) prompt
    if name == "fastv":
        assert lengths == [length, length, length - 12, length - 12]
    if name == "todre":
        assert lengths == [length - 12] * 3 + [length - 16]  # stage 2 dropped all 4 visual tokens
    if name == "divprune+fastv":  # 8 of 16 reach the LLM (the geometric share), FastV keeps k = 4 of the 16
        assert lengths == [length - 8, length - 8, length - 12, length - 12]


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_sdpa_and_eager_choose_the_same_tokens_without_fallback(name, caplog):
    method, opts = _opts(name)
    kept = {}
    for impl in ("sdpa", "eager"):
        m = tiny_llava(seed=4, attn_implementation=impl)
        inputs = llava_inputs(m, BATCH, padding_side="left", seed=7)
        with vtc.compressed(m, method, budget=0.25, **opts):
            with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
                warnings.simplefilter("always")
                out = m.generate(**inputs, max_new_tokens=4, do_sample=False)
            kept[impl] = ([im.layers for im in vtc.last_record(m).images], out)
            assert m.config._attn_implementation == impl
        assert not [w for w in caught if "eager" in str(w.message) or "attention" in str(w.message)]
        assert not [r for r in caplog.records if "eager" in r.getMessage()]
    assert kept["sdpa"][0] == kept["eager"][0]
    assert torch.equal(kept["sdpa"][1], kept["eager"][1])


def test_recomputed_attention_rows_equal_eager_attention_weights():
    """The attention row recomputed from a layer's q/k equals what eager attention returns."""
    from vtc.adapters.llm import Decoder

    m = tiny_llava(seed=4, attn_implementation="eager")
    inputs = llava_inputs(m, ((3, 4),), seed=2)
    captured = {}
    layer = 1
    handle = m.model.language_model.layers[layer].register_forward_pre_hook(
        lambda mod, a, kw: captured.update(x=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        out = m(**inputs, output_attentions=True)
    handle.remove()
    eager = out.attentions[layer][0].mean(0)  # [L, L] head-mean
    dec = Decoder(m.model.language_model)
    x = captured["x"]
    cos, sin = captured["pe"]
    rows = [torch.arange(x.shape[1])]
    valid = torch.ones(1, x.shape[1], dtype=torch.bool)
    (mine,) = dec.attention_rows(layer, x, cos, sin, valid, rows)
    torch.testing.assert_close(mine, eager, atol=TOL["attention_rows"], rtol=0)


def _llm_layer_families():
    from vtc.adapters import ADAPTERS
    from vtc.contexts import Stage
    from vtc.testing import FAMILIES

    return sorted(n for n, f in FAMILIES.items() if Stage.LLM_LAYER in ADAPTERS[f.model_type].stages)


@pytest.mark.parametrize("name", _llm_layer_families())
def test_recomputed_attention_rows_equal_eager_weights_in_every_family(name):
    """Each family's decoder as the model runs it (Qwen2-VL's multimodal RoPE, Qwen3-VL's per-head q / k norms,
    grouped KV heads): the rows vtc recomputes equal the eager attention weights of layer 1."""
    from vtc.adapters import adapter_for
    from vtc.testing import FAMILIES

    family = FAMILIES[name]
    m = family.build(seed=4, attn_implementation="eager")
    inputs = family.inputs(m, ((3, 4),))
    # Gemma 3: image rows form a bidirectional block (token_type_ids); layers 0-2 slide over 6 rows, layer 3 is global
    types = inputs.get("token_type_ids")
    blocks = None if types is None else torch.where(types == 1, 0, -1)
    for layer in (1, m.config.get_text_config().num_hidden_layers - 1):
        captured: dict = {}
        handle = m.model.language_model.layers[layer].register_forward_pre_hook(
            lambda mod, a, kw, seen=captured: seen.update(
                x=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]
            ),
            with_kwargs=True,
        )
        with torch.no_grad():
            eager = m(**inputs, output_attentions=True).attentions[layer][0].mean(0)  # [L, L] head-mean
        handle.remove()
        x = captured["x"]
        valid = torch.ones(1, x.shape[1], dtype=torch.bool)
        rows = [torch.arange(x.shape[1])]
        (mine,) = adapter_for(m).decoder().attention_rows(layer, x, *captured["pe"], valid, rows, blocks=blocks)
        torch.testing.assert_close(mine, eager, atol=TOL["attention_rows"], rtol=0)


def test_fastv_keeps_the_most_attended_tokens_and_records_equivalent_budget(model):
    inputs = llava_inputs(model, ((3, 4),), seed=3)
    with vtc.compressed(model, "fastv", budget=0.25, layer=2):
        with torch.no_grad():
            model(**inputs)
        rec = vtc.last_record(model)
    (im,) = rec.images
    assert im.kept == list(range(16)) and im.counts == {"input": 16, "pre_llm": 16, "llm_layer_2": 4}
    assert len(im.layers["2"]) == 4
    # equivalent budget = (K n + (L - K) k) / (L n) = (2*16 + 2*4) / (4*16)
    assert rec.equivalent_budget == pytest.approx((2 * 16 + 2 * 4) / 64)
    assert rec.visual_per_layer == [[16, 16, 4, 4]]
    length = inputs["input_ids"].shape[1]  # 1 + 3 + 16 + 4
    full = vtc.flops.prefill_flops(model.config.text_config, length)
    short = vtc.flops.prefill_flops(model.config.text_config, [length, length, length - 12, length - 12])
    assert rec.flops["ratio"] == pytest.approx(short / full)
    # the kept tokens are the top-4 by the last prompt token's attention in layer K-1 = 1 (untouched model)
    from vtc.adapters.llm import Decoder

    captured = {}
    handle = model.model.language_model.layers[1].register_forward_pre_hook(
        lambda mod, a, kw: captured.update(x=a[0] if a else kw["hidden_states"], pe=kw["position_embeddings"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    x = captured["x"]
    (row,) = Decoder(model.model.language_model).attention_rows(
        1, x, *captured["pe"], torch.ones(1, x.shape[1], dtype=torch.bool), [torch.tensor([x.shape[1] - 1])]
    )
    start = 4  # BOS + 3 text tokens before the image
    top = torch.sort(row[0, start : start + 16], descending=True, stable=True).indices[:4]
    assert sorted(top.tolist()) == im.layers["2"]


def test_pdrop_stage_counts_follow_the_official_schedule():
    from vtc.budget import stage_counts

    assert stage_counts(0.125, 576, 3) == [288, 144, 72]
    assert stage_counts(0.125, 2880, 3) == [1440, 720, 360]
    assert stage_counts(0.2, 576, 3)[-1] == 115
    assert stage_counts(1.0, 576, 3) == [576, 576, 576]


def test_method_flops_helper_matches_the_fastv_formula():
    cfg = tiny_llava().config.text_config
    res = vtc.flops.method_flops(cfg, "fastv", budget=0.5, n_visual=16, n_text=8, layer=2)
    assert res["schedule"] == [16, 16, 8, 8]
    assert res["equivalent_budget"] == pytest.approx(0.75)
    assert res["ratio"] < 1


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_full_budget_generate_equals_the_untouched_model(model, name):
    inputs = llava_inputs(model, BATCH, padding_side="left", seed=9)
    ref = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with vtc.compressed(model, name, budget=1.0):
        assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), ref)
