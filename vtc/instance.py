"""The one-off class a compressed model instance gets, and what it answers besides calls.

:func:`swap_class` gives the instance a subclass of its own class (the upstream class is never modified) that

* routes ``forward`` and ``generate`` through the session (vision-language models; a standalone vision
  transformer's blocks merge in every call and need no routing);
* answers ``copy.deepcopy`` with :func:`deep_copy`: a deep copy of the *stock* model, compressed the same way by
  a session of its own (known to ``vtc.restore``, sharing nothing with the original);
* tells ``torch.compile(model, fullgraph=True)`` why a compressed model cannot be one graph
  (:data:`COMPILE_NOTE`). Without ``fullgraph``, ``torch.compile(model)`` works: vtc's steps (plain Python over
  each call's shapes) run as they are and the stock code between them is compiled.
"""

from __future__ import annotations

import copy
import functools
import types
from typing import Any

import torch
from torch import nn

#: why ``torch.compile(model, fullgraph=True)`` on a compressed model fails, and what works instead
COMPILE_NOTE = (
    "a vtc-compressed model rebuilds the prompt of every call in Python, so it cannot be one graph: use "
    "torch.compile(model) without fullgraph=True (the stock code is compiled between vtc's steps), or compile the "
    "language model alone, model.model.language_model.compile(fullgraph=True), with a method that acts before the "
    "LLM (docs/design.md, 'torch.compile, deepcopy, gradients')"
)


def swap_class(session: Any) -> None:
    """Give ``session.model`` its one-off subclass (``session.original_class`` stays the class to restore)."""
    model, base = session.model, type(session.model)

    def __deepcopy__(this, memo):
        return deep_copy(session, memo)

    namespace: dict[str, Any] = {"__module__": base.__module__, "__deepcopy__": __deepcopy__}
    if session.adapter.routes_calls:
        orig = session.original_class

        @functools.wraps(orig.forward)
        def forward(this, *args, **kwargs):
            if torch.compiler.is_compiling():  # torch.compile(model): vtc's own steps run eagerly
                torch._dynamo.graph_break(msg=COMPILE_NOTE)
            return session.forward(types.MethodType(orig.forward, this), args, kwargs)

        @functools.wraps(orig.generate)
        def generate(this, *args, **kwargs):
            return session.generate(types.MethodType(orig.generate, this), args, kwargs)

        namespace.update(forward=forward, generate=generate)
    model.__class__ = type(f"Compressed{base.__name__}", (base,), namespace)


def deep_copy(session: Any, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy`` of a compressed model: the stock model copied, then compressed with the same config.

    Nothing of vtc is copied: the hook dicts of the copy hold only the entries that are not vtc's, swapped
    classes are the modules' own, and the copy gets a session of its own.
    """
    from .api import compress  # the api imports the session, which imports this module

    model, stock = session.model, session.original_class
    clone = stock.__new__(stock)
    memo[id(model)] = clone
    for patched, original in session.adapter.stock_view():
        if isinstance(original, type):
            memo[id(patched)] = original
        else:  # a hook dict: its entries that are not vtc's, copied like the rest of the model
            hooks = type(original)()
            memo[id(patched)] = hooks
            hooks.update(copy.deepcopy(dict(original), memo))
    state = dict(model.__dict__)
    if session.instance_forward is not None:
        state["forward"] = session.instance_forward
    clone.__setstate__(copy.deepcopy(state, memo))
    return compress(clone, copy.deepcopy(session.config))
