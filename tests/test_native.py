"""The ``native`` baseline's processor arguments: the count they promise is what the processor produces, at most k."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vtc import native, testing

from .tiny_pretrained import save_gemma3, save_internvl, save_llava, save_qwen


def _placeholders(processor, image: Image.Image, token: str, **kwargs) -> tuple[int, dict]:
    text = f"{token} what color"
    inputs = processor(images=[image], text=[text], return_tensors="pt", **kwargs)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int((inputs["input_ids"] == image_id).sum()), inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    return {
        "qwen2_vl": save_qwen(root / "qwen2_vl"),
        "qwen3_vl": save_qwen(root / "qwen3_vl", "qwen3_vl"),
        "internvl": save_internvl(root / "internvl"),
        "gemma3": save_gemma3(root / "gemma3"),
        "llava": save_llava(root / "llava"),
    }


def _load(path):
    from transformers import AutoConfig, AutoProcessor

    return AutoConfig.from_pretrained(path), AutoProcessor.from_pretrained(path)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("size", [(96, 96), (64, 160), (200, 90)])
@pytest.mark.parametrize("k", [1, 4, 6, 16])
def test_qwen_max_pixels_gives_at_most_k_tokens(saved, family, size, k):
    config, processor = _load(saved[family])
    image = Image.new("RGB", size[::-1], (120, 30, 200))
    setting = native.native_kwargs(config, processor, k, size)
    count, _ = _placeholders(processor, image, "<|vision_start|><|image_pad|><|vision_end|>", **setting.kwargs)
    assert count == setting.tokens <= k
    # the knob is tight: one more token's worth of pixels reaches past the smaller setting (or it was already k)
    assert setting.tokens == k or native.native_kwargs(config, processor, k + 1, size).tokens >= setting.tokens


def test_qwen_native_prompt_runs_the_stock_model(saved):
    from transformers import AutoModelForImageTextToText

    config, processor = _load(saved["qwen2_vl"])
    model = AutoModelForImageTextToText.from_pretrained(saved["qwen2_vl"]).eval()
    image = Image.new("RGB", (96, 64), (10, 200, 30))
    setting = native.native_kwargs(config, processor, 6, (64, 96))
    count, inputs = _placeholders(processor, image, "<|vision_start|><|image_pad|><|vision_end|>", **setting.kwargs)
    with torch.no_grad():
        out = model(**inputs)
    assert count == setting.tokens and out.logits.shape[1] == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("size", [(96, 96), (64, 160)])
@pytest.mark.parametrize("k", [16, 40, 48, 80, 200])
def test_internvl_max_patches_gives_at_most_k_tokens(saved, size, k):
    config, processor = _load(saved["internvl"])
    image = Image.new("RGB", size[::-1], (120, 30, 200))
    setting = native.native_kwargs(config, processor, k, size)
    count, _ = _placeholders(processor, image, "<IMG_CONTEXT>", **setting.kwargs)
    assert count == setting.tokens <= k
    assert setting.tokens % 16 == 0 and setting.tokens != 32  # two tiles never come without the thumbnail


def test_below_the_least_a_knob_gives_is_refused_with_the_reason(saved):
    config, processor = _load(saved["internvl"])
    with pytest.raises(native.NativeUnavailable, match="16 tokens per tile; 8 is below one tile"):
        native.native_kwargs(config, processor, 8, (96, 96))
    config, processor = _load(saved["gemma3"])
    assert native.native_kwargs(config, processor, 16, (96, 96)).kwargs == {"do_pan_and_scan": False}
    with pytest.raises(native.NativeUnavailable, match="16 tokens per view"):
        native.native_kwargs(config, processor, 15, (96, 96))
    config, processor = _load(saved["llava"])  # CLIP tower: fixed input size
    with pytest.raises(native.NativeUnavailable, match="'clip_vision_model' tower has a fixed input size"):
        native.native_kwargs(config, processor, 4, (96, 96))
    with pytest.raises(native.NativeUnavailable, match="no native resolution knob for model_type 'llava_onevision'"):
        native.native_kwargs(testing.tiny_llava_onevision().config, processor, 4, (96, 96))


def test_llava_with_an_interpolating_tower_gets_a_smaller_square(saved):
    """DINOv2 interpolates its position embeddings, so a LLaVA on it takes any whole number of patches."""
    from transformers import Dinov2Config, LlavaConfig, LlavaForConditionalGeneration

    _, processor = _load(saved["llava"])
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    config = LlavaConfig(
        vision_config=vision,
        text_config=testing.tiny_llava().config.text_config,
        image_token_id=testing.IMAGE_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration._from_config(config).eval()
    processor.patch_size = 8
    setting = native.native_kwargs(config, processor, 7, (96, 96))
    assert setting.tokens == 4 and setting.kwargs["crop_size"] == {"height": 16, "width": 16}
    count, inputs = _placeholders(processor, Image.new("RGB", (96, 96)), "<image>", **setting.kwargs)
    with torch.no_grad():
        model(**inputs)
    assert count == 4
