"""InternVL: an image is a run of placeholders whose tiles are its partitions; per-patch scores are averaged
over each LLM token's 2 x 2 patches (checked by hand); hidden states follow the pixel shuffle."""

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.testing import IMAGE_TOKEN, internvl_inputs, tiny_internvl


@pytest.fixture(scope="module")
def model():
    return tiny_internvl(seed=2)


def _eager_attentions(model, pixels):
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return tower(pixels, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation("sdpa")


@pytest.mark.parametrize(("method", "kind"), [("fopru", "attention_received"), ("hired", "cls_attention")])
def test_scores_are_each_tokens_mean_over_its_2x2_patches(model, method, kind):
    inputs = internvl_inputs(model, ((3, 2),), seed=1)  # one image of two tiles plus the thumbnail
    with vtc.compressed(model, method, budget=0.25):
        (im,) = vtc.session_of(model).adapter.encode(inputs).images
    name = next(n for n in im.signals if n.startswith(f"{kind}@feature"))  # the last block (feature layer -1)
    heads = name.rsplit(":", 1)[1]
    attn = _eager_attentions(model, inputs["pixel_values"])[-1]  # [tiles, H, 65, 65]
    per_head = attn.mean(2)[:, :, 1:] if kind == "attention_received" else attn[:, :, 0, 1:]
    per_patch = per_head.mean(1) if heads == "mean" else per_head.sum(1)  # [tiles, 64]
    by_hand = F.avg_pool2d(per_patch.reshape(-1, 1, 8, 8), 2).reshape(3, 16)
    assert im.layout.grids == ((4, 4),) * 3 and im.signals[name].shape == (3, 16)
    torch.testing.assert_close(im.signals[name].float(), by_hand, atol=1e-5, rtol=1e-4)


def test_hidden_states_follow_the_pixel_shuffle_and_project_to_the_models_tokens(model):
    inputs = internvl_inputs(model, ((2, 2),), seed=0)  # one tile
    with vtc.compressed(model, "visionzip", budget=0.5):
        (im,) = vtc.session_of(model).adapter.encode(inputs).images
    hidden = next(v for n, v in im.signals.items() if n.startswith("hidden"))
    # the tower's final norm is the identity (use_mean_pooling), so the feature block's output is what is shuffled
    torch.testing.assert_close(hidden.reshape(-1, hidden.shape[-1]).to(im.vision_tokens.dtype), im.vision_tokens)
    torch.testing.assert_close(im.project(im.vision_tokens), im.tokens, atol=1e-5, rtol=0)


def test_tiles_are_partitions_with_their_own_budget_share(model):
    inputs = internvl_inputs(model, ((3, 2), (2, 4)), padding_side="left", seed=1)  # 3 tiles, then 1 tile
    with vtc.compressed(model, "hired", budget=0.25):
        with torch.no_grad():
            model(**inputs)
        rec = vtc.last_record(model)
    big, small = rec.images
    assert (big.num_input, small.num_input) == (48, 16)
    assert (big.counts["pre_llm"], small.counts["pre_llm"]) == (12, 4)
    per_tile = torch.bincount(torch.tensor([big.partition[i] for i in big.kept]), minlength=3).tolist()
    assert sum(per_tile) == 12 and all(n > 0 for n in per_tile)


def test_a_prompt_whose_runs_do_not_match_the_tiles_is_refused(model):
    inputs = internvl_inputs(model, ((3, 2),), seed=0)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[IMAGE_TOKEN]])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with vtc.compressed(model, "random", budget=0.5):
        with pytest.raises(ValueError, match=r"placeholder runs \[16, 1\] do not match 1 tiles of 16 tokens"):
            model(**inputs)


def test_a_video_from_the_processor_is_one_image_per_frame(tmp_path):
    """The processor writes a video as ``Frame{i}: <img> 256 x <IMG_CONTEXT> </img>`` per frame and appends the
    frames to ``pixel_values``: each frame is one item with its own share of the budget, and the compressed
    ``generate`` equals cache-free greedy steps over the same kept tokens."""
    import numpy as np
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .tiny_pretrained import save_internvl

    path = save_internvl(tmp_path / "internvl")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    video = np.random.default_rng(0).integers(0, 255, (4, 48, 48, 3), dtype=np.uint8)
    inputs = processor(videos=[video], text=["<video> what color"], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 4 and int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 64
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with vtc.compressed(model, "divprune", budget=0.25):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        rec = vtc.last_record(model)
        assert [im.counts["pre_llm"] for im in rec.images] == [4, 4, 4, 4]
        ids = inputs["input_ids"]
        with torch.no_grad():  # cache-free greedy steps on the compressed model
            steps = ids
            for _ in range(3):
                logits = model(**{**inputs, "input_ids": steps, "attention_mask": torch.ones_like(steps)}).logits
                steps = torch.cat([steps, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out[:, ids.shape[1] :], steps[:, ids.shape[1] :])
    assert plain.shape == out.shape
