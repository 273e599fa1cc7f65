"""The state of one prefill under the ``LLM_LAYER`` hooks, and how it shortens at a prune point.

A :class:`Prefill` follows the sequence through the decoder: which rows are valid and visual, which image
and token each row is, the positions, and one :class:`Group` per prune point (layers from that point on
hold a shorter cache). :func:`shorten` drops the rows a method did not keep, re-padding on the caller's
side when samples keep different counts, and gives the later layers the matching mask, positions and
rotary embeddings.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .llm import Decoder


@dataclasses.dataclass
class LLMPlan:
    """What the adapter tells the LLM hooks before a prefill: where the visual rows are in its input."""

    visual: torch.Tensor  # [B, L] bool
    row_source: torch.Tensor  # [B, L] the caller's input position of each row, -1 if none
    row_image: torch.Tensor  # [B, L] image index of each visual row, -1 otherwise
    row_token: torch.Tensor  # [B, L] token index inside its image, -1 otherwise
    positions: str  # the in-LLM stage's policy: "original" or "compact"
    side: str  # padding side for re-padding
    on_prune: Callable[[RowView, int, float], None]  # reports the kept rows and vtc's seconds after each prune
    #: copies of every sample in the LLM's batch (``generate`` with ``num_beams`` / ``num_return_sequences``
    #: repeats each prompt after vtc planned it)
    copies: int = 1
    #: ``[B]`` per sample, visual tokens the uncompressed model would feed (None: what ``visual`` holds)
    n_original: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        visual: torch.Tensor,
        spans: Sequence[tuple[int, int]],
        kept: Sequence[torch.Tensor],
        sources: list[list[int]],
        positions: str,
        side: str,
        on_prune: Callable[[RowView, int, float], None],
        sizes: Sequence[int] | None = None,
    ) -> LLMPlan:
        """The plan of a prompt whose visual rows are ``visual [B, L]``: image ``j`` (placeholder run starting at
        ``spans[j] = (sample, start)``) fills its sample's next visual rows with its tokens ``kept[j]``
        (``sizes[j]``: its token count before any stage)."""
        row_image = torch.full(visual.shape, -1, dtype=torch.long, device=visual.device)
        row_token = torch.full_like(row_image, -1)
        cursor = [0] * visual.shape[0]
        rows = [torch.nonzero(visual[b]).flatten() for b in range(visual.shape[0])]
        for j in sorted(range(len(spans)), key=lambda j: spans[j]):
            b = spans[j][0]
            r = rows[b][cursor[b] : cursor[b] + len(kept[j])]
            row_image[b, r] = j
            row_token[b, r] = kept[j].to(visual.device)
            cursor[b] += len(kept[j])
        source = torch.tensor(sources, device=visual.device)
        original = None
        if sizes is not None:
            original = torch.zeros(visual.shape[0], dtype=torch.long)
            for (b, _), size in zip(spans, sizes, strict=True):
                original[b] += size
        return cls(visual, source, row_image, row_token, positions, side, on_prune, n_original=original)

    def expanded(self, batch: int) -> LLMPlan:
        """The plan of a batch of ``batch`` rows in which every planned sample appears ``batch / B`` times in a
        row (how ``generate`` expands its inputs for beams and returned sequences: ``repeat_interleave``)."""
        planned = self.visual.shape[0]
        if batch == planned:
            return self
        if batch % planned:
            raise RuntimeError(
                f"the LLM received a batch of {batch} rows for {planned} compressed prompts; vtc can follow a batch "
                f"that repeats every prompt the same number of times (beams, num_return_sequences), not this one"
            )
        copies = batch // planned

        def rep(x: torch.Tensor) -> torch.Tensor:
            return x.repeat_interleave(copies, dim=0)

        return dataclasses.replace(
            self,
            visual=rep(self.visual),
            row_source=rep(self.row_source),
            row_image=rep(self.row_image),
            row_token=rep(self.row_token),
            copies=self.copies * copies,
            n_original=None if self.n_original is None else rep(self.n_original),
        )


@dataclasses.dataclass
class RowView:
    """What a prune point left, one row per sample the caller sent (the first of its copies), each ``[B, L]``:
    valid rows, visual rows, and each row's image, token inside its image, and caller's input position."""

    mask2d: torch.Tensor
    visual: torch.Tensor
    row_image: torch.Tensor
    row_token: torch.Tensor
    row_source: torch.Tensor


@dataclasses.dataclass
class Group:
    start: int  # first layer of the group
    prompt_mask: torch.Tensor  # [B, L_g] valid rows of the prompt as the group's cache holds it
    removed: torch.Tensor  # [B] visual rows dropped before this group (relative to layer 0)


class Prefill:
    """State of one prefill on one cache, and of the calls that continue it.

    The state is found by its cache (:attr:`LLMHooks.calls <vtc.adapters.llm_hooks.LLMHooks.calls>`, a weak
    mapping) and holds that cache only weakly: a strong reference from the value to its own key would keep
    both alive for as long as the hooks are installed, one whole KV cache per compressed call.
    """

    def __init__(self, plan: LLMPlan, cache: Any, mask2d: torch.Tensor, length: int):
        self.plan = plan
        self._cache: Callable[[], Any] = lambda: None
        self.cache = cache
        self.full_len = length
        self.mask2d = mask2d  # [B, L] current valid rows
        self.visual = plan.visual.clone()  # [B, L] current visual rows
        self.row_image = plan.row_image.clone()
        self.row_source = plan.row_source.clone()
        self.row_token = plan.row_token.clone()
        self.removed = torch.zeros(mask2d.shape[0], dtype=torch.long, device=mask2d.device)
        self.groups: list[Group] = []
        self.stash: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.observed: torch.Tensor | None = None  # [B, input rows] summed sub-block observations (llm_observe)
        self.decoding = False
        self.call_mask: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # current 1-D positions [B, L] (set at the first hooked layer)
        #: per layer type (:meth:`Decoder.layer_type`), the replacement kwargs of the last group's layers
        self.cur: dict[str, dict[str, Any]] | None = None
        #: per prune layer, the rows each sample kept (coordinates of the sequence entering that layer)
        self.kept_rows: dict[int, list[torch.Tensor]] = {}
        # decode-time selection (methods with llm_decode_layers)
        self.method_state: dict[str, Any] = {}
        self.decode_keep: list[torch.Tensor] | None = None
        self.decode_drop: torch.Tensor | None = None
        self.decode_masks: dict[tuple, Any] = {}

    def blocks(self) -> torch.Tensor:
        """``[B, L]`` the image each current row belongs to if it is visual, else -1 (bidirectional image blocks)."""
        return torch.where(self.visual, self.row_image, -1)

    def rows(self) -> RowView:
        """The current rows of the samples the caller sent (one copy of each)."""
        step = self.plan.copies
        rows = (self.mask2d, self.visual, self.row_image, self.row_token, self.row_source)
        return RowView(*(x[::step] for x in rows))

    @property
    def cache(self) -> Any:
        """The KV cache this prefill fills (None once the caller dropped it, or for a cache-free call)."""
        return self._cache()

    @cache.setter
    def cache(self, cache: Any) -> None:
        self._cache = (lambda: None) if cache is None else weakref.ref(cache)


def layer_schedule(method: Any, n: int) -> tuple[tuple[int, ...], tuple[int, ...], int | None, int]:
    """``(prune layers, score layers, decode layer or None, first hooked layer)`` of ``method`` on ``n`` layers."""
    prune = tuple(sorted(set(method.llm_prune_layers(n))))
    score = tuple(sorted(set(method.llm_score_layers(n))))
    for layer in (*prune, *score):
        if not 0 <= layer < n:
            raise ValueError(f"method {method.name!r} acts at LLM layer {layer}, outside 0..{n - 1}")
    decode = tuple(sorted(set(method.llm_decode_layers(n))))
    if len(decode) > 1:
        raise ValueError(f"method {method.name!r}: at most one decode-time selection layer is supported")
    decode_layer = decode[0] if decode else None
    if decode_layer is not None and not 1 <= decode_layer < n:
        raise ValueError(f"method {method.name!r} selects at decode layer {decode_layer}, outside 1..{n - 1}")
    if decode_layer is not None and any(p <= decode_layer for p in prune):
        raise ValueError("decode-time selection after an in-prefill prune point is not supported")
    first = min((*prune, *score, *((decode_layer - 1,) if decode else ())), default=n)
    return prune, score, decode_layer, first


def shorten(
    call: Prefill,
    decoder: Decoder,
    layer: int,
    hidden: torch.Tensor,
    keep_rows: list[torch.Tensor],
    dropped: list[int],
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """Keep the rows ``keep_rows[b]`` of ``hidden [B, L, D]`` from ``layer`` on; returns ``[B, L', D]``.

    ``dropped[b]`` visual rows of sample ``b`` go. The call's rows, mask and positions shrink with them, and
    ``call.cur`` holds the mask, positions and rotary embeddings layers ``>= layer`` get: the kept rows' own
    under ``"original"`` positions, renumbered under ``"compact"``.
    """
    bsz, length, _ = hidden.shape
    valid = call.mask2d
    new_len = max(int(r.numel()) for r in keep_rows)
    left = call.plan.side == "left"

    def place(rows: torch.Tensor) -> slice:
        return slice(new_len - rows.numel(), new_len) if left else slice(0, rows.numel())

    new_hidden = hidden.new_zeros(bsz, new_len, hidden.shape[-1])
    new_mask = torch.zeros(bsz, new_len, dtype=torch.bool, device=hidden.device)
    new_pos = call.pos.new_zeros(bsz, new_len)
    new_visual = torch.zeros_like(new_mask)
    new_image = torch.full((bsz, new_len), -1, dtype=torch.long, device=hidden.device)
    new_token = torch.full_like(new_image, -1)
    new_source = torch.full_like(new_image, -1)
    cos_full, sin_full = cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1)
    new_cos = cos_full.new_zeros(bsz, new_len, cos.shape[-1])
    new_sin = torch.zeros_like(new_cos)
    new_cos[..., 0] = 1.0
    for b, rows in enumerate(keep_rows):
        sl = place(rows)
        new_hidden[b, sl] = hidden[b, rows]
        new_mask[b, sl] = True
        new_visual[b, sl] = call.visual[b, rows]
        new_image[b, sl] = call.row_image[b, rows]
        new_token[b, sl] = call.row_token[b, rows]
        new_source[b, sl] = call.row_source[b, rows]
        if call.plan.positions == "compact":
            gone = torch.zeros(length, dtype=torch.long, device=hidden.device)
            gone[~torch.isin(torch.arange(length, device=hidden.device), rows) & valid[b]] = 1
            new_pos[b, sl] = call.pos[b, rows] - torch.cumsum(gone, 0)[rows]
        else:
            new_pos[b, sl] = call.pos[b, rows]
            new_cos[b, sl], new_sin[b, sl] = cos_full[b, rows], sin_full[b, rows]
    call.removed = call.removed + torch.tensor(dropped, device=hidden.device)
    call.mask2d, call.pos, call.visual = new_mask, new_pos, new_visual
    call.row_image, call.row_token, call.row_source = new_image, new_token, new_source
    call.cur = {}
    for at in range(layer, decoder.num_layers):  # the first layer of each kind from here on sizes its inputs
        kind = decoder.layer_type(at)
        if kind in call.cur:
            continue
        rotary = (new_cos, new_sin)
        if call.plan.positions == "compact" or decoder.per_type_rotary:
            rotary = decoder.rotary(new_hidden, new_pos, at)
        mask4d = decoder.mask(new_hidden, new_mask.long(), call.cache, new_pos, at, call.blocks())
        call.cur[kind] = {"attention_mask": mask4d, "position_ids": new_pos, "position_embeddings": rotary}
    call.groups.append(Group(start=layer, prompt_mask=new_mask.long(), removed=call.removed.clone()))
    return new_hidden
