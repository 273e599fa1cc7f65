"""The vision-language adapter base: a ViT tower, a projector and a decoder-only LLM fed through placeholders.

LLaVA-1.5 is the template. A family is this base plus data: which :mod:`modalities <vtc.adapters.modalities>`
it takes (strategy objects: image, multi-image, video), which side streams ride with its visual tokens
(:mod:`vtc.adapters.streams`), and, for towers other than :data:`VISION_TOWERS`, how to find its blocks
and read their queries and keys. Qwen2-VL overrides only its vision signals and its M-RoPE positions.

The adapter installs every hook point it owns: the vision signals (:mod:`vtc.adapters.vision`), token
merging inside the tower (:mod:`vtc.adapters.runners`; unmerged at its output where the model packs full grids)
and the LLM-layer hooks (:mod:`vtc.adapters.llm_hooks`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..contexts import Reduction, Stage, TowerInfo
from .base import Adapter, Encoded, Rebuilt, UnsupportedModelError
from .encode import arrange, check_expandable, encode, pack
from .llm import Decoder
from .llm_hooks import LLMHooks
from .llm_state import LLMPlan
from .modalities import Modality
from .runners import TowerMerging
from .sequence import check_prompt, pad_id, padding_side, prompt_positions, splice
from .streams import RowStream, TokenStream
from .unmerge import check_tower_merge
from .vision import Capture, QKReader, feature_block, find_tower, install_signals, projection_qk


class VLMAdapter(Adapter):
    """Base of the vision-language adapters; subclasses list their modalities (:meth:`modalities_of`)."""

    stages = frozenset({Stage.VISION, Stage.PRE_LLM, Stage.LLM_LAYER})
    #: attributes of ``model.model`` the family needs
    parts = ("vision_tower", "multi_modal_projector", "language_model", "get_image_features")
    #: call arguments the feature functions consume besides each modality's own
    feature_args: ClassVar[tuple[str, ...]] = ("vision_feature_layer", "vision_feature_select_strategy")
    #: ``[B, L]`` call inputs aligned with the prompt rows: rebuilt with the same rows as the ids
    row_streams: ClassVar[tuple[RowStream, ...]] = (RowStream("labels", -100),)
    #: feature-output fields with one row per visual token: gathered with the same indices as the tokens
    token_streams: ClassVar[tuple[TokenStream, ...]] = ()

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = getattr(model, "model", None)
        if base is None or not all(hasattr(base, a) for a in self.parts) or not hasattr(model, "generate"):
            raise UnsupportedModelError(
                f"{type(model).__name__} has model_type {model.config.model_type!r} but is not the full "
                f"...ForConditionalGeneration model (needs .model.{', .'.join(self.parts)} and .generate); "
                f"pass the model that has generate()"
            )
        self.base = base
        self.find_tower()
        self.modalities: list[Modality] = self.modalities_of(model.config)
        self.capture = Capture()
        self.llm: LLMHooks | None = None
        self._merge: TowerMerging | None = None

    # -- the family's data (subclasses) -----------------------------------------------------------------
    def modalities_of(self, config: Any) -> list[Modality]:
        raise NotImplementedError

    def find_tower(self) -> None:
        """Set the tower's ``blocks``, ``prefix``, ``projector``, ``feature_layer`` / ``feature_block``."""
        cfg = self.model.config
        tower, self.blocks = find_tower(self.base.vision_tower, cfg.vision_config.model_type, self.family)
        self.prefix, self.attention = tower.prefix, tower.attention
        self.patch_size = int(cfg.vision_config.patch_size)
        self.num_heads = int(cfg.vision_config.num_attention_heads)
        self.projector: nn.Module = self.base.multi_modal_projector
        self.feature_layer = getattr(cfg, "vision_feature_layer", -1)  # Gemma 3: the last block
        layer = self.feature_layer if isinstance(self.feature_layer, int) else max(self.feature_layer)
        self.feature_block = feature_block(layer, len(self.blocks))

    def qk_reader(self) -> QKReader:
        """How a block's queries and keys are read (for attention signals)."""
        return projection_qk(self.attention, self.num_heads)

    def feature_strategy(self, kwargs: Mapping[str, Any]) -> str:
        return kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy

    def gather(self, parts: dict[str, list[torch.Tensor]], kwargs: Mapping[str, Any], modality: Modality) -> dict:
        """What the vision hooks captured during one feature call, one tensor per signal (tower-batch order)."""
        return {name: torch.cat(values) for name, values in parts.items()}

    def merging(self, strategy: str) -> contextlib.AbstractContextManager:
        """A context in which the tower merges tokens (yields its merge context, or None without merging)."""
        return self._merge.running(strategy) if self._merge is not None else contextlib.nullcontext()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-projector features ``[..., C]`` -> LLM tokens ``[..., D]`` through the model's projector."""
        return self.projector(x)

    def base_positions(self, kwargs: Mapping[str, Any], mask: torch.Tensor, for_generate: bool) -> torch.Tensor:
        """The positions the stock model would give the full prompt (1-D RoPE)."""
        return prompt_positions(kwargs, mask, for_generate)

    def llm_positions(self, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The ``position_ids`` the stock model gets for the rebuilt prompt (spliced ``positions``, ``mask``)."""
        return positions

    def record_positions(self, positions: torch.Tensor) -> list[list]:
        """Per sample, the position id of each row (for the record)."""
        return positions.tolist()

    # -- what the session asks -----------------------------------------------------------------------
    def text_config(self) -> Any:
        return self.model.config.text_config

    def decoder(self) -> Decoder:
        lm = self.base.language_model
        if "sliding_attention" in getattr(lm.config, "layer_types", ()):
            raise ValueError("in-LLM pruning does not support sliding-window attention layers yet")
        return Decoder(lm)

    def tower_info(self) -> TowerInfo:
        crops = any(m.crops for m in self.modalities)
        return TowerInfo(has_cls=self.prefix > 0, num_blocks=len(self.blocks), crops=crops)

    def configure(self, method, keep, recorder) -> None:
        super().configure(method, keep, recorder)
        self.signals = tuple(method.vision_signals(self.tower_info()))
        check_tower_merge(self.family, method, self.signals, self.tower_unmerge)
        self.llm = LLMHooks(self.decoder(), method) if Stage.LLM_LAYER in method.stages else None

    def install(self) -> None:
        self.handles += install_signals(
            self.blocks, self.signals, self.feature_block, self.qk_reader(), self.capture, self.timer, self.prefix > 0
        )
        self.handles.append(self.projector.register_forward_pre_hook(self.capture.store_input("projector_input")))
        if Stage.VISION_MERGE in self.method.stages:
            where = (self.prefix, self.feature_layer, self.feature_block)
            self._merge = TowerMerging(self.blocks, *where, self.method, self.keep, self.tower_unmerge)
            self.handles.append(self._merge)
        if self.llm is not None:
            self.llm.install()

    def uninstall(self) -> None:
        super().uninstall()
        self._merge = None
        if self.llm is not None:
            self.llm.uninstall()

    def installed(self) -> list[Any]:
        return [*self.handles, *(self.llm.handles if self.llm is not None else ())]

    @property
    def prunes_in_llm(self) -> bool:
        """The coming prefill is armed to drop rows inside the LLM (its logits will have fewer rows)."""
        return self.llm is not None and self.llm.pending is not None and bool(self.llm.prune_layers)

    def has_visual_input(self, kwargs: Mapping[str, Any]) -> bool:
        return any(kwargs.get(m.pixels) is not None for m in self.modalities)

    def visual_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: rows of ``input_ids`` that are visual placeholders."""
        rows = torch.zeros_like(input_ids, dtype=torch.bool)
        for m in self.modalities:
            rows |= input_ids == m.token_id
        return rows

    def check_call(self, kwargs: Mapping[str, Any]) -> None:
        """Raise a clear error for a call vtc cannot compress (before anything runs)."""
        check_prompt(kwargs)
        layer = kwargs.get("vision_feature_layer")
        if layer is not None and layer != self.feature_layer:
            raise ValueError(
                f"vision_feature_layer={layer} differs from the model config ({self.feature_layer}) that vtc's hooks "
                f"were installed for; set model.config.vision_feature_layer before vtc.compress"
            )
        for modality in self.modalities:
            if kwargs.get(modality.pixels) is not None:
                modality.check(kwargs)
        for stream in self.row_streams:
            if stream.required and kwargs.get(stream.key) is None:
                raise ValueError(f"{self.family} inputs need {stream.key} (the processor returns them with input_ids)")

    # -- one call -----------------------------------------------------------------------------------
    def encode(self, kwargs: Mapping[str, Any]) -> Encoded:
        """Run the vision side of the call once: per image its tokens, layout, signals and text."""
        return encode(self, kwargs)

    def passthrough(self, kwargs: Mapping[str, Any], encoded: Encoded) -> dict[str, Any]:
        """The call's own inputs with the visual input replaced by the already computed features."""
        out = {k: v for k, v in kwargs.items() if k not in self._encoder_args()}
        out["mm_encoder_outputs"] = dict(encoded.encoder_output)
        return out

    def rebuild(
        self,
        kwargs: Mapping[str, Any],
        encoded: Encoded,
        reductions: Sequence[Reduction | None],
        positions: str,
        for_generate: bool,
    ) -> Rebuilt:
        """The inputs of the stock call on the shorter sequence (ids, mask, positions, streams, features)."""
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        runs = [(s, rows) for (s, _), rows in zip(encoded.spans, encoded.rows, strict=True)]
        rows = {s.key: (kwargs[s.key], s.fill) for s in self.row_streams if kwargs.get(s.key) is not None}
        ids, new_mask, pos, rows, sources = splice(
            input_ids,
            mask,
            self.base_positions(kwargs, mask, for_generate),
            runs,
            reductions,
            pad_id=self.pad_token_id(),
            policy=positions,
            side=padding_side(kwargs.get("attention_mask"), for_generate),
            rows=rows,
        )
        dropped = self._encoder_args() | {key for m in self.modalities for key in m.position_args}
        out = {k: v for k, v in kwargs.items() if k not in dropped}
        out.update(input_ids=ids, attention_mask=new_mask, position_ids=self.llm_positions(pos, new_mask), **rows)
        out["mm_encoder_outputs"] = pack(self, encoded, reductions)
        lengths = mask.sum(-1).tolist(), new_mask.sum(-1).tolist()
        return Rebuilt(out, sources, self.record_positions(pos), *lengths)

    def arrange(self, encoded: Encoded, reductions: list[Reduction | None]) -> list[Reduction | None]:
        return arrange(self.modalities, encoded, reductions)  # segmented images: tokens in segment order

    def _encoder_args(self) -> set[str]:
        return {*self.feature_args, *(key for m in self.modalities for key in (m.pixels, *m.extra))}

    def pad_token_id(self) -> int:
        """The id of new padding rows: the model's own, unless it is a placeholder id."""
        configs = (getattr(self.model, "generation_config", None), self.model.config, self.text_config())
        return pad_id(configs, {m.token_id for m in self.modalities})

    def check_expandable(self, out: Mapping[str, Any]) -> None:
        """Raise when ``generate`` could not repeat the rebuilt call per prompt (beams, ``num_return_sequences``)."""
        check_expandable(self.modalities, out)

    def plan_llm(self, out: dict, encoded: Encoded, reductions, sources, positions: str, for_generate: bool) -> None:
        """Arm the LLM-layer hooks for the coming prefill: where each image's rows sit in ``out``'s sequence."""
        if self.llm is None:
            return
        images = encoded.images
        kept = [torch.arange(i.n) if r is None else r.index.cpu() for i, r in zip(images, reductions, strict=True)]
        side = padding_side(out.get("attention_mask"), for_generate)
        rows, sizes = self.visual_rows(out["input_ids"]), [im.n for im in images]
        on_prune = self.recorder.on_prune
        self.llm.pending = LLMPlan.build(rows, encoded.spans, kept, sources, positions, side, on_prune, sizes)

    def end_call(self) -> None:
        """A routed call finished (or failed): no prefill is pending any more."""
        if self.llm is not None:
            self.llm.pending = None
