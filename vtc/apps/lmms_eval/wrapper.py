"""The piece every vtc lmms-eval wrapper shares: take vtc's arguments, build the upstream wrapper, compress.

``class VtcLlavaHf(VtcWrapper, LlavaHf)`` is the whole of a wrapper: :class:`VtcWrapper` comes first in the
MRO, so its ``__init__`` takes ``method``, ``budget``, method options and ``strict`` off the keyword arguments
(:mod:`.args`), lets lmms-eval's own class load the model, processor and prompts from the rest, and then
calls ``vtc.compress`` on the loaded Hugging Face model. Prompts, chat templates, image handling and
decoding are the upstream wrapper's, byte for byte, which is what makes ``method=none`` a fair baseline.

Around the upstream ``generate_until`` the mixin adds, for the duration of the call only, an instance-level
``generate`` on the model (removed afterwards; vtc's own ``__class__`` swap is left alone) that

* re-raises any exception from ``generate`` past the upstream ``try/except Exception`` that would turn it
  into an empty answer (``strict``, the default);
* reads each call's prefill length, the compressed one from :func:`vtc.last_record`, and reports it per
  request as ``TokenCounts.input_tokens``, the field lmms-eval writes to the samples and sums in its
  efficiency summary.

To know which request each row of a ``generate`` batch belongs to (upstream sorts and batches requests), each
request's document function (``doc_to_visual`` / ``doc_to_messages``) is wrapped so that calling it notes the
request; upstream calls it for the documents of a batch, in batch order, right before their ``generate``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from loguru import logger
from torch import nn

from ...api import compress, is_compressed, last_record
from ...budget import describe_budget
from ...config import MethodConfig
from ...record import Record
from .args import VtcArgs, split_args

__all__ = ["VtcWrapper"]

_MISSING = object()


class _Abort(BaseException):
    """Carries an exception out of ``generate`` past upstream's ``except Exception``; never leaves the mixin."""

    def __init__(self, error: Exception):
        super().__init__(repr(error))
        self.error = error


