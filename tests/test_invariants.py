"""The invariants of ``docs/design.md`` as one matrix: every registered method x every adapter's tiny model."""

import pytest
import torch

import vtc
from vtc.adapters import ADAPTERS
from vtc.contexts import Stage
from vtc.stack import Stack, stack_config
from vtc.testing import FAMILIES, compressed_inputs

from .conftest import TOL

#: stacks (vtc.stack) in the matrix: a merge then a selection, a selection then another that reads vision
#: signals, a selection before the LLM with the last cut inside it, and ToMe in the tower then a selection
STACKS = ["pool+divprune", "uniform+hired", "divprune+fastv", "tome+divprune"]
METHODS = [m.name for m in vtc.list_methods()] + STACKS
PRE_LLM = [m.name for m in vtc.list_methods() if Stage.PRE_LLM in m.stages]
#: stages after which the LLM receives exactly k tokens per image (VISION_MERGE: the tower outputs them)
BEFORE_LLM = {Stage.PRE_LLM, Stage.VISION_MERGE}


def _impl(method: str):
    """The method (or stack) ``vtc.compress`` builds for a matrix entry, with its default options."""
    if "+" in method:
        return Stack(stack_config(method.split("+"), 0.25, {}))
    info = vtc.get_method(method)
    return info.method_class(info.config_class())


def _tower_only(impl, family) -> bool:
    """The method merges in a tower whose merged tokens are copied back onto the grid (NeXT, OneVision), and does
    nothing else: the LLM receives every visual token."""
    stages = set(impl.stages)
    return Stage.VISION_MERGE in stages and Stage.PRE_LLM not in stages and ADAPTERS[family.model_type].tower_unmerge


def _refuses_grids(impl, family: str) -> bool:
    """A tower merge followed by in-LLM pruning (MustDrop) is refused where the tower's output is copied back onto
    full grids (``adapters/unmerge.py``); ``tests/test_mustdrop.py`` checks the refusal."""
    need = {Stage.VISION_MERGE, Stage.LLM_LAYER}
    return need <= set(impl.stages) and ADAPTERS[FAMILIES[family].model_type].tower_unmerge


def _skip_unmerged_tower(method: str, family) -> None:
    """Merging in a tower whose merged tokens are copied back onto the grid changes the features the stock model
    would compute by hand; ``tests/test_tome_grid.py`` checks those families."""
    if Stage.VISION_MERGE in _impl(method).stages and ADAPTERS[family.model_type].tower_unmerge:
        pytest.skip(f"{method} merges inside the {family.name} tower (unmerged): see test_tome_grid.py")


def _llm_stage_active(method: str, num_layers=4) -> bool:
    impl = _impl(method)
    return bool(impl.llm_prune_layers(num_layers) or impl.llm_decode_layers(num_layers))


#: methods whose whole effect is before the LLM on the tiny 4-layer models (checked against the stock model)
PRE_LLM_ONLY = [m for m in METHODS if BEFORE_LLM & set(_impl(m).stages) and not _llm_stage_active(m)]
#: budget per method in the matrix (DyCoke keeps one frame in two whole: it cannot go below ~50 % on 2 frames)
BUDGET = {"dycoke": 0.5}
ATTENTION_METHODS = [m for m in METHODS if {Stage.VISION, Stage.LLM_LAYER} & set(_impl(m).stages)]
BATCH = ((3, 4), (6, 2))  # two samples with different prompt lengths (so one is padded)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def model(family):
    return family.build(seed=0)


@pytest.fixture(autouse=True)
def _applicable(request):
    """Skip (method, family) pairs where the method does not take the family's inputs (video-only methods)
    or acts at a stage the family's adapter does not provide (token merging inside the tower)."""
    method = request.node.callspec.params.get("method") if hasattr(request.node, "callspec") else None
    family = request.node.callspec.params.get("family") if hasattr(request.node, "callspec") else None
    if not (method and family):
        return
    impl = _impl(method)
    if FAMILIES[family].modality not in impl.modalities:
        pytest.skip(f"{method} takes {impl.modalities} inputs")
    missing = set(impl.stages) - ADAPTERS[FAMILIES[family].model_type].stages
    if missing:
        pytest.skip(f"{method} acts at {sorted(s.value for s in missing)}, which {family} does not provide")
    if _refuses_grids(impl, family):
        pytest.skip(f"{method} prunes its tower's merged token set inside the LLM: {family} packs full grids")


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _eos(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _greedy(model, inputs, n=6):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)


