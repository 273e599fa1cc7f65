"""Tiny random models built from ``transformers`` configs (nothing downloaded), with example inputs.

Every supported family registers a :class:`TinyFamily` in :data:`FAMILIES`; the test matrix runs every
method over every entry. The builders are deterministic: the same ``seed`` gives the same weights, for
``sdpa`` and ``eager`` attention alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

IMAGE_TOKEN = 300
PAD_TOKEN = 0
VOCAB = 320


def llama_text_config(hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, inter: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def tiny_llava(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    text_hidden: int = 64,
    text_layers: int = 4,
    dtype: torch.dtype = torch.float32,
    tower: str = "clip",
) -> nn.Module:
    """A LLaVA-1.5-layout model: CLIP tower (CLS + grid), 2-layer MLP projector, Llama decoder.

    Defaults give a 4x4 grid (16 visual tokens per image) so tests run in milliseconds. ``tower="siglip"``
    gives a SigLIP tower instead (no CLS; every token of the last layer goes to the LLM, ``"full"``);
    ``tower="dinov2"`` a DINOv2 tower (CLS, LayerScale; the offline VLM's layout, last layer, ``"default"``).
    """
    from transformers import (
        CLIPVisionConfig,
        Dinov2Config,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    towers = {
        "clip": (CLIPVisionConfig, {"projection_dim": vision_hidden, "intermediate_size": vision_hidden * 2}),
        "siglip": (SiglipVisionConfig, {"vision_use_head": False, "intermediate_size": vision_hidden * 2}),
        "dinov2": (Dinov2Config, {"mlp_ratio": 2, "layerscale_value": 0.5}),
    }
    if tower not in towers:
        raise ValueError(f"tower must be one of {sorted(towers)}, got {tower!r}")
    vision_class, extra = towers[tower]
    vision = vision_class(
        hidden_size=vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=llama_text_config(hidden=text_hidden, layers=text_layers),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2 if tower == "clip" else -1,
        vision_feature_select_strategy="full" if tower == "siglip" else "default",
        projector_hidden_act="gelu",
        pad_token_id=PAD_TOKEN,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    encoder = model.model.vision_tower.encoder
    _sharpen(encoder.layer if tower == "dinov2" else encoder.layers, seed)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


def llava_inputs(
    model: nn.Module,
    prompt_lengths: tuple[tuple[int, int], ...] = ((3, 4),),
    images_per_sample: int = 1,
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A padded batch for :func:`tiny_llava`: per sample ``(text before, text after)`` the image(s).

    Returns ``input_ids``, ``attention_mask`` and ``pixel_values`` (one random image per placeholder run).
    """
    cfg = model.config
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    n = grid * grid
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for before, after in prompt_lengths:
        ids = [1] + torch.randint(3, IMAGE_TOKEN, (before,), generator=gen).tolist()
        for _ in range(images_per_sample):
            ids += [IMAGE_TOKEN] * n
        ids += torch.randint(3, IMAGE_TOKEN, (after,), generator=gen).tolist()
        rows.append(ids)
    out = _pad(rows, padding_side)
    size = cfg.vision_config.image_size
    pixel_values = torch.randn(len(rows) * images_per_sample, 3, size, size, generator=gen)
    out["pixel_values"] = pixel_values.to(model.dtype)
    return out


@dataclasses.dataclass(frozen=True)
class TinyFamily:
    """How the generic tests build a tiny model of a family and its inputs."""

    name: str
    build: Callable[..., nn.Module]
    inputs: Callable[..., dict[str, Any]]
    #: input keys get_<modality>_features takes, for tests that call it directly
    image_keys: tuple[str, ...] = ("pixel_values",)
    modality: str = "image"
    #: ``config.model_type`` of the built model (the adapter that serves it); default: ``name``
    adapter_type: str | None = None

    @property
    def model_type(self) -> str:
        return self.adapter_type or self.name

    def sample_visual(self, inputs: dict[str, Any], b: int) -> dict[str, Any]:
        """The visual inputs of sample ``b`` alone (one image per sample)."""
        return {key: inputs[key][b : b + 1] for key in self.image_keys}


FAMILIES: dict[str, TinyFamily] = {
    "llava": TinyFamily("llava", tiny_llava, llava_inputs),
}


def compressed_inputs(model: nn.Module, inputs: dict[str, Any], for_generate: bool = False) -> dict[str, Any]:
    """What the stock ``forward`` (or ``generate``) of a compressed model receives for ``inputs``.

    Useful to check a compressed call against the untouched model fed the same short sequence.
    """
    from .api import session_of

    session = session_of(model)
    if session is None:
        raise ValueError("model is not compressed")
    return session.prepare(dict(inputs), for_generate)


PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A LLaVA-NeXT-layout model: CLIP tiles of 32 px / 8 px patches (4 x 4 tokens), anyres up to 2 x 2 crops."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=llama_text_config(),
        image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=PAD_TOKEN,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    _sharpen(model.model.vision_tower.encoder.layers, seed)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


def _sharpen(layers, seed: int) -> None:
    """Random init of a tiny CLIP gives near-uniform attention: scale q/k so selections are well separated."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in layers:
            attn = getattr(layer, "self_attn", None) or layer.attention
            for proj in (attn.q_proj, attn.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * 0.6)


#: original (H, W) of the images llava_next_inputs uses, cycled per image: a wide one (cropped to 1 x 2
#: tiles, with unpadding), a square one (2 x 2 tiles) and a tall one
NEXT_SIZES = ((40, 70), (64, 64), (70, 36))


def llava_next_inputs(
    model: nn.Module,
    prompt_lengths: tuple[tuple[int, int], ...] = ((3, 4),),
    images_per_sample: int = 1,
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A padded batch for :func:`tiny_llava_next` with images of different sizes (hence token counts)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    tile = cfg.vision_config.image_size
    gen = torch.Generator().manual_seed(seed)
    sizes = [NEXT_SIZES[(seed + i) % len(NEXT_SIZES)] for i in range(len(prompt_lengths) * images_per_sample)]
    tiles = [image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, tile) for s in sizes]
    pixel_values = torch.zeros(len(sizes), max(tiles), 3, tile, tile)
    for i, t in enumerate(tiles):
        pixel_values[i, :t] = torch.randn(t, 3, tile, tile, generator=gen)
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixel_values.to(model.dtype), image_sizes=image_sizes)
    counts = [f.shape[0] for f in feats.pooler_output]
    rows, image = [], 0
    for before, after in prompt_lengths:
        ids = [1] + torch.randint(3, IMAGE_TOKEN, (before,), generator=gen).tolist()
        for _ in range(images_per_sample):
            ids += [IMAGE_TOKEN] * counts[image]
            image += 1
        ids += torch.randint(3, IMAGE_TOKEN, (after,), generator=gen).tolist()
        rows.append(ids)
    out = _pad(rows, padding_side)
    out.update(pixel_values=pixel_values.to(model.dtype), image_sizes=image_sizes)
    return out


def _pad(rows: list[list[int]], side: str) -> dict[str, torch.Tensor]:
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        input_ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


FAMILIES["llava_next"] = TinyFamily("llava_next", tiny_llava_next, llava_next_inputs, ("pixel_values", "image_sizes"))


QWEN_VISION_START, QWEN_VISION_END, VIDEO_TOKEN = 302, 303, 301


def _qwen_text() -> dict:
    return {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
        "max_position_embeddings": 4096,
        "pad_token_id": PAD_TOKEN,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _qwen_ids() -> dict:
    return {
        "image_token_id": IMAGE_TOKEN,
        "video_token_id": VIDEO_TOKEN,
        "vision_start_token_id": QWEN_VISION_START,
        "vision_end_token_id": QWEN_VISION_END,
    }


def tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Qwen2-VL-layout model: ViT with 4 px patches, temporal patch 2, 2 x 2 merger; M-RoPE decoder."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = {
        "depth": 2,
        "embed_dim": 32,
        "num_heads": 4,
        "patch_size": 4,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "hidden_size": 64,
        "in_channels": 3,
        "mlp_ratio": 2,
    }
    config = Qwen2VLConfig(text_config=_qwen_text(), vision_config=vision, **_qwen_ids())
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Qwen2.5-VL-layout model: as Qwen2-VL, plus window attention (2 x 2 LLM-token windows) in block 0."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    vision = {
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 4,
        "patch_size": 4,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 64,
        "window_size": 16,
        "fullatt_block_indexes": [1],
        "intermediate_size": 64,
        "in_channels": 3,
    }
    config = Qwen2_5_VLConfig(text_config=_qwen_text(), vision_config=vision, **_qwen_ids())
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


def tiny_qwen3_vl(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    deepstack: tuple[int, ...] = (0,),
    moe: bool = False,
    patch: int = 4,
) -> nn.Module:
    """A Qwen3-VL-layout model: ViT with 4 px patches, learned position grid plus 2-D RoPE, 2 x 2 merger, and
    DeepStack mergers on ViT blocks ``deepstack`` whose outputs are added after the first ``len(deepstack)``
    decoder layers; M-RoPE decoder with interleaved frequencies. One DeepStack level by default, so in-LLM
    pruning from layer 1 on (the tiny matrix's PyramidDrop) is valid; the real models use three. ``moe=True``
    gives the ``qwen3_vl_moe`` layout (4 experts, 2 per token, in every decoder layer); ``patch=16`` the real
    models' patch size (what lmms-eval's wrapper assumes when it sizes images)."""
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    vision = {
        "depth": max(2, max(deepstack) + 1),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "patch_size": patch,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": list(deepstack),
        "in_channels": 3,
    }
    text = {**_qwen_text(), "head_dim": 16}
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1e4,
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
    }
    config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        config_class, model_class = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, **_qwen_ids())
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation=attn_implementation)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


#: ViT patch grids (t, h, w) qwen_inputs cycles through: images of different sizes and aspect ratios
QWEN_GRIDS = ((1, 8, 8), (1, 4, 8), (1, 8, 4), (1, 6, 10))


def qwen_inputs(
    model: nn.Module,
    prompt_lengths: tuple[tuple[int, int], ...] = ((3, 4),),
    images_per_sample: int = 1,
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A padded batch for the tiny Qwen models, with flattened patches as the Qwen processor returns them."""
    vcfg = model.config.vision_config
    merge = vcfg.spatial_merge_size
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    gen = torch.Generator().manual_seed(seed)
    grids = [QWEN_GRIDS[(seed + i) % len(QWEN_GRIDS)] for i in range(len(prompt_lengths) * images_per_sample)]
    rows, image = [], 0
    for before, after in prompt_lengths:
        ids = [1] + torch.randint(3, IMAGE_TOKEN, (before,), generator=gen).tolist()
        for _ in range(images_per_sample):
            t, h, w = grids[image]
            ids += [QWEN_VISION_START] + [IMAGE_TOKEN] * (t * h * w // merge**2) + [QWEN_VISION_END]
            image += 1
        ids += torch.randint(3, IMAGE_TOKEN, (after,), generator=gen).tolist()
        rows.append(ids)
    out = _pad(rows, padding_side)
    out["mm_token_type_ids"] = (out["input_ids"] == IMAGE_TOKEN).long()
    patches = sum(t * h * w for t, h, w in grids)
    out["pixel_values"] = torch.randn(patches, patch_dim, generator=gen).to(model.dtype)
    out["image_grid_thw"] = torch.tensor(grids)
    return out


@dataclasses.dataclass(frozen=True)
class _QwenFamily(TinyFamily):
    def sample_visual(self, inputs: dict[str, Any], b: int) -> dict[str, Any]:
        """Sample ``b``'s image alone: its rows of the flattened patches, its grid, its token types."""
        grids = inputs["image_grid_thw"]
        sizes = grids.prod(-1).tolist()
        start = sum(sizes[:b])
        return {"pixel_values": inputs["pixel_values"][start : start + sizes[b]], "image_grid_thw": grids[b : b + 1]}


FAMILIES["qwen2_vl"] = _QwenFamily("qwen2_vl", tiny_qwen2_vl, qwen_inputs, ("pixel_values", "image_grid_thw"))
FAMILIES["qwen2_5_vl"] = _QwenFamily("qwen2_5_vl", tiny_qwen2_5_vl, qwen_inputs, ("pixel_values", "image_grid_thw"))
FAMILIES["qwen3_vl"] = _QwenFamily("qwen3_vl", tiny_qwen3_vl, qwen_inputs, ("pixel_values", "image_grid_thw"))
FAMILIES["qwen3_vl_moe"] = _QwenFamily(
    "qwen3_vl_moe",
    lambda seed=0, **kw: tiny_qwen3_vl(seed, moe=True, **kw),
    qwen_inputs,
    ("pixel_values", "image_grid_thw"),
)


def tiny_llava_onevision(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A LLaVA-OneVision-layout model: SigLIP frames of 48 px / 8 px patches (6 x 6), pooled to 3 x 3 per frame."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=48,
        patch_size=8,
        vision_use_head=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=llama_text_config(),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        image_grid_pinpoints=[[48, 48], [48, 96], [96, 48], [96, 96]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        pad_token_id=PAD_TOKEN,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    _sharpen(model.model.vision_tower.encoder.layers, seed)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


def tiny_llava_next_video(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A LLaVA-NeXT-Video-layout model: CLIP frames of 48 px / 8 px patches, 2 x 2 average-pooled to 3 x 3."""
    from transformers import CLIPVisionConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=48,
        patch_size=8,
        projection_dim=32,
    )
    config = LlavaNextVideoConfig(
        vision_config=vision,
        text_config=llama_text_config(),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        image_grid_pinpoints=[[48, 48], [48, 96], [96, 48], [96, 96]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        pad_token_id=PAD_TOKEN,
    )
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    _sharpen(model.model.vision_tower.encoder.layers, seed)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


def llava_video_inputs(
    model: nn.Module,
    prompt_lengths: tuple[tuple[int, int], ...] = ((3, 4),),
    frames: int = 4,
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A padded batch of one video per sample for the tiny OneVision / NeXT-Video models."""
    size = model.config.vision_config.image_size
    gen = torch.Generator().manual_seed(seed)
    videos = torch.randn(len(prompt_lengths), frames, 3, size, size, generator=gen)
    # neighbouring frames are similar (as in real video), so temporal mergers have something to merge
    for t in range(1, frames):
        videos[:, t] = 0.8 * videos[:, t - 1] + 0.2 * videos[:, t]
    with torch.no_grad():
        n = model.model.get_video_features(videos[:1].to(model.dtype)).pooler_output[0].shape[0]
    rows = []
    for before, after in prompt_lengths:
        ids = [1] + torch.randint(3, IMAGE_TOKEN, (before,), generator=gen).tolist() + [VIDEO_TOKEN] * n
        rows.append(ids + torch.randint(3, IMAGE_TOKEN, (after,), generator=gen).tolist())
    out = _pad(rows, padding_side)
    out["pixel_values_videos"] = videos.to(model.dtype)
    return out


def qwen_video_inputs(
    model: nn.Module,
    prompt_lengths: tuple[tuple[int, int], ...] = ((3, 4),),
    padding_side: str = "left",
    seed: int = 0,
    frame_blocks: bool = False,
) -> dict[str, torch.Tensor]:
    """A padded batch of one video per sample for the tiny Qwen models (grids of 2-4 temporal groups); with
    ``frame_blocks`` each temporal group is its own block behind two stand-in timestamp tokens (Qwen3-VL)."""
    vcfg = model.config.vision_config
    merge = vcfg.spatial_merge_size
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    gen = torch.Generator().manual_seed(seed)
    grids = [((2 + (seed + i) % 3), 4, 8) for i in range(len(prompt_lengths))]
    rows = []
    for (before, after), (t, h, w) in zip(prompt_lengths, grids, strict=True):
        ids = [1] + torch.randint(3, IMAGE_TOKEN, (before,), generator=gen).tolist()
        for _ in range(t if frame_blocks else 1):
            stamp = torch.randint(3, IMAGE_TOKEN, (2,), generator=gen).tolist() if frame_blocks else []
            n = h * w // merge**2 if frame_blocks else t * h * w // merge**2
            ids += stamp + [QWEN_VISION_START] + [VIDEO_TOKEN] * n + [QWEN_VISION_END]
        rows.append(ids + torch.randint(3, IMAGE_TOKEN, (after,), generator=gen).tolist())
    out = _pad(rows, padding_side)
    out["mm_token_type_ids"] = (out["input_ids"] == VIDEO_TOKEN).long() * 2
    patches = sum(t * h * w for t, h, w in grids)
    out["pixel_values_videos"] = torch.randn(patches, patch_dim, generator=gen).to(model.dtype)
    out["video_grid_thw"] = torch.tensor(grids)
    return out


@dataclasses.dataclass(frozen=True)
class _QwenVideoFamily(TinyFamily):
    def sample_visual(self, inputs: dict[str, Any], b: int) -> dict[str, Any]:
        grids = inputs["video_grid_thw"]
        sizes = grids.prod(-1).tolist()
        start = sum(sizes[:b])
        return {
            "pixel_values_videos": inputs["pixel_values_videos"][start : start + sizes[b]],
            "video_grid_thw": grids[b : b + 1],
        }


#: video entries of the test matrix (images of these families use the LLaVA-NeXT path, tested above)
VIDEO_FAMILIES: dict[str, TinyFamily] = {
    "llava_onevision": TinyFamily(
        "llava_onevision", tiny_llava_onevision, llava_video_inputs, ("pixel_values_videos",), "video"
    ),
    "llava_next_video": TinyFamily(
        "llava_next_video", tiny_llava_next_video, llava_video_inputs, ("pixel_values_videos",), "video"
    ),
    "qwen2_vl_video": _QwenVideoFamily(
        "qwen2_vl_video",
        tiny_qwen2_vl,
        qwen_video_inputs,
        ("pixel_values_videos", "video_grid_thw"),
        "video",
        adapter_type="qwen2_vl",
    ),
}
FAMILIES.update(VIDEO_FAMILIES)


GEMMA_BOI, GEMMA_EOI = 302, 303


def tiny_gemma3(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Gemma 3-layout model: SigLIP of 32 px / 4 px patches (8 x 8, no CLS), average-pooled 2 x 2 to 4 x 4 = 16
    tokens per image, RMSNorm + projection; Gemma 3 decoder (sliding and global layers, bidirectional image
    blocks through ``token_type_ids``)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        vision_use_head=False,
    )
    text = Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=6,  # shorter than every test prompt, so sliding layers see a window
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=GEMMA_BOI,
        eoi_token_index=GEMMA_EOI,
        image_token_index=IMAGE_TOKEN,
        pad_token_id=PAD_TOKEN,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    _sharpen(model.model.vision_tower.encoder.layers, seed)
    with torch.no_grad():  # the real projection is trained; a zero-initialised one would make every image the same
        w = model.model.multi_modal_projector.mm_input_projection_weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 2)) * 0.2)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


def gemma3_inputs(
    model: nn.Module,
    prompt_lengths: tuple[tuple[int, int], ...] = ((3, 4),),
    images_per_sample: int = 1,
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A padded batch for the tiny Gemma 3: ``<boi> 16 x <image> <eoi>`` per image, with ``token_type_ids``."""
    size = model.config.vision_config.image_size
    n = int(model.config.mm_tokens_per_image)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for before, after in prompt_lengths:
        ids = [1] + torch.randint(3, IMAGE_TOKEN, (before,), generator=gen).tolist()
        for _ in range(images_per_sample):
            ids += (
                [GEMMA_BOI]
                + [IMAGE_TOKEN] * n
                + [GEMMA_EOI]
                + torch.randint(3, IMAGE_TOKEN, (1,), generator=gen).tolist()
            )
        rows.append(ids + torch.randint(3, IMAGE_TOKEN, (after,), generator=gen).tolist())
    out = _pad(rows, padding_side)
    out["token_type_ids"] = (out["input_ids"] == IMAGE_TOKEN).long()
    images = len(prompt_lengths) * images_per_sample
    out["pixel_values"] = torch.randn(images, 3, size, size, generator=gen).to(model.dtype)
    return out


FAMILIES["gemma3"] = TinyFamily("gemma3", tiny_gemma3, gemma3_inputs)


def tiny_internvl(seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32) -> nn.Module:
    """An InternVL-layout model: InternViT tiles of 32 px / 4 px patches (CLS + 8 x 8), pixel shuffle 0.5 to
    4 x 4 = 16 tokens per tile, LayerNorm + MLP projector; Qwen2 decoder."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=[32, 32],
        patch_size=[4, 4],
    )
    text = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        image_seq_length=16,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    _sharpen(model.model.vision_tower.encoder.layer, seed)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.to(dtype).eval()


INTERNVL_START, INTERNVL_END = 302, 303
#: tiles per image internvl_inputs cycles through (one tile; two tiles plus the thumbnail)
INTERNVL_TILES = (1, 3)


def internvl_inputs(
    model: nn.Module,
    prompt_lengths: tuple[tuple[int, int], ...] = ((3, 4),),
    images_per_sample: int = 1,
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A padded batch for the tiny InternVL: ``<img> 16 x tiles <IMG_CONTEXT> </img>`` per image."""
    size = model.config.vision_config.image_size[0]
    per_tile = int(model.config.image_seq_length)
    gen = torch.Generator().manual_seed(seed)
    rows, tiles, image = [], 0, 0
    for before, after in prompt_lengths:
        ids = [1] + torch.randint(3, IMAGE_TOKEN, (before,), generator=gen).tolist()
        for _ in range(images_per_sample):
            n = INTERNVL_TILES[(seed + image) % len(INTERNVL_TILES)]
            ids += [INTERNVL_START] + [IMAGE_TOKEN] * (per_tile * n) + [INTERNVL_END]
            tiles, image = tiles + n, image + 1
        rows.append(ids + torch.randint(3, IMAGE_TOKEN, (after,), generator=gen).tolist())
    out = _pad(rows, padding_side)
    out["pixel_values"] = torch.randn(tiles, 3, size, size, generator=gen).to(model.dtype)
    return out


@dataclasses.dataclass(frozen=True)
class _TiledFamily(TinyFamily):
    def sample_visual(self, inputs: dict[str, Any], b: int) -> dict[str, Any]:
        """Sample ``b``'s tiles alone (its rows of the tile batch, counted from the placeholders)."""
        per_tile = 16
        counts = [int((row == IMAGE_TOKEN).sum()) // per_tile for row in inputs["input_ids"]]
        start = sum(counts[:b])
        return {"pixel_values": inputs["pixel_values"][start : start + counts[b]]}


FAMILIES["internvl"] = _TiledFamily("internvl", tiny_internvl, internvl_inputs)


def qwen3_video_inputs(
    model: nn.Module,
    prompt_lengths: tuple[tuple[int, int], ...] = ((3, 4),),
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """As :func:`qwen_video_inputs`, written as Qwen3-VL's processor writes videos: every frame (temporal
    group) its own block, ``<timestamp text> <vision_start> frame tokens <vision_end>``."""
    return qwen_video_inputs(model, prompt_lengths, padding_side, seed, frame_blocks=True)


VIDEO_FAMILIES["qwen3_vl_video"] = _QwenVideoFamily(
    "qwen3_vl_video",
    tiny_qwen3_vl,
    qwen3_video_inputs,
    ("pixel_values_videos", "video_grid_thw"),
    "video",
    adapter_type="qwen3_vl",
)
FAMILIES["qwen3_vl_video"] = VIDEO_FAMILIES["qwen3_vl_video"]
