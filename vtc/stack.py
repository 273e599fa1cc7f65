"""Stacks: several methods at successive hook points under one budget.

``vtc.compress(model, ["pool", "divprune"], budget=0.1)`` runs ``pool`` and then ``divprune`` on what pool
left, before the LLM; ``vtc.compress(model, ["divprune", "fastv"], budget=0.1)`` selects with DivPrune before
the LLM and lets FastV make the last cut inside it. A :class:`StackConfig` says the same with member configs
and per-stage sizes.

The budget (:mod:`vtc.budget`) counts where the last member's budget counts: the tokens the LLM receives
when the last member acts before the LLM (its own in-LLM stage, if it has one, acts on top as it does
alone), the tokens left after the last cut when the last member acts only inside the LLM. Every stack ends at
exactly ``k``. Earlier members keep a geometric share by default: with ``S`` cutting stages, stage ``s``
keeps ``floor(n * (k / n) ** (s / S))`` of an image's ``n`` tokens (:func:`vtc.budget.stage_counts`), so
``["pool", "divprune"]`` at 0.1 keeps about 32 % after pooling; ``keep=(0.5,)`` sets the fraction of ``n``
kept after each member but the last (``None`` entries keep the default). Counts never rise from stage to
stage and never go below ``k``.

``["tome", "divprune"]`` merges inside the vision tower to the first stage's count (families whose towers hand
the LLM a token set: LLaVA-1.5) and lets DivPrune pick from the merged tokens.

Rules, checked before the model is touched: at least two members; a member that merges inside the vision tower
(``VISION_MERGE``: ToMe) comes first; every other member but the last acts before the LLM and only there (a
member with an in-LLM stage, or a decode-time selection, must be last); a later member gets the earlier
members' output tokens as its image (merged tokens stand at their anchor's place; a member after one that
emits tokens with no source, such as VisionZip's contextual tokens, is refused at the call); members'
``budget`` fields are not used and their ``positions`` / ``newlines`` must be left unset (set them on the
stack; the defaults are the first member's policy before the LLM and the in-LLM member's inside it). The
record's image ``counts`` list every earlier member's output as ``"pre_llm:<member>"`` next to ``"pre_llm"``
and ``"llm_layer_<i>"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .budget import keep_count, stage_counts
from .config import MethodConfig, check_options
from .contexts import DecodeTokens, ImageTokens, LayerTokens, Reduction, Stage, TowerInfo, VisionSignal
from .method import Method

__all__ = ["Stack", "StackConfig", "stack_config"]


@dataclasses.dataclass
class StackConfig(MethodConfig):
    """A stack of methods (see the module docstring).

    Args:
        members: the member methods' configs, in the order they act.
        keep: per member but the last, the fraction of an image's tokens kept after it (``None``: the default
            geometric share); None for all defaults.
    """

    method = "stack"

    members: tuple[MethodConfig, ...] = ()
    keep: tuple[float | None, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        from .registry import get_method

        self.members = tuple(self.members)
        if len(self.members) < 2:
            raise ValueError(f"a stack needs at least two member methods, got {len(self.members)}")
        for m in self.members:
            if not isinstance(m, MethodConfig) or isinstance(m, StackConfig):
                raise TypeError(f"stack members are method configs (not stacks), got {type(m).__name__}")
            get_method(m.method)  # registered?
            if m.positions is not None or m.newlines is not None:
                raise ValueError(
                    f"set positions / newlines on the stack, not on its member {m.method!r} (the stack applies one "
                    f"policy before the LLM and one inside it)"
                )
        if self.keep is not None:
            self.keep = tuple(self.keep)
            if len(self.keep) != len(self.members) - 1:
                raise ValueError(
                    f"keep gives the share kept after each member but the last: {len(self.members) - 1} values, "
                    f"got {len(self.keep)}"
                )
            for f in self.keep:
                if f is not None and (isinstance(f, bool) or not isinstance(f, float) or not 0 < f <= 1):
                    raise ValueError(f"keep entries are fractions in (0, 1] or None, got {f!r}")
        _check_order([get_method(m.method) for m in self.members])

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["members"] = [{"method": m.method, **m.to_dict()} for m in self.members]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StackConfig:
        from .registry import get_method

        check_options(cls, data.keys())
        data = dict(data)
        members = []
        for m in data.pop("members", ()):
            m = dict(m)
            members.append(get_method(m.pop("method")).config_class.from_dict(m))
        keep = data.pop("keep", None)
        return cls(members=tuple(members), keep=None if keep is None else tuple(keep), **data)


def stack_config(methods: Sequence[str | MethodConfig], budget: Any, options: Mapping[str, Any]) -> StackConfig:
    """The config of ``vtc.compress(model, [...], budget, **options)``: member names (or configs) and the stack's
    own options (``keep``, ``positions``, ``newlines``); a member's options go in its config object."""
    from .registry import get_method

    members = [m if isinstance(m, MethodConfig) else get_method(m).config_class() for m in methods]
    check_options(StackConfig, options)
    if "members" in options:
        raise TypeError("pass the members as the method list, not as an option")
    return StackConfig(budget=budget, members=tuple(members), **options)


