"""Block runners: a host's vision blocks run as attention -> merge -> MLP for a ``VISION_MERGE`` method.

Every supported block class (data: :data:`HOSTS`, keyed by the qualified class name) has a runner
(:mod:`vtc.adapters.blocks`) that re-does the block's own forward with the merge step in between. The
attention keys (the similarity metric) are read from the module that produces them, by a forward hook,
so they are not computed twice. A state that asks for the attention probabilities
(:attr:`~vtc.contexts.TowerMerge.wants_attention`, GTP) also gets the queries hooked, and the probabilities
are recomputed from both (:func:`~vtc.adapters.blocks.attention_probs`) while the host attention keeps its
kernel (SDPA).

Runners are installed by swapping the ``__class__`` of each block *instance* for a one-off subclass
(the upstream class is never touched) and undone by swapping it back. A runner with no active merge
state (merging off, or a call outside vtc's own tower calls) runs the block's original forward.
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
from ..contexts import TowerCall, TowerMerge
from .base import UnsupportedModelError, module_at
from .blocks import attention_probs, dinov2_layer, hf_encoder_layer, internvl_layer, open_clip_block, timm_block
from .qwen_tower import check_qwen
from .qwen_windows import QWEN_RUNNERS


class MergeContext:
    """What one tower's runners share: the current call's merge state and the keys of the running block.

    Attributes:
        start: builds the merge state of a call from the tokens entering block 0 (``[B, T, C]``); None
            leaves the tower alone. Set by the adapter.
        state: the merge state of the current (or last) call.
        on_done: called with the state after the last block of the tower.
        seconds: time spent in merge steps since the last reset.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.start: Callable[[torch.Tensor], TowerMerge | None] | None = None
        self.state: TowerMerge | None = None
        self.on_done: Callable[[TowerMerge], None] | None = None
        #: the block after which merged tokens are copied back onto the full grid (None: never)
        self.unmerge_after: int | None = None
        self.capture = False
        self.keys: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.seconds = 0.0

    def begin(self, block: int, x: torch.Tensor) -> TowerMerge | None:
        """The state block ``block`` runs under; block 0 starts a new call."""
        if block == 0:
            self.state = self.start(x) if self.start is not None else None
        return self.state

    def attend(self, state: TowerMerge, block: int) -> None:
        """Before the block's attention: capture its keys (and queries, if asked) if the block merges."""
        self.capture, self.keys, self.queries = state.wants_metric(block), None, None

    def merge(self, state: TowerMerge, block: int, x: torch.Tensor, heads: Callable, scale=None, mask=None):
        """Between attention and MLP, hand the state its metric. ``heads`` turns a captured query or key tensor
        into ``[B, T, H, d]``; ``scale`` (default ``d ** -0.5``) and ``mask`` (what the host attention got, bias
        included) are those of the host attention, used for :attr:`TowerMerge.wants_attention` only."""
        start = time.perf_counter()
        keys, queries, self.capture, self.keys, self.queries = self.keys, self.queries, False, None, None
        metric = None
        if state.wants_metric(block):
            if keys is None or (state.wants_attention and queries is None):
                raise RuntimeError(f"vision block {block} merges but its keys or queries were not captured")
            if state.wants_attention:
                metric = attention_probs(heads(queries), heads(keys), scale, mask)
            else:
                metric = kernels.head_mean_keys(heads(keys))
        x = state.merge(block, x, metric)
        self.seconds += time.perf_counter() - start
        return x

    def finish(self, state: TowerMerge, block: int, x: torch.Tensor) -> torch.Tensor:
        x = state.after_block(block, x)
        if block == self.unmerge_after:
            x = state.unmerge(x)
        if block == self.num_blocks - 1 and self.on_done is not None:
            self.on_done(state)
        return x

    def key_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.capture:
            self.keys = output

    def query_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.capture and self.state is not None and self.state.wants_attention:
            self.queries = output


@dataclasses.dataclass(frozen=True)
class Host:
    """One supported block class: its runner, where its queries and keys come from, what it must look like."""

    runner: Callable[[MergeContext, int, type, nn.Module], Callable]
    qk: tuple[str, str] | None  # submodules that output the queries and keys (hooked), None: the runner makes them
    check: Callable[[nn.Module], str | None] = lambda block: None  # why the block cannot run, or None


def _check_hf(block: nn.Module) -> str | None:
    attn = getattr(block, "self_attn", None) or block.attention
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        return f"its attention is {impl!r}; proportional attention needs an additive mask: load it with sdpa or eager"
    return None


def _check_timm(block: nn.Module) -> str | None:
    if type(block.attn).__module__ + "." + type(block.attn).__qualname__ != "timm.layers.attention.Attention":
        return f"its attention is {type(block.attn).__qualname__}, not timm's Attention"
    return None


def _check_open_clip(block: nn.Module) -> str | None:
    attn = block.attn
    if not getattr(attn, "batch_first", False) or getattr(attn, "in_proj_weight", None) is None:
        return "its nn.MultiheadAttention must be batch_first with a packed in-projection"
    return None


