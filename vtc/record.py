"""What a compressed call did, per sample and per image: the one thing viz and eval read.

Everything is plain Python data (ints, floats, lists, dicts), so a record round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class ImageRecord:
    """One image (or video) of one sample.

    Attributes:
        sample: sample index in the batch; image: image index in the whole batch.
        grids: ``[rows, cols]`` of each partition (in LLM tokens); prefix: CLS-like slots per partition.
        partition, slot: per input token, its partition and slot (see :class:`vtc.contexts.Layout`).
        kept: for each token fed to the LLM, in LLM order, the input token it stands at (-1: no source token).
        groups: per input token, the output row it ended in (-1: dropped). Merged tokens share a row.
        scores: per input token, the score the method ranked by (None if it used none).
        counts: tokens per stage, e.g. ``{"input": 576, "pre_llm": 144, "llm_layer_2": 72}``.
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


@dataclasses.dataclass
class SampleRecord:
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


@dataclasses.dataclass
class Record:
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
