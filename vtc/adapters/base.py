"""What every adapter provides, and the sequence surgery shared by the families.

An adapter knows one model family: where the vision tower, its blocks, the projector and the LLM are,
how many visual tokens each image becomes and where they sit in the prompt, and how positions are
numbered. It turns a model call into per-image :class:`~vtc.contexts.ImageTokens` (``encode``) and, given
each image's :class:`~vtc.contexts.Reduction`, rebuilds the call's inputs (``rebuild``) so that the stock
``forward`` / ``generate`` run on the shorter sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..contexts import ImageTokens, Reduction, Stage, TowerCall, TowerInfo, TowerMerge, VisionSignal


class UnsupportedModelError(TypeError):
    """The model is not one vtc can compress (unknown family, or the wrong class of a known family)."""


@dataclasses.dataclass
class Encoded:
    """Result of running the vision side of one call.

    Attributes:
        images: one context per image, in the order the model consumes them (batch order).
        spans: per image, ``(sample, start)``: its placeholder run starts at ``input_ids[sample, start]``.
        encoder_output: the model's own image-feature output object, reused so nothing is encoded twice.
        reductions: per image, the reduction a ``VISION_MERGE`` method already made inside the vision tower
            (None: the image left the tower whole, or no such method). The session uses it as the image's
            result instead of calling ``reduce``; the image's :class:`~vtc.contexts.ImageTokens` keep the
            uncompressed count ``n`` (its ``tokens`` are the merged rows spread back over the ``n`` inputs).
    """

    images: list[ImageTokens]
    spans: list[tuple[int, int]]
    encoder_output: Any
    reductions: list[Reduction | None] | None = None


@dataclasses.dataclass
class Rebuilt:
    """Inputs for the stock model after compression, and what each output row is."""

    kwargs: dict[str, Any]
    source_positions: list[list[int]]
    position_ids: list[list[int]]
    input_lengths: list[int]
    output_lengths: list[int]


class Adapter:
    """Base class of the family adapters (see module docstring)."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    stages: ClassVar[frozenset[Stage]] = frozenset()
    #: position policy the family requires (None: any)
    forced_positions: ClassVar[str | None] = None
    #: call kwargs that carry visual input (their presence makes a call compressible)
    visual_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: a vision model with no LLM (timm / open_clip): compressed by :class:`vtc.vit_session.ViTSession`
    standalone: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.handles: list[Any] = []
        #: seconds spent in vtc's own hook computations during the last ``encode`` (inside the model's time)
        self.signal_seconds = 0.0
        #: seconds the model's own feature functions ran during the last ``encode`` (hooks included)
        self.model_seconds = 0.0
        #: while a call's vision side runs: signal name -> captured tensors (None otherwise)
        self._capture: dict[str, list[torch.Tensor]] | None = None

    # -- capture plumbing shared by the families' vision hooks ------------------------------------------
    @contextlib.contextmanager
    def _capturing(self):
        """Collect what the hooks capture while the model's vision side runs (and time it)."""
        self._capture = {}
        start = time.perf_counter()
        try:
            yield self._capture
        finally:
            self._capture = None
            self.model_seconds += time.perf_counter() - start

    def _keep(self, name: str, value: torch.Tensor) -> None:
        if self._capture is not None:
            self._capture.setdefault(name, []).append(value.detach())

    def _store_output(self, names: list[str]):
        """A forward hook storing a module's output under every name in ``names``."""

        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            for name in names:
                self._keep(name, out)

        return hook

    def _store_input(self, name: str):
        """A forward pre-hook storing a module's first input under ``name``."""

        def hook(module, args):
            self._keep(name, args[0])

        return hook

    # -- installation -------------------------------------------------------------------------------
    def install(self, signals: Sequence[VisionSignal]) -> None:
        """Register the hooks that capture ``signals`` (persistent; handles kept for ``uninstall``)."""

    def install_merge(
        self,
        merge: Callable[[TowerCall], TowerMerge | None],
        keep: Callable[[int], int],
        on_done: Callable[[TowerMerge], None] | None = None,
    ) -> None:
        """Run the vision blocks through block runners driven by ``merge`` (``Stage.VISION_MERGE``).

        Args:
            merge: the method's :meth:`~vtc.registry.Method.tower_merge`, called when a tower call starts.
            keep: consumer tokens to keep out of ``n`` (the session's budget, via :mod:`vtc.budget`).
            on_done: called with the merge state after the tower's last block (standalone towers).
        """
        raise NotImplementedError(f"the {self.family} adapter cannot merge tokens inside its vision tower")

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # -- per call -----------------------------------------------------------------------------------
    def has_visual_input(self, kwargs: Mapping[str, Any]) -> bool:
        return any(kwargs.get(name) is not None for name in self.visual_inputs)

    def check_call(self, kwargs: Mapping[str, Any]) -> None:
        """Raise a clear error for a call vtc cannot compress (before anything runs)."""

    def encode(self, kwargs: Mapping[str, Any], signals: Sequence[VisionSignal]) -> Encoded:
        raise NotImplementedError

    def rebuild(
        self,
        kwargs: Mapping[str, Any],
        encoded: Encoded,
        reductions: Sequence[Reduction | None],
        positions: str,
        for_generate: bool,
    ) -> Rebuilt:
        raise NotImplementedError

    def passthrough(self, kwargs: Mapping[str, Any], encoded: Encoded) -> dict[str, Any]:
        """The call's own inputs with the visual input replaced by the already computed features."""
        raise NotImplementedError

    def visual_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: rows of ``input_ids`` that are visual placeholders."""
        raise NotImplementedError

    def decoder(self) -> Any:
        """The LLM as a :class:`vtc.adapters.llm.Decoder` (for the ``LLM_LAYER`` stage)."""
        raise NotImplementedError

    def text_config(self) -> Any:
        raise NotImplementedError

    def tower_info(self) -> TowerInfo:
        raise NotImplementedError


# -- shared helpers ------------------------------------------------------------------------------------


def reduced_tokens(image: ImageTokens, red: Reduction | None) -> torch.Tensor:
    """``[k, D]`` the tokens an image contributes to the LLM after its reduction (all of them for None)."""
    if red is None:
        return image.tokens
    if red.tokens is not None:
        return red.tokens.to(image.tokens.dtype)
    return image.tokens[red.index]


def find_runs(mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Contiguous runs of True per row of a ``[B, L]`` bool mask: ``[[(start, length), ...], ...]``."""
    runs = []
    for row in mask.tolist():
        found, start = [], None
        for i, flag in enumerate(row + [False]):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                found.append((start, i - start))
                start = None
        runs.append(found)
    return runs


