"""What every adapter provides to a session, and the data an encode / rebuild hands back.

An adapter knows one model family: where the vision tower, its blocks, the projector and the LLM are,
how many visual tokens each image becomes and where they sit in the prompt, and how positions are
numbered. A session gives it the method once (:meth:`Adapter.configure`); the adapter then installs every
hook point it owns (:meth:`Adapter.install`: vision signals, token merging in the tower, the LLM-layer
hooks) and removes them all again (:meth:`Adapter.uninstall`).

Vision-language adapters (:class:`vtc.adapters.vlm.VLMAdapter`) also serve the calls the session routes:
``encode`` turns a call into per-image :class:`~vtc.contexts.ImageTokens`, ``rebuild`` turns each image's
:class:`~vtc.contexts.Reduction` into the inputs of the stock ``forward`` / ``generate``, ``plan_llm`` arms
the LLM-layer hooks for that call. A standalone vision transformer routes nothing: its blocks merge in
every call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..contexts import ImageTokens, Reduction, Stage, TowerInfo
from ..method import Method


class UnsupportedModelError(TypeError):
    """The model is not one vtc can compress (unknown family, or the wrong class of a known family)."""


@dataclasses.dataclass
class Encoded:
    """Result of running the vision side of one call.

    Attributes:
        images: one context per image, in the order the model consumes them (batch order).
        spans: per image, ``(sample, start)``: its first placeholder is ``input_ids[sample, start]``.
        encoder_output: the model's own feature outputs by modality, reused so nothing is encoded twice.
        reductions: per image, the reduction a ``VISION_MERGE`` method already made inside the vision tower
            (None: the image left the tower whole, or no such method). The session uses it as the image's
            result instead of calling ``reduce``; the image's :class:`~vtc.contexts.ImageTokens` keep the
            uncompressed count ``n`` (its ``tokens`` are the merged rows spread back over the ``n`` inputs).
        streams: per image, its rows of every token stream the adapter declares (see :mod:`vtc.adapters.streams`).
        rows: per image, every placeholder row it fills (see :func:`vtc.adapters.sequence.assign`).
    """

    images: list[ImageTokens]
    spans: list[tuple[int, int]]
    encoder_output: Any
    reductions: list[Reduction | None] | None = None
    streams: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: per image, all its placeholder rows of ``input_ids[sample]`` (one run, or a segmented image's pieces)
    rows: list[torch.Tensor] = dataclasses.field(default_factory=list)


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
    #: ``config.model_type`` values this adapter serves (empty for standalone towers, found by class name)
    model_types: ClassVar[tuple[str, ...]] = ()
    stages: ClassVar[frozenset[Stage]] = frozenset()
    #: the model packs every tile's / frame's full grid: tower merging copies merged tokens back onto it
    tower_unmerge: ClassVar[bool] = False
    #: the kinds of visual input the family's models take (``"image"``, ``"video"``)
    inputs: ClassVar[tuple[str, ...]] = ("image",)
    #: position policy the family requires (None: any)
    forced_positions: ClassVar[str | None] = None
    #: the model's calls carry its visual input, so the session routes ``forward`` / ``generate``; a
    #: standalone tower's calls need no routing (its block runners merge in every call)
    routes_calls: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.handles: list[Any] = []
        self.method: Method | None = None
        self.keep: Callable[[int], int] | None = None
        self.recorder: Any = None

    def configure(self, method: Method, keep: Callable[[int], int], recorder: Any) -> None:
        """Take the session's method, its keep count (``n -> k``, :mod:`vtc.budget`) and its
        :class:`~vtc.record.Recorder`; raise here, before anything is installed, for what cannot work."""
        self.method, self.keep, self.recorder = method, keep, recorder

    @property
    def timer(self) -> Any:
        """The recorder's :class:`~vtc.record.Timer`: hooks count their own time into it."""
        return self.recorder.timer

    def install(self) -> None:
        """Register every hook point the method needs (persistent; handles kept for ``uninstall``)."""
        raise NotImplementedError

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def installed(self) -> list[Any]:
        """Every handle :meth:`install` keeps (hooks, class swaps, containers of them)."""
        return list(self.handles)

    def stock_view(self) -> list[tuple[Any, Any]]:
        """What a deep copy of the stock model holds where the installed handles patched it: ``(patched, stock)``
        pairs, each hook dict with vtc's entries left out, each swapped class with the module's own class."""
        drop: dict[int, tuple[dict, set[int]]] = {}
        out: list[tuple[Any, Any]] = []
        pending = self.installed()
        while pending:
            handle = pending.pop()
            if hasattr(handle, "parts"):
                pending += handle.parts()
            elif hasattr(handle, "stock"):
                out += handle.stock()
            else:  # a torch RemovableHandle: its id keys an entry in one or more hook dicts
                for ref in (handle.hooks_dict_ref, *handle.extra_dict_ref):
                    hooks = ref()
                    if hooks is not None and handle.id in hooks:
                        drop.setdefault(id(hooks), (hooks, set()))[1].add(handle.id)
        for hooks, ids in drop.values():
            out.append((hooks, type(hooks)((k, v) for k, v in hooks.items() if k not in ids)))
        return out

    def tower_info(self) -> TowerInfo:
        raise NotImplementedError

    def arrange(self, encoded: Encoded, reductions: list[Reduction | None]) -> list[Reduction | None]:
        """The reductions in the order the rebuilt prompt holds their tokens (as given, unless overridden)."""
        return reductions

    def text_config(self) -> Any:
        """The LLM's config (for FLOPs)."""
        raise NotImplementedError(f"the {self.family} family has no language model")


def module_at(root: nn.Module, path: str) -> nn.Module | None:
    """``root.a.b.c`` for ``path == "a.b.c"``, or None."""
    node: Any = root
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node
