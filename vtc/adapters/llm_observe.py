"""Sub-block observation for ``LLM_LAYER`` methods: what each attention and MLP sub-block does to each row.

Some in-LLM signals need neither an attention map nor a layer's input, but how a sub-block changes each
token: TransPrune's token transition variation compares the normed input ``x`` of a layer's attention (and of
its MLP) with that sub-block's output ``y``. A method lists the layers it watches in
:meth:`~vtc.method.Method.llm_observe_layers`; during prefill, forward hooks on those layers' attention and MLP
modules hand ``(layer, part, x, y, valid)`` to :meth:`~vtc.method.Method.observe`, which returns one weight per
row; the weights are summed per **input row** (``row_source``, so earlier prunes do not shift them), and the
prune point reads them back for its current rows (:meth:`~vtc.contexts.LayerTokens.observed`).

The hooks read what the model computes anyway (no recomputation), never change an output, and do nothing on
decode steps or on calls vtc did not arm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

PARTS = ("attention", "mlp")


class SubBlockObserver:
    """Forward hooks on the attention and MLP modules of the observed layers of one decoder."""

    def __init__(self, decoder: Any, method: Any, call: Callable[[], Any]):
        self.decoder, self.method, self.call = decoder, method, call
        self.layers = tuple(sorted(set(method.llm_observe_layers(decoder.num_layers))))
        for layer in self.layers:
            if not 0 <= layer < decoder.num_layers:
                raise ValueError(
                    f"method {method.name!r} observes LLM layer {layer}, outside 0..{decoder.num_layers - 1}"
                )

    def install(self, skip: Callable) -> list[Any]:
        handles = []
        for layer in self.layers:
            modules = self.decoder.sub_blocks(layer)
            for part in PARTS:
                hook = skip(self._hook(layer, part))
                handles.append(modules[part].register_forward_hook(hook, with_kwargs=True))
        return handles

    def _hook(self, layer: int, part: str):
        def hook(module, args, kwargs, output):
            call = self.call()
            if call is None or call.decoding:
                return None
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                weight = self.method.observe(layer, part, x, y, call.mask2d)  # [B, L]
                self._add(call, weight.float())
            return None

        return hook

    @staticmethod
    def _add(call: Any, weight: torch.Tensor) -> None:
        """Sum ``weight [B, L]`` (current rows) into the call's per-input-row buffer."""
        source = call.row_source
        if call.observed is None:
            size = int(source.max().item()) + 1
            call.observed = torch.zeros(source.shape[0], max(size, 1), device=weight.device)
        ok = source >= 0
        index = source.clamp_min(0)
        call.observed.scatter_add_(1, index, torch.where(ok, weight, torch.zeros_like(weight)))


def observed_rows(call: Any) -> torch.Tensor:
    """``[B, L]`` the summed observations of the call's current rows (0 for rows never observed)."""
    source = call.row_source
    if call.observed is None:
        return torch.zeros(source.shape, device=source.device)
    values = call.observed.gather(1, source.clamp_min(0))
    return torch.where(source >= 0, values, torch.zeros_like(values))
