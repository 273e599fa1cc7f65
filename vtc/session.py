"""A compression session: what ``vtc.compress`` attaches to one model instance, and ``vtc.restore`` removes.

The session is thin: the adapter installs every hook point it owns (vision signals, token merging in the
tower, the LLM-layer hooks), :mod:`vtc.reduce` runs the method on each image, :mod:`vtc.record` builds the
record, and :mod:`vtc.prefix` maps continuations onto a cache that holds a compressed prompt. What is left
here is routing.

The instance gets a per-instance subclass of its own class (:mod:`vtc.instance`; the upstream class is never
modified); for a vision-language model its ``forward`` and ``generate`` route calls with visual input through
:meth:`Session.prepare`:

1. the adapter runs the vision tower and projector once, capturing the signals the method asked for (a
   method that merges inside the tower, ``VISION_MERGE``, gets its images back already reduced);
2. the reducer gives each image its keep count and runs the method (``PRE_LLM``);
3. the adapter rebuilds the prompt (fewer placeholders, masks, positions) and arms its LLM-layer hooks; the
   stock ``forward`` / ``generate`` runs on it with the reduced features as ``mm_encoder_outputs``;
4. ``generate`` returns the caller's own prompt followed by the new tokens.

Calls without visual input go straight to the stock code. With gradients enabled the kept tokens carry them
(back through the projector and the tower; a selection itself has none); a compressed ``forward`` with
``labels`` computes its loss on the rows its logits have, also after rows were dropped inside the LLM.

A standalone vision transformer (timm, open_clip) needs no routing: its adapter's block runners merge tokens
in every call.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import MethodConfig
from .contexts import Stage
from .instance import swap_class
from .method import Method
from .prefix import CachedPrefix, cache_of, check_fresh, restore_prompt
from .record import Record, Recorder
from .reduce import Reducer


class Session:
    """One method on one model instance. ``adapter`` is the family adapter from :func:`vtc.adapters.adapter_for`."""

    def __init__(self, model: nn.Module, adapter: Any, method: Method, config: MethodConfig, kv: Any = None):
        self.model = model
        self.kv = kv  # the KV-cache stage's hooks (vtc.adapters.llm_kv), or None
        self.adapter = adapter
        self.method = method
        self.config = config
        #: position policies of the prompt the LLM receives and of the rows left inside the LLM
        self.positions, self.llm_positions = self._resolve_positions()
        inner = self.llm_positions if Stage.LLM_LAYER in method.stages else None
        self.recorder = Recorder(method.name, config, adapter.family, self.positions, adapter.text_config, inner)
        self.reducer = Reducer(method, config)
        #: caches holding a compressed prompt -> how continuations map onto them (vtc.prefix)
        self.prefixes: weakref.WeakKeyDictionary[Any, CachedPrefix] = weakref.WeakKeyDictionary()
        self._generating = 0
        # set here, not at import: torch.compiler.disable imports dynamo (and triton), which `import vtc` must not
        self._prepare = torch.compiler.disable(lambda kwargs, for_generate: self.prepare(kwargs, for_generate))
        self.original_class: type = type(model)  # set again at attach()
        #: the model's own instance-level forward, when it has one (wrapped while compressed)
        self.instance_forward: Callable | None = None
        adapter.configure(method, method.tower_count, self.recorder)

    @property
    def record(self) -> Record | None:
        """The record of the last compressed call (None before the first one)."""
        return self.recorder.record

    def _resolve_positions(self) -> tuple[str, str]:
        forced, wanted = self.adapter.forced_positions, self.config.positions
        stages = wanted if isinstance(wanted, dict) else {"pre_llm": wanted, "llm_layer": wanted}
        if forced is not None and any(v not in (None, forced) for v in stages.values()):
            raise ValueError(
                f"the {self.adapter.family} family needs positions={forced!r} (got {wanted!r}); leave positions unset"
            )
        prompt = stages.get("pre_llm") or forced or self.method.default_positions
        inner = stages.get("llm_layer") or forced or self.method.default_llm_positions or self.method.default_positions
        return prompt, inner

    # -- attach / detach ----------------------------------------------------------------------------
    def attach(self) -> None:
        self.original_class = type(self.model)
        try:
            self.adapter.install()
            if self.kv is not None:
                self.kv.install()
            swap_class(self)
            # An instance-level forward (accelerate's dispatch hooks) shadows the class one: wrap it too.
            inner = self.model.__dict__.get("forward") if self.adapter.routes_calls else None
            if inner is not None:
                self.instance_forward = inner
                self.model.forward = functools.wraps(inner)(lambda *a, **kw: self.forward(inner, a, kw))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        self.adapter.uninstall()
        if self.kv is not None:
            self.kv.uninstall()
        if self.instance_forward is not None:
            self.model.forward = self.instance_forward
            self.instance_forward = None
        self.model.__class__ = self.original_class

    # -- calls --------------------------------------------------------------------------------------
    def forward(self, inner: Callable, args: tuple, kwargs: dict) -> Any:
        kwargs = _bind(self.original_class.forward, args, kwargs)
        cache = cache_of(kwargs)
        visual = self.adapter.has_visual_input(kwargs)
        prefix = self.prefixes.get(cache) if cache is not None else None
        if visual:
            check_fresh(cache, prefix)
        elif prefix is not None and not self._generating:  # continuing a compressed prompt by hand
            return inner(**prefix.translate_forward(kwargs, cache.get_seq_length()))
        else:
            return inner(**kwargs)
        try:
            llm_kwargs = self._prepare(kwargs, for_generate=False)
            # rows dropped inside the LLM leave fewer logits than labels: the loss is taken on the rows left
            labels = llm_kwargs.pop("labels", None) if self.adapter.prunes_in_llm else None
            out = inner(**llm_kwargs)
        finally:
            self.adapter.end_call()
        if labels is not None and hasattr(out, "logits"):
            rows = self.record.take_rows(kwargs["labels"], fill=-100)
            extra = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
            out.loss = self.model.loss_function(out.logits, rows, self.adapter.text_config().vocab_size, **extra)
        out_cache = getattr(out, "cache", None)
        if out_cache is not None:
            self.prefixes[out_cache] = CachedPrefix.of(kwargs["input_ids"], llm_kwargs)
        return out

    def generate(self, inner: Callable, args: tuple, kwargs: dict) -> Any:
        kwargs = _bind(self.original_class.generate, args, kwargs)
        if "inputs" in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        cache = cache_of(kwargs)
        visual = self.adapter.has_visual_input(kwargs)
        prefix = self.prefixes.get(cache) if cache is not None else None
        if visual:
            check_fresh(cache, prefix)
        elif prefix is None:
            return inner(**kwargs)
        caller_ids = kwargs.get("input_ids")
        if prefix is not None:
            llm_kwargs = prefix.translate_generate(kwargs)
        else:
            llm_kwargs = self._prepare(kwargs, for_generate=True)
            if _copies(kwargs, self.model) > 1:
                self.adapter.check_expandable(llm_kwargs)
        self._generating += 1  # generate's own forward calls already speak the cache's coordinates
        try:
            out = inner(**llm_kwargs)
        finally:
            self._generating -= 1
            self.adapter.end_call()
        raw = out if isinstance(out, torch.Tensor) else out.sequences
        restored = restore_prompt(out, caller_ids, llm_kwargs["input_ids"].shape[1])
        out_cache = cache if cache is not None else getattr(out, "cache", None)
        if out_cache is not None and caller_ids is not None:
            sequences = restored if isinstance(restored, torch.Tensor) else restored.sequences
            self.prefixes[out_cache] = CachedPrefix.of(caller_ids, llm_kwargs).extended(sequences, raw)
        return restored

    def prepare(self, kwargs: dict, for_generate: bool) -> dict:
        """The keyword arguments the stock ``forward`` / ``generate`` receives for this call (and the record).

        Plain Python over each call's shapes: calls run it as ``_prepare``, which ``torch.compile`` runs as it is
        (the stock code around it is compiled).
        """
        adapter = self.adapter
        adapter.check_call(kwargs)
        timer = self.recorder.timer
        timer.start()
        encoded = adapter.encode(kwargs)
        reductions = self.reducer.run(encoded.images, encoded.reductions, adapter.tower_info())
        reductions = adapter.arrange(encoded, reductions)
        if all(r is None for r in reductions):
            out, rebuilt = adapter.passthrough(kwargs, encoded), None
        else:
            rebuilt = adapter.rebuild(kwargs, encoded, reductions, self.positions, for_generate)
            out = rebuilt.kwargs
        record = self.recorder.call(encoded.images, reductions, rebuilt, kwargs)
        record.seconds_in_vtc = timer.own_seconds()
        if not self.reducer.full_budget(encoded.images):  # budget=1.0 turns in-LLM stages off too
            sources = [s.source_positions for s in record.samples]
            adapter.plan_llm(out, encoded, reductions, sources, self.llm_positions, for_generate)
        return out


def _copies(kwargs: dict, model: nn.Module) -> int:
    """How many rows ``generate`` makes of every prompt (beams times returned sequences, at least)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1) or 1
    return int(beams) * int(returned)


def _bind(fn: Callable, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of a stock forward/generate call, turned into keywords."""
    if not args:
        return dict(kwargs)
    names = [p for p in inspect.signature(fn).parameters if p != "self"]
    out = dict(zip(names, args, strict=False))
    overlap = set(out) & set(kwargs)
    if overlap:
        raise TypeError(f"got multiple values for argument(s) {sorted(overlap)}")
    out.update(kwargs)
    return out
