"""KV-cache compression on a task that needs the cache: long answers about many objects on the scenes VLM.

The question-answering benchmarks score the first answer token, which comes from the prefill's logits, before a
KV compressor (:mod:`vtc.kv`) has touched the cache: they cannot see it. Here the answer is long and every part
of it is decoded from the compressed cache:

* **task**: "What objects are there?" on scenes test pictures (:mod:`vtc.offline.scenes`, 2 to 9 objects). The
  scenes VLM (``load_offline_vlm(model="scenes")``) was trained to answer it with every object as "colour kind",
  place by place in reading order (``"red 7, blue circle, green 3"``); greedy ``generate`` of up to
  ``--new-tokens`` tokens;
* **score**: per object, 1 when the answer's item at the object's index is exactly its "colour kind" (an item
  missed or added shifts the rest, which then count as wrong: the list must be read in order); a picture's
  score is the mean over its objects. The first item's first token comes from the prefill and is never touched;
  every later one is read from the cache;
* **configurations**: the full cache, then every KV compressor (``lookm``, ``elastic_cache`` and the control
  ``random_kv``, which evicts visual entries at random under LOOK-M's structure) at each ``--kv-budgets``;
* **statistics**: paired 95 % bootstrap intervals (pictures resampled with all their objects) of each compressor
  minus ``random_kv`` at the same budget and minus the full cache.

``python eval/kv_accuracy.py --scenes 200 --out docs/kv_accuracy`` (``--quick``: 24 pictures, budget 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _accuracy_stats import excludes_zero, paired_difference  # noqa: E402

import vtc  # noqa: E402
from vtc.demo import machine  # noqa: E402

QUESTION = "What objects are there?"
METHODS = ("lookm", "elastic_cache", "random_kv")


def items_of(text: str) -> list[str]:
    """An answer's comma-separated items, lower-cased, spaces collapsed."""
    return [" ".join(part.lower().split()) for part in text.split(",") if part.strip()]


def score(answer: str, truth: str) -> list[int]:
    """Per object of ``truth`` (in order), 1 when the answer's item at its index names it exactly."""
    said, want = items_of(answer), items_of(truth)
    return [int(i < len(said) and said[i] == w) for i, w in enumerate(want)]


@torch.no_grad()
def answers(model, processor, images, new_tokens: int, batch: int) -> list[str]:
    from vtc.offline.easyvqa import messages

    processor.tokenizer.padding_side = "left"
    text = processor.apply_chat_template(messages(QUESTION), add_generation_prompt=True)
    out = []
    for s in range(0, len(images), batch):
        chunk = images[s : s + batch]
        inputs = processor(images=chunk, text=[text] * len(chunk), padding=True, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        out += [
            t.strip() for t in processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        ]
    return out


def run(args) -> dict:
    from vtc.offline import load_offline_vlm, scenes

    torch.set_num_threads(args.threads)
    model, processor = load_offline_vlm(model="scenes", log=lambda *a: None)
    pictures = scenes.generate("test", args.scenes, args.seed)
    images = [s.render() for s in pictures]
    truths = [scenes.describe(s.objects).answer for s in pictures]
    clusters = [i for i, t in enumerate(truths) for _ in items_of(t)]
    configs = [("full", None, None)] + [(m, m, b) for b in args.kv_budgets for m in args.methods]
    rows = {}
    for label, kv, budget in configs:
        name = label if kv is None else f"{kv}@{budget}"
        start = time.perf_counter()
        if kv is not None:
            vtc.compress(model, kv, budget=budget)
        try:
            said = answers(model, processor, images, args.new_tokens, args.batch)
        finally:
            if kv is not None:
                vtc.restore(model)
        per_object = [x for a, t in zip(said, truths, strict=True) for x in score(a, t)]
        rows[name] = {
            "kv": kv,
            "kv_budget": budget,
            "objects_right": sum(per_object) / len(per_object),
            "pictures_all_right": sum(all(score(a, t)) for a, t in zip(said, truths, strict=True)) / len(said),
            "per_object": per_object,
            "examples": said[:3],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"{name}: objects right {rows[name]['objects_right']:.3f} ({rows[name]['seconds']} s)", flush=True)
    for row in rows.values():
        if row["kv"] is None:
            continue
        row["minus_full"] = paired_difference(row["per_object"], rows["full"]["per_object"], clusters)
        control = rows.get(f"random_kv@{row['kv_budget']}")
        if control is not None and row["kv"] != "random_kv":
            row["minus_random"] = paired_difference(row["per_object"], control["per_object"], clusters)
    return {
        "command": "python eval/kv_accuracy.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "threads": args.threads,
        "pictures": len(pictures),
        "objects": len(clusters),
        "new_tokens": args.new_tokens,
        "truth_examples": truths[:3],
        "rows": rows,
    }


def _interval(d: dict | None) -> str:
    if d is None:
        return ""
    mark = " *" if excludes_zero(d) else ""
    return f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]{mark}"


def markdown(report: dict) -> str:
    lines = [
        f"# KV-cache compression on long answers (scenes VLM, {report['pictures']} pictures, "
        f"{report['objects']} objects)",
        "",
        f"`{report['command']}` on {report['machine']}, greedy, up to {report['new_tokens']} new tokens.",
        "",
        "| config | objects right | pictures all right | minus full cache | minus random_kv (same budget) |",
        "|---|---:|---:|---|---|",
    ]
    for name, row in report["rows"].items():
        lines.append(
            f"| {name} | {100 * row['objects_right']:.1f} | {100 * row['pictures_all_right']:.1f} | "
            f"{_interval(row.get('minus_full'))} | {_interval(row.get('minus_random'))} |"
        )
    lines += ["", "Differences in points with paired 95 % bootstrap intervals (pictures resampled); * excludes 0."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=200, help="test pictures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.5, 0.8])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="24 pictures, budget 0.5")
    parser.add_argument("--out", default=None, help="folder for report.json and table.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.scenes, args.kv_budgets = 24, [0.5]
    unknown = sorted(set(args.methods) - set(vtc.kv.list_kv()))
    if unknown:
        parser.error(f"unknown KV method(s) {unknown}; available: {vtc.kv.list_kv()}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = run(args)
    text = markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "table.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
