"""LLaVA-1.5 family adapter (``model_type == "llava"``): a ViT tower, an MLP projector, a 1-D RoPE LLM.

Vision towers are known as data (block list, attention module, prefix tokens) keyed by the tower's
``model_type``: CLIP (LLaVA-1.5), SigLIP and DINOv2. Hooks on one block's ``q_proj`` / ``k_proj`` capture
the queries and keys the block computes anyway, so attention signals cost no extra projection and the
tower keeps running SDPA.

Token merging inside the tower (``Stage.VISION_MERGE``, ToMe): the tower's blocks run through block runners
(:mod:`vtc.adapters.runners`) during vtc's own feature call, so the tower, projector and LLM see the merged
tokens; each image then comes back with a :class:`~vtc.contexts.Reduction` built from the source map (merged
rows in the order of their first member, compact positions). Blocks after the feature layer only run on
the result. Only this family takes a merged token set: LLaVA-NeXT / OneVision pack every tile's full grid.

Placeholders: the HF processor expands ``<image>`` into ``n`` image-token ids per image (576 for CLIP
ViT-L/14-336 with the ``"default"`` strategy that drops CLS). Images fill the placeholders in batch order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..contexts import ImageTokens, Layout, Reduction, Stage, TowerCall, TowerInfo, TowerMerge, VisionSignal
from .base import (
    Adapter,
    Encoded,
    Rebuilt,
    UnsupportedModelError,
    find_runs,
    module_at,
    padding_side,
    reduced_tokens,
    splice,
)
from .llm import Decoder
from .runners import MergeContext, Runners

#: vision tower model_type -> (path of the block list inside the tower, attention attribute of a block,
#: number of prefix (CLS) tokens before the patch grid)
VISION_TOWERS: dict[str, tuple[str, str, int]] = {
    "clip_vision_model": ("encoder.layers", "self_attn", 1),
    "siglip_vision_model": ("encoder.layers", "self_attn", 0),
    "dinov2": ("encoder.layer", "attention", 1),
}


def _feature_block(vision_feature_layer: int, num_blocks: int) -> int:
    """Block whose output is ``hidden_states[vision_feature_layer]`` (hidden_states[0] = embeddings)."""
    idx = vision_feature_layer % (num_blocks + 1)
    if idx == 0:
        raise ValueError("vision_feature_layer selects the embeddings, which no block computes")
    return idx - 1


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    stages = frozenset({Stage.VISION, Stage.VISION_MERGE, Stage.PRE_LLM, Stage.LLM_LAYER})
    visual_inputs = ("pixel_values",)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = getattr(model, "model", None)
        needed = ("vision_tower", "multi_modal_projector", "language_model", "get_image_features")
        if base is None or not all(hasattr(base, a) for a in needed) or not hasattr(model, "generate"):
            raise UnsupportedModelError(
                f"{type(model).__name__} has model_type {model.config.model_type!r} but is not the full "
                f"...ForConditionalGeneration model (needs .model.vision_tower, .multi_modal_projector, "
                f".language_model and .generate); pass the model that has generate()"
            )
        self.base = base
        cfg = model.config
        tower_type = cfg.vision_config.model_type
        if tower_type not in VISION_TOWERS:
            raise UnsupportedModelError(
                f"vision tower {tower_type!r} is not supported by the llava adapter; "
                f"supported: {sorted(VISION_TOWERS)}"
            )
        blocks_path, self._attn_attr, self.prefix = VISION_TOWERS[tower_type]
        blocks = module_at(base.vision_tower, blocks_path)
        if blocks is None:
            raise UnsupportedModelError(f"could not find the vision blocks at vision_tower.{blocks_path}")
        self.blocks: nn.ModuleList = blocks
        self.patch_size = int(cfg.vision_config.patch_size)
        self.num_heads = int(cfg.vision_config.num_attention_heads)
        layer = cfg.vision_feature_layer
        self.feature_layer = layer
        self.feature_block = _feature_block(layer if isinstance(layer, int) else max(layer), len(blocks))
        self.image_token_id = int(cfg.image_token_id)
        self._merge: tuple[MergeContext, Callable[[TowerCall], TowerMerge | None], Callable[[int], int]] | None = None

    def text_config(self) -> Any:
        return self.model.config.text_config

    def decoder(self) -> Decoder:
        return Decoder(self.base.language_model)

    #: images become a full view plus crops (LLaVA-NeXT and its descendants)
    crops = False

    def tower_info(self) -> TowerInfo:
        return TowerInfo(has_cls=self.prefix > 0, num_blocks=len(self.blocks), crops=self.crops)

    def pad_token_id(self) -> int:
        for cfg in (getattr(self.model, "generation_config", None), self.model.config, self.text_config()):
            pad = getattr(cfg, "pad_token_id", None)
            if isinstance(pad, int) and pad != self.image_token_id:
                return pad
        return 0 if self.image_token_id != 0 else 1

    # -- hooks --------------------------------------------------------------------------------------
    def resolve_block(self, layer: int | str) -> int:
        if layer == "feature":
            return self.feature_block
        n = len(self.blocks)
        if not -n <= int(layer) < n:
            raise ValueError(f"vision layer {layer} out of range for a tower with {n} blocks")
        return int(layer) % n

    def install(self, signals: Sequence[VisionSignal]) -> None:
        by_block: dict[int, list[VisionSignal]] = {}
        for sig in signals:
            by_block.setdefault(self.resolve_block(sig.layer), []).append(sig)
        for block_idx, sigs in sorted(by_block.items()):
            block = self.blocks[block_idx]
            if any(s.kind != "hidden" for s in sigs):
                self._hook_attention(block, [s for s in sigs if s.kind != "hidden"])
            hidden = [s for s in sigs if s.kind == "hidden"]
            if hidden:
                self.handles.append(block.register_forward_hook(self._store_output([s.name for s in hidden])))
        self.handles.append(
            self.base.multi_modal_projector.register_forward_pre_hook(self._store_input("projector_input"))
        )

    def install_merge(self, merge, keep, on_done=None) -> None:
        if not isinstance(self.feature_layer, int):
            raise ValueError(
                f"token merging in the vision tower needs one vision_feature_layer; this model concatenates "
                f"layers {self.feature_layer}, whose merged token sets would differ"
            )
        ctx = MergeContext(len(self.blocks))
        ctx.on_done = on_done
        self.handles.append(Runners(self.blocks, ctx))
        self._merge = (ctx, merge, keep)

    def uninstall(self) -> None:
        super().uninstall()
        self._merge = None

    @contextlib.contextmanager
    def _tower_merging(self, strategy: str):
        """Merge inside the tower for the duration of one of vtc's own feature calls (None: no merging)."""
        if self._merge is None:
            yield None
            return
        ctx, merge, keep = self._merge
        drop = 0 if strategy == "full" else self.prefix  # "default" feeds the LLM everything but CLS

        def start(x: torch.Tensor) -> TowerMerge | None:
            bsz, tokens = int(x.shape[0]), int(x.shape[1])
            n = tokens - drop
            call = TowerCall(bsz, tokens, self.prefix, self.feature_block + 1, n, keep(n), x.device)
            return merge(call)

        ctx.start, ctx.state, ctx.seconds = start, None, 0.0
        try:
            yield ctx
        finally:
            ctx.start = None

    def _hook_attention(self, block: nn.Module, sigs: list[VisionSignal]) -> None:
        attn = getattr(block, self._attn_attr)
        stash: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(module, args, output):
                if self._capture is not None:
                    stash[name] = output

            return hook

        def finish(module, args, output):
            if self._capture is None:
                return
            start = time.perf_counter()
            q, k = stash.pop("q"), stash.pop("k")
            for sig in sigs:
                if sig.kind == "cls_attention":
                    if self.prefix == 0:
                        raise ValueError(
                            f"signal {sig.name}: this vision tower has no CLS token; use 'attention_received'"
                        )
                    value = kernels.attention_row(q, k, 0, sig.heads, self.num_heads)
                elif sig.kind == "attention_received":
                    value = kernels.attention_received(q, k, sig.heads, self.num_heads)
                else:
                    value = kernels.head_mean_keys(k, self.num_heads)
                self._capture.setdefault(sig.name, []).append(value)
            self.signal_seconds += time.perf_counter() - start

        self.handles.append(attn.q_proj.register_forward_hook(keep("q")))
        self.handles.append(attn.k_proj.register_forward_hook(keep("k")))
        self.handles.append(attn.register_forward_hook(finish))

    # -- modalities -------------------------------------------------------------------------------------
    def modalities(self) -> list[Modality]:
        """The visual inputs this family takes (LLaVA-1.5: images only)."""
        return [Modality("image", "pixel_values", self.image_token_id, ("image_sizes",))]

    def has_visual_input(self, kwargs: Mapping[str, Any]) -> bool:
        return any(kwargs.get(m.pixels) is not None for m in self.modalities())

    def visual_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros_like(input_ids, dtype=torch.bool)
        for m in self.modalities():
            rows |= input_ids == m.token_id
        return rows

    def features(self, modality: Modality, kwargs: Mapping[str, Any], strategy: str) -> Any:
        """Run the model's own feature function for one modality (vision tower + projector + packing)."""
        extra = {key: kwargs[key] for key in modality.extra if kwargs.get(key) is not None}
        fn = getattr(self.base, f"get_{modality.name}_features")
        return fn(
            kwargs[modality.pixels],
            vision_feature_layer=self.feature_layer,
            vision_feature_select_strategy=strategy,
            return_dict=True,
            **extra,
        )

    def item_features(self, modality: Modality, output: Any) -> list[torch.Tensor]:
        """The per-image (per-video) ``[n, D]`` tokens in a feature output."""
        return list(output.pooler_output)

    def pack_features(self, modality: Modality, output: Any, items: list[torch.Tensor]) -> Any:
        """A feature output the model's forward accepts as ``mm_encoder_outputs[modality]``."""
        return output.__class__(**{**output, "pooler_output": items})

    def layouts(self, modality: Modality, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, list[int]]]:
        """Per image: its layout, and the rows of the vision-tower batch that are its partitions."""
        pixel_values = kwargs[modality.pixels]
        rows, cols = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        layout = Layout.grid(rows, cols, prefix=self.prefix, include_prefix=strategy == "full")
        return [(layout, [i]) for i in range(pixel_values.shape[0])]

    def item_signals(
        self, modality: Modality, captured: dict[str, torch.Tensor], rows: list[int], layout: Layout
    ) -> dict[str, torch.Tensor]:
        """The image's signals ``[P, slots, ...]`` from the tower-batch rows of its partitions."""
        return {name: value[rows] for name, value in captured.items()}

    def item_vision_tokens(
        self, modality: Modality, proj_in: torch.Tensor, rows: list[int], layout: Layout, full: bool
    ) -> torch.Tensor:
        return _vision_tokens(proj_in[rows], layout, full)

    # -- per call -----------------------------------------------------------------------------------
    def check_call(self, kwargs: Mapping[str, Any]) -> None:
        if kwargs.get("input_ids") is None:
            raise ValueError(
                "vtc needs input_ids to find the visual placeholders; pass input_ids (not inputs_embeds) "
                "together with the pixel values"
            )
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass pixel values, not pre-computed mm_encoder_outputs, to a compressed model")
        layer = kwargs.get("vision_feature_layer")
        if layer is not None and layer != self.feature_layer:
            raise ValueError(
                f"vision_feature_layer={layer} differs from the model config ({self.feature_layer}) that vtc's hooks "
                f"were installed for; set model.config.vision_feature_layer before vtc.compress"
            )

    def encode(self, kwargs: Mapping[str, Any], signals: Sequence[VisionSignal]) -> Encoded:
        strategy = kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        embed = self.model.get_input_embeddings()
        visual = self.visual_rows(input_ids)
        images, spans, outputs, reductions = [], [], {}, []
        for modality in self.modalities():
            if kwargs.get(modality.pixels) is None:
                continue
            with self._capturing() as cap, self._tower_merging(strategy) as merging:
                out = self.features(modality, kwargs, strategy)
                self.signal_seconds += merging.seconds if merging is not None else 0.0
            merged = merging.state if merging is not None else None
            outputs[modality.name] = out
            captured = {name: torch.cat(parts) for name, parts in cap.items()}
            proj_in = captured.pop("projector_input")
            features = self.item_features(modality, out)
            layouts = self.layouts(modality, kwargs, strategy)
            counts = [f.shape[0] for f in features] if merged is None else [lay.num_tokens for lay, _ in layouts]
            mod_spans = _assign(input_ids == modality.token_id, counts, modality.name)
            for feat, (sample, start), (layout, rows) in zip(features, mod_spans, layouts, strict=True):
                vision_tokens, red = None, None
                if merged is not None:
                    red, feat, vision_tokens = _merged_item(merged, feat, proj_in, rows, layout, strategy)
                elif feat.shape[0] != layout.num_tokens:
                    raise ValueError(
                        f"a {modality.name} has {feat.shape[0]} features but its layout implies {layout.num_tokens}"
                    )
                if vision_tokens is None:
                    vision_tokens = self.item_vision_tokens(modality, proj_in, rows, layout, strategy == "full")
                reductions.append(red)
                text_ids = _text_after(input_ids, mask, visual, sample, start + feat.shape[0])
                images.append(
                    ImageTokens(
                        tokens=feat,
                        layout=layout,
                        k=feat.shape[0],
                        signals=self.item_signals(modality, captured, rows, layout),
                        vision_tokens=vision_tokens,
                        text_ids=text_ids,
                        text_embeds=embed(text_ids),
                        project=self.base.multi_modal_projector,
                        sample=sample,
                        image=len(images),
                        modality=modality.name,
                    )
                )
                spans.append((sample, start))
        tower_reduced = any(r is not None for r in reductions)
        return Encoded(images, spans, outputs, reductions if tower_reduced else None)

    def passthrough(self, kwargs: Mapping[str, Any], encoded: Encoded) -> dict[str, Any]:
        out = {k: v for k, v in kwargs.items() if k not in self._visual_kwargs()}
        out["mm_encoder_outputs"] = dict(encoded.encoder_output)
        return out

    def _visual_kwargs(self) -> set[str]:
        keys = {"vision_feature_layer", "vision_feature_select_strategy"}
        for m in self.modalities():
            keys.add(m.pixels)
            keys.update(m.extra)
        return keys

    def base_positions(self, kwargs: Mapping[str, Any], mask: torch.Tensor, for_generate: bool) -> torch.Tensor:
        """The 1-D positions the stock model would give the full prompt."""
        if kwargs.get("position_ids") is not None:
            return kwargs["position_ids"].expand(mask.shape[0], -1)
        if for_generate:  # GenerationMixin._prepare_position_ids_for_generation
            return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        return (torch.arange(mask.shape[1], device=mask.device) + past).unsqueeze(0).expand(mask.shape[0], -1)

    def rebuild(
        self,
        kwargs: Mapping[str, Any],
        encoded: Encoded,
        reductions: Sequence[Reduction | None],
        positions: str,
        for_generate: bool,
    ) -> Rebuilt:
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        base = self.base_positions(kwargs, mask, for_generate)
        images = [(s, start, im.n) for (s, start), im in zip(encoded.spans, encoded.images, strict=True)]
        per_token = {"labels": (kwargs["labels"], -100)} if kwargs.get("labels") is not None else {}
        per_token["_ids"] = (input_ids, self.pad_token_id())
        ids, new_mask, pos, extra, sources = splice(
            input_ids,
            mask,
            base,
            images,
            reductions,
            placeholder_id=self.image_token_id,
            pad_id=self.pad_token_id(),
            policy=positions,
            side=padding_side(kwargs.get("attention_mask"), for_generate),
            per_token=per_token,
        )
        ids = extra.pop("_ids")  # visual rows keep their own modality's placeholder id
        outputs = {}
        for modality in self.modalities():
            if modality.name not in encoded.encoder_output:
                continue
            items = [
                reduced_tokens(im, red)
                for im, red in zip(encoded.images, reductions, strict=True)
                if im.modality == modality.name
            ]
            outputs[modality.name] = self.pack_features(modality, encoded.encoder_output[modality.name], items)
        out = {k: v for k, v in kwargs.items() if k not in self._visual_kwargs()}
        out.update(input_ids=ids, attention_mask=new_mask, position_ids=pos, mm_encoder_outputs=outputs, **extra)
        return Rebuilt(
            kwargs=out,
            source_positions=sources,
            position_ids=pos.tolist(),
            input_lengths=mask.sum(-1).tolist(),
            output_lengths=new_mask.sum(-1).tolist(),
        )


