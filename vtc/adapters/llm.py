"""The ``LLM_LAYER(k)`` hook point: pruning inside a stock decoder-only LLM during prefill (PRUNERS.md §1.4).

Works on the transformers 5.x decoder layout shared by Llama, Qwen2 and Qwen2-VL's text model: a plain
Python loop over ``layers`` that passes every layer the same ``attention_mask`` (4-D or None),
``position_ids``, ``position_embeddings=(cos, sin)`` and ``cache``, computed once for the full sequence.

Forward pre-hooks on the layers rewrite those per-call inputs:

* **prefill**, at a prune layer ``k``: the method gets a :class:`LayerTokens` (hidden states entering
  ``k``, each sample's visual rows, and attention rows recomputed from a layer's own norm, q/k, RoPE and
  grouped KV heads, while the model keeps its attention kernel) and returns the visual rows to keep. The
  hidden states are gathered (re-padded on the caller's side when samples keep different counts); every
  layer ``>= k`` then gets the matching mask, positions and rotary embeddings, so its KV cache holds only
  the kept rows;
* **decode** (and any later call on the same cache): layers of each group get a mask built for their own
  cache length from that group's prompt mask plus the new tokens, and, under ``"compact"`` positions, the
  new tokens' positions minus the visual tokens the group dropped.

Layers below the first prune layer are never touched: their cache, mask and positions are the model's own.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..contexts import DecodeTokens, LayerTokens, LayerUpdate


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoder:
    """A view of a transformers 5.x decoder-only LM (Llama / Qwen2 layout)."""

    def __init__(self, language_model: nn.Module, rope: Callable | None = None):
        self.lm = language_model
        self.layers: nn.ModuleList = language_model.layers
        self.config = language_model.config
        self._rope = rope

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [B, H, T, d]`` with ``cos, sin [B, T, d]``."""
        if self._rope is not None:
            return self._rope(x, cos, sin)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return x * cos + rotate_half(x) * sin

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm.rotary_emb(hidden, position_ids=position_ids)

    def mask(self, hidden: torch.Tensor, mask2d: torch.Tensor, cache: Any, position_ids: torch.Tensor, layer: int):
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            cache=cache,
            position_ids=position_ids,
            layer_idx=layer,
        )

    def attention_rows(
        self,
        layer: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        valid: torch.Tensor,
        rows: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Attention of ``rows`` (per sample) over all rows of ``x [B, L, D]`` as layer ``layer`` computes it.

        Only the needed query rows are projected; keys for every row (one extra k projection). Grouped KV
        heads are repeated; masked keys get probability 0; softmax and head mean in fp32.
        """
        block = self.layers[layer]
        attn = block.self_attn
        h = block.input_layernorm(x)  # [B, L, D]
        bsz, length, _ = h.shape
        d = attn.head_dim
        keys = attn.k_proj(h).view(bsz, length, -1, d).transpose(1, 2)  # [B, Hkv, L, d]
        keys = self.rope(keys, cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1))
        groups = attn.num_key_value_groups
        out = []
        for b, r in enumerate(rows):
            q = attn.q_proj(h[b, r]).view(1, len(r), -1, d).transpose(1, 2)  # [1, H, R, d]
            cb = cos.expand(bsz, -1, -1)[b : b + 1, r]
            sb = sin.expand(bsz, -1, -1)[b : b + 1, r]
            q = self.rope(q, cb, sb)
            k = keys[b : b + 1].repeat_interleave(groups, dim=1)  # [1, H, L, d]
            logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling  # [1, H, R, L]
            allowed = valid[b][None, :] & (torch.arange(length, device=x.device)[None, :] <= r[:, None])
            logits = logits.masked_fill(~allowed[None, None], float("-inf"))
            out.append(logits.softmax(dim=-1).mean(dim=1)[0])  # [R, L]
        return out


@dataclasses.dataclass
class _Group:
    start: int  # first layer of the group
    prompt_mask: torch.Tensor  # [B, L_g] valid rows of the prompt as the group's cache holds it
    removed: torch.Tensor  # [B] visual rows dropped before this group (relative to layer 0)


class _Call:
    """State of one prefill on one cache, and of the calls that continue it."""

    def __init__(self, plan: LLMPlan, cache: Any, mask2d: torch.Tensor, length: int):
        self.plan = plan
        self.cache = cache
        self.full_len = length
        self.mask2d = mask2d  # [B, L] current valid rows
        self.visual = plan.visual.clone()  # [B, L] current visual rows
        self.row_image = plan.row_image.clone()
        self.row_source = plan.row_source.clone()
        self.row_token = plan.row_token.clone()
        self.removed = torch.zeros(mask2d.shape[0], dtype=torch.long, device=mask2d.device)
        self.groups: list[_Group] = []
        self.stash: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.decoding = False
        self.call_mask: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # current 1-D positions [B, L] (set at the first hooked layer)
        self.cur: dict[str, Any] | None = None  # current replacement kwargs for layers of the last group
        #: per prune layer, the rows each sample kept (coordinates of the sequence entering that layer)
        self.kept_rows: dict[int, list[torch.Tensor]] = {}
        # decode-time selection (methods with llm_decode_layers)
        self.method_state: dict[str, Any] = {}
        self.decode_keep: list[torch.Tensor] | None = None
        self.decode_drop: torch.Tensor | None = None
        self.decode_masks: dict[tuple, Any] = {}


@dataclasses.dataclass
class LLMPlan:
    """What the session tells the LLM hooks before a prefill: where the visual rows are in its input."""

    visual: torch.Tensor  # [B, L] bool
    row_source: torch.Tensor  # [B, L] the caller's input position of each row, -1 if none
    row_image: torch.Tensor  # [B, L] image index of each visual row, -1 otherwise
    row_token: torch.Tensor  # [B, L] token index inside its image, -1 otherwise
    positions: str  # "original" or "compact"
    side: str  # padding side for re-padding
    on_prune: Callable[[_Call, int, float], None]  # reports the kept rows and vtc's seconds after each prune


class LLMHooks:
    """Installs the layer hooks of one method on one decoder, and runs its prune points."""

    def __init__(self, decoder: Decoder, method: Any):
        self.decoder = decoder
        self.method = method
        n = decoder.num_layers
        self.prune_layers = tuple(sorted(set(method.llm_prune_layers(n))))
        self.score_layers = tuple(sorted(set(method.llm_score_layers(n)) - set(self.prune_layers)))
        for layer in (*self.prune_layers, *self.score_layers):
            if not 0 <= layer < n:
                raise ValueError(f"method {method.name!r} acts at LLM layer {layer}, outside 0..{n - 1}")
        decode = tuple(sorted(set(method.llm_decode_layers(n))))
        if len(decode) > 1:
            raise ValueError(f"method {method.name!r}: at most one decode-time selection layer is supported")
        self.decode_layer = decode[0] if decode else None
        if self.decode_layer is not None and not 1 <= self.decode_layer < n:
            raise ValueError(f"method {method.name!r} selects at decode layer {self.decode_layer}, outside 1..{n - 1}")
        if self.decode_layer is not None and any(p <= self.decode_layer for p in self.prune_layers):
            raise ValueError("decode-time selection after an in-prefill prune point is not supported")
        starts = (*self.prune_layers, *self.score_layers, *((self.decode_layer - 1,) if decode else ()))
        self.first = min(starts, default=n)
        self.handles: list[Any] = []
        self.pending: LLMPlan | None = None
        self.call: _Call | None = None  # the call in progress
        self.calls: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its prefill state

    def install(self) -> None:
        self.handles.append(self.decoder.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(self.decoder.lm.register_forward_hook(self._lm_post))
        for idx in range(self.first, self.decoder.num_layers):
            layer = self.decoder.layers[idx]
            self.handles.append(layer.register_forward_pre_hook(self._layer_hook(idx), with_kwargs=True))

    def uninstall(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.call = self.pending = None
        self.calls = weakref.WeakKeyDictionary()

    # -- language-model level: which kind of call is this? -----------------------------------------------
    def _lm_pre(self, module, args, kwargs):
        cache = kwargs.get("cache")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = args[0] if args else kwargs.get("input_ids")
        past = cache.get_seq_length() if cache is not None else 0
        mask2d = kwargs.get("attention_mask")
        if self.pending is not None and past == 0:
            plan, self.pending = self.pending, None
            bsz, length = embeds.shape[:2]
            if mask2d is None:
                mask2d = torch.ones(bsz, length, dtype=torch.long, device=embeds.device)
            self.call = _Call(plan, cache, mask2d.bool(), length)
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
        # a forward without a cache argument gets one created inside the LM: remember it for continuation
        call = self.call
        if call is not None and call.cache is None:
            call.cache = getattr(output, "cache", None)
            if call.cache is not None:
                self.calls[call.cache] = call

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
        if call.cur is not None:  # we are past a prune point: inputs for the shortened sequence
            kwargs.update(call.cur)
        cos, sin = kwargs["position_embeddings"]
        if call.pos is None:
            pos = kwargs.get("position_ids")  # 1-D (text) positions; M-RoPE models may pass none
            if pos is None or pos.dim() != 2:
                pos = (call.mask2d.long().cumsum(-1) - 1).clamp_min(0)
            call.pos = pos.expand(hidden.shape[0], -1)
        if idx in self.score_layers:
            call.stash[idx] = (hidden, cos, sin, call.mask2d)
        if idx in self.prune_layers:
            hidden = self._prune(idx, hidden, kwargs)
            kwargs.update(call.cur or {})
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _attend(self, current: int, hidden: torch.Tensor, cos, sin):
        call = self.call

        def attend(layer: int, rows: list[torch.Tensor]) -> list[torch.Tensor]:
            if layer == current:
                x, c, s, valid = hidden, cos, sin, call.mask2d
            elif layer in call.stash:
                x, c, s, valid = call.stash[layer]
                if x.shape[1] != hidden.shape[1]:
                    raise RuntimeError(f"layer {layer}'s input was stashed before a prune: rows no longer match")
            else:
                raise ValueError(f"attention of LLM layer {layer} was not captured; list it in llm_score_layers()")
            return self.decoder.attention_rows(layer, x, c, s, valid, rows)

        return attend

    def _prune(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        start = time.perf_counter()
        call = self.call
        bsz, length, _ = hidden.shape
        valid = call.mask2d
        visual_rows = [torch.nonzero(call.visual[b] & valid[b]).flatten() for b in range(bsz)]
        real = [torch.nonzero(valid[b]).flatten() for b in range(bsz)]
        last = torch.stack([r[-1] for r in real])
        text_after = []
        for b in range(bsz):
            after = real[b][real[b] > visual_rows[b][-1]] if visual_rows[b].numel() else real[b][:0]
            text_after.append(after)
        cos, sin = kwargs["position_embeddings"]
        ctx = LayerTokens(
            layer=idx,
            num_layers=self.decoder.num_layers,
            hidden=hidden,
            visual=visual_rows,
            n_input=[int(n) for n in call.plan.visual.sum(1).tolist()],
            last=last,
            text_after=text_after,
            _attend=self._attend(idx, hidden, cos, sin),
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
            call.plan.on_prune(call, idx, time.perf_counter() - start)
            return hidden
        keep_rows = []
        for b in range(bsz):
            drop = torch.zeros(length, dtype=torch.bool, device=hidden.device)
            drop[visual_rows[b]] = True
            drop[kept[b]] = False
            keep_rows.append(torch.nonzero(valid[b] & ~drop).flatten())
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
        if call.plan.positions == "compact":
            new_cos, new_sin = self.decoder.rotary(new_hidden, new_pos)
        call.removed = call.removed + torch.tensor(dropped, device=hidden.device)
        call.mask2d, call.pos, call.visual = new_mask, new_pos, new_visual
        call.row_image, call.row_token, call.row_source = new_image, new_token, new_source
        mask4d = self.decoder.mask(new_hidden, new_mask.long(), call.cache, new_pos, idx)
        call.cur = {"attention_mask": mask4d, "position_ids": new_pos, "position_embeddings": (new_cos, new_sin)}
        call.groups.append(_Group(start=idx, prompt_mask=new_mask.long(), removed=call.removed.clone()))
        call.plan.on_prune(call, idx, time.perf_counter() - start)
        return new_hidden

    def _decode(self, idx: int, args: tuple, kwargs: dict):
        call = self.call
        hidden = args[0] if args else kwargs["hidden_states"]
        selecting = self.decode_layer is not None
        if selecting and idx == self.decode_layer - 1:
            call.stash[idx] = (hidden, *kwargs["position_embeddings"], None)
        if selecting and idx == self.decode_layer:
            self._decode_select(idx, hidden)
        group = None
        for g in call.groups:
            if g.start <= idx:
                group = g
        masked = selecting and idx >= self.decode_layer and call.decode_keep is not None
        if group is None and not masked:
            return None
        bsz, q = hidden.shape[:2]
        key = (None if group is None else group.start, masked)
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
                decode_pos = (pos, self.decoder.rotary(hidden, pos))
            call.decode_masks[key] = (self.decoder.mask(hidden, mask2d, call.cache, pos, idx), decode_pos)
        mask4d, decode_pos = call.decode_masks[key]
        kwargs["attention_mask"] = mask4d
        if decode_pos is not None:
            kwargs["position_ids"], kwargs["position_embeddings"] = decode_pos
        return args, kwargs

    def _decode_select(self, idx: int, hidden: torch.Tensor) -> None:
        """Decode-time selection (DyCoke's dynamic KV pruning): which cached visual rows layers >= idx see."""
        call = self.call
        x, cos, sin, _ = call.stash[idx - 1]
        block = self.decoder.layers[idx - 1]
        attn = block.self_attn
        bsz = x.shape[0]
        h = block.input_layernorm(x[:, -1:])
        q = attn.q_proj(h).view(bsz, 1, -1, attn.head_dim).transpose(1, 2)  # [B, H, 1, d]
        q = self.decoder.rope(q, cos.expand(bsz, -1, -1)[:, -1:], sin.expand(bsz, -1, -1)[:, -1:])
        keys = call.cache.layers[idx - 1].keys  # [B, Hkv, S, d], RoPE already applied
        keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)
        logits = (q.float() @ keys.float().transpose(-1, -2))[:, :, 0] * attn.scaling  # [B, H, S]
        valid = call.call_mask[:, : keys.shape[-2]].to(logits.device)
        logits = logits.masked_fill(valid[:, None] == 0, float("-inf"))
        probs = logits.softmax(-1).mean(1)  # [B, S]
        visual = [torch.nonzero(call.plan.visual[b]).flatten() for b in range(bsz)]
        ctx = DecodeTokens(
            layer=idx,
            visual=visual,
            attention=[probs[b, v] for b, v in enumerate(visual)],
            n_input=[int(v.numel()) for v in visual],
            state=call.method_state,
        )
        keep = self.method.decode_select(ctx)
        call.decode_masks = {}
        if keep is None:
            call.decode_keep = call.decode_drop = None
            return
        drop = torch.zeros(bsz, keys.shape[-2], dtype=torch.bool, device=hidden.device)
        for b, (rows, k) in enumerate(zip(visual, keep, strict=True)):
            drop[b, rows] = True
            drop[b, k] = False
        call.decode_keep, call.decode_drop = keep, drop
