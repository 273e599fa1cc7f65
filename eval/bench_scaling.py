"""vtc's own cost as the visual tokens grow: time and peak memory of each pre-LLM method at its hook point.

    python eval/bench_scaling.py --out out/scaling                   # n = 576 ... 50,176 (default sizes)
    python eval/bench_scaling.py --sizes 576,2304 --methods divprune,hired --out out/scaling_quick

For every method that acts before the LLM and every ``n`` (a square grid of ``n`` visual tokens, width
``--dim``), the method's ``reduce`` runs on synthetic inputs of the right shape at the ``PRE_LLM`` hook point:
tokens, pre-projector features, the prompt's text embeddings, and every vision signal the method asks for
(random CLS rows / attention received / keys / hidden states of a 24-block CLS tower), so what is measured is
the method's own selection work, not a model's. Budget 0.2 (``k = n / 5``), one image, fp32, CPU threads as
given. Per (method, n): the median of ``--repeats`` timed calls and the peak memory growth of one call
(``speed_probes.PeakMemory``: peak RSS on Linux CPUs, the CUDA allocator on a GPU). The growth exponent of each
is fitted on the sizes from 6,272 up (least squares on log-log); a method whose call would exceed
``--max-seconds`` or whose peak memory would pass ``--max-gib`` at the next size (extrapolated with the fitted
exponent of the sizes so far, at least 2 for memory when quadratic) is stopped there and reported as such.
Writes ``scaling.json``, a markdown table and a plot into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_probes import PeakMemory  # noqa: E402

SIZES = (576, 2304, 6272, 25088, 50176)
FIT_FROM = 6272


def synthetic_image(method, n: int, dim: int, text: int = 24, blocks: int = 24, seed: int = 0):
    """An ``ImageTokens`` of ``n`` tokens on a square-ish grid with every signal ``method`` asks for."""
    from vtc.budget import keep_count
    from vtc.contexts import ImageTokens, Layout, TowerInfo

    rows = math.isqrt(n)
    while n % rows:
        rows -= 1
    cols = n // rows
    gen = torch.Generator().manual_seed(seed)
    tower = TowerInfo(has_cls=True, num_blocks=blocks)
    signals = {}
    for sig in method.vision_signals(tower):
        slots = n + 1
        if sig.kind in ("cls_attention", "attention_received"):
            signals[sig.name] = torch.rand(1, slots, generator=gen).softmax(-1)
        else:  # keys / hidden: one vector per slot
            signals[sig.name] = torch.randn(1, slots, dim // 4 if sig.kind == "keys" else dim, generator=gen)
    return ImageTokens(
        tokens=torch.randn(n, dim, generator=gen),
        layout=Layout.grid(rows, cols, prefix=1),
        k=keep_count(0.2, n),
        signals=signals,
        vision_tokens=torch.randn(n, dim, generator=gen),
        text_ids=torch.arange(text),
        text_embeds=torch.randn(text, dim, generator=gen),
        project=lambda x: x,
        tower=tower,
    )


def pre_llm_methods() -> list[str]:
    import vtc
    from vtc.contexts import Stage

    return [m.name for m in vtc.list_methods() if Stage.PRE_LLM in m.stages and "image" in m.method_class.modalities]


def exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(value) on log(n) over the points with ``n >= FIT_FROM`` (None: < 2 points)."""
    pts = [(math.log(n), math.log(max(v, 1e-9))) for n, v in points if n >= FIT_FROM]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den


