"""Stacks of methods under one budget (vtc.stack): stage sizes, composition, record, config, errors.

The invariant matrix (tests/test_invariants.py) runs three stacks on every family; the in-LLM one is also in
tests/test_llm_layer.py (cached decode equals cache-free forwards, KV-cache lengths per layer).
"""

import copy
import dataclasses
import json

import pytest
import torch

import vtc
from vtc.contexts import ImageTokens, Layout
from vtc.registry import get_method
from vtc.stack import Stack, StackConfig, stack_config
from vtc.testing import compressed_inputs, llava_inputs, tiny_llava


def _image(rows=8, cols=8, k=4, dim=16, seed=0) -> ImageTokens:
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    return ImageTokens(
        tokens=torch.randn(n, dim, generator=g),
        layout=Layout.grid(rows, cols),
        k=k,
        vision_tokens=torch.randn(n, dim, generator=g),
        text_ids=torch.zeros(0, dtype=torch.long),
        text_embeds=torch.zeros(0, dim),
        project=lambda x: x,
    )


def _alone(name: str, image: ImageTokens, k: int):
    info = get_method(name)
    return info.method_class(info.config_class()).reduce(dataclasses.replace(image, k=k))


def test_default_stage_sizes_are_geometric_and_keep_sets_them():
    stack = Stack(stack_config(["pool", "divprune"], 0.1, {}))
    # two cuts from 576 to k = 58: floor(576 * (58 / 576) ** 0.5) = 182 after pooling
    assert stack._schedule(576, 58, 2) == [182, 58]
    assert stack.prompt_count(576) == 58  # the last member acts before the LLM: the budget counts there
    kept = Stack(stack_config(["pool", "divprune"], 0.1, {"keep": (0.5,)}))
    assert kept._schedule(576, 58, 2) == [288, 58]
    tight = Stack(stack_config(["pool", "divprune"], 0.1, {"keep": (0.01,)}))
    assert tight._schedule(576, 58, 2) == [58, 58]  # never below k
    inner = Stack(stack_config(["divprune", "fastv"], 0.1, {}))
    assert inner.cuts_in_llm and inner.prompt_count(576) == 182  # FastV makes the last cut, to 58, in the LLM
    three = Stack(stack_config(["pool", "uniform", "divprune"], 64, {}))
    assert three._schedule(576, 64, 3) == [276, 133, 64]  # floor(576 * (1 / 9) ** (s / 3))


def test_a_selection_after_a_selection_is_the_second_on_the_first_ones_tokens():
    image = _image(k=4)
    red = Stack(stack_config(["uniform", "divprune"], 4, {})).reduce(image)
    first = _alone("uniform", image, 16)  # 64 -> 16 (geometric), then 16 -> 4
    second = _alone("divprune", image.subset(first.index), 4)
    assert red.index.tolist() == first.index[second.index].tolist()
    assert red.tokens is None and red.stages == {"uniform": 16}


def test_a_selection_after_a_merge_picks_merged_tokens_and_groups_compose():
    image = _image(k=4)
    red = Stack(stack_config(["pool", "divprune"], 4, {})).reduce(image)
    pooled = _alone("pool", image, 16)
    on_pooled = dataclasses.replace(image.subset(pooled.index), tokens=pooled.tokens, vision_tokens=None)
    picked = _alone("divprune", on_pooled, 4)
    assert torch.equal(red.tokens, pooled.tokens[picked.index])
    assert red.index.tolist() == pooled.index[picked.index].tolist()
    groups = red.resolve_groups(image.n)
    for row in range(4):  # each kept token: the mean of the 2 x 2 region that ended in it (pool's default space)
        members = torch.nonzero(groups == row).flatten()
        assert members.numel() == 4
        torch.testing.assert_close(red.tokens[row], image.vision_tokens[members].mean(0))
    assert int((groups >= 0).sum()) == 16  # the other 12 regions were dropped


def test_record_lists_every_stage_and_the_config_round_trips():
    model = tiny_llava(seed=4)
    inputs = llava_inputs(model, ((3, 4),), padding_side="left")
    with vtc.compressed(model, ["pool", "uniform", "divprune"], budget=2):
        model(**inputs)
        rec = vtc.last_record(model)
    (im,) = rec.images
    assert im.counts == {"input": 16, "pre_llm:pool": 8, "pre_llm:uniform": 4, "pre_llm": 2}  # 16 (2 / 16) ** (s / 3)
    assert rec.method == "pool+uniform+divprune"
    config = StackConfig.from_dict(json.loads(json.dumps(rec.config)))
    assert config.to_dict() == rec.config
    assert [m.method for m in config.members] == ["pool", "uniform", "divprune"] and config.budget == 2
    with vtc.compressed(model, "divprune+fastv", budget=0.25):
        model(**inputs)
        assert vtc.last_record(model).images[0].counts == {"input": 16, "pre_llm": 8, "llm_layer_2": 4}


