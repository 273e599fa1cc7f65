"""What a compressed call did, per sample and per image: the one thing viz and eval read.

A :class:`Record` is plain Python data (ints, floats, lists, dicts): it *is* a dict of its fields (and its
images and samples are dicts of theirs), so ``json.dumps(record)`` works as it is, and
``Record.from_dict(json.loads(...))`` (or :meth:`Record.from_json`) builds it back. The
:class:`Recorder` of a session builds one per compressed call (kept tokens, merge groups, the analytic FLOPs
of :mod:`vtc.flops`), updates it after every in-LLM prune point, and times vtc's own work with its
:class:`Timer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .contexts import ImageTokens, Reduction, TowerMerge
from .flops import flops_summary


class _Plain(dict):
    """A dataclass whose fields are its dict items: the instance's attributes live in the dict itself."""

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        obj.__dict__ = obj
        return obj


@dataclasses.dataclass(eq=True)
class ImageRecord(_Plain):
    """One image (or video) of one sample.

    Attributes:
        sample: sample index in the batch; image: image index in the whole batch.
        grids: ``[rows, cols]`` of each partition (in LLM tokens); prefix: CLS-like slots per partition.
        partition, slot: per input token, its partition and slot (see :class:`vtc.contexts.Layout`).
        kept: for each token fed to the LLM, in LLM order, the input token it stands at (-1: no source token).
        groups: per input token, the output row it ended in (-1: dropped). Merged tokens share a row.
        scores: per input token, the score the method ranked by (None if it used none).
        counts: tokens per stage, e.g. ``{"input": 576, "pre_llm": 144, "llm_layer_2": 72}``; a stack's earlier
            members before the LLM as ``"pre_llm:<member>"`` (``{"input": 576, "pre_llm:pool": 144, "pre_llm": 64}``).
        layers: for in-LLM stages, the input tokens still present from each prune layer on (key: layer).
    """

    sample: int
    image: int
    grids: list[list[int]]
    prefix: int
    partition: list[int]
    slot: list[int]
    kept: list[int]
    groups: list[int]
    scores: list[float] | None
    counts: dict[str, int]
    layers: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    modality: str = "image"
    #: ``[g_h, g_w]`` when partition 0 is the whole image and the others its crops (LLaVA-NeXT), else None
    arrangement: list[int] | None = None
    #: separator (newline) tokens among ``counts``' input and pre-LLM tokens, when the layout has any
    newlines: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_input(self) -> int:
        return len(self.groups)

    @property
    def num_kept(self) -> int:
        return len(self.kept)

    def kept_set(self) -> list[int]:
        """Input tokens whose features survive (alone or inside a merged token), ascending."""
        return sorted(i for i, g in enumerate(self.groups) if g >= 0)


@dataclasses.dataclass(eq=True)
class SampleRecord(_Plain):
    """One sample of the batch.

    Attributes:
        input_length / output_length: non-padding tokens before / after compression.
        source_positions: for each row of the compressed sequence fed to the LLM (padding included), the
            position in the caller's input it came from; -1 for padding vtc added and for merged or
            CLS tokens with no single source. Logits of a compressed ``forward`` follow these rows.
        position_ids: the position id of each row fed to the LLM (empty: the model's own, nothing changed).
            After in-LLM pruning, ``source_positions`` and ``output_length`` describe the rows that leave
            the last layer (the rows of a forward's logits).
    """

    sample: int
    input_length: int
    output_length: int
    source_positions: list[int]
    position_ids: list[int]


@dataclasses.dataclass(eq=True)
class Record(_Plain):
    method: str
    config: dict[str, Any]
    family: str
    positions: str
    images: list[ImageRecord]
    samples: list[SampleRecord]
    flops: dict[str, Any]
    seconds_in_vtc: float = 0.0
    #: per sample, visual tokens seen by each LLM layer (layer 0 first)
    visual_per_layer: list[list[int]] = dataclasses.field(default_factory=list)
    #: position policy of the rows left inside the LLM (``positions``: of the prompt it receives); None without
    #: an in-LLM stage
    llm_positions: str | None = None

    @property
    def equivalent_budget(self) -> float:
        """Layer-averaged visual tokens over the uncompressed count (FastV/PyramidDrop's fair comparison)."""
        n = sum(im.num_input for im in self.images)
        if not n or not self.visual_per_layer:
            return 1.0
        layers = len(self.visual_per_layer[0])
        return sum(sum(row) for row in self.visual_per_layer) / layers / n

    def images_of(self, sample: int) -> list[ImageRecord]:
        return [im for im in self.images if im.sample == sample]

    @property
    def visual_tokens(self) -> dict[str, int]:
        """Visual tokens before compression, fed to the LLM (``kept``), and after the last stage (in-LLM
        methods keep fewer from their prune layer on)."""
        return {
            "input": sum(im.num_input for im in self.images),
            "kept": sum(im.num_kept for im in self.images),
            "last_stage": sum(list(im.counts.values())[-1] for im in self.images),
        }

    def take_rows(self, values: torch.Tensor, fill: Any = 0) -> torch.Tensor:
        """``values [B, L]`` given per input position (``labels``, say) -> ``[B, L']`` on the rows the LLM's output
        has (each sample's ``source_positions``; ``fill`` where a row has no single source)."""
        src = torch.tensor([s.source_positions for s in self.samples], device=values.device)  # [B, L']
        taken = values.gather(1, src.clamp_min(0))
        return taken.masked_fill(src < 0, fill)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        data = dict(data)
        data["images"] = [ImageRecord(**im) for im in data["images"]]
        data["samples"] = [SampleRecord(**s) for s in data["samples"]]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Record:
        return cls.from_dict(json.loads(text))


