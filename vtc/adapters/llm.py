"""A view of a stock decoder-only LLM for the ``LLM_LAYER`` hook point: its layers, RoPE, masks, attention rows.

Works on the transformers 5.x decoder layout shared by Llama, Qwen2, Qwen2-VL's and Qwen3-VL's text models
(with Qwen3's per-head q / k norms): a plain Python loop over ``layers`` that passes every layer the same
``attention_mask`` (4-D or None), ``position_ids``, ``position_embeddings=(cos, sin)`` and ``cache``, computed
once for the full sequence.
The hooks that prune inside it are :mod:`vtc.adapters.llm_hooks`.

Attention rows are recomputed from a layer's own input norm, q/k projections, RoPE and grouped KV heads, so
the model keeps SDPA / FlashAttention (no eager switch, no ``output_attentions``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _heads(attn: nn.Module, which: str, h: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, L, H, d]`` queries (``which="q"``) or keys of the normed input ``h [B, L, D]``: the projection, then
    the per-head RMSNorm where the layer has one (Qwen3, Gemma 3: ``q_norm`` / ``k_norm``, before RoPE)."""
    x = getattr(attn, f"{which}_proj")(h)
    x = x.view(*x.shape[:-1], -1, head_dim)
    norm = getattr(attn, f"{which}_norm", None)
    return norm(x) if norm is not None else x


