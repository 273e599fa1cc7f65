"""Soak benchmark: many compressed ``generate`` calls on one model, memory sampled, growth per call printed.

A server compresses once and answers for days: every call must leave nothing behind. This runs ``--calls``
greedy ``generate`` calls (two new tokens, so prefill and decode both run) of a compressed tiny model from
``vtc.testing`` (a handful of visual tokens: the calls are cheap, the bookkeeping is what is measured), and
every ``--every`` calls samples

* the process's resident set size (``/proc/self/statm``),
* the live ``torch.Tensor`` objects and the bytes of their storages (``gc``),
* the objects the Python garbage collector tracks,

after a full ``gc.collect()``. It prints one line per sample and the least-squares slope per call of each
measure over the samples after the warm-up (``--warmup`` calls). The acceptance bound for a release is an RSS
slope below 1 KiB per call over 10,000 calls with ``fastv``; ``tests/test_soak.py`` runs the quick version (500
calls, every method) and bounds the live tensors and their bytes, not the RSS (too noisy in 500 calls).

    python eval/soak.py --method fastv --calls 10000 --every 500
    python eval/soak.py --method all --calls 2000 --json out/soak.json

Timing is not measured. Runs on the CPU with one thread (``OMP_NUM_THREADS=1`` is set if unset).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import vtc  # noqa: E402

#: options that make every stage of a method act on the tiny models (in-LLM stages included)
OPTIONS: dict[str, dict[str, Any]] = {
    "todre": {"layer": 2, "tau": 1.0},
    "dycoke": {"kv_prune": 0.5, "kv_layer": 2},
}


@dataclass
class Sample:
    calls: int
    rss_kib: float
    tensors: int
    tensor_kib: float
    objects: int


def rss_kib() -> float:
    """Resident set size of this process now, in KiB (Linux; elsewhere the peak, from ``getrusage``)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1024
    except OSError:
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def live_tensors() -> tuple[int, int]:
    """``(count, bytes)`` of the ``torch.Tensor`` objects alive now (storages shared by views counted once)."""
    gc.collect()
    count, storages = 0, {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):  # type(), not isinstance(): no attribute lookups on odd objects
            count += 1
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse, meta...
                pass
    return count, sum(storages.values())


def case(method: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny model the method takes and one batch of two prompts (images: 4 tokens each; videos: 2 frames)."""
    from vtc.testing import llava_inputs, llava_video_inputs, tiny_llava, tiny_llava_onevision

    if "image" in vtc.get_method(method).method_class.modalities:
        model = tiny_llava(seed=0, image_size=16, patch_size=8, vision_layers=2)
        return model, llava_inputs(model, ((1, 2), (2, 1)), seed=1)
    model = tiny_llava_onevision(seed=0)
    return model, llava_video_inputs(model, ((1, 2), (2, 1)), frames=2, seed=1)


def soak(
    method: str,
    calls: int,
    every: int,
    budget: float = 0.5,
    on_sample: Callable[[Sample], None] | None = None,
    at: set[int] | None = None,
) -> list[Sample]:
    """``calls`` compressed ``generate`` calls; a :class:`Sample` at call 0, every ``every`` calls and after the
    last (or at the calls in ``at``: a sample scans every object the collector tracks, a fraction of a second)."""
    at = {0, calls, *range(0, calls, every)} if at is None else set(at)
    model, inputs = case(method)
    vtc.compress(model, method, budget=budget, **OPTIONS.get(method, {}))
    samples = []
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(calls + 1):
                if i in at:
                    count, nbytes = live_tensors()
                    sample = Sample(i, rss_kib(), count, nbytes / 1024, len(gc.get_objects()))
                    samples.append(sample)
                    if on_sample is not None:
                        on_sample(sample)
                if i < calls:
                    model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    finally:
        vtc.restore(model)
    return samples


def slope(samples: list[Sample], field: str, warmup: int = 0) -> float:
    """Least-squares growth of ``field`` per call over the samples taken at or after ``warmup`` calls."""
    points = [(s.calls, getattr(s, field)) for s in samples if s.calls >= warmup]
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="fastv", help="a method name, or 'all'")
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=500, help="sample every N calls")
    parser.add_argument("--warmup", type=int, default=None, help="calls before the slope is fitted (default --every)")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--json", help="write every sample and slope here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    methods = [m.name for m in vtc.list_methods()] if args.method == "all" else [args.method]
    warmup = args.every if args.warmup is None else args.warmup
    report = {}
    for method in methods:
        start = time.perf_counter()
        print(f"{method}: {args.calls} compressed generate calls, budget {args.budget}", flush=True)

        def show(s: Sample) -> None:
            print(
                f"  call {s.calls:>6}: RSS {s.rss_kib / 1024:8.1f} MiB, {s.tensors} tensors "
                f"({s.tensor_kib:.0f} KiB), {s.objects} objects",
                flush=True,
            )

        samples = soak(method, args.calls, args.every, args.budget, on_sample=show)
        slopes = {f: slope(samples, f, warmup) for f in ("rss_kib", "tensors", "tensor_kib", "objects")}
        print(
            f"{method}: slope per call after {warmup} calls: RSS {slopes['rss_kib']:+.3f} KiB, tensors "
            f"{slopes['tensors']:+.5f}, tensor bytes {slopes['tensor_kib'] * 1024:+.1f} B, objects "
            f"{slopes['objects']:+.4f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        report[method] = {"slopes": slopes, "samples": [asdict(s) for s in samples]}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"calls": args.calls, "every": args.every, "warmup": warmup, "methods": report}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
