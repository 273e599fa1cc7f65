"""Accuracy retention under visual-token compression: every method x budget, on a real model and real data.

Two offline models (``vtc.offline``, built from PyPI packages on first use) and their test sets:

    python eval/accuracy.py --out docs/accuracy              # easy-VQA model: every image method x 4 budgets
    python eval/accuracy.py --model scenes --out docs/scenes # scenes model: 1,000 scenes questions (<= 90 min)
    python eval/accuracy.py --model scenes --quick           # a 10-minute subset of the above
    python eval/accuracy.py --questions 24 --methods random,pool --budgets 0.25   # a smoke run

Any local checkpoint and any JSONL ``{"image", "question", "answer"[, "options", "family"]}`` file::

    python eval/accuracy.py --model /path/to/llava-1.5-7b-hf --data my_vqa.jsonl --budgets 0.25,0.111

For each (method, budget) the uncompressed model runs in the same process on the same questions; retention
is accuracy / uncompressed accuracy. ``native`` (in the default run where the model has the knob) is the
model's own resolution knob instead of compression: the uncompressed model on pictures the processor makes
small enough to give at most the budget's token count (:mod:`vtc.native`). Every method is also compared
question by question with ``random`` at the same budget and with the uncompressed model: the difference of
accuracies with a 95 % bootstrap interval that resamples pictures with all their questions
(``eval/_accuracy_stats.py``). Scoring is described in ``eval/_accuracy_core.py``; methods that do not read
the prompt share one compressed visual prefix per picture across its questions. Outputs go to ``--out``
(default ``out/accuracy``): ``results.json``, ``table.md`` and ``accuracy.png``.
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
from _accuracy_core import Item, Scorer, easyvqa_items, jsonl_items, scenes_items, summarise  # noqa: E402
from _accuracy_report import markdown, plot  # noqa: E402
from _accuracy_stats import paired_difference  # noqa: E402

BUDGETS = (0.5, 0.25, 0.111, 0.05)
DEFAULT_QUESTIONS = {"easyvqa": 80, "scenes": 1000}
#: --quick: a subset that runs in under 10 minutes on 2 CPU cores
QUICK = {"questions": 200, "budgets": [0.111], "methods": "random,pool,divprune,visionzip,fastv,native"}
#: the model's own resolution knob as a baseline (vtc.native), not a vtc method
NATIVE = "native"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def load_model(path: str | None):
    """``(model, processor, label)``; None or an offline model's name builds that model first."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtc.offline.build import VARIANTS

    if path is None or path in VARIANTS:
        from vtc.offline import build_offline_vlm

        path = str(build_offline_vlm(model=path or "easyvqa"))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path), path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import vtc

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default=None, help="'easyvqa' (default), 'scenes' (the offline models) or a checkpoint folder"
    )
    p.add_argument(
        "--data",
        default=None,
        help="'easyvqa', 'scenes' or a JSONL file (default: the offline model's own test set; easy-VQA otherwise)",
    )
    p.add_argument(
        "--questions",
        default=None,
        help=f"how many questions ('all' or a number; default {DEFAULT_QUESTIONS} per built-in test set)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the question order / scenes test set")
    p.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated (a stack as 'a+b'), or 'all': {[m.name for m in vtc.list_methods()]}",
    )
    p.add_argument("--budgets", type=_floats, default=list(BUDGETS), help="comma-separated budgets")
    p.add_argument("--quick", action="store_true", help=f"a subset in under 10 minutes: {QUICK}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8, help="generate mode (answer-only rows)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-floor", action="store_true", help="skip the question-only (no image) run")
    p.add_argument(
        "--no-shared-prefix", action="store_true", help="run every question's full prompt (slower, same scores)"
    )
    p.add_argument("--out", default="out/accuracy", help="output folder")
    args = p.parse_args(argv)
    if args.quick:
        args.questions = args.questions or str(QUICK["questions"])
        args.budgets = QUICK["budgets"] if args.budgets == list(BUDGETS) else args.budgets
        args.methods = QUICK["methods"] if args.methods == "all" else args.methods
    return args


def load_items(args) -> tuple[list[Item], str]:
    """The questions and a description of where they come from."""
    data = args.data or ("scenes" if args.model == "scenes" else "easyvqa")
    default = DEFAULT_QUESTIONS.get(data, None)
    n = None if args.questions == "all" else int(args.questions) if args.questions else default
    if data == "scenes":
        items = scenes_items(n, args.seed)
        return items, f"scenes VQA test (seed {args.seed}), {len({it.image for it in items})} pictures"
    if data == "easyvqa":
        items = easyvqa_items(n, args.seed)
        return items, f"easy-VQA test, first {len(items)} of a shuffle with seed {args.seed}"
    return jsonl_items(data, n), data


def shares_prefix(name: str) -> bool:
    """Whether a method's compressed visual prefix is the same for every question (it ignores the prompt)."""
    import vtc
    from vtc.hooks import Stage

    if name == "uncompressed":
        return True
    method = vtc.method_for(name)  # a stack ("a+b") too
    return Stage.LLM_LAYER not in method.stages and not method.reads_prompt


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    import vtc
    from vtc.api import known_method
    from vtc.demo import machine
    from vtc.native import NativeUnavailable

    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bar is optional
        tqdm = None
    if args.threads:
        torch.set_num_threads(args.threads)
    registered = [m.name for m in vtc.list_methods()]
    methods = registered + [NATIVE] if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m != NATIVE and not known_method(m)]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; registered: {registered}")
    items, dataset = load_items(args)

    start = time.perf_counter()
    model, processor, label = load_model(args.model)
    methods, skipped = applicable(model, methods, strict=args.methods != "all", processor=processor)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    scorer = Scorer(model, processor, args.batch_size, args.max_new_tokens)
    runs = [("uncompressed", 1.0)] + [(m, b) for m in methods for b in args.budgets]
    floor = not args.no_floor and all(it.image for it in items)
    shareable = not args.no_shared_prefix and all(it.image and it.options for it in items)
    total = len(items) * (len(runs) + int(floor))
    bar = tqdm(total=total, unit="q", desc="questions") if tqdm else None
    results = []
    n_visual = _visual_tokens(model, processor, items)
    for method, budget in runs:
        t0 = time.perf_counter()
        if bar:
            bar.set_postfix_str(f"{method} @ {budget}")
        if method == NATIVE:
            try:
                setting = native_setting(model, scorer, items, vtc.keep_count(budget, n_visual))
            except NativeUnavailable as err:
                skipped[f"{NATIVE}@{budget:g}"] = str(err)
                if bar:
                    bar.update(len(items))
                continue
            scorer.image_kwargs = setting.kwargs
            try:
                update = bar.update if bar else None
                preds = scorer.predict_shared(items, update) if shareable else scorer.predict(items, update)
            finally:
                scorer.image_kwargs = {}
            row = {"method": method, "budget": budget, **summarise(items, preds)}
            row.update(seconds=time.perf_counter() - t0, visual_tokens=setting.tokens, native=setting.note)
            results.append(row)
            continue
        if method != "uncompressed":
            vtc.compress(model, method, budget=budget)
        try:
            update = bar.update if bar else None
            if shareable and shares_prefix(method):
                preds = scorer.predict_shared(items, update)
            else:
                preds = scorer.predict(items, update)
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
    base["visual_tokens"] = n_visual
    clusters = [it.image for it in items]
    by_run = {(r["method"], r["budget"]): r for r in results}
    for row in results:
        row["retention"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else None
        row["retention_se"] = row["se"] / base["accuracy"] if base["accuracy"] else None
        outcome = [int(c) for c in row["correct"]]
        if row is not base:
            row["vs_uncompressed"] = paired_difference(outcome, [int(c) for c in base["correct"]], clusters)
            rand = by_run.get(("random", row["budget"]))
            if rand is not None and row["method"] != "random":
                row["vs_random"] = paired_difference(outcome, [int(c) for c in rand["correct"]], clusters)
    report = {
        "model": label,
        "dataset": dataset,
        "n": len(items),
        "pictures": len(set(clusters)),
        "scoring": "first-token logits over the options (left padding, one forward)"
        if all(it.options for it in items)
        else "options: first-token logits; answers: greedy generate + normalised exact match",
        "machine": machine(),
        "seconds": round(time.perf_counter() - start, 1),
        "majority": _majority(items),
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


def _majority(items: list[Item]) -> float:
    """Accuracy of always giving each family's most frequent answer (the whole set's when there are none)."""
    groups: dict[str, list[str]] = {}
    for it in items:
        groups.setdefault(it.meta.get("family", ""), []).append(it.answer)
    hits = sum(max(answers.count(a) for a in set(answers)) for answers in groups.values())
    return hits / max(1, len(items))


def applicable(model, methods: list[str], strict: bool, processor=None) -> tuple[list[str], dict[str, str]]:
    """The methods that can compress this model, and why each other one cannot.

    ``--methods all`` drops the methods the model cannot take (video-only methods on an image model, a
    merging stage the family does not provide) and reports why; methods named explicitly must all apply.
    """
    import vtc

    kept, skipped = [], {}
    for name in methods:
        if name == NATIVE:
            from vtc.native import NativeUnavailable, native_kwargs

            try:  # has the family a knob at all (a count it can reach is checked per budget)
                native_kwargs(model.config, processor, 10**6, (1024, 1024))
            except NativeUnavailable as err:
                if strict:
                    raise SystemExit(f"native: {err}") from None
                skipped[name] = str(err)
            else:
                kept.append(name)
            continue
        modalities = vtc.method_for(name).modalities
        if "image" not in modalities:
            if strict:
                raise SystemExit(f"method {name!r} compresses {list(modalities)} inputs, not images")
            skipped[name] = f"compresses {'/'.join(modalities)} inputs, not images"
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


def native_setting(model, scorer: Scorer, items: list[Item], k: int):
    """The ``native`` baseline's processor arguments for these pictures (one setting for all of them)."""
    from vtc.native import native_kwargs

    sizes = sorted({scorer.image_size(it.image) for it in items if it.image})
    settings = {repr(s.kwargs): s for s in (native_kwargs(model.config, scorer.processor, k, hw) for hw in sizes)}
    if len(settings) != 1:
        raise SystemExit(
            f"native: pictures of {len(sizes)} sizes need {len(settings)} different processor settings on this "
            "model; run the benchmark on pictures of one size, or without native (--methods ...)"
        )
    return next(iter(settings.values()))


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
