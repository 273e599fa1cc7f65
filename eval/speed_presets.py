"""Model presets for ``eval/bench_speed.py``: real VLM layouts with random weights, scaled to run on a CPU.

A preset is data: how to build the model (from a ``transformers`` config, seeded random weights, nothing
downloaded), how to build one prompt for it, the real checkpoint it stands for (for the FLOPs shares at
real scale) and the methods and budgets it is measured with by default. Add one with :func:`register`::

    register(Preset("my_preset", "one line", build=my_builder, inputs=my_inputs, reference=REAL["..."]))

Scaling rule (docs/speed.md): keep what decides the cost structure of the real workload, i.e. the number
of visual tokens per image / frame, the prompt's text length, the attention layout (CLS or not, full or
windowed ViT attention, grouped KV heads), and the vision tower's share of the uncompressed prefill FLOPs
as close to the real model as a CPU allows; shrink widths and depths until one uncompressed prefill takes
about a second on one core. Timings are real; generated text is meaningless (random weights).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: placeholder ids shared with vtc.testing (vocabulary of 320 stand-in tokens, no tokenizer)
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END, PAD = 300, 301, 302, 303, 0
VOCAB = 320

#: text around the image: LLaVA-1.5's system prompt + "USER: " is about 40 tokens, a short question plus
#: " ASSISTANT:" about 24 (Vicuna/Llama tokenizer); Qwen's chat template is similar in length
TEXT_BEFORE, TEXT_AFTER = 40, 24


# -- real models, for the FLOPs shares at full scale ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tower:
    """A ViT's dimensions: enough for its prefill FLOPs (:func:`vit_flops`)."""

    hidden: int
    intermediate: int
    layers: int
    patch_in: int  # inputs of one patch embedding: channels * patch^2 (* temporal patch)
    gated_mlp: bool = False  # SwiGLU MLP (Qwen2.5-VL) instead of fc1/fc2
    prefix: int = 0  # CLS-like tokens that skip the patch embedding

    @classmethod
    def of(cls, vision_config: Any) -> Tower:
        """The tower of a CLIP / SigLIP / Qwen2-VL vision config."""
        c = vision_config
        if c.model_type in ("qwen2_vl", "qwen2_vl_vision"):
            patch_in = c.in_channels * c.temporal_patch_size * c.patch_size**2
            return cls(c.embed_dim, int(c.embed_dim * c.mlp_ratio), c.depth, patch_in)
        if c.model_type in (
            "qwen3_vl_vision",
            "qwen3_vl_moe_vision",
        ):  # Qwen3-VL's ViT: fc1/fc2 MLP, no window attention
            patch_in = c.in_channels * c.temporal_patch_size * c.patch_size**2
            return cls(c.hidden_size, c.intermediate_size, c.depth, patch_in)
        if c.model_type == "internvl_vision":  # InternViT: CLS + patches, fc1/fc2 MLP
            patch_in = c.num_channels * c.patch_size[0] * c.patch_size[1]
            return cls(c.hidden_size, c.intermediate_size, c.num_hidden_layers, patch_in, prefix=1)
        if c.model_type in ("clip_vision_model", "siglip_vision_model"):
            prefix = 1 if c.model_type == "clip_vision_model" else 0
            patch_in = c.num_channels * c.patch_size**2
            return cls(c.hidden_size, c.intermediate_size, c.num_hidden_layers, patch_in, prefix=prefix)
        raise ValueError(f"no tower formula for vision model_type {c.model_type!r}")


@dataclasses.dataclass(frozen=True)
class Reference:
    """The real checkpoint a preset stands for: towers and LLM dims from its published config."""

    name: str
    tower: Tower
    llm: dict[str, Any]  # LlamaConfig / Qwen2Config fields that vtc.flops reads
    projector: Callable[[int], float]  # visual tokens per image/frame out of the ViT -> projector FLOPs
    note: str = ""


def _mlp2(d_in: int, d_hidden: int, d_out: int) -> Callable[[int], float]:
    return lambda n: 2.0 * n * (d_in * d_hidden + d_hidden * d_out)


