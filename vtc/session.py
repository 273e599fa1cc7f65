"""A compression session: what ``vtc.compress`` attaches to one model instance, and ``vtc.restore`` removes.

The model instance gets a per-instance subclass of its own class (``__class__`` swap; the upstream class
is never modified) whose ``forward`` and ``generate`` route calls with visual input through the session:

1. the adapter runs the vision tower and projector once, capturing the signals the method asked for (a
   method that merges inside the tower, ``VISION_MERGE``, gets its images back already reduced);
2. each image's keep count comes from :mod:`vtc.budget`; images with ``k == n`` pass through untouched;
3. the method reduces every other image (``PRE_LLM``);
4. the adapter rebuilds the prompt (fewer placeholders, masks, positions) and the stock ``forward`` /
   ``generate`` runs on it with the reduced features as ``mm_encoder_outputs``;
5. ``generate`` returns the caller's own prompt followed by the new tokens.

Calls without visual input go straight to the stock code.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .adapters import Adapter
from .adapters.base import padding_side
from .adapters.llm import LLMHooks, LLMPlan
from .budget import keep_count
from .config import MethodConfig
from .contexts import Reduction, Stage
from .flops import flops_summary
from .prefix import CachedPrefix
from .record import ImageRecord, Record, SampleRecord
from .registry import Method


class Session:
    def __init__(self, model: nn.Module, adapter: Adapter, method: Method, config: MethodConfig):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.config = config
        self.positions = self._resolve_positions()
        self.signals = tuple(method.vision_signals(adapter.tower_info()))
        self.record: Record | None = None
        #: caches holding a compressed prompt -> how continuations map onto them (vtc.prefix)
        self.prefixes: weakref.WeakKeyDictionary[Any, CachedPrefix] = weakref.WeakKeyDictionary()
        self._generating = 0
        self.llm = LLMHooks(adapter.decoder(), method) if Stage.LLM_LAYER in method.stages else None
        self._full_lengths: list[int] = []
        self._layer_lengths: list[list[int]] = []
        self.original_class: type = type(model)  # set again at attach()
        self._instance_forward: Callable | None = None

    def _resolve_positions(self) -> str:
        forced = self.adapter.forced_positions
        wanted = self.config.positions
        if forced is not None and wanted is not None and wanted != forced:
            raise ValueError(
                f"the {self.adapter.family} family needs positions={forced!r} (got {wanted!r}); leave positions unset"
            )
        return wanted or forced or self.method.default_positions

    # -- attach / detach ----------------------------------------------------------------------------
    def attach(self) -> None:
        self.original_class = type(self.model)
        model, session, orig = self.model, self, self.original_class
        try:
            self.adapter.install(self.signals)
            if Stage.VISION_MERGE in self.method.stages:
                self.adapter.install_merge(self.method.tower_merge, self._keep)
            if self.llm is not None:
                self.llm.install()

            @functools.wraps(orig.forward)
            def forward(this, *args, **kwargs):
                return session.forward(orig.forward.__get__(this), args, kwargs)

            @functools.wraps(orig.generate)
            def generate(this, *args, **kwargs):
                return session.generate(orig.generate.__get__(this), args, kwargs)

            namespace = {"forward": forward, "generate": generate, "__module__": orig.__module__}
            model.__class__ = type(f"Compressed{orig.__name__}", (orig,), namespace)
            # An instance-level forward (accelerate's dispatch hooks) shadows the class one: wrap it too.
            inner = model.__dict__.get("forward")
            if inner is not None:
                self._instance_forward = inner
                model.forward = functools.wraps(inner)(lambda *a, **kw: session.forward(inner, a, kw))
        except BaseException:
            self.detach()
            raise

    def _keep(self, n: int) -> int:
        return keep_count(self.config.budget, n)

    def detach(self) -> None:
        self.adapter.uninstall()
        if self.llm is not None:
            self.llm.uninstall()
        if self._instance_forward is not None:
            self.model.forward = self._instance_forward
            self._instance_forward = None
        self.model.__class__ = self.original_class

    # -- calls --------------------------------------------------------------------------------------
    def forward(self, inner: Callable, args: tuple, kwargs: dict) -> Any:
        kwargs = _bind(self.original_class.forward, args, kwargs)
        cache = _cache_of(kwargs)
        visual = self.adapter.has_visual_input(kwargs)
        prefix = self.prefixes.get(cache) if cache is not None else None
        if visual:
            _check_fresh(cache, prefix)
        elif prefix is not None and not self._generating:  # continuing a compressed prompt by hand
            return inner(**prefix.translate_forward(kwargs, cache.get_seq_length()))
        else:
            return inner(**kwargs)
        try:
            llm_kwargs = self.prepare(kwargs, for_generate=False)
            out = inner(**llm_kwargs)
        finally:
            if self.llm is not None:
                self.llm.pending = None
        out_cache = getattr(out, "cache", None)
        if out_cache is not None:
            self.prefixes[out_cache] = _prefix_of(kwargs["input_ids"], llm_kwargs)
        return out

    def generate(self, inner: Callable, args: tuple, kwargs: dict) -> Any:
        kwargs = _bind(self.original_class.generate, args, kwargs)
        if "inputs" in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        cache = _cache_of(kwargs)
        visual = self.adapter.has_visual_input(kwargs)
        prefix = self.prefixes.get(cache) if cache is not None else None
        if visual:
            _check_fresh(cache, prefix)
        elif prefix is None:
            return inner(**kwargs)
        caller_ids = kwargs.get("input_ids")
        if prefix is not None:
            llm_kwargs = prefix.translate_generate(kwargs)
        else:
            llm_kwargs = self.prepare(kwargs, for_generate=True)
        self._generating += 1  # generate's own forward calls already speak the cache's coordinates
        try:
            out = inner(**llm_kwargs)
        finally:
            self._generating -= 1
            if self.llm is not None:
                self.llm.pending = None
        raw = out if isinstance(out, torch.Tensor) else out.sequences
        restored = _restore_prompt(out, caller_ids, llm_kwargs["input_ids"].shape[1])
        out_cache = cache if cache is not None else getattr(out, "cache", None)
        if out_cache is not None and caller_ids is not None:
            sequences = restored if isinstance(restored, torch.Tensor) else restored.sequences
            self.prefixes[out_cache] = _prefix_of(caller_ids, llm_kwargs).extended(sequences, raw)
        return restored

    def prepare(self, kwargs: dict, for_generate: bool) -> dict:
        """The keyword arguments the stock ``forward`` / ``generate`` receives for this call (and the record)."""
        adapter = self.adapter
        adapter.check_call(kwargs)
        start = time.perf_counter()
        adapter.signal_seconds = adapter.model_seconds = 0.0
        with torch.no_grad():
            encoded = adapter.encode(kwargs, self.signals)
            reductions: list[Reduction | None] = []
            pre_llm = Stage.PRE_LLM in self.method.stages
            tower = adapter.tower_info()
            in_tower = encoded.reductions or [None] * len(encoded.images)
            for image, merged in zip(encoded.images, in_tower, strict=True):
                image.tower = tower
                if image.modality not in self.method.modalities:
                    raise ValueError(
                        f"method {self.method.name!r} compresses {' and '.join(self.method.modalities)} inputs, "
                        f"not {image.modality}s"
                    )
                if merged is not None:  # already reduced inside the vision tower (VISION_MERGE)
                    image.k = int(merged.index.numel())
                    _check_reduction(self.method.name, image.n, image.k, merged)
                    reductions.append(merged)
                    continue
                image.k = keep_count(self.config.budget, image.n) if pre_llm else image.n
                if image.k >= image.n:
                    reductions.append(None)
                    continue
                reductions.append(self._reduce(image))
            if all(r is None for r in reductions):
                out, rebuilt = adapter.passthrough(kwargs, encoded), None
            else:
                rebuilt = adapter.rebuild(kwargs, encoded, reductions, self.positions, for_generate)
                out = rebuilt.kwargs
            self.record = self._make_record(encoded, reductions, rebuilt, kwargs, 0.0)
            self.record.seconds_in_vtc = self._elapsed(start)
            # a full budget turns every stage off, in-LLM ones included (budget=1.0 is the untouched model)
            full = all(keep_count(self.config.budget, image.n) >= image.n for image in encoded.images)
            if self.llm is not None and not full:
                self.llm.pending = self._llm_plan(out, encoded, reductions, for_generate)
        return out

    def _reduce(self, image) -> Reduction:
        """Run the method on one image under the newline policy (MethodConfig.newlines)."""
        newline = image.layout.is_newline().to(image.tokens.device)
        policy = self.config.newlines or self.method.default_newlines
        if policy == "candidates" or not bool(newline.any()):
            red = self.method.reduce(image)
            _check_reduction(self.method.name, image.n, image.k, red)
            return red
        patches = torch.nonzero(~newline).flatten()
        part = image.subset(patches)
        red = self.method.reduce(part)
        _check_reduction(self.method.name, part.n, part.k, red)
        red = red.lift(patches, image.n)
        return _keep_rows(red, newline, image.tokens) if policy == "keep_rows" else red

    def _llm_plan(self, out: dict, encoded, reductions, for_generate: bool) -> LLMPlan:
        """Where each image's rows sit in the sequence the LLM receives, for the in-LLM hooks."""
        ids = out["input_ids"]
        mask = out.get("attention_mask")
        visual = self.adapter.visual_rows(ids)
        row_image = torch.full(ids.shape, -1, dtype=torch.long, device=ids.device)
        row_token = torch.full_like(row_image, -1)
        order = sorted(range(len(encoded.images)), key=lambda j: encoded.spans[j])
        cursor = [0] * ids.shape[0]
        rows = [torch.nonzero(visual[b]).flatten() for b in range(ids.shape[0])]
        for j in order:
            b = encoded.spans[j][0]
            red = reductions[j]
            tokens = torch.arange(encoded.images[j].n) if red is None else red.index.cpu()
            r = rows[b][cursor[b] : cursor[b] + len(tokens)]
            row_image[b, r] = j
            row_token[b, r] = tokens.to(ids.device)
            cursor[b] += len(tokens)
        source = torch.tensor([s.source_positions for s in self.record.samples], device=ids.device)
        return LLMPlan(
            visual=visual,
            row_source=source,
            row_image=row_image,
            row_token=row_token,
            positions=self.positions,
            side=padding_side(mask, for_generate),
            on_prune=self._on_prune,
        )

    def _on_prune(self, call, layer: int, seconds: float) -> None:
        """Record what survives an in-LLM prune point (kept tokens, counts, per-layer lengths, FLOPs, time)."""
        rec = self.record
        if rec is None:
            return
        rec.seconds_in_vtc += seconds
        valid = call.mask2d & (call.row_image >= 0)
        for j, im in enumerate(rec.images):
            tokens = call.row_token[valid & (call.row_image == j)]
            im.layers[str(layer)] = sorted(tokens.tolist())
            im.counts[f"llm_layer_{layer}"] = int(tokens.numel())
        for b, sample in enumerate(rec.samples):  # the rows a forward's logits now stand for
            sample.source_positions = call.row_source[b].tolist()
            sample.output_length = int(call.mask2d[b].sum())
        n_layers = len(rec.visual_per_layer[0]) if rec.visual_per_layer else 0
        vis = (call.mask2d & call.visual).sum(1).tolist()
        lengths = call.mask2d.sum(1).tolist()
        for b in range(len(rec.visual_per_layer)):
            for layer_idx in range(layer, n_layers):
                rec.visual_per_layer[b][layer_idx] = int(vis[b])
                self._layer_lengths[b][layer_idx] = int(lengths[b])
        rec.flops = flops_summary(self.adapter.text_config(), self._full_lengths, self._layer_lengths)

    def _elapsed(self, start: float) -> float:
        """vtc's own time in this call: everything since ``start`` (encode set-up, signal computations in the
        tower's hooks, selection, rebuild, record) except the model's own feature computation."""
        adapter = self.adapter
        return time.perf_counter() - start - adapter.model_seconds + adapter.signal_seconds

    def _make_record(self, encoded, reductions, rebuilt, kwargs: dict, seconds: float) -> Record:
        images = []
        for image, red in zip(encoded.images, reductions, strict=True):
            n = image.n
            if red is None:
                kept, groups, scores = list(range(n)), list(range(n)), None
            else:
                kept = red.index.tolist()
                groups = red.resolve_groups(n).tolist()
                scores = None if red.scores is None else red.scores.float().tolist()
            images.append(
                ImageRecord(
                    sample=image.sample,
                    image=image.image,
                    grids=[list(g) for g in image.layout.grids],
                    prefix=image.layout.prefix,
                    partition=image.layout.partition.tolist(),
                    slot=image.layout.slot.tolist(),
                    kept=kept,
                    groups=groups,
                    scores=scores,
                    counts={"input": n, "pre_llm": len(kept)},
                    newlines=_newline_counts(image, kept),
                    modality=image.modality,
                    arrangement=list(image.layout.arrangement) if image.layout.arrangement else None,
                )
            )
        samples = []
        if rebuilt is not None:
            for b, (src, pos) in enumerate(zip(rebuilt.source_positions, rebuilt.position_ids, strict=True)):
                lengths = int(rebuilt.input_lengths[b]), int(rebuilt.output_lengths[b])
                samples.append(SampleRecord(b, *lengths, src, pos))
            full, kept = list(rebuilt.input_lengths), list(rebuilt.output_lengths)
        else:
            mask = kwargs.get("attention_mask")
            ids = kwargs["input_ids"]
            full = (mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
            kept = list(full)
            rows = list(range(ids.shape[1]))
            samples = [SampleRecord(b, int(n), int(n), rows, []) for b, n in enumerate(full)]
        num_layers = int(self.adapter.text_config().num_hidden_layers)
        self._full_lengths = [int(n) for n in full]
        self._layer_lengths = [[int(n)] * num_layers for n in kept]
        visual = [sum(len(im.kept) for im in images if im.sample == b) for b in range(len(full))]
        return Record(
            method=self.method.name,
            config=self.config.to_dict(),
            family=self.adapter.family,
            positions=self.positions,
            images=images,
            samples=samples,
            flops=flops_summary(self.adapter.text_config(), self._full_lengths, self._layer_lengths),
            seconds_in_vtc=seconds,
            visual_per_layer=[[v] * num_layers for v in visual],
        )


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


def _cache_of(kwargs: dict) -> Any:
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _check_fresh(cache: Any, prefix: CachedPrefix | None) -> None:
    if prefix is not None or (cache is not None and cache.get_seq_length() > 0):
        raise ValueError(
            "vtc compresses images at prefill: a call with images on a cache that already holds tokens is not "
            "supported; start from an empty cache, or continue the cached conversation without new images"
        )


def _prefix_of(caller_ids: torch.Tensor, llm_kwargs: dict) -> CachedPrefix:
    ids = llm_kwargs["input_ids"]
    mask = llm_kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    return CachedPrefix(caller_ids, ids, mask, llm_kwargs.get("position_ids"))


def _newline_counts(image, kept: list[int]) -> dict[str, int]:
    """Separator tokens in the input and among the kept tokens (budgets with and without them)."""
    newline = image.layout.is_newline()
    if not bool(newline.any()):
        return {}
    return {"input": int(newline.sum()), "pre_llm": sum(1 for i in kept if i >= 0 and bool(newline[i]))}


def _keep_rows(red: Reduction, newline: torch.Tensor, tokens: torch.Tensor) -> Reduction:
    """Add the separator after every row that still has a kept token (``newlines="keep_rows"``).

    Selections in token order get the separators at their place in the sequence; other outputs (merges,
    selections in a method's own order) get them appended at the end, which is where OneVision's single
    video separator sits.
    """
    groups = red.resolve_groups(newline.numel())
    kept = groups >= 0
    extra, start = [], 0
    for i in torch.nonzero(newline).flatten().tolist():
        if bool(kept[start:i].any()):
            extra.append(i)
        start = i + 1
    extra = torch.tensor(extra, dtype=torch.long, device=red.index.device)
    if red.tokens is None:
        index = torch.cat([red.index, extra])
        ascending = bool((red.index[1:] > red.index[:-1]).all())
        return Reduction(index=torch.sort(index).values if ascending else index, scores=red.scores)
    groups = groups.clone()
    groups[extra] = red.index.numel() + torch.arange(extra.numel(), device=groups.device)
    return Reduction(
        index=torch.cat([red.index, extra]),
        tokens=torch.cat([red.tokens, tokens[extra].to(red.tokens.dtype)]),
        groups=groups,
        scores=red.scores,
    )


def _check_reduction(name: str, n: int, k: int, red: Reduction) -> None:
    """Enforce the budget invariant: exactly ``k`` output tokens with valid anchors."""
    count = int(red.index.numel())
    if count != k:
        raise RuntimeError(
            f"method {name!r} returned {count} tokens for an image with budget k={k} (bug in the method)"
        )
    if red.index.numel() and (int(red.index.max()) >= n or int(red.index.min()) < -1):
        raise RuntimeError(f"method {name!r} returned token indices outside [-1, {n})")
    if red.tokens is None:
        if bool((red.index < 0).any()) or torch.unique(red.index).numel() != count:
            raise RuntimeError(f"method {name!r} returned repeated or missing token indices")
    elif red.tokens.shape[0] != k:
        raise RuntimeError(f"method {name!r} returned {red.tokens.shape[0]} merged tokens for k={k}")


def _restore_prompt(out: Any, prompt: torch.Tensor | None, compressed_len: int) -> Any:
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
