"""The ``native`` baseline: reach a visual-token count through the model's own resolution knob, not by compression.

Independent benchmarks find that simply feeding a smaller picture (Qwen's ``max_pixels``, InternVL's
``max_patches``) beats many published token-compression methods at the same count, so a user choosing a method
must see it beside them. :func:`native_kwargs` returns the processor arguments that make one picture give at
most ``k`` visual tokens, and how many it gives; the model itself runs untouched (no ``vtc.compress``).

Per family (the processor's own arithmetic, nothing approximated):

* **Qwen2-VL / Qwen2.5-VL / Qwen3-VL**: ``size={"shortest_edge", "longest_edge"}`` (the pixel bounds behind
  ``min_pixels`` / ``max_pixels``) with ``longest_edge = k * (patch * merge)^2``; the processor keeps the aspect
  ratio and rounds down to whole merged patches, so the count is at most ``k``.
* **InternVL**: ``max_patches`` = the tiles that fit ``k`` tokens (one tile = ``image_seq_length`` tokens, and
  more than one tile adds the thumbnail); one tile is the least it can give.
* **Gemma 3**: ``do_pan_and_scan=False`` (one 896 px view); the count per image is fixed, so a budget below it
  cannot be reached natively.
* **LLaVA with a tower that interpolates its position embeddings** (DINOv2, as in vtc's offline models): the
  picture resized to ``s x s`` patches, ``s = floor(sqrt(k))`` (square pictures stay square). CLIP towers have
  a fixed input size: LLaVA-1.5 has no native knob.

A family without a knob, or a ``k`` below the least it can give, raises :class:`NativeUnavailable`, naming why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["NativeSetting", "NativeUnavailable", "native_kwargs"]

_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
_INTERPOLATING_TOWERS = ("dinov2",)


class NativeUnavailable(ValueError):
    """The model has no native resolution knob that reaches the requested count."""


@dataclass(frozen=True)
class NativeSetting:
    """Processor keyword arguments for one picture and the visual tokens they give it."""

    kwargs: dict[str, Any]
    tokens: int
    note: str


def native_kwargs(model_config: Any, processor: Any, k: int, image_size: tuple[int, int]) -> NativeSetting:
    """Processor arguments that give a ``(height, width)`` picture at most ``k`` visual tokens on this model.

    Args:
        model_config: the model's ``config`` (its ``model_type`` picks the knob).
        processor: the model's processor (its image processor's patch and merge sizes).
        k: the visual-token count to reach (as ``vtc.keep_count(budget, n)`` gives for the methods).
        image_size: ``(height, width)`` of the picture in pixels.
    """
    if k < 1:
        raise NativeUnavailable(f"k must be at least 1, got {k}")
    kind = model_config.model_type
    ip = getattr(processor, "image_processor", processor)
    if kind in _QWEN:
        return _qwen(ip, k, image_size)
    if kind == "internvl":
        return _internvl(model_config, ip, k, image_size)
    if kind == "gemma3":
        n = int(model_config.mm_tokens_per_image)
        if k < n:
            raise NativeUnavailable(f"Gemma 3 gives {n} tokens per view with pan-and-scan off; {k} is below that")
        return NativeSetting({"do_pan_and_scan": False}, n, "pan-and-scan off: one view")
    if kind == "llava":
        return _llava(model_config, k)
    raise NativeUnavailable(
        f"no native resolution knob for model_type {kind!r} (known: {sorted(_QWEN + ('internvl', 'gemma3'))} "
        f"and LLaVA with a {'/'.join(_INTERPOLATING_TOWERS)} tower)"
    )


def _qwen(ip: Any, k: int, image_size: tuple[int, int]) -> NativeSetting:
    merge = int(ip.merge_size)
    factor = int(ip.patch_size) * merge
    longest = k * factor * factor
    size = {"shortest_edge": min(factor * factor, longest), "longest_edge": longest}
    patches = ip.get_number_of_image_patches(image_size[0], image_size[1], {"size": size})
    return NativeSetting({"size": size}, patches // merge**2, f"max_pixels={longest}")


def _internvl(config: Any, ip: Any, k: int, image_size: tuple[int, int]) -> NativeSetting:
    per_tile = int(config.image_seq_length)
    if k < per_tile:
        raise NativeUnavailable(f"InternVL gives {per_tile} tokens per tile; {k} is below one tile")
    best = 1  # the most tiles whose crop (plus the thumbnail when there are several) fits k tokens
    for m in range(2, k // per_tile + 1):
        if ip.get_number_of_image_patches(image_size[0], image_size[1], {"max_patches": m}) * per_tile <= k:
            best = m
    tiles = ip.get_number_of_image_patches(image_size[0], image_size[1], {"max_patches": best})
    return NativeSetting({"max_patches": best}, tiles * per_tile, f"max_patches={best}: {tiles} tiles")


def _llava(config: Any, k: int) -> NativeSetting:
    tower = config.vision_config
    if tower.model_type not in _INTERPOLATING_TOWERS:
        raise NativeUnavailable(
            f"LLaVA with a {tower.model_type!r} tower has a fixed input size (no native resolution knob); "
            f"towers that interpolate their position embeddings: {list(_INTERPOLATING_TOWERS)}"
        )
    side = math.isqrt(k)
    px = side * int(tower.patch_size)
    kwargs = {"size": {"shortest_edge": px}, "crop_size": {"height": px, "width": px}}
    return NativeSetting(kwargs, side * side, f"{px} x {px} px: {side} x {side} patches")
