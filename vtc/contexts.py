"""The hook-point contexts: the contract between adapters (which know models) and methods (which know algorithms).

Three stages exist (``docs/design.md``, "Hook points"):

* ``VISION``: inside the vision tower. A method asks for :class:`VisionSignal` s (an attention row, the
  attention each token receives, head-mean keys, a block's output) and the adapter computes them from
  that block's own q/k while the model keeps running SDPA.
* ``PRE_LLM``: after the projector, before the tokens are spliced into the LLM input. A method gets one
  :class:`ImageTokens` per image (or video) and returns a :class:`Reduction`.
* ``LLM_LAYER``: inside the LLM decoder during prefill (in-LLM methods).

``VISION_MERGE`` refines ``VISION`` for methods that merge tokens *between* the tower's blocks (ToMe): the
adapter's block runners ask the method for a :class:`TowerMerge` when a tower call starts
(:class:`TowerCall`) and call it in every block; the adapter then hands the session an already reduced
image (a :class:`Reduction` built from the merge's source map) instead of the session calling ``reduce``.

Everything here is plain data: tensors plus the layout that says where each visual token came from.
No model class is referenced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from enum import Enum

import torch

__all__ = [
    "Stage",
    "VisionSignal",
    "TowerInfo",
    "Layout",
    "ImageTokens",
    "Reduction",
    "LayerTokens",
    "LayerUpdate",
    "DecodeTokens",
    "TowerCall",
    "TowerMerge",
]


class Stage(str, Enum):
    VISION = "vision"
    #: tokens are merged between the vision tower's blocks, so the tower itself outputs fewer tokens (ToMe).
    #: The adapter runs every block through a *block runner* that calls the method's :class:`TowerMerge`;
    #: only families whose post-tower code takes a token set rather than a grid can provide it.
    VISION_MERGE = "vision_merge"
    PRE_LLM = "pre_llm"
    LLM_LAYER = "llm_layer"


SIGNAL_KINDS = ("cls_attention", "attention_received", "keys", "hidden")


@dataclasses.dataclass(frozen=True)
class VisionSignal:
    """A request for a quantity computed inside one vision-tower block.

    Args:
        kind: ``"cls_attention"`` (softmax row of the first (CLS) query over all keys; the CLS column is
            part of the softmax, so a method drops it only afterwards), ``"attention_received"`` (mean over
            all queries of the attention each key receives), ``"keys"`` (head-mean key vectors), ``"hidden"``
            (the block's output hidden states).
        layer: 0-based vision block index (negative counts from the end) or ``"feature"``: the block whose
            output the projector consumes (LLaVA's ``vision_feature_layer=-2`` is block 22 of 0..23).
        heads: ``"mean"`` or ``"sum"`` over attention heads (attention kinds only; the ranking is the same).
    """

    kind: str
    layer: int | str = "feature"
    heads: str = "mean"

    def __post_init__(self) -> None:
        if self.kind not in SIGNAL_KINDS:
            raise ValueError(f"unknown vision signal kind {self.kind!r}; valid: {SIGNAL_KINDS}")
        if not (self.layer == "feature" or (isinstance(self.layer, int) and not isinstance(self.layer, bool))):
            raise ValueError(f"signal layer must be an int or 'feature', got {self.layer!r}")
        if self.heads not in ("mean", "sum"):
            raise ValueError(f"heads must be 'mean' or 'sum', got {self.heads!r}")

    @property
    def name(self) -> str:
        suffix = f":{self.heads}" if self.kind in ("cls_attention", "attention_received") else ""
        return f"{self.kind}@{self.layer}{suffix}"


@dataclasses.dataclass(frozen=True)
class TowerInfo:
    """What a method may know about the vision tower when it chooses its signals.

    Attributes:
        has_cls: the tower prepends a CLS token (CLIP, DINOv2) or not (SigLIP, Qwen2-VL's ViT).
        num_blocks: number of transformer blocks.
        crops: the family splits an image into a full view and crops (``Layout.arrangement``: LLaVA-NeXT).
    """

    has_cls: bool
    num_blocks: int
    crops: bool = False


@dataclasses.dataclass
class Layout:
    """Where each of an image's ``n`` LLM visual tokens comes from.

    An image is one or more *partitions* (LLaVA-1.5: one; LLaVA-NeXT: base image + crops; video: frames),
    each a ``rows x cols`` grid of LLM tokens, preceded in the vision tower by ``prefix`` extra tokens
    (1 for a CLS token, 0 for SigLIP / Qwen). Signals are stored per partition over its ``prefix +
    rows * cols`` *slots* (slot = prefix + row * cols + col). Tokens with no slot (newline tokens) have
    ``slot == -1``.

    Attributes:
        grids: ``(rows, cols)`` per partition.
        prefix: number of prefix slots per partition (CLS).
        partition: ``[n]`` partition of each token, -1 if none.
        slot: ``[n]`` slot of each token in its partition, -1 if none.
        arrangement: ``(g_h, g_w)`` when partition 0 is the whole image and partitions 1.. are its crops in a
            ``g_h x g_w`` row-major grid (LLaVA-NeXT anyres); None otherwise.
    """

    grids: tuple[tuple[int, int], ...]
    prefix: int
    partition: torch.Tensor
    slot: torch.Tensor
    arrangement: tuple[int, int] | None = None

    @classmethod
    def grid(cls, rows: int, cols: int, prefix: int = 0, include_prefix: bool = False) -> Layout:
        """Layout of a single-partition image whose tokens are the raster grid (optionally CLS first)."""
        first = 0 if include_prefix else prefix
        slot = torch.arange(first, prefix + rows * cols)
        return cls(((rows, cols),), prefix, torch.zeros_like(slot), slot)

    @property
    def num_tokens(self) -> int:
        return int(self.slot.numel())

    @property
    def num_partitions(self) -> int:
        return len(self.grids)

    def is_newline(self) -> torch.Tensor:
        """``[n]`` bool: tokens with no vision slot (LLaVA-NeXT / OneVision newline tokens)."""
        return self.slot < 0

    def subset(self, index: torch.Tensor) -> Layout:
        """The layout of the tokens ``index`` (in that order)."""
        return Layout(self.grids, self.prefix, self.partition[index], self.slot[index], self.arrangement)

    def is_patch(self) -> torch.Tensor:
        """``[n]`` bool: the token is a grid patch (not a prefix/CLS or newline token)."""
        return self.slot >= self.prefix

    def grid_position(self) -> torch.Tensor:
        """``[n, 2]`` (row, col) of each token inside its partition grid, -1 for non-patch tokens."""
        out = torch.full((self.num_tokens, 2), -1, dtype=torch.long)
        patch = self.is_patch()
        cols = torch.tensor([c for _, c in self.grids], dtype=torch.long)
        cell = self.slot[patch] - self.prefix
        c = cols[self.partition[patch]]
        out[patch, 0] = cell // c
        out[patch, 1] = cell % c
        return out

    def partition_tokens(self, p: int) -> torch.Tensor:
        """``[rows * cols]`` token index of each grid cell of partition ``p`` in raster order, -1 if not fed."""
        rows, cols = self.grids[p]
        out = torch.full((rows * cols,), -1, dtype=torch.long)
        sel = (self.partition == p) & self.is_patch()
        idx = torch.nonzero(sel).flatten()
        out[self.slot[idx] - self.prefix] = idx
        return out


@dataclasses.dataclass
class ImageTokens:
    """The ``PRE_LLM`` hook context for one image (or one video) of one sample.

    Attributes:
        tokens: ``[n, D]`` the visual tokens the uncompressed model feeds the LLM, in LLM order.
        layout: where each token comes from.
        k: tokens to keep, resolved by :mod:`vtc.budget`.
        signals: raw vision signals by :attr:`VisionSignal.name`, each ``[P, prefix + rows*cols, ...]``.
        vision_tokens: ``[n, C]`` pre-projector features aligned with ``tokens`` (zeros where a token has
            none), or None when the family has no separate projector input.
        text_ids: ``[m]`` ids of the sample's prompt text after the image (no padding, no visual tokens).
        text_embeds: ``[m, D]`` their input embeddings (the LLM's embedding table, not contextual states).
        project: maps vision-space features ``[..., C]`` through the model's projector to ``[..., D]``.
        sample: index of the sample in the batch; image: index of the image in the whole batch.
        modality: ``"image"`` or ``"video"`` (a video is one item: its frames are its partitions).
        tower: what the vision tower is (CLS or not), as the adapter reports it.
    """

    tokens: torch.Tensor
    layout: Layout
    k: int
    signals: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    vision_tokens: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    sample: int = 0
    image: int = 0
    modality: str = "image"
    #: the vision tower (set by the session): whether its signals are CLS rows or attention received
    tower: TowerInfo = TowerInfo(has_cls=True, num_blocks=0)

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    def signal(self, spec: VisionSignal) -> torch.Tensor:
        """Raw per-partition signal ``[P, prefix + rows*cols, ...]``."""
        try:
            return self.signals[spec.name]
        except KeyError:
            raise KeyError(
                f"vision signal {spec.name!r} was not captured; the method must list it in vision_signals() "
                f"(captured: {sorted(self.signals)})"
            ) from None

    def subset(self, index: torch.Tensor) -> ImageTokens:
        """The same image restricted to the tokens ``index`` (``k`` capped at their number)."""
        index = index.to(self.tokens.device)
        cpu = index.cpu()
        return dataclasses.replace(
            self,
            tokens=self.tokens[index],
            layout=self.layout.subset(cpu),
            k=min(self.k, int(index.numel())),
            vision_tokens=None if self.vision_tokens is None else self.vision_tokens[index],
        )

    def token_signal(self, spec: VisionSignal, fill: float = float("nan")) -> torch.Tensor:
        """The signal gathered onto this image's ``n`` tokens: ``[n, ...]``, ``fill`` for slot-less tokens."""
        raw = self.signal(spec)
        has = self.layout.slot >= 0
        out = raw.new_full((self.n, *raw.shape[2:]), fill)
        out[has] = raw[self.layout.partition[has], self.layout.slot[has]]
        return out


@dataclasses.dataclass
class Reduction:
    """What a ``PRE_LLM`` method returns for one image.

    Attributes:
        index: ``[k]`` for each output token, the input token it stands at (its anchor: kept token, or
            merge target), -1 for a token with no source among the image's tokens (VisionZip's CLS).
            Output order is the order of ``index``.
        tokens: ``[k, D]`` replacement features (merged tokens); None means ``tokens[index]``.
        groups: ``[n]`` output row each input token ended in, -1 if dropped. None means "kept tokens map to
            themselves, the rest are dropped".
        scores: ``[n]`` the per-token scores the method ranked by (fp32), for the record.
        stages: tokens left after each earlier stage of a stack (:mod:`vtc.stack`), by member name, for the
            record; None for a single method.
    """

    index: torch.Tensor
    tokens: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    stages: dict[str, int] | None = None

    @classmethod
    def keep(cls, index: torch.Tensor, scores: torch.Tensor | None = None) -> Reduction:
        """A pure selection: keep ``index`` (returned in ascending order)."""
        return cls(index=torch.sort(index.long()).values, scores=scores)

    @classmethod
    def keep_ordered(cls, index: torch.Tensor, scores: torch.Tensor | None = None) -> Reduction:
        """A pure selection fed to the LLM in the given order (not sorted)."""
        return cls(index=index.long(), scores=scores)

    def lift(self, index: torch.Tensor, n: int) -> Reduction:
        """Map a reduction computed on the subset ``index`` of an image's ``n`` tokens back to all of them."""
        index = index.to(self.index.device)
        anchors = torch.where(self.index >= 0, index[self.index.clamp_min(0)], self.index)
        groups = torch.full((n,), -1, dtype=torch.long, device=self.index.device)
        groups[index] = self.resolve_groups(int(index.numel()))
        scores = None
        if self.scores is not None:
            scores = torch.full((n,), float("nan"), device=self.scores.device)
            scores[index.to(self.scores.device)] = self.scores.float()
        return Reduction(index=anchors, tokens=self.tokens, groups=groups, scores=scores, stages=self.stages)

    def then(self, second: Reduction, n: int) -> Reduction:
        """This reduction of ``n`` tokens followed by ``second``, computed on this one's output tokens.

        Anchors chain (an output token stands where its anchor's anchor stood), merge groups compose (an input
        token ends in the row its row ended in), and features are ``second``'s merged tokens, or this one's
        tokens it kept. Scores are ``second``'s on the input tokens this one kept as they were (a selection),
        else this one's.
        """
        first_groups = self.resolve_groups(n)
        second_groups = second.resolve_groups(int(self.index.numel())).to(first_groups.device)
        groups = torch.where(first_groups >= 0, second_groups[first_groups.clamp_min(0)], first_groups)
        picked = second.index.to(self.index.device)
        index = torch.where(picked >= 0, self.index[picked.clamp_min(0)], picked)
        if second.tokens is not None:
            tokens = second.tokens
        elif self.tokens is not None:
            tokens = self.tokens[picked.to(self.tokens.device)]
        else:
            tokens = None
        scores = self.scores
        if self.tokens is None and second.scores is not None:
            scores = torch.full((n,), float("nan"), device=second.scores.device)
            scores[self.index.to(scores.device)] = second.scores.float()
        return Reduction(
            index=index, tokens=tokens, groups=None if tokens is None else groups, scores=scores, stages=self.stages
        )

    def reordered(self, order: torch.Tensor, n: int) -> Reduction:
        """The same reduction of ``n`` input tokens with its output tokens in ``order`` (a permutation of ``k``)."""
        order = order.to(self.index.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        groups = self.resolve_groups(n)
        groups = torch.where(groups >= 0, inverse.to(groups.device)[groups.clamp_min(0)], groups)
        tokens = None if self.tokens is None else self.tokens[order.to(self.tokens.device)]
        return Reduction(index=self.index[order], tokens=tokens, groups=groups, scores=self.scores, stages=self.stages)

    def resolve_groups(self, n: int) -> torch.Tensor:
        if self.groups is not None:
            return self.groups
        groups = torch.full((n,), -1, dtype=torch.long, device=self.index.device)
        valid = self.index >= 0
        groups[self.index[valid]] = torch.nonzero(valid).flatten()
        return groups


@dataclasses.dataclass
class LayerTokens:
    """The ``LLM_LAYER`` context: one prune point, whole batch.

    Attributes:
        layer: the layer about to run; rows dropped now skip it and every later layer.
        num_layers: decoder depth.
        hidden: ``[B, L, D]`` hidden states entering ``layer``.
        visual: per sample, the current rows of its visual tokens (ascending).
        n_input: per sample, visual tokens the LLM received at layer 0.
        last: ``[B]`` row of each sample's last prompt token.
        text_after: per sample, rows of prompt text after its last visual token.
        n_original: per sample, visual tokens the uncompressed model would feed (before any stage; equal to
            ``n_input`` unless a stage before the LLM removed some). A stack (:mod:`vtc.stack`) counts its last
            in-LLM stage from it.
        visual_image: per sample, for each of its visual rows (aligned with ``visual``), the image it belongs to
            (the call's image index, as the record numbers them).
        visual_token: per sample, for each visual row, its token index inside that image (the anchor the
            record gives it: a kept token, or the first member of a merged one).
    """

    layer: int
    num_layers: int
    hidden: torch.Tensor
    visual: list[torch.Tensor]
    n_input: list[int]
    last: torch.Tensor
    text_after: list[torch.Tensor]
    _attend: Callable[[int, list[torch.Tensor]], list[torch.Tensor]]
    _keys: Callable[[int], torch.Tensor] | None = None
    _norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    _observed: Callable[[], torch.Tensor] | None = None
    n_original: list[int] | None = None
    visual_image: list[torch.Tensor] | None = None
    visual_token: list[torch.Tensor] | None = None

    def observed(self) -> torch.Tensor:
        """``[B, L]`` per current row, the sum of what the method's :meth:`~vtc.method.Method.observe` returned
        for it at the layers it observes (:meth:`~vtc.method.Method.llm_observe_layers`) so far in this prefill."""
        if self._observed is None:
            raise RuntimeError("this hook point gives no sub-block observations")
        return self._observed()

    def keys(self, layer: int | None = None) -> torch.Tensor:
        """``[B, H, L, d]`` keys of every current row in ``layer`` (default: the layer about to run), from that
        layer's own input norm, k projection and RoPE, grouped KV heads repeated (no attention map needed)."""
        if self._keys is None:
            raise RuntimeError("this hook point gives no keys")
        return self._keys(self.layer if layer is None else layer)

    def final_normed(self) -> torch.Tensor:
        """``[B, L, D]`` the hidden states entering ``layer`` through the LM's final norm."""
        if self._norm is None:
            raise RuntimeError("this hook point gives no final norm")
        return self._norm(self.hidden)

    def attention(self, rows: Sequence[torch.Tensor], layer: int | None = None) -> list[torch.Tensor]:
        """Head-mean attention probabilities of the given query rows over all current rows, per sample.

        Computed from ``layer``'s own input norm, q/k projections, RoPE and grouped KV heads (default: the
        layer about to run), with the causal and padding mask; fp32. Returns ``[R_b, L]`` per sample.
        """
        return self._attend(self.layer if layer is None else layer, list(rows))

    def attention_logits(
        self, rows: Sequence[torch.Tensor], heads: slice, layer: int | None = None
    ) -> list[torch.Tensor]:
        """Per sample ``[H', R_b, L]``: the scaled attention logits of query heads ``heads`` for the given query rows
        over all current rows, as :meth:`attention` computes them (fp32, ``-inf`` for keys the causal or padding
        mask forbids). ``slice(0, None)`` gives every head; ask for a few at a time to bound memory (PageRank over
        all rows: AIM)."""
        return self._attend(self.layer if layer is None else layer, list(rows), heads)

    def attention_to_visual(self, query: str = "last", layer: int | None = None) -> list[torch.Tensor]:
        """Per sample ``[n_visual]``: attention the visual tokens receive from the last prompt token
        (``query="last"``) or, averaged, from the prompt text after the image (``query="text"``)."""
        if query == "last":
            rows = [self.last[b : b + 1] for b in range(len(self.visual))]
        elif query == "text":
            rows = [t if t.numel() else self.last[b : b + 1] for b, t in enumerate(self.text_after)]
        else:
            raise ValueError(f"query must be 'last' or 'text', got {query!r}")
        probs = self.attention(rows, layer)
        return [p[:, v].mean(dim=0) for p, v in zip(probs, self.visual, strict=True)]


@dataclasses.dataclass
class LayerUpdate:
    """What an ``LLM_LAYER`` method returns when it merges rather than only drops.

    Attributes:
        kept: per sample, the visual rows that go on (as for a plain prune).
        hidden: ``[B, L, D]`` hidden states to continue from (merged rows updated), same rows as the input.
    """

    kept: list[torch.Tensor]
    hidden: torch.Tensor


@dataclasses.dataclass
class DecodeTokens:
    """The decode-time context of a method that re-selects cached visual rows at every generated token.

    Attributes:
        layer: layers from ``layer`` on attend only to the rows the method keeps (all text is always seen).
        visual: per sample, the cache rows of its visual tokens.
        attention: per sample ``[n_visual]``: head-mean attention of the current token over those rows at
            layer ``layer - 1`` (from that layer's cached keys, RoPE and grouped heads applied).
        n_input: per sample, visual tokens in the cache.
        state: a dict the method may use to carry state between the decode steps of one generation.
    """

    layer: int
    visual: list[torch.Tensor]
    attention: list[torch.Tensor]
    n_input: list[int]
    state: dict


@dataclasses.dataclass(frozen=True)
class TowerCall:
    """One run of a vision tower under a ``VISION_MERGE`` method, as the adapter sees it at block 0.

    Attributes:
        batch: images (tower batch rows) in the call; every row has the same token count.
        tokens: tokens per row entering block 0, prefix included (LLaVA-1.5: 577; ViT-B/16: 197).
        prefix: leading tokens that are never merged (CLS, distillation token, registers).
        blocks: blocks that may merge: up to and including the block whose output the consumer reads
            (LLaVA's feature block; the last block of a standalone ViT). Later blocks only run on the result.
        n: tokens the consumer (the LLM, or a standalone ViT's output without the prefix) would get
            uncompressed; k: what it should get (``vtc.budget.keep_count``). The tower removes ``n - k`` tokens.
        device: where the tower runs.
        grid: ``(rows, cols)`` patch grid of the tokens after the prefix, where the adapter knows it (standalone
            ViTs); None otherwise (LLaVA towers: a square grid).
        inputs: ``[B, T, C]`` the tokens entering block 0 (GTP builds its token graph from them).
        coords: ``[B, T - prefix, 2]`` (row, column) of every patch token where the tower's order is not a raster
            of ``grid`` (Qwen2-VL packs 2 x 2 patch groups); None: raster order.
        num_blocks: every block of the tower (the later ones run on the merged tokens too; MustDrop reads the
            last one's attention), where the adapter knows it.
    """

    batch: int
    tokens: int
    prefix: int
    blocks: int
    n: int
    k: int
    device: torch.device = torch.device("cpu")
    grid: tuple[int, int] | None = None
    inputs: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    coords: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    num_blocks: int | None = None


class TowerMerge:
    """Per-call state of a method that merges tokens inside the vision tower (``Stage.VISION_MERGE``).

    A block runner calls, in every block ``i`` (tokens ``[B, T, C]``, batch first)::

        bias = merge.attention_bias(dtype)        # [B, 1, 1, T] additive attention logits, or None
        x = x + attention(x, bias)                # the host block's own attention (SDPA kept)
        x = merge.merge(i, x, metric)             # metric [B, T, d] (head-mean keys) if merge.wants_metric(i)
        x = x + mlp(x)
        x = merge.after_block(i, x)

    A state with :attr:`wants_attention` gets, as ``metric``, the block's attention probabilities
    ``[B, H, T, T]`` (fp32, softmax of the scaled query-key logits plus the mask and bias the host attention got),
    recomputed by the runner from the queries and keys it captures, so the host attention keeps its kernel.

    After the tower, :attr:`origin` and :attr:`anchor` say where every input token went.
    """

    #: the metric is the attention probabilities ``[B, H, T, T]`` instead of the head-mean keys (GTP's selection)
    wants_attention: bool = False
    #: a host that average-pools its output tokens weighs them by :attr:`size` (ToMe); False: the host's own mean
    pool_by_size: bool = True

    #: ``[B, T0]`` row of the current tokens that each token entering block 0 is part of
    origin: torch.Tensor
    #: ``[B, T]`` smallest block-0 index among the members of each current token (its anchor)
    anchor: torch.Tensor
    #: ``[B, T]`` fp32: how many block-0 tokens each current token stands for
    size: torch.Tensor
    #: the tokens were copied back onto the block-0 grid (:meth:`unmerge`); later blocks run on the full grid
    unmerged: bool = False

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        raise NotImplementedError

    def wants_metric(self, block: int) -> bool:
        raise NotImplementedError

    def merge(self, block: int, x: torch.Tensor, metric: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def after_block(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, C]`` -> ``[B, T0, C]``: each block-0 token takes the row of the group it ended in (a merged
        token is copied to every position it covers), for towers whose consumer needs the full grid (LLaVA-NeXT,
        OneVision, NeXT-Video). Later blocks then run on the grid with no attention bias."""
        self.unmerged = True
        return self.on_grid(x)

    def on_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, C]`` -> ``[B, T0, C]`` (as :meth:`unmerge`) without ending the merge: for a consumer that reads
        an intermediate block while the tower goes on merged (Qwen3-VL's DeepStack mergers)."""
        return x.gather(1, self.origin.to(x.device)[..., None].expand(-1, -1, x.shape[-1]))

    def consumer_view(self, drop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(groups [B, T0 - drop], anchors [B, T - drop])`` for a consumer that drops the first ``drop``
        rows (LLaVA's ``"default"`` strategy drops CLS), in the consumer's token coordinates."""
        return self.origin[:, drop:] - drop, self.anchor[:, drop:] - drop