@dataclasses.dataclass(frozen=True)
class Modality:
    """One kind of visual input of a family: ``name`` (image / video) selects ``get_<name>_features``."""

    name: str
    pixels: str  # the call's pixel tensor argument
    token_id: int  # its placeholder id
    extra: tuple[str, ...] = ()  # other call arguments the feature function takes


def _assign(placeholders: torch.Tensor, lengths: Sequence[int], what: str = "image") -> list[tuple[int, int]]:
    """Give each image (in batch order) the next ``n`` placeholders; returns ``(sample, start)`` per image."""
    total, expected = int(placeholders.sum()), int(sum(lengths))
    if total != expected:
        raise ValueError(
            f"the prompt has {total} {what} placeholder tokens but the {what}s give {expected} visual tokens; "
            f"build inputs with the model's processor so every <{what}> is expanded"
        )
    spans, queue = [], [(b, start, length) for b, runs in enumerate(find_runs(placeholders)) for start, length in runs]
    run, offset = 0, 0
    for n in lengths:
        b, start, length = queue[run]
        if offset + n > length:
            raise ValueError(f"a {what}'s placeholder tokens are not contiguous in the prompt")
        spans.append((b, start + offset))
        offset += n
        if offset == length:
            run, offset = run + 1, 0
    return spans


