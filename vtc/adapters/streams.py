"""Side streams: tensors that ride with the visual tokens, declared once by an adapter and reduced with them.

Two kinds exist, and an adapter lists each of its tensors once (``VLMAdapter.row_streams`` /
``VLMAdapter.token_streams``); nothing else in the adapter names them:

* a :class:`RowStream` is a ``[B, L]`` call input aligned with the prompt rows (``labels``, Qwen2-VL's
  ``mm_token_type_ids``, Gemma 3's ``token_type_ids``). The rebuild gives it exactly the rows it gives the
  ids (:func:`vtc.adapters.sequence.splice`), and new padding gets the stream's ``fill``.
* a :class:`TokenStream` is a field of the model's feature output with one row per visual token, next to
  the tokens themselves (Qwen3-VL's DeepStack features: one ``[N, D]`` tensor per injection layer). It is
  split per image like the tokens, gathered with the same indices as the tokens (a kept token keeps its
  rows; a merged token gets the mean of its members' rows; a token with no source, zeros) and packed back
  into the feature output the stock model receives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..contexts import Reduction


@dataclasses.dataclass(frozen=True)
class RowStream:
    """A ``[B, L]`` call input aligned with ``input_ids``.

    Attributes:
        key: its name in the call's keyword arguments.
        fill: its value on padding rows the rebuild adds.
        required: the family cannot place visual tokens without it (the call is refused when it is missing).
    """

    key: str
    fill: int
    required: bool = False


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """A field of the feature output with one row per visual token: a tensor ``[N, ...]`` over all visual tokens
    of the call (images concatenated in order), or a list / tuple of such tensors (one per LLM layer).

    Attributes:
        field: the field's name in the feature output.
        per_item: the model's feature function has already split each tensor per image: where a tensor over
            all tokens would be, there is a tuple with one ``[n_i, ...]`` tensor per image (Qwen3-VL's
            ``get_image_features``), and the stock forward concatenates it itself.
    """

    field: str
    per_item: bool = False

    def _items(self, value: Any) -> bool:
        return self.per_item and isinstance(value, list | tuple) and all(torch.is_tensor(v) for v in value)

    def split(self, value: Any, counts: Sequence[int]) -> list[Any]:
        """Per image (``counts`` tokens each, in order), its rows of ``value``."""
        if isinstance(value, list | tuple) and not self._items(value):
            per_part = [self.split(part, counts) for part in value]
            return [type(value)(part[i] for part in per_part) for i in range(len(counts))]
        parts = list(value) if self._items(value) else list(torch.split(value, list(counts)))
        sizes = [int(p.shape[0]) for p in parts]
        if sizes != list(counts):
            raise ValueError(f"{self.field}: rows per image {sizes} do not match the visual tokens {list(counts)}")
        return parts

    def reduce(self, value: Any, red: Reduction | None) -> Any:
        """An image's rows after its reduction: the same indices as its tokens (see module docstring)."""
        if red is None:
            return value
        if isinstance(value, list | tuple):
            return type(value)(self.reduce(part, red) for part in value)
        if red.tokens is None:
            return value[red.index.to(value.device)]
        groups = red.resolve_groups(value.shape[0]).to(value.device)
        k = int(red.index.numel())
        member = groups >= 0
        sums = value.new_zeros((k, *value.shape[1:]), dtype=torch.float32)
        sums.index_add_(0, groups[member], value[member].float())
        sizes = torch.bincount(groups[member], minlength=k).clamp_min(1)
        return (sums / sizes.view(-1, *[1] * (value.dim() - 1))).to(value.dtype)

    def pack(self, items: Sequence[Any]) -> Any:
        """The field's value for images whose reduced rows are ``items`` (the inverse of :meth:`split`)."""
        first = items[0]
        if isinstance(first, list | tuple):
            return type(first)(self.pack([item[i] for item in items]) for i in range(len(first)))
        return tuple(items) if self.per_item else torch.cat(list(items))
