"""The GPU check: one script, one results file, at most about 8 minutes on one GPU.

    python eval/gpu_check.py --out out/gpu_check      # on a CUDA machine: writes out/gpu_check/gpu_check.json

1. **Kernels** (``eval/bench_kernels.py`` on CUDA, bf16): ``cosine_argmax`` at N = M = 6,272, d = 64 (target:
   at least 2x the PyTorch reference with no N x M buffer), ``attention_received`` at n = 4,704 (the Qwen2-VL
   preset's ViT patches) and 25,088 with 16 heads of 64, and ``greedy_maxmin`` at the same sizes; each row
   with the Triton speed-up, the effective bandwidth over the minimal bytes and its fraction of the GPU's
   peak memory bandwidth (``--peak-gbps``, or the data-sheet figure for the GPUs named below).
2. **greedy_maxmin replayed as a CUDA graph** (``greedy_graphs``): three calls of one shape with different
   inputs (the first runs step by step, the second captures, the third replays), each compared with the
   PyTorch reference pick for pick, and the time of each call, at d = 64 and at an LLM's width (3,584).
3. **Speed presets** (``eval/bench_speed.py`` in bf16 with SDPA): each preset in turn, three timed calls per
   configuration, its default methods and budgets; a preset that would start after ``--minutes`` have passed
   is listed as skipped, so the whole check stays within its time.

``gpu_check.json`` holds the machine, every part and what was skipped or failed; ``gpu_check.md`` the tables.
Without a GPU the script says so and exits 2, unless ``--smoke`` (tests: CPU references on tiny sizes, no
presets).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402
import bench_speed  # noqa: E402

#: data-sheet peak memory bandwidth, GB/s, by a substring of the device name
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0}
PRESETS = ("llava15", "qwen2vl", "onevision_video", "qwen3vl", "internvl")
KERNEL_OPS = "cosine_argmax,attention_received,greedy_maxmin"
KERNEL_SIZES = "4704,6272,25088"


def peak_bandwidth(name: str) -> float | None:
    for key, value in PEAK_GBPS.items():
        if key.lower() in name.lower():
            return value
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/gpu_check")
    p.add_argument("--minutes", type=float, default=7.0, help="start no preset after this many minutes")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--peak-gbps", type=float, default=None, help="the GPU's peak memory bandwidth (GB/s)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny kernel sizes, no presets (tests)")
    args = p.parse_args(argv)

    started = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_check: no CUDA device here; run it on a GPU machine (or --smoke for the CPU path)")
        return 2
    device = "cpu" if args.smoke else "cuda"
    sizes = "64,128" if args.smoke else KERNEL_SIZES
    kernels = {"machine": {"gpu": torch.cuda.get_device_name() if device == "cuda" else ""}, "rows": []}
    failed = {}
    for op in KERNEL_OPS.split(","):  # op by op: one kernel's failure must not lose the others' figures
        try:
            part = bench_kernels.main(
                ["--device", device, "--ops", op, "--sizes", sizes, "--dims", "64", "--out", str(out / f"k_{op}")]
            )
            kernels = {**part, "rows": kernels["rows"] + part["rows"]}
        except Exception:
            failed[op] = traceback.format_exc(limit=8)
            print(f"gpu_check: kernel {op} failed:\n{failed[op]}", file=sys.stderr)
    gpu = kernels["machine"].get("gpu") or ""
    peak = args.peak_gbps or peak_bandwidth(gpu)
    for row in kernels["rows"]:
        if peak and "triton_GBps" in row:
            row["triton_bandwidth_fraction"] = row["triton_GBps"] / peak
    result = {
        "machine": kernels["machine"],
        "peak_GBps": peak,
        "kernels": kernels,
        "speed": {},
        "skipped_presets": [],
        "failed_kernels": failed,
    }
    if not args.smoke:
        try:
            result["greedy_graphs"] = greedy_graphs()
        except Exception:
            result["greedy_graphs"] = {"error": traceback.format_exc(limit=8)}
            print(f"gpu_check: greedy graphs failed:\n{result['greedy_graphs']['error']}", file=sys.stderr)
    result["failed_presets"] = {}
    presets = [] if args.smoke else [x for x in args.presets.split(",") if x]
    for name in presets:
        _write(out, result, started)  # what is done so far survives a kill
        if time.perf_counter() - started > args.minutes * 60:
            result["skipped_presets"].append(name)
            continue
        folder = out / f"speed_{name}"
        try:
            bench_speed.main(["--preset", name, "--dtype", "bfloat16", "--repeats", "3", "--out", str(folder)])
            result["speed"][name] = json.loads((folder / "speed.json").read_text())
        except Exception:  # one preset's failure must not lose the others' figures
            result["failed_presets"][name] = traceback.format_exc(limit=8)
            print(f"gpu_check: preset {name} failed:\n{result['failed_presets'][name]}", file=sys.stderr)
    _write(out, result, started)
    table = bench_kernels.markdown(kernels) if "mode" in kernels else "No kernel ran."
    lines = [f"# GPU check ({gpu or 'CPU smoke run'}), {result['seconds']:.0f} s", "", table]
    if peak:
        lines.append(f"Peak memory bandwidth taken as {peak:.0f} GB/s.")
        for row in kernels["rows"]:
            if "triton_bandwidth_fraction" in row:
                fraction = row["triton_bandwidth_fraction"]
                lines.append(f"* {row['op']} N={row['N']}: Triton at {fraction:.1%} of peak bandwidth")
    graphs = result.get("greedy_graphs")
    if isinstance(graphs, list):
        lines += [
            "",
            "| greedy_maxmin n | d | k | call | ms | same picks as the reference |",
            "|---:|---:|---:|---|---:|:-:|",
        ]
        lines += [
            f"| {r['n']} | {r['d']} | {r['k']} | {r['call']} | {r['ms']:.1f} | {r['same_as_reference']} |"
            for r in graphs
        ]
    for name in result["speed"]:
        lines += ["", (out / f"speed_{name}" / "speed.md").read_text()]
    if result["skipped_presets"]:
        lines += ["", f"Not run (time): {', '.join(result['skipped_presets'])}"]
    for what, failures in (("Kernel", result["failed_kernels"]), ("Preset", result["failed_presets"])):
        lines += [f"\n{what} {name} failed: `{error.strip().splitlines()[-1]}`" for name, error in failures.items()]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {result['seconds']:.0f} s")
    return 0


def greedy_graphs(n: int = 6272, keep: float = 0.2, dims: tuple[int, ...] = (64, 3584)) -> list[dict]:
    """Three calls of ``greedy_maxmin`` per width: step by step, captured, replayed; each checked and timed."""
    from vtc.kernels import reference
    from vtc.kernels.triton_greedy import forget_graphs, greedy_maxmin

    forget_graphs()  # the kernel benchmarks above called these shapes already
    rows = []
    for d in dims:
        k = round(keep * n)
        gen = torch.Generator(device="cuda").manual_seed(d)
        for call in ("eager", "capture", "replay", "replay"):
            x = torch.randn(1, n, d, device="cuda", generator=gen, dtype=torch.bfloat16)
            torch.cuda.synchronize()
            start = time.perf_counter()
            got = greedy_maxmin(x, k)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - start) * 1000
            same = bool(torch.equal(got, reference.greedy_maxmin(x, k)))
            rows.append({"n": n, "d": d, "k": k, "call": call, "ms": ms, "same_as_reference": same})
            print(f"  greedy_maxmin n={n} d={d} k={k} {call}: {ms:.1f} ms, same picks as the reference: {same}")
    return rows


def _write(out: pathlib.Path, result: dict, started: float) -> None:
    result["seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
