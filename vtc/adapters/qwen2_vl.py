"""Qwen2-VL and Qwen2.5-VL adapter (``model_type`` ``qwen2_vl`` / ``qwen2_5_vl``): dynamic resolution, M-RoPE.

Vision side. The ViT runs on all patches of all images of a call as one sequence (attention restricted to
each image by ``cu_seqlens``; Qwen2.5-VL also to windows, except in its ``fullatt_block_indexes``), with
2-D rotary embeddings, and its ``merger`` turns every 2 x 2 group of patches (consecutive in the sequence)
into one LLM token. There is no CLS token, so attention signals are "attention received", computed per
attention segment from the block's fused ``qkv`` output with the block's own rotary embedding, i.e. over
exactly the keys the block attends to (windows respected). Qwen2.5-VL runs its blocks in a window-permuted
order of the groups; signals are mapped back with the inverse permutation (``get_vision_window_index``).
A token's score is the mean of its group's four; keys are averaged the same way; pre-projector features
(``ImageTokens.vision_tokens``) are a group's four patch features concatenated, which is exactly the
merger's input (``project`` applies the merger).

LLM side. Positions are 3-D (temporal, height, width) and *always* the original ones, computed by the
model's own ``get_rope_index`` on the full prompt and gathered at the kept tokens; row 0 of the
``[4, B, L]`` position tensor (text positions, used for masks) is contiguous, so gaps are never read as
packed-sequence boundaries. Decoding continues at the uncompressed prompt's maximum position + 1 on all
axes, as ``generate`` extends every row by one per step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..contexts import ImageTokens, Layout, Reduction, Stage, TowerInfo, VisionSignal
from .base import Adapter, Encoded, Rebuilt, UnsupportedModelError, padding_side, reduced_tokens, splice
from .llava import _assign, _text_after
from .llm import Decoder, rotate_half

MODALITIES = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))
_VISUAL_KWARGS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")


class QwenVLAdapter(Adapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    stages = frozenset({Stage.VISION, Stage.PRE_LLM, Stage.LLM_LAYER})
    forced_positions = "original"
    visual_inputs = ("pixel_values", "pixel_values_videos")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = getattr(model, "model", None)
        needed = ("visual", "language_model", "get_image_features", "get_rope_index")
        if base is None or not all(hasattr(base, a) for a in needed) or not hasattr(model, "generate"):
            raise UnsupportedModelError(
                f"{type(model).__name__} has model_type {model.config.model_type!r} but is not the full "
                f"...ForConditionalGeneration model; pass the model that has generate()"
            )
        self.base = base
        self.family = model.config.model_type
        self.visual = base.visual
        self.blocks: nn.ModuleList = base.visual.blocks
        vcfg = model.config.vision_config
        self.merge = int(vcfg.spatial_merge_size)
        self.windowed = hasattr(vcfg, "fullatt_block_indexes")
        self.image_token_id = int(model.config.image_token_id)
        self.video_token_id = int(model.config.video_token_id)
        self._stash: dict[int, dict[str, Any]] = {}

    def text_config(self) -> Any:
        return self.model.config.text_config

    def tower_info(self) -> TowerInfo:
        return TowerInfo(has_cls=False, num_blocks=len(self.blocks))

    def decoder(self) -> Decoder:
        lm = self.base.language_model
        if "sliding_attention" in getattr(lm.config, "layer_types", ()):
            raise ValueError("in-LLM pruning does not support sliding-window attention layers yet")
        return Decoder(lm)

    def visual_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    # -- vision signals -----------------------------------------------------------------------------
    def resolve_block(self, layer: int | str) -> int:
        n = len(self.blocks)
        if layer == "feature":
            return n - 1  # the merger consumes the last block's output
        if not -n <= int(layer) < n:
            raise ValueError(f"vision layer {layer} out of range for a tower with {n} blocks")
        return int(layer) % n

    def install(self, signals: Sequence[VisionSignal]) -> None:
        by_block: dict[int, list[VisionSignal]] = {}
        for sig in signals:
            if sig.kind == "cls_attention":
                raise ValueError(f"signal {sig.name}: Qwen's vision tower has no CLS token; use 'attention_received'")
            by_block.setdefault(self.resolve_block(sig.layer), []).append(sig)
        for idx, sigs in sorted(by_block.items()):
            block = self.blocks[idx]
            attention = [s for s in sigs if s.kind != "hidden"]
            if attention:
                self._hook_attention(idx, block.attn, attention)
            hidden = [s.name for s in sigs if s.kind == "hidden"]
            if hidden:
                self.handles.append(block.register_forward_hook(self._store_output(hidden)))
        self.handles.append(self.visual.merger.register_forward_pre_hook(self._store_input("merger_input")))

    def _hook_attention(self, idx: int, attn: nn.Module, sigs: list[VisionSignal]) -> None:
        stash = self._stash.setdefault(idx, {})

        def before(module, args, kwargs):
            if self._capture is not None:
                stash["cu"] = kwargs["cu_seqlens"]
                stash["pe"] = kwargs["position_embeddings"]

        def keep_qkv(module, args, output):
            if self._capture is not None:
                stash["qkv"] = output

        def finish(module, args, output):
            if self._capture is None:
                return
            start = time.perf_counter()
            qkv = stash.pop("qkv")
            seq = qkv.shape[0]
            heads = attn.num_heads
            q, k, _ = qkv.reshape(seq, 3, heads, -1).unbind(1)  # [T, H, d]
            cos, sin = (t.float().unsqueeze(-2) for t in stash.pop("pe"))
            q = q.float() * cos + rotate_half(q.float()) * sin
            k = k.float() * cos + rotate_half(k.float()) * sin
            cu = stash.pop("cu").tolist()
            for sig in sigs:
                if sig.kind == "attention_received":
                    parts = [
                        kernels.attention_received(q[None, a:b], k[None, a:b], sig.heads)[0]
                        for a, b in zip(cu[:-1], cu[1:], strict=True)
                    ]
                    value = torch.cat(parts)  # [T]
                else:  # keys
                    value = k.mean(dim=1)  # [T, d]
                self._capture.setdefault(sig.name, []).append(value)
            self.signal_seconds += time.perf_counter() - start

        self.handles.append(attn.register_forward_pre_hook(before, with_kwargs=True))
        self.handles.append(attn.qkv.register_forward_hook(keep_qkv))
        self.handles.append(attn.register_forward_hook(finish))

    def _natural_groups(self, value: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``[T, ...]`` per-patch values in block order -> ``[G, 4, ...]`` per merge group in natural order."""
        unit = self.merge * self.merge
        groups = value.reshape(value.shape[0] // unit, unit, *value.shape[1:])
        if self.windowed:
            from transformers.vision_utils import get_vision_window_index

            vcfg = self.model.config.vision_config
            window_index, _ = get_vision_window_index(grid_thw, self.merge, vcfg.window_size, vcfg.patch_size)
            groups = groups[torch.argsort(window_index.to(groups.device))]
        return groups

    # -- per call -----------------------------------------------------------------------------------
    def check_call(self, kwargs: Mapping[str, Any]) -> None:
        if kwargs.get("input_ids") is None:
            raise ValueError("vtc needs input_ids to find the visual placeholders; pass input_ids, not inputs_embeds")
        if kwargs.get("mm_encoder_outputs"):
            raise ValueError("pass pixel values, not pre-computed mm_encoder_outputs, to a compressed model")
        for _, pixels, grid in MODALITIES:
            if kwargs.get(pixels) is not None and kwargs.get(grid) is None:
                raise ValueError(f"{pixels} needs {grid} (the processor returns both)")
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError("Qwen2-VL inputs need mm_token_type_ids (the processor returns them with input_ids)")

    def encode(self, kwargs: Mapping[str, Any], signals: Sequence[VisionSignal]) -> Encoded:
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        embed = self.model.get_input_embeddings()
        images, spans, outputs = [], [], {}
        for modality, pixels, grid_key in MODALITIES:
            if kwargs.get(pixels) is None:
                continue
            grid = kwargs[grid_key]
            fn = self.base.get_image_features if modality == "image" else self.base.get_video_features
            with self._capturing() as cap:
                out = fn(kwargs[pixels], grid, return_dict=True)
            outputs[modality] = out
            captured = {name: self._natural_groups(torch.cat(parts), grid) for name, parts in cap.items()}
            merger_in = captured.pop("merger_input")  # [G, 4, C]
            features = list(out.pooler_output)
            token_id = self.image_token_id if modality == "image" else self.video_token_id
            mod_spans = _assign(input_ids == token_id, [f.shape[0] for f in features])
            offset = 0
            for feat, (sample, start), thw in zip(features, mod_spans, grid.tolist(), strict=True):
                t, h, w = thw
                rows, cols = h // self.merge, w // self.merge
                n = feat.shape[0]
                sl = slice(offset, offset + n)
                offset += n
                layout = _frames_layout(t, rows, cols)
                sig = {}
                for name, value in captured.items():
                    # hidden states stay in the merger's input space (the group's 4 patches concatenated),
                    # so merged ones can still be projected; scores and keys are the group's mean
                    group = value[sl].flatten(1) if name.startswith("hidden") else value[sl].float().mean(dim=1)
                    sig[name] = group.view(t, rows * cols, *group.shape[1:])
                text_ids = _text_after(input_ids, mask, self.visual_rows(input_ids), sample, start + n)
                images.append(
                    ImageTokens(
                        tokens=feat,
                        layout=layout,
                        k=n,
                        signals=sig,
                        vision_tokens=merger_in[sl].flatten(1),  # [n, 4C]: the merger's input rows
                        text_ids=text_ids,
                        text_embeds=embed(text_ids),
                        project=self._project,
                        sample=sample,
                        image=len(images),
                        modality=modality,
                    )
                )
                spans.append((sample, start))
        return Encoded(images=images, spans=spans, encoder_output=outputs)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The merger applied to concatenated 2 x 2 groups ``[..., 4C]`` -> LLM tokens ``[..., D]``."""
        merger = self.visual.merger
        c = x.shape[-1] // (self.merge * self.merge)
        lead = x.shape[:-1]
        normed = merger.ln_q(x.reshape(-1, c)).reshape(-1, x.shape[-1])
        return merger.mlp(normed).reshape(*lead, -1)

    def passthrough(self, kwargs: Mapping[str, Any], encoded: Encoded) -> dict[str, Any]:
        out = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "pixel_values_videos")}
        out["mm_encoder_outputs"] = dict(encoded.encoder_output)
        return out

    def base_positions(self, kwargs: Mapping[str, Any], mask: torch.Tensor) -> torch.Tensor:
        """``[3, B, L]`` M-RoPE positions of the full prompt, as the model computes them."""
        given = kwargs.get("position_ids")
        if given is not None:
            if given.dim() != 3:
                raise ValueError("Qwen2-VL position_ids must be [3 or 4, batch, length] (M-RoPE)")
            return given[-3:]
        extra = {}
        if kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        positions, _ = self.base.get_rope_index(
            kwargs["input_ids"],
            mm_token_type_ids=kwargs["mm_token_type_ids"],
            image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"),
            attention_mask=mask,
            **extra,
        )
        return positions

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
        base = self.base_positions(kwargs, mask)
        images = [(s, start, im.n) for (s, start), im in zip(encoded.spans, encoded.images, strict=True)]
        per_token = {"mm_token_type_ids": (kwargs["mm_token_type_ids"], 0)}
        if kwargs.get("labels") is not None:
            per_token["labels"] = (kwargs["labels"], -100)
        ids, new_mask, pos, extra, sources = splice(
            input_ids,
            mask,
            base,
            images,
            reductions,
            placeholder_id=self.image_token_id,
            pad_id=self._pad_id(),
            policy="original",
            side=padding_side(kwargs.get("attention_mask"), for_generate),
            per_token=per_token,
        )
        # visual rows keep their own modality's placeholder id (splice writes the image id everywhere)
        ids = torch.where(extra["mm_token_type_ids"] == 2, torch.full_like(ids, self.video_token_id), ids)
        text_row = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
        position_ids = torch.cat([text_row[None], pos], dim=0)  # [4, B, L']
        outputs: dict[str, Any] = {}
        cursor = 0
        for modality, out in encoded.encoder_output.items():
            feats = []
            for _ in out.pooler_output:
                feats.append(reduced_tokens(encoded.images[cursor], reductions[cursor]))
                cursor += 1
            outputs[modality] = out.__class__(**{**out, "pooler_output": tuple(feats)})
        new = {k: v for k, v in kwargs.items() if k not in _VISUAL_KWARGS}
        new.update(
            input_ids=ids, attention_mask=new_mask, position_ids=position_ids, mm_encoder_outputs=outputs, **extra
        )
        return Rebuilt(
            kwargs=new,
            source_positions=sources,
            position_ids=pos.permute(1, 0, 2).tolist(),
            input_lengths=mask.sum(-1).tolist(),
            output_lengths=new_mask.sum(-1).tolist(),
        )

    def _pad_id(self) -> int:
        for cfg in (getattr(self.model, "generation_config", None), self.model.config, self.text_config()):
            pad = getattr(cfg, "pad_token_id", None)
            if isinstance(pad, int) and pad not in (self.image_token_id, self.video_token_id):
                return pad
        return 0


def _frames_layout(frames: int, rows: int, cols: int) -> Layout:
    """``frames`` partitions of ``rows x cols`` LLM tokens, frame-major (Qwen's temporal groups)."""
    cells = rows * cols
    partition = torch.arange(frames).repeat_interleave(cells)
    slot = torch.arange(cells).repeat(frames)
    return Layout(((rows, cols),) * frames, 0, partition, slot, None)