class Timer:
    """vtc's own time in one call: the wall time since :meth:`start`, minus the model's own feature computation
    (:meth:`model`), plus vtc's hook computations that ran inside it (:meth:`signal`)."""

    def __init__(self) -> None:
        self.started = 0.0
        #: seconds the model's own feature functions ran during the call (vtc's hooks inside them included)
        self.model_seconds = 0.0
        #: seconds spent in vtc's hook computations inside the model's feature functions
        self.signal_seconds = 0.0

    def start(self) -> None:
        self.started = time.perf_counter()
        self.model_seconds = self.signal_seconds = 0.0

    @contextlib.contextmanager
    def model(self) -> Iterator[None]:
        """Time a stretch of the model's own code (it does not count as vtc's)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.model_seconds += time.perf_counter() - start

    def signal(self, seconds: float) -> None:
        """Count ``seconds`` of vtc's own work done inside the model's code (hooks, merge steps)."""
        self.signal_seconds += seconds

    def own_seconds(self) -> float:
        return time.perf_counter() - self.started - self.model_seconds + self.signal_seconds


class Recorder:
    """Builds the :class:`Record` of every compressed call of one session.

    Args:
        method, config, family, positions, llm_positions: what the record reports about the compression.
        text_config: returns the LLM's config (for the analytic FLOPs); not called for a standalone tower.
    """

    def __init__(
        self,
        method: str,
        config: Any,
        family: str,
        positions: str,
        text_config: Callable[[], Any],
        llm_positions: str | None = None,
    ):
        self.method, self.config, self.family, self.positions = method, config, family, positions
        self.llm_positions = llm_positions
        self.text_config = text_config
        self.timer = Timer()
        self._record: Record | None = None
        self._tower: tuple[TowerMerge, float, int, Callable[[int], tuple[int, int]]] | None = None
        self._full_lengths: list[int] = []
        self._layer_lengths: list[list[int]] = []

    @property
    def record(self) -> Record | None:
        """The record of the last call (None before the first one)."""
        if self._record is None and self._tower is not None:
            self._record = _tower_record(self, *self._tower)
        return self._record

    def call(
        self, images: Sequence[ImageTokens], reductions: Sequence[Reduction | None], rebuilt: Any, kwargs: dict
    ) -> Record:
        """The record of a call whose images were reduced by ``reductions`` and rebuilt into ``rebuilt`` (None: the
        call passed through unchanged)."""
        records = [_image_record(image, red) for image, red in zip(images, reductions, strict=True)]
        samples = []
        if rebuilt is not None:
            for b, (src, pos) in enumerate(zip(rebuilt.source_positions, rebuilt.position_ids, strict=True)):
                lengths = int(rebuilt.input_lengths[b]), int(rebuilt.output_lengths[b])
                samples.append(SampleRecord(b, *lengths, src, pos))
            full, kept = list(rebuilt.input_lengths), list(rebuilt.output_lengths)
        else:
            mask = kwargs.get("attention_mask")
            ids = kwargs["input_ids"]
            full = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
            kept = list(full)
            rows = list(range(ids.shape[1]))
            samples = [SampleRecord(b, int(n), int(n), rows, []) for b, n in enumerate(full)]
        text_config = self.text_config()
        num_layers = int(text_config.num_hidden_layers)
        self._full_lengths = [int(n) for n in full]
        self._layer_lengths = [[int(n)] * num_layers for n in kept]
        visual = [sum(len(im.kept) for im in records if im.sample == b) for b in range(len(full))]
        self._tower, self._record = (
            None,
            Record(
                method=self.method,
                config=self.config.to_dict(),
                family=self.family,
                positions=self.positions,
                llm_positions=self.llm_positions,
                images=records,
                samples=samples,
                flops=flops_summary(text_config, self._full_lengths, self._layer_lengths),
                seconds_in_vtc=0.0,
                visual_per_layer=[[v] * num_layers for v in visual],
            ),
        )
        return self._record

    def on_prune(self, call: Any, layer: int, seconds: float) -> None:
        """Record what survives an in-LLM prune point (kept tokens, counts, per-layer lengths, FLOPs, time).

        ``call`` is a :class:`~vtc.adapters.llm_state.RowView` of the prefill: ``mask2d``, ``visual``,
        ``row_image``, ``row_token`` and ``row_source``, each ``[B, L]`` over the rows leaving the prune point.
        """
        rec = self._record
        if rec is None:
            return
        rec.seconds_in_vtc += seconds
        valid = call.mask2d & (call.row_image >= 0)
        for j, im in enumerate(rec.images):
            tokens = call.row_token[valid & (call.row_image == j)]
            im.layers[str(layer)] = sorted(tokens.tolist())
            im.counts[f"llm_layer_{layer}"] = int(tokens.numel())
        for b, sample in enumerate(rec.samples):  # the rows a forward's logits now stand for
            sample.source_positions = call.row_source[b].tolist()
            sample.output_length = int(call.mask2d[b].sum())
        n_layers = len(rec.visual_per_layer[0]) if rec.visual_per_layer else 0
        vis = (call.mask2d & call.visual).sum(1).tolist()
        lengths = call.mask2d.sum(1).tolist()
        for b in range(len(rec.visual_per_layer)):
            for layer_idx in range(layer, n_layers):
                rec.visual_per_layer[b][layer_idx] = int(vis[b])
                self._layer_lengths[b][layer_idx] = int(lengths[b])
        rec.flops = flops_summary(self.text_config(), self._full_lengths, self._layer_lengths)

    def tower_done(
        self, state: TowerMerge, seconds: float, prefix: int, grid: Callable[[int], tuple[int, int]]
    ) -> None:
        """A standalone tower finished a merging call; its record is built when first asked for."""
        self._tower, self._record = (state, seconds, prefix, grid), None


def _image_record(image: ImageTokens, red: Reduction | None) -> ImageRecord:
    n = image.n
    if red is None:
        kept, groups, scores = list(range(n)), list(range(n)), None
    else:
        kept = red.index.tolist()
        groups = red.resolve_groups(n).tolist()
        scores = None if red.scores is None else red.scores.float().tolist()
    return ImageRecord(
        sample=image.sample,
        image=image.image,
        grids=[list(g) for g in image.layout.grids],
        prefix=image.layout.prefix,
        partition=image.layout.partition.tolist(),
        slot=image.layout.slot.tolist(),
        kept=kept,
        groups=groups,
        scores=scores,
        counts={"input": n, **{f"pre_llm:{name}": c for name, c in (red.stages or {}).items()}, "pre_llm": len(kept)}
        if red is not None
        else {"input": n, "pre_llm": n},
        newlines=_newline_counts(image, kept),
        modality=image.modality,
        arrangement=list(image.layout.arrangement) if image.layout.arrangement else None,
    )


def _newline_counts(image: ImageTokens, kept: list[int]) -> dict[str, int]:
    """Separator tokens in the input and among the kept tokens (budgets with and without them)."""
    newline = image.layout.is_newline()
    if not bool(newline.any()):
        return {}
    return {"input": int(newline.sum()), "pre_llm": sum(1 for i in kept if i >= 0 and bool(newline[i]))}


def _tower_record(
    recorder: Recorder, state: TowerMerge, seconds: float, prefix: int, grid: Callable[[int], tuple[int, int]]
) -> Record:
    """A standalone tower's call: per image, ``groups`` = output patch row of every input patch, ``kept`` = the
    first input patch of every output row, ``counts`` = input and output patches, and ``flops["vision_tokens"]``
    = tokens after each block, prefix included."""
    groups, anchors = state.consumer_view(prefix)
    groups, anchors = groups.tolist(), anchors.tolist()
    n = len(groups[0])
    rows, cols = grid(n)
    images = [
        ImageRecord(
            sample=b,
            image=b,
            grids=[[rows, cols]],
            prefix=prefix,
            partition=[0] * n,
            slot=list(range(prefix, prefix + n)),
            kept=anchors[b],
            groups=groups[b],
            scores=None,
            counts={"input": n, "vision": len(anchors[b])},
        )
        for b in range(len(groups))
    ]
    return Record(
        method=recorder.method,
        config=recorder.config.to_dict(),
        family=recorder.family,
        positions="compact",
        images=images,
        samples=[],
        flops={"vision_tokens": list(getattr(state, "counts", []))},
        seconds_in_vtc=seconds,
    )
