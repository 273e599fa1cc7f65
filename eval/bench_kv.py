"""KV-cache compression (``vtc.kv``): cache memory, decode speed and answer agreement against the full cache.

For every configuration (the uncompressed model, then each KV method, optionally after a visual method), greedy
``generate`` of ``--new-tokens`` tokens on a batch of prompts, and:

* ``kv_prefill_mib`` / ``kv_peak_mib``: bytes of keys and values the cache holds after the prefill / at most after
  any forward (every layer, padding slots included);
* ``decode_tok_s``: decode steps per second, ``(N - 1) / (t(N) - t(1))``, medians over ``--repeats``;
* ``agreement``: share of the generated tokens equal to the uncompressed model's at the same place, and
  ``same_prefix``: how many tokens agree before the first difference (mean over samples);
* on CUDA, ``cuda_peak_mib``: the allocator's peak during ``generate``.

``python eval/bench_kv.py --model offline --new-tokens 64`` runs the offline LLaVA (DINOv2-S + SmolLM2-135M,
:func:`vtc.offline.load_offline_vlm`) on the bundled photo and easy-VQA image; ``--model tiny`` the tiny random
LLaVA of the tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vtc  # noqa: E402

QUESTION = "Describe the image in detail."


def _load(name: str, device: str):
    if name == "tiny":
        from vtc.testing import llava_inputs, tiny_llava

        model = tiny_llava(seed=4)
        inputs = llava_inputs(model, ((40, 8), (20, 4)), seed=1)
    else:
        from vtc.offline import load_offline_vlm
        from vtc.offline.demo import _inputs, bundled_examples

        model, processor = load_offline_vlm(log=lambda *a: None)
        examples = bundled_examples(question=QUESTION)
        examples[1].question = QUESTION
        inputs = dict(_inputs(processor, examples))
    model = model.to(device)
    return model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def _cache_bytes(cache) -> int:
    return sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))


@torch.no_grad()
def _run(model, inputs, new_tokens: int, repeats: int) -> dict:
    sizes: list[int] = []

    def watch(module, args, kwargs, output):
        cache = kwargs.get("cache")
        if cache is not None:
            sizes.append(_cache_bytes(cache))

    lm = model.model.language_model
    handle = lm.register_forward_hook(watch, with_kwargs=True)
    opts = dict(do_sample=False, min_new_tokens=new_tokens)
    try:
        cuda = inputs["input_ids"].is_cuda
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        tokens = model.generate(**inputs, max_new_tokens=new_tokens, **opts)[:, -new_tokens:]
        peak = torch.cuda.max_memory_allocated() if cuda else None
        prefill, kv_peak = sizes[0], max(sizes)
        times = {1: [], new_tokens: []}
        for _ in range(repeats):
            for n in times:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(**inputs, max_new_tokens=n, **{**opts, "min_new_tokens": n})
                if cuda:
                    torch.cuda.synchronize()
                times[n].append(time.perf_counter() - start)
    finally:
        handle.remove()
    steps = statistics.median(times[new_tokens]) - statistics.median(times[1])
    out = {
        "kv_prefill_mib": prefill / 2**20,
        "kv_peak_mib": kv_peak / 2**20,
        "decode_tok_s": (new_tokens - 1) / steps if steps > 0 else float("nan"),
        "tokens": tokens.tolist(),
    }
    if peak is not None:
        out["cuda_peak_mib"] = peak / 2**20
    return out


def _agreement(tokens: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    same, prefix = [], []
    for a, b in zip(tokens, ref, strict=True):
        eq = [x == y for x, y in zip(a, b, strict=True)]
        same.append(sum(eq) / len(eq))
        prefix.append(eq.index(False) if False in eq else len(eq))
    return statistics.mean(same), statistics.mean(prefix)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "offline"), default="offline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["lookm:0.2", "lookm:0.5", "elastic_cache:0.5", "elastic_cache:0.8", "divprune@0.25+lookm:0.5"],
        help="KV method:kv_budget, optionally after a visual method@budget and '+'",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    model, inputs = _load(args.model, args.device)
    base = _run(model, inputs, args.new_tokens, args.repeats)
    rows = [{"config": "full cache", **base}]
    for spec in args.configs:
        visual, _, kv = spec.rpartition("+")
        name, _, budget = kv.partition(":")
        if visual:
            method, _, vbudget = visual.partition("@")
            vtc.compress(model, method, budget=float(vbudget), kv=name, kv_budget=float(budget))
        else:
            vtc.compress(model, name, budget=float(budget))
        try:
            row = _run(model, inputs, args.new_tokens, args.repeats)
        finally:
            vtc.restore(model)
        rows.append({"config": spec, **row})
    for row in rows:
        row["agreement"], row["same_prefix"] = _agreement(row["tokens"], base["tokens"])
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["kv_peak_ratio"] = row["kv_peak_mib"] / base["kv_peak_mib"]
    print(f"{'config':28} {'KV prefill MiB':>14} {'KV peak MiB':>12} {'decode tok/s':>12} {'agree':>6} {'prefix':>6}")
    for r in rows:
        print(
            f"{r['config']:28} {r['kv_prefill_mib']:14.3f} {r['kv_peak_mib']:12.3f} {r['decode_tok_s']:12.1f} "
            f"{r['agreement']:6.2f} {r['same_prefix']:6.1f}"
        )
    if args.out is not None:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