REAL: dict[str, Reference] = {
    "llava-1.5-7b": Reference(
        "llava-hf/llava-1.5-7b-hf",
        Tower(hidden=1024, intermediate=4096, layers=24, patch_in=3 * 14 * 14, prefix=1),
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            model_type="llama",
        ),
        _mlp2(1024, 4096, 4096),
        "CLIP ViT-L/14-336 (all 24 blocks run; features from block 23 of 24), Vicuna-7B",
    ),
    "qwen2-vl-7b": Reference(
        "Qwen/Qwen2-VL-7B-Instruct",
        Tower(hidden=1280, intermediate=5120, layers=32, patch_in=3 * 2 * 14 * 14),
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            model_type="qwen2_vl_text",
        ),
        lambda n: _mlp2(4 * 1280, 4 * 1280, 3584)(n // 4),  # merger: 2 x 2 patches -> one LLM token
        "675 M-parameter ViT with full attention over all patches of an image, Qwen2-7B",
    ),
    "llava-onevision-7b": Reference(
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        Tower(hidden=1152, intermediate=4304, layers=26, patch_in=3 * 14 * 14),
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            model_type="qwen2",
        ),
        _mlp2(1152, 3584, 3584),
        "SigLIP-so400m/14-384 (26 blocks), Qwen2-7B; video frames 2 x 2 bilinear-pooled to 196 tokens",
    ),
    "qwen3-vl-8b": Reference(
        "Qwen/Qwen3-VL-8B-Instruct",
        Tower(hidden=1152, intermediate=4304, layers=27, patch_in=3 * 2 * 16 * 16),
        dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            model_type="qwen3_vl_text",
        ),
        # the merger and the three DeepStack mergers, each 2 x 2 patches -> one LLM token
        lambda n: 4 * _mlp2(4 * 1152, 4 * 1152, 4096)(n // 4),
        "27-block ViT with 16 px patches and full attention per image, DeepStack at blocks 8, 16, 24, Qwen3-8B",
    ),
    "internvl3-8b": Reference(
        "OpenGVLab/InternVL3-8B-hf",
        Tower(hidden=1024, intermediate=4096, layers=24, patch_in=3 * 14 * 14, prefix=1),
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            model_type="qwen2",
        ),
        # pixel shuffle 0.5: 4 patches (CLS dropped) -> one 4096-channel token, then the MLP
        lambda n: _mlp2(4 * 1024, 3584, 3584)((n - 1) // 4),
        "InternViT-300M-448px (24 blocks) per 448 px tile, 256 tokens per tile after the pixel shuffle, Qwen2.5-7B",
    ),
}


def vit_flops(tower: Tower, tokens: int, segments: list[int] | None = None) -> float:
    """Matmul FLOPs of one ViT forward over ``tokens`` tokens (CLS included), as in ``vtc.flops``.

    Counts the patch embedding, q/k/v/o projections, the two attention matmuls over each attention
    segment (``segments``: lengths of the independent attention groups, e.g. frames; default one group)
    and the MLP; norms, softmax and biases are left out (FLOPs = 2 x multiply-adds).
    """
    d, m = tower.hidden, tower.intermediate
    segments = segments or [tokens]
    per_layer = 2 * tokens * 4 * d * d + sum(4 * s * s * d for s in segments)
    per_layer += 2 * tokens * d * m * (3 if tower.gated_mlp else 2)
    patches = tokens - tower.prefix * len(segments)
    return float(tower.layers * per_layer + 2 * patches * tower.patch_in * d)


