"""Position policies: what the LLM sees at prefill and at every decode step."""

import pytest
import torch

import vtc
from vtc.testing import llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=1)


def _capture_positions(model):
    seen = []

    def grab(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    return seen, model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_decode_positions_continue_from_the_right_place(model, positions):
    inputs = llava_inputs(model, ((3, 4), (6, 2)), padding_side="left", seed=5)
    mask = inputs["attention_mask"]
    full_last = mask.sum(1) - 1  # the last prompt position of each sample, uncompressed
    seen, handle = _capture_positions(model)
    try:
        with vtc.compressed(model, "hired", budget=0.25, positions=positions):
            model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
            rec = vtc.last_record(model)
    finally:
        handle.remove()
    prefill, first_decode = seen[0], seen[1]
    removed = torch.tensor([sum(im.num_input - im.num_kept for im in rec.images_of(b)) for b in range(2)])
    expect_last = full_last if positions == "original" else full_last - removed
    assert torch.equal(prefill[:, -1], expect_last)
    assert torch.equal(first_decode[:, -1], expect_last + 1)
    assert torch.equal(seen[2][:, -1], expect_last + 2)


def test_original_positions_are_the_kept_tokens_own(model):
    inputs = llava_inputs(model, ((3, 4),), seed=2)
    with vtc.compressed(model, "divprune", budget=0.25, positions="original"):
        with torch.no_grad():
            model(**inputs)
        rec = vtc.last_record(model)
    (im,) = rec.images
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    pos = rec.samples[0].position_ids
    visual_rows = [r for r, src in enumerate(rec.samples[0].source_positions) if start <= src < start + im.num_input]
    assert [pos[r] for r in visual_rows] == [start + i for i in im.kept]
    # text after the image keeps its original positions too
    assert pos[-1] == inputs["input_ids"].shape[1] - 1


def test_compact_positions_are_contiguous(model):
    inputs = llava_inputs(model, ((3, 4),), seed=2)
    with vtc.compressed(model, "random", budget=0.25):
        with torch.no_grad():
            out = model(**inputs)
        rec = vtc.last_record(model)
    assert rec.positions == "compact"
    assert rec.samples[0].position_ids == list(range(out.logits.shape[1]))


def test_forward_logits_rows_follow_source_positions(model):
    inputs = llava_inputs(model, ((3, 4),), seed=2)
    with torch.no_grad():
        full = model(**inputs).logits[0]
    with vtc.compressed(model, "uniform", budget=1.0):
        with torch.no_grad():
            same = model(**inputs).logits[0]
    assert torch.equal(full, same)
    with vtc.compressed(model, "uniform", budget=0.25):
        with torch.no_grad():
            short = model(**inputs).logits[0]
        src = vtc.last_record(model).samples[0].source_positions
    assert len(src) == short.shape[0]
    # rows before the image see exactly the same prefix, so their logits match the uncompressed run
    start = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    torch.testing.assert_close(short[:start], full[:start])
    assert src[:start] == list(range(start))


def test_holitom_inner_merge_keeps_positions_and_its_outer_stage_renumbers():
    """HoliTom's official code renumbers the sequence its outer stage builds and keeps the kept rows' position
    ids after its merge inside the LLM. A hand-made example: one video, the prompt ``BOS t t t <video> t t t t``."""
    from vtc.testing import llava_video_inputs, tiny_llava_onevision

    model = tiny_llava_onevision(seed=0)
    inputs = llava_video_inputs(model, ((3, 4),), frames=4, seed=3)
    layers = model.model.language_model.layers
    seen = {}

    def grab(layer):
        def hook(module, args, kwargs):  # registered after vtc's hooks: sees what the layer really gets
            seen.setdefault(layer, []).append(kwargs["position_ids"][0].tolist())

        return hook

    with vtc.compressed(model, "holitom", budget=0.5):
        inner = vtc.session_of(model).adapter.llm.prune_layers[0]  # round(4 * 18 / 28) = 3
        handles = [layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in (inner - 1, inner)]
        try:
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        finally:
            for h in handles:
                h.remove()
        rec = vtc.last_record(model)
    assert (rec.positions, rec.llm_positions) == ("compact", "original")
    (im,) = rec.images
    k = im.counts["pre_llm"]  # 19 of 37 tokens + the video's newline: 20
    length = 1 + 3 + k + 4
    # the outer stage renumbers: the LLM receives 0 .. length-1
    assert seen[inner - 1][0] == list(range(length))
    # the inner merge drops half the visual rows; every row left keeps its position id, text after included
    kept_rows = [4 + i for i, token in enumerate(im.kept) if token in set(im.layers[str(inner)])]
    assert len(kept_rows) == im.counts[f"llm_layer_{inner}"] == round(k / 2)
    assert seen[inner][0] == [0, 1, 2, 3, *kept_rows, length - 4, length - 3, length - 2, length - 1]
    # decoding continues after the sequence the LLM received, in every layer
    assert seen[inner - 1][1] == seen[inner][1] == [length]


def test_positions_per_stage_are_options():
    from vtc.mergers.holitom import HoliTomConfig

    assert HoliTomConfig(positions={"llm_layer": "compact"}).positions == {"llm_layer": "compact"}
    with pytest.raises(ValueError, match="unknown stage"):
        HoliTomConfig(positions={"vision": "compact"})
    with pytest.raises(ValueError, match="positions must be one of"):
        HoliTomConfig(positions={"llm_layer": "sideways"})
