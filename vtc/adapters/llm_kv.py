"""The ``KV_CACHE`` hook point: compressing a stock decoder's KV cache after the prefill and while decoding.

Hooks on the decoder (:class:`~vtc.adapters.llm.Decoder`), installed by :func:`vtc.compress` with ``kv=``:

* the input embedding sees the ids of the LLM's input (after any visual stage), so the visual rows are known;
* **prefill** (a call on an empty cache whose input has visual rows): each layer's input is kept until the layer
  ran; then the attention every prompt row received is recomputed in query chunks from the layer's own queries
  (:meth:`Decoder.queries`) and the keys it just cached, the compressor (:mod:`vtc.kv`) cuts each sample's
  entries, and the layer's cache is replaced by the kept entries, right-aligned per sample (padding slots are
  masked). The layer's own output used the full cache, as in the official code;
* **decode** (any later call on that cache): every layer gets a mask built for its own, shorter cache (the kept
  slots plus the new rows, causal among them); positions continue from the original prompt (``generate`` passes
  them; a call that passes none gets them from the logical length); after a layer appended the new rows the
  compressor may evict one entry per sample (Elastic Cache).

``cache.get_seq_length()`` then reports the physical length, which is what the mask sizes need; positions never
come from it. State lives per cache in a weak mapping, so a dropped cache frees everything.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from .llm import Decoder


class KVCall:
    """One compressed prefill and the calls that continue its cache."""

    def __init__(self, mask2d: torch.Tensor, visual: torch.Tensor):
        self.mask2d = mask2d  # [B, L] real prompt rows
        self.visual = visual & mask2d
        self.prompt = mask2d.sum(1)  # [B] rows each sample's prompt had
        self.logical = mask2d.shape[1]  # positions the cache stands for (prompt plus every new row)
        self.appended = 0  # rows added after the prefill
        self.masks: dict[int, torch.Tensor] = {}  # layer -> [B, S] occupied slots of its cache
        self.states: dict[int, list[Any]] = {}  # layer -> per sample, the compressor's decode state
        self.new: torch.Tensor | None = None  # [B, q] the current call's new rows
        self.decoding = False
        self.stash: tuple[torch.Tensor, ...] | None = None


class KVHooks:
    """Installs the KV-cache stage of one compressor on one decoder."""

    def __init__(self, decoder: Decoder, compressor: Any, embed: nn.Module, visual_rows, chunk: int = 512):
        self.decoder, self.compressor, self.embed, self.visual_rows = decoder, compressor, embed, visual_rows
        self.chunk = chunk
        self.handles: list[Any] = []
        self.ids: torch.Tensor | None = None
        self.call: KVCall | None = None
        self.cache: Any = None
        self.calls: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> KVCall

    def install(self) -> None:
        skip = torch.compiler.disable
        self.handles.append(self.embed.register_forward_pre_hook(skip(self._embed)))
        lm = self.decoder.lm
        self.handles.append(lm.register_forward_pre_hook(skip(self._lm_pre), with_kwargs=True))
        self.handles.append(lm.register_forward_hook(skip(self._lm_post)))
        for idx, layer in enumerate(self.decoder.layers):
            self.handles.append(layer.register_forward_pre_hook(skip(self._pre(idx)), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(skip(self._post(idx)), with_kwargs=True))

    def uninstall(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.ids = self.call = self.cache = None
        self.calls = weakref.WeakKeyDictionary()

    # -- calls ------------------------------------------------------------------------------------------
    def _embed(self, module, args):
        ids = args[0] if args else None
        if torch.is_tensor(ids) and ids.dim() == 2 and not ids.is_floating_point():
            self.ids = ids

    def _lm_pre(self, module, args, kwargs):
        ids, self.ids = self.ids, None
        cache = kwargs.get("cache")
        embeds = kwargs.get("inputs_embeds")
        embeds = embeds if embeds is not None else (args[0] if args else kwargs.get("input_ids"))
        self.call, self.cache = None, cache
        if cache is None:
            return None
        bsz, q = embeds.shape[:2]
        mask2d = kwargs.get("attention_mask")
        mask2d = mask2d if torch.is_tensor(mask2d) and mask2d.dim() == 2 else None
        if cache.get_seq_length() == 0:
            if ids is None or ids.shape != (bsz, q):
                return None
            visual = self.visual_rows(ids)
            if not bool(visual.any()):  # vtc compresses calls with visual input only
                return None
            full = torch.ones(bsz, q, dtype=torch.bool, device=embeds.device) if mask2d is None else mask2d.bool()
            self.call = self.calls[cache] = KVCall(full, visual.to(full.device))
            return None
        call = self.calls.get(cache)
        if call is None:
            return None
        if q > 1:  # generate slices a new turn by the cache's (physical) length: it would re-feed cached tokens
            raise ValueError(
                f"this cache was compressed by the KV stage: it holds fewer entries than the {call.logical} tokens "
                f"it stands for, so a new turn on it ({q} rows at once) would be misplaced; run the next turn on the "
                f"full conversation without the cache, or compress without kv="
            )
        self.call, call.decoding = call, True
        new = mask2d[:, -q:].bool() if mask2d is not None else torch.ones(bsz, q, dtype=torch.bool)
        call.new = new.to(embeds.device)
        if kwargs.get("position_ids") is None:  # the stock LM would count from the (shorter) cache
            if mask2d is not None and mask2d.shape[1] == call.logical + q:
                pos = (mask2d.long().cumsum(-1) - 1).clamp_min(0)[:, -q:]
            else:
                pos = torch.arange(call.logical, call.logical + q, device=embeds.device).expand(bsz, -1)
            kwargs["position_ids"] = pos
        if 0 in call.masks:  # the LM's own mask, sized for layer 0's cache (every layer gets its own below)
            kwargs["attention_mask"] = torch.cat([call.masks[0], call.new], dim=1).long()
        call.logical += q
        call.appended += q
        return args, kwargs

    def _lm_post(self, module, args, output):
        if self.call is not None:
            self.call.stash = None
        self.call = self.cache = None

    # -- layers -------------------------------------------------------------------------------------
    def _pre(self, idx: int):
        def hook(module, args, kwargs):
            call = self.call
            if call is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if not call.decoding:
                call.stash = (hidden, *kwargs["position_embeddings"])
                return None
            if idx not in call.masks:
                return None
            mask2d = torch.cat([call.masks[idx], call.new], dim=1)
            call.masks[idx] = mask2d
            pos = kwargs.get("position_ids")
            kwargs["attention_mask"] = self.decoder.mask(hidden, mask2d.long(), self.cache, pos, idx)
            return args, kwargs

        return hook

    def _post(self, idx: int):
        def hook(module, args, kwargs, output):
            call = self.call
            if call is None:
                return None
            layer = self.cache.layers[idx]
            if call.decoding:
                if idx in call.masks:
                    self._evict(call, idx, layer)
            else:
                self._compress(call, idx, layer)
            return None

        return hook

    @torch.no_grad()
    def scores(self, idx: int, x: torch.Tensor, cos, sin, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B, H, L]`` fp32: the attention every row of ``x`` received in layer ``idx``, summed over the real
        query rows (causal, padding masked), computed ``chunk`` query rows at a time."""
        q = self.decoder.queries(idx, x, cos, sin)  # [B, H, L, d]
        keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
        length = x.shape[1]
        rows = torch.arange(length, device=x.device)
        out = torch.zeros(q.shape[:3], dtype=torch.float32, device=x.device)
        for start in range(0, length, self.chunk):
            end = min(start + self.chunk, length)
            logits = self.decoder.scaled_logits(idx, q[:, :, start:end], keys)  # [B, H, c, L]
            allowed = (rows[None, :] <= rows[start:end, None])[None] & valid[:, None, :] & valid[:, start:end, None]
            probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
            out += probs.sum(2)
        return out

    def _compress(self, call: KVCall, idx: int, layer: Any) -> None:
        (x, cos, sin), call.stash = call.stash, None
        keys, values = layer.keys, layer.values  # [B, Hkv, L, d], RoPE applied
        scores = self.scores(idx, x, cos, sin, keys, call.mask2d)
        bsz, kv_heads = keys.shape[:2]
        if self.compressor.scores == "heads":
            scores = scores.view(bsz, kv_heads, -1, scores.shape[-1]).sum(2)
        else:
            scores = scores.mean(1)
        kept, states = [], []
        for b in range(bsz):
            rows = torch.nonzero(call.mask2d[b]).flatten()
            sample = (keys[b][:, rows], values[b][:, rows], scores[b][..., rows], call.visual[b, rows])
            out = self.compressor.prefill(*sample)
            limit = self.compressor.keep(rows.numel())
            if out[0].shape[1] > limit:
                raise RuntimeError(f"KV method {self.compressor.name!r} kept {out[0].shape[1]} > {limit} entries")
            kept.append(out[:2])
            states.append(out[2])
        size = max(k.shape[1] for k, _ in kept)
        new_k = keys.new_zeros(bsz, kv_heads, size, keys.shape[-1])
        new_v = values.new_zeros(bsz, kv_heads, size, values.shape[-1])
        mask = torch.zeros(bsz, size, dtype=torch.bool, device=keys.device)
        for b, (k, v) in enumerate(kept):
            new_k[b, :, size - k.shape[1] :], new_v[b, :, size - k.shape[1] :] = k, v
            mask[b, size - k.shape[1] :] = True
        layer.keys, layer.values = new_k, new_v
        call.masks[idx], call.states[idx] = mask, states

    def _evict(self, call: KVCall, idx: int, layer: Any) -> None:
        mask = call.masks[idx]
        bsz, size = mask.shape
        order = torch.arange(size, device=mask.device).repeat(bsz, 1)
        dropped = torch.zeros(bsz, dtype=torch.bool, device=mask.device)
        for b in range(bsz):
            slots = torch.nonzero(mask[b]).flatten()
            seen = int(call.prompt[b]) + call.appended
            at = self.compressor.evict(call.states[idx][b], seen, slots.numel())
            if at is not None:  # move the evicted slot to the front, where it becomes padding
                slot = slots[at]
                order[b] = torch.cat([slot[None], order[b][order[b] != slot]])
                dropped[b] = True
        if not bool(dropped.any()):
            return
        index = order[:, None, :, None]
        layer.keys = layer.keys.gather(2, index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
        layer.values = layer.values.gather(2, index.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))
        mask = mask.gather(1, order)
        mask[dropped, 0] = False
        first = int(torch.nonzero(mask.any(0)).flatten()[0])  # slots no sample uses any more go
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        call.masks[idx] = mask[:, first:]


def kv_stage(adapter: Any, compressor: Any) -> KVHooks:
    """The KV-cache stage of ``compressor`` on ``adapter``'s model (not installed yet); a clear error where the
    family's decoder is not supported."""
    if not getattr(adapter, "routes_calls", False) or not hasattr(adapter, "visual_rows"):
        raise ValueError(f"the KV-cache stage needs a vision-language model; {adapter.family} has no LLM")
    if adapter.forced_positions is not None:
        raise ValueError(
            f"the KV-cache stage does not support the {adapter.family} family yet (its M-RoPE decode positions "
            f"are counted from the cache length); supported: decoders with 1-D RoPE (LLaVA family, InternVL)"
        )
    decoder = adapter.decoder()
    if "sliding_attention" in (getattr(decoder.lm.config, "layer_types", None) or ()):
        raise ValueError("the KV-cache stage does not support sliding-window attention layers (Gemma 3) yet")
    return KVHooks(decoder, compressor, adapter.model.get_input_embeddings(), adapter.visual_rows)