# -- presets --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one prompt holds, for FLOPs at real scale: vision-tower tokens and LLM visual tokens per unit."""

    units: int  # images or frames
    vit_tokens: int  # per unit, CLS included
    vit_segment: int  # attention segment length inside the ViT (a frame, an image)
    visual_tokens: int  # reaching the LLM, all units together (separators included)
    text_tokens: int


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model to benchmark, and its default methods and budgets.

    Attributes:
        build: ``seed -> model`` (eval mode, random weights, CPU, fp32).
        inputs: ``(model, seed) -> call kwargs`` for one prompt (batch 1), visual input included.
        reference: the real checkpoint this preset stands for (None for test presets).
        workload: the prompt's token counts, for the real-scale FLOPs of ``reference``.
    """

    name: str
    summary: str
    build: Callable[[int], nn.Module]
    inputs: Callable[[nn.Module, int], dict[str, Any]]
    reference: Reference | None = None
    workload: Workload | None = None
    methods: tuple[str, ...] = ("hired", "visionzip", "divprune")
    budgets: tuple[float | int, ...] = (0.2,)
    new_tokens: int = 8


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def _text(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, IMAGE_TOKEN, (n,), generator=gen).tolist()


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, inter: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=16384,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip


def _finish(model: nn.Module) -> nn.Module:
    model.generation_config.pad_token_id = PAD
    return model.eval()


# LLaVA-1.5 -------------------------------------------------------------------------------------------------


def llava_model(
    seed: int = 0,
    image_size: int = 336,
    patch: int = 14,
    vision: tuple[int, int, int, int] = (128, 512, 4, 4),
    text: tuple[int, int, int, int, int] = (512, 8, 8, 8, 1376),
) -> nn.Module:
    """LLaVA-1.5 layout: CLIP tower (``vision = (hidden, mlp, layers, heads)``), MLP projector, Llama
    (``text = (hidden, layers, heads, kv heads, mlp)``); features from the second-to-last block, CLS dropped.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vh, vm, vl, vheads = vision
    vcfg = CLIPVisionConfig(
        hidden_size=vh, intermediate_size=vm, num_hidden_layers=vl, num_attention_heads=vheads,
        image_size=image_size, patch_size=patch, projection_dim=vh,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vcfg, text_config=_llama(*text), image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(seed)
    return _finish(LlavaForConditionalGeneration._from_config(config))


def llava_inputs(model: nn.Module, seed: int = 0, text: tuple[int, int] = (TEXT_BEFORE, TEXT_AFTER)) -> dict:
    """``<s> system USER: <image> x n \\n question ASSISTANT:`` with the bundled photo at the tower's size."""
    cfg = model.config
    size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    n = (size // patch) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" else 0)
    gen = torch.Generator().manual_seed(seed)
    ids = [1] + _text(gen, text[0] - 1) + [cfg.image_token_id] * n + _text(gen, text[1])
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": _photo(size).to(model.dtype),
    }


def _photo(size: int, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)):
    """The bundled photo as ``[1, 3, size, size]``, normalised (CLIP statistics by default)."""
    import numpy as np

    from vtc.apps.demo import default_image
    from vtc.apps.viz import fit_square

    x = torch.from_numpy(np.asarray(fit_square(default_image(), size), dtype=np.float32) / 255.0)
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.permute(2, 0, 1).unsqueeze(0)


register(
    Preset(
        "llava15",
        "LLaVA-1.5 layout: CLIP 336 px / 14 px (576 visual tokens), 4 x 128 ViT, 8 x 512 Llama, 64 text tokens",
        build=llava_model,
        inputs=llava_inputs,
        reference=REAL["llava-1.5-7b"],
        workload=Workload(1, 577, 577, 576, TEXT_BEFORE + TEXT_AFTER),
        methods=("hired", "visionzip", "divprune", "fastv"),
        budgets=(0.1, 0.2),
    )
)

register(
    Preset(
        "tiny",
        "test preset: vtc.testing-sized LLaVA (32 px image, 16 visual tokens), for CI smoke runs",
        build=lambda seed: llava_model(seed, 32, 8, (32, 64, 3, 4), (64, 2, 4, 2, 128)),
        inputs=lambda model, seed: llava_inputs(model, seed, (4, 4)),
        methods=("hired", "divprune"),
        budgets=(0.5,),
        new_tokens=4,
    )
)


# Qwen2-VL, large image -------------------------------------------------------------------------------------