def _check_order(infos: Sequence[Any]) -> None:
    for i, info in enumerate(infos):
        if Stage.VISION_MERGE in info.stages and (i > 0 or set(info.stages) - {Stage.VISION, Stage.VISION_MERGE}):
            raise ValueError(
                f"{info.name!r} merges inside the vision tower: in a stack it must come first (nothing acts before "
                f"the tower)"
            )
    for info in infos[:-1]:
        if Stage.VISION_MERGE in info.stages:
            continue
        late = sorted(s.value for s in info.stages if s not in (Stage.VISION, Stage.PRE_LLM))
        if late or Stage.PRE_LLM not in info.stages or _decodes(info.method_class):
            raise ValueError(
                f"every stack member but the last must act before the LLM only; {info.name!r} acts at "
                f"{[s.value for s in info.stages]}: put it last"
            )


class Stack(Method):
    """Members at successive hook points; the last one reaches the budget (see the module docstring)."""

    kind = "stack"

    def __init__(self, config: StackConfig):
        from .registry import get_method

        super().__init__(config)
        members = []
        for m in config.members:  # every member counts from the stack's budget (the in-LLM one reads it)
            member = dataclasses.replace(m, budget=config.budget)
            members.append(get_method(m.method).method_class(member))
        self.members = members
        self.name = "+".join(m.name for m in members)
        self.stages = tuple(s for s in Stage if any(s in m.stages for m in members))
        self.modalities = tuple(x for x in members[0].modalities if all(x in m.modalities for m in members))
        if not self.modalities:
            raise ValueError(f"the members of {self.name!r} share no input modality")
        self.reads_prompt = any(m.reads_prompt for m in members)
        #: the member merging inside the vision tower (first), if any, and the members acting before the LLM
        self.tower = members[0] if Stage.VISION_MERGE in members[0].stages else None
        self.before = [m for m in members if Stage.PRE_LLM in m.stages]
        last = members[-1]
        #: the member acting inside the LLM (prune points, observations, decode-time selection), if any
        self.inner = last if Stage.LLM_LAYER in last.stages or _decodes(type(last)) else None
        #: the last member cuts only inside the LLM: the budget counts after that cut
        self.cuts_in_llm = Stage.PRE_LLM not in last.stages
        first = self.before[0] if self.before else last
        self.default_positions = first.default_positions
        self.default_newlines = first.default_newlines
        if self.inner is not None:
            self.default_llm_positions = self.inner.default_llm_positions or self.inner.default_positions

    # -- counts -------------------------------------------------------------------------------------
    def _schedule(self, n: int, end: int, stages: int) -> list[int]:
        """Tokens left after each of ``stages`` cuts of ``n`` tokens ending at ``end``: geometric unless ``keep``
        sets a stage; never rising, never below ``end``."""
        counts = stage_counts(end, n, stages) if n else [0] * stages
        keep = self.config.keep or (None,) * (len(self.members) - 1)
        out, prev = [], n
        for s, c in enumerate(counts[:-1]):
            if keep[s] is not None:
                c = keep_count(keep[s], n)
            prev = max(end, min(prev, c))
            out.append(prev)
        return [*out, end]

    def _counts(self, n: int) -> list[int]:
        """Tokens left after each member's cut, for an image of ``n`` (the last is the budget's ``k``)."""
        return self._schedule(n, keep_count(self.config.budget, n), len(self.members))

    def tower_count(self, n: int) -> int:
        return self._counts(n)[0] if self.tower is not None else keep_count(self.config.budget, n)

    def prompt_count(self, n: int) -> int:
        return self._counts(n)[-2] if self.cuts_in_llm else keep_count(self.config.budget, n)

    def tower_merge(self, call):
        return self.tower.tower_merge(call)

    def after_tower(self, image: ImageTokens, merged: Reduction) -> Reduction | None:
        if not self.before:
            return None
        counts = self._counts(image.n)
        targets = counts[1 : 1 + len(self.before)]
        current = _output_image(image, merged, self.tower.name)
        return self._cut(image, current, merged, targets, {self.tower.name: int(merged.index.numel())})

    # -- before the LLM -----------------------------------------------------------------------------
    def vision_signals(self, tower: TowerInfo) -> tuple[VisionSignal, ...]:
        out: dict[Any, VisionSignal] = {}
        for m in self.members:
            for s in m.vision_signals(tower):
                out.setdefault(s, s)
        return tuple(out)

    def reduce(self, image: ImageTokens) -> Reduction:
        # the tower left this image whole (its share was every token, or it copied its merged tokens back onto the
        # grid the model packs), or there is no tower stage
        stages = {self.tower.name: image.n} if self.tower is not None else {}
        return self._cut(image, image, None, self._schedule(image.n, image.k, len(self.before)), stages)

    def _cut(self, image, current, total, targets, stages) -> Reduction:
        """The members before the LLM, one after the other on what the previous left (``total``: so far)."""
        for s, (member, k) in enumerate(zip(self.before, targets, strict=True)):
            stages[member.name] = min(k, current.n)
            if k >= current.n:  # nothing to cut at this stage
                continue
            red = member.reduce(dataclasses.replace(current, k=k))
            if int(red.index.numel()) != k:
                raise RuntimeError(f"stack member {member.name!r} returned {red.index.numel()} tokens for k={k}")
            total = red if total is None else total.then(red, image.n)
            if s + 1 < len(self.before):
                current = _output_image(image, total, member.name)
        if total is None:
            total = Reduction.keep(torch.arange(image.n, device=image.tokens.device))
        stages.pop(self.before[-1].name, None)  # the last one is the record's "pre_llm"
        return dataclasses.replace(total, stages=stages)

    # -- inside the LLM: the in-LLM member, counting from the tokens before any stage -----------------
    def llm_prune_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.inner.llm_prune_layers(num_layers) if self.inner is not None else ()

    def llm_score_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.inner.llm_score_layers(num_layers) if self.inner is not None else ()

    def llm_observe_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.inner.llm_observe_layers(num_layers) if self.inner is not None else ()

    def llm_decode_layers(self, num_layers: int) -> tuple[int, ...]:
        return self.inner.llm_decode_layers(num_layers) if self.inner is not None else ()

    def prune(self, tokens: LayerTokens):
        if self.cuts_in_llm and tokens.n_original is not None:
            tokens = dataclasses.replace(tokens, n_input=tokens.n_original)
        return self.inner.prune(tokens)

    def observe(self, layer: int, part: str, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.inner.observe(layer, part, x, y, valid)

    def decode_select(self, tokens: DecodeTokens) -> list[torch.Tensor] | None:
        return self.inner.decode_select(tokens)

    def visual_schedule(self, num_layers: int, n: int) -> list[int]:
        before = self.prompt_count(n)
        if self.inner is None:
            return [before] * num_layers
        return [min(before, c) for c in self.inner.visual_schedule(num_layers, n)]


def _decodes(cls: type[Method]) -> bool:
    """The method selects cached rows at decode time (DyCoke)."""
    return cls.llm_decode_layers is not Method.llm_decode_layers


def _output_image(image: ImageTokens, red: Reduction, member: str) -> ImageTokens:
    """The image a later member sees: the tokens ``red`` outputs, each at its anchor's place in the layout."""
    if bool((red.index < 0).any()):
        raise ValueError(
            f"stack member {member!r} returned tokens with no source among the image's tokens (VisionZip's "
            f"contextual tokens, for one): no later member can place them; put {member!r} last"
        )
    out = image.subset(red.index)
    if red.tokens is not None:  # merged features: the anchors' own pre-projector features no longer match
        out = dataclasses.replace(out, tokens=red.tokens.to(image.tokens.dtype), vision_tokens=None)
    return out
