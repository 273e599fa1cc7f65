"""ToMe in the towers of families that pack full grids (LLaVA-NeXT, OneVision, NeXT-Video, Gemma 3, InternVL):
the merging blocks run on fewer tokens, the merged tokens are copied back onto the grid after the feature block, and
the model packs the grid it expects; a pre-LLM member stacked after it brings the LLM's tokens to the budget."""

import warnings

import pytest
import torch

import vtc
from vtc.testing import FAMILIES

#: anyres image tiles (NeXT), video frames (OneVision: pooled after the projector; NeXT-Video: before it), Gemma 3's
#: 4 x 4-pooled SigLIP grid, InternVL's pixel-shuffled tiles (its own vision layer runner)
CASES = ["llava_next", "llava_onevision", "llava_next_video", "gemma3", "internvl"]


def _tower_calls(model):
    """Every call of the vision tower's feature block: (tokens entering block 0, feature-block output)."""
    adapter = vtc.session_of(model).adapter
    blocks, calls = adapter.blocks, []

    def enter(module, args, kwargs):
        calls.append({"in": (args[0] if args else kwargs["hidden_states"]).shape[1]})

    def leave(module, args, output):
        calls[-1]["out"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handles = [blocks[0].register_forward_pre_hook(enter, with_kwargs=True)]
    handles.append(blocks[adapter.feature_block].register_forward_hook(leave))
    return adapter, calls, handles


@pytest.mark.parametrize("name", CASES)
def test_merged_tokens_are_copied_back_onto_the_grid(name):
    family = FAMILIES[name]
    model = family.build(seed=0)
    inputs = family.inputs(model, ((3, 4), (5, 2)), seed=1)
    with torch.no_grad():
        ref = model(**inputs).logits
    with pytest.warns(UserWarning, match="speeds up the vision tower only"):
        vtc.compress(model, "tome", budget=0.5)
    adapter, calls, handles = _tower_calls(model)
    try:
        with torch.no_grad():
            out = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    state = adapter._merge.ctx.state
    assert state.unmerged and len(calls) == 1
    (call,) = calls
    tokens, feat = call["in"], call["out"]
    assert feat.shape[1] == tokens  # the full grid leaves the feature block
    n = tokens - adapter.prefix  # "default" strategy: the LLM side drops CLS
    k = vtc.keep_count(0.5, n)
    assert state.counts[adapter.feature_block + 1] == k + adapter.prefix  # merged down to the budget's share
    origin = state.origin
    for row in range(feat.shape[0]):
        groups = origin[row]
        assert groups.unique().numel() == k + adapter.prefix
        # every position holds its group's row: equal rows within a group, and the group's row is one of them
        first = torch.zeros(int(groups.max()) + 1, dtype=torch.long).scatter_(
            0, groups.flip(0), torch.arange(tokens - 1, -1, -1)
        )
        torch.testing.assert_close(feat[row], feat[row][first[groups]], atol=0, rtol=0)
    rec = vtc.last_record(model)
    assert all(im.counts == {"input": im.num_input, "pre_llm": im.num_input} for im in rec.images)
    assert out.shape == ref.shape and not torch.allclose(out, ref)  # the LLM gets every token, merged content
    vtc.restore(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("name", CASES)
def test_a_stack_reaches_the_budget_after_the_unmerged_tower(name):
    family = FAMILIES[name]
    model = family.build(seed=0)
    inputs = family.inputs(model, ((3, 4),), seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stack reduces the LLM's tokens: nothing to warn about
        vtc.compress(model, ["tome", "divprune"], budget=0.25)
    with torch.no_grad():
        model(**inputs)
    (im,) = vtc.last_record(model).images
    k = vtc.keep_count(0.25, im.num_input)
    assert im.counts == {
        "input": im.num_input,
        "pre_llm:tome": im.num_input,
        "pre_llm": k,
    }
    state = vtc.session_of(model).adapter._merge.ctx.state
    assert state.unmerged and min(state.counts) < state.counts[0]  # the tower merged before copying back


@pytest.mark.parametrize("name", CASES)
def test_generate_with_the_cache_equals_cache_free_steps(name):
    family = FAMILIES[name]
    model = family.build(seed=0)
    inputs = family.inputs(model, ((3, 4),), seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vtc.compress(model, "tome", budget=0.4)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    visual = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    for t in range(4):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **visual).logits[:, -1]
        eos = model.generation_config.eos_token_id
        logits[:, [eos] if isinstance(eos, int) else list(eos or [])] = float("-inf")  # min_new_tokens
        nxt = logits.argmax(-1)
        assert torch.equal(nxt, generated[:, inputs["input_ids"].shape[1] + t])
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def test_a_member_reading_tower_attention_is_refused_and_the_model_untouched():
    family = FAMILIES["llava_onevision"]
    model = family.build(seed=0)
    before = type(model), [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="would read merged tokens"):
        vtc.compress(model, ["tome", "visionzip"], budget=0.25)
    assert not vtc.is_compressed(model) and (type(model), [type(m) for m in model.modules()]) == before
