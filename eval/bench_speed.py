"""Speed benchmark: time to first token, decode speed, peak memory and FLOPs, compressed vs uncompressed.

For each preset (``eval/speed_presets.py``: real VLM layouts with random weights, scaled to a CPU) or a
local checkpoint (``--model PATH``), and each method x budget, one process measures:

* **TTFT / prefill**: time from ``generate()`` being called to the first token's logits (vision tower,
  projector, vtc, LLM prefill; a logits processor stamps the time), median over ``--repeats``;
* **decode**: tokens/s over the remaining ``new_tokens - 1`` steps of the same calls (KV cache on);
* **time inside vtc**: measured from outside (``session.prepare`` minus the model's own vision encoding
  plus vtc's hook computations inside the tower, plus vtc's hooks in the LLM layers during prefill), next
  to what the record reports (``record.seconds_in_vtc``);
* **FLOPs**: the LLM's analytic prefill FLOPs (``vtc.flops``, as in the record) and the model's FLOPs
  counted while it runs (``torch.utils.flop_counter``: vision tower, projector, LLM, LM head); ideal
  speed-ups "LLM-only" (analytic LLM FLOPs ratio) and "end-to-end" (counted model FLOPs ratio: the vision
  tower runs at full cost for pre-LLM methods);
* **peak memory** of one prefill: on CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats`` (minus
  what was allocated before); on CPU the growth of the process's peak RSS during the call (Linux
  ``VmHWM`` reset through ``/proc/self/clear_refs``, glibc told to return freed blocks of 64 KiB or more to
  the OS, measured in a separate pass after all timings so the timed runs keep the default allocator).

Each round times every configuration once and the uncompressed baseline twice, in a shuffled order, so
every speed-up is a ratio of medians taken over the same window of time. On a CPU, times are taken on the
wall clock and on the process's CPU clock (steadier on a shared machine). Measuring lives in
``speed_probes.py``, the tables and the plot in ``speed_report.py``.

    python eval/bench_speed.py                                 # presets llava15, qwen2vl, onevision_video
    python eval/bench_speed.py --preset llava15 --methods hired divprune --budgets 0.2 --repeats 7
    python eval/bench_speed.py --model /path/to/llava-1.5-7b-hf --budgets 0.2   # a local checkpoint
    python eval/bench_speed.py --out out/speed                 # writes speed.json, speed.md, speed.png there
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vtc.apps.demo import cpu_name

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import speed_presets  # noqa: E402
from speed_probes import MODULE_GROUPS, Clock, PeakMemory, VtcProbe, count_flops, generate_trial  # noqa: E402, F401
from speed_report import acceptance, markdown, plot, progress_line  # noqa: E402

DEFAULT_PRESETS = ("llava15", "qwen2vl", "onevision_video")


# -- machine ------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    cpu = cpu_name()
    import transformers

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# -- one preset --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    repeats: int = 5
    new_tokens: int | None = None  # None: the preset's
    methods: tuple[str, ...] | None = None
    budgets: tuple[float | int, ...] | None = None
    seed: int = 0
    dtype: torch.dtype = torch.float32


def _to(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in inputs.items()
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _medians(trials: list[dict], keys: tuple[str, ...]) -> dict[str, float | None]:
    """Median of each key over the trials that have it (CPU-time keys exist only on CPU)."""
    return {key: _median([t[key] for t in trials if key in t]) for key in keys}


def _reference_flops(preset: speed_presets.Preset, method: str | None, budget: float | int | None) -> dict | None:
    """FLOPs of the real checkpoint the preset stands for (analytic): vision tower, projector, LLM."""
    import vtc

    ref, work = preset.reference, preset.workload
    if ref is None or work is None:
        return None
    cfg = types.SimpleNamespace(**ref.llm)
    tokens = work.vit_tokens * work.units
    segments = [work.vit_segment] * (tokens // work.vit_segment)
    vision = speed_presets.vit_flops(ref.tower, tokens, segments) + work.units * ref.projector(work.vit_tokens)
    if method is None:
        llm = vtc.flops.prefill_flops(cfg, work.visual_tokens + work.text_tokens)
    else:
        llm = vtc.flops.method_flops(cfg, method, budget, work.visual_tokens, work.text_tokens)["prefill_compressed"]
    return {"vision": vision, "llm": llm, "total": vision + llm}


def run_preset(preset: speed_presets.Preset, opts: Options, device: torch.device, log: Callable) -> dict:
    """Measure the uncompressed model and every (method, budget) of ``preset`` (see module docstring)."""
    import vtc
    from vtc.adapters import UnsupportedModelError

    clock = Clock(device)
    methods = opts.methods or preset.methods
    budgets = opts.budgets or preset.budgets
    new_tokens = opts.new_tokens or preset.new_tokens
    started = time.perf_counter()
    model = preset.build(opts.seed).to(device, opts.dtype)
    inputs = _to(preset.inputs(model, opts.seed), device, opts.dtype)
    entry: dict[str, Any] = {
        "preset": preset.name,
        "summary": preset.summary,
        "reference": None if preset.reference is None else preset.reference.name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": new_tokens,
        "load_before": load(),
        "runs": [],
    }
    try:
        vtc.compress(model, methods[0], budget=budgets[0])
        vtc.restore(model)
    except UnsupportedModelError as err:
        entry["skipped"] = f"skipped: model family not supported by this vtc build ({err})"
        log(f"[{preset.name}] {entry['skipped']}")
        return entry
    except (ValueError, TypeError):
        pass  # this method alone does not apply here; each configuration records its own reason

    base_flops = count_flops(model, inputs)  # also the warm-up call of the uncompressed model
    base_llm = vtc.flops.prefill_flops(model.config.get_text_config(), entry["prompt_tokens"])
    for method in methods:
        for budget in budgets:
            run = _prepare_config(model, inputs, method, budget, clock, base_flops, base_llm)
            run["reference"] = _reference_flops(preset, method, budget)
            entry["runs"].append(run)
    active = [run for run in entry["runs"] if "skipped" not in run]
    for run in entry["runs"]:
        if "skipped" in run:
            log(progress_line(preset.name, run))

    # Round-robin: every round times each configuration once and the baseline twice, in a shuffled order,
    # so slow drift of the machine's load hits the baseline and every configuration alike.
    rng = random.Random(opts.seed)
    base_trials: list[dict] = []
    for r in range(opts.repeats):
        order = [None, None, *active]
        rng.shuffle(order)
        for run in order:
            if run is None:
                base_trials.append(generate_trial(model, inputs, new_tokens, clock, None))
            else:
                run["trials"].append(_compressed_trial(model, inputs, run, new_tokens, clock))
        log(f"[{preset.name}] round {r + 1}/{opts.repeats} done")
    entry["baseline"] = {
        "flops": base_flops,
        "llm_flops_analytic": base_llm,
        "reference": _reference_flops(preset, None, None),
        **_medians(base_trials, ("ttft_ms", "ttft_cpu_ms", "decode_tok_s", "decode_cpu_tok_s")),
        "trials": base_trials,
    }
    base = entry["baseline"]
    for run in active:
        trials = run["trials"]
        for t in trials:
            t["vtc_share"] = t["vtc_ms"] / t["ttft_ms"]
            if "vtc_cpu_ms" in t:
                t["vtc_share_cpu"] = t["vtc_cpu_ms"] / t["ttft_cpu_ms"]
        keys = ("ttft_ms", "ttft_cpu_ms", "decode_tok_s", "decode_cpu_tok_s", "vtc_ms", "vtc_cpu_ms", "vtc_record_ms")
        run.update(_medians(trials, keys + ("vtc_share", "vtc_share_cpu")))
        steps = max(new_tokens - 1, 1)
        run["vtc_decode_step_ms"] = _median([t["vtc_decode_ms"] / steps for t in trials])
        # best-of-N: the fastest call of each side, on the CPU clock where there is one (least disturbed by
        # other processes: the estimate of an idle machine; medians above are the primary numbers)
        key = "ttft_cpu_ms" if "ttft_cpu_ms" in trials[0] else "ttft_ms"
        run["speedup_best"] = min(t[key] for t in base_trials) / min(t[key] for t in trials)
        run["of_ideal_e2e_best"] = run["speedup_best"] / run["ideal_e2e"] if run["ideal_e2e"] else None
        for suffix in ("", "_cpu"):
            b, c = base.get(f"ttft{suffix}_ms"), run.get(f"ttft{suffix}_ms")
            speedup = b / c if b and c else None
            run[f"speedup{suffix}"] = speedup
            run[f"of_ideal_e2e{suffix}"] = speedup / run["ideal_e2e"] if speedup and run["ideal_e2e"] else None
            run[f"of_ideal_llm{suffix}"] = speedup / run["ideal_llm"] if speedup else None
        log(progress_line(preset.name, run))
    entry["load_after"] = load()
    entry["seconds"] = round(time.perf_counter() - started, 1)
    entry["_model"], entry["_inputs"] = model, inputs  # kept for the memory pass
    return entry


def _prepare_config(model, inputs, method, budget, clock, base_flops, base_llm) -> dict:
    """Compress once: count FLOPs, warm up, read the record (token counts, analytic FLOPs); then restore."""
    import vtc

    run: dict[str, Any] = {"method": method, "budget": budget}
    try:
        vtc.compress(model, method, budget=budget)
    except (ValueError, TypeError) as err:  # e.g. a method acting at a stage this family does not provide
        run["skipped"] = f"skipped: {err}"
        return run
    try:
        flops = count_flops(model, inputs, base_flops)  # also this configuration's warm-up call
        rec = vtc.last_record(model)
    except Exception as err:  # noqa: BLE001  a new family or method failing must not stop the other runs
        run["skipped"] = f"FAILED on its first call: {type(err).__name__}: {err}"
        return run
    finally:
        vtc.restore(model)
    if abs(rec.flops["prefill_full"] - base_llm) > 1e-6 * base_llm:
        raise RuntimeError(f"{method}: the record's uncompressed FLOPs differ from the benchmark's")
    run.update(
        visual_tokens_in=rec.visual_tokens["input"],
        visual_tokens_kept=sum(list(im.counts.values())[-1] for im in rec.images),  # after the last stage
        equivalent_budget=rec.equivalent_budget,
        prompt_tokens_kept=sum(s.output_length for s in rec.samples),
        llm_flops_analytic=rec.flops["prefill_compressed"],
        llm_flops_ratio=rec.flops["ratio"],
        flops=flops,
        ideal_llm=1.0 / rec.flops["ratio"],
        ideal_e2e=base_flops["model"] / flops["model"] if flops["model"] else None,
        trials=[],
    )
    return run


def _compressed_trial(model, inputs, run: dict, new_tokens: int, clock: Clock) -> dict:
    import vtc

    vtc.compress(model, run["method"], budget=run["budget"])
    probe = VtcProbe(model, clock)
    try:
        trial = generate_trial(model, inputs, new_tokens, clock, probe)
        trial["vtc_record_ms"] = vtc.last_record(model).seconds_in_vtc * 1000.0
    finally:
        probe.detach()
        vtc.restore(model)
    return trial


def _prefill_call(model: nn.Module, inputs: dict) -> Callable[[], None]:
    def prefill() -> None:
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)

    return prefill


def memory_pass(entries: list[dict], memory: PeakMemory, log: Callable) -> float | None:
    """Peak memory of one prefill forward per configuration.

    Returns what the method reads for a known 64 MiB allocation (a calibration printed with the results).
    """
    import vtc

    memory.enable()
    calibration = memory.measure(lambda: torch.ones(16 * 2**20, device=memory.device).sum())
    log(f"memory: a 64 MiB tensor made and freed inside the measured call reads as {calibration:.1f} MiB")
    for entry in entries:
        model, inputs = entry.pop("_model", None), entry.pop("_inputs", None)
        if model is None:
            continue
        prefill = _prefill_call(model, inputs)  # every shape here already ran in the timing phase
        entry["baseline"]["peak_mib"] = memory.measure(prefill)
        entry["resident_mib"] = memory.resident_mib()
        for run in entry["runs"]:
            if "skipped" in run:
                continue
            with vtc.compressed(model, run["method"], budget=run["budget"]):
                run["peak_mib"] = memory.measure(prefill)
        log(f"[{entry['preset']}] memory: baseline {entry['baseline']['peak_mib']:.0f} MiB")
        del model, inputs, prefill
        gc.collect()
    return calibration


# -- main -------------------------------------------------------------------------------------------------


def _budget(text: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", nargs="+", default=None, help=f"presets (default {' '.join(DEFAULT_PRESETS)}); "
                        f"known: {sorted(speed_presets.PRESETS)}")  # fmt: skip
    parser.add_argument("--model", help="a local checkpoint folder instead of presets (from_pretrained)")
    parser.add_argument("--methods", nargs="+", help="methods (default: each preset's)")
    parser.add_argument("--budgets", nargs="+", type=_budget, help="budgets (default: each preset's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per configuration and for its baseline")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per call (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; see docs/speed.md)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i]")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, ...")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--out", default="out/speed", help="folder for speed.json, speed.md and speed.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.model and args.preset:
        parser.error("pass --preset or --model, not both")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    opts = Options(
        repeats=args.repeats,
        new_tokens=args.new_tokens,
        methods=tuple(args.methods) if args.methods else None,
        budgets=tuple(args.budgets) if args.budgets else None,
        seed=args.seed,
        dtype=getattr(torch, dtype_name),
    )
    if args.model:
        presets = [speed_presets.checkpoint_preset(args.model)]
    else:
        presets = [speed_presets.get_preset(n) for n in (args.preset or DEFAULT_PRESETS)]

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {text}", flush=True)

    memory = PeakMemory(device)
    results: dict[str, Any] = {
        "machine": machine(device),
        "settings": {
            "command": "python eval/bench_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "repeats": args.repeats,
            "dtype": dtype_name,
            "load_start": load(),
            "memory_method": memory.method or f"not measured ({memory.reason})",
            "random_weights": not args.model,
        },
        "presets": [],
    }
    log(f"machine: {results['machine']}")
    for preset in presets:
        log(f"[{preset.name}] {preset.summary}")
        results["presets"].append(run_preset(preset, opts, device, log))
    if args.no_memory or memory.method is None:
        for entry in results["presets"]:
            entry.pop("_model", None), entry.pop("_inputs", None)
    else:
        results["settings"]["memory_calibration_mib"] = memory_pass(results["presets"], memory, log)
    results["acceptance"] = acceptance(results)
    results["settings"].update(load_end=load(), seconds=time.perf_counter() - started)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "speed.md").write_text(markdown(results))
    plot(results, out / "speed.png")
    print(markdown(results))
    log(f"wrote {out / 'speed.json'}, {out / 'speed.md'}, {out / 'speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
