"""The ``LLM_LAYER(k)`` hook point: pruning inside a stock decoder-only LLM during prefill.

Forward pre-hooks on the decoder's layers (:class:`~vtc.adapters.llm.Decoder`) rewrite the per-call inputs
every layer shares:

* **prefill**, at a prune layer ``k``: the method gets a :class:`~vtc.contexts.LayerTokens` (hidden states
  entering ``k``, each sample's visual rows, attention rows recomputed from a layer's own norm, q/k, RoPE and
  grouped KV heads while the model keeps its attention kernel, and observed sub-blocks,
  :mod:`~vtc.adapters.llm_observe`) and returns the visual rows to keep. The hidden states are gathered
  (:func:`~vtc.adapters.llm_state.shorten`); every layer ``>= k`` then gets the matching mask, positions and
  rotary embeddings, so its KV cache holds only the kept rows;
* **decode** (and any later call on the same cache): layers of each group get a mask built for their own
  cache length from that group's prompt mask plus the new tokens, and, under ``"compact"`` positions, the
  new tokens' positions minus the visual tokens the group dropped. A method with a decode layer (DyCoke)
  re-selects, at every step, the cached visual rows the layers from there on may attend to
  (:mod:`~vtc.adapters.llm_decode`).

Masks and rotary embeddings are built per layer type (:meth:`Decoder.layer_type`: Gemma 3's sliding-window and
global layers differ in both), each sized against the first layer of its type in the group.

Layers below the first prune layer are never touched; the adapter arms the hooks per call.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import torch

from ..contexts import LayerTokens, LayerUpdate
from .llm import Decoder
from .llm_decode import decode_select
from .llm_observe import SubBlockObserver, observed_rows
from .llm_state import LLMPlan, Prefill, layer_schedule, shorten


class LLMHooks:
    """Installs the layer hooks of one method on one decoder, and runs its prune points."""

    def __init__(self, decoder: Decoder, method: Any):
        self.decoder = decoder
        self.method = method
        self.prune_layers, self.score_layers, self.decode_layer, self.first = layer_schedule(
            method, decoder.num_layers
        )
        self.observer = SubBlockObserver(decoder, method, lambda: self.call)
        self.handles: list[Any] = []
        self.pending: LLMPlan | None = None
        self.outer_mask: torch.Tensor | None = None  # the 2-D mask of the decoder's mask source, for this call
        self.call: Prefill | None = None  # the call in progress
        self.calls: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its prefill state

    def install(self) -> None:
        skip = torch.compiler.disable  # Python over each call's rows: torch.compile runs them as they are
        lm = self.decoder.lm
        self.handles.append(lm.register_forward_pre_hook(skip(self._lm_pre), with_kwargs=True))
        self.handles.append(lm.register_forward_hook(skip(self._lm_post)))
        if self.decoder.mask_source is not None:  # the LM gets prepared masks: read the 2-D one where it is passed
            source = self.decoder.mask_source
            self.handles.append(source.register_forward_pre_hook(skip(self._outer_mask), with_kwargs=True))
        for idx in range(self.first, self.decoder.num_layers):
            layer = self.decoder.layers[idx]
            self.handles.append(layer.register_forward_pre_hook(skip(self._layer_hook(idx)), with_kwargs=True))
        self.handles += self.observer.install(skip)

    def uninstall(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.call = self.pending = None
        self.calls = weakref.WeakKeyDictionary()

    # -- language-model level: which kind of call is this? -----------------------------------------------
    def _outer_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.outer_mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None

    def _lm_pre(self, module, args, kwargs):
        cache = kwargs.get("cache")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = args[0] if args else kwargs.get("input_ids")
        past = cache.get_seq_length() if cache is not None else 0
        mask2d = kwargs.get("attention_mask")
        if isinstance(mask2d, dict):  # masks prepared per layer type (Gemma 3): the 2-D one its caller got
            mask2d, self.outer_mask = self.outer_mask, None
        if self.pending is not None and past == 0:
            bsz, length = embeds.shape[:2]
            plan, self.pending = self.pending.expanded(bsz), None
            if mask2d is None:
                mask2d = torch.ones(bsz, length, dtype=torch.long, device=embeds.device)
            self.call = Prefill(plan, cache, mask2d.bool(), length)
            if cache is not None:
                self.calls[cache] = self.call
            return None
        call = self.calls.get(cache) if cache is not None and past > 0 else None
        self.call = call  # None: an unrelated call (text only, or another cache): leave it alone
        if call is not None:
            call.decoding = True
            if mask2d is None:  # the model's default: every cached and new token is visible
                bsz, q = embeds.shape[:2]
                mask2d = torch.ones(bsz, past + q, dtype=torch.long, device=embeds.device)
            call.call_mask = mask2d
            call.decode_masks = {}
        return None

    def _lm_post(self, module, args, output):
        call = self.call
        if call is None:
            return
        call.stash.clear()  # layer inputs kept for a later layer's scores: only needed inside this forward
        # a forward without a cache argument gets one created inside the LM: remember it for continuation
        if call.cache is None:
            cache = getattr(output, "cache", None)
            if cache is not None:
                call.cache = cache
                self.calls[cache] = call

    # -- layers -------------------------------------------------------------------------------------
    def _layer_hook(self, idx: int):
        def hook(module, args, kwargs):
            call = self.call
            if call is None:
                return None
            if call.decoding:
                return self._decode(idx, args, kwargs)
            return self._prefill(idx, args, kwargs)

        return hook

    def _prefill(self, idx: int, args: tuple, kwargs: dict):
        call = self.call
        hidden = args[0] if args else kwargs["hidden_states"]
        kind = self.decoder.layer_type(idx)
        if call.cur is not None:  # we are past a prune point: inputs for the shortened sequence
            kwargs.update(call.cur[kind])
        cos, sin = kwargs["position_embeddings"]
        if call.pos is None:
            pos = kwargs.get("position_ids")  # 1-D (text) positions; M-RoPE models may pass none
            if pos is None or pos.dim() != 2:
                pos = (call.mask2d.long().cumsum(-1) - 1).clamp_min(0)
            call.pos = pos.expand(hidden.shape[0], -1)
        if idx in self.prune_layers:
            hidden = self._prune(idx, hidden, kwargs)
            kwargs.update(call.cur[kind] if call.cur else {})
        if idx in self.score_layers:  # what this layer runs on, after a prune at it (AIM scores every layer)
            call.stash[idx] = (hidden, *kwargs["position_embeddings"], call.mask2d)
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _inputs(self, current: int, hidden: torch.Tensor, cos, sin):
        call = self.call  # layer -> (x, cos, sin, valid): its input at this prune point (its own, or its stash)

        def at(layer: int):
            if layer == current:
                return hidden, cos, sin, call.mask2d
            if layer not in call.stash:
                raise ValueError(f"the input of LLM layer {layer} was not captured; list it in llm_score_layers()")
            x, c, s, valid = call.stash[layer]
            if x.shape[1] != hidden.shape[1]:
                raise RuntimeError(f"layer {layer}'s input was stashed before a prune: rows no longer match")
            return x, c, s, valid

        return at

    def _prune(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        start = time.perf_counter()
        call = self.call
        bsz, length, _ = hidden.shape
        valid = call.mask2d
        visual_rows = [torch.nonzero(call.visual[b] & valid[b]).flatten() for b in range(bsz)]
        real = [torch.nonzero(valid[b]).flatten() for b in range(bsz)]
        last = torch.stack([r[-1] for r in real])
        text_after = [r[r > v[-1]] if v.numel() else r[:0] for r, v in zip(real, visual_rows, strict=True)]
        cos, sin = kwargs["position_embeddings"]
        at = self._inputs(idx, hidden, cos, sin)
        blocks = call.blocks()
        ctx = LayerTokens(
            layer=idx,
            num_layers=self.decoder.num_layers,
            hidden=hidden,
            visual=visual_rows,
            n_input=[int(n) for n in call.plan.visual.sum(1).tolist()],
            last=last,
            text_after=text_after,
            _attend=lambda layer, rows, heads=None: self.decoder.attention_rows(
                layer, *at(layer), rows, heads, blocks
            ),
            _keys=lambda layer: self.decoder.keys(layer, *at(layer)[:3]),
            _norm=self.decoder.final_norm,
            _observed=lambda: observed_rows(call),
            n_original=None if call.plan.n_original is None else [int(n) for n in call.plan.n_original.tolist()],
            visual_image=[call.row_image[b, v] for b, v in enumerate(visual_rows)],
            visual_token=[call.row_token[b, v] for b, v in enumerate(visual_rows)],
        )
        kept = self.method.prune(ctx)
        if isinstance(kept, LayerUpdate):  # a merge: kept rows absorbed the dropped ones
            hidden, kept = kept.hidden, kept.kept
        call.kept_rows[idx] = kept
        for b, (k, v) in enumerate(zip(kept, visual_rows, strict=True)):
            if not bool(torch.isin(k, v).all()) or torch.unique(k).numel() != k.numel():
                raise RuntimeError(f"method {self.method.name!r} kept rows that are not its visual rows (sample {b})")
        dropped = [v.numel() - k.numel() for k, v in zip(kept, visual_rows, strict=True)]
        if all(d == 0 for d in dropped):
            call.plan.on_prune(call.rows(), idx, time.perf_counter() - start)
            return hidden
        drop = torch.zeros(bsz, length, dtype=torch.bool, device=hidden.device)
        for b in range(bsz):
            drop[b, visual_rows[b]] = True
            drop[b, kept[b]] = False
        keep_rows = [torch.nonzero(valid[b] & ~drop[b]).flatten() for b in range(bsz)]
        hidden = shorten(call, self.decoder, idx, hidden, keep_rows, dropped, cos, sin)
        call.plan.on_prune(call.rows(), idx, time.perf_counter() - start)
        return hidden

    def _decode(self, idx: int, args: tuple, kwargs: dict):
        call = self.call
        hidden = args[0] if args else kwargs["hidden_states"]
        selecting = self.decode_layer is not None
        if selecting and idx == self.decode_layer - 1:
            call.stash[idx] = (hidden, *kwargs["position_embeddings"], None)
        if selecting and idx == self.decode_layer:
            decode_select(self.method, self.decoder, call, idx, hidden)
        group = next((g for g in reversed(call.groups) if g.start <= idx), None)  # the latest group started
        masked = selecting and idx >= self.decode_layer and call.decode_keep is not None
        if group is None and not masked:
            return None
        bsz, q = hidden.shape[:2]
        key = (None if group is None else group.start, masked, self.decoder.layer_type(idx))
        if key not in call.decode_masks:
            call_mask = call.call_mask
            if group is None:
                mask2d = call_mask.long().clone()
            else:
                mask2d = torch.cat([group.prompt_mask, call_mask[:, call.full_len :].to(group.prompt_mask)], dim=1)
            if masked:  # visual cache rows the decode-time selection left out
                mask2d[call.decode_drop] = 0
            pos = kwargs.get("position_ids")
            pos = pos.expand(bsz, -1) if pos is not None else None
            decode_pos = None
            if group is not None and call.plan.positions == "compact" and pos is not None:
                pos = pos - group.removed[:, None]
                decode_pos = (pos, self.decoder.rotary(hidden, pos, idx))
            call.decode_masks[key] = (self.decoder.mask(hidden, mask2d, call.cache, pos, idx), decode_pos)
        mask4d, decode_pos = call.decode_masks[key]
        kwargs["attention_mask"] = mask4d
        if decode_pos is not None:
            kwargs["position_ids"], kwargs["position_embeddings"] = decode_pos
        return args, kwargs