def test_string_list_and_config_forms_agree_and_deepcopy_keeps_the_stack():
    model = tiny_llava(seed=4)
    inputs = llava_inputs(model, ((3, 4), (6, 2)), padding_side="left")
    outs = []
    members = (get_method("pool").config_class(), get_method("divprune").config_class())
    config = StackConfig(budget=0.25, members=members)
    for form in ("pool+divprune", ["pool", "divprune"], config):
        with vtc.compressed(model, form, budget=0.25), torch.no_grad():
            outs.append(model(**inputs).logits)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    vtc.compress(model, "pool+divprune", budget=0.25)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(**inputs).logits, outs[0])
    assert vtc.session_of(twin).method.name == "pool+divprune"
    vtc.restore(model)


@pytest.mark.parametrize(
    ("method", "options", "error", "match"),
    [
        (["divprune"], {}, ValueError, "at least two"),
        (["divprune", "tome"], {}, ValueError, "must come first"),
        (["fastv", "divprune"], {}, ValueError, "put it last"),
        (["holitom", "fastv"], {}, ValueError, "put it last"),
        (["dycoke", "pool"], {}, ValueError, "put it last"),
        (["pool", "nope"], {}, ValueError, "unknown method 'nope'"),
        (["pool", "divprune"], {"keep": (0.5, 0.2)}, ValueError, "1 values"),
        (["pool", "divprune"], {"keep": (2.0,)}, ValueError, "fractions"),
        (["pool", "divprune"], {"layer": 2}, TypeError, "unknown option"),
    ],
)
def test_bad_stacks_fail_before_the_model_is_touched(method, options, error, match):
    model = tiny_llava(seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        vtc.compress(model, method, budget=0.25, **options)
    assert not vtc.is_compressed(model) and type(model).__name__ == "LlavaForConditionalGeneration"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_member_options_go_in_member_configs_and_member_policies_are_refused():
    fastv = get_method("fastv").config_class(layer=3)
    stack = Stack(stack_config(["divprune", fastv], 0.25, {}))
    assert stack.llm_prune_layers(4) == (3,)
    with pytest.raises(ValueError, match="not on its member"):
        stack_config(["divprune", get_method("fastv").config_class(positions="compact")], 0.25, {})


def test_a_member_whose_tokens_have_no_source_must_be_last():
    model = tiny_llava(seed=4)
    inputs = llava_inputs(model, ((3, 4),), padding_side="left")
    with vtc.compressed(model, ["visionzip", "divprune"], budget=0.25):
        with pytest.raises(ValueError, match="put 'visionzip' last"):
            model(**inputs)
    with vtc.compressed(model, ["divprune", "visionzip"], budget=0.25):  # last: fine
        model(**inputs)
        assert vtc.last_record(model).images[0].counts["pre_llm"] == 4


def test_tools_take_a_stack_wherever_they_take_a_method_name():
    from vtc.apps.cli import main
    from vtc.apps.lmms_eval.args import split_args

    stack = vtc.method_for("pool+divprune", budget=0.1)
    assert stack.name == "pool+divprune" and stack.modalities == ("image", "video") and not stack.reads_prompt
    assert vtc.method_for(["divprune", "cdpruner"]).reads_prompt  # the prompt reaches the stack's selection
    args, upstream = split_args(
        {"pretrained": "x", "method": "pool+divprune", "budget": "0.1", "keep": "0.5"}, {"pretrained"}
    )
    assert isinstance(args.config, StackConfig) and args.config.keep == (0.5,) and args.config.budget == 0.1
    assert upstream == {"pretrained": "x"}
    with pytest.raises(SystemExit):  # argparse's error: an unknown member is named
        main(["demo", "--model", "tiny", "--method", "pool+nope"])


def _visual_embeds(model, inputs, method, budget):
    """Per sample, the visual rows of the embeddings the LLM receives under ``method``."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtc.compressed(model, method, budget=budget), torch.no_grad():
            model(**inputs)
            short = compressed_inputs(model, inputs)
    finally:
        handle.remove()
    rows = short["input_ids"] == model.config.image_token_id
    return [seen["embeds"][b][rows[b]] for b in range(rows.shape[0])]


def test_tome_in_the_tower_then_divprune_on_what_it_left():
    """ToMe merges inside the tower to the first stage's count (8 of 16), DivPrune picks k = 4 of those merged
    tokens: the same tokens DivPrune picks from ToMe's output alone."""
    model = tiny_llava(seed=4)
    inputs = llava_inputs(model, ((3, 4), (6, 2)), padding_side="left")
    stack = Stack(stack_config(["tome", "divprune"], 0.25, {}))
    assert stack.tower_count(16) == 8 and stack.prompt_count(16) == 4
    alone = _visual_embeds(model, inputs, "tome", 8)
    stacked = _visual_embeds(model, inputs, "tome+divprune", 0.25)
    with vtc.compressed(model, "tome+divprune", budget=0.25), torch.no_grad():
        model(**inputs)
        assert [im.counts for im in vtc.last_record(model).images] == [
            {"input": 16, "pre_llm:tome": 8, "pre_llm": 4}
        ] * 2
    for a, b in zip(alone, stacked, strict=True):
        picks = (
            get_method("divprune")
            .method_class(get_method("divprune").config_class())
            .reduce(ImageTokens(tokens=a, layout=Layout.grid(1, a.shape[0]), k=4))
        )
        torch.testing.assert_close(b, a[picks.index], rtol=0, atol=1e-6)
