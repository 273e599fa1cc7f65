"""Block runners: a host's vision blocks run as attention -> merge -> MLP for a ``VISION_MERGE`` method.

Every supported block class (data: :data:`HOSTS`, keyed by the qualified class name) has a runner that
re-does the block's own forward with the merge step in between, calling the host's own submodules
(norms, attention, LayerScale, DropPath, MLP) in the host's order, so nothing of the block is dropped
(LayerScale and qk-norm included; the official ToMe patch rewrites timm's attention and loses both).
Proportional attention reaches the host attention as an additive float mask, so SDPA stays on. The
attention keys (the similarity metric) are read from the module that produces them, by a forward hook,
so they are not computed twice.

Runners are installed by swapping the ``__class__`` of each block *instance* for a one-off subclass
(the upstream class is never touched) and undone by swapping it back. A runner with no active merge
state (merging off, or a call outside vtc's own tower calls) runs the block's original forward.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..contexts import TowerMerge
from .base import UnsupportedModelError, module_at


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
        self.capture = False
        self.keys: torch.Tensor | None = None
        self.seconds = 0.0

    def begin(self, block: int, x: torch.Tensor) -> TowerMerge | None:
        """The state block ``block`` runs under; block 0 starts a new call."""
        if block == 0:
            self.state = self.start(x) if self.start is not None else None
        return self.state

    def attend(self, state: TowerMerge, block: int) -> None:
        """Before the block's attention: capture its keys if the block merges."""
        self.capture, self.keys = state.wants_metric(block), None

    def merge(
        self, state: TowerMerge, block: int, x: torch.Tensor, metric: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Between attention and MLP: ``metric`` turns the captured keys into ``[B, T, d]``."""
        start = time.perf_counter()
        keys, self.capture, self.keys = self.keys, False, None
        wanted = state.wants_metric(block)
        if wanted and keys is None:
            raise RuntimeError(f"vision block {block} merges but its keys were not captured")
        x = state.merge(block, x, metric(keys) if wanted else None)
        self.seconds += time.perf_counter() - start
        return x

    def finish(self, state: TowerMerge, block: int, x: torch.Tensor) -> torch.Tensor:
        x = state.after_block(block, x)
        if block == self.num_blocks - 1 and self.on_done is not None:
            self.on_done(state)
        return x

    def key_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.capture:
            self.keys = output


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor | None:
    """An additive float attention mask plus the proportional-attention bias ``[B, 1, 1, T]``."""
    if bias is None:
        return mask
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask + bias


# -- runners: (context, block index, original class, block) -> forward ----------------------------------


def _hf_encoder_layer(ctx: MergeContext, index: int, orig: type, block: nn.Module) -> Callable:
    """HF CLIP / SigLIP encoder layer: pre-norm attention, residual, pre-norm MLP, residual."""
    heads = int(block.self_attn.num_heads)

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
        hidden_states = ctx.merge(state, index, hidden_states, lambda k: kernels.head_mean_keys(k, heads))
        residual = hidden_states
        hidden_states = self.layer_norm2(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return ctx.finish(state, index, hidden_states)

    return forward


def _dinov2_layer(ctx: MergeContext, index: int, orig: type, block: nn.Module) -> Callable:
    """HF DINOv2 layer: ``x + drop_path(layer_scale1(attn(norm1(x))))``, then the same with ``norm2`` / MLP."""
    heads = int(block.attention.num_attention_heads)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        state = ctx.begin(index, hidden_states)
        if state is None:
            return orig.forward(self, hidden_states, attention_mask, **kwargs)
        mask = _with_bias(attention_mask, state.attention_bias(hidden_states.dtype))
        ctx.attend(state, index)
        attn, _ = self.attention(self.norm1(hidden_states), attention_mask=mask, **kwargs)
        hidden_states = self.drop_path(self.layer_scale1(attn)) + hidden_states
        hidden_states = ctx.merge(state, index, hidden_states, lambda k: kernels.head_mean_keys(k, heads))
        hidden_states = self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states)))) + hidden_states
        return ctx.finish(state, index, hidden_states)

    return forward


def _timm_block(ctx: MergeContext, index: int, orig: type, block: nn.Module) -> Callable:
    """timm ``Block``: ``x + drop_path1(ls1(attn(norm1(x))))`` then ``x + drop_path2(ls2(mlp(norm2(x))))``."""

    def forward(self, x, attn_mask=None, is_causal=False):
        state = ctx.begin(index, x)
        if state is None:
            return orig.forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
        mask = _with_bias(attn_mask, state.attention_bias(x.dtype))
        ctx.attend(state, index)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=mask, is_causal=is_causal)))
        x = ctx.merge(state, index, x, lambda k: kernels.head_mean_keys(k.transpose(1, 2)))  # k: [B, H, T, d]
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return ctx.finish(state, index, x)

    return forward


def _open_clip_block(ctx: MergeContext, index: int, orig: type, block: nn.Module) -> Callable:
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
                ctx.keys = _mha_keys(self.attn, h)
        else:
            attn, ctx.keys = _mha_with_bias(self.attn, h, bias)
        x = q_x + self.ls_1(attn)
        x = ctx.merge(state, index, x, lambda k: kernels.head_mean_keys(k, heads))
        x = x + self.ls_2(self.mlp(self.ln_2(x)))
        return ctx.finish(state, index, x)

    return forward


def _mha_keys(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """``[B, T, C]`` keys of a packed ``nn.MultiheadAttention`` (rows ``C:2C`` of its in-projection)."""
    c = attn.embed_dim
    bias = None if attn.in_proj_bias is None else attn.in_proj_bias[c : 2 * c]
    return F.linear(x, attn.in_proj_weight[c : 2 * c], bias)


def _mha_with_bias(
    attn: nn.MultiheadAttention, x: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of ``x [B, T, C]`` with an additive ``[B, 1, 1, T]`` bias: ``(out [B, T, C], keys)``."""
    bsz, t, c = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(bsz, t, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, T, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.dropout if attn.training else 0.0)
    out = attn.out_proj(out.transpose(1, 2).reshape(bsz, t, c))
    return out, k.transpose(1, 2)  # keys [B, T, H, d]


@dataclasses.dataclass(frozen=True)
class Host:
    """One supported block class: its runner, where its keys come from, and what it must look like."""

    runner: Callable[[MergeContext, int, type, nn.Module], Callable]
    keys: str | None  # submodule whose output are the keys (hooked), None: the runner computes them
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
HOSTS: dict[str, Host] = {
    "transformers.models.clip.modeling_clip.CLIPEncoderLayer": Host(_hf_encoder_layer, "self_attn.k_proj", _check_hf),
    "transformers.models.siglip.modeling_siglip.SiglipEncoderLayer": Host(
        _hf_encoder_layer, "self_attn.k_proj", _check_hf
    ),
    "transformers.models.dinov2.modeling_dinov2.Dinov2Layer": Host(_dinov2_layer, "attention.k_proj", _check_hf),
    "timm.models.vision_transformer.Block": Host(_timm_block, "attn.k_norm", _check_timm),
    "open_clip.transformer.ResidualAttentionBlock": Host(_open_clip_block, None, _check_open_clip),
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
                if host.keys is not None:
                    self._handles.append(module_at(block, host.keys).register_forward_hook(ctx.key_hook))
                self._handles.append(ClassSwap(block, {"forward": host.runner(ctx, i, type(block), block)}))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()