class VtcWrapper:
    """Mixin placed before an lmms-eval model wrapper class; see the module docstring.

    Attributes:
        vtc_args: the parsed vtc arguments (``vtc_args.config`` is None for ``method=none``).
    """

    vtc_args: VtcArgs

    def __init__(self, **kwargs: Any) -> None:
        vtc_args, upstream = split_args(kwargs, _named_params(super().__init__))
        super().__init__(**self.upstream_defaults(upstream))
        self.vtc_args = vtc_args
        #: visual tokens in and kept, and generate calls with visual input, over the wrapper's life
        self._visual: Counter[str] = Counter()
        config = vtc_args.config
        if config is None:
            logger.info("vtc: method=none, the model runs uncompressed")
            return
        if config.budget == 1 and isinstance(config.budget, int):
            logger.warning("vtc: budget=1 keeps one visual token per image; budget=1.0 keeps all of them")
        compress(self.model, config)
        options = {k: v for k, v in config.to_dict().items() if k != "budget" and v is not None}
        logger.info(f"vtc: compressing with {config.method!r}, budget {describe_budget(config.budget)}, {options}")

    def upstream_defaults(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Upstream keyword arguments after a wrapper's own defaults (override to fix an upstream default)."""
        return kwargs

    @property
    def vtc_config(self) -> MethodConfig | None:
        """The method config applied to the model; None when it runs uncompressed (``method=none``)."""
        return self.vtc_args.config

    # -- lmms-eval request types -------------------------------------------------------------------
    def generate_until(self, requests: list) -> list:
        """Upstream ``generate_until``, strict about errors, with each request's prefill length reported."""
        tracker = _PrefillTracker()
        slot = 2 if self.is_simple else 1  # doc_to_visual in simple requests, doc_to_messages in chat ones
        tracked = [tracker.track(request, i, slot) for i, request in enumerate(requests)]
        error: Exception | None = None
        with self._watch_generate(tracker):
            try:
                results = super().generate_until(tracked)
            except _Abort as abort:
                error = abort.error
        if error is not None:
            raise error  # outside the except block: the original exception and traceback, nothing chained
        if tracker.unmatched:
            logger.warning(
                f"vtc: {tracker.unmatched} generate call(s) could not be matched to their requests; "
                f"their input_tokens are not reported"
            )
        self._log_visual()
        return tracker.report(results)

    def loglikelihood(self, requests: list) -> list:
        """Upstream ``loglikelihood``; under compression the logits come back in the caller's input rows.

        vtc's compressed ``forward`` returns logits for the shorter sequence (and computes the loss on the
        labels it carried along); upstream slices logits by input position to check greedy tokens, so each
        row is put back at the input position it stands for. Rows of dropped visual tokens are zeros.
        """
        if self.vtc_args.config is None:
            return super().loglikelihood(requests)
        with _logits_in_input_rows(self.model):
            return super().loglikelihood(requests)

    # -- internals ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _watch_generate(self, tracker: _PrefillTracker) -> Iterator[None]:
        model = self.model
        previous = model.__dict__.get("generate", _MISSING)
        inner = type(model).generate.__get__(model) if previous is _MISSING else previous
        strict = self.vtc_args.strict

        @functools.wraps(inner)
        def generate(*args: Any, **kwargs: Any) -> Any:
            before = _current_record(model)
            try:
                out = inner(*args, **kwargs)
            except Exception as exc:
                tracker.failed()
                if strict:
                    raise _Abort(exc) from exc
                raise
            record = _current_record(model)
            if record is not None and record is not before:
                tracker.generated([s.output_length for s in record.samples])
                self._visual.update(record.visual_tokens, calls=1)
            else:
                tracker.generated(_plain_lengths(args, kwargs))
            return out

        with _instance_override(model, "generate", generate):
            yield

    def _log_visual(self) -> None:
        total, kept, calls = self._visual["input"], self._visual["kept"], self._visual["calls"]
        if calls and self.vtc_args.config is not None:
            share = kept / total if total else 1.0
            logger.info(
                f"vtc {self.vtc_args.config.method}: {kept} of {total} visual tokens reached the LLM ({share:.1%}) "
                f"over {calls} generate call(s) with visual input"
            )


class _PrefillTracker:
    """Matches the rows of each ``generate`` call to the requests whose documents were just prepared."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.lengths: dict[int, int] = {}
        self.unmatched = 0

    def track(self, request: Any, index: int, slot: int) -> Any:
        """A shallow copy of ``request`` whose document function notes ``index`` when upstream calls it."""
        args = list(request.args)
        if len(args) <= slot or not callable(args[slot]):
            return request
        fn: Callable = args[slot]
        pending = self.pending

        @functools.wraps(fn)
        def noting(*a: Any, **kw: Any) -> Any:
            if index not in pending:
                pending.append(index)
            return fn(*a, **kw)

        args[slot] = noting
        clone = copy.copy(request)
        clone.arguments = tuple(args)
        return clone

    def generated(self, lengths: list[int]) -> None:
        """One ``generate`` call ran with these per-row prefill lengths."""
        if len(lengths) == len(self.pending):
            self.lengths.update(zip(self.pending, lengths, strict=True))
        else:
            self.unmatched += 1
        self.pending.clear()

    def failed(self) -> None:
        """The ``generate`` call for the pending requests raised: they get no prefill length."""
        self.pending.clear()

    def report(self, results: list) -> list:
        """Upstream's results with ``input_tokens`` set where the prefill length is known."""
        from lmms_eval.api.instance import GenerationResult, TokenCounts

        out = []
        for i, result in enumerate(results):
            n = self.lengths.get(i)
            if n is None:
                out.append(result)
            elif isinstance(result, GenerationResult):
                counts = copy.copy(result.token_counts) if result.token_counts is not None else TokenCounts()
                counts.input_tokens = n
                out.append(GenerationResult(text=result.text, token_counts=counts))
            elif isinstance(result, str):
                out.append(GenerationResult(text=result, token_counts=TokenCounts(input_tokens=n)))
            else:
                out.append(result)
        return out


def _named_params(fn: Callable) -> set[str]:
    """Keyword parameters a constructor names explicitly (not ``**kwargs``)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, p in inspect.signature(fn).parameters.items() if p.kind in kinds}


def _current_record(model: nn.Module) -> Record | None:
    if not is_compressed(model):
        return None
    try:
        return last_record(model)
    except ValueError:  # no call with visual input yet
        return None


def _plain_lengths(args: tuple, kwargs: dict[str, Any]) -> list[int]:
    """Per-row prompt length of an uncompressed ``generate`` call (non-padding tokens)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        return [int(n) for n in mask.sum(-1).tolist()]
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        return [int(ids.shape[-1])] * int(ids.shape[0])
    return []


@contextlib.contextmanager
def _instance_override(model: nn.Module, name: str, fn: Callable[..., Any]) -> Iterator[None]:
    """Set ``model.<name>`` on the instance for the duration; put back the instance's own, or none."""
    previous = model.__dict__.get(name, _MISSING)
    setattr(model, name, fn)
    try:
        yield
    finally:
        if previous is _MISSING:
            model.__dict__.pop(name, None)
        else:
            setattr(model, name, previous)


@contextlib.contextmanager
def _logits_in_input_rows(model: nn.Module) -> Iterator[None]:
    """While active, a compressed ``forward`` returns logits laid out on the caller's input positions."""
    previous = model.__dict__.get("forward", _MISSING)
    inner = type(model).forward.__get__(model) if previous is _MISSING else previous

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        before = _current_record(model)
        out = inner(*args, **kwargs)
        record = _current_record(model)
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(out, "logits", None)
        if record is None or record is before or not isinstance(ids, torch.Tensor) or logits is None:
            return out
        full = logits.new_zeros(ids.shape[0], ids.shape[1], logits.shape[-1])  # [B, L_input, V]
        for b, sample in enumerate(record.samples):
            source = torch.tensor(sample.source_positions, device=logits.device)
            rows = source >= 0
            full[b, source[rows]] = logits[b, rows]
        out.logits = full
        return out

    with _instance_override(model, "forward", forward):
        yield
