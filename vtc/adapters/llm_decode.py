"""Decode-time selection at the ``LLM_LAYER`` hook point (DyCoke's dynamic KV pruning): at every decode step, which
cached visual rows the layers from the method's decode layer on may attend to (:mod:`vtc.adapters.llm_hooks`)."""

from __future__ import annotations

from typing import Any

import torch

from ..contexts import DecodeTokens
from .llm import Decoder
from .llm_state import Prefill


def decode_select(method: Any, decoder: Decoder, call: Prefill, idx: int, hidden: torch.Tensor) -> None:
    """Decode-time selection (DyCoke's dynamic KV pruning): which cached visual rows layers >= idx see."""
    x, cos, sin, _ = call.stash[idx - 1]
    bsz = x.shape[0]
    keys = call.cache.layers[idx - 1].keys  # [B, Hkv, S, d], RoPE already applied
    probs = decoder.decode_attention(idx - 1, x, cos, sin, keys, call.call_mask)  # [B, S]
    visual = [torch.nonzero(call.plan.visual[b]).flatten() for b in range(bsz)]
    ctx = DecodeTokens(
        layer=idx,
        visual=visual,
        attention=[probs[b, v] for b, v in enumerate(visual)],
        n_input=[int(v.numel()) for v in visual],
        state=call.method_state,
    )
    keep = method.decode_select(ctx)
    call.decode_masks = {}
    if keep is None:
        call.decode_keep = call.decode_drop = None
        return
    drop = torch.zeros(bsz, keys.shape[-2], dtype=torch.bool, device=hidden.device)
    for b, (rows, k) in enumerate(zip(visual, keep, strict=True)):
        drop[b, rows] = True
        drop[b, k] = False
    call.decode_keep, call.decode_drop = keep, drop
