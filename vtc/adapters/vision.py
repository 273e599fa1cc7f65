"""The ``VISION`` hook point: signals captured inside the vision tower while it keeps its own attention kernel.

A method asks for :class:`~vtc.contexts.VisionSignal` s; :func:`install_signals` hooks the blocks they name.
A ``"hidden"`` signal is a block's output. The attention signals (the CLS row, the attention each token
receives, head-mean keys) are computed here, and only here, by :func:`attention_signals`, from the queries
and keys the block computes anyway: a family only says how to read them (a :data:`QKReader`, e.g. from
separate ``q_proj`` / ``k_proj`` modules, or from a fused ``qkv`` projection with rotary embeddings), so no
projection runs twice and the tower never switches to eager attention.

Everything is collected into a :class:`Capture` during vtc's own feature calls only; a call of the tower
outside them (the user's own) leaves the hooks idle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..contexts import VisionSignal
from .base import UnsupportedModelError, module_at


@dataclasses.dataclass(frozen=True)
class Tower:
    """Where a ViT tower keeps its blocks (path inside the tower), each block's attention, and its CLS tokens."""

    blocks: str
    attention: str
    prefix: int


#: vision tower ``model_type`` -> its layout (CLIP: LLaVA-1.5; SigLIP; DINOv2: the offline VLM)
VISION_TOWERS: dict[str, Tower] = {
    "clip_vision_model": Tower("encoder.layers", "self_attn", 1),
    "siglip_vision_model": Tower("encoder.layers", "self_attn", 0),
    "dinov2": Tower("encoder.layer", "attention", 1),
}


def find_tower(tower: nn.Module, model_type: str, family: str) -> tuple[Tower, nn.ModuleList]:
    """The layout and the block list of a ViT tower of ``model_type`` (:data:`VISION_TOWERS`)."""
    if model_type not in VISION_TOWERS:
        raise UnsupportedModelError(
            f"vision tower {model_type!r} is not supported by the {family} adapter; supported: {sorted(VISION_TOWERS)}"
        )
    layout = VISION_TOWERS[model_type]
    blocks = module_at(tower, layout.blocks)
    if blocks is None:
        raise UnsupportedModelError(f"could not find the vision blocks at vision_tower.{layout.blocks}")
    return layout, blocks


def feature_block(vision_feature_layer: int, num_blocks: int) -> int:
    """Block whose output is ``hidden_states[vision_feature_layer]`` (hidden_states[0] = embeddings)."""
    idx = vision_feature_layer % (num_blocks + 1)
    if idx == 0:
        raise ValueError("vision_feature_layer selects the embeddings, which no block computes")
    return idx - 1


#: ``(q, k, segments)``: a block's queries and keys, ``[B, T, H, d]`` before the attention scale, or one packed
#: sequence ``[T, H, d]`` whose tokens attend within ``segments`` (``[(start, end), ...]``) only
Emit = Callable[[torch.Tensor, torch.Tensor, "Sequence[tuple[int, int]] | None"], None]
#: installs the hooks that read one block's q and k and hand them to ``emit``; returns the hook handles
QKReader = Callable[[nn.Module, "Capture", Emit], list[Any]]


class Capture:
    """What the vision hooks collect during one of vtc's own feature calls (nothing outside them)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] | None = None

    @property
    def active(self) -> bool:
        return self.parts is not None

    @contextlib.contextmanager
    def running(self, timer: Any) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Collect while the model's vision side runs (timed as the model's own computation)."""
        self.parts = {}
        try:
            with timer.model():
                yield self.parts
        finally:
            self.parts = None

    def keep(self, name: str, value: torch.Tensor, detach: bool = True) -> None:
        if self.parts is not None:
            self.parts.setdefault(name, []).append(value.detach() if detach else value)

    def store_output(self, names: list[str]) -> Callable:
        """A forward hook storing a module's output under every name in ``names``."""

        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            for name in names:
                self.keep(name, out)

        return hook

    def store_input(self, name: str) -> Callable:
        """A forward pre-hook storing a module's first input under ``name`` (with its gradient: methods that merge
        pre-projector features project them again)."""

        def hook(module, args):
            self.keep(name, args[0], detach=False)

        return hook