def padding_side(attention_mask: torch.Tensor | None, for_generate: bool) -> str:
    """Side to add padding on: the side the caller padded, else left for generate and right for forward."""
    if attention_mask is not None and bool((attention_mask == 0).any()):
        if bool((attention_mask[:, -1] != 0).all()):
            return "left"
        if bool((attention_mask[:, 0] != 0).all()):
            return "right"
    return "left" if for_generate else "right"


def splice(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    base_positions: torch.Tensor,
    images: Sequence[tuple[int, int, int]],
    reductions: Sequence[Reduction | None],
    placeholder_id: int,
    pad_id: int,
    policy: str,
    side: str,
    per_token: Mapping[str, tuple[torch.Tensor, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list[list[int]]]:
    """Rebuild a batch of prompts after each image's placeholder run is reduced.

    Args:
        input_ids, attention_mask: ``[B, L]``.
        base_positions: ``[..., B, L]`` positions the stock model would use for the full prompt (1-D RoPE:
            ``[B, L]``; M-RoPE: ``[C, B, L]``).
        images: per image ``(sample, start, n)``; the run ``input_ids[sample, start:start+n]``.
        reductions: per image; None keeps the run unchanged.
        policy: ``"original"`` keeps each kept row's base position; ``"compact"`` subtracts the number of
            tokens removed before it (1-D positions only).
        side: ``"left"`` or ``"right"``: where padding goes when samples end up with different lengths.
        per_token: other ``[B, L]`` inputs to carry along (e.g. labels), with the fill value for new padding.

    Returns:
        ``(input_ids, attention_mask, positions, per_token, source_positions)`` of the new batch, where
        ``source_positions[b][r]`` is the input position row ``r`` came from (-1: added padding, or a
        merged / source-less visual row).
    """
    bsz, _ = input_ids.shape
    device = input_ids.device
    if policy == "compact" and base_positions.dim() != 2:
        raise ValueError("compact positions are only defined for 1-D position ids")
    per_sample: list[list[tuple[int, int, Reduction | None]]] = [[] for _ in range(bsz)]
    for (sample, start, n), red in zip(images, reductions, strict=True):
        per_sample[sample].append((start, n, red))

    take_rows, src_rows, pos_rows, visual_rows = [], [], [], []
    for b in range(bsz):
        takes, srcs, poss, vis = [], [], [], []
        cursor, removed = 0, 0
        for start, n, red in sorted(per_sample[b], key=lambda t: t[0]):
            text = torch.arange(cursor, start, device=device)
            takes.append(text)
            srcs.append(text)
            poss.append(base_positions[..., b, cursor:start] - (removed if policy == "compact" else 0))
            vis.append(torch.zeros(len(text), dtype=torch.bool, device=device))
            if red is None:
                run = torch.arange(start, start + n, device=device)
                takes.append(run)
                srcs.append(run)
                poss.append(base_positions[..., b, start : start + n] - (removed if policy == "compact" else 0))
                k = n
            else:
                anchor = red.index.to(device)
                k = int(anchor.numel())
                has = anchor >= 0
                src = torch.where(has, anchor + start, torch.full_like(anchor, -1))
                take = torch.where(has, src, torch.full_like(anchor, start))
                if red.tokens is not None:  # merged rows have no single source
                    merged = red.resolve_groups(n).to(device)
                    sizes = torch.bincount(merged[merged >= 0], minlength=k)
                    src = torch.where(sizes == 1, src, torch.full_like(src, -1))
                takes.append(take)
                srcs.append(src)
                if policy == "compact":
                    first = base_positions[..., b, start] - removed
                    poss.append(first + torch.arange(k, device=device))
                else:
                    poss.append(base_positions[..., b, take])
            vis.append(torch.ones(k, dtype=torch.bool, device=device))
            removed += n - k
            cursor = start + n
        tail = torch.arange(cursor, input_ids.shape[1], device=device)
        takes.append(tail)
        srcs.append(tail)
        poss.append(base_positions[..., b, cursor:] - (removed if policy == "compact" else 0))
        vis.append(torch.zeros(len(tail), dtype=torch.bool, device=device))
        take_rows.append(torch.cat(takes))
        src_rows.append(torch.cat(srcs))
        pos_rows.append(torch.cat(poss, dim=-1))
        visual_rows.append(torch.cat(vis))

    new_len = max(int(t.numel()) for t in take_rows)
    lead = base_positions.shape[:-2]
    ids = input_ids.new_full((bsz, new_len), pad_id)
    mask = attention_mask.new_zeros((bsz, new_len))
    pos = base_positions.new_zeros((*lead, bsz, new_len))
    extra = {name: t.new_full((bsz, new_len), fill) for name, (t, fill) in (per_token or {}).items()}
    sources = []
    for b in range(bsz):
        take, src = take_rows[b], src_rows[b]
        m = int(take.numel())
        sl = slice(new_len - m, new_len) if side == "left" else slice(0, m)
        row_ids = input_ids[b, take].clone()
        row_ids[visual_rows[b]] = placeholder_id
        ids[b, sl] = row_ids
        mask[b, sl] = attention_mask[b, take]
        pos[..., b, sl] = pos_rows[b]
        for name, (t, _) in (per_token or {}).items():
            extra[name][b, sl] = t[b, take]
        padded = [-1] * (new_len - m)
        row_src = src.tolist()
        sources.append(padded + row_src if side == "left" else row_src + padded)
    return ids, mask, pos, extra, sources


def module_at(root: nn.Module, path: str) -> nn.Module | None:
    """``root.a.b.c`` for ``path == "a.b.c"``, or None."""
    node: Any = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


ProjectFn = Callable[[torch.Tensor], torch.Tensor]
