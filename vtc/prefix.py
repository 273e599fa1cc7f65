"""Continuing from a cache that holds a compressed prompt (multi-turn chat, manual decoding loops).

After a compressed call the KV cache holds the *compressed* prompt (fewer visual rows, possibly other
positions), while the caller holds the *original* ids (``generate`` hands back the original prompt). A
later call on the same cache speaks in the caller's coordinates. :class:`CachedPrefix` remembers both
views of what the cache holds and maps such a call onto the cache:

* ``generate(input_ids=previous_output + new_turn, cache=cache)``: the part of ``input_ids`` that equals the
  previous output is replaced by its compressed form (so HF's "skip what the cache holds" slicing lands
  on the new tokens), the attention mask likewise, and under ``"original"`` positions explicit position ids
  continue from the original numbering. The result again starts with the caller's own ids.
* ``forward(input_ids=new_tokens, cache=cache)``: a mask in the caller's coordinates is mapped onto the
  cache, and under ``"original"`` positions the new tokens get their original position ids.

New images in a continuation are refused with a clear error (their placeholders would have to be
compressed against a prompt that is already cached).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class CachedPrefix:
    """What a cache holds, in the caller's coordinates and in the LLM's.

    Attributes:
        original: ``[B, L]`` the ids the caller holds for the cached sequence (plus, after ``generate``, the
            last generated token, which the cache does not hold yet).
        compressed: ``[B, L']`` the same sequence as the LLM saw it.
        mask: ``[B, L']`` its attention mask.
        positions: ``[..., B, L']`` explicit position ids the LLM used, or None when they were the model's
            default (the mask's cumulative sum in ``generate``).
    """

    original: torch.Tensor
    compressed: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor | None

    @classmethod
    def of(cls, caller_ids: torch.Tensor, llm_kwargs: dict[str, Any]) -> CachedPrefix:
        """What a cache holds after a compressed call: ``caller_ids`` as the caller sent them, ``llm_kwargs`` as
        the stock model received them."""
        ids = llm_kwargs["input_ids"]
        mask = llm_kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        return cls(caller_ids, ids, mask, llm_kwargs.get("position_ids"))

    def translate_generate(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        ids = kwargs.get("input_ids")
        length = self.original.shape[1]
        if ids is None or ids.shape[1] < length or not torch.equal(ids[:, :length].to(self.original), self.original):
            raise ValueError(
                "this cache holds a vtc-compressed prompt: continue it with input_ids that start with the previous "
                "generate() output (prompt + generated tokens) and append the new turn"
            )
        if kwargs.get("position_ids") is not None:
            raise ValueError("pass no position_ids when continuing a vtc-compressed cache: vtc supplies them")
        new = ids[:, length:]
        mask = kwargs.get("attention_mask")
        new_mask = torch.ones_like(new) if mask is None else mask[:, length:].to(self.mask)
        out = dict(kwargs)
        out["input_ids"] = torch.cat([self.compressed.to(ids), new], dim=1)
        out["attention_mask"] = torch.cat([self.mask, new_mask], dim=1)
        if self.positions is not None:
            out["position_ids"] = torch.cat([self.positions, self._next_positions(new_mask, 0)], dim=-1)
        return out

    def translate_forward(self, kwargs: dict[str, Any], cached: int) -> dict[str, Any]:
        """``cached``: entries the cache holds now (at its first layer)."""
        out = dict(kwargs)
        extra = cached - self.compressed.shape[1]  # tokens appended since the compressed call
        ids = kwargs.get("input_ids")
        q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape[1] == self.original.shape[1] + extra + q:
            mask = torch.cat([self.mask, mask[:, self.original.shape[1] :].to(self.mask)], dim=1)
            out["attention_mask"] = mask
        if self.positions is not None and kwargs.get("position_ids") is None:
            new_mask = torch.ones(self.mask.shape[0], extra + q, dtype=self.mask.dtype, device=self.mask.device)
            out["position_ids"] = self._next_positions(new_mask, 0)[..., extra:]
        return out

    def _next_positions(self, new_mask: torch.Tensor, offset: int) -> torch.Tensor:
        last = self.positions[..., -1:]
        return last + offset + torch.cumsum(new_mask.to(last.dtype), dim=-1)

    def extended(self, original: torch.Tensor, compressed: torch.Tensor) -> CachedPrefix:
        """The prefix after ``generate`` appended tokens: both views grow by the same new tokens."""
        added = compressed.shape[1] - self.compressed.shape[1]
        ones = torch.ones(self.mask.shape[0], added, dtype=self.mask.dtype, device=self.mask.device)
        positions = None if self.positions is None else torch.cat([self.positions, self._next_positions(ones, 0)], -1)
        return CachedPrefix(original, compressed, torch.cat([self.mask, ones], dim=1), positions)


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache a call continues (``cache`` or its older name ``past_key_values``), or None."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def check_fresh(cache: Any, prefix: CachedPrefix | None) -> None:
    """Refuse images on a cache that already holds tokens (they are compressed at prefill only)."""
    if prefix is not None or (cache is not None and cache.get_seq_length() > 0):
        raise ValueError(
            "vtc compresses images at prefill: a call with images on a cache that already holds tokens is not "
            "supported; start from an empty cache, or continue the cached conversation without new images"
        )


def restore_prompt(out: Any, prompt: torch.Tensor | None, compressed_len: int) -> Any:
    """Swap the compressed prompt at the head of generate's output for the caller's own prompt."""
    if prompt is None:
        return out
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    rows = sequences.shape[0]
    head = prompt.repeat_interleave(rows // prompt.shape[0], dim=0) if rows != prompt.shape[0] else prompt
    fixed = torch.cat([head.to(sequences.device), sequences[:, compressed_len:]], dim=1)
    if isinstance(out, torch.Tensor):
        return fixed
    out.sequences = fixed
    return out
