"""LLaVA-1.5 family adapter (``model_type == "llava"``): a ViT tower, an MLP projector, a 1-D RoPE LLM.

Vision towers are known as data (block list, attention module, prefix tokens) keyed by the tower's
``model_type``: CLIP (LLaVA-1.5), SigLIP and DINOv2. Hooks on one block's ``q_proj`` / ``k_proj`` capture
the queries and keys the block computes anyway, so attention signals cost no extra projection and the
tower keeps running SDPA.

Placeholders: the HF processor expands ``<image>`` into ``n`` image-token ids per image (576 for CLIP
ViT-L/14-336 with the ``"default"`` strategy that drops CLS). Images fill the placeholders in batch order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..hooks import ImageTokens, Layout, Reduction, Stage, TowerInfo, VisionSignal
from .base import Adapter, Encoded, Rebuilt, UnsupportedModelError, find_runs, module_at, padding_side, splice
from .llm import Decoder

#: vision tower model_type -> (path of the block list inside the tower, attention attribute of a block,
#: number of prefix (CLS) tokens before the patch grid)
VISION_TOWERS: dict[str, tuple[str, str, int]] = {
    "clip_vision_model": ("encoder.layers", "self_attn", 1),
    "siglip_vision_model": ("encoder.layers", "self_attn", 0),
    "dinov2": ("encoder.layer", "attention", 1),
}


_VISUAL_KWARGS = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")


def _feature_block(vision_feature_layer: int, num_blocks: int) -> int:
    """Block whose output is ``hidden_states[vision_feature_layer]`` (hidden_states[0] = embeddings)."""
    idx = vision_feature_layer % (num_blocks + 1)
    if idx == 0:
        raise ValueError("vision_feature_layer selects the embeddings, which no block computes")
    return idx - 1


class LlavaAdapter(Adapter):
    family = "llava"
    model_types = ("llava",)
    stages = frozenset({Stage.VISION, Stage.PRE_LLM, Stage.LLM_LAYER})
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
        self._capture: dict[str, list[torch.Tensor]] | None = None
        self.signal_seconds = 0.0  # time spent computing vision signals in the current call

    def text_config(self) -> Any:
        return self.model.config.text_config

    def decoder(self) -> Decoder:
        return Decoder(self.base.language_model)

    def visual_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.image_token_id

    def passthrough(self, kwargs: Mapping[str, Any], encoded: Encoded) -> dict[str, Any]:
        out = {k: v for k, v in kwargs.items() if k not in _VISUAL_KWARGS}
        out["mm_encoder_outputs"] = {"image": encoded.encoder_output}
        return out

    def tower_info(self) -> TowerInfo:
        return TowerInfo(has_cls=self.prefix > 0, num_blocks=len(self.blocks))

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
        self.handles.append(self.base.multi_modal_projector.register_forward_pre_hook(self._store_projector_input))

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

    def _store_output(self, names: list[str]):
        def hook(module, args, output):
            if self._capture is not None:
                out = output[0] if isinstance(output, tuple) else output
                for name in names:
                    self._capture.setdefault(name, []).append(out.detach())

        return hook

    def _store_projector_input(self, module, args):
        if self._capture is not None:
            self._capture.setdefault("projector_input", []).append(args[0].detach())

    @contextlib.contextmanager
    def _capturing(self):
        self._capture = {}
        self.signal_seconds = 0.0
        try:
            yield self._capture
        finally:
            self._capture = None

    # -- per call -----------------------------------------------------------------------------------
    def check_call(self, kwargs: Mapping[str, Any]) -> None:
        if kwargs.get("input_ids") is None:
            raise ValueError(
                "vtc needs input_ids to find the image placeholders; pass input_ids (not inputs_embeds) "
                "together with pixel_values"
            )
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass pixel_values, not pre-computed mm_encoder_outputs, to a compressed model")
        layer = kwargs.get("vision_feature_layer")
        if layer is not None and layer != self.feature_layer:
            raise ValueError(
                f"vision_feature_layer={layer} differs from the model config ({self.feature_layer}) that vtc's hooks "
                f"were installed for; set model.config.vision_feature_layer before vtc.compress"
            )

    def encode(self, kwargs: Mapping[str, Any], signals: Sequence[VisionSignal]) -> Encoded:
        pixel_values = kwargs["pixel_values"]
        strategy = kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        extra = {} if kwargs.get("image_sizes") is None else {"image_sizes": kwargs["image_sizes"]}
        with self._capturing() as cap:
            out = self.base.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=self.feature_layer,
                vision_feature_select_strategy=strategy,
                return_dict=True,
                **extra,
            )
        features = list(out.pooler_output)
        captured = {name: torch.cat(parts) for name, parts in cap.items()}
        proj_in = captured.pop("projector_input")
        layouts = self.layouts(kwargs, strategy)
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        spans = _assign(input_ids == self.image_token_id, [f.shape[0] for f in features])
        embed = self.model.get_input_embeddings()
        images = []
        for i, (feat, (sample, start), (layout, rows)) in enumerate(zip(features, spans, layouts, strict=True)):
            if feat.shape[0] != layout.num_tokens:
                raise ValueError(f"image {i} has {feat.shape[0]} features but its layout implies {layout.num_tokens}")
            text_ids = _text_after(input_ids[sample], mask[sample] if mask is not None else None, start, feat.shape[0])
            text_ids = text_ids[text_ids != self.image_token_id]
            images.append(
                ImageTokens(
                    tokens=feat,
                    layout=layout,
                    k=feat.shape[0],
                    signals={name: value[rows] for name, value in captured.items()},
                    vision_tokens=_vision_tokens(proj_in[rows], layout, strategy == "full"),
                    text_ids=text_ids,
                    text_embeds=embed(text_ids),
                    project=self.base.multi_modal_projector,
                    sample=sample,
                    image=i,
                )
            )
        return Encoded(images=images, spans=spans, encoder_output=out)

    def layouts(self, kwargs: Mapping[str, Any], strategy: str) -> list[tuple[Layout, list[int]]]:
        """Per image: its layout, and the rows of the vision-tower batch that are its partitions."""
        pixel_values = kwargs["pixel_values"]
        rows, cols = pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size
        layout = Layout.grid(rows, cols, prefix=self.prefix, include_prefix=strategy == "full")
        return [(layout, [i]) for i in range(pixel_values.shape[0])]

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
        per_token = {"labels": (kwargs["labels"], -100)} if kwargs.get("labels") is not None else None
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
        features = []
        for im, red in zip(encoded.images, reductions, strict=True):
            if red is None:
                features.append(im.tokens)
            elif red.tokens is not None:
                features.append(red.tokens.to(im.tokens.dtype))
            else:
                features.append(im.tokens[red.index])
        out = {k: v for k, v in kwargs.items() if k not in _VISUAL_KWARGS}
        image_output = encoded.encoder_output.__class__(**{**encoded.encoder_output, "pooler_output": features})
        out.update(
            input_ids=ids,
            attention_mask=new_mask,
            position_ids=pos,
            mm_encoder_outputs={"image": image_output},
            **extra,
        )
        return Rebuilt(
            kwargs=out,
            source_positions=sources,
            position_ids=pos.tolist(),
            input_lengths=mask.sum(-1).tolist(),
            output_lengths=new_mask.sum(-1).tolist(),
        )


def _assign(placeholders: torch.Tensor, lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Give each image (in batch order) the next ``n`` placeholders; returns ``(sample, start)`` per image."""
    total, expected = int(placeholders.sum()), int(sum(lengths))
    if total != expected:
        raise ValueError(
            f"the prompt has {total} image placeholder tokens but the images give {expected} visual tokens; "
            f"build inputs with the model's processor so every <image> is expanded"
        )
    spans, queue = [], [(b, start, length) for b, runs in enumerate(find_runs(placeholders)) for start, length in runs]
    run, offset = 0, 0
    for n in lengths:
        b, start, length = queue[run]
        if offset + n > length:
            raise ValueError("an image's placeholder tokens are not contiguous in the prompt")
        spans.append((b, start + offset))
        offset += n
        if offset == length:
            run, offset = run + 1, 0
    return spans


def _vision_tokens(proj_in: torch.Tensor, layout: Layout, full: bool) -> torch.Tensor:
    """Pre-projector features ``[n, C]`` aligned with the image's tokens (zeros for separators).

    ``proj_in``: ``[P, T, C]`` projector input of the image's partitions (T excludes CLS unless ``full``).
    """
    out = proj_in.new_zeros(layout.num_tokens, proj_in.shape[-1])
    has = layout.slot >= 0
    cols = layout.slot[has] - (0 if full else layout.prefix)
    out[has.to(out.device)] = proj_in[layout.partition[has], cols]
    return out


def _text_after(ids: torch.Tensor, mask: torch.Tensor | None, start: int, n: int) -> torch.Tensor:
    tail = ids[start + n :]
    if mask is not None:
        tail = tail[mask[start + n :] != 0]
    return tail
