"""Batch serving: a batch of different prompts and images through ``generate``, compressed against uncompressed.

    python eval/bench_batch.py --out out/batch                    # Qwen2-VL preset, batch 8, cap 2 GiB
    python eval/bench_batch.py --methods divprune --batch 4 --cap-gib 1 --out out/batch_quick

The model is the ``qwen2vl`` speed preset (the Qwen2-VL layout with random weights, scaled to a CPU;
``eval/speed_presets.py``). Sample ``i`` of a batch has its own image size (grids of 28 x 28 to 56 x 84 ViT
patches: 196 to 1,176 visual tokens) and its own prompt length, so kept counts are ragged and the batch is
left-padded, as a server batches requests. Per configuration (uncompressed, then each method at ``--budget``):

* **throughput**: one ``generate`` of the batch (``--new-tokens``, greedy, KV cache on), median over
  ``--repeats``: generated tokens per second (all samples, prefill included) and the prefill time;
* **KV cache**: bytes of the cache ``generate`` returns (every layer's keys and values, padding included),
  per sample;
* **memory cap**: the peak memory of one batched ``generate`` at batch sizes 1, 2 and 4 (growth of peak RSS,
  ``speed_probes.PeakMemory``; the model runs on the CPU), a straight line fitted through them, and the
  largest batch whose fitted peak stays under ``--cap-gib``.

Writes ``batch.json`` and ``batch.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_presets as sp  # noqa: E402
from speed_probes import PeakMemory  # noqa: E402

#: per sample (cycled): the image's ViT grid (t, h, w) and the text tokens before / after it
SAMPLES = [
    ((1, 56, 84), (40, 24)),
    ((1, 28, 28), (52, 12)),
    ((1, 42, 56), (30, 40)),
    ((1, 56, 56), (44, 8)),
    ((1, 28, 42), (36, 30)),
    ((1, 42, 84), (48, 16)),
    ((1, 28, 56), (40, 36)),
    ((1, 56, 42), (34, 22)),
]


def batch_inputs(model, size: int, samples=SAMPLES, seed: int = 0) -> dict[str, Any]:
    """``size`` different prompts (cycling through ``samples``), left-padded into one batch."""
    parts = [
        sp.qwen_image_inputs(model, seed + i, grid=grid, text=text)
        for i, (grid, text) in enumerate(samples[j % len(samples)] for j in range(size))
    ]
    length = max(p["input_ids"].shape[1] for p in parts)
    ids = torch.full((size, length), sp.PAD, dtype=torch.long)
    mask = torch.zeros(size, length, dtype=torch.long)
    for b, p in enumerate(parts):
        n = p["input_ids"].shape[1]
        ids[b, length - n :] = p["input_ids"][0]
        mask[b, length - n :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == model.config.image_token_id).long(),
        "pixel_values": torch.cat([p["pixel_values"] for p in parts]),
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in parts]),
    }


def kv_bytes(cache, bsz: int) -> float:
    """Bytes per sample of a returned cache: every layer's keys and values, the batch's padding included (what a
    padded batch holds; layers shortened by in-LLM pruning count their own rows)."""
    total = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return total / bsz


def run_config(model, method: str | None, budget: float, inputs, new_tokens: int, repeats: int) -> dict:
    import vtc

    def call():
        return model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )

    ctx = vtc.compressed(model, method, budget=budget) if method else contextlib.nullcontext()
    with ctx, torch.no_grad():
        call()  # warm-up
        times, prefill = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
            prefill.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - start)
        rec = vtc.last_record(model) if method else None
    bsz = inputs["input_ids"].shape[0]
    per_sample = kv_bytes(out.cache, bsz)
    seconds = statistics.median(times)
    kept = [sum(len(im.kept) for im in rec.images_of(b)) for b in range(bsz)] if rec else None
    return {
        "method": method or "uncompressed",
        "budget": budget if method else 1.0,
        "tokens_per_s": bsz * new_tokens / seconds,
        "generate_s": seconds,
        "prefill_s": statistics.median(prefill),
        "kv_bytes_per_sample": per_sample,
        "visual_tokens_kept": kept,
    }


def largest_batch(model, method, budget, new_tokens: int, cap_mib: float, sizes=(1, 2, 4)) -> dict:
    """Peak memory of one batched generate at ``sizes``, a fitted line, the largest batch under ``cap_mib``."""
    import vtc

    memory = PeakMemory(torch.device("cpu"))
    if memory.method is None:
        return {"error": memory.reason}
    memory.enable()
    peaks = []
    ctx = vtc.compressed(model, method, budget=budget) if method else contextlib.nullcontext()
    with ctx, torch.no_grad():
        for size in sizes:
            inputs = batch_inputs(model, size)
            peaks.append(memory.measure(lambda i=inputs: model.generate(**i, max_new_tokens=new_tokens)))
    mx, my = statistics.fmean(sizes), statistics.fmean(peaks)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, peaks, strict=True)) / sum((x - mx) ** 2 for x in sizes)
    base = my - slope * mx
    fits = math.floor((cap_mib - base) / slope) if slope > 0 else None
    return {"sizes": list(sizes), "peak_mib": peaks, "mib_per_sample": slope, "base_mib": base, "largest": fits}


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        f"# Batch serving: {a['batch']} different prompts and images, {a['new_tokens']} new tokens",
        "",
        f"Machine: {result['machine']}. Model: the `qwen2vl` preset (random weights, scaled to a CPU). Command: "
        f"`python eval/bench_batch.py {' '.join(result['argv'])}`.",
        "",
        "| method | budget | visual tokens kept per sample | tokens/s | vs uncompressed | prefill s | "
        "KV MiB per sample (padding included) | peak MiB per extra sample | largest batch under the cap |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = result["rows"][0]["tokens_per_s"]
    for r in result["rows"]:
        cap = r.get("cap", {})
        kept = "all" if r["visual_tokens_kept"] is None else ", ".join(map(str, r["visual_tokens_kept"]))
        speed = f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {r['prefill_s']:.2f}"
        kv = f"{r['kv_bytes_per_sample'] / 2**20:.2f}"
        fit = f"{cap.get('mib_per_sample', float('nan')):.1f} | {cap.get('largest', '-')}"
        lines.append(f"| {r['method']} | {r['budget']:g} | {kept} | {speed} | {kv} | {fit} |")
    lines += ["", f"Memory cap {a['cap_gib']:g} GiB; peaks measured at batch sizes 1, 2, 4 and fitted by a line."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="divprune,hired,fastv")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cap-gib", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--small", action="store_true", help="a tiny model (tests)")
    p.add_argument("--out", default="out/batch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vtc.demo import machine

    if args.small:
        model = sp.qwen2_vl_model(vision=(32, 1, 2), text=(64, 4, 4, 2, 128))
    else:
        model = sp.qwen2_vl_model()
    inputs = batch_inputs(model, args.batch)
    rows = []
    for method in [None, *[m for m in args.methods.split(",") if m]]:
        row = run_config(model, method, args.budget, inputs, args.new_tokens, args.repeats)
        row["cap"] = largest_batch(model, method, args.budget, args.new_tokens, args.cap_gib * 1024)
        rows.append(row)
        print(
            f"{row['method']:>12}: {row['tokens_per_s']:.1f} tok/s, KV {row['kv_bytes_per_sample'] / 2**20:.2f} MiB "
            f"per sample, largest batch under {args.cap_gib:g} GiB: {row['cap'].get('largest')}",
            flush=True,
        )
    result = {
        "machine": machine(),
        "argv": argv if argv is not None else sys.argv[1:],
        "args": vars(args),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "batch.md").write_text(markdown(result))
    print(f"wrote {out / 'batch.json'} and {out / 'batch.md'}")
    return result


if __name__ == "__main__":
    main()