@pytest.mark.parametrize("method", METHODS)
def test_llm_receives_exactly_k_tokens(model, family, method):
    inputs = family.inputs(model, BATCH, padding_side="right")
    seen = {}

    def grab(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"] if "input_ids" in kwargs else args[0]

    handle = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    budget = BUDGET.get(method, 0.25)
    try:
        with vtc.compressed(model, method, budget=budget):
            out = _logits(model, inputs)
            rec = vtc.last_record(model)
    finally:
        handle.remove()
    ph = model.config.image_token_id
    impl = _impl(method)
    # the budget counts before the LLM, unless the last cut is inside it (FastV; a stack ending with FastV)
    pre_llm = bool(BEFORE_LLM & set(impl.stages)) and not getattr(impl, "cuts_in_llm", False)
    tower_only = _tower_only(impl, family)
    extra_newlines = impl.default_newlines == "keep_rows"  # separators kept on top of k
    for im in rec.images:
        k = vtc.keep_count(budget, im.num_input)
        earlier = [c for c in im.counts if c.startswith("pre_llm:")]  # a stack's earlier members
        assert [c for c in im.counts if c not in earlier][:2] == ["input", "pre_llm"]
        cutting = ([impl.tower] if impl.tower else []) + impl.before if isinstance(impl, Stack) else []
        assert earlier == [f"pre_llm:{m.name}" for m in cutting[:-1]]
        kept_newlines = im.newlines.get("pre_llm", 0) if extra_newlines else 0
        if tower_only:
            assert list(im.counts.values()) == [im.num_input, im.num_input]
        elif pre_llm:
            assert im.counts["pre_llm"] == k + kept_newlines
        elif Stage.VISION_MERGE in impl.stages and not isinstance(impl, Stack):  # a threshold-driven tower (MustDrop)
            assert k <= im.counts["pre_llm"] <= im.num_input
            assert list(im.counts.values())[-1] == k
        else:
            reach = impl.prompt_count(im.num_input) if isinstance(impl, Stack) else im.num_input
            assert im.counts["pre_llm"] == reach
            assert list(im.counts.values())[-1] == k  # after the last stage
        assert len(im.kept) == im.counts["pre_llm"]
    fed = seen["ids"]
    visual = torch.isin(fed, torch.tensor([ph, getattr(model.config, "video_token_id", ph)]))
    assert int(visual.sum()) == sum(len(im.kept) for im in rec.images)
    per_sample = visual.sum(1).tolist()
    assert per_sample == [sum(len(im.kept) for im in rec.images_of(b)) for b in range(len(BATCH))]
    assert all(out.shape[1] == len(s.source_positions) for s in rec.samples)


@pytest.fixture(scope="module")
def bf16_model(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


@pytest.mark.parametrize("method", METHODS)
def test_a_bfloat16_model_compresses_in_its_own_dtype(bf16_model, family, method):
    """Users run bf16: every method's tokens (merged averages, projected contexts) reach the LLM in its dtype."""
    inputs = family.inputs(bf16_model, BATCH, padding_side="left")
    inputs = {
        k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()
    }
    budget = BUDGET.get(method, 0.25)
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds")

    handle = bf16_model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtc.compressed(bf16_model, method, budget=budget):
            out = _greedy(bf16_model, inputs, n=2)
            rec = vtc.last_record(bf16_model)
    finally:
        handle.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    if not _tower_only(_impl(method), family):
        assert all(list(im.counts.values())[-1] < im.num_input for im in rec.images)  # after the last stage
    if seen["embeds"] is not None:
        assert seen["embeds"].dtype == torch.bfloat16


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [1.0, 10_000])
def test_full_budget_is_the_untouched_model(model, family, method, budget):
    inputs = family.inputs(model, BATCH, padding_side="left")
    ref_logits, ref_gen = _logits(model, inputs), _greedy(model, inputs)
    with vtc.compressed(model, method, budget=budget):
        assert torch.equal(_logits(model, inputs), ref_logits)
        assert torch.equal(_greedy(model, inputs), ref_gen)


def _hook_state(model):
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), type(m), sorted(vars(m)))
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize("method", METHODS)
def test_restore_is_bit_exact_and_leaves_nothing(model, family, method):
    inputs = family.inputs(model, BATCH, padding_side="left")
    before_state, before_logits = _hook_state(model), _logits(model, inputs)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    vtc.compress(model, method, budget=BUDGET.get(method, 0.25))
    compressed_logits = _logits(model, inputs)
    if _tower_only(_impl(method), family):  # the LLM gets every token; the merged tower changes the features
        assert not torch.equal(compressed_logits, before_logits)
    else:
        assert compressed_logits.shape[1] < before_logits.shape[1] or vtc.last_record(model).equivalent_budget < 1
    vtc.restore(model)
    assert _hook_state(model) == before_state
    assert torch.equal(_logits(model, inputs), before_logits)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert not vtc.is_compressed(model)