def measure(name: str, n: int, dim: int, repeats: int, memory: PeakMemory) -> dict:
    import vtc

    info = vtc.get_method(name)
    method = info.method_class(info.config_class(budget=0.2))
    image = synthetic_image(method, n, dim)
    with torch.no_grad():
        method.reduce(image)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            red = method.reduce(image)
            times.append(time.perf_counter() - t0)
        peak = memory.measure(lambda: method.reduce(image)) if memory.method else None
    assert int(red.index.numel()) == image.k, f"{name} kept {red.index.numel()} of k={image.k}"
    return {"n": n, "seconds": statistics.median(times), "peak_mib": peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--methods", default=None, help="comma-separated (default: every pre-LLM image method)")
    p.add_argument("--dim", type=int, default=1024, help="token width (LLaVA-OneVision's SigLIP: 1152)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop a method before a call this long")
    p.add_argument("--max-gib", type=float, default=8.0, help="stop a method before a peak this large")
    p.add_argument("--out", default="out/scaling")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vtc.demo import machine

    sizes = [int(s) for s in args.sizes.split(",") if s]
    methods = args.methods.split(",") if args.methods else pre_llm_methods()
    memory = PeakMemory(torch.device("cpu"))
    memory.enable()
    results = {}
    for name in methods:
        rows, stopped = [], None
        for n in sizes:
            if rows and len(rows) >= 2:  # extrapolate from the last two sizes before running the next one
                (n1, t1, m1), (n2, t2, m2) = [(r["n"], r["seconds"], r["peak_mib"] or 1.0) for r in rows[-2:]]
                grow = math.log(n / n2) / math.log(n2 / n1)
                if t2 * (t2 / t1) ** grow > args.max_seconds:
                    stopped = f"stopped before n={n}: the call would take over {args.max_seconds:g} s"
                    break
                if m2 * (m2 / m1) ** grow / 1024 > args.max_gib:
                    stopped = f"stopped before n={n}: the peak would pass {args.max_gib:g} GiB"
                    break
            row = measure(name, n, args.dim, args.repeats, memory)
            rows.append(row)
            print(
                f"{name:>10} n={n:>6}: {1e3 * row['seconds']:9.1f} ms, peak {row['peak_mib'] or 0:9.1f} MiB",
                flush=True,
            )
        results[name] = {
            "rows": rows,
            "stopped": stopped,
            "time_exponent": exponent([(r["n"], r["seconds"]) for r in rows]),
            "memory_exponent": exponent([(r["n"], r["peak_mib"] or 0.0) for r in rows]),
        }
    report = {
        "machine": machine(),
        "command": "python eval/bench_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dim": args.dim,
        "budget": 0.2,
        "memory_method": memory.method or memory.reason,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "scaling.md").write_text(markdown(report) + "\n")
    plot(report, out / "scaling.png")
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    sizes = sorted({r["n"] for v in report["results"].values() for r in v["rows"]})
    head = "| method | " + " | ".join(f"n={n}" for n in sizes) + " | time exp. | memory exp. | note |"
    lines = [head, "|---|" + "---:|" * (len(sizes) + 2) + "---|"]
    for name, v in report["results"].items():
        by_n = {r["n"]: r for r in v["rows"]}
        cells = [
            f"{1e3 * by_n[n]['seconds']:.1f} ms / {by_n[n]['peak_mib'] or 0:.0f} MiB" if n in by_n else "–"
            for n in sizes
        ]
        fmt = lambda e: "–" if e is None else f"{e:.2f}"  # noqa: E731
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {fmt(v['time_exponent'])} | {fmt(v['memory_exponent'])} "
            f"| {v['stopped'] or ''} |"
        )
    lines.append("")
    lines.append(
        f"vtc's own `reduce` per image (budget {report['budget']}, width {report['dim']}, fp32), median time / peak "
        f"memory growth of one call; exponents fitted from n = {FIT_FROM} up. Machine: {report['machine']}. "
        f"Memory: {report['memory_method']}. Command: `{report['command']}`."
    )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name, v in report["results"].items():
        ns = [r["n"] for r in v["rows"]]
        ax_t.loglog(ns, [r["seconds"] for r in v["rows"]], marker="o", label=name)
        ax_m.loglog(ns, [max(r["peak_mib"] or 0, 0.01) for r in v["rows"]], marker="o", label=name)
    ax_t.set(xlabel="visual tokens n", ylabel="seconds per image", title="vtc's own time")
    ax_m.set(xlabel="visual tokens n", ylabel="peak MiB", title="vtc's own peak memory")
    ax_m.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
