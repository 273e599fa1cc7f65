"""Gemma 3: bidirectional attention among exactly the kept image tokens of each block; pooled signals and
pre-projector features line up with the model's 4 x 4-pooled tokens; in-LLM pruning gives each later layer the
mask and RoPE of its kind."""

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.testing import gemma3_inputs, tiny_gemma3


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3(seed=1)


def test_the_mask_the_model_builds_is_bidirectional_among_exactly_the_kept_image_tokens(model):
    inputs = gemma3_inputs(model, ((2, 3), (5, 1)), images_per_sample=2, padding_side="left", seed=4)
    seen = {}

    def grab(module, args, kwargs):
        seen["masks"], seen["embeds"] = kwargs["attention_mask"], kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtc.compressed(model, "divprune", budget=0.25):
            with torch.no_grad():
                model(**inputs)
            short = vtc.testing.compressed_inputs(model, inputs)
    finally:
        handle.remove()
    ids, pad = short["input_ids"], short["attention_mask"].bool()
    image = short["token_type_ids"] == 1
    assert torch.equal(image, ids == model.config.image_token_id)  # the stream took the rows of the ids
    assert image.sum(-1).tolist() == [8, 8]  # two images of 16 tokens each, 4 kept of each
    # by hand: causal, plus both directions inside each run of kept image rows, never onto padding
    n = ids.shape[1]
    start = image & ~F.pad(image, (1, 0))[:, :-1]
    block = torch.where(image, start.long().cumsum(-1), torch.zeros_like(ids))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] > 0)
    expected = (causal | same) & pad[:, None, :]
    full = seen["masks"]["full_attention"]
    assert full.dtype == torch.bool and full.shape[-2:] == (n, n)
    real = pad[:, :, None]  # rows of padding queries are not compared (the model fills them its own way)
    assert torch.equal(full[:, 0] & real, expected & real)
    for b in range(2):
        runs = block[b].unique()
        assert len(runs[runs > 0]) == 2  # each image is still its own block


def test_pooled_signals_and_pre_projector_features_match_the_models_tokens(model):
    inputs = gemma3_inputs(model, ((3, 2),), seed=2)
    with vtc.compressed(model, "fopru", budget=0.5):  # fopru asks for head-mean attention received
        adapter = vtc.session_of(model).adapter
        encoded = adapter.encode(inputs)
    (im,) = encoded.images
    assert im.layout.grids == ((4, 4),) and im.tokens.shape[0] == 16
    # the pre-projector features are the 2 x 2-pooled SigLIP features: projecting them gives the model's tokens
    torch.testing.assert_close(im.project(im.vision_tokens), im.tokens, atol=1e-5, rtol=0)
    # the signal by hand: attention each patch receives (mean over heads and queries), averaged per 2 x 2 window
    with torch.no_grad():
        model.model.vision_tower.set_attn_implementation("eager")
        try:
            out = model.model.vision_tower(inputs["pixel_values"], output_attentions=True)
        finally:
            model.model.vision_tower.set_attn_implementation("sdpa")
    received = out.attentions[-1][0].mean(0).mean(0)  # [64]
    by_hand = F.avg_pool2d(received.reshape(1, 1, 8, 8), 2).flatten()
    (signal,) = im.signals.values()
    torch.testing.assert_close(signal[0].float(), by_hand, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_in_llm_pruning_gives_each_later_layer_the_mask_and_rope_of_its_kind_over_the_kept_rows(model, positions):
    """FastV prunes before layer 2 (sliding window 6) and so layer 3 (global) runs on the kept rows too: each gets
    causal OR its own image block among the kept image rows (AND the window for the sliding layer), never onto
    padding, and the rotary embeddings of its own kind at the kept rows' positions."""
    inputs = gemma3_inputs(model, ((2, 3), (5, 1)), images_per_sample=2, padding_side="left", seed=4)
    seen = {}

    def grab(layer):
        def hook(module, args, kwargs):
            seen[layer] = (kwargs["attention_mask"], kwargs["position_ids"], kwargs["position_embeddings"])

        return hook

    layers = model.model.language_model.layers
    with vtc.compressed(model, "fastv", budget=0.25, layer=2, positions=positions):
        # registered after vtc's own layer hooks, so they see what the layers get
        handles = [layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in (2, 3)]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in handles:
                h.remove()
        call = vtc.session_of(model).adapter.llm.call
        pad, visual, image = call.mask2d, call.visual, call.row_image
    n = pad.shape[1]
    assert visual.sum(-1).tolist() == [8, 8]  # 25 % of two 16-token images per sample
    rows = torch.arange(n)
    causal = rows[None, :] <= rows[:, None]
    block = torch.where(visual, image, -1)
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    window = rows[None, :] > rows[:, None] - model.config.text_config.sliding_window
    real = pad[:, :, None]
    rope = model.model.language_model.rotary_emb
    for layer, kind, allowed in ((2, "sliding_attention", window), (3, "full_attention", None)):
        mask, pos, (cos, sin) = seen[layer]
        expected = (causal | same) & pad[:, None, :]
        if allowed is not None:
            expected = expected & allowed
        assert mask.dtype == torch.bool and mask.shape[-2:] == (n, n)
        assert torch.equal(mask[:, 0] & real, expected & real), kind
        ref_cos, ref_sin = rope(torch.zeros(1, dtype=torch.float32), pos, kind)
        assert torch.equal(cos[pad], ref_cos[pad]) and torch.equal(sin[pad], ref_sin[pad]), kind
    assert not torch.equal(seen[2][2][0], seen[3][2][0])  # the two kinds' RoPE differ (local and global bases)


def test_pan_and_scan_crops_from_the_processor_are_items_with_their_own_share(tmp_path):
    """With pan-and-scan the processor adds each crop as its own ``<start_of_image>`` block after the picture:
    every block keeps its share of the budget and the compressed ``generate`` equals cache-free greedy steps."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .tiny_pretrained import save_gemma3

    path = save_gemma3(tmp_path / "gemma3")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    wide = Image.fromarray(torch.randint(0, 255, (48, 128, 3), dtype=torch.uint8).numpy())
    scan = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32, "pan_and_scan_min_ratio_to_activate": 1.2}
    inputs = processor(images=[wide], text=["<start_of_image> what color"], return_tensors="pt", **scan)
    blocks = inputs["pixel_values"].shape[0]
    assert blocks > 1 and int(inputs["token_type_ids"].sum()) == 16 * blocks  # the picture and its crops
    with vtc.compressed(model, "divprune", budget=0.25):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            assert [im.counts["pre_llm"] for im in vtc.last_record(model).images] == [4] * blocks
            steps = inputs["input_ids"]
            for _ in range(3):
                extra = torch.zeros(1, steps.shape[1] - inputs["input_ids"].shape[1], dtype=torch.long)
                types = torch.cat([inputs["token_type_ids"], extra], dim=1)
                logits = model(
                    input_ids=steps,
                    attention_mask=torch.ones_like(steps),
                    token_type_ids=types,
                    pixel_values=inputs["pixel_values"],
                ).logits
                steps = torch.cat([steps, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, steps)