@pytest.mark.parametrize("method", PRE_LLM_ONLY)
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_generate_with_cache_equals_cache_free_steps(model, family, method, positions):
    """Invariant 4: KV-cache decoding agrees with step-by-step forwards over the same compressed prompt."""
    _skip_unmerged_tower(method, family)
    inputs = family.inputs(model, BATCH, padding_side="left")
    steps = 6
    forced = ADAPTERS[model.config.model_type].forced_positions
    if forced is not None and positions != forced:  # e.g. M-RoPE: a clear error, model untouched
        with pytest.raises(ValueError, match="positions"):
            vtc.compress(model, method, budget=BUDGET.get(method, 0.25), positions=positions)
        assert not vtc.is_compressed(model)
        return
    with vtc.compressed(model, method, budget=BUDGET.get(method, 0.25), positions=positions):
        generated = _greedy(model, inputs, steps)
        short = compressed_inputs(model, inputs, for_generate=True)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(generated[:, :prompt_len], inputs["input_ids"])  # the caller's prompt comes back
    new_tokens = generated[:, prompt_len:]
    ids, mask, pos = short["input_ids"], short["attention_mask"], short["position_ids"]
    # row-aligned inputs that shape the prompt's attention (Gemma 3's token_type_ids: bidirectional image blocks)
    types = {key: short[key] for key in ("token_type_ids",) if short.get(key) is not None}
    for t in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                use_cache=False,
                mm_encoder_outputs=short["mm_encoder_outputs"],
                **types,
            ).logits[:, -1]
        logits[:, _eos(model)] = float("-inf")  # generate's min_new_tokens forbids stopping early
        nxt = logits.argmax(-1)
        assert torch.equal(nxt, new_tokens[:, t]), f"step {t}"
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = torch.cat([pos, pos[..., -1:] + 1], -1)
        types = {key: torch.cat([v, torch.zeros_like(v[:, :1])], 1) for key, v in types.items()}