#: block class (module + qualified name) -> how it runs
_HF_QK, _DINOV2_QK = ("self_attn.q_proj", "self_attn.k_proj"), ("attention.q_proj", "attention.k_proj")
HOSTS: dict[str, Host] = {
    "transformers.models.clip.modeling_clip.CLIPEncoderLayer": Host(hf_encoder_layer, _HF_QK, _check_hf),
    "transformers.models.siglip.modeling_siglip.SiglipEncoderLayer": Host(hf_encoder_layer, _HF_QK, _check_hf),
    "transformers.models.dinov2.modeling_dinov2.Dinov2Layer": Host(dinov2_layer, _DINOV2_QK, _check_hf),
    "transformers.models.internvl.modeling_internvl.InternVLVisionLayer": Host(
        internvl_layer,
        ("attention.q_norm", "attention.k_norm"),
        _check_hf,  # identities without qk norm
    ),
    **{name: Host(runner, None, check_qwen) for name, runner in QWEN_RUNNERS.items()},
    "timm.models.vision_transformer.Block": Host(timm_block, ("attn.q_norm", "attn.k_norm"), _check_timm),
    "open_clip.transformer.ResidualAttentionBlock": Host(open_clip_block, None, _check_open_clip),
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class ClassSwap:
    """Give one module *instance* a one-off subclass whose ``namespace`` overrides methods; ``remove()`` undoes it."""

    def __init__(self, module: nn.Module, namespace: dict[str, Any], label: str = "Merging"):
        self.module, self.orig = module, type(module)
        attrs = {"__module__": self.orig.__module__, **namespace}
        module.__class__ = type(f"{label}{self.orig.__name__}", (self.orig,), attrs)

    def remove(self) -> None:
        if self.module is not None:
            self.module.__class__ = self.orig
            self.module = None

    def stock(self) -> list[tuple[Any, Any]]:
        """``(the one-off class, the module's own class)`` while installed (for deep copies)."""
        return [] if self.module is None else [(type(self.module), self.orig)]


class Runners:
    """Installed runners of one tower; ``remove()`` puts every block back (class and hooks)."""

    def __init__(self, blocks: Sequence[nn.Module], ctx: MergeContext):
        hosts = []
        for i, block in enumerate(blocks):
            host = HOSTS.get(_qualname(type(block)))
            why = None if host is not None else f"no block runner for {_qualname(type(block))}"
            why = why or host.check(block)
            if why is not None:
                raise UnsupportedModelError(
                    f"token merging cannot run vision block {i}: {why} (supported blocks: {sorted(HOSTS)})"
                )
            hosts.append(host)
        self._handles: list[Any] = []  # key hooks, then class swaps
        try:
            for i, (block, host) in enumerate(zip(blocks, hosts, strict=True)):
                if host.qk is not None:
                    self._handles.append(module_at(block, host.qk[1]).register_forward_hook(ctx.key_hook))
                    self._handles.append(module_at(block, host.qk[0]).register_forward_hook(ctx.query_hook))
                self._handles.append(ClassSwap(block, {"forward": host.runner(ctx, i, type(block), block)}))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()

    def parts(self) -> list[Any]:
        return list(self._handles)


class TowerMerging:
    """Token merging inside a VLM's tower, during vtc's own feature calls only (LLaVA's ``VISION_MERGE``).

    Args:
        blocks: the tower's blocks; prefix: its CLS tokens; feature_layer, feature_block: the model's
            ``vision_feature_layer`` and the block that computes it (blocks up to it may merge);
        method: the method (its ``tower_merge``); keep: ``n -> k`` (:mod:`vtc.budget`).
        unmerge: copy the merged tokens back onto the full grid after the feature block (a consumer that packs
            every tile's or frame's grid); the tower still runs its merging blocks on fewer tokens.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        prefix: int,
        feature_layer: Any,
        feature_block: int,
        method: Any,
        keep: Any,
        unmerge: bool = False,
    ):
        if feature_layer is not None and not isinstance(feature_layer, int):  # None: the last block (Qwen)
            raise ValueError(
                f"token merging in the vision tower needs one vision_feature_layer; this model concatenates "
                f"layers {feature_layer}, whose merged token sets would differ"
            )
        self.prefix, self.merge_blocks, self.method, self.keep = prefix, feature_block + 1, method, keep
        self.ctx = MergeContext(len(blocks))
        self.ctx.unmerge_after = feature_block if unmerge else None
        self.runners = Runners(blocks, self.ctx)

    def remove(self) -> None:
        self.runners.remove()

    def parts(self) -> list[Any]:
        return [self.runners]

    @contextlib.contextmanager
    def running(self, strategy: str) -> Iterator[MergeContext]:
        """Merge in the tower calls of this block; ``strategy`` is the feature strategy (which rows the LLM gets)."""
        drop = 0 if strategy == "full" else self.prefix  # "default" feeds the LLM everything but CLS

        def start(x: torch.Tensor, coords: torch.Tensor | None = None) -> TowerMerge | None:
            (bsz, tokens), depth = x.shape[:2], self.ctx.num_blocks
            n = tokens - drop
            shape = (bsz, tokens, self.prefix, self.merge_blocks, n, self.keep(n), x.device)
            return self.method.tower_merge(TowerCall(*shape, inputs=x, coords=coords, num_blocks=depth))

        ctx = self.ctx
        ctx.start, ctx.state, ctx.seconds = start, None, 0.0
        try:
            yield ctx
        finally:
            ctx.start = None