def attention_signals(
    sigs: Sequence[VisionSignal],
    q: torch.Tensor,
    k: torch.Tensor,
    segments: Sequence[tuple[int, int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Every attention signal in ``sigs`` for one block, by signal name.

    Args:
        q, k: ``[B, T, H, d]`` queries and keys before the attention scale (RoPE applied where the tower uses
            it); with ``segments``, one packed sequence ``[T, H, d]`` instead.
        segments: ``[(start, end), ...]`` along the packed sequence: its tokens attend only within their
            segment (Qwen2-VL's per-image, Qwen2.5-VL's per-window attention), so every signal is computed
            over exactly the keys the block attends to.

    Returns:
        ``cls_attention`` and ``attention_received``: ``[B, T]`` fp32 (``[T]`` packed); ``keys``: ``[B, T, d]``
        head-mean keys (``[T, d]`` packed).
    """
    if segments is not None:
        parts = [attention_signals(sigs, q[None, a:b], k[None, a:b]) for a, b in segments]
        return {sig.name: torch.cat([p[sig.name][0] for p in parts]) for sig in sigs}
    out = {}
    for sig in sigs:
        if sig.kind == "cls_attention":
            out[sig.name] = kernels.attention_row(q, k, 0, sig.heads)
        elif sig.kind == "attention_received":
            out[sig.name] = kernels.attention_received(q, k, sig.heads)
        else:
            out[sig.name] = kernels.head_mean_keys(k)
    return out


def projection_qk(attention: str, num_heads: int, q: str = "q_proj", k: str = "k_proj") -> QKReader:
    """Read q and k from the outputs of a block's ``<attention>.<q>`` / ``.<k>`` (CLIP, SigLIP, DINOv2: the
    projections; InternViT: its q / k norms, which come after them)."""

    def install(block: nn.Module, capture: Capture, emit: Emit) -> list[Any]:
        attn = getattr(block, attention)
        stash: dict[str, torch.Tensor] = {}

        def keep(name: str):
            def hook(module, args, output):
                if capture.active:
                    stash[name] = output

            return hook

        def finish(module, args, output):
            if capture.active:
                q, k = stash.pop("q"), stash.pop("k")  # [B, T, H*d]
                emit(q.unflatten(-1, (num_heads, -1)), k.unflatten(-1, (num_heads, -1)), None)

        return [
            getattr(attn, q).register_forward_hook(keep("q")),
            getattr(attn, k).register_forward_hook(keep("k")),
            attn.register_forward_hook(finish),
        ]

    return install


def install_signals(
    blocks: Sequence[nn.Module],
    signals: Sequence[VisionSignal],
    feature: int,
    reader: QKReader,
    capture: Capture,
    timer: Any,
    has_cls: bool,
) -> list[Any]:
    """Hook the blocks that ``signals`` name (``"feature"``: block ``feature``, whose output the projector reads).

    Returns the handles of every hook installed.
    """
    by_block: dict[int, list[VisionSignal]] = {}
    for sig in signals:
        if sig.kind == "cls_attention" and not has_cls:
            raise ValueError(f"signal {sig.name}: this vision tower has no CLS token; use 'attention_received'")
        by_block.setdefault(_block_index(sig.layer, feature, len(blocks)), []).append(sig)
    handles: list[Any] = []
    for idx, sigs in sorted(by_block.items()):
        block = blocks[idx]
        attention = [s for s in sigs if s.kind != "hidden"]
        if attention:

            def emit(q, k, segments, attention=attention):
                start = time.perf_counter()
                with torch.no_grad():  # scores rank tokens; no gradient goes through a selection
                    signals = attention_signals(attention, q, k, segments)
                for name, value in signals.items():
                    capture.keep(name, value)
                timer.signal(time.perf_counter() - start)

            handles += reader(block, capture, emit)
        hidden = [s.name for s in sigs if s.kind == "hidden"]
        if hidden:
            handles.append(block.register_forward_hook(capture.store_output(hidden)))
    return handles


def _block_index(layer: int | str, feature: int, num_blocks: int) -> int:
    if layer == "feature":
        return feature
    if not -num_blocks <= int(layer) < num_blocks:
        raise ValueError(f"vision layer {layer} out of range for a tower with {num_blocks} blocks")
    return int(layer) % num_blocks
