"""Block runners of the supported vision blocks: each re-does its host block's forward with a merge step
between attention and MLP (``Stage.VISION_MERGE``).

A runner calls the host's own submodules (norms, attention, LayerScale, DropPath, MLP) in the host's order,
so nothing of the block is dropped (LayerScale and qk-norm included; the official ToMe patch rewrites
timm's attention and loses both). Proportional attention reaches the host attention as an additive float
mask, so SDPA stays on. With no active merge state a runner runs the block's original forward.
:mod:`vtc.adapters.runners` installs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.attention import split_heads

if TYPE_CHECKING:
    from .runners import MergeContext


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor | None:
    """An additive float attention mask plus the proportional-attention bias ``[B, 1, 1, T]``."""
    if bias is None:
        return mask
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask + bias


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, H, T, T]`` fp32 attention probabilities of ``q, k [B, T, H, d]`` (before the scale), with the host's
    additive (or boolean: False = masked) ``mask`` broadcast to ``[B, H, T, T]``."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    logits = torch.einsum("bihd,bjhd->bhij", q.float() * scale, k.float())
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    return logits.softmax(dim=-1)


# -- runners: (context, block index, original class, block) -> forward ----------------------------------


def hf_encoder_layer(ctx: MergeContext, index: int, orig: type, block: nn.Module) -> Callable:
    """HF CLIP / SigLIP encoder layer: pre-norm attention, residual, pre-norm MLP, residual."""
    heads = int(block.self_attn.num_heads)
    scale = getattr(block.self_attn, "scale", None)

    def split(t: torch.Tensor) -> torch.Tensor:
        return split_heads(t, heads)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        state = ctx.begin(index, hidden_states)
        if state is None:
            return orig.forward(self, hidden_states, attention_mask, **kwargs)
        mask = _with_bias(attention_mask, state.attention_bias(hidden_states.dtype))
        residual = hidden_states
        hidden_states = self.layer_norm1(hidden_states)
        ctx.attend(state, index)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=mask, **kwargs)
        hidden_states = residual + hidden_states
        hidden_states = ctx.merge(state, index, hidden_states, split, scale, mask)
        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return ctx.finish(state, index, hidden_states)

    return forward


def dinov2_layer(ctx: MergeContext, index: int, orig: type, block: nn.Module) -> Callable:
    """HF DINOv2 layer: ``x + drop_path(layer_scale1(attn(norm1(x))))``, then the same with ``norm2`` / MLP."""
    heads = int(block.attention.num_attention_heads)
    scale = getattr(block.attention, "scaling", None)

    def split(t: torch.Tensor) -> torch.Tensor:
        return split_heads(t, heads)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        state = ctx.begin(index, hidden_states)
        if state is None:
            return orig.forward(self, hidden_states, attention_mask, **kwargs)
        mask = _with_bias(attention_mask, state.attention_bias(hidden_states.dtype))
        ctx.attend(state, index)
        attn, _ = self.attention(self.norm1(hidden_states), attention_mask=mask, **kwargs)
        hidden_states = self.drop_path(self.layer_scale1(attn)) + hidden_states
        hidden_states = ctx.merge(state, index, hidden_states, split, scale, mask)
        hidden_states = self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states)))) + hidden_states
        return ctx.finish(state, index, hidden_states)

    return forward


def internvl_layer(ctx: MergeContext, index: int, orig: type, block: nn.Module) -> Callable:
    """HF InternVL vision layer: ``x + lambda_1 * attn(layernorm_before(x))``, then
    ``x + lambda_2 * dropout(mlp(layernorm_after(x)))``."""
    heads = int(block.attention.num_heads)
    scale = getattr(block.attention, "scale", None)

    def split(t: torch.Tensor) -> torch.Tensor:
        return split_heads(t, heads)

    def forward(self, hidden_states):
        state = ctx.begin(index, hidden_states)
        if state is None:
            return orig.forward(self, hidden_states)
        mask = state.attention_bias(hidden_states.dtype)
        ctx.attend(state, index)
        attn, _ = self.attention(self.layernorm_before(hidden_states), attention_mask=mask)
        hidden_states = self.lambda_1 * attn + hidden_states
        hidden_states = ctx.merge(state, index, hidden_states, split, scale, mask)
        out = self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        out = out if self.lambda_2 is None else self.lambda_2 * out
        return ctx.finish(state, index, out + hidden_states)

    return forward


def timm_block(ctx: MergeContext, index: int, orig: type, block: nn.Module) -> Callable:
    """timm ``Block``: ``x + drop_path1(ls1(attn(norm1(x))))`` then ``x + drop_path2(ls2(mlp(norm2(x))))``."""

    def forward(self, x, attn_mask=None, is_causal=False):
        state = ctx.begin(index, x)
        if state is None:
            return orig.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        mask = _with_bias(attn_mask, state.attention_bias(x.dtype))
        ctx.attend(state, index)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=mask, is_causal=is_causal)))
        x = ctx.merge(state, index, x, lambda t: t.transpose(1, 2), self.attn.scale, mask)  # q, k: [B, H, T, d]
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return ctx.finish(state, index, x)

    return forward


def open_clip_block(ctx: MergeContext, index: int, orig: type, block: nn.Module) -> Callable:
    """open_clip ``ResidualAttentionBlock`` (batch first): ``x + ls_1(attn(ln_1(x)))``, ``x + ls_2(mlp(ln_2(x)))``.

    ``nn.MultiheadAttention`` takes no per-batch additive mask and does not expose its keys, so once sizes
    differ the attention runs here from its packed projection (SDPA, ``log size`` bias); before the
    first merge it is the module's own call, and the keys are the key slice of the packed projection.
    """
    heads = int(block.attn.num_heads)

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        state = ctx.begin(index, q_x)
        if state is None:
            return orig.forward(self, q_x, k_x, v_x, attn_mask)
        if k_x is not None or v_x is not None or attn_mask is not None:
            raise ValueError("token merging runs open_clip self-attention blocks without attention masks only")
        bias = state.attention_bias(q_x.dtype)
        ctx.attend(state, index)
        h = self.ln_1(q_x)
        if bias is None:
            attn = self.attention(q_x=h)
            if ctx.capture:
                ctx.queries, ctx.keys = _mha_qk(self.attn, h, state.wants_attention)
        else:
            attn, ctx.queries, ctx.keys = _mha_with_bias(self.attn, h, bias)
        x = q_x + self.ls_1(attn)
        x = ctx.merge(state, index, x, lambda t: split_heads(t, heads), None, bias)
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return ctx.finish(state, index, x)

    return forward


def _mha_qk(attn: nn.MultiheadAttention, x: torch.Tensor, queries: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``[B, T, C]`` queries (None unless ``queries``) and keys of a packed ``nn.MultiheadAttention`` (rows ``0:C``
    and ``C:2C`` of its in-projection)."""
    c = attn.embed_dim
    start = 0 if queries else c
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[start : 2 * c]
    out = F.linear(x, attn.in_proj_weight[start : 2 * c], bias)
    return (out[..., :c], out[..., c:]) if queries else (None, out)


def _mha_with_bias(
    attn: nn.MultiheadAttention, x: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention of ``x [B, T, C]`` with an additive ``[B, 1, 1, T]`` bias: ``(out [B, T, C], queries, keys)``,
    queries and keys ``[B, T, H, d]``."""
    bsz, t, c = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(bsz, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, T, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.dropout if attn.training else 0.0)
    out = attn.out_proj(out.transpose(1, 2).reshape(bsz, t, c))
    return out, q.transpose(1, 2), k.transpose(1, 2)
