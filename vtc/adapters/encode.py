"""The vision side of one call: every visual input through the model's own feature functions, once, and back.

:func:`encode` runs each modality's feature function with the adapter's vision hooks capturing (and, for
a ``VISION_MERGE`` method, its tower merging), then turns every image or video into an
:class:`~vtc.contexts.ImageTokens`: its tokens, layout, signals, pre-projector features and the prompt text
after it. The feature outputs are kept, so the stock forward reuses them instead of encoding twice:
:func:`pack` puts each image's reduced tokens (and its rows of every token stream) back into them, and
:func:`check_expandable` says whether ``generate`` can repeat them per prompt.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..contexts import ImageTokens, Reduction
from .base import Encoded
from .sequence import assign, reduced_tokens, text_after, token_segments
from .unmerge import merged_item


def encode(adapter: Any, kwargs: Mapping[str, Any]) -> Encoded:
    """The :class:`~vtc.adapters.base.Encoded` call of ``adapter`` (a :class:`~vtc.adapters.vlm.VLMAdapter`)."""
    strategy = adapter.feature_strategy(kwargs)
    input_ids = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    embed = adapter.model.get_input_embeddings()
    visual = adapter.visual_rows(input_ids)
    encoded = Encoded([], [], {}, [])
    for modality in adapter.modalities:
        if kwargs.get(modality.pixels) is None:
            continue
        with adapter.capture.running(adapter.timer) as parts, adapter.merging(strategy) as ctx:
            out = modality.features(adapter, kwargs, strategy)
            if ctx is not None:
                adapter.timer.signal(ctx.seconds)
        merged = ctx.state if ctx is not None else None
        if merged is not None and merged.unmerged:  # merged in the tower, handed on as the full grid
            merged = None
        encoded.encoder_output[modality.name] = out
        captured = adapter.gather(parts, kwargs, modality)
        proj_in = captured.pop("projector_input")
        features = modality.item_features(out)
        layouts = modality.layouts(adapter, kwargs, strategy)
        counts = [f.shape[0] for f in features] if merged is None else [lay.num_tokens for lay, _ in layouts]
        streams = [s.split(getattr(out, s.field), counts) for s in adapter.token_streams]
        spans = assign(input_ids == modality.token_id, counts, modality.name, modality.segmented)
        for j, (feat, (sample, where), (layout, rows)) in enumerate(zip(features, spans, layouts, strict=True)):
            start = int(where[0]) if where.numel() else 0
            vision_tokens, red = None, None
            if merged is not None:
                red, feat, vision_tokens = merged_item(merged, feat, proj_in, rows, layout, strategy)
            elif feat.shape[0] != layout.num_tokens:
                raise ValueError(
                    f"a {modality.name} has {feat.shape[0]} features but its layout implies {layout.num_tokens}"
                )
            if vision_tokens is None:
                vision_tokens = modality.item_vision_tokens(adapter, proj_in, rows, layout, strategy == "full")
            text_ids = text_after(input_ids, mask, visual, sample, int(where[-1]) + 1 if where.numel() else start)
            encoded.images.append(
                ImageTokens(
                    tokens=feat,
                    layout=layout,
                    k=feat.shape[0],
                    signals=modality.item_signals(adapter, captured, rows, layout),
                    vision_tokens=vision_tokens,
                    text_ids=text_ids,
                    text_embeds=embed(text_ids),
                    project=functools.partial(_project, adapter.project, proj_in.dtype),
                    sample=sample,
                    image=len(encoded.images),
                    modality=modality.name,
                )
            )
            encoded.spans.append((sample, start))
            encoded.rows.append(where)
            encoded.reductions.append(red)
            encoded.streams.append(
                {s.field: values[j] for s, values in zip(adapter.token_streams, streams, strict=True)}
            )
    if all(r is None for r in encoded.reductions):
        encoded.reductions = None
    return encoded


def pack(adapter: Any, encoded: Encoded, reductions: Sequence[Reduction | None]) -> dict[str, Any]:
    """The ``mm_encoder_outputs`` of the stock call: each modality's feature output with the reduced tokens (and
    token streams) of its items."""
    outputs = {}
    for modality in adapter.modalities:
        if modality.name not in encoded.encoder_output:
            continue
        items = [j for j, im in enumerate(encoded.images) if im.modality == modality.name]
        tokens = [reduced_tokens(encoded.images[j], reductions[j]) for j in items]
        packed = modality.pack_features(encoded.encoder_output[modality.name], tokens)
        for stream in adapter.token_streams:
            packed[stream.field] = stream.pack(
                [stream.reduce(encoded.streams[j][stream.field], reductions[j]) for j in items]
            )
        outputs[modality.name] = packed
    return outputs


def check_expandable(modalities: Sequence[Any], out: Mapping[str, Any]) -> None:
    """Raise when ``generate`` could not repeat the rebuilt call ``out`` per prompt (beams, ``num_return_sequences``).

    ``generate`` splits each modality's features into per-prompt groups by counting placeholders; a packed item
    that spans two prompts (videos of different kept counts in one row) cannot be split.
    """
    ids = out["input_ids"]
    for modality in modalities:
        feats = out.get("mm_encoder_outputs", {}).get(modality.name)
        if feats is None or ids.shape[0] == 1:
            continue
        items = [int(x.shape[0]) for x in feats.pooler_output]
        bounds = set(itertools.accumulate(items))
        per_prompt = itertools.accumulate((ids == modality.token_id).sum(-1).tolist())
        if not all(b in bounds for b in per_prompt if b):
            raise ValueError(
                f"generate() repeats every prompt for num_beams / num_return_sequences > 1, which vtc cannot follow "
                f"for a batch of {modality.name}s that kept different token counts ({items} in one packed row); "
                f"send these {modality.name}s one per call, or give them the same size and frames"
            )


def arrange(modalities: Sequence[Any], encoded: Encoded, reductions: Sequence[Reduction | None]) -> list:
    """Each segmented image's output tokens in the order of its prompt segments (stable within a segment): the
    model scatters an item's tokens into its placeholders in order, and each segment keeps its own."""
    segmented = {m.name for m in modalities if m.segmented}
    out = list(reductions)
    for j, (im, red) in enumerate(zip(encoded.images, reductions, strict=True)):
        if red is None or im.modality not in segmented:
            continue
        order = torch.sort(token_segments(encoded.rows[j].cpu(), red), stable=True).indices
        if not torch.equal(order, torch.arange(order.numel())):
            out[j] = red.reordered(order, im.n)
    return out


def _project(project: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """The projector on features in the dtype the model feeds it (a method may hand it fp32 averages)."""
    return project(x.to(dtype))