def qwen2_vl_model(
    seed: int = 0,
    vision: tuple[int, int, int] = (128, 2, 2),
    text: tuple[int, int, int, int, int] = (384, 8, 6, 2, 1024),
) -> nn.Module:
    """Qwen2-VL layout: ViT with 14 px patches, temporal patch 2, full attention per image and a 2 x 2 merger
    (``vision = (width, depth, heads)``, MLP ratio 4); Qwen2 decoder with M-RoPE
    (``text = (hidden, layers, heads, kv heads, mlp)``, rope sections scaled to the head size as 1:1.5:1.5).
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    width, depth, vheads = vision
    hidden, layers, heads, kv, inter = text
    half = hidden // heads // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text_cfg = {
        "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
        "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    vision_cfg = {
        "depth": depth, "embed_dim": width, "num_heads": vheads, "patch_size": 14, "temporal_patch_size": 2,
        "spatial_merge_size": 2, "hidden_size": hidden, "in_channels": 3, "mlp_ratio": 4,
    }  # fmt: skip
    config = Qwen2VLConfig(
        text_config=text_cfg, vision_config=vision_cfg, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )  # fmt: skip
    torch.manual_seed(seed)
    return _finish(Qwen2VLForConditionalGeneration._from_config(config))


def qwen_image_inputs(
    model: nn.Module, seed: int = 0, grid: tuple[int, int, int] = (1, 56, 84), text=(TEXT_BEFORE, TEXT_AFTER)
) -> dict:
    """One image of ``grid = (t, h, w)`` ViT patches (h x w x 14 px: 784 x 1176 px by default) in a chat prompt.

    Pixels are seeded noise in the processor's flattened-patch format (content does not change the cost of
    any method; the weights are random anyway).
    """
    cfg = model.config
    vcfg = cfg.vision_config
    t, h, w = grid
    n = t * h * w // vcfg.spatial_merge_size**2
    gen = torch.Generator().manual_seed(seed)
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
    ids = [1] + _text(gen, text[0] - 2) + image + _text(gen, text[1])
    input_ids = torch.tensor([ids])
    patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == cfg.image_token_id).long(),
        "pixel_values": torch.randn(t * h * w, patch_dim, generator=gen).to(model.dtype),
        "image_grid_thw": torch.tensor([list(grid)]),
    }


register(
    Preset(
        "qwen2vl",
        "Qwen2-VL layout, one 784 x 1176 px image (grid 1 x 56 x 84: 4704 ViT patches, 1176 visual tokens), "
        "2 x 128 ViT with full attention, 8 x 384 Qwen2 (GQA 6/2), 64 text tokens",
        build=qwen2_vl_model,
        inputs=qwen_image_inputs,
        reference=REAL["qwen2-vl-7b"],
        workload=Workload(1, 4704, 4704, 1176, TEXT_BEFORE + TEXT_AFTER),
    )
)


# LLaVA-OneVision, 32-frame video -----------------------------------------------------------------------


def onevision_model(
    seed: int = 0,
    image_size: int = 384,
    vision: tuple[int, int, int, int] = (64, 256, 2, 2),
    text: tuple[int, int, int, int, int] = (256, 2, 4, 2, 704),
) -> nn.Module:
    """LLaVA-OneVision layout: SigLIP tower (no CLS, 14 px patches, ``vision = (hidden, mlp, layers, heads)``),
    MLP projector, Qwen2 decoder (``text = (hidden, layers, heads, kv heads, mlp)``); video frames are 2 x 2
    bilinear-pooled after the projector and one newline token closes the video, as in the model's own code.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vh, vm, vl, vheads = vision
    hidden, layers, heads, kv, inter = text
    vcfg = SiglipVisionConfig(
        hidden_size=vh, intermediate_size=vm, num_hidden_layers=vl, num_attention_heads=vheads,
        image_size=image_size, patch_size=14, vision_use_head=False,
    )  # fmt: skip
    tcfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vcfg, text_config=tcfg, image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
        vision_feature_select_strategy="full", vision_feature_layer=-1, pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(seed)
    return _finish(LlavaOnevisionForConditionalGeneration._from_config(config))