def _softcap(attn: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The layer's attention-logit soft cap (Gemma's ``attn_logit_softcapping``), if it has one."""
    cap = getattr(attn, "attn_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


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

    #: the module whose call carries the 2-D padding mask when the LM itself gets prepared masks (Gemma 3)
    mask_source: nn.Module | None = None
    #: rotary embeddings differ per layer type (recomputed from positions, never gathered from another layer's)
    per_type_rotary = False

    def layer_type(self, layer: int) -> str:
        """The kind of attention ``layer`` runs (its mask and RoPE): one kind unless a subclass says otherwise."""
        return "full_attention"

    def rotary(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, layer: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm.rotary_emb(hidden, position_ids=position_ids)

    def allow(
        self, layer: int, allowed: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor | None
    ) -> torch.Tensor:
        """``[R, L]`` keys each query row in ``rows`` may attend to in ``layer``, from the causal and padding mask
        ``allowed`` (``blocks [L]``: image block of every row, -1 for text; used by models with bidirectional
        image blocks)."""
        return allowed

    def mask(
        self,
        hidden: torch.Tensor,
        mask2d: torch.Tensor,
        cache: Any,
        position_ids: torch.Tensor,
        layer: int,
        blocks: torch.Tensor | None = None,
    ):
        """The 4-D mask layer ``layer`` gets for ``hidden`` (``blocks [B, L]``: see :meth:`allow`)."""
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            cache=cache,
            position_ids=position_ids,
            layer_idx=layer,
        )

    @torch.no_grad()
    def keys(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``[B, H, L, d]`` layer ``layer``'s keys of ``x [B, L, D]`` (its input norm, k projection, RoPE), every
        grouped KV head repeated for the query heads it serves."""
        block = self.layers[layer]
        attn = block.self_attn
        h = block.input_layernorm(x)
        bsz, length, _ = h.shape
        keys = _heads(attn, "k", h, attn.head_dim).transpose(1, 2)
        keys = self.rope(keys, cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1))
        return keys.repeat_interleave(attn.num_key_value_groups, dim=1)

    @torch.no_grad()
    def queries(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``[B, H, L, d]`` layer ``layer``'s queries of ``x [B, L, D]`` (its input norm, q projection, RoPE)."""
        block = self.layers[layer]
        h = block.input_layernorm(x)
        q = _heads(block.self_attn, "q", h, block.self_attn.head_dim).transpose(1, 2)
        return self.rope(q, cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1))

    def scaled_logits(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """fp32 attention logits of queries ``q [B, H, R, d]`` over keys ``k [B, H, S, d]`` as layer ``layer``
        scales them (and soft-caps them, where it does)."""
        attn = self.layers[layer].self_attn
        return _softcap(attn, (q.float() @ k.float().transpose(-1, -2)) * attn.scaling)

    def sub_blocks(self, layer: int) -> dict[str, nn.Module]:
        """The attention and MLP modules of ``layer`` (each called on its own normed input)."""
        block = self.layers[layer]
        return {"attention": block.self_attn, "mlp": block.mlp}

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The LM's final norm (what the LM head reads) applied to ``x``."""
        return self.lm.norm(x)

    @torch.no_grad()  # scores rank rows: no gradient goes through a selection
    def attention_rows(
        self,
        layer: int,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        valid: torch.Tensor,
        rows: list[torch.Tensor],
        heads: slice | None = None,
        blocks: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Attention of ``rows`` (per sample) over all rows of ``x [B, L, D]`` as layer ``layer`` computes it.

        Only the needed query rows are projected; keys for every row (one extra k projection). Grouped KV
        heads are repeated; masked keys get probability 0; softmax and head mean in fp32. With ``heads`` (a
        slice of the query heads): per sample the scaled logits of those heads ``[H', R, L]`` instead, fp32,
        ``-inf`` where the causal or padding mask forbids a key.
        """
        block = self.layers[layer]
        attn = block.self_attn
        h = block.input_layernorm(x)  # [B, L, D]
        bsz, length, _ = h.shape
        d = attn.head_dim
        keys = _heads(attn, "k", h, d).transpose(1, 2)  # [B, Hkv, L, d]
        keys = self.rope(keys, cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1))
        groups = attn.num_key_value_groups
        out = []
        for b, r in enumerate(rows):
            if r.numel() == 0:  # no query rows asked for this sample
                out.append(x.new_zeros((0, 0, length) if heads is not None else (0, length), dtype=torch.float32))
                continue
            q = _heads(attn, "q", h[b, r][None], d).transpose(1, 2)  # [1, H, R, d]
            cb = cos.expand(bsz, -1, -1)[b : b + 1, r]
            sb = sin.expand(bsz, -1, -1)[b : b + 1, r]
            q = self.rope(q, cb, sb)
            k = keys[b : b + 1].repeat_interleave(groups, dim=1)  # [1, H, L, d]
            logits = _softcap(attn, (q.float() @ k.float().transpose(-1, -2)) * attn.scaling)  # [1, H, R, L]
            allowed = valid[b][None, :] & (torch.arange(length, device=x.device)[None, :] <= r[:, None])
            allowed = self.allow(layer, allowed, r, None if blocks is None else blocks[b])
            logits = logits.masked_fill(~allowed[None, None], float("-inf"))
            out.append(logits[0, heads] if heads is not None else logits.softmax(dim=-1).mean(dim=1)[0])  # [R, L]
        return out

    @torch.no_grad()
    def decode_attention(self, layer: int, x: torch.Tensor, cos, sin, keys: torch.Tensor, valid: torch.Tensor):
        """``[B, S]`` head-mean attention of the newest token of ``x [B, T, D]`` over ``keys [B, Hkv, S, d]``
        (the layer's cached keys, RoPE applied) as layer ``layer`` computes it; ``valid [B, >= S]`` masks keys."""
        block = self.layers[layer]
        attn = block.self_attn
        bsz = x.shape[0]
        h = block.input_layernorm(x[:, -1:])
        q = _heads(attn, "q", h, attn.head_dim).transpose(1, 2)  # [B, H, 1, d]
        q = self.rope(q, cos.expand(bsz, -1, -1)[:, -1:], sin.expand(bsz, -1, -1)[:, -1:])
        keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)
        logits = _softcap(attn, (q.float() @ keys.float().transpose(-1, -2))[:, :, 0] * attn.scaling)  # [B, H, S]
        valid = valid[:, : keys.shape[-2]].to(logits.device)
        logits = logits.masked_fill(valid[:, None] == 0, float("-inf"))
        return logits.softmax(-1).mean(1)