@pytest.mark.parametrize("method", PRE_LLM_ONLY)
def test_selection_equals_feeding_kept_embeddings_by_hand(model, family, method):
    """Invariant 5, for selections: the untouched model fed only the kept features at the stated positions."""
    _skip_unmerged_tower(method, family)
    inputs = family.inputs(model, ((3, 4),), padding_side="left")
    with vtc.compressed(model, method, budget=BUDGET.get(method, 0.25)):
        out = _logits(model, inputs)
        rec = vtc.last_record(model)
    (im,) = rec.images
    if sorted(g for g in im.groups if g >= 0) != list(range(len(im.kept))) or -1 in im.kept:
        pytest.skip(f"{method} merges tokens: not a pure selection")
    ids = inputs["input_ids"][0]
    placeholder = model.config.video_token_id if family.modality == "video" else model.config.image_token_id
    rows_in = (ids == placeholder).nonzero().flatten()  # one run, or (Qwen3-VL video) one run per frame
    segment = torch.cat([torch.zeros(1, dtype=torch.long), (rows_in[1:] - rows_in[:-1] != 1).long().cumsum(0)])
    with torch.no_grad():
        visual = {key: inputs[key] for key in family.image_keys}
        output = getattr(model.model, f"get_{family.modality}_features")(**visual)
        kept = torch.tensor(im.kept)
        feats = output.pooler_output[0]
        embed = model.get_input_embeddings()
        # the prompt with each run of placeholders replaced by the kept features of that run, in the kept order
        pieces, is_visual, taken = [], [], []
        first_of = {int(rows_in[segment == s][0]): s for s in segment.unique().tolist()}
        for r in range(ids.shape[0]):
            if r in first_of:
                mine = kept[segment[kept] == first_of[r]]
                pieces.append(feats[mine])
                is_visual += [True] * len(mine)
                taken.append(mine)
            elif ids[r] != placeholder:
                pieces.append(embed(ids[r : r + 1]))
                is_visual.append(False)
        seq = torch.cat(pieces)[None]
        rows = torch.tensor(is_visual)[None]
        assert torch.equal(torch.cat(taken), kept)  # the record's LLM order is the prompt order
        pos = torch.tensor(rec.samples[0].position_ids)
        pos = pos[None] if pos.dim() == 1 else pos[:, None]  # 1-D, or M-RoPE rows
        mask = torch.ones(1, seq.shape[1], dtype=torch.long)
        if getattr(output, "deepstack_features", None) is None:
            extra = {}
            if "token_type_ids" in inputs:  # Gemma 3: the kept image rows form one bidirectional block
                extra["token_type_ids"] = rows.long()
            by_hand = model(inputs_embeds=seq, position_ids=pos, attention_mask=mask, **extra).logits
        else:  # Qwen3-VL: each DeepStack level's kept rows, added at the kept visual rows after the first layers
            deepstack = [level[0][kept] for level in output.deepstack_features]
            text_row = torch.arange(seq.shape[1])[None, None]
            hidden = model.model.language_model(
                inputs_embeds=seq,
                position_ids=torch.cat([text_row, pos]),
                attention_mask=mask,
                visual_pos_masks=rows,
                deepstack_visual_embeds=deepstack,
            ).last_hidden_state
            by_hand = model.lm_head(hidden)
    torch.testing.assert_close(out, by_hand, atol=TOL["logits_fp32"], rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_sample_alone(model, family, method):
    """Invariant 6: different images and prompt lengths, padded, give each sample's own result."""
    for side, use_generate in (("left", True), ("right", False)):
        batch = family.inputs(model, BATCH, padding_side=side, seed=3)
        with vtc.compressed(model, method, budget=BUDGET.get(method, 0.25)):
            if use_generate:
                together = _greedy(model, batch)
            else:
                together = _logits(model, batch)
                rows = vtc.last_record(model).samples
            for b in range(len(BATCH)):
                alone_inputs = family.inputs(model, BATCH, padding_side=side, seed=3)
                keep = alone_inputs["attention_mask"][b].bool()
                shape = alone_inputs["input_ids"].shape
                single = {  # every per-token input of the sample, without its padding, and its image
                    key: value[b : b + 1, keep]
                    for key, value in alone_inputs.items()
                    if isinstance(value, torch.Tensor) and value.shape == shape
                }
                single.update(family.sample_visual(alone_inputs, b))
                if use_generate:
                    alone = _greedy(model, single)
                    pad = int((~keep).sum())
                    assert torch.equal(together[b, pad:], alone[0]), f"sample {b}"
                else:
                    alone = _logits(model, single)[0]
                    assert rows[b].output_length == alone.shape[0]
                    mine = together[b, : alone.shape[0]]  # right padding: the sample's rows come first
                    torch.testing.assert_close(mine, alone, atol=TOL["logits_fp32"], rtol=0)


@pytest.mark.parametrize("method", ATTENTION_METHODS)
def test_sdpa_and_eager_choose_the_same_tokens(family, method):
    """Invariant 7: attention signals come from the layer's q/k, so the attention kernel does not matter."""
    kept = {}
    for impl in ("sdpa", "eager"):
        model = family.build(seed=0, attn_implementation=impl)
        inputs = family.inputs(model, BATCH, padding_side="left")
        with vtc.compressed(model, method, budget=BUDGET.get(method, 0.25)):
            _logits(model, inputs)
            kept[impl] = [im.kept for im in vtc.last_record(model).images]
    assert kept["sdpa"] == kept["eager"]
