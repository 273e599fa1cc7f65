"""A compression session on a standalone vision transformer (timm / open_clip; no LLM, no prompt).

``vtc.compress(vit, method="tome", r=13)`` swaps the class of every vision block *instance* for a block
runner (the model's own class and ``forward`` stay as they are), so any call that runs the blocks
(``forward``, ``forward_features``, open_clip's ``encode_image``) merges tokens. After the last block the
session keeps the call's source map; :attr:`ViTSession.record` turns it into a :class:`~vtc.record.Record`
on demand (one :class:`~vtc.record.ImageRecord` per image: ``groups`` = output patch row of every input
patch, ``kept`` = the first input patch of every output patch row, ``counts`` = input and output patches;
``flops["vision_tokens"]`` = tokens after each block, prefix included). ``vtc.restore`` swaps the classes
back and removes the key hooks: nothing is left.
"""

from __future__ import annotations

from torch import nn

from .adapters.vit import ViTAdapter
from .budget import keep_count
from .config import MethodConfig
from .contexts import Stage, TowerMerge
from .record import ImageRecord, Record
from .registry import Method


class ViTSession:
    def __init__(self, model: nn.Module, adapter: ViTAdapter, method: Method, config: MethodConfig):
        if Stage.VISION_MERGE not in method.stages:
            raise ValueError(f"method {method.name!r} does not merge tokens inside a vision tower")
        self.model = model
        self.adapter = adapter
        self.method = method
        self.config = config
        self._last: tuple[TowerMerge, float] | None = None
        self._record: Record | None = None

    def attach(self) -> None:
        try:
            self.adapter.install_merge(self.method.tower_merge, self._keep, on_done=self._done)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        self.adapter.uninstall()

    def _keep(self, n: int) -> int:
        return keep_count(self.config.budget, n)

    def _done(self, state: TowerMerge) -> None:
        ctx = self.adapter.context
        seconds, ctx.seconds = ctx.seconds, 0.0
        self._last, self._record = (state, seconds), None

    @property
    def record(self) -> Record | None:
        """The record of the last call that merged (None before the first one)."""
        if self._last is None:
            return None
        if self._record is None:
            self._record = self._make_record(*self._last)
        return self._record

    def _make_record(self, state: TowerMerge, seconds: float) -> Record:
        prefix = self.adapter.prefix
        groups, anchors = state.consumer_view(prefix)
        groups, anchors = groups.tolist(), anchors.tolist()
        n = len(groups[0])
        rows, cols = self.adapter.grid(n)
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
        counts = list(getattr(state, "counts", []))
        return Record(
            method=self.method.name,
            config=self.config.to_dict(),
            family=self.adapter.family,
            positions="compact",
            images=images,
            samples=[],
            flops={"vision_tokens": counts},
            seconds_in_vtc=seconds,
        )
