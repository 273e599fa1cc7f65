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


def _llama_text_config(hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, inter: int = 128):
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
) -> nn.Module:
    """A LLaVA-1.5-layout model: CLIP tower (CLS + grid), 2-layer MLP projector, Llama decoder.

    Defaults give a 4x4 grid (16 visual tokens per image) so tests run in milliseconds.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=_llama_text_config(hidden=text_hidden, layers=text_layers),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=PAD_TOKEN,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    # random init of a tiny CLIP gives nearly uniform attention: sharpen the query/key weights so
    # attention-based selections are well separated (no near-ties between sdpa and eager)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in model.model.vision_tower.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * 0.6)
        for param in model.parameters():
            if param.dim() >= 1 and not torch.isfinite(param).all():
                raise RuntimeError("non-finite weight in tiny model")
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
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if padding_side == "left" else slice(0, len(r))
        input_ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    size = cfg.vision_config.image_size
    pixel_values = torch.randn(len(rows) * images_per_sample, 3, size, size, generator=gen)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values.to(model.dtype)}


@dataclasses.dataclass(frozen=True)
class TinyFamily:
    """How the generic tests build a tiny model of a family and its inputs."""

    name: str
    build: Callable[..., nn.Module]
    inputs: Callable[..., dict[str, Any]]


FAMILIES: dict[str, TinyFamily] = {
    "llava": TinyFamily("llava", tiny_llava, llava_inputs),
}


def compressed_inputs(model: nn.Module, inputs: dict[str, Any], for_generate: bool = False) -> dict[str, Any]:
    """What the stock ``forward`` (or ``generate``) of a compressed model receives for ``inputs``.

    Useful to check a compressed call against the untouched model fed the same short sequence.
    """
    from .api import _SESSIONS

    if model not in _SESSIONS:
        raise ValueError("model is not compressed")
    return _SESSIONS[model].prepare(dict(inputs), for_generate)
