"""Throughput of timm ViT-B/16 under vtc's ToMe, on this machine's CPU (random weights, nothing downloaded).

Model: ``timm.create_model("vit_base_patch16_224", pretrained=False)`` (197 tokens, 12 blocks), eval mode,
fp32, no grad. Rows: the untouched model, then ``vtc.compress(vit, method="tome", r=r)`` for r in
{0, 8, 13, 16} (r = 0 runs vtc's block runners without merging: their overhead alone). Each round times
every row once, in turn, so machine drift hits all rows alike; a row's figure is the median over the
rounds. Images per second = batch / median seconds per forward; the ratio is to the r = 0 row. Both wall
time and this process's CPU time are reported: on a shared machine (other jobs on the same cores) the
CPU time is the steadier of the two; the load average at the start is printed with the machine.

    python eval/bench_tome.py                          # 1 torch thread, batch 8, 5 rounds
    python eval/bench_tome.py --threads 2 --out out    # also writes out/bench_tome.{json,md}

Runtime: about a minute on 2 cores with 1 thread (one ViT-B forward over 8 images is ~2 s there).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import torch

import vtc
from vtc.apps.demo import cpu_name

R_VALUES = (0, 8, 13, 16)


def machine() -> str:
    cpu = cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, timm {_timm_version()}, "
        f"{torch.get_num_threads()} torch thread(s), load average {load:.1f}"
    )


def _timm_version() -> str:
    import timm

    return timm.__version__


def _forward(vit: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one forward."""
    with torch.no_grad():
        wall, cpu = time.perf_counter(), time.process_time()
        vit(x)
        return time.perf_counter() - wall, time.process_time() - cpu


def run(batch: int, rounds: int, seed: int = 0) -> list[dict]:
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    rows: list[tuple[str, int | None]] = [("timm (no vtc)", None)] + [(f"tome r={r}", r) for r in R_VALUES]
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in rows}
    tokens: dict[str, int] = {}
    for round_ in range(rounds + 1):  # round 0 is the warm-up
        for name, r in rows:
            if r is None:
                elapsed = _forward(vit, x)
                tokens[name] = 197
            else:
                with vtc.compressed(vit, "tome", r=r):
                    elapsed = _forward(vit, x)
                    tokens[name] = vtc.last_record(vit).flops["vision_tokens"][-1]
            if round_:
                times[name].append(elapsed)
    out = []
    for name, _ in rows:
        wall = statistics.median(t for t, _ in times[name])
        cpu = statistics.median(c for _, c in times[name])
        out.append(
            {
                "run": name,
                "tokens_out": tokens[name],
                "seconds": wall,
                "images_per_s": batch / wall,
                "cpu_seconds": cpu,
                "images_per_cpu_s": batch / cpu,
            }
        )
    base = next(row for row in out if row["run"] == "tome r=0")
    for row in out:
        row["ratio_to_r0"] = row["images_per_s"] / base["images_per_s"]
        row["cpu_ratio_to_r0"] = row["images_per_cpu_s"] / base["images_per_cpu_s"]
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| run | tokens after block 12 | images / s (wall) | ratio to r = 0 | images / CPU-s | ratio to r = 0 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['tokens_out']} | {row['images_per_s']:.2f} | {row['ratio_to_r0']:.2f}x "
            f"| {row['images_per_cpu_s']:.2f} | {row['cpu_ratio_to_r0']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--out", default=None, help="folder for bench_tome.json and bench_tome.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    rows = run(args.batch, args.rounds)
    header = f"timm vit_base_patch16_224 (random weights), batch {args.batch}, fp32, median of {args.rounds} rounds"
    text = f"{header}\nmachine: {machine()}\n\n{table(rows)}"
    print(text)
    if args.out:
        folder = pathlib.Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bench_tome.md").write_text(text + "\n")
        info = {"machine": machine(), "batch": args.batch, "rounds": args.rounds, "rows": rows}
        (folder / "bench_tome.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