def _merged_item(
    merged: TowerMerge, feat: torch.Tensor, proj_in: torch.Tensor, rows: list[int], layout: Layout, strategy: str
) -> tuple[Reduction | None, torch.Tensor, torch.Tensor]:
    """An image whose tokens were merged inside the tower: ``(reduction, tokens [n, D], vision tokens [n, C])``.

    ``feat [k, D]`` are the merged tokens the LLM gets; the image's ``n`` input tokens each take the row of
    the group they ended in (what the uncompressed positions now hold), so ``ImageTokens.n`` stays ``n``.
    """
    if len(rows) != 1:
        raise RuntimeError("token merging in the tower needs one tower row per image")
    (row,) = rows
    groups, anchors = merged.consumer_view(0 if strategy == "full" else layout.prefix)
    groups, anchors = groups[row].to(feat.device), anchors[row].to(feat.device)
    if groups.numel() != layout.num_tokens or anchors.numel() != feat.shape[0]:
        raise RuntimeError(
            f"the merged tower output has {feat.shape[0]} tokens for {groups.numel()} inputs, but the image's "
            f"layout has {layout.num_tokens} (bug in the tower merge)"
        )
    red = Reduction(index=anchors, tokens=feat, groups=groups) if feat.shape[0] < layout.num_tokens else None
    return red, feat[groups], proj_in[row].to(feat.device)[groups]


def _vision_tokens(proj_in: torch.Tensor, layout: Layout, full: bool) -> torch.Tensor:
    """Pre-projector features ``[n, C]`` aligned with the image's tokens (zeros for separators).

    ``proj_in``: ``[P, T, C]`` projector input of the image's partitions (T excludes CLS unless ``full``).
    """
    out = proj_in.new_zeros(layout.num_tokens, proj_in.shape[-1])
    has = layout.slot >= 0
    cols = layout.slot[has] - (0 if full else layout.prefix)
    out[has.to(out.device)] = proj_in[layout.partition[has], cols]
    return out


def _text_after(
    input_ids: torch.Tensor, mask: torch.Tensor | None, visual: torch.Tensor, sample: int, end: int
) -> torch.Tensor:
    """The sample's prompt text after position ``end``: no padding, no visual placeholders."""
    keep = ~visual[sample, end:]
    if mask is not None:
        keep &= mask[sample, end:] != 0
    return input_ids[sample, end:][keep]