def onevision_video_inputs(model: nn.Module, seed: int = 0, frames: int = 32, text=(TEXT_BEFORE, TEXT_AFTER)) -> dict:
    """A ``frames``-frame clip (seeded noise frames at the tower's size) in a chat prompt.

    Visual tokens: ``frames * ceil(g / 2)^2 + 1`` with ``g`` patches per side (32 x 196 + 1 = 6273 at 384 px).
    """
    vcfg = model.config.vision_config
    g = vcfg.image_size // vcfg.patch_size
    n = frames * math.ceil(g / 2) ** 2 + 1
    gen = torch.Generator().manual_seed(seed)
    ids = [1] + _text(gen, text[0] - 1) + [model.config.video_token_id] * n + _text(gen, text[1])
    input_ids = torch.tensor([ids])
    pixels = torch.randn(1, frames, 3, vcfg.image_size, vcfg.image_size, generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values_videos": pixels}


register(
    Preset(
        "onevision_video",
        "LLaVA-OneVision layout, 32-frame video at 384 px (32 x 729 ViT patches, 32 x 196 + 1 = 6273 visual "
        "tokens), 2 x 64 SigLIP, 2 x 256 Qwen2 (GQA 4/2), 64 text tokens",
        build=onevision_model,
        inputs=onevision_video_inputs,
        reference=REAL["llava-onevision-7b"],
        workload=Workload(32, 729, 729, 32 * 196 + 1, TEXT_BEFORE + TEXT_AFTER),
        methods=("divprune", "hired", "visionzip"),
    )
)


# Qwen3-VL, large image -------------------------------------------------------------------------------------


def qwen3_vl_model(
    seed: int = 0,
    vision: tuple[int, int, int] = (96, 2, 2),
    text: tuple[int, int, int, int, int] = (384, 8, 6, 2, 1024),
    deepstack: tuple[int, ...] = (0, 1),
) -> nn.Module:
    """Qwen3-VL layout: ViT with 16 px patches, temporal patch 2, learned position grid plus 2-D RoPE, full
    attention per image, 2 x 2 merger and DeepStack mergers on blocks ``deepstack`` (``vision = (width, depth,
    heads)``, MLP ratio 4); Qwen3 decoder with interleaved M-RoPE (``text = (hidden, layers, heads, kv heads,
    mlp)``). The real 8B model has three DeepStack levels in 27 blocks; two blocks here hold two.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    width, depth, vheads = vision
    hidden, layers, heads, kv, inter = text
    head_dim = hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]  # 24:20:20 at half = 64
    text_cfg = {
        "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "max_position_embeddings": 32768, "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2,
        "rope_parameters": {
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": section, "mrope_interleaved": True,
        },
    }  # fmt: skip
    vision_cfg = {
        "depth": depth, "hidden_size": width, "intermediate_size": 4 * width, "num_heads": vheads, "patch_size": 16,
        "temporal_patch_size": 2, "spatial_merge_size": 2, "out_hidden_size": hidden, "in_channels": 3,
        "num_position_embeddings": 2304, "deepstack_visual_indexes": list(deepstack),
    }  # fmt: skip
    config = Qwen3VLConfig(
        text_config=text_cfg, vision_config=vision_cfg, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )  # fmt: skip
    torch.manual_seed(seed)
    return _finish(Qwen3VLForConditionalGeneration._from_config(config))


register(
    Preset(
        "qwen3vl",
        "Qwen3-VL layout, one 768 x 1152 px image (grid 1 x 48 x 72: 3456 ViT patches, 864 visual tokens), "
        "2 x 96 ViT with full attention and 2 DeepStack levels, 8 x 384 Qwen3 (GQA 6/2), 64 text tokens",
        build=qwen3_vl_model,
        inputs=lambda model, seed: qwen_image_inputs(model, seed, grid=(1, 48, 72)),
        reference=REAL["qwen3-vl-8b"],
        workload=Workload(1, 3456, 3456, 864, TEXT_BEFORE + TEXT_AFTER),
    )
)


# InternVL 3, tiled image -----------------------------------------------------------------------------------


def internvl_model(
    seed: int = 0,
    image_size: int = 448,
    vision: tuple[int, int, int] = (96, 2, 2),
    text: tuple[int, int, int, int, int] = (256, 8, 4, 2, 704),
) -> nn.Module:
    """InternVL 3 layout: InternViT tiles (CLS + 14 px patches, ``vision = (width, depth, heads)``, MLP ratio 4),
    pixel shuffle 0.5 (4 patches -> one token), LayerNorm + MLP projector, Qwen2 decoder
    (``text = (hidden, layers, heads, kv heads, mlp)``)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    width, depth, vheads = vision
    hidden, layers, heads, kv, inter = text
    vcfg = InternVLVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth, num_attention_heads=vheads,
        image_size=[image_size, image_size], patch_size=[14, 14],
    )  # fmt: skip
    tcfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32768, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    per_tile = (image_size // 14) ** 2 // 4
    config = InternVLConfig(
        vision_config=vcfg, text_config=tcfg, image_token_id=IMAGE_TOKEN, image_seq_length=per_tile,
        downsample_ratio=0.5,
    )  # fmt: skip
    torch.manual_seed(seed)
    return _finish(InternVLForConditionalGeneration._from_config(config))


def internvl_inputs(model: nn.Module, seed: int = 0, tiles: int = 7, text=(TEXT_BEFORE, TEXT_AFTER)) -> dict:
    """One image as ``tiles`` tiles (the processor's 3 x 2 crop of a 3:2 picture plus the thumbnail by default):
    ``<img> tiles x 256 <IMG_CONTEXT> </img>``; tiles of the bundled photo at the tower's size."""
    cfg = model.config
    size = cfg.vision_config.image_size[0]
    gen = torch.Generator().manual_seed(seed)
    image = [VISION_START] + [cfg.image_token_id] * (tiles * int(cfg.image_seq_length)) + [VISION_END]
    ids = [1] + _text(gen, text[0] - 2) + image + _text(gen, text[1])
    input_ids = torch.tensor([ids])
    photo = _photo(size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = photo + 0.1 * torch.randn(tiles, 3, size, size, generator=gen)  # tiles differ, like crops
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels.to(model.dtype),
    }


register(
    Preset(
        "internvl",
        "InternVL 3 layout, one image as 7 tiles of 448 px (3 x 2 crops + thumbnail: 7 x 1025 ViT tokens, "
        "7 x 256 = 1792 visual tokens), 2 x 96 InternViT, 8 x 256 Qwen2 (GQA 4/2), 64 text tokens",
        build=internvl_model,
        inputs=internvl_inputs,
        reference=REAL["internvl3-8b"],
        workload=Workload(7, 1025, 1025, 7 * 256, TEXT_BEFORE + TEXT_AFTER),
    )
)


# a local checkpoint ----------------------------------------------------------------------------------------

#: model_type -> synthetic prompt builder, used when a checkpoint folder has no processor
SYNTHETIC_INPUTS: dict[str, Callable[[nn.Module, int], dict[str, Any]]] = {
    "llava": llava_inputs,
    "qwen2_vl": qwen_image_inputs,
    "qwen2_5_vl": qwen_image_inputs,
    "llava_onevision": onevision_video_inputs,
    "qwen3_vl": lambda model, seed: qwen_image_inputs(model, seed, grid=(1, 48, 72)),
    "internvl": internvl_inputs,
}


def checkpoint_preset(path: str, prompt: str = "Describe the image in detail.") -> Preset:
    """A preset for a local ``from_pretrained`` folder (its own weights; nothing downloaded).

    Inputs: the folder's processor, if it has one, on the bundled photo with ``prompt`` in the model's chat
    template; otherwise the synthetic prompt of its family (:data:`SYNTHETIC_INPUTS`: stand-in text ids, the
    photo or noise pixels, the family's placeholder layout).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    model_type = config.model_type

    def build(seed: int) -> nn.Module:
        from transformers import AutoModelForImageTextToText

        torch.manual_seed(seed)
        return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()

    def inputs(model: nn.Module, seed: int) -> dict[str, Any]:
        processor = _processor(path)
        if processor is None:
            if model_type not in SYNTHETIC_INPUTS:
                raise ValueError(
                    f"{path} has no processor and there is no synthetic prompt for model_type {model_type!r} "
                    f"(known: {sorted(SYNTHETIC_INPUTS)})"
                )
            return SYNTHETIC_INPUTS[model_type](model, seed)
        from vtc.apps.demo import default_image

        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True)
        return dict(processor(images=default_image(), text=text, return_tensors="pt"))

    return Preset(
        f"checkpoint:{path}",
        f"local checkpoint {path} (model_type {model_type}), its own weights",
        build=build,
        inputs=inputs,
    )


def _processor(path: str):
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError):
        return None
