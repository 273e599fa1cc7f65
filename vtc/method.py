"""The ``Method`` interface: what every compression method implements, one callback per stage it acts at.

A method knows its algorithm, never a model: it receives the hook-point contexts of :mod:`vtc.contexts`
and returns kept indices or merged tokens. :func:`vtc.registry.register_method` fills the class attributes.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .budget import keep_count
from .config import MethodConfig
from .contexts import (
    DecodeTokens,
    ImageTokens,
    LayerTokens,
    Reduction,
    Stage,
    TowerCall,
    TowerInfo,
    TowerMerge,
    VisionSignal,
)

__all__ = ["KINDS", "Method"]

KINDS = ("pruner", "merger", "baseline")


class Method:
    """Base class of every method. A method knows its algorithm, never a model class.

    Subclasses set nothing by hand: :func:`register_method` fills ``name``, ``config_class``, ``kind`` and
    ``stages``. They implement the stage callbacks they declare (``reduce`` for ``PRE_LLM``).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    kind: ClassVar[str] = "pruner"
    stages: ClassVar[tuple[Stage, ...]] = ()
    #: position policy of the official implementation (see MethodConfig.positions)
    default_positions: ClassVar[str] = "compact"
    #: the official policy inside the LLM, where it differs from ``default_positions`` (None: the same)
    default_llm_positions: ClassVar[str | None] = None
    #: newline-token policy of the official implementation (see MethodConfig.newlines)
    default_newlines: ClassVar[str] = "drop"
    #: the inputs the method applies to
    modalities: ClassVar[tuple[str, ...]] = ("image", "video")
    #: the selection depends on the prompt's text (``ImageTokens.text_ids`` / ``text_embeds``); in-LLM
    #: methods depend on it through the attention of the prompt's tokens whatever this says
    reads_prompt: ClassVar[bool] = False
    #: the budget counts the tokens left after the method's last cut inside the LLM although it also acts before
    #: the LLM (MustDrop: its merge inside the vision tower is threshold-driven; a stack ending with FastV)
    cuts_in_llm: ClassVar[bool] = False

    def __init__(self, config: MethodConfig):
        self.config = config

    def prompt_count(self, n: int) -> int:
        """Tokens of an image of ``n`` the ``PRE_LLM`` stage keeps: the budget's ``k`` (a stack: the count its
        members before the LLM reach, when an in-LLM member makes the last cut)."""
        return keep_count(self.config.budget, n)

    def tower_count(self, n: int) -> int:
        """Tokens of an image of ``n`` a ``VISION_MERGE`` stage leaves (the budget's ``k``; a stack: its first
        stage's count)."""
        return keep_count(self.config.budget, n)

    def after_tower(self, image: ImageTokens, merged: Reduction) -> Reduction | None:
        """What a method does before the LLM with an image its tower stage already merged (None: nothing more;
        a stack's later members go on from the merged tokens)."""
        return None

    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        """Signals the adapter must capture inside the vision tower for this configuration and tower."""
        return ()

    def reduce(self, image: ImageTokens) -> Reduction:  # PRE_LLM
        raise NotImplementedError(f"{type(self).__name__} does not act at the PRE_LLM stage")

    def tower_merge(self, call: TowerCall) -> TowerMerge | None:  # VISION_MERGE
        """The state that merges tokens between the blocks of one tower call (None: leave the tower alone)."""
        raise NotImplementedError(f"{type(self).__name__} does not act at the VISION_MERGE stage")

    # -- LLM_LAYER ----------------------------------------------------------------------------------
    def llm_prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers before which :meth:`prune` runs during prefill (empty for methods without the stage)."""
        return ()

    def llm_score_layers(self, num_layers: int) -> tuple[int, ...]:
        """Earlier layers whose attention :meth:`prune` reads (their inputs are kept until the prune)."""
        return ()

    def prune(self, tokens: LayerTokens) -> list[torch.Tensor]:  # LLM_LAYER
        """Per sample, the visual rows (a subset of ``tokens.visual[b]``) that go on to later layers."""
        raise NotImplementedError(f"{type(self).__name__} does not act at the LLM_LAYER stage")

    def llm_observe_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layers whose attention and MLP sub-blocks :meth:`observe` sees during prefill (TransPrune)."""
        return ()

    def observe(self, layer: int, part: str, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One weight per row ``[B, L]`` from a sub-block's normed input ``x`` and output ``y`` (``[B, L, D]``;
        ``part`` is ``"attention"`` or ``"mlp"``, ``valid [B, L]`` the real rows); summed per row over the
        observed sub-blocks and read at a prune point as :meth:`LayerTokens.observed`."""
        raise NotImplementedError(f"{type(self).__name__} observes no LLM sub-block")

    def llm_decode_layers(self, num_layers: int) -> tuple[int, ...]:
        """Layer from which decode steps attend to a per-step subset of the cached visual rows (DyCoke)."""
        return ()

    def decode_select(self, tokens: DecodeTokens) -> list[torch.Tensor] | None:
        """Per sample, the cached visual rows decode steps may attend to from ``tokens.layer`` on; None: all."""
        raise NotImplementedError(f"{type(self).__name__} does not select at decode time")

    def visual_schedule(self, num_layers: int, n: int) -> list[int]:
        """Visual tokens each LLM layer sees for an image of ``n`` tokens (for analytic FLOPs)."""
        reduces = {Stage.PRE_LLM, Stage.VISION_MERGE} & set(self.stages)
        k = keep_count(self.config.budget, n) if reduces else n
        return [k] * num_layers
